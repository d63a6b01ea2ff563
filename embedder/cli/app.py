"""`embedder` command line: one module per command group, wired here."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import typer
from typer.core import TyperGroup

try:  # typer >= 0.17 carries its own copy of click
    from typer._click import exceptions as cx  # type: ignore[attr-defined]
    from typer._click.utils import echo
except ImportError:  # pragma: no cover - older typer on click
    from click import exceptions as cx  # type: ignore[no-redef]
    from click.utils import echo  # type: ignore[no-redef]

from embedder.cli import (
    compare_cmd,
    dedup_cmd,
    export_cmd,
    extract_cmd,
    finetune_cmd,
    import_cmd,
    index_cmd,
    inspect_cmd,
    probe_cmd,
    search_cmd,
    select_cmd,
    serve_cmd,
    store_cmd,
)


class OneLineErrors(TyperGroup):
    """A command line that does not parse (an unknown choice, a value out of range, a missing
    argument) is a one-line ``error: …`` and exit code 2, like every other error of the CLI; no
    arguments at all still prints the help."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,  # type: ignore[override]
             complete_var: str | None = None, standalone_mode: bool = True, **kwargs: Any) -> Any:
        where = {"args": args, "prog_name": prog_name, "complete_var": complete_var, **kwargs}
        if not standalone_mode:
            return super().main(standalone_mode=False, **where)
        try:
            rv = super().main(standalone_mode=False, **where)
        except cx.NoArgsIsHelpError:
            return super().main(standalone_mode=True, **where)  # prints the help
        except cx.UsageError as e:
            message = e.format_message().replace("Value error, ", "")  # the validator's own prefix
            echo(f"error: {message}", err=True)
            sys.exit(e.exit_code)
        except cx.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except typer.Abort:
            echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    name="embedder",
    help="Transfer learning for image collections: extract, probe, index, search, fine-tune.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    cls=OneLineErrors,
    # click's own help layout: at 80 columns rich's boxed tables squeezed the help into a column of
    # ~16 characters and showed a <bool> type beside every flag
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        from embedder._version import __version__

        echo(f"embedder {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", "-V", is_eager=True, callback=_print_version,
                                      help="Print the version and exit.")) -> None:
    """Transfer learning for image collections: extract, probe, index, search, fine-tune."""

extract_cmd.register(app)
store_cmd.register(app)
index_cmd.register(app)
search_cmd.register(app)
dedup_cmd.register(app)
probe_cmd.register(app)
finetune_cmd.register(app)
serve_cmd.register(app)
inspect_cmd.register(app)
compare_cmd.register(app)
select_cmd.register(app)
import_cmd.register(app)
export_cmd.register(app)


def main() -> None:
    app()

"""`embedder` command line: one module per command group, wired here."""

from __future__ import annotations

import typer

from embedder.cli import extract_cmd, finetune_cmd, index_cmd, inspect_cmd, probe_cmd, serve_cmd, store_cmd

app = typer.Typer(
    name="embedder",
    help="Transfer learning for image collections: extract, probe, index, search, fine-tune.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

extract_cmd.register(app)
store_cmd.register(app)
index_cmd.register(app)
probe_cmd.register(app)
finetune_cmd.register(app)
serve_cmd.register(app)
inspect_cmd.register(app)


def main() -> None:
    app()

"""Shared CLI plumbing: error handling, console, progress bars."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, Optional, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from embedder.errors import EmbedderError

console = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])


def value(choice: str | None) -> str | None:
    """A typed choice (``embedder.choices``) as the plain string the library records."""
    return None if choice is None else str(getattr(choice, "value", choice))


def handle_errors(fn: F) -> F:
    """Domain errors become 'error: …' on stderr and an exit code; bugs keep their traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except EmbedderError as e:
            # escaped: a message may hold brackets (pip extras, paths) that are not rich markup
            console.print(f"[red]error:[/red] {escape(str(e))}", markup=True, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            console.print("interrupted; completed shards are kept, rerun the same command to resume")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def setup_logging(verbose: bool) -> None:
    level = logging.INFO if verbose else logging.WARNING
    root = logging.getLogger("embedder")
    root.handlers[:] = [RichHandler(console=console, show_path=False, show_time=False)]
    root.setLevel(level)
    # a library's bare `logging.warning(...)` (OpenCLIP's, on creating a model) installs a stderr handler
    # on the root logger when it has none, and every embedder line was then printed twice: it has one
    top = logging.getLogger()
    if not top.handlers:
        top.addHandler(logging.NullHandler())


class ImageRate(ProgressColumn):
    """Images per second (rich's own speed column speaks in bytes): a recent window while running,
    the whole run's average once finished (batches arrive in bursts; the last window can be ms)."""

    def render(self, task: Task) -> Text:
        if task.finished and task.elapsed:
            speed: float | None = task.completed / task.elapsed
        else:
            speed = task.speed
        return Text(f"{speed:,.1f} img/s" if speed else "… img/s", style="cyan")


@contextmanager
def image_progress(description: str, enabled: bool = True) -> Iterator[Callable[[int, int, int], None]]:
    """A rich progress bar with img/s and ETA, as a (total, advanced, failed) callback."""
    if not enabled:
        yield lambda total, advanced, failed: None
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), ImageRate(),
        TextColumn("[red]{task.fields[failed]} failed"), TimeElapsedColumn(), TextColumn("ETA"),
        TimeRemainingColumn(), console=console, transient=False,
    )
    task = None

    def update(total: int, advanced: int, failed: int) -> None:
        nonlocal task
        if task is None:
            if total == 0:
                return
            progress.start()  # lazily: an error before any work prints no empty bar
            task = progress.add_task(description, total=total, failed=0)
        if task is not None:
            progress.update(task, advance=advanced, failed=failed)

    try:
        yield update
    finally:
        if task is not None:
            progress.stop()


HomeOpt = Annotated[Optional[str], typer.Option("--home", help="Index home (default: $EMBEDDER_HOME or ./indexes).")]


def fit_paths(paths: list[str], width: int) -> tuple[str, list[str]]:
    """Paths for a table column WIDTH characters wide that keeps every file name (a tar member's
    ``#member`` too): their common folder taken out (returned, for the title) when there is one, and
    any path still too long cut from the left ("…/cat/IMG_2041.jpg"), never at its end."""
    import os

    root = ""
    local = [p for p in paths if p and "://" not in p]
    if len(local) == len(paths) and len(paths) > 1:
        try:
            root = os.path.commonpath(paths)
        except ValueError:  # absolute and relative mixed, or different drives
            root = ""
        if "#" in root:  # inside a tar shard or a table: keep the file's own name (t.parquet#image/0/12)
            root = os.path.dirname(root[:root.index("#")])
        if root in ("", "/", "."):
            root = ""
    shown = [p[len(root):].lstrip("/") if root else p for p in paths]
    width = max(width, 12)
    return root, [p if len(p) <= width else "…" + p[-(width - 1):] for p in shown]


@contextmanager
def stage_progress(enabled: bool = True) -> Iterator[Callable[[str, int, int], None]]:
    """A bar for a command of named stages, as a (stage, done, total) callback; started at the first
    tick (an error while opening prints no empty bar) and removed when the block ends."""
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console, disable=not enabled, transient=True)
    task = None

    def tick(stage: str, done: int, total: int) -> None:
        nonlocal task
        if task is None:
            progress.start()
            task = progress.add_task(stage, total=None)
        progress.update(task, description=stage, completed=done, total=total)

    try:
        yield tick
    finally:
        if task is not None:
            progress.stop()

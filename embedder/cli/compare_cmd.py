"""`embedder compare`: which backbone and layer transfer best to a labelled collection."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import typer

from embedder.analysis.options import PENULTIMATE, CompareOptions
from embedder.cli.common import console, handle_errors, out, setup_logging


@handle_errors
def compare_command(
    train_sources: Annotated[list[str], typer.Argument(help="Labelled training images: folders (one subfolder per class), globs or lists.")],
    backbones: Annotated[str, typer.Option(help="Comma-separated registry names, e.g. resnet50,mobilenet_v2:IMAGENET1K_V1.")],
    work: Annotated[Path, typer.Option(help="Directory for the per-cell stores (cached: a second run reuses them), leaderboard and plots.")],
    test: Annotated[Optional[list[str]], typer.Option(help="Labelled test images (default: hold out 20 % of train).")] = None,
    labels: Annotated[Optional[list[Path]], typer.Option("--labels", help="Repeatable (rounds of labelling: a later file wins for an id). " + "CSV or Parquet of id,label rows, keyed by the ids extract gives these images (`embedder info` on a store of them shows them): their labels put over the folders' (train and --test); images it does not name keep their folder's, ids not among the images are ignored and counted.")] = None,
    layers: Annotated[str, typer.Option(help="Comma-separated: penultimate, module names (see `embedder backbones --layers NAME`), or all.")] = PENULTIMATE,
    probe_top: Annotated[int, typer.Option(min=1, help="Cells, best by the cheap scores, that get the full linear probe.")] = CompareOptions.probe_top,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda[:N]")] = CompareOptions.device,
    batch_size: Annotated[Optional[int], typer.Option(min=1)] = None,
    seed: Annotated[int, typer.Option()] = CompareOptions.seed,
    as_json: Annotated[bool, typer.Option("--json", help="Print the leaderboard as one JSON object.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Rank backbones × layers on your own labelled images: kNN, LogME, linear probe, speed."""
    from rich.table import Table

    from embedder.analysis.compare import compare
    from embedder.analysis.options import CompareOptions
    from embedder.cli.common import image_progress

    setup_logging(verbose)
    options = CompareOptions(
        backbones=tuple(b.strip() for b in backbones.split(",") if b.strip()),
        layers=tuple(x.strip() for x in layers.split(",") if x.strip()),
        probe_top=probe_top, device=device, batch_size=batch_size, seed=seed)
    from contextlib import ExitStack

    bars = ExitStack()
    current: dict[str, Callable[[int, int, int], None]] = {}

    def progress(label: str, total: int, advanced: int, failed: int) -> None:
        if as_json:
            return
        if label not in current:
            status("")
            current[label] = bars.enter_context(image_progress(f"embedding {label}"))
        current[label](total, advanced, failed)

    def status(message: str) -> None:
        bars.close()  # one bar at a time: a finished cell's bar stays on screen
        current.clear()
        if message and not as_json:
            console.print(message, markup=False)  # ids and paths may hold [brackets]

    from embedder.store.labels import LabelJoin, read_labels

    join = LabelJoin(read_labels(labels)) if labels else None
    board = compare(train_sources, str(work), options, test or None, progress, status, join)
    status("")
    if as_json:
        out.print_json(json.dumps(board.to_dict()))
        return
    table = Table("backbone", "layer", "dim", "probe (95% CI)", "kNN", "kNN LOO", "LogME",
                  "img/s", "GFLOPs", title=f"{board.n_train} train / {board.n_test} test images ({board.test})")
    for c in board.cells:
        probe = (f"{c.probe_accuracy:.3f} ({c.probe_ci[0]:.3f}-{c.probe_ci[1]:.3f})"
                 if c.probe_accuracy is not None and c.probe_ci else "-")
        table.add_row(c.backbone, c.layer, str(c.dim), probe, f"{c.knn_accuracy:.3f}" if c.knn_accuracy is not None else "-",
                      f"{c.knn_loo:.3f}" if c.knn_loo is not None else "-", f"{c.logme:.3f}" if c.logme is not None else "-",
                      f"{c.images_per_second:.1f}" if c.images_per_second else "-",
                      f"{c.gflops:.3g}" if c.gflops is not None else "-")
    out.print(table)
    if board.winner and board.runner_up and board.margin is not None:
        verdict = (f"[yellow]within noise[/yellow] (McNemar p = {board.p_value:.2f} on the same {board.n_test} test images): "
                   "more test images, or pick by speed" if board.within_noise
                   else f"significant (McNemar p = {board.p_value:.3f})")
        out.print(f"winner: [bold]{board.winner}[/bold], ahead of {board.runner_up} by {board.margin:+.1%}: {verdict}")
    elif board.winner:
        out.print(f"winner: [bold]{board.winner}[/bold] (the only cell probed)")
    out.print(f"leaderboard → {work / 'leaderboard.json'}; plots → {work / 'accuracy_vs_depth.png'}, "
              f"{work / 'accuracy_vs_speed.png'}")


def register(app: typer.Typer) -> None:
    app.command("compare")(compare_command)

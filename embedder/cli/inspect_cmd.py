"""`embedder inspect` (and, beside it, `embedder compare`)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from embedder import choices
from embedder.cli.common import console, handle_errors, out, setup_logging


@handle_errors
def inspect_command(
    store: Annotated[str, typer.Argument(help="Store to inspect (train, when --test is given).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Report directory: index.html, findings.parquet, thumbs/.")],
    test: Annotated[Optional[str], typer.Option(help="Test store: test images with a near-duplicate in train are listed first.")] = None,
    label_column: Annotated[str, typer.Option(help="Column holding the class name.")] = "label",
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="Neighbours in the kNN graph.")] = 10,
    duplicate_threshold: Annotated[Optional[float], typer.Option(help="Cosine similarity at which two images are near-duplicates (and a test image leaked); JPEG-recompressed, downscaled copies measured 0.93-0.998, distinct photos ≤ 0.63 (default 0.90).")] = None,
    folds: Annotated[int, typer.Option(help="Folds of the cross-validated probe behind label errors.")] = 5,
    projection: Annotated[choices.Projection, typer.Option(help="The map's projection (umap needs embedder\\[umap]).")] = choices.Projection.pca,
    thumbnails: Annotated[str, typer.Option(help="all (every point of the map) | findings | none.")] = "all",
    seed: Annotated[int, typer.Option()] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Duplicates, train/test leakage, likely label errors, outliers and class overlap → a static report."""
    from embedder.analysis.inspection import InspectOptions, inspect_store, write_outputs

    setup_logging(verbose)
    options = InspectOptions(label_column=label_column, k=k, folds=folds, projection=str(projection),
                             thumbnails=thumbnails, seed=seed)
    if duplicate_threshold is not None:  # the default lives in one place: embedder.analysis.dedup
        options = dataclasses.replace(options, duplicate_threshold=duplicate_threshold)
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console, disable=as_json, transient=True)
    task = None

    def tick(stage: str, done: int, total: int) -> None:
        nonlocal task
        if task is None:  # started lazily: an error while loading prints no empty bar
            progress.start()
            task = progress.add_task(stage, total=None)
        progress.update(task, description=stage, completed=done, total=total)

    try:
        insp = inspect_store(str(store), str(out_dir), str(test) if test else None, options, tick)
        s = write_outputs(insp, str(out_dir), tick)
    finally:
        if task is not None:
            progress.stop()
    if as_json:
        out.print_json(json.dumps(s.to_dict()))
        return
    out.print(f"[bold]{s.store}[/bold]: {s.images} images, {s.labelled} labelled, {len(s.classes)} classes"
              + (f"; test {s.test_images} images" if s.test_images is not None else ""))
    if s.probe_accuracy is not None:
        out.print(f"  linear probe {s.probe_accuracy:.1%} ({s.folds}-fold cross-validated), "
                  f"kNN {s.knn_accuracy:.1%} (leave-one-out)")
    if s.leaks is not None:
        out.print(f"  [{'red' if s.leaks else 'green'}]leaked test images[/]  {s.leaks}")
    out.print(f"  near-duplicate groups  {s.duplicate_groups} ({s.duplicate_images} extra "
              f"{'copy' if s.duplicate_images == 1 else 'copies'})")
    if s.label_issues is not None:
        out.print(f"  likely label errors    {s.label_issues} (and {s.label_possible} possible)")
    out.print(f"  outliers               {s.outliers}")
    for ov in s.overlaps[:3]:
        out.print(f"  overlap {ov['a']} ↔ {ov['b']}: {ov['rate']:.1%} confused")
    for m in s.skipped:
        console.print(f"[yellow]skipped:[/yellow] {m}")
    if s.thumbnails.get("missing"):
        n = s.thumbnails["missing"]
        console.print(f"[yellow]note:[/yellow] {n} image{'' if n == 1 else 's'} could not be read for thumbnails "
                      "(moved or deleted since extraction); the report marks them missing")
    out.print(f"report → {s.report}  findings → {s.findings}")


@handle_errors
def compare_command(
    train_sources: Annotated[list[str], typer.Argument(help="Labelled training images: folders (one subfolder per class), globs or lists.")],
    backbones: Annotated[str, typer.Option(help="Comma-separated registry names, e.g. resnet50,mobilenet_v2:IMAGENET1K_V1.")],
    work: Annotated[Path, typer.Option(help="Directory for the per-cell stores (cached: a second run reuses them), leaderboard and plots.")],
    test: Annotated[Optional[list[str]], typer.Option(help="Labelled test images (default: hold out 20 % of train).")] = None,
    layers: Annotated[str, typer.Option(help="Comma-separated: penultimate, module names (see `embedder backbones --layers NAME`), or all.")] = "penultimate",
    probe_top: Annotated[int, typer.Option(min=1, help="Cells, best by the cheap scores, that get the full linear probe.")] = 3,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda[:N]")] = "auto",
    batch_size: Annotated[Optional[int], typer.Option(min=1)] = None,
    seed: Annotated[int, typer.Option()] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the leaderboard as one JSON object.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Rank backbones × layers on your own labelled images: kNN, LogME, linear probe, speed."""
    from rich.table import Table

    from embedder.analysis.compare import CompareOptions, compare
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
            console.print(message)

    board = compare(train_sources, str(work), options, test or None, progress, status)
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
    app.command("inspect")(inspect_command)
    app.command("compare")(compare_command)

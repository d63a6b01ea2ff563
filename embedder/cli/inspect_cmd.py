"""`embedder inspect`: what the embeddings reveal about the data."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from embedder import choices
from embedder.analysis.options import NEAR_DUPLICATE_COSINE, InspectOptions
from embedder.cli.common import console, handle_errors, out, setup_logging, stage_progress


@handle_errors
def inspect_command(
    store: Annotated[str, typer.Argument(help="Store to inspect (train, when --test is given).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Report directory: index.html, findings.parquet, thumbs/.")],
    test: Annotated[Optional[str], typer.Option(help="Test store: test images with a near-duplicate in train are listed first.")] = None,
    label_column: Annotated[str, typer.Option(help="Column holding the class name.")] = InspectOptions.label_column,
    labels: Annotated[Optional[list[Path]], typer.Option("--labels", help="Repeatable (rounds of labelling: a later file wins for an id). " + "CSV or Parquet of id,label rows: joined on the store's 'id', its labels put over the store's own (label errors, overlap and accuracies are then of these labels); rows it does not name keep theirs, ids not in the store are ignored and counted. Read batch by batch on large stores.")] = None,
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="Neighbours in the kNN graph.")] = InspectOptions.k,
    duplicate_threshold: Annotated[Optional[float], typer.Option(help=f"Cosine similarity at which two images are near-duplicates (and a test image leaked); JPEG-recompressed, downscaled copies measured 0.93-0.998, distinct photos ≤ 0.63 (default {NEAR_DUPLICATE_COSINE:g}).")] = None,
    folds: Annotated[int, typer.Option(help="Folds of the cross-validated probe behind label errors.")] = InspectOptions.folds,
    projection: Annotated[choices.Projection, typer.Option(help="The map's projection (umap needs embedder\\[umap]).")] = choices.Projection(InspectOptions.projection),
    thumbnails: Annotated[str, typer.Option(help="all (every point of the map) | findings | none.")] = InspectOptions.thumbnails,
    seed: Annotated[int, typer.Option()] = InspectOptions.seed,
    memory_budget: Annotated[Optional[str], typer.Option(help="Memory for a store too large to hold (e.g. 2GB): bucket size, samples and write buffers follow it (default: a quarter of RAM, at most 2 GiB).")] = None,
    graph: Annotated[str, typer.Option(help="auto: exact up to 20,000 images, k-means buckets on disk above (memory set by --memory-budget, recall measured) | memory | buckets.")] = InspectOptions.graph,
    engine: Annotated[str, typer.Option(help="local | ray: search the buckets as Ray tasks (the bucket files must be on storage every node sees).")] = InspectOptions.engine,
    work_dir: Annotated[Optional[Path], typer.Option(help="Where the bucket files go (about 1.3x the store's vectors; removed at the end). Default: inside --out.")] = None,
    max_listed: Annotated[Optional[int], typer.Option(min=0, help="Stores too large to hold: at most this many label errors and outliers are written to findings.parquet (the most likely first; all are counted in the summary).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Duplicates, train/test leakage, likely label errors, outliers and class overlap → a static report."""
    from embedder.analysis.inspection import inspect_store, write_outputs
    from embedder.analysis.options import InspectOptions

    setup_logging(verbose)
    from embedder.errors import InspectError
    from embedder.sizes import parse_size

    options = InspectOptions(label_column=label_column, k=k, folds=folds, projection=str(projection),
                             thumbnails=thumbnails, seed=seed, graph=graph, engine=engine,
                             memory_budget=parse_size(memory_budget, InspectError) if memory_budget else None,
                             work_dir=str(work_dir) if work_dir else None)
    if max_listed is not None:
        options = dataclasses.replace(options, labels=dataclasses.replace(options.labels, max_listed=max_listed))
    if duplicate_threshold is not None:  # the default lives in one place: embedder.analysis.dedup
        options = dataclasses.replace(options, duplicate_threshold=duplicate_threshold)

    from embedder.store.labels import LabelJoin, read_labels

    join = LabelJoin(read_labels(labels)) if labels else None
    with stage_progress(not as_json) as tick:
        insp = inspect_store(str(store), str(out_dir), str(test) if test else None, options, tick, join)
        joined = join.result() if join is not None else None
        s = write_outputs(insp, str(out_dir), tick, joined)
    if as_json:
        out.print_json(json.dumps(s.to_dict() | ({"labels": joined.to_dict()} if joined is not None else {})))
        return
    if joined is not None:
        out.print(joined.summary(), markup=False)
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


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect_command)

"""`embedder dedup`: near-duplicate groups of a store, by range search."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from embedder.analysis.options import NEAR_DUPLICATE_COSINE
from embedder.cli.common import handle_errors, out


@handle_errors
def dedup_command(
    store: str,
    out_file: Annotated[Path, typer.Option("--out", help="Parquet file: group, id, path.")] = Path("duplicates.parquet"),
    threshold: Annotated[Optional[float], typer.Option(help=f"Cosine similarity at or above which images group (default {NEAR_DUPLICATE_COSINE:g}, as `inspect`: JPEG-recompressed, downscaled copies measured 0.93-0.998, distinct photos ≤ 0.63).")] = None,
    memory_budget: Annotated[Optional[str], typer.Option(help="Memory for a store too large to hold (e.g. 2GB), as `inspect`.")] = None,
    engine: Annotated[str, typer.Option(help="local | ray: search the k-means buckets as Ray tasks.")] = "local",
    graph: Annotated[str, typer.Option(help="auto: exact up to 20,000 images, k-means buckets on disk above | memory | buckets.")] = "auto",
    work_dir: Annotated[Optional[Path], typer.Option(help="Where the bucket files go (about 1.3x the store's vectors; removed at the end). Default: beside --out.")] = None,
) -> None:
    """Near-duplicate groups: exact kNN up to 20,000 images, k-means buckets on disk above (bounded memory)."""
    from embedder.analysis.dedup import dedup
    from embedder.analysis.options import InspectOptions
    from embedder.errors import InspectError
    from embedder.sizes import parse_size

    options = InspectOptions(engine=engine, graph=graph, memory_budget=parse_size(memory_budget, InspectError) if memory_budget else None,
                             work_dir=str(work_dir) if work_dir else None)
    s = dedup(str(store), str(out_file), threshold, options=options)
    out.print(f"{s.images:,} images: {s.groups:,} near-duplicate groups, {s.duplicates:,} images beyond "
              f"the first of each group (cosine ≥ {s.threshold}) → {s.out}")


def register(app: typer.Typer) -> None:
    app.command("dedup")(dedup_command)

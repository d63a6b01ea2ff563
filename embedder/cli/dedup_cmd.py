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
    out_file: Annotated[Optional[Path], typer.Option("--out", help="Parquet file: group, id, path (default: STORE.duplicates.parquet, beside the store).")] = None,
    show: Annotated[int, typer.Option(help="Groups to print, largest first (0: none).")] = 5,
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
    target = str(out_file) if out_file is not None else default_out(store)
    s = dedup(str(store), target, threshold, options=options)
    out.print(f"{s.images:,} images: {s.groups:,} near-duplicate groups, {s.duplicates:,} images beyond "
              f"the first of each group (cosine ≥ {s.threshold}) → {s.out}", markup=False)
    if show > 0 and s.groups:
        _print_groups(s.out, show)


def default_out(store: str) -> str:
    """STORE.duplicates.parquet beside the store (never inside it: a store's folder holds its shards),
    not in whatever folder the command ran from."""
    from embedder.io import storage

    where = storage.resolve(store).rstrip("/")
    return storage.join(storage.parent(where), f"{storage.name(where)}.duplicates.parquet")


def _print_groups(path: str, most: int, members: int = 4) -> None:
    """The MOST largest groups, MEMBERS paths each (the file holds them all)."""
    import pyarrow.compute as pc

    from embedder.io import storage

    t = storage.open_parquet(path).read(columns=["group", "path"])
    sizes = t.group_by("group").aggregate([("path", "count")]).sort_by([("path_count", "descending"),
                                                                         ("group", "ascending")])
    for g, n in zip(sizes.column("group").to_pylist()[:most], sizes.column("path_count").to_pylist()[:most]):
        paths = t.filter(pc.equal(t.column("group"), g)).column("path").to_pylist()
        more = f", … {n - members} more" if n > members else ""
        out.print(f"group {g} ({n} images): {', '.join(str(p) for p in paths[:members])}{more}", markup=False)
    if sizes.num_rows > most:
        out.print(f"… {sizes.num_rows - most:,} more groups in {path}", markup=False)


def register(app: typer.Typer) -> None:
    app.command("dedup")(dedup_command)

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
) -> None:
    """Near-duplicate groups by range search."""
    from embedder.analysis.dedup import dedup

    s = dedup(str(store), str(out_file), threshold)
    out.print(f"{s.images:,} images: {s.groups:,} near-duplicate groups, {s.duplicates:,} images beyond "
              f"the first of each group (cosine ≥ {s.threshold}) → {s.out}")


def register(app: typer.Typer) -> None:
    app.command("dedup")(dedup_command)

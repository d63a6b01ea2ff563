"""Near-duplicate groups by range search on cosine similarity."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedder.errors import IndexError_
from embedder.store import Store, arrow_to_embeddings


@dataclass
class DedupSummary:
    images: int
    groups: int
    duplicates: int  # images beyond the first of each group
    threshold: float
    out: str


# Cosine at which two images are near-duplicates, for `dedup` and `inspect` alike. Measured with
# MobileNetV2: JPEG-recompressed, 0.7x downscaled copies of photos at 0.93-0.998, distinct photos at
# most 0.63 (docs/benchmarks.md, "Inspect").
NEAR_DUPLICATE_COSINE = 0.90


def dedup(store_path: str, out: str, threshold: float | None = None) -> DedupSummary:
    """Groups of near-duplicates (cosine >= THRESHOLD, default NEAR_DUPLICATE_COSINE), joined transitively."""
    import faiss
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    threshold = NEAR_DUPLICATE_COSINE if threshold is None else threshold
    if not 0 < threshold <= 1:
        raise IndexError_(f"--threshold is a cosine similarity in (0, 1], got {threshold}")
    t = Store.open(store_path).read(["id", "path", "embedding"])
    x = arrow_to_embeddings(t.column("embedding"))
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    n = len(x)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    rows, cols = [], []
    step = 4096
    for start in range(0, n, step):
        lims, _, ids = index.range_search(x[start:start + step], threshold)
        counts: np.ndarray = np.diff(np.asarray(lims, dtype=np.int64))
        rows.append(np.repeat(np.arange(start, start + len(counts)), counts))
        cols.append(ids)
    r, c = (np.concatenate(rows), np.concatenate(cols)) if rows else (np.zeros(0, int), np.zeros(0, int))
    graph = coo_matrix((np.ones(len(r), np.int8), (r, c)), shape=(n, n))
    n_comp, component = connected_components(graph, directed=True, connection="weak")
    sizes = np.bincount(component, minlength=n_comp)
    in_group = np.flatnonzero(sizes[component] > 1)
    # groups numbered in the order of their first member, so the output is stable across runs
    dup_components = np.unique(component[in_group])
    number = np.full(n_comp, -1, dtype=np.int64)
    first = np.full(n_comp, n, dtype=np.int64)
    np.minimum.at(first, component, np.arange(n))
    number[dup_components[np.argsort(first[dup_components])]] = np.arange(len(dup_components))
    table = pa.table({
        "group": pa.array(number[component[in_group]], pa.int64()),
        "id": t.column("id").take(pa.array(in_group)),
        "path": t.column("path").take(pa.array(in_group)),
    }).sort_by([("group", "ascending"), ("path", "ascending")])
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out)
    return DedupSummary(n, len(dup_components), len(in_group) - len(dup_components), threshold, out)

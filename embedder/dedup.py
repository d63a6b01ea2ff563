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


def _find(parent: np.ndarray, i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def dedup(store_path: str, out: str, threshold: float = 0.95) -> DedupSummary:
    import faiss

    if not 0 < threshold <= 1:
        raise IndexError_(f"--threshold is a cosine similarity in (0, 1], got {threshold}")
    t = Store.open(store_path).read(["id", "path", "embedding"])
    x = arrow_to_embeddings(t.column("embedding"))
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    parent = np.arange(len(x))
    step = 4096
    for start in range(0, len(x), step):
        lims, _, ids = index.range_search(x[start:start + step], threshold)
        for qi in range(min(step, len(x) - start)):
            a = start + qi
            for b in ids[lims[qi]:lims[qi + 1]]:
                ra, rb = _find(parent, a), _find(parent, int(b))
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([_find(parent, i) for i in range(len(x))])
    uniq, counts = np.unique(roots, return_counts=True)
    dup_roots = set(uniq[counts > 1].tolist())
    group_of = {r: g for g, r in enumerate(sorted(dup_roots))}
    rows = [i for i in range(len(x)) if roots[i] in dup_roots]
    table = pa.table({
        "group": pa.array([group_of[roots[i]] for i in rows], pa.int64()),
        "id": pa.array([t.column("id")[i].as_py() for i in rows], pa.string()),
        "path": pa.array([t.column("path")[i].as_py() for i in rows], pa.string()),
    }).sort_by([("group", "ascending"), ("path", "ascending")])
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out)
    return DedupSummary(len(x), len(dup_roots), len(rows) - len(dup_roots), threshold, out)

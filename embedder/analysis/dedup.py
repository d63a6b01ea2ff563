"""Near-duplicate groups by range search on cosine similarity."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedder.analysis.options import NEAR_DUPLICATE_COSINE, InspectOptions
from embedder.errors import IndexError_
from embedder.store.shards import Store, arrow_to_embeddings


@dataclass
class DedupSummary:
    images: int
    groups: int
    duplicates: int  # images beyond the first of each group
    threshold: float
    out: str


def dedup(store_path: str, out: str, threshold: float | None = None, k: int = 10,
          options: InspectOptions | None = None) -> DedupSummary:
    """Groups of near-duplicates (cosine >= THRESHOLD, default NEAR_DUPLICATE_COSINE), joined
    transitively: the connected components of the shared k-nearest-neighbour graph's edges at or above
    the threshold (``analysis.knn``: exact up to 20,000 rows, IVF with measured recall above), so
    time and memory grow with the rows, not with their pairs; a group larger than k + 1 is still found
    whole, its members linking through each other. Above ``exact_limit`` rows (or with ``options.graph
    == "buckets"``) the bucketed graph of ``analysis.streamed`` in memory set by the budget, as
    `inspect`. The output file is replaced in one step."""
    import dataclasses
    import os

    from embedder.analysis.duplicates import duplicate_groups
    from embedder.analysis.inspection import uses_buckets
    from embedder.analysis.knn import knn_graph

    threshold = NEAR_DUPLICATE_COSINE if threshold is None else threshold
    if not 0 < threshold <= 1:
        raise IndexError_(f"--threshold is a cosine similarity in (0, 1], got {threshold}")
    try:
        import faiss  # noqa: F401 - a clear error before any reading
    except ImportError:
        raise IndexError_("dedup needs faiss: pip install 'embedder[index]'") from None
    options = dataclasses.replace(options or InspectOptions(), duplicate_threshold=threshold, k=k)
    options.check()
    if uses_buckets(store_path, options):  # bounded memory: the bucketed graph, ids read for the groups only
        from embedder.analysis.streamed import bucket_pipeline, duplicates_of, lookup, work_space

        with work_space(options.work_dir, Path(out).parent, ".dedup-") as work:
            state = bucket_pipeline(store_path, None, options, work, lambda _s, _d, _t: None, with_labels=False)
        n = state["n"]
        found = duplicates_of(state["consumed"]).by_first_row()  # arrays: millions of groups at 10^8 rows
        rows, sizes = found.rows, found.sizes
        needed = np.unique(rows)
        ids, paths, _ = lookup(state["store"], needed, None, None, None)
        at = pa.array(np.searchsorted(needed, rows))
        ids, paths = ids.take(at), paths.take(at)
    else:
        t = Store.open(store_path).read(["id", "path", "embedding"])
        x = arrow_to_embeddings(t.column("embedding"))
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        n = len(x)
        groups = duplicate_groups(knn_graph(x, k, options.exact_limit, options.seed), threshold)
        del x
        # groups numbered in the order of their first member, so the output is stable across runs
        groups.sort(key=lambda g: int(g.rows[0]))
        rows = np.concatenate([g.rows for g in groups]) if groups else np.zeros(0, np.int64)
        sizes = np.array([len(g.rows) for g in groups], np.int64)
        ids, paths = t.column("id").take(pa.array(rows)), t.column("path").take(pa.array(rows))
    number = np.repeat(np.arange(len(sizes)), sizes)
    table = pa.table({
        "group": pa.array(number, pa.int64()),
        "id": ids,
        "path": paths,
    }).sort_by([("group", "ascending"), ("path", "ascending")])
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, target)  # a reader never sees half a file
    return DedupSummary(n, len(sizes), len(rows) - len(sizes), threshold, out)

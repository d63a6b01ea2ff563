"""`embedder inspect` and `dedup` over stores larger than memory: a few streamed passes and one
bucket in memory at a time, so peak memory is set by the budget, not by the store.

1. *Sample* (one pass over vectors and labels): uniform samples by the smallest random keys — the
   k-means sample, the map's points, the rows whose exact neighbours measure recall, and the
   labelled rows the cross-validated probe trains on; the class names.
2. *Bucket* (one pass): each unit vector to its cluster's bucket file and, as a guest, to nearby
   clusters' (``analysis.buckets``); the label probe's per-class thresholds; the sampled rows' exact
   neighbours over the whole store (a running heap), for the recall figures.
3. *Search* each bucket exactly (here or as Ray tasks, ``--engine ray``), consuming each result as it
   comes: duplicate edges, leak candidates, kNN-distance scores (to a file) and their histogram, the
   kNN vote, the probe's confident joint — never an N-sized array in memory.
4. *Finish*: duplicate groups from the edges (a disjoint set over the rows that have an edge),
   outliers beyond the histogram's fence (one read of the score file), label errors, recall of the
   graph and of duplicate pairs against exact search on the sample; then one pass over ids and paths
   for the rows the findings and the map name, and findings.parquet written kind by kind.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedder.analysis import buckets as bk
from embedder.analysis.duplicates import GroupArrays, group_arrays
from embedder.analysis.inspection_types import (
    FINDINGS_SCHEMA,
    KINDS,
    Catalog,
    Finding,
    Inspection,
    InspectSummary,
    check_comparable,
)
from embedder.analysis.options import InspectOptions
from embedder.analysis.outliers import knn_distance
from embedder.analysis.transfer import wilson
from embedder.analysis.vectors import ClassCodes, normalize_rows
from embedder.errors import InspectError, ProbeError
from embedder.io import storage
from embedder.store.labels import LabelJoin
from embedder.store.shards import Store, arrow_to_embeddings

log = logging.getLogger(__name__)

BATCH_ROWS = 65_536
KMEANS_POINTS = 100_000  # the k-means sample, whatever the store's size (the map's sample is the same rows)
HIST_BINS = 1 << 16  # kNN-distance histogram over [0, 2]: quartiles to 3e-5
SCORE_NBRS = 5  # neighbours kept per row beside its score (the report shows them)

Tick = Callable[[str, int, int], None]


def _score_dtype() -> np.dtype:
    return np.dtype([("row", "<i8"), ("score", "<f4"), ("nbrs", "<i8", (SCORE_NBRS,))])


# ---- reading a store in row batches --------------------------------------------------------------

def batches(store: Store, columns: list[str], batch_rows: int = BATCH_ROWS) -> Iterator[tuple[int, pa.RecordBatch]]:
    """(first store row, record batch) over every shard, in store order; one batch in memory."""
    row = 0
    pool = pa.default_memory_pool()
    for shard in store.shard_files():
        f = storage.open_parquet(shard, buffered=True)
        for batch in f.iter_batches(batch_size=batch_rows, columns=columns):
            yield row, batch
            row += batch.num_rows
        del f
        pool.release_unused()


def unit_rows(batch: pa.RecordBatch) -> np.ndarray:
    x = np.array(arrow_to_embeddings(batch.column(batch.schema.get_field_index("embedding"))), np.float32)
    normalize_rows(x)
    return x


class Reservoir:
    """A uniform sample of at most SIZE rows without replacement: the rows with the smallest random
    keys, buffered to twice the size and trimmed (memory: 2 · SIZE rows)."""

    def __init__(self, size: int, dim: int) -> None:
        self.size = size
        self.keys = np.zeros(0, np.float64)
        self.rows = np.zeros(0, np.int64)
        self.y = np.zeros(0, np.int64)
        self.x = np.zeros((0, dim), np.float32)

    def offer(self, keys: np.ndarray, rows: np.ndarray, y: np.ndarray, x: np.ndarray) -> None:
        if self.size <= 0 or not len(keys):
            return
        if len(self.keys) >= self.size:  # only keys below the current cut can enter
            cut = np.partition(self.keys, self.size - 1)[self.size - 1]
            m = keys < cut
            keys, rows, y, x = keys[m], rows[m], y[m], x[m]
        self.keys = np.concatenate([self.keys, keys])
        self.rows = np.concatenate([self.rows, rows])
        self.y = np.concatenate([self.y, y])
        self.x = np.concatenate([self.x, x])
        if len(self.keys) > 2 * self.size:
            self._trim()

    def _trim(self) -> None:
        if len(self.keys) > self.size:
            keep = np.argpartition(self.keys, self.size - 1)[:self.size]
            self.keys, self.rows, self.y, self.x = self.keys[keep], self.rows[keep], self.y[keep], self.x[keep]

    def by_key(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, y, x) in key order: a prefix of any length is itself a uniform sample."""
        self._trim()
        order = np.argsort(self.keys, kind="stable")
        return self.rows[order], self.y[order], self.x[order]


# ---- the plan of a run -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Sizes:
    bucket_rows: int
    buckets: int
    kmeans_points: int
    sample: int  # the all-rows reservoir: k-means points, map points and recall queries are prefixes
    map_points: int
    recall_queries: int
    probe_rows: int
    flush_bytes: int

    @staticmethod
    def of(n: int, dim: int, options: InspectOptions, budget: int) -> Sizes:
        rows_fit = max(1024, budget // 8 // (dim * 4))  # a sample may take an eighth of the budget
        bucket_rows = options.bucket_rows or bk.bucket_rows_for(n, dim, budget)
        buckets = bk.bucket_count(n, bucket_rows)
        # a fixed sample, not 64 per centroid: at 10^7 that was 625k rows (+0.5 GB with the reservoir's
        # buffer); two-level k-means needs many points per top-level centroid only
        kmeans_points = min(n, KMEANS_POINTS, rows_fit)
        map_points = min(n, options.map_points, rows_fit)
        recall = min(n, options.recall_sample)
        sample = min(n, max(kmeans_points, map_points, recall))
        probe = min(n, options.labels.sample_rows, rows_fit)
        flush = int(min(64 << 20, max(4 << 20, budget // 16)))
        return Sizes(bucket_rows, buckets, kmeans_points, sample, map_points, recall, probe, flush)


@dataclass
class _Consumed:
    """What the bucket results leave behind (bounded by the findings, not by the rows)."""

    edges_a: list[np.ndarray] = field(default_factory=list)
    edges_b: list[np.ndarray] = field(default_factory=list)
    edges_s: list[np.ndarray] = field(default_factory=list)
    leak_test: list[np.ndarray] = field(default_factory=list)
    leak_train: list[np.ndarray] = field(default_factory=list)
    leak_sim: list[np.ndarray] = field(default_factory=list)
    hist: np.ndarray = field(default_factory=lambda: np.zeros(HIST_BINS, np.int64))
    knn_right: int = 0
    knn_seen: int = 0
    rows_seen: int = 0


def _budget(options: InspectOptions) -> int:
    from embedder.sizes import default_budget

    return options.memory_budget or min(default_budget(), 2 << 30)


def label_bytes(classes: int) -> int:
    """What the streamed label analysis holds for C classes: the confident joint, the confusion and
    the quotas (C² each, a few copies) and one bucket's probabilities."""
    return 6 * 8 * classes * classes + 4096 * classes * 16


def threshold_rows(classes: int, budget: int) -> int:
    """Rows whose probabilities (rows x classes, float32, and the K heads' running sum) pass 1 scores
    at a time: a sixteenth of the budget."""
    return int(max(256, min(BATCH_ROWS, budget // 16 // max(classes * 12, 1))))


def _open(path: str, what: str) -> Store:
    store = Store.open(path)
    if store.count() == 0:
        raise InspectError(f"the {what} {path} holds no vectors: run `embedder extract` (or `embedder import`) "
                           "into it first")
    return store


def batch_labels(batch: pa.RecordBatch, label_col: str | None, join: LabelJoin | None, codes: ClassCodes,
                 count: bool = False) -> np.ndarray:
    """A batch's class codes: its label column's, with a labels file's put over them by the batch's
    ``id`` (COUNT: in the join's tally, once per row: the first pass)."""
    names = batch.schema.names
    own = batch.column(names.index(label_col)) if label_col else None
    if join is not None:
        return codes.codes(join.apply(batch.column(names.index("id")), own, count))
    if own is None:
        return np.full(batch.num_rows, -1, np.int64)
    return codes.codes(own)


def bucket_pipeline(store_path: str, test_path: str | None, options: InspectOptions, work: Path,
                    tick: Tick, with_labels: bool = True, labels: LabelJoin | None = None) -> dict[str, Any]:
    """Passes 1-3 (module docstring); returns what the finish needs. LABELS: a labels file's join,
    applied batch by batch (its memory is the file's): refused after the first pass when none of
    its ids is in the store."""
    store = _open(store_path, "store")
    test = _open(test_path, "test store") if test_path else None
    n, dim = store.count(), store.dim
    if test is not None and test_path is not None:
        check_comparable(store_path, dim, store.provenance, test_path, test.dim, test.provenance)
    budget = _budget(options)
    sz = Sizes.of(n, dim, options, budget)
    names = store.dataset().schema.names
    label_col = options.label_column if with_labels and options.label_column in names else None
    join = labels if with_labels else None
    cols = ["embedding"] + ([label_col] if label_col else []) + (["id"] if join is not None else [])
    rng = np.random.default_rng(options.seed)
    codes = ClassCodes()
    sample = Reservoir(sz.sample, dim)
    probe = Reservoir(sz.probe_rows, dim)
    counts: dict[int, int] = {}
    seconds: dict[str, float] = {}
    t = time.perf_counter()

    # 1. samples and class names
    for start, batch in batches(store, cols):
        x = unit_rows(batch)
        rows = np.arange(start, start + len(x), dtype=np.int64)
        y = batch_labels(batch, label_col, join, codes, count=True)
        keys = rng.random(len(x))
        sample.offer(keys, rows, y, x)
        lab = y >= 0
        if lab.any():
            probe.offer(rng.random(int(lab.sum())), rows[lab], y[lab], x[lab])
            u, c = np.unique(y[lab], return_counts=True)
            for a, b in zip(u.tolist(), c.tolist()):
                counts[a] = counts.get(a, 0) + b
        tick("sampling", min(start + len(x), n), n)
    classes, remap = codes.final()
    s_rows, s_y, s_x = sample.by_key()
    s_y = np.where(s_y >= 0, remap[np.maximum(s_y, 0)], -1)
    p_rows, p_y, p_x = probe.by_key()
    p_y = remap[p_y] if len(p_y) else p_y
    order = np.argsort(p_rows, kind="stable")
    p_rows, p_y, p_x = p_rows[order], p_y[order], p_x[order]
    class_counts = np.zeros(len(classes), np.int64)
    for a, b in counts.items():
        class_counts[remap[a]] += b
    del sample, probe
    if join is not None:
        join.require_some(store_path)
    seconds["sample"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()

    # the probe behind label errors, trained on the labelled sample
    skipped: list[str] = []
    stream = None
    labelled = int(class_counts.sum())
    if label_col is None and join is None and with_labels:
        skipped.append(f"label errors, class overlap and accuracies: the store has no {options.label_column!r} labels")
    elif with_labels and (class_counts > 0).sum() < 2:
        only = [c for c, k in zip(classes, class_counts) if k]
        skipped.append("label errors, class overlap and accuracies: "
                       + (f"one class only ({only[0]})" if only else
                          f"the store has no {options.label_column!r} labels"))
    elif with_labels and label_bytes(len(classes)) > budget // 2:
        skipped.append(f"label errors, class overlap and accuracies: {len(classes):,} classes need about "
                       f"{label_bytes(len(classes)) >> 20:,} MiB for their classes x classes counts, over half the "
                       "memory budget (--memory-budget)")
    elif with_labels:
        if labelled < n:
            skipped.append(f"{n - labelled} unlabelled images take no part in the label analyses")
        from dataclasses import replace

        from embedder.analysis.label_stream import LabelStream

        lab_options = replace(options.labels, folds=options.folds, seed=options.seed)
        try:
            stream = LabelStream(len(classes), p_rows, p_x, p_y, lab_options,
                                 lambda d, k, s: tick("cross-validated probe", d, k))
        except ProbeError as e:
            skipped.append(f"label errors and class overlap: {e}")
    del p_x
    seconds["probe"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()

    # 2. buckets
    tick("clustering", 0, 1)
    plan = bk.plan(s_x[:sz.kmeans_points], sz.buckets, options.bucket_margin, options.bucket_guests, options.seed)
    files = bk.BucketFiles(work / "buckets", plan, dim, sz.flush_bytes)
    q_rows = s_rows[:sz.recall_queries]
    q_x = np.ascontiguousarray(s_x[:sz.recall_queries])
    import faiss

    kq = min(options.k + 1, n)
    heap = faiss.ResultHeap(len(q_rows), kq, keep_max=True)
    for start, batch in batches(store, cols):
        x = unit_rows(batch)
        rows = np.arange(start, start + len(x), dtype=np.int64)
        y = batch_labels(batch, label_col, join, codes)
        y = np.where(y >= 0, remap[np.maximum(y, 0)], -1)
        files.add(bk.TRAIN, rows, y, x)
        if stream is not None:
            step = threshold_rows(len(classes), budget)  # the probabilities of a batch: rows x classes
            for s0 in range(0, len(rows), step):
                part = np.flatnonzero(y[s0:s0 + step] >= 0) + s0
                if len(part):
                    stream.add_thresholds(rows[part], x[part], y[part])
        if len(q_rows):
            d, i = faiss.knn(q_x, x, min(kq, len(x)), metric=faiss.METRIC_INNER_PRODUCT)
            if d.shape[1] < kq:
                d = np.pad(d, ((0, 0), (0, kq - d.shape[1])), constant_values=-np.inf)
                i = np.pad(i, ((0, 0), (0, kq - i.shape[1])), constant_values=-1)
            heap.add_result(np.ascontiguousarray(d, np.float32), np.ascontiguousarray(np.where(i >= 0, i + start, -1)))
        tick("bucketing", min(start + len(x), n), n)
    test_n = 0
    if test is not None:
        for start, batch in batches(test, ["embedding"]):
            x = unit_rows(batch)
            files.add(bk.TEST, np.arange(start, start + len(x), dtype=np.int64), np.full(len(x), -1, np.int64), x)
            test_n = start + len(x)
    files.flush()
    heap.finalize()
    seconds["bucket"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()

    # 3. search each bucket, consume each result
    scores_path = work / "scores.bin"
    con = _Consumed()
    q_sims = np.full((len(q_rows), options.k), -np.inf, np.float32)
    q_sorted = np.argsort(q_rows, kind="stable")
    todo = [b for b in range(plan.count) if files.owners[b] or files.test_rows[b]]
    with open(scores_path, "wb") as scores_out:
        for done, res in enumerate(_search_all(str(files.root), todo, dim, options), 1):
            _consume(res, con, options, stream, scores_out, q_rows, q_sorted, q_sims)
            tick("searching buckets", done, len(todo))
    seconds["search"] = round(time.perf_counter() - t, 3)
    owners = files.owners
    return {"store": store, "test": test, "n": n, "dim": dim, "classes": classes, "class_counts": class_counts,
            "remap": remap, "label_col": label_col, "codes": codes, "stream": stream, "skipped": skipped,
            "join": join,
            "consumed": con, "scores": scores_path, "q_rows": q_rows, "q_sims": q_sims, "heap": heap,
            "map_rows": s_rows[:sz.map_points], "map_x": s_x[:sz.map_points], "map_y": s_y[:sz.map_points],
            "sizes": sz, "plan": plan, "owners": owners, "guests": files.guest_rows, "test_n": test_n,
            "seconds": seconds, "budget": budget}


def _search_all(root: str, todo: list[int], dim: int, options: InspectOptions) -> Iterator[bk.BucketResult]:
    if options.engine == "ray":
        yield from _search_ray(root, todo, dim, options)
        return
    for b in todo:
        yield bk.search_bucket(root, b, dim, options.k)


def _search_ray(root: str, todo: list[int], dim: int, options: InspectOptions) -> Iterator[bk.BucketResult]:
    """One Ray task per bucket, at most a few in flight per CPU (the driver holds a bounded number of
    refs and results); the bucket folder must be on a file system every node sees."""
    from embedder.embed.options import RayOptions
    from embedder.embed.ray import connect
    from embedder.errors import RayError

    ray = connect(options.ray or RayOptions())
    task = ray.remote(num_cpus=options.ray_task_cpus, max_retries=3)(bk.search_bucket)
    cpus = max(1, int(ray.available_resources().get("CPU", 1) / max(options.ray_task_cpus, 0.01)))
    in_flight = max(2, 2 * cpus)
    pending: list[Any] = []
    it = iter(todo)
    threads = max(1, int(options.ray_task_cpus))
    try:
        while True:
            while len(pending) < in_flight:
                b = next(it, None)
                if b is None:
                    break
                pending.append(task.remote(str(Path(root).resolve()), b, dim, options.k, threads))
            if not pending:
                return
            ready, pending = ray.wait(pending, num_returns=1)
            yield ray.get(ready[0])
    except ray.exceptions.RayError as e:
        raise RayError(f"a Ray inspect task failed: {str(e).strip().splitlines()[-1][:300]}") from None


def knn_vote(ny: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Each row's class by weighted vote of its neighbours' classes NY [m, k] (-1: none) with weights
    W [m, k]: the class with the largest summed weight, the lowest on a tie, 0 where no neighbour
    votes (``labels.knn_accuracy``'s argmax), in m·k² work and memory whatever the class count."""
    w = np.where(ny >= 0, w, 0.0)
    vote = np.zeros(ny.shape)  # [m, k]: the total of column j's class, summed in column order as np.add.at
    for col in range(ny.shape[1]):
        vote += np.where(ny == ny[:, col:col + 1], w[:, col:col + 1], 0.0)
    vote = np.where(ny >= 0, vote, -np.inf)
    best = vote.max(1, initial=-np.inf, keepdims=True)
    big = np.iinfo(ny.dtype).max
    top = np.where((vote == best) & (ny >= 0), ny, big).min(1, initial=big)
    return np.where(best[:, 0] > 0, top, 0)


def _consume(res: bk.BucketResult, con: _Consumed, options: InspectOptions, stream: Any, scores_out: Any,
             q_rows: np.ndarray, q_sorted: np.ndarray, q_sims: np.ndarray) -> None:
    m = len(res.rows)
    con.rows_seen += m
    if m:
        mask = (res.sims >= options.duplicate_threshold) & (res.nbrs >= 0)
        if mask.any():
            con.edges_a.append(np.repeat(res.rows, mask.sum(1)))
            con.edges_b.append(res.nbrs[mask])
            con.edges_s.append(res.sims[mask])
        dist = knn_distance(res.nbrs, res.sims)
        con.hist += np.histogram(dist, HIST_BINS, (0.0, 2.0))[0]
        rec = np.empty(m, _score_dtype())
        rec["row"], rec["score"] = res.rows, dist
        nb = np.full((m, SCORE_NBRS), -1, np.int64)
        w = min(SCORE_NBRS, res.nbrs.shape[1])
        nb[:, :w] = res.nbrs[:, :w]
        rec["nbrs"] = nb
        scores_out.write(rec.tobytes())
        lab = res.y >= 0
        if lab.any():  # leave-one-out weighted kNN vote (DINOv2's weighting)
            ny = res.nbr_y[lab]
            w8 = np.where(ny >= 0, np.exp((res.sims[lab] - 1.0) / options.labels.knn_temperature), 0.0)
            con.knn_right += int((knn_vote(ny, w8) == res.y[lab]).sum())
            con.knn_seen += int(lab.sum())
            if stream is not None:
                stream.add(res.rows[lab], res.x[lab], res.y[lab].astype(np.int64))
        if len(q_rows):
            at = np.searchsorted(q_rows, res.rows, sorter=q_sorted)
            at = np.minimum(at, len(q_rows) - 1)
            hit = q_rows[q_sorted[at]] == res.rows
            q_sims[q_sorted[at[hit]]] = res.sims[hit]
    hit = np.flatnonzero(res.test_sim >= options.duplicate_threshold)
    if len(hit):
        con.leak_test.append(res.test_rows[hit])
        con.leak_train.append(res.test_nbr[hit])
        con.leak_sim.append(res.test_sim[hit])


# ---- finishing -----------------------------------------------------------------------------------

def duplicates_of(con: _Consumed) -> GroupArrays:
    cat = lambda parts, dt: np.concatenate(parts) if parts else np.zeros(0, dt)  # noqa: E731
    return group_arrays(cat(con.edges_a, np.int64), cat(con.edges_b, np.int64), cat(con.edges_s, np.float32))


def _quartiles(hist: np.ndarray) -> tuple[float, float]:
    cdf = np.cumsum(hist)
    total = cdf[-1]
    edges = np.linspace(0.0, 2.0, HIST_BINS + 1)
    q = [float(edges[min(int(np.searchsorted(cdf, total * p)), HIST_BINS - 1) + 1]) for p in (0.25, 0.75)]
    return q[0], q[1]


def _farthest(rec: np.ndarray, limit: int) -> np.ndarray:
    return rec[np.lexsort((rec["row"], -rec["score"]))[:limit]]


def read_outliers(path: Path, cut: float, also: np.ndarray, limit: int,
                  chunk: int = 1 << 18) -> tuple[np.ndarray, np.ndarray, int]:
    """One chunked read of the score file: (the LIMIT records scoring above CUT with the highest
    scores, highest first, ties by row; the records of the rows ALSO names; how many score above
    CUT). Memory: 2·LIMIT records, however many rows lie beyond the fence."""
    dt = _score_dtype()
    top = np.zeros(0, dt)
    extra = []
    above = 0
    with open(path, "rb") as f:
        while buf := f.read(chunk * dt.itemsize):
            rec = np.frombuffer(buf, dt)
            out = rec["score"] > cut
            if out.any():
                above += int(out.sum())
                top = np.concatenate([top, rec[out]])
                if len(top) > 2 * limit:
                    top = _farthest(top, limit)
            hit = np.isin(rec["row"], also)
            if hit.any():
                extra.append(rec[hit])
    return _farthest(top, limit), (np.concatenate(extra) if extra else np.zeros(0, dt)), above


def _recall(state: dict[str, Any], groups: GroupArrays, options: InspectOptions) -> dict[str, Any]:
    heap, q_rows, q_sims = state["heap"], state["q_rows"], state["q_sims"]
    if not len(q_rows):
        return {}
    d_true = np.asarray(heap.D, np.float32)
    i_true = np.asarray(heap.I, np.int64)
    k = options.k
    kth = d_true[:, -1:]
    recall = float((q_sims >= kth - 1e-5).sum() / (len(q_rows) * k))
    # duplicate pairs: each sampled row with every row exact search puts at cosine >= threshold
    group_rows = groups.rows
    group_id = np.repeat(np.arange(len(groups)), groups.sizes)
    order = np.argsort(group_rows, kind="stable")
    group_rows, group_id = group_rows[order], group_id[order]

    def gid(rows: np.ndarray) -> np.ndarray:
        if not len(group_rows):
            return np.full(len(rows), -1)
        at = np.minimum(np.searchsorted(group_rows, rows), len(group_rows) - 1)
        return np.where(group_rows[at] == rows, group_id[at], -1)

    pair = (d_true >= options.duplicate_threshold) & (i_true >= 0) & (i_true != q_rows[:, None])
    a = np.repeat(q_rows, pair.sum(1))
    b = i_true[pair]
    ga, gb = gid(a), gid(b)
    found = int(((ga >= 0) & (ga == gb)).sum())
    return {"recall": recall, "recall_queries": int(len(q_rows)), "duplicate_pairs_checked": int(len(a)),
            "duplicate_pairs_found": found,
            "duplicate_pair_recall": (found / len(a)) if len(a) else None,
            # a few dozen sampled pairs cannot tell 0.99 from 1.0: the 95 % Wilson interval says how sure
            "duplicate_pair_recall_95": list(wilson(found, len(a))) if len(a) else None}


@dataclass
class _Kind:
    """One kind of finding as arrays, ranked: rows per finding as a flat array with offsets."""

    kind: str
    flat: np.ndarray
    offsets: np.ndarray
    score: np.ndarray
    given: list[str | None] | None = None
    suggested: list[str | None] | None = None
    detail: list[str | None] | None = None
    test_rows: np.ndarray | None = None  # leaks: one test row per finding

    def __len__(self) -> int:
        return len(self.score)


def _groups_kind(kind: str, groups: GroupArrays) -> _Kind:
    return _Kind(kind, groups.rows, groups.offsets, groups.similarity)


def _single(kind: str, rows: np.ndarray, score: np.ndarray, **kw: Any) -> _Kind:
    return _Kind(kind, rows.astype(np.int64), np.arange(len(rows) + 1, dtype=np.int64), score.astype(np.float64), **kw)


def lookup(store: Store, rows: np.ndarray, codes: ClassCodes | None, remap: np.ndarray | None,
           label_col: str | None, join: LabelJoin | None = None) -> tuple[pa.Array, pa.Array, np.ndarray]:
    """ids, paths and class codes of ROWS (sorted, unique), in one pass over those columns (JOIN: a
    labels file's labels over the store's, as the pipeline read them)."""
    ids, paths, ys = [], [], []
    cols = ["id", "path"] + ([label_col] if label_col else [])
    if len(rows):
        for start, batch in batches(store, cols):
            lo, hi = np.searchsorted(rows, [start, start + batch.num_rows])
            if hi > lo:
                take = pa.array(rows[lo:hi] - start)
                ids.append(batch.column(0).take(take))
                paths.append(batch.column(1).take(take))
                if (label_col or join is not None) and codes is not None and remap is not None:
                    part = batch.take(take)
                    y = batch_labels(part, label_col, join, codes)
                    ys.append(np.where(y >= 0, remap[np.maximum(y, 0)], -1))
                else:
                    ys.append(np.full(hi - lo, -1, np.int64))
            if hi >= len(rows):
                break
    cat = lambda parts: pa.concat_arrays(parts) if parts else pa.array([], pa.string())  # noqa: E731
    return cat(ids), cat(paths), (np.concatenate(ys) if ys else np.zeros(0, np.int64))


def _kind_table(k: _Kind, needed: np.ndarray, ids: pa.Array, paths: pa.Array,
                t_needed: np.ndarray | None, t_ids: pa.Array | None, t_paths: pa.Array | None) -> pa.Table:
    at = pa.array(np.searchsorted(needed, k.flat))
    flat_ids, flat_paths = ids.take(at), paths.take(at)
    offsets = k.offsets
    if k.test_rows is not None and t_needed is not None and t_ids is not None and t_paths is not None:
        tat = pa.array(np.searchsorted(t_needed, k.test_rows))
        # leak: the test image first, then its train twin
        inter = np.empty(2 * len(k), np.int64)
        inter[0::2] = np.arange(len(k))
        inter[1::2] = len(k) + np.arange(len(k))
        both_ids = pa.concat_arrays([t_ids.take(tat), flat_ids]).take(pa.array(inter))
        both_paths = pa.concat_arrays([t_paths.take(tat), flat_paths]).take(pa.array(inter))
        flat_ids, flat_paths = both_ids, both_paths
        offsets = np.arange(0, 2 * len(k) + 1, 2, dtype=np.int64)
    off = pa.array(offsets.astype(np.int32))
    n = len(k)
    none = pa.nulls(n, pa.string())
    return pa.table({
        "kind": pa.array([k.kind] * n, pa.string()),
        "rank": pa.array(np.arange(1, n + 1, dtype=np.int32)),
        "ids": pa.ListArray.from_arrays(off, flat_ids),
        "paths": pa.ListArray.from_arrays(off, flat_paths),
        "score": pa.array(k.score, pa.float64()),
        "given": pa.array(k.given, pa.string()) if k.given is not None else none,
        "suggested": pa.array(k.suggested, pa.string()) if k.suggested is not None else none,
        "detail": pa.array(k.detail, pa.string()) if k.detail is not None else none,
    }, schema=FINDINGS_SCHEMA)


@contextlib.contextmanager
def work_space(work_dir: str | None, default: str | Path, prefix: str) -> Iterator[Path]:
    """A fresh folder for the bucket files under WORK_DIR (created if missing; DEFAULT when None),
    removed on the way out, whatever the way (an error, Ctrl-C); a folder that cannot be made or a
    disk that fills up is one line."""
    parent = Path(work_dir) if work_dir else Path(default)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    except OSError as e:
        raise InspectError(f"cannot make the bucket folder in {parent} ({e.strerror or e}); "
                           "name a writable folder with --work-dir") from None
    try:
        yield work
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise InspectError(f"no space left writing {e.filename or parent} (the bucket files take about 1.3x "
                           "the store's vectors); name a folder with room with --work-dir") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def inspect_streamed(store_path: str, out: str, test_path: str | None, options: InspectOptions,
                     tick: Tick, labels: LabelJoin | None = None) -> Inspection:
    """`inspect` for any store size, in memory set by ``options.memory_budget``."""
    t0 = time.perf_counter()
    made = not Path(out).exists()
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
        with work_space(options.work_dir, out, ".inspect-") as work:
            state = bucket_pipeline(store_path, test_path, options, work, tick, labels=labels)
            return _finish(state, store_path, out, test_path, options, work, tick, t0)
    except BaseException:
        if made and Path(out).is_dir() and not any(Path(out).iterdir()):
            Path(out).rmdir()  # a refused or failed run leaves no empty report folder (as the in-memory path)
        raise


def _finish(state: dict[str, Any], store_path: str, out: str, test_path: str | None, options: InspectOptions,
            work: Path, tick: Tick, t0: float) -> Inspection:
    t = time.perf_counter()
    seconds: dict[str, float] = dict(state["seconds"])
    store: Store = state["store"]
    n, classes, con = state["n"], state["classes"], state["consumed"]
    class_counts = state["class_counts"]
    summary = InspectSummary(store_path, str(Path(out) / "index.html"), str(Path(out) / "findings.parquet"),
                             n, int(class_counts.sum()), {c: int(k) for c, k in zip(classes, class_counts)},
                             test_images=state["test_n"] if test_path else None)
    summary.skipped = list(state["skipped"])
    kinds: list[_Kind] = []

    # leaks: a test row searched in several buckets keeps its most similar train row
    if test_path:
        lt = np.concatenate(con.leak_test) if con.leak_test else np.zeros(0, np.int64)
        lr = np.concatenate(con.leak_train) if con.leak_train else np.zeros(0, np.int64)
        ls = np.concatenate(con.leak_sim) if con.leak_sim else np.zeros(0, np.float32)
        order = np.lexsort((-ls, lt))
        lt, lr, ls = lt[order], lr[order], ls[order]
        first = np.r_[True, lt[1:] != lt[:-1]] if len(lt) else np.zeros(0, bool)
        lt, lr, ls = lt[first], lr[first], ls[first]
        rank = np.lexsort((lt, -ls))
        kinds.append(_single("leak", lr[rank], ls[rank], test_rows=lt[rank]))
        summary.leaks = len(rank)

    groups = duplicates_of(con)
    summary.duplicate_groups = len(groups)
    summary.duplicate_images = len(groups.rows) - len(groups)
    kinds.append(_groups_kind("duplicate", groups))
    seconds["duplicates"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()

    stream = state["stream"]
    label_rows = np.zeros(0, np.int64)
    overlaps_kind = None
    if con.knn_seen and (class_counts > 0).sum() >= 2:
        summary.knn_accuracy = con.knn_right / con.knn_seen
    if stream is not None:
        res = stream.result()
        summary.probe_accuracy = res.accuracy
        summary.probe_C = res.C
        summary.folds = res.folds
        issues = res.issues
        summary.label_issues = int(issues.likely.sum())
        summary.label_possible = int((~issues.likely).sum()) + max(0, res.disagreements - res.listed)
        if res.disagreements > res.listed:
            summary.skipped.append(f"label errors: the {res.listed:,} least confident of {res.disagreements:,} "
                                   "disagreements are listed (--max-listed)")
        label_rows = issues.rows
        kinds.append(_single("label_error", issues.rows, 1.0 - issues.self_confidence,
                             given=[classes[g] for g in issues.given],
                             suggested=[classes[s] for s in issues.suggested],
                             detail=["likely" if lk else "possible" for lk in issues.likely]))
        summary.scale["probe_trained_on"] = res.trained_on
        ov_flat, ov_off, ov_rate, ov_a, ov_b = [], [0], [], [], []
        for ov in res.overlaps:
            summary.overlaps.append({"a": classes[ov.a], "b": classes[ov.b], "rate": ov.rate, "confusions": ov.count})
            ov_flat.append(ov.example_rows)
            ov_off.append(ov_off[-1] + len(ov.example_rows))
            ov_rate.append(ov.rate)
            ov_a.append(classes[ov.a])
            ov_b.append(classes[ov.b])
        overlaps_kind = _Kind("class_overlap", np.concatenate(ov_flat) if ov_flat else np.zeros(0, np.int64),
                              np.array(ov_off, np.int64), np.array(ov_rate, np.float64), given=ov_a, suggested=ov_b)
    seconds["labels"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()

    # outliers beyond the fence, from the histogram's quartiles and one read of the score file
    if n >= 4:
        q1, q3 = _quartiles(con.hist)
        cut = q3 + options.outlier_fence * (q3 - q1)
        listed_labels = np.sort(label_rows[:options.listed])
        limit = options.labels.max_listed
        outl, also, above = read_outliers(state["scores"], cut, listed_labels, limit)
        summary.outliers = above
        summary.outlier_fence = float(cut)
        if above > len(outl):
            summary.skipped.append(f"outliers: the {len(outl):,} farthest of {above:,} are listed (--max-listed)")
        kinds.append(_single("outlier", outl["row"], outl["score"].astype(np.float64)))
        show = np.union1d(outl["row"][:options.listed], listed_labels)
        shown = np.concatenate([outl, also])
        keep = np.isin(shown["row"], show)
        nbr_of = {int(r): nb for r, nb in zip(shown["row"][keep], shown["nbrs"][keep])}
    else:
        nbr_of = {}
        kinds.append(_single("outlier", np.zeros(0, np.int64), np.zeros(0)))
    if overlaps_kind is not None:
        kinds.append(overlaps_kind)
    seconds["outliers"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()

    groups_rec = _recall(state, groups, options)
    summary.graph = {"k": options.k, "exact": False, "method": "buckets", "buckets": int(state["plan"].count),
                     "largest_bucket": int(state["owners"].max()) if len(state["owners"]) else 0,
                     "guest_rate": round(float(state["guests"].sum()) / max(n, 1), 4), **groups_rec}
    seconds["recall"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()

    # the map: a uniform sample, projected
    from embedder.analysis.projection import project

    map_rows_store = state["map_rows"]
    coords_sample = project(state["map_x"], options.projection, options.seed)
    order = np.argsort(map_rows_store, kind="stable")
    map_rows_store, coords_sample = map_rows_store[order], coords_sample[order]
    seconds["projection"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()

    # ids and paths of every row a finding or the map names; findings.parquet kind by kind
    shown_nbrs = np.concatenate([nb[nb >= 0] for nb in nbr_of.values()]) if nbr_of else np.zeros(0, np.int64)
    needed = np.unique(np.concatenate([k.flat for k in kinds] + [map_rows_store, shown_nbrs]))
    tick("ids and paths", 0, 1)
    ids, paths, ys = lookup(store, needed, state["codes"], state["remap"], state["label_col"], state["join"])
    t_needed = t_ids = t_paths = None
    if test_path:
        leak_kind = kinds[0]
        t_needed = np.unique(leak_kind.test_rows) if leak_kind.test_rows is not None else np.zeros(0, np.int64)
        t_ids, t_paths, _ = lookup(state["test"], t_needed, None, None, None)
    target = Path(out) / "findings.parquet"
    tmp = target.with_name(".findings.parquet.tmp")
    by_kind = {k.kind: k for k in kinds}
    with pq.ParquetWriter(tmp, FINDINGS_SCHEMA) as w:
        for kind in KINDS:
            if kind in by_kind and len(by_kind[kind]):
                w.write_table(_kind_table(by_kind[kind], needed, ids, paths, t_needed, t_ids, t_paths))
    tmp.replace(target)
    seconds["findings"] = round(time.perf_counter() - t, 3)

    # what the report shows: the first `listed` of each kind, rows as positions in `needed`
    def pos(rows: np.ndarray) -> np.ndarray:
        return np.asarray(np.searchsorted(needed, rows), np.int64)

    findings: list[Finding] = []
    counts = {}
    for k in kinds:
        counts[k.kind] = len(k)
        for i in range(min(len(k), options.listed)):
            rows = k.flat[k.offsets[i]:k.offsets[i + 1]]
            nb: list[int] = []
            if k.kind in ("label_error", "outlier") and int(rows[0]) in nbr_of:
                near = nbr_of[int(rows[0])]
                nb = pos(near[near >= 0]).tolist()
            f = Finding(k.kind, pos(rows).tolist(), float(k.score[i]),
                        k.given[i] if k.given is not None else None,
                        k.suggested[i] if k.suggested is not None else None,
                        test_rows=[int(np.searchsorted(t_needed, k.test_rows[i]))]
                        if k.test_rows is not None and t_needed is not None else [],
                        detail=k.detail[i] if k.detail is not None else None, neighbours=nb)
            findings.append(f)
    prov = store.provenance
    train = Catalog(ids, paths, ys, classes, prov, store_path, n, store.dim)
    test = None
    if test_path and t_ids is not None and t_paths is not None:
        test = Catalog(t_ids, t_paths, np.full(len(t_ids), -1, np.int64), classes, state["test"].provenance,
                       test_path, state["test_n"], store.dim)
    coords = np.zeros((len(needed), 2), np.float32)
    map_pos = pos(map_rows_store)
    coords[map_pos] = coords_sample
    seconds["total"] = round(time.perf_counter() - t0, 3)
    summary.seconds = seconds
    summary.scale.update({"memory_budget": state["budget"], "bucket_rows": state["sizes"].bucket_rows})
    return Inspection(train, test, coords, map_pos, findings, summary, options, counts=counts,
                      findings_written=True)

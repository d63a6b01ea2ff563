"""Cluster-bucketed exact self-kNN for stores larger than memory (the plan of SemDeDup and NeMo
Curator, on a CPU and in bounded memory).

k-means on a uniform sample picks C unit centroids. Every vector is streamed to the bucket file of
its nearest centroid (its *owner* bucket) and, as a *guest*, to at most ``guests`` further buckets
whose centroids are within ``margin`` (cosine) of the nearest: a near-duplicate pair that straddles
a boundary still meets in one bucket. A bucket is then searched exactly — its owners against its
owners and guests — one bucket in memory at a time, so memory is one bucket (plus the write buffer)
whatever the store holds; every row is a query exactly once (in its owner bucket). Test rows (leak
checks) go to buckets the same way and are searched against the bucket's train rows.

A bucket file is a run of fixed-size records (store row, class code, owner flag, the unit vector),
appended batch by batch: no format to parse, read back with one ``numpy.fromfile``.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embedder.errors import InspectError

TRAIN = "train"
TEST = "test"


def record_dtype(dim: int) -> np.dtype:
    return np.dtype([("row", "<i8"), ("y", "<i4"), ("own", "u1"), ("x", "<f4", (dim,))])


def bucket_count(n: int, bucket_rows: int) -> int:
    """Buckets for N rows: about ``bucket_rows`` owners each (k-means is not balanced: the largest
    bucket of real embeddings holds a few times the mean)."""
    return max(1, int(math.ceil(n / max(bucket_rows, 1))))


def bucket_rows_for(n: int, dim: int, budget: int) -> int:
    """Owners per bucket: 1,024 (at most what a quarter of the budget holds as vectors with their
    guests). Per vector the exact search costs about B·(1 + g)·d and the assignment through the
    inverted file over the C = n/B centroids about 33·√C·d (√C lists, 32 probed): at 10^7 rows
    B = 1,024 costs ~5,300 dot products per vector, B = √n = 3,162 ~11,000 (measured: the search
    of 3,162-row buckets ran ~3x the 1,024-row ones per vector)."""
    fit = budget // 4 // (dim * 4 * 3)
    return int(max(256, min(1024, fit)))


FLAT_CENTROIDS = 256  # up to this many centroids: exact k-means and exact assignment
CENTROID_NPROBE = 32  # lists of the inverted file over the centroids probed per vector


@dataclass(frozen=True)
class BucketPlan:
    centroids: np.ndarray  # [C, d] float32, unit rows
    margin: float  # cosine: a guest's centroid is within this of its nearest centroid
    guests: int  # at most this many guest buckets per vector

    @property
    def count(self) -> int:
        return len(self.centroids)

    @functools.cached_property
    def _index(self) -> Any:
        """The centroids searched exactly (few), or through an inverted file over them (√C lists,
        32 probed): the assignment of 10^7 vectors to 3,000 centroids costs n·√C·d, not n·C·d."""
        import faiss

        d = self.centroids.shape[1]
        index: Any
        if self.count <= FLAT_CENTROIDS:
            index = faiss.IndexFlatIP(d)
        else:
            nlist = int(math.sqrt(self.count))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.min_points_per_centroid = 1
            index.train(self.centroids)
            index.nprobe = min(nlist, CENTROID_NPROBE)
        index.add(self.centroids)
        return index

    def assign(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(owner bucket [n], guest buckets [n, guests] with -1 where none) of unit rows X."""
        want = min(1 + self.guests, self.count)
        sims, ids = self._index.search(np.ascontiguousarray(x, np.float32), want)
        owner = ids[:, 0].astype(np.int64)
        extra = ids[:, 1:].astype(np.int64)
        extra[(sims[:, 1:] < sims[:, :1] - self.margin) | (extra < 0)] = -1
        return owner, extra


def _kmeans(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    import faiss

    from embedder.index import gpu as index_gpu

    if k <= 1 or len(x) <= k:
        c = x.mean(0, keepdims=True) if k <= 1 else x.copy()
        return np.ascontiguousarray(c, np.float32)
    km = faiss.Kmeans(x.shape[1], k, niter=12, spherical=True, seed=seed + 1, max_points_per_centroid=64,
                      min_points_per_centroid=1, gpu=index_gpu.gpu_count() > 0)
    km.train(np.ascontiguousarray(x, np.float32))
    return np.ascontiguousarray(km.centroids, np.float32)


def plan(sample: np.ndarray, buckets: int, margin: float, guests: int, seed: int = 0) -> BucketPlan:
    """Spherical k-means (FAISS) on SAMPLE (unit rows) into BUCKETS centroids; above
    ``FLAT_CENTROIDS``, two levels (√C clusters, then each split in proportion to its share of the
    sample, as faiss.contrib.clustering.two_level_clustering, which fails on a cluster with fewer
    points than its share of centroids): n·√C·d per iteration instead of n·C·d."""
    buckets = max(1, min(buckets, len(sample)))
    if buckets <= FLAT_CENTROIDS:
        c = _kmeans(sample, buckets, seed)
    else:
        import faiss

        nc1 = int(math.sqrt(buckets))
        top = _kmeans(sample, nc1, seed)
        _, assign = faiss.knn(np.ascontiguousarray(sample, np.float32), top, 1, metric=faiss.METRIC_INNER_PRODUCT)
        assign = assign[:, 0]
        sizes = np.bincount(assign, minlength=len(top))
        share = np.maximum(1, np.round(sizes / max(sizes.sum(), 1) * buckets)).astype(int)
        parts = [_kmeans(sample[assign == j], int(min(share[j], sizes[j])), seed + j)
                 for j in range(len(top)) if sizes[j]]
        c = np.vstack(parts)
    c = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    return BucketPlan(np.ascontiguousarray(c, np.float32), margin, guests if len(c) > 1 else 0)


class BucketFiles:
    """Bucket files under ROOT, written through one buffer of at most ``flush_bytes``."""

    def __init__(self, root: str | Path, plan: BucketPlan, dim: int, flush_bytes: int = 64 << 20) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.plan = plan
        self.dim = dim
        self.dtype = record_dtype(dim)
        self.flush_bytes = flush_bytes
        self._pending: list[tuple[str, np.ndarray, np.ndarray]] = []
        self._bytes = 0
        self.owners = np.zeros(plan.count, np.int64)
        self.guest_rows = np.zeros(plan.count, np.int64)
        self.test_rows = np.zeros(plan.count, np.int64)

    def path(self, bucket: int, kind: str) -> Path:
        return self.root / f"b{bucket:06d}.{kind}"

    def add(self, kind: str, rows: np.ndarray, y: np.ndarray, x: np.ndarray) -> None:
        """Rows of KIND (train or test) with their class codes and unit vectors."""
        if not len(rows):
            return
        owner, extra = self.plan.assign(x)
        gi, gj = np.nonzero(extra >= 0)
        pick = np.concatenate([np.arange(len(rows)), gi])
        bucket = np.concatenate([owner, extra[gi, gj]])
        rec = np.empty(len(pick), self.dtype)
        rec["row"] = rows[pick]
        rec["y"] = y[pick]
        rec["own"] = np.arange(len(pick)) < len(rows)
        rec["x"] = x[pick]
        if kind == TRAIN:
            np.add.at(self.owners, owner, 1)
            np.add.at(self.guest_rows, bucket[len(rows):], 1)
        else:
            np.add.at(self.test_rows, bucket, 1)
        order = np.argsort(bucket, kind="stable")
        self._pending.append((kind, bucket[order], rec[order]))
        self._bytes += rec.nbytes
        if self._bytes >= self.flush_bytes:
            self.flush()

    def flush(self) -> None:
        for kind in (TRAIN, TEST):
            parts = [(b, r) for k, b, r in self._pending if k == kind]
            if not parts:
                continue
            bucket = np.concatenate([b for b, _ in parts])
            rec = np.concatenate([r for _, r in parts])
            order = np.argsort(bucket, kind="stable")
            bucket, rec = bucket[order], rec[order]
            starts = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]])
            ends = np.r_[starts[1:], len(bucket)]
            for s, e in zip(starts, ends):
                with open(self.path(int(bucket[s]), kind), "ab") as f:
                    f.write(rec[s:e].tobytes())
        self._pending.clear()
        self._bytes = 0


def read_bucket(root: str | Path, bucket: int, kind: str, dim: int) -> np.ndarray:
    p = Path(root) / f"b{bucket:06d}.{kind}"
    if not p.exists():
        return np.zeros(0, record_dtype(dim))
    size = os.path.getsize(p)
    dt = record_dtype(dim)
    if size % dt.itemsize:
        raise InspectError(f"{p}: a damaged bucket file (size {size} is not a whole number of records)")
    return np.fromfile(p, dtype=dt)


@dataclass
class BucketResult:
    """One bucket searched: its owners' k nearest train rows and the test rows' nearest."""

    bucket: int
    rows: np.ndarray  # [m] store rows of the owners
    y: np.ndarray  # [m] their class codes (-1: none)
    x: np.ndarray  # [m, d] their unit vectors
    nbrs: np.ndarray  # [m, k] store rows, self excluded, best first (-1 where fewer exist)
    sims: np.ndarray  # [m, k] cosine
    nbr_y: np.ndarray  # [m, k] the neighbours' class codes (-1: none)
    test_rows: np.ndarray  # [t] test rows of the bucket
    test_nbr: np.ndarray  # [t] their nearest train row here (-1: none)
    test_sim: np.ndarray  # [t]


def drop_self(sims: np.ndarray, nbrs: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove each row's own hit (not always first: an exact duplicate ties with it); where self is
    absent (a tie pushed it out), the last column goes instead."""
    is_self = nbrs == rows[:, None]
    is_self[~is_self.any(1), -1] = True
    first = is_self.argmax(1)
    keep = np.ones_like(is_self)
    keep[np.arange(len(rows)), first] = False
    k = nbrs.shape[1] - 1
    return sims[keep].reshape(-1, k), nbrs[keep].reshape(-1, k)


def search_bucket(root: str, bucket: int, dim: int, k: int, threads: int = 0) -> BucketResult:
    """Exact kNN of BUCKET's owners among its owners and guests; each test row's nearest train row."""
    import faiss

    if threads:
        faiss.omp_set_num_threads(threads)
    rec = read_bucket(root, bucket, TRAIN, dim)
    own = rec["own"] == 1
    base_rows, base_y = rec["row"], rec["y"]
    base = np.ascontiguousarray(rec["x"])
    del rec
    q_idx = np.flatnonzero(own)
    m = len(q_idx)
    nbrs = np.full((m, k), -1, np.int64)
    sims = np.zeros((m, k), np.float32)
    kk = min(k + 1, len(base))
    ip = faiss.METRIC_INNER_PRODUCT
    if m and kk > 1:  # faiss.knn: blocked BLAS search straight on the array (an index would copy it)
        s, i = faiss.knn(np.ascontiguousarray(base[q_idx]), base, kk, metric=ip)
        hit = np.where(i >= 0, base_rows[np.maximum(i, 0)], -1)
        s, hit = drop_self(s, hit, base_rows[q_idx])
        nbrs[:, :kk - 1], sims[:, :kk - 1] = hit, s
    nbr_y = np.full((m, k), -1, np.int32)
    if m and len(base):
        lookup_rows = np.argsort(base_rows, kind="stable")
        sorted_rows = base_rows[lookup_rows]
        at = np.searchsorted(sorted_rows, np.maximum(nbrs, 0))
        at = np.minimum(at, len(sorted_rows) - 1)
        nbr_y = np.where(nbrs >= 0, base_y[lookup_rows[at]], -1).astype(np.int32)
    test = read_bucket(root, bucket, TEST, dim)
    t_rows = test["row"].copy()
    t_nbr = np.full(len(test), -1, np.int64)
    t_sim = np.full(len(test), -np.inf, np.float32)
    if len(test) and len(base):
        s, i = faiss.knn(np.ascontiguousarray(test["x"]), base, 1, metric=ip)
        t_nbr, t_sim = np.where(i[:, 0] >= 0, base_rows[np.maximum(i[:, 0], 0)], -1), s[:, 0]
    return BucketResult(bucket, base_rows[q_idx], base_y[q_idx], base[q_idx], nbrs, sims, nbr_y,
                        t_rows, t_nbr, t_sim)

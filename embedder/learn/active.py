"""Which images to label first: ``embedder select`` (issue 37).

Strategies, over one store's unit vectors (cosine geometry):

- ``typical`` (cold start; TypiClust, Hacohen et al. 2022): spherical k-means of the unlabelled
  sample and the labelled rows into (labelled + budget) clusters (at most ``max_clusters``); the
  clusters with the fewest labelled (then picked) rows go first, largest first, and from each the
  most *typical* unlabelled row: typicality = 1 / mean distance to its K = min(20, size / 2) nearest
  neighbours inside the cluster. Clusters of fewer than ``min_cluster`` rows are skipped while larger
  ones remain.
- ``uncertain`` (warm start; Cluster-Margin style): the project's probe (``train_probe``: C chosen on
  held-out predictions) trained on the labelled rows; the margin between its top two classes over
  every unlabelled row, streamed, keeping the ``candidates_per_pick`` x budget smallest margins; those
  candidates k-means'd into ``budget`` clusters and the least certain of each taken (diversity: no
  two picks of one confusion).
- ``diverse`` (k-center greedy, the coreset of Sener & Savarese 2018): the unlabelled row farthest from
  every labelled row and earlier pick, again and again, over the sample.
- ``auto``: ``typical`` while the labels are few (no labels, one class, or some class with fewer than
  ``warm_per_class``), else ``uncertain``; the selection says which and why. Low-budget work (and
  ``scripts/bench_select.py``) finds typical picks ahead of uncertainty at one or two labels a class.

Labels are the store's own label column with ``--labels FILE`` put over it (``embedder.store.labels``);
a labelled row is never picked.

Memory is bounded, whatever the store's size: one record batch (``batch_rows``) in flight; a uniform
sample of at most ``sample_rows`` unlabelled rows and as many labelled ones (``sample_bytes`` of
vectors each, at most ``max_sample_rows`` rows; the reservoir buffers twice that before trimming);
typicality on at most ``typical_points`` rows of a cluster at a time; the warm start's candidate
buffer at most 2 x ``candidates_per_pick`` x budget rows (also capped by ``sample_bytes``); the
picks' ids and paths. Passes over the store: one (typical, diverse) or two (uncertain), and one over
ids and paths for the picks. Given the same store, labels, options and seed the picks are the same.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from embedder import choices
from embedder.analysis.streamed import Reservoir, batches
from embedder.analysis.vectors import ClassCodes, normalize_rows
from embedder.errors import EmbedderError, StoreError
from embedder.io import storage
from embedder.store.labels import Joined, LabelJoin, LabelsArg, read_labels
from embedder.store.shards import Store, arrow_to_embeddings

STRATEGIES = choices.STRATEGIES  # auto | typical | uncertain | diverse
METADATA_KEY = b"embedder.selection"
FORMAT_VERSION = 1
SELECTION_SCHEMA = pa.schema([("id", pa.string()), ("path", pa.string()), ("rank", pa.int32()), ("why", pa.string())])

Tick = Callable[[str, int, int], None]


class SelectError(EmbedderError):
    """A selection that cannot be made: a budget out of range, an empty store, a strategy the labels
    do not allow."""


@dataclass(frozen=True)
class ActiveOptions:
    """Every default of ``select`` and ``evaluate`` in one place (module docstring)."""

    warm_per_class: int = 2  # auto: uncertainty once every labelled class has this many (bench_select)
    sample_bytes: int = 256 << 20  # vectors of the unlabelled sample (and of the labelled one)
    max_sample_rows: int = 50_000
    max_clusters: int = 500  # TypiClust's cap on (labelled + budget) clusters
    min_cluster: int = 5  # smaller clusters are skipped while larger ones remain
    typical_k: int = 20  # neighbours behind typicality (at most half the cluster)
    typical_points: int = 2_000  # typicality computed on at most this many rows of a cluster
    kmeans_iter: int = 20
    kmeans_inits: int = 3  # k-means++ starts (up to 64 clusters; one above)
    kmeans_init_rows: int = 10_000  # rows the k-means++ seeds are drawn among
    candidates_per_pick: int = 10  # warm start: the 10 x budget least certain rows, then diversity
    fallback_c: float = 100.0  # warm start with one label a class (no C can be chosen): unit rows, C = 100
    batch_rows: int = 16_384
    eval_test_rows: int = 20_000  # evaluate: the labelled rows the curve is scored on (a uniform sample)
    eval_draws: int = 5  # evaluate: random draws per budget
    eval_per_class: tuple[int, ...] = (1, 2, 5, 10)


@dataclass(frozen=True)
class Selection:
    """The ranked picks (``table``: id, path, rank 1 = label first, why) and what made them."""

    table: pa.Table
    strategy: str  # the strategy used: typical | uncertain | diverse
    reason: str  # why that one (auto's choice, or "asked for")
    store: str
    budget: int
    seed: int
    images: int  # rows in the store
    labelled: int
    classes: dict[str, int] = field(default_factory=dict)  # labels per class
    sampled: int = 0  # unlabelled rows the picks were chosen among (typical, diverse: a uniform sample)
    unlabelled: int = 0
    skipped: int = 0  # rows whose vector is not finite: never picked
    joined: Joined | None = None
    seconds: float = 0.0
    rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # store rows, in rank order

    @property
    def ids(self) -> list[str]:
        return [str(v) for v in self.table.column("id").to_pylist()]

    def summary(self) -> str:
        sample = (f" (chosen among a uniform sample of {self.sampled:,})"
                  if self.sampled < self.unlabelled else "")
        return (f"{self.strategy}: {self.table.num_rows:,} of {self.unlabelled:,} unlabelled images picked"
                f"{sample} — {self.reason}; {self.seconds:.1f} s")

    def metadata(self) -> dict[str, Any]:
        return {"store": self.store, "strategy": self.strategy, "budget": self.budget, "seed": self.seed,
                "labelled": self.labelled, "version": FORMAT_VERSION}


# ---- pass 1: the samples -------------------------------------------------------------------------

@dataclass
class _Pool:
    n: int
    dim: int
    classes: list[str]
    counts: np.ndarray  # labels per class (all labelled rows)
    u_rows: np.ndarray  # the unlabelled sample (key order)
    u_x: np.ndarray
    l_rows: np.ndarray  # the labelled sample
    l_y: np.ndarray
    l_x: np.ndarray
    unlabelled: int
    skipped: int
    store_labelled: int  # rows with a label of the store's own (before --labels)
    joined: Joined | None
    label_col: str | None
    remap: np.ndarray
    codes: ClassCodes


def sample_rows(dim: int, options: ActiveOptions) -> int:
    """Rows in each sample: ``sample_bytes`` of float32 vectors, at most ``max_sample_rows``."""
    return int(max(1_000, min(options.max_sample_rows, options.sample_bytes // max(dim * 4, 1))))


def _open(store_path: str) -> Store:
    store = Store.open(store_path)
    if store.count() == 0:
        raise SelectError(f"{store_path} holds no vectors: run `embedder extract` (or `embedder import`) into it first")
    return store


def _label_column(store: Store, label_column: str | None) -> str | None:
    if label_column is None:
        return None
    names = store.dataset().schema.names
    if label_column in names:
        return label_column
    if label_column != "label":  # asked for by name: a typo is an error, not "no labels"
        raise SelectError(f"{store.root} has no column {label_column!r}; columns: "
                          f"{', '.join(n for n in names if n != 'embedding')}")
    return None


def _labels_of(batch: pa.RecordBatch, label_col: str | None, join: LabelJoin | None, count: bool) -> pa.Array | None:
    own = batch.column(batch.schema.get_field_index(label_col)) if label_col else None
    if join is not None:
        return join.apply(batch.column(batch.schema.get_field_index("id")), own, count=count)
    return own


def unit_vectors(batch: pa.RecordBatch) -> tuple[np.ndarray, np.ndarray]:
    """A batch's vectors as unit rows, and which are finite (a NaN or infinite row is zeroed: never
    picked, never trained on)."""
    x = np.array(arrow_to_embeddings(batch.column(batch.schema.get_field_index("embedding"))), np.float32)
    ok = np.asarray(np.isfinite(x).all(1), bool)
    if not ok.all():
        x[~ok] = 0.0
    normalize_rows(x)
    return x, ok


def _scan(store: Store, label_col: str | None, join: LabelJoin | None, options: ActiveOptions, seed: int,
          tick: Tick) -> _Pool:
    n, dim = store.count(), store.dim
    size = sample_rows(dim, options)
    rng = np.random.default_rng(seed)
    codes = ClassCodes()
    unl, lab = Reservoir(size, dim), Reservoir(size, dim)
    counts: dict[int, int] = {}
    unlabelled = skipped = store_labelled = 0
    cols = ["embedding"] + (["id"] if join is not None else []) + ([label_col] if label_col else [])
    for start, batch in batches(store, cols, options.batch_rows):
        x, ok = unit_vectors(batch)
        rows = np.arange(start, start + len(x), dtype=np.int64)
        labels = _labels_of(batch, label_col, join, count=True)
        if label_col:
            store_labelled += int(_has_label(batch.column(batch.schema.get_field_index(label_col))).sum())
        y = codes.codes(labels) if labels is not None else np.full(len(x), -1, np.int64)
        skipped += int((~ok).sum())
        free = (y < 0) & ok
        unlabelled += int(free.sum())
        unl.offer(rng.random(int(free.sum())), rows[free], y[free], x[free])
        has = (y >= 0) & ok
        if has.any():
            lab.offer(rng.random(int(has.sum())), rows[has], y[has], x[has])
            u, c = np.unique(y[has], return_counts=True)
            for a, b in zip(u.tolist(), c.tolist()):
                counts[a] = counts.get(a, 0) + b
        tick("reading vectors", min(start + len(x), n), n)
    classes, remap = codes.final()
    u_rows, _, u_x = unl.by_key()
    l_rows, l_y, l_x = lab.by_key()
    l_y = remap[l_y] if len(l_y) else l_y
    class_counts = np.zeros(len(classes), np.int64)
    for a, b in counts.items():
        class_counts[remap[a]] += b
    joined = join.require_some(str(store.root)) if join is not None else None
    return _Pool(n, dim, classes, class_counts, u_rows, np.ascontiguousarray(u_x), l_rows, l_y,
                 np.ascontiguousarray(l_x), unlabelled, skipped, store_labelled, joined, label_col, remap, codes)


# ---- the strategies --------------------------------------------------------------------------------

def kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeds (D² sampling, cosine geometry) among the unit rows X: small groups get a seed
    (FAISS's own start, k random rows, leaves a planted 40-row group of 1,670 unseeded often)."""
    n = len(x)
    first = int(rng.integers(n))
    chosen = [first]
    d = np.maximum(2.0 - 2.0 * (x @ x[first]).astype(np.float64), 0.0)
    for _ in range(1, k):
        total = d.sum()
        j = int(rng.choice(n, p=d / total)) if total > 0 else int(rng.integers(n))
        chosen.append(j)
        d = np.minimum(d, np.maximum(2.0 - 2.0 * (x @ x[j]).astype(np.float64), 0.0))
    return np.ascontiguousarray(x[chosen], np.float32)


def kmeans(x: np.ndarray, k: int, seed: int, options: ActiveOptions = ActiveOptions()) -> np.ndarray:
    """Spherical k-means (FAISS) of unit rows X into K unit centroids: k-means++ seeds (on at most
    ``kmeans_init_rows`` rows), Lloyd on at most 64 rows a centroid; up to 64 centroids the best of
    ``kmeans_inits`` starts (the highest total cosine to the nearest centroid)."""
    import faiss

    x = np.ascontiguousarray(x, np.float32)
    if k >= len(x):
        return x.copy()
    rng = np.random.default_rng(seed)
    sub = x if len(x) <= options.kmeans_init_rows else \
        x[np.sort(rng.choice(len(x), options.kmeans_init_rows, replace=False))]
    best, best_obj = None, -np.inf
    for t in range(options.kmeans_inits if k <= 64 else 1):
        km = faiss.Kmeans(x.shape[1], k, niter=options.kmeans_iter, spherical=True, seed=seed + 1 + t,
                          max_points_per_centroid=64, min_points_per_centroid=1)
        km.train(x, init_centroids=kmeans_pp(sub, k, rng))
        c = np.ascontiguousarray(km.centroids, np.float32)
        obj = 0.0
        if options.kmeans_inits > 1 and k <= 64:
            obj = float(faiss.knn(sub, c, 1, metric=faiss.METRIC_INNER_PRODUCT)[0].sum())
        if best is None or obj > best_obj:
            best, best_obj = c, obj
    assert best is not None
    return best


def nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    import faiss

    _, i = faiss.knn(np.ascontiguousarray(x, np.float32), np.ascontiguousarray(centroids, np.float32), 1,
                     metric=faiss.METRIC_INNER_PRODUCT)
    return np.asarray(i[:, 0], np.int64)


def typicality(x: np.ndarray, k: int) -> np.ndarray:
    """1 / mean Euclidean distance (unit rows) to each row's K nearest other rows of X."""
    import faiss

    k = max(1, min(k, len(x) - 1))
    if len(x) < 2:
        return np.ones(len(x))
    sims, idx = faiss.knn(np.ascontiguousarray(x, np.float32), np.ascontiguousarray(x, np.float32), k + 1,
                          metric=faiss.METRIC_INNER_PRODUCT)
    own = idx == np.arange(len(x))[:, None]
    # the row itself is among its k + 1 nearest (a duplicate may outrank it): drop one copy of it
    drop = np.where(own.any(1), own.argmax(1), k)
    keep = np.ones_like(own)
    keep[np.arange(len(x)), drop] = False
    d = np.sqrt(np.maximum(2.0 - 2.0 * sims[keep].reshape(len(x), k), 0.0))
    return np.asarray(1.0 / (d.mean(1) + 1e-5), np.float64)


def _scaled(count: int, sample: int, total: int) -> int:
    return int(round(count * total / sample)) if sample else count


def _typical(pool: _Pool, budget: int, options: ActiveOptions, seed: int, tick: Tick) -> tuple[np.ndarray, list[str]]:
    nu, nl = len(pool.u_x), len(pool.l_x)
    x = np.concatenate([pool.u_x, pool.l_x]) if nl else pool.u_x
    k = int(max(1, min(options.max_clusters, nl + budget, len(x))))
    tick("clustering", 0, 1)
    assign = nearest(x, kmeans(x, k, seed, options)) if k > 1 else np.zeros(len(x), np.int64)
    tick("clustering", 1, 1)
    u_assign = assign[:nu]
    size = np.bincount(u_assign, minlength=k)
    labelled = np.bincount(assign[nu:], minlength=k) if nl else np.zeros(k, np.int64)
    picked = np.zeros(k, np.int64)
    members = {int(c): np.flatnonzero(u_assign == c) for c in np.flatnonzero(size)}
    typ: dict[int, np.ndarray] = {}  # per cluster: its members, most typical first
    rng = np.random.default_rng(seed)
    out_rows: list[int] = []
    why: list[str] = []
    big = size >= options.min_cluster
    for i in range(budget):
        left = size - picked > 0
        pool_ok = left & big if (left & big).any() else left
        cand = np.flatnonzero(pool_ok)
        # fewest labelled and picked first, then the largest (scaled by the sample shares)
        load = labelled[cand] * (int(pool.counts.sum()) / max(nl, 1)) + picked[cand]
        c = int(cand[np.lexsort((cand, -size[cand], load))[0]])
        if c not in typ:
            m = members[c]
            if len(m) > options.typical_points:
                m = np.sort(rng.choice(m, options.typical_points, replace=False))
            t = typicality(pool.u_x[m], min(options.typical_k, max(1, len(m) // 2)))
            order = m[np.lexsort((m, -t))]
            rest = np.setdiff1d(members[c], m)  # beyond the typicality sample: after it, at random
            typ[c] = np.concatenate([order, rng.permutation(rest)])
        j = int(typ[c][picked[c]])
        out_rows.append(int(pool.u_rows[j]))
        est = _scaled(int(size[c]), nu, pool.unlabelled)
        lab_est = _scaled(int(labelled[c]), nl, int(pool.counts.sum()))
        approx = "about " if nu < pool.unlabelled else ""
        if lab_est == 0 and picked[c] == 0:
            why.append(f"typical of a group of {approx}{est:,} images (none labelled)")
        else:
            extra = [f"{lab_est:,} labelled"] if lab_est else []
            if picked[c]:
                extra.append(f"{int(picked[c])} picked above")
            why.append(f"typical of a group of {approx}{est:,} images ({', '.join(extra)})")
        picked[c] += 1
        tick("picking typical images", i + 1, budget)
    return np.array(out_rows, np.int64), why


def _diverse(pool: _Pool, budget: int, tick: Tick) -> tuple[np.ndarray, list[str]]:
    import faiss

    x = pool.u_x
    if len(pool.l_x):
        sims, _ = faiss.knn(x, pool.l_x, 1, metric=faiss.METRIC_INNER_PRODUCT)
        gap = 1.0 - sims[:, 0].astype(np.float64)
        first = None
    else:
        gap = np.full(len(x), np.inf)
        centre = x.mean(0)
        first = int(np.argmax(x @ centre))  # no labels: start from the most central row
    rows: list[int] = []
    why: list[str] = []
    for i in range(budget):
        j = first if (i == 0 and first is not None) else int(np.argmax(gap))
        d = float(gap[j])
        rows.append(int(pool.u_rows[j]))
        why.append("the most central image (no labels to keep away from)" if not np.isfinite(d) else
                   f"far from every labelled image and earlier pick (cosine distance {d:.2f})")
        gap = np.minimum(gap, 1.0 - (x @ x[j]).astype(np.float64))
        gap[j] = -np.inf
        tick("picking diverse images", i + 1, budget)
    return np.array(rows, np.int64), why


class _Smallest:
    """The K rows with the smallest keys seen so far (buffer: 2K rows, then trimmed)."""

    def __init__(self, k: int, dim: int) -> None:
        self.k = k
        self.keys = np.zeros(0, np.float64)
        self.rows = np.zeros(0, np.int64)
        self.x = np.zeros((0, dim), np.float32)
        self.info = np.zeros((0, 4), np.float64)  # top class, its p, second class, its p

    def offer(self, keys: np.ndarray, rows: np.ndarray, x: np.ndarray, info: np.ndarray) -> None:
        if len(self.keys) >= self.k:
            cut = np.partition(self.keys, self.k - 1)[self.k - 1]
            m = keys < cut
            keys, rows, x, info = keys[m], rows[m], x[m], info[m]
        self.keys = np.concatenate([self.keys, keys])
        self.rows = np.concatenate([self.rows, rows])
        self.x = np.concatenate([self.x, x])
        self.info = np.concatenate([self.info, info])
        if len(self.keys) > 2 * self.k:
            self._trim()

    def _trim(self) -> None:
        if len(self.keys) > self.k:
            keep = np.lexsort((self.rows, self.keys))[:self.k]
            self.keys, self.rows, self.x, self.info = self.keys[keep], self.rows[keep], self.x[keep], self.info[keep]

    def sorted(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        self._trim()
        order = np.lexsort((self.rows, self.keys))
        return self.keys[order], self.rows[order], self.x[order], self.info[order]


def _uncertain(store: Store, pool: _Pool, join: LabelJoin | None, budget: int, options: ActiveOptions, seed: int,
               tick: Tick) -> tuple[np.ndarray, list[str]]:
    from embedder.learn import probe as pr
    from embedder.learn.options import ProbeOptions

    present = np.flatnonzero(np.bincount(pool.l_y, minlength=len(pool.classes)) > 0) if len(pool.l_y) else \
        np.zeros(0, np.int64)
    if len(present) < 2:
        raise SelectError("--strategy uncertain needs labels of at least 2 classes (a probe to be unsure); "
                          f"found {len(present)}: use --strategy typical (or auto)")
    tick("training the probe", 0, 1)
    counts = np.bincount(pool.l_y, minlength=len(pool.classes))
    if counts.max() >= 2:
        head = pr.train_probe(pr.Dataset(pool.l_x, pool.l_y, pool.classes, [], [], {}), ProbeOptions(seed=seed)).head
    else:  # one label a class: nothing to hold out to choose C with
        from embedder.learn.selection import fit_all

        head = fit_all(pool.l_x, pool.l_y, len(pool.classes), options.fallback_c, False)[0]
    tick("training the probe", 1, 1)
    m = int(min(max(budget, options.candidates_per_pick * budget), sample_rows(pool.dim, options)))
    best = _Smallest(m, pool.dim)
    cols = ["embedding"] + (["id"] if join is not None else []) + ([pool.label_col] if pool.label_col else [])
    for start, batch in batches(store, cols, options.batch_rows):
        x, ok = unit_vectors(batch)
        labels = _labels_of(batch, pool.label_col, join, count=False)
        free = ok if labels is None else ok & ~_has_label(labels)
        if free.any():
            xs = x[free]
            p = head.proba(xs)
            top2 = np.argsort(-p, axis=1, kind="stable")[:, :2] if p.shape[1] > 1 else np.zeros((len(xs), 2), np.int64)
            p1 = np.take_along_axis(p, top2[:, :1], 1)[:, 0]
            p2 = np.take_along_axis(p, top2[:, 1:2], 1)[:, 0]
            info = np.stack([top2[:, 0], p1, top2[:, 1], p2], 1).astype(np.float64)
            rows = np.arange(start, start + len(x), dtype=np.int64)[free]
            best.offer((p1 - p2).astype(np.float64), rows, xs, info)
        tick("probe margins", min(start + len(x), pool.n), pool.n)
    keys, rows, xs, info = best.sorted()
    if len(rows) <= budget:
        chosen = np.arange(len(rows))
    else:
        tick("clustering the candidates", 0, 1)
        assign = nearest(xs, kmeans(xs, budget, seed, options))
        # the least certain of each cluster (candidates are in margin order: a cluster's first)
        _, first = np.unique(assign, return_index=True)
        chosen = np.sort(first)
        if len(chosen) < budget:  # empty clusters: the next least certain rows fill in
            rest = np.setdiff1d(np.arange(len(rows)), chosen)[:budget - len(chosen)]
            chosen = np.sort(np.concatenate([chosen, rest]))
        tick("clustering the candidates", 1, 1)
    why = []
    for i in chosen:
        c1, q1, c2, q2 = info[i]
        why.append(f"probe unsure: {pool.classes[int(c1)]!r} {q1:.2f} vs {pool.classes[int(c2)]!r} {q2:.2f}")
    return rows[chosen], why


def _has_label(labels: pa.Array) -> np.ndarray:
    import pyarrow.compute as pc

    lab = labels.cast(pa.string())
    return np.asarray(pc.and_(pc.is_valid(lab), pc.not_equal(lab, "")).fill_null(False), bool)


def choose_strategy(strategy: str, counts: np.ndarray, classes: Sequence[str],
                    options: ActiveOptions) -> tuple[str, str]:
    """(strategy, why): ``auto`` by how many labels each class has (module docstring)."""
    if strategy not in STRATEGIES:
        raise SelectError(f"unknown strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    total = int(counts.sum())
    if strategy != "auto":
        return strategy, "asked for" + (f" ({total:,} labels)" if total else " (no labels)")
    present = np.flatnonzero(counts > 0)
    if total == 0:
        return "typical", "cold start: no labels yet, so typical images of each group first"
    if len(present) < 2:
        only = classes[int(present[0])]
        return "typical", f"cold start: labels of one class only ({only!r}), so typical images first"
    low = int(present[np.argmin(counts[present])])
    if counts[low] < options.warm_per_class:
        return "typical", (f"cold start: {total:,} labels, {int(counts[low])} of {classes[low]!r} (under "
                           f"{options.warm_per_class} a class), so typical images of unlabelled groups first")
    return "uncertain", (f"warm start: {total:,} labels in {len(present)} classes (at least "
                         f"{options.warm_per_class} each), so where the probe is least sure")


def _lookup(store: Store, rows: np.ndarray, options: ActiveOptions) -> tuple[list[str], list[str | None]]:
    """The ids and paths of store ROWS (any order), in that order: one pass over two columns."""
    order = np.argsort(rows, kind="stable")
    srt = rows[order]
    ids: list[Any] = [None] * len(rows)
    paths: list[Any] = [None] * len(rows)
    names = store.dataset().schema.names
    cols = ["id"] + (["path"] if "path" in names else [])
    for start, batch in batches(store, cols, options.batch_rows):
        lo, hi = np.searchsorted(srt, [start, start + batch.num_rows])
        if hi > lo:
            local = pa.array(srt[lo:hi] - start)
            got_ids = batch.column(0).take(local).cast(pa.string()).to_pylist()
            got_paths = (batch.column(1).take(local).cast(pa.string()).to_pylist() if len(cols) > 1
                         else [None] * (hi - lo))
            for k, (i, p) in enumerate(zip(got_ids, got_paths)):
                ids[int(order[lo + k])] = i
                paths[int(order[lo + k])] = p
        if hi == len(srt):
            break
    if any(i is None for i in ids):
        raise StoreError(f"{store.root} changed while select was reading it; rerun")
    return [str(i) for i in ids], paths


def select(store_path: str | Path, budget: int, strategy: str = "auto", labels: LabelsArg | None = None,
           seed: int = 0, label_column: str | None = "label", options: ActiveOptions = ActiveOptions(),
           tick: Tick | None = None) -> Selection:
    """BUDGET images of STORE to label next, best first (module docstring). LABELS: a file of (id,
    label) put over the store's LABEL_COLUMN (None: the store's labels are not read)."""
    t0 = time.perf_counter()
    tick = tick or (lambda stage, done, total: None)
    if strategy not in STRATEGIES:
        raise SelectError(f"unknown strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    if budget < 1:
        raise SelectError(f"--budget must be at least 1 (got {budget})")
    store = _open(str(store_path))
    label_col = _label_column(store, label_column)
    join = LabelJoin(read_labels(labels)) if labels is not None else None
    pool = _scan(store, label_col, join, options, seed, tick)
    labelled = int(pool.counts.sum())
    if pool.unlabelled == 0 and pool.skipped:
        raise SelectError(f"no unlabelled image of {store_path} has a usable vector ({pool.skipped:,} with a NaN or "
                          f"infinite value skipped, {labelled:,} labelled): nothing to select; re-extract them")
    if pool.unlabelled == 0:
        # the hint only where the store's own labels are part of it: --ignore-store-labels cannot help a
        # store without labels that the file labels whole
        hint = " (if its folders are not classes: --ignore-store-labels)" if pool.store_labelled else ""
        raise SelectError(f"every image of {store_path} is labelled ({labelled:,}"
                          f"{f' by {join.file.path}' if join is not None and not pool.store_labelled else ''}): "
                          f"nothing left to select{hint}")
    if budget > pool.unlabelled:
        raise SelectError(f"--budget {budget:,} is more than the {pool.unlabelled:,} unlabelled images of {store_path}")
    used, reason = choose_strategy(strategy, pool.counts, pool.classes, options)
    picks = min(budget, len(pool.u_rows))
    if used == "typical":
        rows, why = _typical(pool, picks, options, seed, tick)
    elif used == "diverse":
        rows, why = _diverse(pool, picks, tick)
    else:
        rows, why = _uncertain(store, pool, join, budget, options, seed, tick)
    if len(rows) < budget:
        reason += f"; {len(rows):,} picked: the sample holds no more"
    tick("ids and paths", 0, 1)
    ids, paths = _lookup(store, rows, options)
    table = pa.table({"id": pa.array(ids, pa.string()), "path": pa.array(paths, pa.string()),
                      "rank": pa.array(np.arange(1, len(rows) + 1), pa.int32()), "why": pa.array(why, pa.string())},
                     schema=SELECTION_SCHEMA)
    return Selection(table, used, reason, str(store_path), budget, seed, pool.n, labelled,
                     {c: int(k) for c, k in zip(pool.classes, pool.counts)},
                     pool.unlabelled if used == "uncertain" else len(pool.u_rows), pool.unlabelled,
                     pool.skipped, pool.joined, time.perf_counter() - t0, rows)


def write_selection(path: str | Path, selection: Selection) -> str:
    """The picks as Parquet (id, path, rank, why; schema metadata ``embedder.selection``), whole or not
    at all. Returns where it went."""
    loc = storage.resolve(path)
    if not storage.is_uri(loc):
        p = Path(loc)
        if p.is_dir():
            raise SelectError(f"--out {path} is a folder: give a file name (e.g. {Path(path) / 'selection.parquet'})")
        p.parent.mkdir(parents=True, exist_ok=True)
    meta = {METADATA_KEY: json.dumps(selection.metadata()).encode()}
    table = selection.table.cast(SELECTION_SCHEMA).replace_schema_metadata(meta)
    storage.write_parquet(loc, table)
    return loc


def read_selection(path: str | Path) -> tuple[pa.Table, dict[str, Any]]:
    """A selection file's table and its ``embedder.selection`` metadata ({} when absent)."""
    table = storage.open_parquet(storage.resolve(path)).read()
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    try:
        meta = json.loads(raw) if raw else {}
    except ValueError:
        meta = {}
    return table, meta if isinstance(meta, dict) else {}


# ---- --evaluate: the learning curve of the picks against random picks -----------------------------

@dataclass(frozen=True)
class CurvePoint:
    per_class: int
    budget: int
    labelled_picks: int  # picks with a ground-truth label (the rest cannot be scored)
    classes_hit: int  # classes among the selected picks
    random_classes_hit: float  # mean over the random draws
    selected: float  # logistic regression accuracy trained on the selected picks
    random_mean: float
    random_sd: float
    knn_selected: float
    knn_random_mean: float
    knn_random_sd: float
    select_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Evaluation:
    store: str
    strategy: str
    classes: list[str]
    images: int
    labelled: int
    test_rows: int
    draws: int
    points: list[CurvePoint]
    seconds: float

    def table(self) -> str:
        lines = [f"{'labels':>7} {'per class':>9} {'selected':>9} {'random (mean ± sd)':>19} {'Δ':>7}"
                 f" {'kNN sel.':>9} {'kNN random':>16} {'classes hit':>12}"]
        for p in self.points:
            lines.append(f"{p.budget:7d} {p.per_class:9d} {p.selected:9.1%} {p.random_mean:11.1%} ± {p.random_sd:4.1%}"
                         f" {100 * (p.selected - p.random_mean):+6.1f} {p.knn_selected:9.1%}"
                         f" {p.knn_random_mean:9.1%} ± {p.knn_random_sd:4.1%}"
                         f" {p.classes_hit:5d} vs {p.random_classes_hit:4.1f}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"store": self.store, "strategy": self.strategy, "classes": self.classes, "images": self.images,
                "labelled": self.labelled, "test_rows": self.test_rows, "draws": self.draws,
                "points": [p.to_dict() for p in self.points], "seconds": round(self.seconds, 2)}


def plain_logreg(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray) -> np.ndarray:
    """What a user checks with: scikit-learn's LogisticRegression (defaults, max_iter 5000) on the
    store's vectors as stored; picks of a single class predict that class. (On unit vectors C = 1 is
    so strong a penalty at 10-100 images that both arms sit near chance: Fashion-MNIST, 1 a class,
    18.7 % vs 15.4 %, against 60.9 % vs 39.8 % as stored.)"""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    if len(np.unique(ytr)) < 2:
        return np.full(len(xte), ytr[0] if len(ytr) else -1)
    # one BLAS thread: at tens of rows the threads only contend (27 s against 0.6 s for one fit of
    # 100 rows on 2 busy cores)
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.filterwarnings("ignore", message="The number of unique classes")  # 1 image a class
        return np.asarray(LogisticRegression(max_iter=5000).fit(xtr, ytr).predict(xte))


def knn_accuracy(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray, n_classes: int) -> float:
    from embedder.learn.probe import knn_predict

    if not len(ytr):
        return 0.0
    return float((knn_predict(xtr, ytr, xte, n_classes).argmax(1) == yte).mean())


def evaluate(store_path: str | Path, budget: int, strategy: str = "auto", labels: LabelsArg | None = None,
             seed: int = 0, label_column: str | None = "label", options: ActiveOptions = ActiveOptions(),
             tick: Tick | None = None) -> Evaluation:
    """The learning curve of the picks against random picks on a labelled store: at 1, 2, 5, 10
    labels a class (as many as BUDGET allows), the picks made with the labels HIDDEN (``select`` with
    no labels), then LogisticRegression (``plain_logreg``) and cosine kNN trained on the picks' true
    labels and on as many random images (``eval_draws`` draws); each arm scored on the labelled rows
    it did not pick (of a uniform sample of at most ``eval_test_rows``). Holds one class code per store
    row and the vectors of the test sample and the picks."""
    t0 = time.perf_counter()
    tick = tick or (lambda stage, done, total: None)
    if strategy == "uncertain":
        raise SelectError("--evaluate hides the labels, so it measures the cold-start strategies: "
                          "auto, typical or diverse (uncertain needs labels)")
    if budget < 1:
        raise SelectError(f"--budget must be at least 1 (got {budget})")
    store = _open(str(store_path))
    label_col = _label_column(store, label_column)
    join = LabelJoin(read_labels(labels)) if labels is not None else None
    if label_col is None and join is None:
        raise SelectError(f"--evaluate needs labels to score the picks: {store_path} has no {label_column!r} "
                          "column and no --labels FILE was given")
    n = store.count()
    codes = ClassCodes()
    y_all = np.full(n, -1, np.int32)
    cols = (["id"] if join is not None else []) + ([label_col] if label_col else [])
    for start, batch in batches(store, cols, options.batch_rows):
        lab = _labels_of(batch, label_col, join, count=True)
        if lab is not None:
            y_all[start:start + batch.num_rows] = codes.codes(lab)
        tick("reading labels", min(start + batch.num_rows, n), n)
    if join is not None:
        join.require_some(str(store_path))
    classes, remap = codes.final()
    has = y_all >= 0
    y_all[has] = remap[y_all[has]]
    present = np.unique(y_all[has])
    if len(present) < 2:
        raise SelectError(f"--evaluate needs labels of at least 2 classes in {store_path}; found {len(present)}")
    n_cls = len(present)
    budgets = [(b, b * n_cls) for b in options.eval_per_class if b * n_cls <= budget]
    if not budgets:
        budgets = [(max(1, budget // n_cls), budget)]
    rng = np.random.default_rng(seed)
    picks: dict[int, tuple[np.ndarray, float]] = {}
    for _, size in budgets:
        tick(f"selecting {size}", 0, 1)
        s = select(store_path, size, strategy, None, seed, None, options)
        picks[size] = (s.rows, s.seconds)
    randoms = {size: [np.sort(rng.choice(n, size, replace=False)) for _ in range(options.eval_draws)]
               for _, size in budgets}
    labelled = np.flatnonzero(has)
    test = np.sort(rng.choice(labelled, min(len(labelled), options.eval_test_rows), replace=False))
    drawn = [d for ds in randoms.values() for d in ds]
    need = np.unique(np.concatenate([test] + [r for r, _ in picks.values()] + drawn))
    keep = np.zeros(n, bool)
    keep[need] = True
    x_need = np.nan_to_num(np.asarray(store.read_embeddings(keep), np.float32))  # as stored: what a user fits

    def vec(rows: np.ndarray) -> np.ndarray:
        return np.asarray(x_need[np.searchsorted(need, rows)])

    def score(r: np.ndarray) -> tuple[float, float, int, int]:
        """(LogisticRegression, kNN, classes, test rows): trained on R's labelled rows, scored on the
        test sample less R."""
        te = np.setdiff1d(test, r)
        r = r[y_all[r] >= 0]
        if not len(r) or not len(te):
            return 0.0, 0.0, 0, len(te)
        ytr, yte = y_all[r].astype(np.int64), y_all[te].astype(np.int64)
        xtr, xte = vec(r), vec(te)
        acc = float((plain_logreg(xtr, ytr, xte) == yte).mean())
        return acc, knn_accuracy(xtr, ytr, xte, yte, len(classes)), len(np.unique(ytr)), len(te)

    points: list[CurvePoint] = []
    tested = len(test)
    for i, (b, size) in enumerate(budgets):
        tick("scoring", i, len(budgets))
        rows, secs = picks[size]
        sel, ksel, hit, t_n = score(rows)
        tested = min(tested, t_n)
        rnd = [score(d) for d in randoms[size]]
        ra = np.array([r[0] for r in rnd])
        rk = np.array([r[1] for r in rnd])
        points.append(CurvePoint(b, size, int((y_all[rows] >= 0).sum()), hit, float(np.mean([r[2] for r in rnd])),
                                 sel, float(ra.mean()), float(ra.std()), ksel, float(rk.mean()), float(rk.std()),
                                 round(secs, 3)))
    tick("scoring", len(budgets), len(budgets))
    sel_strategy = choose_strategy(strategy, np.zeros(0, np.int64), [], options)[0]
    return Evaluation(str(store_path), sel_strategy, classes, n, int(has.sum()), tested, options.eval_draws,
                      points, time.perf_counter() - t0)


def plot_evaluation(evaluation: Evaluation, path: str | Path) -> None:
    """The learning curve as a PNG (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = [p.budget for p in evaluation.points]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(b, [p.selected for p in evaluation.points], "o-", label=f"selected ({evaluation.strategy})")
    ax.errorbar(b, [p.random_mean for p in evaluation.points], yerr=[p.random_sd for p in evaluation.points],
                fmt="s--", label=f"random (mean ± sd of {evaluation.draws})")
    ax.plot(b, [p.knn_selected for p in evaluation.points], "o:", alpha=0.6, label="kNN, selected")
    ax.plot(b, [p.knn_random_mean for p in evaluation.points], "s:", alpha=0.6, label="kNN, random")
    ax.set_xscale("log")
    ax.set_xlabel("labelled images")
    ax.set_ylabel("accuracy (LogisticRegression)")
    ax.set_title(Path(evaluation.store).name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""FAISS indexes over a store, with an explicit id map and measured quality.

``indexes/NAME/`` holds ``index.faiss``, ``ids.parquet`` (FAISS id → store id, path, label: never
alignment by row position) and ``index.json`` (store provenance, kind, factory string, metric, dim,
count, build time, tuned search parameter and the recall/QPS measured against exact search on
held-out random queries).
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import math
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from embedder import choices
from embedder.errors import IndexError_, StoreError, shown
from embedder.index import generations as gens
from embedder.index import gpu as index_gpu
from embedder.index.generations import HOME_ENV, META_FILE, _read_meta, drop, home, info, locate, names  # noqa: F401
from embedder.io import storage
from embedder.store.provenance import Provenance
from embedder.store.shards import Store, arrow_to_embeddings

log = logging.getLogger(__name__)

KINDS = choices.INDEX_KINDS
METRICS = choices.METRICS
INDEX_FILE, IDS_FILE = "index.faiss", "ids.parquet"
VECTORS_FILE = "vectors.npy"  # float16 copies for exact re-ranking of compressed (PQ) indexes
RERANK_FACTOR = 8
MIN_RECALL_QUERIES = 50  # fewer held-out queries: recall is reported as not measured
RERANK_CHUNK = 32  # queries re-ranked at a time (bounded temporaries)
EXACT_BELOW = 50_000
ENGINES = choices.ENGINES


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise IndexError_("faiss is not installed: pip install 'embedder[index]'") from None
    return faiss


@dataclass(frozen=True)
class BuildOptions:
    kind: str = "auto"  # auto | flat | hnsw | ivf | ivfpq | any FAISS factory string
    metric: str = "cosine"
    target_recall: float = 0.95
    memory_budget: int | None = None  # bytes; None: a quarter of physical RAM
    queries: int = 1000  # held-out random queries used to measure recall
    seed: int = 0
    on_disk: bool = False  # IVF kinds: streamed build, inverted lists on disk (automatic over budget)
    coarse: str = "auto"  # IVF kinds' coarse quantizer: auto | flat | hnsw
    opq: bool = False  # IVF-PQ: learn a rotation (OPQ) before product quantization
    engine: str = "local"  # local | ray (streamed IVF builds: the adds as Ray tasks)
    address: str | None = None  # the Ray cluster (None: a local Ray instance)


@dataclass
class Plan:
    factory: str
    kind: str
    reason: str
    train_size: int = 0


@dataclass
class IndexInfo:
    name: str
    path: str
    meta: dict[str, Any] = field(default_factory=dict)


def default_budget() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4)
    except (ValueError, OSError, AttributeError):
        return 4 << 30


COARSE = choices.COARSE
# From this many lists (n ≥ 16.7M at 4√n) an HNSW graph over the centroids assigns vectors. Below,
# the flat quantizer's BLAS distances win: measured at 1M × 256 (4,000 lists) on 2 cores, see
# docs/benchmarks.md; FAISS's guidelines use HNSW quantizers for 65,536 lists and more.
HNSW_COARSE_FROM = 16_384


def plan(n: int, dim: int, kind: str, budget: int, coarse: str = "auto", opq: bool = False) -> Plan:
    """Pick an index from size and a memory budget, and say why."""
    if coarse not in COARSE:
        raise IndexError_(f"unknown coarse quantizer {coarse!r}; valid: {', '.join(COARSE)}")
    flat_bytes = n * dim * 4
    # ≈4√n lists, but never fewer than 39 vectors per list to train on (FAISS's own floor: k-means
    # with fewer gives poor centroids, and fewer vectors than lists cannot train at all): the cap
    # binds below ~24,000 vectors, i.e. only for an IVF kind asked for on a small store
    nlist = max(1, min(65536, int(4 * math.sqrt(max(n, 1))), n // 39))
    if kind not in KINDS:
        return Plan(kind, "factory", "FAISS factory string given by the user",
                    train_size=min(n, 256 * 64))
    if kind == "auto":
        if n < EXACT_BELOW and flat_bytes <= budget:
            kind, why = "flat", f"{n:,} vectors < {EXACT_BELOW:,}: exact search is fast enough"
        elif flat_bytes * 1.5 <= budget:
            kind, why = "hnsw", (f"{n:,} vectors, {flat_bytes / 2**20:,.0f} MiB raw fits the "
                                 f"{budget / 2**20:,.0f} MiB budget: HNSW for speed at high recall")
        else:
            kind, why = "ivfpq", (f"{flat_bytes / 2**20:,.0f} MiB raw exceeds the "
                                  f"{budget / 2**20:,.0f} MiB budget: IVF-PQ compresses vectors")
    else:
        why = f"--kind {kind}"
    if kind == "flat":
        return Plan("Flat", kind, why)
    if kind == "hnsw":
        return Plan("HNSW32", kind, why)
    if opq and kind != "ivfpq":
        raise IndexError_(f"--opq rotates vectors for product quantization: it needs --kind ivfpq, not {kind!r}")
    train = min(n, max(64 * nlist, 10_000))
    hnsw = coarse == "hnsw" or (coarse == "auto" and nlist >= HNSW_COARSE_FROM)
    ivf = f"IVF{nlist}_HNSW32" if hnsw else f"IVF{nlist}"
    if hnsw:  # a flat quantizer costs nlist distances per vector added or searched
        why += "; HNSW32 coarse quantizer" + (f" (≥ {HNSW_COARSE_FROM:,} lists)" if coarse == "auto" else "")
    if kind == "ivf":
        return Plan(f"{ivf},Flat", kind, why + f"; nlist={nlist} (≈4√n, ≥ 39 vectors per list)", train)
    # 8-bit PQ at 4 dims per byte: 1/16 of float32's memory (d=512 → PQ128, 128 bytes/vector).
    # (4-bit fast-scan trains faster but reached only ~0.6 recall@10 on our clustered tests.)
    m = next((m for m in (dim // 4, dim // 2, dim) if m >= 1 and dim % m == 0), 1)
    rotation = f"OPQ{m}_{dim}," if opq else ""
    return Plan(f"{rotation}{ivf},PQ{m}", kind, why + f"; nlist={nlist}, {'OPQ + ' if opq else ''}PQ{m} "
                f"({m} bytes/vector)", train)


def _prepare(x: np.ndarray, metric: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if metric == "cosine":
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x = x / np.maximum(norms, 1e-12)
    return x


def _faiss_metric(metric: str) -> int:
    # Cosine runs as L2 on unit vectors: the same ranking (|a-b|² = 2 - 2cos), and IVF-PQ's
    # residual codes are built for L2.
    faiss = _faiss()
    return faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2


def _score(d: np.ndarray, metric: str) -> np.ndarray:
    """FAISS distances → the score users read: cosine similarity, L2 distance, or inner product."""
    return 1.0 - d / 2.0 if metric == "cosine" else d


def true_scores(x: np.ndarray, q: np.ndarray, ids: np.ndarray, metric: str) -> np.ndarray:
    """Exact scores of returned ids (compressed indexes return approximate ones)."""
    v = x[np.maximum(ids, 0)]
    if metric in ("l2", "cosine"):
        return ((v - q[:, None, :]) ** 2).sum(-1)
    return np.einsum("qkd,qd->qk", v, q)


def ground_truth(x: np.ndarray, queries: np.ndarray, k: int, metric: str, block: int = 65_536) -> np.ndarray:
    """Exact k-NN scores of QUERIES over X, streamed block by block (faiss.contrib's
    ``knn_ground_truth``: memory is one block, whatever the size of X)."""
    _faiss()
    from faiss.contrib.exhaustive_search import knn_ground_truth

    blocks = (x[i:i + block] for i in range(0, len(x), block))
    d, _ = knn_ground_truth(queries, blocks, k, metric_type=_faiss_metric(metric), ngpu=index_gpu.gpu_count())
    return np.asarray(d, dtype=np.float32)


def tie_aware_recall(exact_scores: np.ndarray, found_scores: np.ndarray, found_ids: np.ndarray,
                     higher_is_better: bool, k: int, tol: float = 1e-5) -> float:
    """A hit is any returned item whose exact score is at least as good as the exact k-th
    neighbour's (so ties at the boundary never count as misses). Hand-written rather than
    faiss.contrib.evaluation's id-intersection measures: clustered and duplicated data have many
    exact ties, which id intersection counts as misses (recall 0.9x for an exact index)."""
    kth = exact_scores[:, k - 1:k]
    margin = tol * np.maximum(1.0, np.abs(kth))
    valid = found_ids[:, :k] >= 0
    good = found_scores[:, :k] >= kth - margin if higher_is_better else found_scores[:, :k] <= kth + margin
    return float(np.minimum((good & valid).sum(1), k).mean() / k)


def _set_param(index: Any, name: str | None, value: int | None) -> None:
    if name is None or value is None:
        return
    faiss = _faiss()
    faiss.ParameterSpace().set_index_parameter(index, name, value)


def _param_name(index: Any) -> tuple[str | None, list[int]]:
    faiss = _faiss()
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    if isinstance(inner, faiss.IndexHNSW):
        return "efSearch", [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024]
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is not None:
        values = [v for v in (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512,
                              768, 1024, 2048, 4096) if v <= ivf.nlist]
        return "nprobe", values or [1]
    return None, []


class Searcher:
    """FAISS search, plus exact re-ranking of the candidates when the index is compressed.

    PQ codes cap recall (0.92 at 100k x 512 in our benchmark, whatever nprobe); re-scoring
    RERANK_FACTOR x k candidates against float16 copies of the vectors, memory-mapped from disk
    (row = FAISS id), lifts it past the target without holding the raw vectors in RAM."""

    def __init__(self, index: Any, metric: str, vectors: np.ndarray | None = None) -> None:
        self.index, self.metric, self.vectors = index, metric, vectors

    def search(self, q: np.ndarray, k: int, params: Any = None) -> tuple[np.ndarray, np.ndarray]:
        if self.vectors is None:
            return self.index.search(q, k, params=params) if params else self.index.search(q, k)
        kk = min(k * RERANK_FACTOR, self.index.ntotal)
        _, ids = self.index.search(q, kk, params=params) if params else self.index.search(q, kk)
        if not (ids >= 0).any():  # e.g. a filter that no candidate passed
            none = np.full((len(q), k), -1, dtype=np.int64)
            return np.full((len(q), k), -np.inf if self.metric == "ip" else np.inf, np.float32), none
        d = np.empty(ids.shape, np.float32)
        for s in range(0, len(q), RERANK_CHUNK):  # bounded temporaries, whatever the query batch
            part = ids[s:s + RERANK_CHUNK]
            rows = np.sort(np.unique(part[part >= 0]))  # sorted reads from the memory map
            if len(rows) == 0:  # no query of this chunk has a candidate (a selective filter)
                d[s:s + len(part)] = 0.0  # masked to ±inf below
                continue
            v = np.asarray(self.vectors[rows], dtype=np.float32)[np.searchsorted(rows, np.maximum(part, 0))]
            qs = q[s:s + RERANK_CHUNK]
            if self.metric == "ip":
                d[s:s + len(part)] = np.einsum("qkd,qd->qk", v, qs)
            else:  # l2, and cosine as L2 on unit vectors
                v -= qs[:, None, :]
                d[s:s + len(part)] = np.einsum("qkd,qkd->qk", v, v)
        if self.metric == "ip":
            d[ids < 0] = -np.inf
            order = np.argsort(-d, axis=1)[:, :k]
        else:
            d[ids < 0] = np.inf
            order = np.argsort(d, axis=1)[:, :k]
        return np.take_along_axis(d, order, 1), np.take_along_axis(ids, order, 1)


def _qps(searcher: Searcher, q: np.ndarray, k: int) -> float:
    t0 = time.perf_counter()
    searcher.search(q, k)
    return len(q) / max(time.perf_counter() - t0, 1e-9)


def measure_and_tune(searcher: Searcher, x: np.ndarray, rest: np.ndarray, queries: np.ndarray, k: int,
                     target: float, metric: str) -> dict[str, Any]:
    """Recall@k against exact search on the same held-out queries; tune the search parameter to
    the cheapest value that reaches the target recall."""
    k = min(k, searcher.index.ntotal)
    if k == 0 or len(queries) == 0:
        return {"recall_at_10": None, "qps": None, "param": None, "value": None, "queries": 0}
    exact_scores = ground_truth(x[rest], queries, k, metric)
    return tune(searcher, queries, exact_scores, k, target, metric,
                scores_of=lambda ids: true_scores(x, queries, ids, metric))


def tune(searcher: Searcher, queries: np.ndarray, exact_scores: np.ndarray | None, k: int, target: float,
         metric: str, scores_of: Any = None, tol: float = 1e-5) -> dict[str, Any]:
    """The sweep behind ``measure_and_tune``, given the exact k-NN scores. ``scores_of(ids)`` gives
    the exact scores of returned ids; without it the searcher's own scores are taken (exact for
    IVF-Flat codes; float16-exact after re-ranking, hence TOL)."""
    index = searcher.index
    k = min(k, index.ntotal)
    if k == 0 or len(queries) == 0 or exact_scores is None:
        return {"recall_at_10": None, "qps": None, "param": None, "value": None, "queries": 0}
    exact_scores = exact_scores[:, :k]
    higher_is_better = metric == "ip"
    name, values = _param_name(index)
    tried: list[dict[str, Any]] = []
    chosen: dict[str, Any] | None = None
    candidates: list[int | None] = list(values) if values else [None]
    for v in candidates:
        _set_param(index, name, v)
        found, ids = searcher.search(queries, k)
        scores = scores_of(ids) if scores_of is not None else found
        recall = tie_aware_recall(exact_scores, scores, ids, higher_is_better, k, tol)
        tried.append({"value": v, "recall": round(recall, 4)})
        if recall >= target:
            chosen = {"value": v, "recall": recall}
            break
    if chosen is None:  # target unreachable: keep the best recall seen
        best = max(tried, key=lambda t: t["recall"])
        chosen = {"value": best["value"], "recall": best["recall"]}
        log.warning("target recall %.2f not reached; best %.3f at %s=%s", target, best["recall"],
                    name, best["value"])
    _set_param(index, name, chosen["value"])
    out = {"recall_at_10": round(float(chosen["recall"]), 4), "k": k, "param": name,
           "value": chosen["value"], "qps": round(_qps(searcher, queries, k), 1),
           "queries": len(queries), "target": target, "sweep": tried,
           "rerank": None if searcher.vectors is None else RERANK_FACTOR}
    if len(queries) < MIN_RECALL_QUERIES:  # a figure from a handful of queries is no measurement
        out["recall_at_10"] = None
        out["not_measured"] = (f"{len(queries)} held-out {'query' if len(queries) == 1 else 'queries'} "
                               f"(10 % of the store); {MIN_RECALL_QUERIES} are needed to measure recall")
    return out


def _exact(x: np.ndarray, metric: str) -> Any:
    faiss = _faiss()
    flat = faiss.IndexFlat(x.shape[1], _faiss_metric(metric))
    flat.add(x)
    return flat


def build(store_path: str, name: str, options: BuildOptions = BuildOptions(),
          index_home: str | None = None) -> dict[str, Any]:
    _faiss()  # a clear error before any work when FAISS is missing
    if options.metric not in METRICS:
        raise IndexError_(f"unknown metric {options.metric!r}; valid: {', '.join(METRICS)}")
    target = gens.index_dir(name, index_home)
    store = Store.open(store_path)
    n = store.count()
    if n == 0:
        raise IndexError_(f"{store_path} holds no vectors to index")
    budget = options.memory_budget or default_budget()
    if options.engine not in ENGINES:
        raise IndexError_(f"unknown engine {options.engine!r}; valid: {', '.join(ENGINES)}")
    p = plan(n, store.dim, options.kind, budget, options.coarse, options.opq)
    # IVF over budget (or asked): streamed, lists on disk; otherwise the store is read whole
    on_disk = options.on_disk or options.engine == "ray"
    streamed = p.kind in ("ivf", "ivfpq") and (on_disk or n * store.dim * 4 > budget)
    if on_disk and not streamed:
        why = "--engine ray builds" if options.engine == "ray" else "--on-disk needs"
        raise IndexError_(f"{why} an IVF index with lists on disk (--kind ivf or ivfpq); "
                          f"{p.kind!r} lives in memory")
    if gens.exists(target):
        raise IndexError_(f"index {name!r} already exists in {target.parent}; "
                          f"`embedder index drop {name}` first or pick another --name")
    with gens.writer(target):
        if gens.exists(target):
            raise IndexError_(f"index {name!r} was just built by another process")
        try:
            if streamed:
                return _build_streamed(store, store_path, name, target, p, options, budget)
            table = store.read(["id", "path", "label", "embedding"])
            return _build(store, store_path, name, target, table, options, p)
        finally:
            if not gens.exists(target):  # a failed first build leaves no empty folder behind
                shutil.rmtree(target, ignore_errors=True)


def _build_streamed(store: Store, store_path: str, name: str, target: Path, p: Plan, options: BuildOptions,
                    budget: int) -> dict[str, Any]:
    """IVF larger than RAM: see embedder.index.ondisk. Tuned like the in-memory build, against exact
    ground truth streamed over the store."""
    from embedder.index import ondisk as big

    faiss = _faiss()
    t0 = time.perf_counter()
    tmpdir = gens.staging(target)
    parallel = None
    if options.engine == "ray":
        from embedder.embed.ray import RayOptions
        from embedder.index import ray as index_ray

        parallel = index_ray.parallel(RayOptions(address=options.address), _faiss_metric(options.metric))
    r = big.build_streamed(store, tmpdir, p.factory, options.metric, p.train_size, budget, options.queries,
                           options.seed, _faiss_metric(options.metric), lambda v: _prepare(v, options.metric),
                           parallel)
    index = r["index"]
    vectors = np.load(tmpdir / VECTORS_FILE, mmap_mode="r")
    rerank = p.kind == "ivfpq"
    searcher = Searcher(index, options.metric, vectors if rerank else None)
    quality = tune(searcher, r["queries"], r["exact"], 10, options.target_recall, options.metric,
                   tol=1e-3 if rerank else 1e-5)  # re-ranked scores come from float16 copies
    del searcher, index
    index = r["finish"]()  # the final lists, held-out queries included
    _set_param(index, quality.get("param"), quality.get("value"))
    big.point_lists_at(index, target / f"gen-{gens.next_generation(target):06d}" / big.LISTS_FILE)
    faiss.write_index(index, str(tmpdir / INDEX_FILE))
    del vectors
    meta = {
        "name": name, "store": storage.resolve(store_path),
        "provenance": store.provenance.to_dict(), "kind": p.kind, "factory": p.factory,
        "reason": p.reason + "; streamed build, inverted lists on disk"
                  + ("; adds as Ray tasks" if options.engine == "ray" else ""),
        "metric": options.metric, "dim": r["dim"], "count": int(index.ntotal), "next_id": r["n"],
        "build_seconds": round(time.perf_counter() - t0, 3), "memory_budget": budget,
        "trained_on": r["trained_on"],
        "index_bytes": (tmpdir / INDEX_FILE).stat().st_size + (tmpdir / big.LISTS_FILE).stat().st_size,
        "on_disk": {"lists": big.LISTS_FILE, "trained": big.TRAINED_FILE, "slices": r["slices"],
                    "slice_rows": r["slice_rows"], "train_rows": r["train_rows"]},
        "id_map": big.IDS_ARROW, "vectors": VECTORS_FILE,
        "rerank": None if not rerank else {"file": VECTORS_FILE, "factor": RERANK_FACTOR,
                                           "dtype": "float16", "memory_mapped": True},
        "built_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "quality": quality, "search": {"param": quality.get("param"), "value": quality.get("value")},
    }
    return _commit(target, tmpdir, meta)


def _build(store: Store, store_path: str, name: str, target: Path, table: pa.Table,
           options: BuildOptions, p: Plan) -> dict[str, Any]:
    faiss = _faiss()
    n, dim = table.num_rows, store.dim
    x = _prepare(arrow_to_embeddings(table.column("embedding")), options.metric)
    budget = options.memory_budget or default_budget()
    t0 = time.perf_counter()
    try:
        base = faiss.index_factory(dim, p.factory, _faiss_metric(options.metric))
    except RuntimeError as e:
        raise IndexError_(f"FAISS cannot build {p.factory!r}: {str(e).splitlines()[-1]}") from None
    index = base if faiss.try_extract_index_ivf(base) is not None else faiss.IndexIDMap2(base)

    rng = np.random.default_rng(options.seed)
    order = rng.permutation(n)
    nq = min(options.queries, max(1, n // 10)) if n > 1 else 0
    held, rest = order[:nq], order[nq:]
    trained_on = None
    if not index.is_trained:
        # A random sample, never the first rows (which are often one class or one folder).
        sample = x[rng.choice(rest, size=min(len(rest), max(p.train_size, 1)), replace=False)]
        try:
            trained_on = index_gpu.train(index, sample)
        except RuntimeError as e:
            raise IndexError_(f"training {p.factory} failed ({str(e).splitlines()[-1]}); "
                              "too few vectors for this kind? try --kind flat") from None
    if faiss.try_extract_index_ivf(base) is not None:
        from embedder.index.ondisk import QUANTIZER_EF_ADD, set_quantizer_ef

        set_quantizer_ef(base, QUANTIZER_EF_ADD)
    faiss_ids = np.arange(n, dtype=np.int64)
    index.add_with_ids(x[rest], faiss_ids[rest])
    if faiss.try_extract_index_ivf(base) is not None:
        from embedder.index.ondisk import set_quantizer_ef

        set_quantizer_ef(base)  # searched from here on (the held-out rows' adds are few)
    vectors = x.astype(np.float16) if p.kind == "ivfpq" else None
    # While tuning, only indexed rows may be candidates: the held-out ones are not in FAISS yet.
    quality = measure_and_tune(Searcher(index, options.metric, vectors), x, rest, x[held], 10,
                               options.target_recall, options.metric)
    if nq:
        index.add_with_ids(x[held], faiss_ids[held])
    build_seconds = time.perf_counter() - t0

    tmpdir = gens.staging(target)
    ids = pa.table({"faiss_id": pa.array(faiss_ids), "id": table.column("id"),
                    "path": table.column("path"), "label": table.column("label")})
    pq.write_table(ids, tmpdir / IDS_FILE)
    faiss.write_index(index, str(tmpdir / INDEX_FILE))
    if vectors is not None:
        np.save(tmpdir / VECTORS_FILE, vectors)
    meta = {
        "name": name, "store": storage.resolve(store_path),
        "provenance": store.provenance.to_dict(), "kind": p.kind, "factory": p.factory, "reason": p.reason,
        "metric": options.metric, "dim": dim, "count": int(index.ntotal), "next_id": n,
        "build_seconds": round(build_seconds, 3), "memory_budget": budget, "trained_on": trained_on,
        "index_bytes": (tmpdir / INDEX_FILE).stat().st_size,
        "rerank": None if vectors is None else {"file": VECTORS_FILE, "factor": RERANK_FACTOR,
                                                 "dtype": "float16", "memory_mapped": True},
        "built_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "quality": quality, "search": {"param": quality.get("param"), "value": quality.get("value")},
    }
    return _commit(target, tmpdir, meta)


def _commit(target: Path, tmpdir: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """index.json goes in last; then the staged folder becomes the current generation."""
    meta["generation"] = gens.next_generation(target)
    meta["build_id"] = uuid.uuid4().hex  # never reused: see generations.identity
    (tmpdir / META_FILE).write_text(json.dumps(meta, indent=2))
    gens.commit(target, tmpdir)
    return meta


class LoadedIndex:
    """An index ready to search: FAISS object, id map and metadata."""

    def __init__(self, name: str, index_home: str | None = None) -> None:
        for attempt in range(3):  # a writer may retire the generation while we open it
            try:
                self._open(name, index_home)
                return
            except FileNotFoundError:
                if attempt == 2:
                    raise IndexError_(f"index {name!r} kept changing while being opened; try again") from None

    def _open(self, name: str, index_home: str | None) -> None:
        faiss = _faiss()
        self.dir = locate(name, index_home)
        self.meta = _read_meta(self.dir, name)
        if not (self.dir / INDEX_FILE).is_file():
            raise FileNotFoundError(self.dir / INDEX_FILE)
        on_disk = bool(self.meta.get("on_disk"))
        try:
            deltas = self.meta.get("deltas") or []  # on-disk adds not merged yet (bigindex: delta slices)
            self._keepalive: list[Any] = []
            if on_disk:
                from embedder.index.ondisk import TRAINED_FILE as big_trained
                from embedder.index.ondisk import read_ondisk, stack_deltas

                if deltas:  # searched with the lists as one set of inverted lists
                    self.index, self._keepalive = stack_deltas(
                        str(self.dir / INDEX_FILE), str(self.dir / big_trained),
                        [str(self.dir / x["index"]) for x in deltas])
                else:
                    self.index = read_ondisk(str(self.dir / INDEX_FILE))  # lists memory-mapped from disk
            else:
                self.index = faiss.read_index(str(self.dir / INDEX_FILE))
            id_map = self.meta.get("id_map", IDS_FILE)
            if id_map == IDS_FILE:
                self.ids = pq.read_table(self.dir / IDS_FILE)
            else:  # Arrow IPC files, memory-mapped: the id map of a huge index is not read into RAM
                self.ids = pa.concat_tables([pa.ipc.open_file(pa.memory_map(str(self.dir / f))).read_all()
                                             for f in [id_map, *(x["ids"] for x in deltas)]])
        except FileNotFoundError:
            raise  # a writer retired this generation while we opened it: the caller tries again
        except (RuntimeError, OSError, pa.ArrowInvalid) as e:
            raise IndexError_(f"index {name!r} is corrupt or unreadable ({str(e).splitlines()[0]}); "
                              f"rebuild it with `embedder index drop {name}` then `index build`") from None
        if self.index.ntotal != self.ids.num_rows or self.index.d != self.meta["dim"]:
            raise IndexError_(f"index {name!r} is inconsistent: {self.index.ntotal} vectors, "
                              f"{self.ids.num_rows} ids; rebuild it")
        search = self.meta.get("search", {})
        _set_param(self.index, search.get("param"), search.get("value"))
        vectors = None
        if self.meta.get("rerank") or self.meta.get("vectors"):
            try:
                vectors = np.load(self.dir / VECTORS_FILE, mmap_mode="r")
                if deltas:
                    from embedder.index.ondisk import RowStack

                    vectors = RowStack([vectors, *(np.load(self.dir / x["vectors"], mmap_mode="r") for x in deltas)])
            except FileNotFoundError:
                raise
            except (OSError, ValueError) as e:
                raise IndexError_(f"index {name!r}: cannot map {VECTORS_FILE} ({e}); rebuild it") from None
            if vectors.shape != (int(self.meta["next_id"]), self.meta["dim"]):
                raise IndexError_(f"index {name!r}: {VECTORS_FILE} does not match the index; rebuild it")
        self.lookup_vectors = vectors  # float16 copies by FAISS id (memory-mapped), when the index has them
        self.searcher = Searcher(self.index, self.meta["metric"], vectors if self.meta.get("rerank") else None)
        self.name = name
        # FAISS id → id-map row: the identity for streamed builds (FAISS id = store row = map row);
        # otherwise vectorised through sorted ids + searchsorted, built once per load.
        self._identity = self.meta.get("id_map") == "ids.arrow"
        if not self._identity:
            fids = np.asarray(self.ids.column("faiss_id").to_numpy(), dtype=np.int64)
            self._order = np.argsort(fids, kind="stable")
            self._sorted_fids = fids[self._order]
        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is not None and self.lookup_vectors is None:
            # vectors by id (queries by id, exact fallback), set up at load, never mid-search; a hash
            # table because ids are not 0..n-1 in add order (held-out queries go in last)
            ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
        self._id_order: np.ndarray | None = None  # id-map rows in id order (row_of), made on first use
        self._id_chunks: np.ndarray | None = None
        self._filter_table: pa.Table | None = None  # id map + store columns, joined once
        self._filter_cols: list[str] | None = None
        self._filter_lock = threading.Lock()
        self.generation = int(self.meta.get("generation", 0))
        self.identity = gens.identity(self.dir)  # what a reload compares (numbers restart after a drop)

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @functools.cached_property
    def provenance(self) -> Provenance:  # parsed once per loaded index (the service asks per query)
        return Provenance.from_dict(self.meta["provenance"])

    @property
    def metric(self) -> str:
        return str(self.meta["metric"])

    def prepare(self, q: np.ndarray) -> np.ndarray:
        q = np.atleast_2d(np.asarray(q, dtype=np.float32))
        if q.shape[1] != self.dim:
            raise IndexError_(f"query vector has dim {q.shape[1]}, index {self.name!r} has dim {self.dim}")
        return _prepare(q, self.metric)

    def filter_table(self) -> pa.Table:
        """The id map joined with the store's other columns, read once per loaded index (a
        service filters on them per query without re-reading the store)."""
        with self._filter_lock:
            if self._filter_table is None:
                table = self.ids
                try:
                    store = Store.open(self.meta["store"])
                    cols = [c for c in store.dataset().schema.names
                            if c not in ("embedding", *table.column_names)]
                    if cols:
                        table = table.join(store.read(["id", *cols]), "id", join_type="left outer")
                except StoreError as e:  # the store moved away: filter on the id map alone
                    log.warning("index %s: store columns unavailable for filters (%s)", self.name, e)
                self._filter_table = table
            return self._filter_table

    def filter_columns(self) -> list[str]:
        """Columns a filter may name, without joining the store (its schema is enough); read once
        per loaded index (`GET /indexes/NAME` asks per request)."""
        if self._filter_cols is not None:
            return list(self._filter_cols)
        cols = [c for c in self.ids.column_names if c != "faiss_id"]
        try:
            store = Store.open(self.meta["store"])
            cols += [c for c in store.dataset().schema.names if c not in ("embedding", *cols)]
        except StoreError:
            pass
        self._filter_cols = cols
        return list(cols)

    def allowed_faiss_ids(self, where: dict[str, str]) -> np.ndarray:
        """FAISS ids whose store rows match every column=value condition."""
        table = self.ids
        if any(c not in table.column_names for c in where):
            table = self.filter_table()
        missing = [c for c in where if c not in table.column_names]
        if missing:
            valid = [c for c in table.column_names if c != "faiss_id"]
            raise IndexError_(f"cannot filter on {missing[0]!r}; columns: {', '.join(valid)}")
        mask = None
        for col, value in where.items():
            column = table.column(col)
            cond = pc.equal(pc.cast(column, pa.string()), value)
            mask = cond if mask is None else pc.and_(mask, cond)
        return np.asarray(table.filter(mask).column("faiss_id").to_numpy(), dtype=np.int64)

    def search(self, q: np.ndarray, k: int, where: dict[str, str] | None = None) -> list[list[dict[str, Any]]]:
        """k nearest per query. With ``where``, still k results whenever k rows match: the search
        parameter is widened for selective filters, and exact search over the matching rows is the
        last resort. Never silently fewer."""
        if k <= 0:
            raise IndexError_(f"k must be positive, got {k}")
        q = self.prepare(q)
        kk = min(k, self.index.ntotal)
        if not where:
            scores, ids = self.searcher.search(q, kk)
            return self._hits(scores, ids)
        faiss = _faiss()
        allowed = self.allowed_faiss_ids(where)
        need = min(kk, len(allowed))
        if need == 0:
            return [[] for _ in range(len(q))]
        sel = faiss.IDSelectorBatch(allowed)
        for scale in (1, 8, 64, 512):
            params = self._params_with(sel, scale, need)  # per call: concurrent searches share nothing
            try:
                scores, ids = self.searcher.search(q, need, params=params)
            except RuntimeError:  # this index type takes no selector: exact over the matches
                break
            if (ids >= 0).sum(1).min() >= need:
                return self._hits(scores, ids)
        return self._exact_among(q, allowed, need)

    def _vectors_of(self, fids: np.ndarray) -> np.ndarray:
        """Vectors for FAISS ids: the re-rank copies, the index itself, or the store on disk."""
        if self.lookup_vectors is not None:
            return np.asarray(self.lookup_vectors[np.sort(fids)], dtype=np.float32)[np.argsort(np.argsort(fids))]
        try:
            return np.asarray(self.index.reconstruct_batch(fids), dtype=np.float32)
        except RuntimeError:
            pass
        sub = self.ids.take(pa.array(self.rows_of(fids)))
        t = Store.open(self.meta["store"]).read(["id", "embedding"])
        pos = pc.index_in(sub.column("id"), value_set=t.column("id"))
        if pos.null_count:
            raise IndexError_(f"index {self.name!r}: some vectors are neither in the index nor in its "
                              "store; rebuild the index")
        x = arrow_to_embeddings(t.column("embedding").take(pos))
        return _prepare(x, self.metric)

    def _exact_among(self, q: np.ndarray, allowed: np.ndarray, k: int) -> list[list[dict[str, Any]]]:
        x = self._vectors_of(allowed)
        scores, pos = _exact(x, self.metric).search(q, k)
        return self._hits(scores, np.where(pos >= 0, allowed[np.maximum(pos, 0)], -1))

    def rows_of(self, fids: np.ndarray) -> np.ndarray:
        if self._identity:
            return np.asarray(fids, dtype=np.int64)
        return self._order[np.searchsorted(self._sorted_fids, fids)]  # type: ignore[no-any-return]

    def _hits(self, scores: np.ndarray, ids: np.ndarray) -> list[list[dict[str, Any]]]:
        """Only the hit rows of the id map are materialised, not the whole map per search."""
        valid = ids >= 0
        meta = self.ids.select(["id", "path", "label"]).take(pa.array(self.rows_of(ids[valid]))).to_pylist()
        it = iter(meta)
        out = []
        for qi in range(len(scores)):
            hits: list[dict[str, Any]] = []
            for s, ok in zip(_score(scores[qi], self.metric), valid[qi]):
                if ok:
                    hits.append({"rank": len(hits) + 1, "score": float(s), **next(it)})
            out.append(hits)
        return out

    def _params_with(self, sel: Any, scale: int, k: int) -> Any:
        faiss = _faiss()
        inner = faiss.downcast_index(self.index.index) if isinstance(self.index, faiss.IndexIDMap) else self.index
        value = int(self.meta.get("search", {}).get("value") or 1)
        ivf = faiss.try_extract_index_ivf(inner)
        if isinstance(inner, faiss.IndexHNSW):
            p = faiss.SearchParametersHNSW()
            p.efSearch = max(value * scale, k, 16)
        elif ivf is not None:
            p = faiss.SearchParametersIVF()
            p.nprobe = min(ivf.nlist, value * scale)
        else:
            p = faiss.SearchParameters()
        p.sel = sel  # the caller keeps sel alive while p is in use (FAISS holds a raw pointer)
        return p

    def row_of(self, store_id: str) -> int | None:
        """The id map's row of STORE_ID, or None: a binary search over the ids in sorted order (the
        order computed once per loaded generation, 4-8 bytes a row; the id map itself may be
        memory-mapped), never a scan of the whole map per request."""
        with self._filter_lock:
            if self._id_order is None:
                column = self.ids.column("id")
                order = pc.sort_indices(column).to_numpy()
                self._id_order = order.astype(np.int32) if len(order) < 2**31 else order
                self._id_chunks = np.cumsum([0, *(len(c) for c in column.chunks)])
            order, starts = cast(np.ndarray, self._id_order), cast(np.ndarray, self._id_chunks)
        chunks = self.ids.column("id").chunks

        def at(i: int) -> str:
            row = int(order[i])
            c = int(np.searchsorted(starts, row, side="right")) - 1
            return str(chunks[c][row - int(starts[c])].as_py())

        lo, hi = 0, len(order)
        while lo < hi:
            mid = (lo + hi) // 2
            if at(mid) < store_id:
                lo = mid + 1
            else:
                hi = mid
        return int(order[lo]) if lo < len(order) and at(lo) == store_id else None

    def item(self, store_id: str) -> dict[str, Any]:
        """The id map's row of STORE_ID (faiss_id, id, path, label)."""
        row = self.row_of(store_id)
        if row is None:
            raise IndexError_(f"id {shown(store_id)} is not in index {self.name!r}")
        return dict(self.ids.slice(row, 1).to_pylist()[0])

    def vector_of(self, store_id: str) -> np.ndarray:
        fid = self.item(store_id)["faiss_id"]
        return self._vectors_of(np.array([fid], dtype=np.int64))


def add(name: str, store_path: str, index_home: str | None = None, merge: bool = False) -> dict[str, int]:
    """Add a store's rows that the index does not hold yet (ids already present are skipped), as a
    new generation: readers keep the old one until the switch; one writer at a time."""
    d = gens.index_dir(name, index_home)
    locate(name, index_home)
    with gens.writer(d):
        loaded = LoadedIndex(name, index_home)
        if loaded.meta.get("on_disk"):
            from embedder.index.ondisk import add_streamed

            return add_streamed(loaded, d, store_path, merge)
        store = Store.open(store_path)
        loaded.provenance.require(store.provenance, store=False, what=f"index {name!r} holds vectors",
                                  fix=f"{store_path} was embedded differently; build a new index for it")
        table = store.read(["id", "path", "label", "embedding"])
        present = set(loaded.ids.column("id").to_pylist())
        mask = pa.array([i not in present for i in table.column("id").to_pylist()])
        new = table.filter(mask)
        if new.num_rows:
            _add_generation(loaded, d, new)
        return {"added": new.num_rows, "skipped": table.num_rows - new.num_rows,
                "count": int(loaded.index.ntotal)}


def _add_generation(loaded: LoadedIndex, d: Path, new: pa.Table) -> None:
    faiss = _faiss()
    x = _prepare(arrow_to_embeddings(new.column("embedding")), loaded.metric)
    start = int(loaded.meta["next_id"])
    fids = np.arange(start, start + new.num_rows, dtype=np.int64)
    loaded.index.add_with_ids(x, fids)
    ids = pa.concat_tables([loaded.ids, pa.table({
        "faiss_id": pa.array(fids), "id": new.column("id"), "path": new.column("path"),
        "label": new.column("label")}).cast(loaded.ids.schema)])
    tmpdir = gens.staging(d)
    if loaded.searcher.vectors is not None:
        grown = np.lib.format.open_memmap(tmpdir / VECTORS_FILE, mode="w+", dtype=np.float16,
                                          shape=(start + new.num_rows, loaded.dim))
        grown[:start] = loaded.searcher.vectors
        grown[start:] = x.astype(np.float16)
        grown.flush()
        del grown
    faiss.write_index(loaded.index, str(tmpdir / INDEX_FILE))
    pq.write_table(ids, tmpdir / IDS_FILE)
    meta = {**loaded.meta, "count": int(loaded.index.ntotal), "next_id": start + new.num_rows,
            "index_bytes": (tmpdir / INDEX_FILE).stat().st_size}
    _commit(d, tmpdir, meta)

"""Measured quality: exact ground truth, tie-aware recall, and the search parameter tuned to a recall
target on held-out queries."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from embedder.index import gpu as index_gpu
from embedder.index.faiss_util import faiss_metric, import_faiss, search_param, set_search_param
from embedder.index.plan import RERANK_FACTOR

log = logging.getLogger(__name__)

MIN_RECALL_QUERIES = 50  # fewer held-out queries: recall is reported as not measured


RERANK_CHUNK = 32  # queries re-ranked at a time (bounded temporaries)


def true_scores(x: np.ndarray, q: np.ndarray, ids: np.ndarray, metric: str) -> np.ndarray:
    """Exact scores of returned ids (compressed indexes return approximate ones)."""
    v = x[np.maximum(ids, 0)]
    if metric in ("l2", "cosine"):
        return ((v - q[:, None, :]) ** 2).sum(-1)
    return np.einsum("qkd,qd->qk", v, q)


def ground_truth(x: np.ndarray, queries: np.ndarray, k: int, metric: str, block: int = 65_536) -> np.ndarray:
    """Exact k-NN scores of QUERIES over X, streamed block by block (faiss.contrib's
    ``knn_ground_truth``: memory is one block, whatever the size of X)."""
    import_faiss()
    from faiss.contrib.exhaustive_search import knn_ground_truth

    blocks = (x[i:i + block] for i in range(0, len(x), block))
    d, _ = knn_ground_truth(queries, blocks, k, metric_type=faiss_metric(metric), ngpu=index_gpu.gpu_count())
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


def is_exact(index: Any) -> bool:
    """A flat (brute-force, float32) index: every search is exact."""
    faiss = import_faiss()
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    return isinstance(inner, faiss.IndexFlat)


def _unmeasured(index: Any, k: int) -> dict[str, Any]:
    """No held-out query to measure with: a flat index is still exact."""
    exact = is_exact(index)
    return {"recall_at_10": 1.0 if exact else None, "qps": None, "param": None, "value": None, "queries": 0,
            "k": k, **({"exact": True} if exact else {})}


def measure_and_tune(searcher: Searcher, x: np.ndarray, rest: np.ndarray, queries: np.ndarray, k: int,
                     target: float, metric: str) -> dict[str, Any]:
    """Recall@k against exact search on the same held-out queries; tune the search parameter to
    the cheapest value that reaches the target recall."""
    k = min(k, searcher.index.ntotal)
    if k == 0 or len(queries) == 0:
        return _unmeasured(searcher.index, k)
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
        return _unmeasured(index, k)
    exact_scores = exact_scores[:, :k]
    higher_is_better = metric == "ip"
    name, values = search_param(index)
    tried: list[dict[str, Any]] = []
    chosen: dict[str, Any] | None = None
    candidates: list[int | None] = list(values) if values else [None]
    for v in candidates:
        set_search_param(index, name, v)
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
    set_search_param(index, name, chosen["value"])
    out = {"recall_at_10": round(float(chosen["recall"]), 4), "k": k, "param": name,
           "value": chosen["value"], "qps": round(_qps(searcher, queries, k), 1),
           "queries": len(queries), "target": target, "sweep": tried,
           "rerank": None if searcher.vectors is None else RERANK_FACTOR}
    if is_exact(index):  # recall is 1 by construction: no sample size makes it more or less true
        out["recall_at_10"], out["exact"] = 1.0, True
    elif len(queries) < MIN_RECALL_QUERIES:  # a figure from a handful of queries is no measurement
        out["recall_at_10"] = None
        out["not_measured"] = (f"{len(queries)} held-out {'query' if len(queries) == 1 else 'queries'} "
                               f"(10 % of the store); {MIN_RECALL_QUERIES} are needed to measure recall")
    return out

"""Images far from all others: mean cosine distance to the k nearest neighbours, flagged beyond
Q3 + 1.7 · IQR of that distance over the store (Tukey's fence, widened as in the literature on
kNN outlier scores for heavy right tails)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from embedder.analysis.knn import KnnGraph
from embedder.analysis.options import FENCE


@dataclass
class Outliers:
    rows: np.ndarray  # flagged rows, most isolated first
    score: np.ndarray  # [n] mean kNN cosine distance of every row
    fence: float


def knn_distance(nbrs: np.ndarray, sims: np.ndarray) -> np.ndarray:
    """Each row's mean cosine distance to its neighbours (-1 in NBRS: none there)."""
    valid = nbrs >= 0
    return np.where(valid, 1.0 - sims, 0.0).sum(1) / np.maximum(valid.sum(1), 1)


def outliers(graph: KnnGraph, fence: float = FENCE) -> Outliers:
    dist = knn_distance(graph.nbrs, graph.sims)
    if len(dist) < 4:
        return Outliers(np.zeros(0, np.int64), dist, float("inf"))
    q1, q3 = np.percentile(dist, [25, 75])
    cut = float(q3 + fence * (q3 - q1))
    rows = np.flatnonzero(dist > cut)
    return Outliers(rows[np.argsort(-dist[rows])], dist, cut)

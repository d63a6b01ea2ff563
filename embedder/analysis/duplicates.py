"""Near-duplicate groups within a store (from the shared kNN graph) and train/test leakage."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from embedder.analysis.knn import KnnGraph, nearest_in


@dataclass
class DuplicateGroup:
    rows: np.ndarray  # row numbers, in store order
    similarity: float  # the weakest link that joins the group (cosine)


@dataclass
class Leak:
    test_row: int
    train_row: int
    similarity: float


def duplicate_groups(graph: KnnGraph, threshold: float) -> list[DuplicateGroup]:
    """Connected components of the graph's edges at cosine ≥ threshold, largest first.

    A group larger than k + 1 is still found whole: its members link through each other."""
    n = len(graph.nbrs)
    mask = (graph.sims >= threshold) & (graph.nbrs >= 0)
    return groups_from_edges(np.repeat(np.arange(n), mask.sum(1)), graph.nbrs[mask], graph.sims[mask])


def groups_from_edges(a: np.ndarray, b: np.ndarray, s: np.ndarray) -> list[DuplicateGroup]:
    """Groups joined by the edges (row A[i], row B[i], cosine S[i]), largest first: a disjoint set
    over the rows that have an edge only (memory grows with the duplicates, not with the store)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if not len(a):
        return []
    nodes, inv = np.unique(np.concatenate([a, b]), return_inverse=True)
    r, c = inv[:len(a)], inv[len(a):]
    m = len(nodes)
    adj = coo_matrix((np.ones(len(r), np.int8), (r, c)), shape=(m, m))
    _, comp = connected_components(adj, directed=True, connection="weak")
    sizes = np.bincount(comp)
    weakest = np.full(len(sizes), np.inf)
    np.minimum.at(weakest, comp[r], s)
    # rows of each component in one sort (a scan per group would be O(rows x groups))
    order = np.argsort(comp, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    groups = [DuplicateGroup(np.sort(nodes[order[bounds[g]:bounds[g + 1]]]), float(weakest[g]))
              for g in np.flatnonzero(sizes > 1)]
    groups.sort(key=lambda g: (-len(g.rows), -g.similarity, int(g.rows[0])))
    return groups


def leaks(train_x: np.ndarray, test_x: np.ndarray, threshold: float) -> list[Leak]:
    """Test rows whose nearest train row is a near-duplicate (exact search), most similar first."""
    sims, nbrs = nearest_in(train_x, test_x, 1)
    if sims.shape[1] == 0:
        return []
    hit = np.flatnonzero(sims[:, 0] >= threshold)
    out = [Leak(int(i), int(nbrs[i, 0]), float(sims[i, 0])) for i in hit]
    out.sort(key=lambda lk: -lk.similarity)
    return out

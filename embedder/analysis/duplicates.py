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


@dataclass(frozen=True)
class GroupArrays:
    """Duplicate groups as flat arrays, no object per group (a store of 10^8 rows may hold millions
    of groups): group g's rows, in store order, are ``rows[offsets[g]:offsets[g + 1]]``, joined at
    ``similarity[g]`` at weakest; largest first, then the most similar, then by first row."""

    rows: np.ndarray  # int64
    offsets: np.ndarray  # int64, len(groups) + 1
    similarity: np.ndarray  # float64

    def __len__(self) -> int:
        return len(self.similarity)

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    def by_first_row(self) -> GroupArrays:
        """The same groups, numbered in the order of their first row."""
        order = np.argsort(self.rows[self.offsets[:-1]], kind="stable")
        sizes = self.sizes[order]
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        starts = np.repeat(self.offsets[:-1][order], sizes)
        within = np.arange(len(self.rows)) - np.repeat(offsets[:-1], sizes)
        return GroupArrays(self.rows[starts + within], offsets, self.similarity[order])


def group_arrays(a: np.ndarray, b: np.ndarray, s: np.ndarray) -> GroupArrays:
    """Groups joined by the edges (row A[i], row B[i], cosine S[i]): a disjoint set over the rows
    that have an edge only (memory grows with the duplicates, not with the store), in numpy."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if not len(a):
        return GroupArrays(np.zeros(0, np.int64), np.zeros(1, np.int64), np.zeros(0, np.float64))
    nodes, inv = np.unique(np.concatenate([a, b]), return_inverse=True)
    r, c = inv[:len(a)], inv[len(a):]
    m = len(nodes)
    adj = coo_matrix((np.ones(len(r), np.int8), (r, c)), shape=(m, m))
    _, comp = connected_components(adj, directed=True, connection="weak")
    sizes = np.bincount(comp)
    weakest = np.full(len(sizes), np.inf)
    np.minimum.at(weakest, comp[r], s)
    first = np.full(len(sizes), np.iinfo(np.int64).max)
    np.minimum.at(first, comp, nodes)
    cand = np.flatnonzero(sizes > 1)
    ranked = cand[np.lexsort((first[cand], -weakest[cand], -sizes[cand]))]
    rank_of = np.full(len(sizes), -1, np.int64)
    rank_of[ranked] = np.arange(len(ranked))
    sel = np.flatnonzero(rank_of[comp] >= 0)
    sel = sel[np.lexsort((nodes[sel], rank_of[comp[sel]]))]
    offsets = np.concatenate([[0], np.cumsum(sizes[ranked])]).astype(np.int64)
    return GroupArrays(nodes[sel].astype(np.int64), offsets, weakest[ranked].astype(np.float64))


def groups_from_edges(a: np.ndarray, b: np.ndarray, s: np.ndarray) -> list[DuplicateGroup]:
    """``group_arrays`` as one DuplicateGroup per group (the in-memory path), largest first."""
    g = group_arrays(a, b, s)
    return [DuplicateGroup(g.rows[g.offsets[i]:g.offsets[i + 1]], float(g.similarity[i])) for i in range(len(g))]


def leaks(train_x: np.ndarray, test_x: np.ndarray, threshold: float) -> list[Leak]:
    """Test rows whose nearest train row is a near-duplicate (exact search), most similar first."""
    sims, nbrs = nearest_in(train_x, test_x, 1)
    if sims.shape[1] == 0:
        return []
    hit = np.flatnonzero(sims[:, 0] >= threshold)
    out = [Leak(int(i), int(nbrs[i, 0]), float(sims[i, 0])) for i in hit]
    out.sort(key=lambda lk: -lk.similarity)
    return out

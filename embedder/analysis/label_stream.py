"""Label errors and class overlap from a cross-validated probe in memory that does not grow with the
rows: the probe is fitted on a sample, and its out-of-sample probabilities are computed and consumed
one batch at a time, in two passes over the labelled rows (cleanlab's streamed confident learning).

- The probe: C and standardisation chosen once (``labels.choose_c``, on at most ``select_rows``
  rows of the sample), the sample dealt into K stratified folds, the K fold heads solved together
  (``selection.fold_heads``) on the sample (at most ``LabelOptions.sample_rows`` rows, the only
  vectors ever held). A sample row is predicted by its own fold's head (which never saw it), every
  other row by the mean of the K heads' probabilities (none of which saw it): every probability is
  out of sample. With the whole set as the sample this is ``labels.cross_validate`` exactly.
- Pass 1 (``add_thresholds``): per-class sums and counts of p(given) → thresholds t_j = mean p_j
  over the rows labelled j.
- Pass 2 (``add``): the confident joint and the confusion matrix (classes² counts), and the
  disagreement rows (out-of-sample prediction ≠ label: store row, given, suggested, p(given),
  p(suggested)), at most ``LabelOptions.max_listed`` of them kept — the lowest self-confidence,
  ties by store row (trimmed with ``np.partition`` whenever the buffer doubles; the kept set is the
  same whatever the batches' sizes and order). Every disagreement is counted.

Confident learning, prune by noise rate (``labels.confident_learning``), as streamed: the calibrated
joint comes from the streamed counts, exactly. The paper then flags, in each off-diagonal cell
(i, j), its estimated count m of the rows labelled i with the largest margin p(j) − p(i) among ALL
rows labelled i (whatever their most probable class), and keeps only those whose most probable
class is not i. A stream cannot rank every row against every class (that is the N × classes matrix),
so here a kept disagreement row competes in one cell only: (given i, the class that counted it in
the confident joint), or (i, its argmax) when that class is i or none (``result(cell="argmax")``:
always its argmax); the cell's top m by margin p(j) − p(i) are flagged. Differences: a row may take
one of several cells' slots in the paper, one cell's here; a cell with fewer than m disagreement
rows flags them all here, while the paper may spend slots on rows whose argmax is i and then drops
them; rows trimmed off the bounded list (the most self-confident disagreements) cannot be flagged.
Measured with planted flips against the exact version, the sample = every row
(scripts/bench_label_stream.py; /tmp/issue35/labels-bench.md): the likely sets' Jaccard is
0.92-1.0 on digits pixels and 0.96-0.99 on a 10^5 x 128, 100-class mixture, precision within 0.02
and recall 0-0.035 lower (the "confident" and "argmax" cells gave identical sets on both); the
*possible* tier (every disagreement, ranked by self-confidence), the
accuracy and the class overlaps are identical. With a 20 % sample the probe is weaker where the
data is small (digits: 359 training rows, top-N precision 0.83-0.88 against 0.89-0.95), and close
at 10^5 (top-N 0.994 against 0.996).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from embedder.analysis.labels import LabelIssues, Overlap, choose_c
from embedder.analysis.options import LabelOptions
from embedder.errors import ProbeError
from embedder.learn.probe import select_options
from embedder.learn.selection import fold_heads, stratified_folds

CHUNK = 65_536  # rows per head evaluation (cross_validate's): the working set is CHUNK x (dim + classes)


@dataclass
class StreamedLabels:
    accuracy: float  # out-of-sample probe accuracy over every labelled row seen
    C: float
    standardize: bool
    folds: int
    trained_on: int  # rows in the probe's training sample
    seen: int  # labelled rows scored
    issues: LabelIssues  # store rows, lowest self-confidence first; likely = confident learning's
    overlaps: list[Overlap]  # example_rows are store rows
    disagreements: int  # all rows whose out-of-sample prediction differs from the label
    listed: int  # how many of them are in ``issues`` (≤ max_listed, the lowest self-confidence kept)


def sample_positions(n: int, limit: int, seed: int = 0) -> np.ndarray:
    """Sorted positions of a uniform sample of LIMIT out of N (all of them when N ≤ LIMIT): which
    labelled rows train the streamed probe."""
    if n <= limit:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, limit, replace=False)).astype(np.int64)


def smallest(key: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Positions of the K smallest (key, row) pairs, in no particular order (all when fewer)."""
    if len(key) <= k:
        return np.arange(len(key))
    if k <= 0:
        return np.zeros(0, np.int64)
    v = np.partition(key, k - 1)[k - 1]
    below = np.flatnonzero(key < v)
    at = np.flatnonzero(key == v)
    at = at[np.argsort(rows[at], kind="stable")[:k - len(below)]]
    return np.concatenate([below, at])


class LabelStream:
    """The cross-validated probe on a sample, and the two streamed passes (module docstring).

    SAMPLE_ROWS: sorted int64 store rows of a uniform sample of the labelled rows (all of them when
    few); SAMPLE_X their unit-length float32 vectors; SAMPLE_Y their class codes 0..n_classes-1.
    TOTAL (optional): how many labelled rows a pass holds, for PROGRESS (done, total, stage)."""

    def __init__(self, n_classes: int, sample_rows: np.ndarray, sample_x: np.ndarray, sample_y: np.ndarray,
                 options: LabelOptions = LabelOptions(),
                 progress: Callable[[int, int, str], None] | None = None, total: int = 0) -> None:
        self.n_classes = n_classes
        self.options = options
        self.progress = progress
        self.total = total
        self.sample_rows = np.asarray(sample_rows, np.int64)
        y = np.asarray(sample_y, np.int64)
        x = np.ascontiguousarray(sample_x, np.float32)
        if len(self.sample_rows) != len(y) or len(y) != len(x):
            raise ValueError(f"sample: {len(self.sample_rows)} rows, {len(x)} vectors, {len(y)} labels")
        if len(y) > 1 and not (np.diff(self.sample_rows) > 0).all():
            raise ValueError("sample rows must be sorted and unique")
        counts = np.bincount(y, minlength=n_classes) if len(y) else np.zeros(n_classes, np.int64)
        if (counts > 0).sum() < 2:
            raise ProbeError("need at least 2 classes for a cross-validated probe")
        self.folds = int(min(options.folds, max(2, counts.max())))
        self.C, self.standardize = choose_c(x, y, n_classes, options)
        if progress:
            progress(1, 2, "cross-validated probe")
        self.fold = stratified_folds(y, self.folds, options.seed)
        for f in range(self.folds):
            if len(np.unique(y[self.fold != f])) < 2:
                raise ProbeError(f"too few labelled images for a {self.folds}-fold cross-validated probe (a fold "
                                 "would train on one class); label more images per class")
        self.heads = fold_heads(x, y, n_classes, self.fold, self.C, self.standardize, select_options(options.probe))
        if progress:
            progress(2, 2, "cross-validated probe")
        self.trained_on = len(y)
        # pass 1
        self._t_sum = np.zeros(n_classes, np.float64)
        self._t_count = np.zeros(n_classes, np.int64)
        self._thresholds: np.ndarray | None = None
        # pass 2
        self._count = np.zeros(n_classes, np.int64)
        self._joint = np.zeros((n_classes, n_classes), np.int64)
        self._confusion = np.zeros((n_classes, n_classes), np.int64)
        self._disagreements = 0
        # (row, given, suggested, p(given), p(suggested), confident class, p(confident class))
        self._parts: list[tuple[np.ndarray, ...]] = []
        self._buffered = 0

    def proba(self, rows: np.ndarray, x: np.ndarray) -> np.ndarray:
        """[len(rows), n_classes] float32 out-of-sample probabilities: a sample row from its fold's
        head, any other row the mean of the K heads'."""
        rows = np.asarray(rows, np.int64)
        m = len(self.sample_rows)
        pos = np.minimum(np.searchsorted(self.sample_rows, rows), max(m - 1, 0))
        fold = np.where(self.sample_rows[pos] == rows, self.fold[pos], -1) if m else np.full(len(rows), -1)
        out = np.empty((len(rows), self.n_classes), np.float32)
        for f, head in enumerate(self.heads):
            mine = np.flatnonzero(fold == f)
            for s in range(0, len(mine), CHUNK):
                part = mine[s:s + CHUNK]
                out[part] = head.proba(x[part])
        rest = np.flatnonzero(fold < 0)
        for s in range(0, len(rest), CHUNK):
            part = rest[s:s + CHUNK]
            xp = x[part]
            acc = np.zeros((len(part), self.n_classes), np.float32)
            for head in self.heads:
                acc += head.proba(xp)
            out[part] = acc / len(self.heads)
        return out

    def add_thresholds(self, rows: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
        """Pass 1: every labelled row once, in batches of any size and order."""
        if self._thresholds is not None:
            raise ValueError("add_thresholds after add: pass 1 must be complete before pass 2")
        y = np.asarray(y, np.int64)
        p = self.proba(rows, x)
        self._t_sum += np.bincount(y, weights=p[np.arange(len(y)), y].astype(np.float64), minlength=self.n_classes)
        self._t_count += np.bincount(y, minlength=self.n_classes)
        if self.progress:
            self.progress(int(self._t_count.sum()), self.total, "label errors: pass 1 of 2")

    def thresholds(self) -> np.ndarray:
        """Per class: mean p_j over the rows labelled j (1 for a class no row has)."""
        if self._thresholds is None:
            t = np.ones(self.n_classes, np.float64)
            has = self._t_count > 0
            t[has] = self._t_sum[has] / self._t_count[has]
            self._thresholds = t
        return self._thresholds

    def add(self, rows: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
        """Pass 2: every labelled row once again, in batches of any size and order."""
        t = self.thresholds()
        rows = np.asarray(rows, np.int64)
        y = np.asarray(y, np.int64)
        k = self.n_classes
        p = self.proba(rows, x)
        pred = p.argmax(1)
        self._count += np.bincount(y, minlength=k)
        self._confusion += np.bincount(y * k + pred, minlength=k * k).reshape(k, k)
        above = p >= t[None, :] - 1e-12
        confident = np.where(above, p, -1.0).argmax(1)
        has = np.asarray(above.any(1), bool)
        self._joint += np.bincount(y[has] * k + confident[has], minlength=k * k).reshape(k, k)
        dis = np.flatnonzero(pred != y)
        self._disagreements += len(dis)
        if len(dis):
            g, s = y[dis], pred[dis]
            # the class that counted the row in the confident joint (its argmax when none, or the given)
            c: np.ndarray = np.where(has[dis] & (confident[dis] != g), confident[dis], s)
            self._parts.append((rows[dis], g.astype(np.int32), s.astype(np.int32), p[dis, g], p[dis, s],
                                c.astype(np.int32), p[dis, c]))
            self._buffered += len(dis)
            if self._buffered >= 2 * max(self.options.max_listed, 1):
                self._parts = [self._kept()]
                self._buffered = len(self._parts[0][0])
        if self.progress:
            self.progress(int(self._count.sum()), self.total, "label errors: pass 2 of 2")

    def _kept(self) -> tuple[np.ndarray, ...]:
        """The buffered disagreements, trimmed to the max_listed lowest (self-confidence, row)."""
        if not self._parts:
            return (np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int32),
                    np.zeros(0, np.float32), np.zeros(0, np.float32), np.zeros(0, np.int32), np.zeros(0, np.float32))
        cols = tuple(np.concatenate([part[i] for part in self._parts]) for i in range(7))
        keep = smallest(cols[3], cols[0], self.options.max_listed)
        return tuple(c[keep] for c in cols) if len(keep) < len(cols[0]) else cols

    def result(self, top: int = 10, examples: int = 6, cell: str = "confident") -> StreamedLabels:
        """Issues (every kept disagreement, lowest self-confidence first, confident learning's marked
        likely) and the TOP overlapping class pairs with EXAMPLES rows each. CELL: which class's
        cell (given, j) a disagreement competes in for confident learning's quota: "confident"
        (the class that counted it in the confident joint, its argmax when none) or "argmax"."""
        seen = int(self._count.sum())
        if seen != int(self._t_count.sum()):
            raise ValueError(f"pass 1 scored {int(self._t_count.sum())} rows, pass 2 {seen}: both must see every "
                             "labelled row once")
        k = self.n_classes
        t = self.thresholds()
        row, given, sugg, self_conf, p_sugg, c_cls, p_cls = self._kept()
        if cell == "argmax":
            c_cls, p_cls = sugg, p_sugg
        elif cell != "confident":
            raise ValueError(f"cell is 'confident' or 'argmax', got {cell!r}")
        calibrated = self._joint / np.maximum(self._joint.sum(1, keepdims=True), 1) * self._count[:, None]
        quota = np.rint(calibrated).astype(np.int64)
        np.fill_diagonal(quota, 0)
        # confident learning, streamed: per cell (given i, suggested j) its top quota[i, j] by margin
        margin = p_cls - self_conf
        order = np.lexsort((row, -margin, c_cls, given))
        at = given[order].astype(np.int64) * k + c_cls[order]
        first = np.r_[0, np.flatnonzero(np.diff(at)) + 1] if len(at) else np.zeros(0, np.int64)
        start = np.repeat(first, np.diff(np.r_[first, len(at)]))
        likely = np.zeros(len(row), bool)
        likely[order] = (np.arange(len(at)) - start) < quota.ravel()[at]
        pick = np.lexsort((row, self_conf))
        issues = LabelIssues(row[pick], given[pick].astype(np.int64), sugg[pick].astype(np.int64), self_conf[pick],
                             t, likely[pick])
        conf = self._confusion
        pairs = []
        for a in range(k):
            for b in range(a + 1, k):
                both = conf[a, b] + conf[b, a]
                if both:
                    pairs.append((both / max(self._count[a] + self._count[b], 1), int(both), a, b))
        pairs.sort(key=lambda q: (-q[0], -q[1], q[2], q[3]))
        overlaps = []
        for rate, both, a, b in pairs[:top]:
            idx = np.flatnonzero(((given == a) & (sugg == b)) | ((given == b) & (sugg == a)))
            idx = idx[np.lexsort((row[idx], -p_sugg[idx]))][:examples]
            overlaps.append(Overlap(a, b, float(rate), both, row[idx]))
        accuracy = float(np.trace(conf) / seen) if seen else float("nan")
        return StreamedLabels(accuracy, self.C, self.standardize, self.folds, self.trained_on, seen, issues,
                              overlaps, self._disagreements, len(row))


def cross_validated_issues(x: np.ndarray, y: np.ndarray, rows: np.ndarray, classes: list[str],
                           options: LabelOptions = LabelOptions(),
                           progress: Callable[[int, int, str], None] | None = None) -> StreamedLabels:
    """The in-memory path: LabelStream with every labelled row as the sample, in one batch (ROWS:
    their sorted store rows; X their unit vectors; Y their class codes) — ``cross_validate`` +
    ``label_issues`` + ``class_overlap`` in one call, with the same accuracy, disagreements and
    overlaps (the likely tier as streamed: see the module docstring)."""
    stream = LabelStream(len(classes), rows, x, y, options, progress, total=len(y))
    stream.add_thresholds(rows, x, y)
    stream.add(rows, x, y)
    return stream.result()

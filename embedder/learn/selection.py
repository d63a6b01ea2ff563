"""Choosing a linear probe's C (and whether to standardise) on held-out predictions: one routine
for every place that trains a probe (``probe``, ``finetune``'s LP-FT head, ``inspect``'s
cross-validated probe, ``compare``'s cells).

With few labels a single validation split is too small to choose anything: 14 validation images
score 1.0 at every C, and the most regularised C then wins — a head that predicts one class. So:

- the held-out predictions come from one stratified split only when that split holds at least
  ``min_val_rows`` images; below that, from stratified K-fold on all of train, every image predicted
  once by a model that never saw it (the pooled out-of-fold predictions choose C);
- the score is accuracy; near-ties (within one binomial standard error of the best accuracy, on
  the number of pooled predictions) go to raw features over standardised ones (the simpler model),
  then — with fewer than 500 held-out predictions — to scikit-learn's default C=1 when it is among
  them (a choice away from the default must be earned), else to the lower validation log-loss, a
  proper score; the
  ``log_loss`` criterion (``inspect``: confident learning needs calibrated probabilities) takes
  the lowest log-loss outright;
- coarse decades first, then a refinement around the best (±¼ and ±½ decade).

How it is fast (``embedder.learn.logreg``): every fold and both standardisations at one C are one
batched problem, solved together in one pass over the features per L-BFGS step, in float32; C's
are taken small to large, each warm-started from the last, and the path stops once ``patience``
C's in a row can no longer win (accuracy below the best by more than the noise band, or, past the
default C, log-loss rising with accuracy not improving) — the large C's are the slow fits. When the
problem is small (few rows: the cost is the solver's steps, not arithmetic) every coarse C is solved
at once instead. With fewer rows than dimensions the problems are solved in the span of the rows
(exact; standardised problems stay in the full space, each fold scaled by its own rows). The
sweep's fits stop at gradient 1e-3 (the choice of C does not move: docs/benchmarks.md); the refit
on all of train at scikit-learn's 1e-4.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embedder.errors import ProbeError
from embedder.learn import logreg
from embedder.models.heads import LinearHead

log = logging.getLogger(__name__)

DEFAULT_C = 1.0  # scikit-learn's default: the prior a choice must beat...
DEFAULT_EARNED_BELOW = 500  # ... when fewer held-out predictions than this choose


@dataclass(frozen=True)
class SelectOptions:
    c_min_exp: int = -6
    c_max_exp: int = 5
    refine: bool = True
    val_fraction: float = 0.1
    min_val_rows: int = 500  # a single split below this many validation images: K-fold instead
    folds: int = 5
    seed: int = 0
    standardize: str = "auto"  # auto (chosen like C) | yes | no
    criterion: str = "accuracy"  # accuracy (near-ties by log-loss) | log_loss
    tol: float = 1e-3  # the sweep's fits: max |gradient| of the scaled objective
    refit_tol: float = 1e-4  # the refit on all of train (scikit-learn's default)
    max_iter: int = 1000
    patience: int = 2  # the C path stops after this many C's in a row that cannot win
    precondition: bool = True  # L-BFGS starts from (c·Σ + λI)⁻¹, Σ the features' covariance
    device: str = "cpu"


@dataclass
class Selection:
    C: float
    standardize: bool
    scheme: str  # "5-fold cross-validation" | "a 10 % validation split"
    n_rows: int  # how many held-out predictions chose C
    accuracy: float  # their accuracy at the chosen C
    log_loss: float
    sweep: list[dict[str, Any]]  # C, standardize, val_accuracy, val_log_loss per candidate
    # the folds' solutions at C, averaged, on raw features (coef [classes, dim], intercept): a warm start
    solution: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)
    seconds: float = 0.0
    passes: int = 0  # passes over the features (objective evaluations and held-out predictions)
    history: logreg.History | None = field(default=None, repr=False)  # a split's curvature pairs at the end
    eig: tuple[np.ndarray, np.ndarray, float] | None = field(default=None, repr=False)  # its preconditioner's

    def describe(self) -> str:
        return (f"C={self.C:.3g}{', standardised' if self.standardize else ''}, chosen by {self.scheme} "
                f"on {self.n_rows} images (accuracy {self.accuracy:.4f}, log-loss {self.log_loss:.4f}; "
                f"{len(self.sweep)} candidates in {self.seconds:.1f} s)")


def stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, validation rows): ``fraction`` of each class held out, at least one of every
    class with two or more images, never all of one."""
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * fraction))
        if len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)
        else:
            n_val = 0
        val.extend(idx[:n_val].tolist())
    val_mask = np.zeros(len(y), dtype=bool)
    val_mask[val] = True
    return np.flatnonzero(~val_mask), np.flatnonzero(val_mask)


def stratified_folds(y: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold number per row; each class dealt round-robin after a seeded shuffle."""
    rng = np.random.default_rng(seed)
    out = np.empty(len(y), np.int64)
    offset = 0
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        out[idx] = (np.arange(len(idx)) + offset) % folds
        offset += len(idx)  # small classes do not all land in fold 0
    return out


def scaler(x: np.ndarray, on: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and scale (zeros and ones when off)."""
    if not on:
        return np.zeros(x.shape[1], np.float32), np.ones(x.shape[1], np.float32)
    mean = x.mean(0)
    scale = x.std(0)
    scale[scale < 1e-8] = 1.0
    return mean.astype(np.float32), scale.astype(np.float32)


def holdout_folds(y: np.ndarray, options: SelectOptions) -> tuple[np.ndarray, np.ndarray, str]:
    """Which held-out predictions choose C: (fold per row, the held-out folds, the scheme's name).
    A split is fold 0 (validation) and -1 (train); K-fold numbers every row's fold. Folds whose
    training part holds fewer than two classes are left out (nothing to fit). Rows with y < 0 are
    in no fold and train nothing."""
    labelled = y >= 0
    yl = y[labelled]
    tr, va = stratified_split(yl, options.val_fraction, options.seed)
    fold = np.full(len(y), -1, np.int64)
    where = np.flatnonzero(labelled)
    if len(va) >= options.min_val_rows:
        fold[where[va]] = 0
        return fold, np.array([0]), f"a {options.val_fraction:.0%} validation split"
    counts = np.bincount(yl) if len(yl) else np.zeros(1, np.int64)
    k = int(min(options.folds, counts.max()))
    if k < 2:
        raise ProbeError("too few images per class to choose the probe's C (need ≥ 2 images in some class)")
    fold[where] = stratified_folds(yl, k, options.seed)
    held = [f for f in range(k) if (fold == f).any() and len(np.unique(y[labelled & (fold != f)])) >= 2]
    if not held:
        raise ProbeError("too few images per class to choose the probe's C: every fold would train on one class")
    return fold, np.array(held), f"{k}-fold cross-validation"


def holdout_splits(y: np.ndarray, options: SelectOptions) -> tuple[list[tuple[np.ndarray, np.ndarray]], str]:
    """``holdout_folds`` as (train rows, validation rows) pairs."""
    fold, held, scheme = holdout_folds(y, options)
    lab = y >= 0
    return [(np.flatnonzero(lab & (fold != f)), np.flatnonzero(lab & (fold == f))) for f in held], scheme


def choose(rows: list[dict[str, Any]], criterion: str) -> dict[str, Any]:
    """The winning candidate: by log-loss alone, or by accuracy with near-ties (one binomial standard
    error of the best, on the pooled count) broken by log-loss; exact ties then go to no
    standardisation and to stronger regularisation."""
    def simpler(r: dict[str, Any]) -> tuple[float, ...]:
        return (r["val_log_loss"], float(r["standardize"]), math.log10(r["C"]))

    if criterion == "log_loss":
        return min(rows, key=simpler)
    if criterion != "accuracy":
        raise ProbeError(f"unknown selection criterion {criterion!r}; valid: accuracy, log_loss")
    best = max(r["val_accuracy"] for r in rows)
    n = max(r["n"] for r in rows)
    tol = max(math.sqrt(best * (1 - best) / n), 0.5 / n)
    near = [r for r in rows if r["val_accuracy"] >= best - tol]
    # standardising estimates a mean and a scale per dimension from train: with few images that is
    # noise, so it has to win on accuracy, not on a near-tie (measured: faces, 3 per class, -3 points)
    raw = [r for r in near if not r["standardize"]] or near
    # with few held-out predictions a C away from scikit-learn's default (C=1 on raw features) has
    # to be earned: more than one standard error better. With 8 of them nothing is (measured:
    # log-loss alone then picks the most uninformative C, 20-40 points below C=1). With hundreds,
    # the log-loss of the near-tied C's is evidence enough (measured: Fashion-MNIST, 2,000 images,
    # C=1 inside the band at 0.846 against 0.851, log-loss 0.517 against 0.418, test 0.853 vs 0.863)
    default = [r for r in raw if r["C"] == DEFAULT_C and not r["standardize"]] if n < DEFAULT_EARNED_BELOW else []
    return default[0] if default else min(raw, key=simpler)


SMALL_ROUND = 3e8  # multiply-adds per pass below which every coarse C is solved at once


@dataclass
class _Mode:
    """One standardisation's family: its space, each held-out fold's centring and scaling there, the
    last solution on the path (a warm start), and whether its path has stopped."""

    std: bool
    space: logreg.Space
    mean: np.ndarray  # [F, dim']
    scale: np.ndarray  # [F, dim']
    last: tuple[np.ndarray, np.ndarray] | None = None  # per fold (coef [F, k, dim'], intercept [F, k])
    hist: logreg.History | None = None  # the last solve's curvature pairs
    eig: tuple[np.ndarray, np.ndarray, float] | None = None  # its features' covariance, top eigenpairs
    losing: int = 0
    stopped: bool = False
    rows: list[dict[str, Any]] = field(default_factory=list)


def reducible(rows: logreg.RowSource, y: np.ndarray) -> np.ndarray | None:
    """The in-memory matrix when it has clearly fewer rows than dimensions (every row labelled):
    then problems are solved in the span of its rows."""
    x = getattr(rows, "x", None)
    if x is not None and len(x) < 0.75 * rows.dim and not (y < 0).any():
        return x  # type: ignore[no-any-return]
    return None


def _modes(rows: logreg.RowSource, y: np.ndarray, fold: np.ndarray, held: np.ndarray,
           stds: list[bool], precondition: bool = True) -> list[_Mode]:
    """Raw features with fewer rows than dimensions are solved in the span of the rows (exact for
    every fold: each fold's rows lie in it). Standardised ones stay in the full space, each fold
    scaled by its own training rows: one scaler for all folds would let the held-out rows' own
    statistics in (measured: 8 images, 2 folds, a lucky 0.375 against 0.25 that moved C)."""
    x = reducible(rows, y)
    out = []
    if x is not None and False in stds:
        space = logreg.reduced_space(x, False)
        r = space.rows.dim
        # no preconditioner here: a few rows' problems are cheap, and at large C its scaling of the
        # rows' own coordinates sent L-BFGS to max_iter (measured: digits, 5 a class, C=1e4)
        out.append(_Mode(False, space, np.zeros((len(held), r), np.float32), np.ones((len(held), r), np.float32)))
        stds = [s for s in stds if s]
        if not stds:
            return out
    space = logreg.Space(rows)
    ids = np.unique(np.concatenate([fold[y >= 0], held]))
    count, s1, s2, shift = logreg.fold_moments(rows, y, fold, ids)
    total = count.sum(), s1.sum(0), s2.sum(0)
    means, scales = [], []
    for f in held:
        i = int(np.flatnonzero(ids == f)[0])
        m, s = logreg.moments_scaler(total[0] - count[i], total[1] - s1[i], total[2] - s2[i], shift)
        means.append(m)
        scales.append(s)
    # raw features are centred too (a reparameterisation: the intercept absorbs it), which conditions
    # the problem far better than raw ReLU features
    ones = np.ones((len(held), rows.dim), np.float32)
    modes = [_Mode(std, space, np.array(means), np.array(scales) if std else ones) for std in stds]
    if precondition and rows.n >= rows.dim:  # one sample serves both standardisations; fewer rows
        # than dimensions estimate a rank-deficient covariance, whose zero eigenvalues would send
        # L-BFGS's first steps far along directions no row constrains
        mean, scale = logreg.moments_scaler(*total, shift)
        sample = logreg.sample_rows(rows, mean)
        for family in modes:
            family.eig = logreg.eig_top(sample, scale if family.std else None)
    return out + modes


def select_c(x: np.ndarray | logreg.RowSource, y: np.ndarray, n_classes: int, options: SelectOptions,
             tick: Callable[[int], None] | None = None) -> Selection:
    """Choose C (and standardisation) for a multinomial logistic probe on ``x`` (float32 rows, in
    memory or streamed) and ``y`` (class indices; < 0: no label). ``tick(n)``: n candidates done."""
    t0 = time.perf_counter()
    stds = {"auto": [False, True], "yes": [True], "no": [False]}.get(options.standardize)
    if stds is None:
        raise ProbeError(f"--standardize takes auto, yes or no, got {options.standardize!r}")
    rows = logreg.ArrayRows(x) if isinstance(x, np.ndarray) else x
    fold, held, scheme = holdout_folds(y, options)
    n_pred = int((np.isin(fold, held) & (y >= 0)).sum())
    coarse = [10.0 ** e for e in range(options.c_min_exp, options.c_max_exp + 1)]
    xm = reducible(rows, y)
    if xm is not None and tiny(len(stds) * len(held) * len(coarse), len(y), n_classes):
        return _select_tiny(xm, y, n_classes, fold, held, stds, coarse, scheme, n_pred, options, tick, t0)
    modes = _modes(rows, y, fold, held, stds, options.precondition)
    F = len(held)
    solver = logreg.SolverOptions(tol=options.tol, max_iter=options.max_iter, device=options.device)
    passes = 0
    step = tick or (lambda _n: None)
    everything: list[dict[str, Any]] = []

    def solve_round(todo: list[tuple[_Mode, list[float]]]) -> dict[str, Any]:
        """Every (mode, C) of TODO, batched per space; returns the best candidate so far."""
        nonlocal passes
        by_space: dict[int, list[tuple[_Mode, list[float]]]] = {}
        for mode, Cs in todo:
            by_space.setdefault(id(mode.space.rows), []).append((mode, Cs))
        for group in by_space.values():
            src = group[0][0].space.rows
            means = np.concatenate([np.tile(m.mean, (len(Cs), 1)) for m, Cs in group])
            scales = np.concatenate([np.tile(m.scale, (len(Cs), 1)) for m, Cs in group])
            Cv = np.concatenate([np.repeat(np.asarray(Cs, np.float64), F) for _m, Cs in group])
            problems = logreg.Problems(fold, np.concatenate([np.tile(held, len(Cs)) for _m, Cs in group]),
                                       means, scales, Cv)
            init = None
            if all(m.last is not None for m, _c in group):
                init = (np.concatenate([np.tile(m.last[0], (len(Cs), 1, 1)) for m, Cs in group]),  # type: ignore[index]
                        np.concatenate([np.tile(m.last[1], (len(Cs), 1)) for m, Cs in group]))  # type: ignore[index]
            hist = None
            if all(m.hist is not None for m, _c in group):
                hist = logreg.History.cat([m.hist.tile(len(Cs)) for m, Cs in group])  # type: ignore[union-attr]
            pre = None
            if all(m.eig is not None for m, _c in group):
                family = np.concatenate([np.full(len(Cs) * F, i) for i, (_m, Cs) in enumerate(group)])
                pre = logreg.precond_from([m.eig for m, _c in group], family, n_classes,  # type: ignore[misc]
                                          options.device)
            with logreg.threads_for(src.n * src.dim * n_classes * len(Cv)):
                sol = logreg.solve(src, y, n_classes, problems, init, solver, hist, pre)
                log.debug("C %s: %s iterations, %d passes", sorted(set(Cv.tolist())), sol.iterations.tolist(),
                          sol.passes)
                correct, loss = logreg.predict_held_out(src, y, problems, sol.coef, sol.intercept, options.device)
            passes += sol.passes + 1
            p = 0
            for mode, Cs in group:
                below = (mode.last, mode.hist)  # where this round started: the lower refinement's start
                for C in Cs:
                    sl = slice(p, p + F)
                    row = {"C": float(C), "standardize": mode.std, "val_accuracy": float(correct[sl].sum() / n_pred),
                           "val_log_loss": float(loss[sl].sum() / n_pred), "n": n_pred,
                           "_solution": (sol.coef[sl], sol.intercept[sl]), "_mode": mode, "_below": below}
                    mode.rows.append(row)
                    everything.append(row)
                    p += F
                mode.last = (sol.coef[p - F:p], sol.intercept[p - F:p])  # the largest C: the next start
                mode.hist = sol.history.take(slice(p - F, p)) if sol.history is not None else None
            step(sum(len(Cs) for _m, Cs in group))
        best = choose(everything, options.criterion)
        for r in everything:  # per-fold solutions are kept only for the best candidate
            if r is not best:
                r.pop("_solution", None)
                r.pop("_below", None)
        return best

    first = modes[0].space.rows
    if first.n * first.dim * n_classes * F * len(modes) * len(coarse) <= SMALL_ROUND:
        best = solve_round([(m, coarse) for m in modes])  # small: the solver's steps cost, not arithmetic
    else:
        for C in coarse:
            live = [m for m in modes if not m.stopped]
            if not live:
                break
            best = solve_round([(m, [C]) for m in live])
            _update_stopping(live, best, everything, options.patience)
        skipped = sum(len(coarse) - len(m.rows) for m in modes)
        if skipped:
            step(skipped)
    if options.refine:
        # ±¼ and ±½ decade, each warm-started from the next smaller C (a fit warm-started from a
        # larger C starts where its gradient is already within the stopping test and would not move)
        mode, c = best["_mode"], best["C"]
        top, hist_top = best.get("_solution", mode.last), mode.hist
        mode.last, mode.hist = best.get("_below", (None, None))
        for d in (-0.5, -0.25):
            best = solve_round([(mode, [c * 10 ** d])])
        mode.last, mode.hist = top, hist_top
        for d in (0.25, 0.5):
            best = solve_round([(mode, [c * 10 ** d])])
    # the winner's folds, averaged on raw features: the refit's warm start (with a split, its curvature pairs too)
    mode = best["_mode"]
    # a candidate that won only once a later one moved the noise band may have lost its solution:
    # the refit then starts from the mode's last one (a warm start, nothing more)
    coef, icpt = best.get("_solution") or mode.last
    pairs = mode.hist if F == 1 and not mode.space.reduced else None
    eig = mode.eig if not mode.space.reduced else None
    raw = [mode.space.to_raw(coef[i], icpt[i], mode.mean[i], mode.scale[i]) for i in range(F)]
    solution = (np.mean([r[0] for r in raw], 0), np.mean([r[1] for r in raw], 0))
    table = [{k: v for k, v in r.items() if not k.startswith("_") and k != "n"}
             for r in sorted(everything, key=lambda r: (r["standardize"], r["C"]))]
    return Selection(float(best["C"]), bool(best["standardize"]), scheme, n_pred, float(best["val_accuracy"]),
                     float(best["val_log_loss"]), table, solution, time.perf_counter() - t0, passes, pairs, eig)


def _update_stopping(live: list[_Mode], best: dict[str, Any], everything: list[dict[str, Any]],
                     patience: int) -> None:
    """A mode's path stops after PATIENCE C's in a row that cannot win: accuracy below the best by
    more than the noise band, or, past scikit-learn's default C (whose near-tie bonus is then
    behind), log-loss rising with accuracy not improving."""
    top = max(r["val_accuracy"] for r in everything)
    n = max(r["n"] for r in everything)
    band = max(math.sqrt(top * (1 - top) / n), 0.5 / n)
    for mode in live:
        rows = mode.rows
        r = rows[-1]
        prev = rows[-2] if len(rows) > 1 else None
        peak = max(rows, key=lambda q: q["val_accuracy"])  # the mode's own best: first of equals
        past_peak = r is not peak and r["val_accuracy"] < peak["val_accuracy"]
        fallen = past_peak and r["val_accuracy"] < top - band
        worse = (prev is not None and r["C"] > DEFAULT_C and r["val_log_loss"] > prev["val_log_loss"]
                 and r["val_accuracy"] <= prev["val_accuracy"])
        mode.losing = mode.losing + 1 if (fallen or worse) and r is not best else 0
        if mode.losing >= patience:
            mode.stopped = True


def tiny(problems: int, rows: int, n_classes: int) -> bool:
    """Few enough rows (and weight rows) that Newton's method in the rows' span is the cheaper solver."""
    return logreg.newton_work(problems, rows, n_classes, rows + 1) <= logreg.NEWTON_WORK


@dataclass
class _Coords:
    """A problem family's coordinates of every row: ((x - center) / scale) @ basis, plus a ones column."""

    X: np.ndarray  # [n, R]
    basis: np.ndarray  # [dim, r]
    center: np.ndarray
    scale: np.ndarray

    def raw_head(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """theta [k, R] → raw-feature (coef [classes, dim], intercept [classes])."""
        r = self.basis.shape[1]
        v = (theta[:, :r] @ self.basis.T) / self.scale
        c = theta[:, -1] - v @ self.center
        coef, icpt = logreg.unpack(v[None], c[None])
        return coef[0].astype(np.float32), icpt[0].astype(np.float32)


def _coords(x: np.ndarray, train: np.ndarray, std: bool) -> _Coords:
    """Coordinates in the span of the TRAIN rows, centred (and scaled) by their own statistics."""
    xt = x[train].astype(np.float64)
    center = xt.mean(0)
    scale = xt.std(0) if std else np.ones(x.shape[1])
    scale[scale < 1e-8] = 1.0
    xs = (x - center) / scale
    ts = xs[train]
    evals, u = np.linalg.eigh(ts @ ts.T)
    keep = evals > max(float(evals[-1]), 1e-30) * 1e-9
    basis = (ts.T @ u[:, keep]) / np.sqrt(evals[keep])
    return _Coords(np.concatenate([xs @ basis, np.ones((len(x), 1))], 1), basis, center, scale)


def _stack(coords: list[_Coords]) -> np.ndarray:
    """[families, n, R]: coordinates padded with zeros (unused, so penalised to 0) to one width, the ones last."""
    R = max(c.X.shape[1] for c in coords)
    out = np.zeros((len(coords), coords[0].X.shape[0], R))
    for i, c in enumerate(coords):
        out[i, :, :c.X.shape[1] - 1] = c.X[:, :-1]
        out[i, :, -1] = 1.0
    return out


def _select_tiny(x: np.ndarray, y: np.ndarray, n_classes: int, fold: np.ndarray, held: np.ndarray,
                 stds: list[bool], coarse: list[float], scheme: str, n_pred: int, options: SelectOptions,
                 tick: Callable[[int], None] | None, t0: float) -> Selection:
    """``select_c`` for a handful of rows: every fold's problem in its own training rows' span (each
    fold centred and, standardised, scaled by its own rows: exact), all C's at once, Newton's method."""
    step = tick or (lambda _n: None)
    F = len(held)
    fam = {(std, f): _coords(x, (fold != f) & (y >= 0), std) for std in stds for f in held}
    keys = list(fam)
    X = _stack([fam[k] for k in keys])
    everything: list[dict[str, Any]] = []

    def solve_round(todo: list[tuple[bool, list[float]]]) -> dict[str, Any]:
        which, Cs_p, f_p = [], [], []
        for std, Cs in todo:
            for C in Cs:
                for f in held:
                    which.append(keys.index((std, f)))
                    Cs_p.append(C)
                    f_p.append(f)
        which_a, f_a = np.array(which), np.array(f_p)
        train = (fold[None, :] != f_a[:, None]) & (y[None, :] >= 0)
        lam = 1.0 / (np.array(Cs_p) * train.sum(1))
        theta, _it = logreg.newton(X[which_a], np.maximum(y, 0), n_classes, train, lam)
        z = np.einsum("pnr,pkr->pnk", X[which_a], theta)
        if z.shape[2] == 1:
            z = np.concatenate([np.zeros_like(z), z], 2)
        logp = z - (z.max(2, keepdims=True) + np.log(np.exp(z - z.max(2, keepdims=True)).sum(2, keepdims=True)))
        ys = np.maximum(y, 0)
        val = (fold[None, :] == f_a[:, None]) & (y[None, :] >= 0)
        hit = (z.argmax(2) == ys[None, :]) & val
        nll = -np.maximum(logp[:, np.arange(len(y)), ys], np.log(1e-12)) * val
        p = 0
        for std, Cs in todo:
            for C in Cs:
                sl = slice(p, p + F)
                everything.append({"C": float(C), "standardize": std, "val_accuracy": float(hit[sl].sum() / n_pred),
                                   "val_log_loss": float(nll[sl].sum() / n_pred), "n": n_pred,
                                   "_theta": theta[sl]})
                p += F
            step(len(Cs))
        return choose(everything, options.criterion)

    best = solve_round([(std, coarse) for std in stds])
    if options.refine:
        c = best["C"]
        best = solve_round([(best["standardize"], [c * 10 ** d for d in (-0.5, -0.25, 0.25, 0.5)])])
    heads = [fam[(best["standardize"], f)].raw_head(best["_theta"][i]) for i, f in enumerate(held)]
    solution = (np.mean([h[0] for h in heads], 0), np.mean([h[1] for h in heads], 0))
    table = [{k: v for k, v in r.items() if not k.startswith("_") and k != "n"}
             for r in sorted(everything, key=lambda r: (r["standardize"], r["C"]))]
    return Selection(float(best["C"]), bool(best["standardize"]), scheme, n_pred, float(best["val_accuracy"]),
                     float(best["val_log_loss"]), table, solution, time.perf_counter() - t0, 2)


def fit_heads(x: np.ndarray | logreg.RowSource, y: np.ndarray, n_classes: int, fold: np.ndarray,
              held: np.ndarray, C: float, standardize: bool, init: tuple[np.ndarray, np.ndarray] | None = None,
              options: SelectOptions = SelectOptions(), history: logreg.History | None = None,
              eig: tuple[np.ndarray, np.ndarray, float] | None = None) -> tuple[list[LinearHead], logreg.Solution]:
    """One probe per held-out fold of HELD (-2: none, every labelled row) at C, solved together, each
    on its own training rows' scaler when standardised; warm-started from INIT (raw-feature coef,
    intercept), to ``refit_tol``."""
    rows = logreg.ArrayRows(x) if isinstance(x, np.ndarray) else x
    P = len(held)
    xm = reducible(rows, y)
    if xm is not None and tiny(P, len(y), n_classes):
        heads, iters, coefs, icpts = [], [], [], []
        for f in held:
            co = _coords(xm, (fold != f) & (y >= 0), standardize)
            train = ((fold != f) & (y >= 0))[None]
            theta, it = logreg.newton(co.X[None], np.maximum(y, 0), n_classes, train,
                                      np.array([1.0 / (C * train.sum())]), tol=min(options.refit_tol, 1e-6))
            coef, icpt = co.raw_head(theta[0])
            heads.append(LinearHead(coef, icpt, np.zeros(rows.dim, np.float32), np.ones(rows.dim, np.float32))
                         if not standardize else _std_head(coef, icpt, co))
            iters.append(int(it[0]))
            coefs.append(coef)
            icpts.append(icpt)
        its = np.array(iters)
        return heads, logreg.Solution(np.array(coefs), np.array(icpts), its, its < logreg.NEWTON_MAX_ITER, len(held))
    if xm is not None and (not standardize or (P == 1 and held[0] == -2)):  # one scaler: the span is exact
        space = logreg.reduced_space(xm, standardize)
        r = space.rows.dim
        means, scales = np.zeros((P, r), np.float32), np.ones((P, r), np.float32)
        centers = np.tile(np.asarray(space.center, np.float32), (P, 1))
        scs = np.tile(np.asarray(space.scale, np.float32), (P, 1))
    else:
        space = logreg.Space(rows)
        ids = np.unique(np.concatenate([fold[y >= 0], held[held >= -1]]))
        count, s1, s2, shift = logreg.fold_moments(rows, y, fold, ids)
        total = count.sum(), s1.sum(0), s2.sum(0)
        stats = []
        for f in held:
            i = np.flatnonzero(ids == f)
            stats.append(logreg.moments_scaler(*total, shift) if not len(i) else
                         logreg.moments_scaler(total[0] - count[i[0]], total[1] - s1[i[0]], total[2] - s2[i[0]], shift))
        means = np.array([m for m, _s in stats])
        scales = np.array([sc if standardize else np.ones_like(sc) for _m, sc in stats])
        centers, scs = means, scales
    problems = logreg.Problems(fold, np.asarray(held), means, scales, np.full(P, float(C)))
    start = None
    if init is not None:
        parts = [space.from_raw(init[0], init[1], means[p], scales[p]) for p in range(P)]
        start = (np.array([w for w, _b in parts]), np.array([b for _w, b in parts]))
    src = space.rows
    pre = None
    if eig is not None and not space.reduced and options.precondition:  # the selection's, same features
        pre = logreg.precond_from([eig], np.zeros(P, np.int64), n_classes, options.device)
    with logreg.threads_for(src.n * src.dim * n_classes * P):
        sol = logreg.solve(src, y, n_classes, problems, start,
                           logreg.SolverOptions(tol=options.refit_tol, max_iter=options.max_iter,
                                                device=options.device),
                           None if space.reduced or P != 1 else history, pre)
    heads = []
    for p in range(P):
        v, c = space.to_raw(sol.coef[p], sol.intercept[p], means[p], scales[p])
        if standardize:  # the scaler's head: ((x - center) / scale) @ coefᵀ + b
            head = LinearHead((v * scs[p]).astype(np.float32), (c + v @ centers[p]).astype(np.float32),
                              centers[p], scs[p])
        else:
            head = LinearHead(v, c, np.zeros(rows.dim, np.float32), np.ones(rows.dim, np.float32))
        heads.append(head)
    return heads, sol


def _std_head(coef: np.ndarray, icpt: np.ndarray, co: _Coords) -> LinearHead:
    """A raw-feature head as the scaler's head: ((x - center) / scale) @ coefᵀ + b."""
    center, scale = co.center.astype(np.float32), co.scale.astype(np.float32)
    return LinearHead((coef * scale).astype(np.float32), (icpt + coef @ center).astype(np.float32), center, scale)


def fit_all(x: np.ndarray | logreg.RowSource, y: np.ndarray, n_classes: int, C: float, standardize: bool,
            init: tuple[np.ndarray, np.ndarray] | None = None, options: SelectOptions = SelectOptions(),
            history: logreg.History | None = None,
            eig: tuple[np.ndarray, np.ndarray, float] | None = None) -> tuple[LinearHead, logreg.Solution]:
    """The probe on every labelled row at C (the refit); standardised, the head carries the scaler
    of all rows. HISTORY, EIG: the selection's curvature pairs and preconditioner, if it had them."""
    heads, sol = fit_heads(x, y, n_classes, np.full(len(y), -1, np.int64), np.array([-2]), C, standardize,
                           init, options, history, eig)
    return heads[0], sol


def fold_heads(x: np.ndarray, y: np.ndarray, n_classes: int, fold: np.ndarray, C: float, std: bool,
               options: SelectOptions = SelectOptions()) -> list[LinearHead]:
    """A cross-validation's probes at one C: fold f's head never saw the rows of fold f."""
    heads, _sol = fit_heads(x, y, n_classes, fold, np.unique(fold), C, std, None, options)
    return heads


def sweep_steps(y: np.ndarray, options: SelectOptions) -> int:
    """How many candidates ``select_c`` evaluates at most (for a progress bar)."""
    modes = 2 if options.standardize == "auto" else 1
    coarse = options.c_max_exp - options.c_min_exp + 1
    return modes * coarse + (4 if options.refine else 0)

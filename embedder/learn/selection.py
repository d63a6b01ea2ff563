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
  then to scikit-learn's default C=1 when it is among them (a choice away from the default must be
  earned on held-out predictions), else to the lower validation log-loss, a proper score; the
  ``log_loss`` criterion (``inspect``: confident learning needs calibrated probabilities) takes
  the lowest log-loss outright;
- coarse decades first, then a refinement around the best, each fold warm-started along the path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embedder.errors import ProbeError

DEFAULT_C = 1.0  # scikit-learn's default: the prior a choice must beat


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


@dataclass
class Selection:
    C: float
    standardize: bool
    scheme: str  # "5-fold cross-validation" | "a 10 % validation split"
    n_rows: int  # how many held-out predictions chose C
    accuracy: float  # their accuracy at the chosen C
    log_loss: float
    sweep: list[dict[str, Any]]  # C, standardize, val_accuracy, val_log_loss per candidate
    solution: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)  # fold 0's fit at C

    def describe(self) -> str:
        return (f"C={self.C:.3g}{', standardised' if self.standardize else ''}, chosen by {self.scheme} "
                f"on {self.n_rows} images (accuracy {self.accuracy:.4f}, log-loss {self.log_loss:.4f})")


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


def holdout_splits(y: np.ndarray, options: SelectOptions) -> tuple[list[tuple[np.ndarray, np.ndarray]], str]:
    """The (train, validation) pairs whose pooled validation predictions choose C, and their name.
    Folds whose training part holds fewer than two classes are left out (nothing to fit)."""
    tr, va = stratified_split(y, options.val_fraction, options.seed)
    if len(va) >= options.min_val_rows:
        return [(tr, va)], f"a {options.val_fraction:.0%} validation split"
    counts = np.bincount(y)
    k = int(min(options.folds, counts.max()))
    if k < 2:
        raise ProbeError("too few images per class to choose the probe's C (need ≥ 2 images in some class)")
    fold = stratified_folds(y, k, options.seed)
    pairs = []
    for f in range(k):
        train_rows, val_rows = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        if len(val_rows) and len(np.unique(y[train_rows])) >= 2:
            pairs.append((train_rows, val_rows))
    if not pairs:
        raise ProbeError("too few images per class to choose the probe's C: every fold would train on one class")
    return pairs, f"{k}-fold cross-validation"


def _proba(coef: np.ndarray, icpt: np.ndarray, x: np.ndarray) -> np.ndarray:
    z = x @ coef.T + icpt
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)  # type: ignore[no-any-return]


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
    # a C away from scikit-learn's default (C=1 on raw features) has to be earned: more than one
    # standard error better on the held-out predictions. With 8 of them nothing is (measured:
    # log-loss alone then picks the most uninformative C, 20-40 points below C=1)
    default = [r for r in raw if r["C"] == DEFAULT_C and not r["standardize"]]
    return default[0] if default else min(raw, key=simpler)


def select_c(x: np.ndarray, y: np.ndarray, n_classes: int, options: SelectOptions,
             fitter_factory: Callable[[], Any],
             tick: Callable[[], None] | None = None) -> Selection:
    """Choose C (and standardisation) for a multinomial logistic probe on ``x`` (rows) and ``y``
    (class indices). ``fitter_factory()`` gives a warm-startable fitter whose ``fit(x, y, C)``
    returns (coef [n_classes, dim], intercept [n_classes])."""
    modes = {"auto": [False, True], "yes": [True], "no": [False]}.get(options.standardize)
    if modes is None:
        raise ProbeError(f"--standardize takes auto, yes or no, got {options.standardize!r}")
    pairs, scheme = holdout_splits(y, options)
    step = tick or (lambda: None)

    def sweep(std: bool, Cs: list[float]) -> list[dict[str, Any]]:
        correct = np.zeros(len(Cs))
        loss = np.zeros(len(Cs))
        n = 0
        solutions: list[tuple[np.ndarray, np.ndarray]] = []
        for p, (tr, va) in enumerate(pairs):
            mean, scale = scaler(x[tr], std)
            xs, xv = (x[tr] - mean) / scale, (x[va] - mean) / scale
            fitter = fitter_factory()
            for j, C in enumerate(Cs):  # small to large C: each fit warm-starts from the more regularised one
                coef, icpt = fitter.fit(xs, y[tr], C)
                prob = _proba(coef, icpt, xv)
                correct[j] += float((prob.argmax(1) == y[va]).sum())
                loss[j] += float(-np.log(np.maximum(prob[np.arange(len(va)), y[va]], 1e-12)).sum())
                if p == 0:
                    solutions.append((coef, icpt))
                step()
            n += len(va)
        return [{"C": C, "standardize": std, "val_accuracy": correct[j] / n, "val_log_loss": loss[j] / n,
                 "n": n, "_solution": solutions[j]} for j, C in enumerate(Cs)]

    coarse = [10.0 ** e for e in range(options.c_min_exp, options.c_max_exp + 1)]
    rows = [r for std in modes for r in sweep(std, coarse)]
    best = choose(rows, options.criterion)
    if options.refine:
        c = best["C"]
        rows += sweep(best["standardize"], [c * 10 ** d for d in (-0.5, -0.25, 0.25, 0.5)])
        best = choose(rows, options.criterion)
    table = [{k: v for k, v in r.items() if not k.startswith("_") and k != "n"} for r in rows]
    return Selection(float(best["C"]), bool(best["standardize"]), scheme, int(best["n"]),
                     float(best["val_accuracy"]), float(best["val_log_loss"]), table, best["_solution"])


def sweep_steps(y: np.ndarray, options: SelectOptions) -> int:
    """How many fits ``select_c`` makes (for a progress bar)."""
    pairs, _ = holdout_splits(y, options)
    modes = 2 if options.standardize == "auto" else 1
    coarse = options.c_max_exp - options.c_min_exp + 1
    return len(pairs) * (modes * coarse + (4 if options.refine else 0))

"""What the labels bought: ``probe --labels``'s accuracy against the number of labels.

The probe is retrained on nested, class-balanced subsets of the labels file's rows — 1, 2, 5, 10, …
labels of each class (a class with fewer gives all it has), then all of them — each point the
probe's own protocol (C chosen on held-out predictions; at one label per class there is nothing to
choose it on: scikit-learn's default C=1), and scored on held-out images, in this order of
preference:

1. the ``--test`` store (its rows of classes the file never names are left out: a probe trained on
   the file cannot predict them, and counting them would only say so);
2. the store's own labelled rows that the file does not label, when there are at least
   ``min_holdout`` of them (a labelled store and a file of new or corrected labels);
3. else K-fold on the file's rows: each fold's images scored by subsets drawn from the other folds.

Small points are noisy (which 2 images of a class were labelled matters by tens of points), so
each is the mean of ``draws`` random subsets, their spread reported; subsets of one draw are nested
(the 5 include the 2). It is kept cheap: the held-out rows are a uniform sample of at most
``eval_rows``, points above ``max_rows`` labels are left out (each would be a whole probe; the full
probe is reported beside), and no point starts once the curve has taken ``seconds`` — every cut is
said in the result's notes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from embedder.errors import ProbeError
from embedder.learn.logreg import RowSource
from embedder.learn.options import CurveOptions, ProbeOptions
from embedder.learn.probe import Dataset, ProbeResult, select_options, train_probe
from embedder.models.heads import LinearHead


def gather(x: np.ndarray | RowSource, rows: np.ndarray) -> np.ndarray:
    """ROWS (sorted, unique) of X as one float32 matrix: a slice in memory, or one pass over a stream."""
    if isinstance(x, np.ndarray):
        return np.asarray(x[rows], np.float32)
    out = np.empty((len(rows), x.dim), np.float32)
    for start, block in x.chunks():
        lo, hi = np.searchsorted(rows, [start, start + len(block)])
        if hi > lo:
            out[lo:hi] = block[rows[lo:hi] - start]
    return out


def _fit(x: np.ndarray, y: np.ndarray, n_classes: int, options: ProbeOptions) -> LinearHead | int:
    """The probe on X, Y (the probe's protocol); a class index when only one class is there to learn."""
    from embedder.learn.selection import DEFAULT_C, fit_all

    present = np.unique(y)
    if len(present) < 2:
        return int(present[0])
    if np.bincount(y).max() >= 2:
        try:
            data = Dataset(x, y, [str(c) for c in range(n_classes)], [], [], {})
            return train_probe(data, options).head
        except ProbeError:  # too few images in every fold: the default C below
            pass
    head, _ = fit_all(x, y, n_classes, DEFAULT_C, False, None, select_options(options))
    return head


def _predict(model: LinearHead | int, x: np.ndarray) -> np.ndarray:
    if isinstance(model, int):
        return np.full(len(x), model, np.int64)
    return np.asarray(model.logits(x).argmax(1), np.int64)


def learning_curve(train: Dataset, test: Dataset | None, options: ProbeOptions = ProbeOptions(),
                   curve: CurveOptions = CurveOptions(),
                   progress: Callable[[int, int, str], None] | None = None,
                   full: ProbeResult | None = None) -> dict[str, Any]:
    """The curve (module docstring) of TRAIN's rows labelled by the labels file (``train.from_file``).
    FULL: the probe already trained on all of TRAIN. Its standardisation is kept and C is chosen
    among the decades only (12 candidates, not 28: a point costs a fifth of a probe or less), and
    when the file labels every training row its head is the last point (not trained twice)."""
    t0 = time.perf_counter()
    if full is not None:
        options = replace(options, standardize="yes" if full.standardize else "no", refine=False)
    if train.from_file is None:
        raise ProbeError("the learning curve is of a labels file's rows: give --labels FILE")
    notes: list[str] = []
    known = train.y >= 0
    pool = np.flatnonzero(train.from_file & known)
    present = np.unique(train.y[pool])
    if len(present) < 2:
        return {"skipped": f"the labels file labels {len(pool):,} images of this store in {len(present)} class"
                           f"{'' if len(present) == 1 else 'es'}: a curve needs 2", "points": [], "notes": []}
    m = len(present)
    remap = np.full(len(train.classes) + 1, -1, np.int64)
    remap[present] = np.arange(m)
    yp = remap[train.y[pool]]
    rng = np.random.default_rng(options.seed)

    # what scores it
    ev_src: np.ndarray | RowSource | None = None
    ev_rows = np.zeros(0, np.int64)
    ev_y = np.zeros(0, np.int64)
    if test is not None:
        ty = remap[np.where(test.y >= 0, test.y, len(train.classes))]
        left_out = int(((test.y >= 0) & (ty < 0)).sum())
        ev_src, ev_rows = test.x, np.flatnonzero(ty >= 0)
        ev_y, scheme, on = ty, "test", "the --test store"
    else:
        hold = ~train.from_file & known
        ty = remap[np.where(known, train.y, len(train.classes))]
        left_out = int((hold & (ty < 0)).sum())
        inside = np.flatnonzero(hold & (ty >= 0))
        if len(inside) >= curve.min_holdout:
            ev_src, ev_rows, ev_y = train.x, inside, ty
            scheme, on = "store", "the store's own labels (rows the file does not label)"
        else:
            scheme, on = "cv", "cross-validation on the file's labels"
            if len(inside):
                notes.append(f"{len(inside)} of the store's own labelled rows are too few to score on "
                             f"(under {curve.min_holdout}): K-fold on the file's rows instead")
    if left_out:
        notes.append(f"{left_out:,} held-out images of classes the labels file never names are left out")
    if ev_src is not None and len(ev_rows) > curve.eval_rows:
        notes.append(f"scored on a uniform sample of {curve.eval_rows:,} of the {len(ev_rows):,} held-out images")
        ev_rows = np.sort(rng.choice(ev_rows, curve.eval_rows, replace=False))
    if ev_src is not None and not len(ev_rows):
        return {"skipped": f"{on} holds no image of the labels file's classes", "points": [], "notes": notes}

    # the plans: (point, draw, training rows as positions in the pool, held-out rows as positions in the pool)
    if scheme == "cv":
        from embedder.learn.selection import stratified_folds

        folds = int(min(curve.folds, np.bincount(yp).max()))
        if folds < 2:
            return {"skipped": "one label per class: nothing to hold out (give --test, or more labels)",
                    "points": [], "notes": notes}
        fold = stratified_folds(yp, folds, options.seed)
        parts = [(np.flatnonzero(fold != f), np.flatnonzero(fold == f)) for f in range(folds)]
    else:
        parts = [(np.arange(len(pool)), np.zeros(0, np.int64))] * curve.draws
    perms = []  # per draw (or fold): each class's training rows in a random order (nested subsets)
    for d, (tr, _) in enumerate(parts):
        r = np.random.default_rng([options.seed, d])
        perms.append([r.permutation(tr[yp[tr] == c]) for c in range(m)])
    largest = max(len(c) for p in perms for c in p)
    points: list[int | None] = [k for k in curve.per_class if k < largest] + [None]  # None: all

    def subset(d: int, k: int | None) -> np.ndarray:
        return np.sort(np.concatenate([c if k is None else c[:k] for c in perms[d]]))

    plans: list[tuple[int | None, list[int]]] = []
    for k in points:
        draws = list(range(len(parts))) if scheme == "cv" else \
            list(range(curve.draws if k is not None and k <= curve.draws_up_to else 1))
        biggest = max(len(subset(d, k)) for d in draws)
        if biggest > curve.max_rows:
            notes.append(f"points above {curve.max_rows:,} labels are left out (each is a whole probe; "
                         "the probe on all of them is reported above)")
            break
        plans.append((k, draws))
    need = np.unique(np.concatenate([subset(d, k) for k, ds in plans for d in ds] +
                                    ([np.arange(len(pool))] if scheme == "cv" else [])))
    xp = gather(train.x, pool[need])
    at = np.full(len(pool), -1, np.int64)
    at[need] = np.arange(len(need))
    xe = gather(ev_src, ev_rows) if ev_src is not None else None
    ye = ev_y[ev_rows] if ev_src is not None else None

    # the full probe is the last point when it was trained on exactly the pool, on the same classes
    reuse = full.head if full is not None and len(pool) == int(known.sum()) and m == len(train.classes) else None
    out: list[dict[str, Any]] = []
    total = sum(len(ds) for _, ds in plans)
    done = 0
    per_row = 0.0  # seconds per training row of the last point's fits: what the next point will take
    for k, draws in plans:
        spent = time.perf_counter() - t0
        free = k is None and scheme != "cv" and reuse is not None  # the probe already trained
        rows_next = 0 if free else sum(len(subset(d, k)) for d in draws)
        if out and spent + per_row * rows_next > curve.seconds:
            notes.append(f"points from {k if k is not None else 'all'} per class left out: the curve took "
                         f"{spent:.0f} s and the next would take about {per_row * rows_next:.0f} s more "
                         f"(its limit: {curve.seconds:g} s)")
            break
        t = time.perf_counter()
        accs, hits, seen, sizes = [], 0, 0, []
        for d in draws:
            rows = subset(d, k)
            if k is None and scheme != "cv" and reuse is not None:
                model: LinearHead | int = reuse
            else:
                model = _fit(xp[at[rows]], yp[rows], m, options)
            if scheme == "cv":
                held = parts[d][1]
                right = _predict(model, xp[at[held]]) == yp[held]
            else:
                assert xe is not None and ye is not None
                right = _predict(model, xe) == ye
            accs.append(float(right.mean()))
            hits, seen = hits + int(right.sum()), seen + len(right)
            sizes.append(len(rows))
            done += 1
            if progress:
                progress(done, total, "learning curve")
        fitted = 0 if free else sum(sizes)
        if fitted:
            per_row = (time.perf_counter() - t) / fitted
        acc = hits / seen if scheme == "cv" else float(np.mean(accs))
        out.append({"per_class": k if k is not None else "all", "labels": int(round(float(np.mean(sizes)))),
                    "accuracy": round(acc, 4),
                    "sd": round(float(np.std(accs)), 4) if len(accs) > 1 and scheme != "cv" else None,
                    "draws": len(draws), "seconds": round(time.perf_counter() - t, 2)})
    n_eval = len(pool) if scheme == "cv" else len(ev_rows)
    return {"scored_on": scheme, "on": on, "n_eval": int(n_eval), "classes": m, "points": out,
            "notes": notes, "seconds": round(time.perf_counter() - t0, 2)}

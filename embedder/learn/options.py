"""What a probe is told, every default in one place (read by the CLI, the Python API and the other
users of the selection routine)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ProbeOptions:
    label_column: str = "label"
    val_fraction: float = 0.1
    seed: int = 0
    c_min_exp: int = -6
    c_max_exp: int = 5
    refine: bool = True
    max_iter: int = 1000
    knn_k: int = 20
    knn_temperature: float = 0.07
    standardize: str = "auto"  # auto (decided on validation) | yes | no
    min_val_rows: int = 500  # a validation split smaller than this: C chosen by K-fold on all of train
    folds: int = 5
    backend: str = "auto"  # the solver is embedder's float32 L-BFGS: auto (CUDA when present) | torch
    device: str = "auto"
    memory_budget: int | None = None  # bytes the training vectors may take (None: a quarter of RAM); streamed beyond


@dataclass(frozen=True)
class CurveOptions:
    """``probe --labels``'s learning curve: the probe retrained on nested, class-balanced subsets of the
    labels file's rows (PER_CLASS labels of each class, then all of them), each scored on held-out rows."""

    per_class: tuple[int, ...] = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
    draws: int = 5  # random subsets per point, averaged (the spread is reported) ...
    draws_up_to: int = 10  # ... for points of at most this many labels per class; one draw above
    max_rows: int = 20_000  # points with more labels are left out: each is a whole probe (the full probe is reported)
    eval_rows: int = 20_000  # held-out rows scored per point: a uniform sample beyond
    min_holdout: int = 30  # the store's own labelled rows score the curve when at least this many; else K-fold
    folds: int = 5
    seconds: float = 30.0  # no new point starts once the curve has taken this long (said in the output)

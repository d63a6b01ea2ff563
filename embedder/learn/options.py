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

"""Linear heads on frozen features, as plain numpy (a probe's, or a fine-tuned checkpoint's own)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class LinearHead:
    coef: np.ndarray  # [classes, dim]
    intercept: np.ndarray  # [classes]
    mean: np.ndarray  # standardisation (zeros/ones when off)
    scale: np.ndarray

    def logits(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.scale) @ self.coef.T + self.intercept

    def proba(self, x: np.ndarray) -> np.ndarray:
        z = self.logits(x)
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)  # type: ignore[no-any-return]

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
    normalize: bool = False  # rows L2-normalised first (a CLIP checkpoint's head reads unit vectors)

    def logits(self, x: np.ndarray) -> np.ndarray:
        if self.normalize:
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return ((x - self.mean) / self.scale) @ self.coef.T + self.intercept

    def proba(self, x: np.ndarray) -> np.ndarray:
        z = self.logits(x)
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)  # type: ignore[no-any-return]

"""Linear heads on frozen features, as plain numpy (a probe's, or a fine-tuned checkpoint's own)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedder.errors import ProbeError


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


def checkpoint_head(path: Path) -> tuple[LinearHead, list[str]]:
    """The checkpoint's own classification head as a LinearHead on its penultimate features."""
    from embedder.models.checkpoint import load
    from embedder.models.registry import get_backbone

    state, meta = load(path)
    backbone = get_backbone(meta["backbone"])
    try:
        w = state[f"{backbone.head}.weight"].float().numpy()
        b = state[f"{backbone.head}.bias"].float().numpy()
    except KeyError:
        raise ProbeError(f"{path} holds no classification head ({backbone.head})") from None
    dim = w.shape[1]
    return LinearHead(w, b, np.zeros(dim, np.float32), np.ones(dim, np.float32)), list(meta["classes"])

"""2-D coordinates for the embedding map: PCA (default), or UMAP after PCA to 50 dimensions when
the optional ``umap-learn`` package is installed."""

from __future__ import annotations

import numpy as np

from embedder.analysis.options import PROJECTIONS
from embedder.errors import InspectError


def project(x: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    if method not in PROJECTIONS:
        raise InspectError(f"unknown projection {method!r}; valid: {', '.join(PROJECTIONS)}")
    n, d = x.shape
    if n < 3 or d < 2:
        return np.zeros((n, 2), np.float32) if n < 3 else np.column_stack([x[:, 0], np.zeros(n)]).astype(np.float32)
    from sklearn.decomposition import PCA

    if method == "pca":
        return PCA(2, svd_solver="randomized", random_state=seed).fit_transform(x).astype(np.float32)
    try:
        import umap
    except ImportError:
        raise InspectError("--projection umap needs the optional package: pip install 'embedder[umap]'") from None
    z = PCA(min(50, d, n - 1), svd_solver="randomized", random_state=seed).fit_transform(x)
    reducer = umap.UMAP(n_components=2, metric="cosine", random_state=seed, n_jobs=1)  # seeded: one thread
    return np.asarray(reducer.fit_transform(z), np.float32)

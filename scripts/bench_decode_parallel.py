"""Decoding throughput with N threads against N processes (issue 13: "decode workers on all cores,
threads or processes, whichever measures faster"). The same generated 500×375 JPEGs, decoded and
resized exactly as `embedder extract` does (`decode.decode_file`, the weights' preprocessing), one
run on one machine: a pool of threads (today's pipeline) and a pool of processes, each warmed up.

Usage: python scripts/bench_decode_parallel.py [--images 1024] [--workers N] [--decoder pil]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))

PRE = None
DECODER = "pil"


def _init(decoder: str, one_torch_thread: bool = False) -> None:
    global PRE, DECODER
    from embedder.models.registry import get_backbone

    if one_torch_thread:  # a process pool: N processes × all-core torch pools would oversubscribe
        import torch

        torch.set_num_threads(1)

    PRE = get_backbone("resnet50").preprocessing()
    DECODER = decoder


def _decode(path: str) -> int:
    from embedder.decode.decoders import decode_file

    return int(decode_file(path, PRE, decoder=DECODER).pixels.shape[-1])  # type: ignore[arg-type]


def rate(pool_cls: type, workers: int, paths: list[str], decoder: str) -> float:
    with pool_cls(workers, initializer=_init, initargs=(decoder, pool_cls is ProcessPoolExecutor)) as pool:
        list(pool.map(_decode, paths[:workers * 2]))  # warm-up: imports, first decodes
        t = time.perf_counter()
        list(pool.map(_decode, paths, chunksize=8) if pool_cls is ProcessPoolExecutor else pool.map(_decode, paths))
        return len(paths) / (time.perf_counter() - t)


def peak_rss_mib(who: str) -> int:
    import resource

    which = resource.RUSAGE_SELF if who == "self" else resource.RUSAGE_CHILDREN
    return round(resource.getrusage(which).ru_maxrss / 1024)


def main() -> None:
    from bench_extract import make_images

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--decoder", default="pil")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    _init(args.decoder)
    with tempfile.TemporaryDirectory(prefix="bench_decode_") as tmp:
        make_images(Path(tmp), args.images, (500, 375))
        paths = sorted(str(p) for p in Path(tmp).rglob("*.jpg"))
        one = rate(ThreadPoolExecutor, 1, paths[:128], args.decoder)
        threads = rate(ThreadPoolExecutor, args.workers, paths, args.decoder)
        procs = rate(ProcessPoolExecutor, args.workers, paths, args.decoder)
    out = {"cores": os.cpu_count(), "workers": args.workers, "decoder": args.decoder, "images": len(paths),
           "one_thread_img_s": round(one, 1), "threads_img_s": round(threads, 1),
           "processes_img_s": round(procs, 1), "processes_vs_threads": round(procs / threads, 2),
           "peak_rss_mib": {"threads (this process)": peak_rss_mib("self"),
                            "one worker process": peak_rss_mib("children")}}
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out))


if __name__ == "__main__":
    main()

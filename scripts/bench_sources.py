"""The same images as loose files, as WebDataset tar shards (plain and gzip'd) and as a Parquet table of
image bytes: `embedder extract` img/s and peak RSS for each, one run on one machine; then many more samples in
shards, to show memory does not grow with the number of samples.

    python scripts/bench_sources.py [--images 10000] [--many 100000] [--shards 10] [--backbone tiny_test]
    python scripts/bench_sources.py --one-group-only [--one-group-mb 146] [--threads 1,2,4]

Each extraction is its own process (`python -m embedder extract`); peak RSS is that process's
(``wait4``'s ru_maxrss). The images are small generated JPEGs (class-coloured noise, 96x72), so
the numbers compare reading and decoding paths, not a model: the default backbone is the tiny test
network (`--backbone mobilenet_v2:IMAGENET1K_V1` for a real one).

The one-row-group rows: a Parquet table of image bytes written as ONE row group (pyarrow's default
row group is 1 Mi rows, so most tables people have are one group) of about ``--one-group-mb`` MB,
extracted with 1, 2 and 4 decode threads (``--decode-in threads --workers N``): peak RSS should not
grow with the group's size nor with the threads.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def make_jpegs(n: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """(class, JPEG bytes): 10 classes of coloured noise, 96x72, quality 90."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        c = i % 10
        base = np.array([(c * 25) % 256, (c * 70) % 256, (c * 130) % 256], np.float32)
        px = np.clip(base + rng.normal(0, 40, (72, 96, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(px).save(buf, "JPEG", quality=90)
        out.append((f"c{c}", buf.getvalue()))
    return out


def write_files(root: Path, images: list[tuple[str, bytes]]) -> None:
    for i, (label, data) in enumerate(images):
        d = root / label
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:07d}.jpg").write_bytes(data)


def write_shards(root: Path, images: list[tuple[str, bytes]], shards: int, start: int = 0) -> None:
    root.mkdir(parents=True, exist_ok=True)
    per = -(-len(images) // shards)
    for s in range(shards):
        with tarfile.open(root / f"{start + s:05d}.tar", "w") as tf:
            for i in range(s * per, min(len(images), (s + 1) * per)):
                label, data = images[i]
                for name, payload in ((f"{i:09d}.jpg", data), (f"{i:09d}.txt", f"a {label}".encode()),
                                      (f"{i:09d}.json", json.dumps({"label": label}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))


def write_table(path: Path, images: list[tuple[str, bytes]]) -> None:
    t = pa.table({"image": pa.array([d for _, d in images], pa.binary()), "label": [lab for lab, _ in images],
                  "caption": [f"a {lab}" for lab, _ in images]})
    pq.write_table(t, path, row_group_size=1000)


def write_one_group(path: Path, images: list[tuple[str, bytes]], mb: float) -> int:
    """IMAGES repeated to about MB megabytes, as a Parquet table of ONE row group; its rows."""
    per = sum(len(d) for _, d in images) / len(images)
    n = max(1, int(mb * (1 << 20) / per))
    rows = [images[i % len(images)] for i in range(n)]
    t = pa.table({"image": pa.array([d for _, d in rows], pa.binary()), "label": [lab for lab, _ in rows]})
    pq.write_table(t, path, row_group_size=n)
    return n


def run_extract(sources: list[str], out: Path, backbone: str, extra: list[str] | None = None) -> dict[str, float]:
    cmd = [sys.executable, "-m", "embedder", "extract", *sources, "--out", str(out), "--backbone", backbone,
           "--json", *(extra or [])]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    stdout = proc.stdout.read().decode() if proc.stdout else ""
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{stderr[-2000:]}")
    summary = json.loads(stdout[stdout.index("{"):])
    return {"images": summary["done"], "seconds": round(seconds, 1),
            "img_per_s": round(summary["done"] / seconds, 1),
            "img_per_s_extract": summary["images_per_second"],
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def one_group_rows(work: Path, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """The one-row-group table extracted with each number of decode threads (peak RSS is the point)."""
    path = work / "one_group.parquet"
    n = write_one_group(path, make_jpegs(2000, seed=1), args.one_group_mb)
    mb = path.stat().st_size / 1e6
    rows = {}
    for t in (int(x) for x in args.threads.split(",")):
        rows[f"{mb:.0f} MB Parquet, one row group of {n:,} rows, {t} decode thread(s)"] = run_extract(
            [str(path)], work / f"s_one_group_{t}", args.backbone, ["--decode-in", "threads", "--workers", str(t)])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--many", type=int, default=100_000, help="samples in shards for the memory row (0: skip)")
    ap.add_argument("--shards", type=int, default=10)
    ap.add_argument("--backbone", default="tiny_test")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--one-group-mb", type=float, default=146.0, help="size of the one-row-group table (0: skip)")
    ap.add_argument("--threads", default="1,2,4", help="decode threads for the one-row-group table")
    ap.add_argument("--one-group-only", action="store_true", help="only the one-row-group rows")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_sources_"))
    try:
        if args.one_group_only:
            print(json.dumps({"machine": f"{platform.machine()}, {os.cpu_count()} cores", "backbone": args.backbone,
                              "rows": one_group_rows(work, args)}, indent=2))
            return
        images = make_jpegs(args.images)
        write_files(work / "files", images)
        write_shards(work / "shards", images, args.shards)
        write_table(work / "table.parquet", images)
        import gzip

        (work / "gz").mkdir()
        for shard in sorted((work / "shards").glob("*.tar")):  # the same shards, gzip'd (level 6, gzip's own)
            (work / "gz" / (shard.name + ".gz")).write_bytes(gzip.compress(shard.read_bytes(), 6))
        rows = {
            "loose files": run_extract([str(work / "files")], work / "s_files", args.backbone),
            f"{args.shards} tar shards": run_extract([str(work / "shards" / "*.tar")], work / "s_shards",
                                                     args.backbone),
            f"{args.shards} gzip'd tar shards": run_extract([str(work / "gz" / "*.tar.gz")], work / "s_gz",
                                                            args.backbone),
            "Parquet (image bytes)": run_extract([str(work / "table.parquet")], work / "s_table", args.backbone),
        }
        if args.many:
            shutil.rmtree(work / "files")
            many = work / "many"
            per_round = args.images
            for r in range(args.many // per_round):  # the same JPEGs again, in more shards
                write_shards(many, images, args.shards, start=r * args.shards)
            n_many = args.many // per_round * args.shards
            rows[f"{args.many:,} samples, {n_many} tar shards"] = run_extract(
                [str(many / "*.tar")], work / "s_many", args.backbone)
            for shard in sorted(many.glob("*.tar")):  # the same, gzip'd: memory level with 10,000 too?
                shard.with_name(shard.name + ".gz").write_bytes(gzip.compress(shard.read_bytes(), 6))
                shard.unlink()
            rows[f"{args.many:,} samples, {n_many} gzip'd tar shards"] = run_extract(
                [str(many / "*.tar.gz")], work / "s_many_gz", args.backbone)
        if args.one_group_mb:
            rows.update(one_group_rows(work, args))
        print(json.dumps({"machine": f"{platform.machine()}, {os.cpu_count()} cores", "backbone": args.backbone,
                          "rows": rows}, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

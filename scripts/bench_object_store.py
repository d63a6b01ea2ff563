"""A store in object storage against a store on disk, one run on one machine.

An S3-protocol server (moto's standalone `moto_server`, started here as its own process on this
machine, so no network latency is measured: what the table shows is embedder's own cost — requests,
bytes, CPU — per shard) and `embedder extract` as a fresh CLI process per row, the same generated
images each time:
- `disk`: `--out DIR` on the local disk;
- `disk + upload`: what a user would otherwise do — extract to disk, then copy every file of the
  store to the bucket (like `aws s3 sync`, here with pyarrow's `copy_files`); timed together;
- `s3`: `--out s3://bucket/prefix` directly;
- `resume`: the same command again on each store (every image already present: the id index read).
Reported: img/s of the command (model loading included), peak RSS of the CLI process, and the
requests the server answered during the row (from its request log), per committed shard.

    python scripts/bench_object_store.py [--images 2000] [--shard-rows 256] [--backbone tiny_test]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent))
sys.path.insert(0, str(Path(__file__).parent))
from bench_extract import _peak_rss_mib  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Seconds and peak RSS (MiB) of one CLI process."""
    rss, seconds = _peak_rss_mib(cmd, env)
    return seconds, round(rss)


def requests_since(log: Path, offset: int) -> tuple[Counter[str], int]:
    text = log.read_text(errors="replace")
    methods = Counter(m.group(1) for m in re.finditer(r'"(GET|PUT|HEAD|POST|DELETE) ', text[offset:]))
    return methods, len(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--shard-rows", type=int, default=256)
    ap.add_argument("--backbone", default="tiny_test")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import pyarrow.fs as pafs

    from tests.conftest import make_images

    tmp = Path(tempfile.mkdtemp(prefix="bench_object_store_"))
    port = free_port()
    log = tmp / "moto.log"
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=open(log, "w"))  # noqa: SIM115
    try:
        endpoint = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint, "EMBEDDER_OFFLINE": "1"}
        os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")})
        admin = pafs.S3FileSystem(allow_bucket_creation=True, endpoint_override=endpoint, region="us-east-1")
        admin.create_dir("bench")
        src = tmp / "imgs"
        make_images(src, {"a": args.images // 2, "b": args.images - args.images // 2}, size=(160, 120))
        cli = [sys.executable, "-m", "embedder", "extract", str(src), "--backbone", args.backbone,
               "--shard-rows", str(args.shard_rows)]
        shards = -(-args.images // args.shard_rows)
        rows: list[dict[str, object]] = []
        offset = len(log.read_text(errors="replace"))

        def record(name: str, seconds: float, rss: int, images: int) -> None:
            nonlocal offset
            methods, offset = requests_since(log, offset)
            total = sum(methods.values())
            rows.append({"row": name, "seconds": round(seconds, 2), "img_s": round(images / seconds, 1),
                         "peak_rss_mib": rss, "requests": total, "per_shard": round(total / shards, 1),
                         "by_method": dict(methods)})
            print(f"{name:<16} {seconds:7.2f} s  {images / seconds:8.1f} img/s  {rss:5d} MiB  "
                  f"{total:5d} requests ({total / shards:.1f} per shard: {dict(methods)})", flush=True)

        s, rss = run([*cli, "--out", str(tmp / "disk")], env)
        record("disk", s, rss, args.images)
        s, rss = run([*cli, "--out", str(tmp / "disk2")], env)
        t = time.perf_counter()
        pafs.copy_files(str(tmp / "disk2"), "bench/synced", destination_filesystem=admin)
        s += time.perf_counter() - t
        record("disk + upload", s, rss, args.images)
        s, rss = run([*cli, "--out", "s3://bench/direct"], env)
        record("s3", s, rss, args.images)
        s, rss = run([*cli, "--out", str(tmp / "disk")], env)
        record("resume, disk", s, rss, args.images)
        s, rss = run([*cli, "--out", "s3://bench/direct"], env)
        record("resume, s3", s, rss, args.images)
        result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "images": args.images,
                  "shard_rows": args.shard_rows, "backbone": args.backbone, "rows": rows}
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Tar shards read by `embedder extract`: peak memory of a gzip bomb, and what decoding fetches from
object storage.

- `bomb`: a small `.tar.gz` whose `.txt` member decompresses to 200 MiB (and one normal sample);
  reported: the CLI's peak RSS and the longest caption the store holds;
- `s3 …`: one shard of generated images in an S3-protocol server (moto's, in this process, wrapped
  to count the body bytes and GET requests it serves per object, whichever process asks), extracted
  by the CLI with decode threads or processes; reported: bytes served on the shard against its size,
  GETs, peak RSS.

Run against another checkout with ``PYTHONPATH=/that/checkout`` (the CLI runs as ``python -m embedder``
in a child process, which inherits it):

    python scripts/bench_shard_reads.py [--images 200] [--workers 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import logging
import os
import sys
import tarfile
import tempfile
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent.parent))


def peak_rss(cmd: list[str], env: dict[str, str]) -> tuple[int, float, str]:
    """Peak RSS (MiB) and seconds of CMD, by GNU time (which starts it from its own small process: a
    child forked from this one would report this one's peak), and the CLI's summary line."""
    import subprocess

    done = subprocess.run(["/usr/bin/time", "-f", "%M %e", *cmd], env=env, capture_output=True, text=True)
    kb, seconds = done.stderr.strip().splitlines()[-1].split()
    summary = next((ln[ln.index("done "):] for ln in done.stdout.splitlines() if "done " in ln), done.stderr[-300:])
    return round(int(kb) / 1024), float(seconds), summary.strip()


class Repeated(io.RawIOBase):
    """N bytes of b"a", read in pieces."""

    def __init__(self, n: int) -> None:
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        k = min(len(b), self.left)
        b[:k] = b"a" * k
        self.left -= k
        return k


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def longest_caption(store: Path) -> int:
    import pyarrow.parquet as pq

    longest = 0
    for part in store.glob("part-*.parquet"):
        caps = pq.read_table(part, columns=["caption"]).column("caption").to_pylist()
        longest = max([longest, *(len(c) for c in caps if c)])
    return longest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import pyarrow.fs as pafs
    from moto.moto_server.threaded_moto_server import MotoRequestHandler
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    from tests.conftest import make_images

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    tmp = Path(tempfile.mkdtemp(prefix="bench_shard_reads_"))
    env = {**os.environ, "EMBEDDER_OFFLINE": "1"}
    cli = [sys.executable, "-m", "embedder", "extract", "--backbone", "tiny_test"]
    rows: list[dict[str, object]] = []
    files = sorted(make_images(tmp / "f", {"a": args.images // 2, "b": args.images - args.images // 2},
                               size=(320, 240), seed=1))

    # the gzip bomb: 200 MiB of caption in a few hundred KB (written as a stream: this process stays small)
    bomb = tmp / "bomb.tar.gz"
    with gzip.open(bomb, "wb", 9) as gz, tarfile.open(fileobj=gz, mode="w") as tf:
        for name, data in (("0.jpg", files[0].read_bytes()), ("0.txt", None), ("1.jpg", files[1].read_bytes()),
                           ("1.txt", b"a caption")):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = (200 << 20) if data is None else len(data), 0
            tf.addfile(info, Repeated(info.size) if data is None else io.BytesIO(data))
    rss, seconds, summary = peak_rss([*cli, str(bomb), "--out", str(tmp / "bomb-store")], env)
    rows.append({"row": "bomb (.tar.gz, 200 MiB .txt member)", "file_kb": round(bomb.stat().st_size / 1024),
                 "peak_rss_mib": rss, "longest_caption": longest_caption(tmp / "bomb-store"),
                 "seconds": seconds, "summary": summary})
    print(rows[-1], flush=True)

    from tests.test_shard_limits import Counting  # the test's counter: one middleware

    counting = Counting(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", 0, counting, True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        fs = pafs.S3FileSystem(allow_bucket_creation=True, endpoint_override=endpoint, region="us-east-1",
                               access_key="bench", secret_key="bench")
        fs.create_dir("bench")
        members = []
        for i, f in enumerate(files):
            members += [(f"{i:06d}.jpg", f.read_bytes()), (f"{i:06d}.cls", f.parent.name.encode()),
                        (f"{i:06d}.txt", f"caption {i}".encode())]
        raw = tar_bytes(members)
        images = sum(f.stat().st_size for f in files)
        for name, data in (("s.tar", raw), ("s.tar.gz", gzip.compress(raw, 6))):
            with fs.open_output_stream(f"bench/{name}", compression=None) as out:  # not gzip'd again
                out.write(data)
        s3env = {**env, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}
        for name, decode_in, workers in (("s.tar", "threads", args.workers), ("s.tar", "processes", 2),
                                         ("s.tar.gz", "threads", args.workers)):
            key = f"/bench/{name}"
            counting.bytes.clear()
            counting.gets.clear()
            store = tmp / f"store-{name}-{decode_in}"
            rss, seconds, summary = peak_rss([*cli, f"s3:/{key}", "--out", str(store), "--decode-in", decode_in,
                                              "--workers", str(workers)], s3env)
            served = counting.bytes.get(key, 0)
            size = len(raw) if name == "s.tar" else len(gzip.compress(raw, 6))
            rows.append({"row": f"s3 {name}, {workers} decode {decode_in}", "shard_mib": round(size / 2**20, 2),
                         "images_mib": round(images / 2**20, 2), "served_mib": round(served / 2**20, 2),
                         "served_x_shard": round(served / size, 2), "gets": counting.gets.get(key, 0),
                         "peak_rss_mib": rss, "seconds": seconds, "summary": summary})
            print(rows[-1], flush=True)
    finally:
        server.shutdown()
        thread.join()
    if args.json:
        args.json.write_text(json.dumps({"machine": f"{os.cpu_count()} cores", "images": args.images,
                                         "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

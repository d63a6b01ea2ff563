"""Load on `embedder serve` over loopback: 1, 4 and 16 concurrent clients, image queries and vector
queries, micro-batching on and off, in one run on one machine; beside the CLI (`embedder search` per
query, a fresh process each time, and `embedder search --server`).

Image queries go to an index of generated photos embedded with MobileNetV2 (IMAGENET1K_V1 when its
weights are in the cache, else seeded random weights of the same architecture: same cost). Vector
queries go to an HNSW index of 100,000 x 512 clustered vectors. Each cell runs for --seconds with
persistent connections (one per client thread); the clients share the machine with the server,
which on 2 cores costs the server CPU (stated in the results).

    python scripts/bench_serve.py [--seconds 8] [--json out.json]

With --tiny-queries: the server's peak RSS and its /healthz latency while one client sends a body
of 1.9 M tiny id queries just under 20 MiB (with a Content-Length, then chunked), and the answer it
gets (issue 33: that body was parsed on the event loop before the query cap refused it).

    python scripts/bench_serve.py --tiny-queries
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_extract import make_images  # noqa: E402
from bench_search import clustered, write_store  # noqa: E402

from embedder.embed.fill import extract  # noqa: E402
from embedder.index import build as idx  # noqa: E402
from embedder.index import plan as index_plan
from embedder.models.builder import ModelSpec  # noqa: E402
from embedder.models.hub import registry_file  # noqa: E402
from embedder.models.registry import get_backbone  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def multipart(image: bytes, fields: dict[str, str]) -> tuple[bytes, str]:
    b = uuid.uuid4().hex
    parts = [f'--{b}\r\ncontent-disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()]
    parts.append(f'--{b}\r\ncontent-disposition: form-data; name="file"; filename="q.jpg"\r\n'
                 "content-type: image/jpeg\r\n\r\n".encode() + image + b"\r\n")
    parts.append(f"--{b}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={b}"


def load(port: int, clients: int, seconds: float, make_body) -> dict:  # type: ignore[no-untyped-def]
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def client(seed: int) -> None:
        nonlocal errors
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        rng = np.random.default_rng(seed)
        mine, bad = [], 0
        while time.perf_counter() < stop:
            body, ctype = make_body(rng)
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/search", body, {"content-type": ctype})
                r = conn.getresponse()
                r.read()
                ok = r.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            mine.append(time.perf_counter() - t0)
            bad += not ok
        with lock:
            latencies.extend(mine)
            errors += bad

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    return {"clients": clients, "requests": len(lat), "qps": round(len(lat) / wall, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 1), "p99_ms": round(float(np.percentile(lat, 99)), 1),
            "errors": errors}


def serve(home: Path, batching: bool, weights: dict[str, str]) -> tuple[subprocess.Popen, int]:  # type: ignore[type-arg]
    port = free_port()
    cmd = [sys.executable, "-m", "embedder", "serve", "--home", str(home), "--port", str(port), "--poll-seconds", "0",
           "--micro-batching" if batching else "--no-micro-batching"]
    for name, path in weights.items():
        cmd += ["--weights", f"{name}={path}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"server did not start: {proc.communicate()[1][-2000:]}")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def tiny_queries(tmp: Path) -> dict:  # type: ignore[type-arg]
    """Peak RSS and /healthz latency of a server refusing a 20 MiB body of tiny id queries."""
    home = tmp / "home"
    write_store(tmp / "vec.store", clustered(2000, 64, seed=0))
    idx.build(str(tmp / "vec.store"), "vectors", index_plan.BuildOptions(kind="flat"), str(home))
    one = b'{"id": "x"},'

    def tiny(size: int) -> bytes:
        return b'{"index": "vectors", "queries": [' + one * ((size - 1024) // len(one)) + b'{"id": "x"}]}'

    proc, port = serve(home, True, {})
    out: dict = {}  # type: ignore[type-arg]
    try:
        out["rss_ready_mib"] = round(peak_rss_mib(proc.pid))
        # the 20 MiB body with a Content-Length, then chunked; last, a body just under the JSON limit
        for label, body, chunked in (("content_length", tiny(20 * 2**20), False),
                                     ("chunked", tiny(20 * 2**20), True),
                                     ("under_2_mib", tiny(2 * 2**20), False)):
            answer: list = []  # type: ignore[type-arg]

            def send(chunked: bool = chunked, answer: list = answer,  # type: ignore[type-arg]
                     body: bytes = body) -> None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
                t0 = time.perf_counter()
                try:
                    if chunked:
                        step = 1 << 20
                        conn.request("POST", "/search", (body[i:i + step] for i in range(0, len(body), step)),
                                     {"content-type": "application/json"}, encode_chunked=True)
                    else:
                        conn.request("POST", "/search", body, {"content-type": "application/json"})
                    r = conn.getresponse()
                    answer.append((r.status, r.read()[:200].decode(), round(time.perf_counter() - t0, 2)))
                except OSError as e:
                    answer.append((None, f"{type(e).__name__}: {e}", round(time.perf_counter() - t0, 2)))

            sender = threading.Thread(target=send)
            sender.start()
            waits = []
            while sender.is_alive():
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
                t0 = time.perf_counter()
                conn.request("GET", "/healthz")
                conn.getresponse().read()
                waits.append(time.perf_counter() - t0)
                time.sleep(0.02)
            sender.join()
            status, text, seconds = answer[0]
            out[label] = {
                "body_mib": round(len(body) / 2**20, 2), "queries": body.count(b'"id"'),
                "status": status, "answer": text, "answered_in_s": seconds,
                "healthz_max_s": round(max(waits, default=0.0), 3), "healthz_checks": len(waits),
                "peak_rss_mib": round(peak_rss_mib(proc.pid))}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--vectors", type=int, default=100_000)
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--tiny-queries", action="store_true", help="Only the 20 MiB body of tiny queries.")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    if args.tiny_queries:
        result = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
                  "tiny_queries": tiny_queries(tmp)}
        print(json.dumps(result, indent=2))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        return
    home = tmp / "home"
    # image index
    make_images(tmp / "images", args.images, (500, 375))
    entry = get_backbone("mobilenet_v2")
    weights: dict[str, str] = {}
    if registry_file(entry, "IMAGENET1K_V1")[1].exists():
        spec = ModelSpec("mobilenet_v2", "IMAGENET1K_V1")
    else:
        import torch

        torch.manual_seed(0)
        f = tmp / "mnv2.pth"
        torch.save(entry.build_architecture("IMAGENET1K_V1").state_dict(), f)
        spec = ModelSpec("mobilenet_v2", "IMAGENET1K_V1", f)
        weights["photos"] = str(f)
    extract([str(tmp / "images")], str(tmp / "photos.store"), spec)
    idx.build(str(tmp / "photos.store"), "photos", index_plan.BuildOptions(kind="flat"), str(home))
    # vector index
    x = clustered(args.vectors + 1000, 512, seed=0)
    queries = x[args.vectors:]
    write_store(tmp / "vec.store", x[:args.vectors])
    meta = idx.build(str(tmp / "vec.store"), "vectors", index_plan.BuildOptions(kind="hnsw"), str(home))
    images = [p.read_bytes() for p in sorted((tmp / "images").rglob("*.jpg"))]

    def image_body(rng):  # type: ignore[no-untyped-def]
        return multipart(images[int(rng.integers(len(images)))], {"index": "photos", "k": "10"})

    def vector_body(rng):  # type: ignore[no-untyped-def]
        q = queries[int(rng.integers(len(queries)))]
        return json.dumps({"index": "vectors", "k": 10, "vector": q.tolist()}).encode(), "application/json"

    rows = []
    rss = {}
    for batching in (False, True):
        proc, port = serve(home, batching, weights)
        try:
            for kind, body in (("image", image_body), ("vector", vector_body)):
                for c in (int(v) for v in args.clients.split(",")):
                    r = load(port, c, args.seconds, body)
                    rows.append({"query": kind, "micro_batching": batching, **r})
                    print(json.dumps(rows[-1]), flush=True)
            rss["micro_batching" if batching else "one_at_a_time"] = round(peak_rss_mib(proc.pid))
            cli_remote = []
            for i in range(3):
                q = tmp / "images" / ("a" if i % 2 else "b")
                path = sorted(q.glob("*.jpg"))[i]
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "-m", "embedder", "search", "photos", str(path), "--server",
                                f"http://127.0.0.1:{port}", "--json"], check=True, capture_output=True)
                cli_remote.append(time.perf_counter() - t0)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    cli_local = []
    env = {**os.environ, "EMBEDDER_HOME": str(home)}
    for path in sorted((tmp / "images").rglob("*.jpg"))[:3]:
        cmd = [sys.executable, "-m", "embedder", "search", "photos", str(path), "--json"]
        if weights:
            cmd += ["--weights", weights["photos"]]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, env=env)
        cli_local.append(time.perf_counter() - t0)
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "image_index": {"images": args.images,
                        "model": "mobilenet_v2:IMAGENET1K_V1" + (" (random weights)" if weights else "")},
        "vector_index": {"vectors": args.vectors, "dim": 512, "factory": meta["factory"],
                         "recall_at_10": meta["quality"]["recall_at_10"]},
        "rows": rows, "server_peak_rss_mib": rss,
        "cli_per_query_s": {"embedder search (fresh process)": round(float(np.median(cli_local)), 2),
                            "embedder search --server": round(float(np.median(cli_remote)), 2)},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

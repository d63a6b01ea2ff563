"""The Ray engine against the local engine: the same images, the same model, one run on one machine.

A Ray cluster is started once (`ray start --head`, as a user with a cluster has one running), then
`embedder extract` runs as a fresh CLI process for each row: the local engine, and the Ray engine
with 1 and then 2 model actors (decode tasks on the remaining CPUs). Reported: img/s (wall time of
the whole command, model loading included), the ratio to the local engine, and memory: the local
command's peak RSS (with its decode threads), and for Ray the driver's peak RSS plus the peak RSS of
every Ray worker process (decode tasks, model actors), sampled from /proc every 0.2 s.

    python scripts/bench_ray.py [--images 256] [--backbone mobilenet_v2:IMAGENET1K_V1] [--cpus N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_extract import make_images  # noqa: E402

RAY_CLI = str(Path(sys.executable).parent / "ray")


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class RaySampler(threading.Thread):
    """Peak RSS of each Ray worker process ('ray::…' in its command line) while a run lasts."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peaks: dict[int, int] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for entry in os.listdir("/proc"):
                if not entry.isdigit():
                    continue
                try:
                    cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
                except OSError:
                    continue
                if cmd.startswith(b"ray::") and b"ray::IDLE" not in cmd:
                    pid = int(entry)
                    self.peaks[pid] = max(self.peaks.get(pid, 0), rss_kib(pid))
            time.sleep(0.2)

    def total_mib(self) -> int:
        return round(sum(self.peaks.values()) / 1024)


def run_cli(args: list[str]) -> tuple[dict[str, object], float, int]:
    """A fresh `embedder extract … --json` process: its summary, wall seconds and peak RSS (MiB)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "embedder", "extract", *args, "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"extract failed: {err[-2000:]}")
    summary = json.loads(out)
    import resource

    peak = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)  # max over children so far
    return summary, wall, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--backbone", default="mobilenet_v2:IMAGENET1K_V1")
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="CPUs of the Ray cluster")
    ap.add_argument("--ray-batch", default="",
                    help="comma list of model batch sizes for the Ray rows (default: the engine's own)")
    ap.add_argument("--cpu-graphs", default="auto",
                    help="comma list of --cpu-graph values (auto | eager | onednn): every row runs with each; auto "
                         "times the graphs only on runs of 250+ batches (per actor on Ray)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_ray_"))
    env_auth = os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway cluster on 127.0.0.1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    head = subprocess.Popen([RAY_CLI, "start", "--head", "--block", f"--port={port}", f"--num-cpus={args.cpus}",
                             "--include-dashboard=false", "--disable-usage-stats", "--node-ip-address=127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    rows = []
    try:
        images = tmp / "images"
        make_images(images, args.images, (500, 375))
        time.sleep(8)  # the head's processes settle
        for graph in args.cpu_graphs.split(","):
            base = ["--backbone", args.backbone, "--cpu-graph", graph]
            summary, wall, peak = run_cli([str(images), "--out", str(tmp / f"local-{graph}"), *base])
            local_rate = summary["done"] / wall
            rows.append({"engine": "local", "cpu_graph": graph, "workers": "decode in lanes",
                         "img_s": round(local_rate, 1), "peak_rss_mib": {"command": peak}})
            for k, (batch, workers) in enumerate([(b, w) for b in (args.ray_batch.split(",") if args.ray_batch
                                                                   else [""]) for w in (1, 2)]):
                sampler = RaySampler()
                sampler.start()
                summary, wall, _ = run_cli([str(images), "--out", str(tmp / f"ray{k}-{graph}"), *base,
                                            "--engine", "ray", "--address", f"127.0.0.1:{port}",
                                            "--actors", str(workers), *(["--batch-size", batch] if batch else [])])
                sampler.stop.set()
                sampler.join()
                rate = summary["done"] / wall
                rows.append({"engine": "ray", "cpu_graph": graph, "workers": workers, "batch": batch or "default",
                             "img_s": round(rate, 1), "vs_local": round(rate / local_rate, 2),
                             "peak_rss_mib": {"ray_workers_sum": sampler.total_mib(), "worker_processes":
                                              len(sampler.peaks)}})
                assert summary["done"] == args.images, summary
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, 9)
        shutil.rmtree(tmp, ignore_errors=True)
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
              "backbone": args.backbone, "images": args.images, "size": "500x375", "ray_cpus": args.cpus,
              "ray_auth_mode": env_auth, "rows": rows}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

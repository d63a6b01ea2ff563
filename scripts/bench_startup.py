"""Start-up time of the light commands, beside the cost of importing torch alone (what any command
pays that imports torch at start). Best of --repeat runs, each a fresh process.

    python scripts/bench_startup.py [--store STORE] [--repeat 5]
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

ROOT = Path(__file__).resolve().parent.parent


def best_of(cmd: list[str], repeat: int, env: dict[str, str]) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, check=False)
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=str(ROOT / "tests" / "data" / "store-v1"))
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    env = {**os.environ, "EMBEDDER_HOME": tempfile.mkdtemp(prefix="startup_home_")}
    py = [sys.executable]
    rows = {"python -c pass": best_of([*py, "-c", "pass"], args.repeat, env),
            "python -c 'import torch'": best_of([*py, "-c", "import torch"], args.repeat, env)}
    for c in (["--help"], ["backbones"], ["index", "list"], ["info", args.store]):
        rows["embedder " + " ".join(c[:1] if c[0] == "info" else c)] = best_of([*py, "-m", "embedder", *c],
                                                                                args.repeat, env)
    print(json.dumps({"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                      "seconds": {k: round(v, 3) for k, v in rows.items()}}, indent=2))


if __name__ == "__main__":
    main()

"""Train a probe on STORE in this fresh process and print, as JSON, the RSS (MiB) after the imports
and the peak RSS after the probe (and whether its vectors were streamed). Run by test_memory.

    python probe_rss.py STORE [BUDGET_BYTES]
"""

from __future__ import annotations

import json
import resource
import sys

import numpy as np


def rss() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def reset_peak() -> None:
    """The peak RSS from now on (Linux: clear_refs 5), so import-time spikes are not counted."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    import sklearn.linear_model  # noqa: F401 - the imports either version of the probe makes
    import torch  # noqa: F401
    import torch as t

    from embedder.learn import probe as pr
    from embedder.learn.options import ProbeOptions

    t.logsumexp(t.randn(512, 256) @ t.randn(256, 64), 1)  # torch's first kernels load before the baseline
    store = sys.argv[1]
    budget = int(sys.argv[2]) if len(sys.argv) > 2 else None
    opts = ProbeOptions(c_min_exp=-2, c_max_exp=-1, refine=False, standardize="no")
    reset_peak()
    before = rss()
    train = pr.load_dataset(store, memory_budget=budget) if budget else pr.load_dataset(store)
    result = pr.train_probe(train, opts)
    peak = peak_rss()
    print(json.dumps({"before": before, "peak": peak, "streamed": not isinstance(train.x, np.ndarray),
                      "C": result.C, "n": len(train.y)}))


if __name__ == "__main__":
    main()

"""Resume's question at scale: which of N discovered images does the store already hold?

A generated store of N rows (ids shaped like embedder's: 32 hex characters; 4,096-row shards as
`embedder extract` writes them; tiny vectors, since only ids matter here) is asked about all of its
N ids plus 10 % new ones, in a fresh process per method:
- `set`: what a user (and embedder before the id index) writes — the store's id column read into a
  Python set, then one membership test per id;
- `index`: `Store.present`, the per-shard id index (sorted 16-byte digests, one shard at a time).
Both get the same list of asked ids (built first; its own memory is reported apart). Reports seconds
and peak RSS above the list's.

With `--manifest-shards N` it measures instead what keeping the manifest costs a writer whose store
already has N shards (250,000 shards of 4,096 rows: a billion images): the seconds of 50 shard
commits when the manifest is rewritten after every shard (what a writer would otherwise do, and what
embedder did) against embedder's `update_manifest` (rewritten at most every 10 s, and at the end).

Usage: python scripts/bench_resume.py [--rows 2000000] [--manifest-shards N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).parent.parent))

SHARD = 4096


def ids_for(n: int, start: int = 0) -> list[str]:
    import hashlib

    return [hashlib.blake2b(str(i).encode(), digest_size=16).hexdigest() for i in range(start, start + n)]


def make(n: int, path: Path) -> None:
    from embedder.models.origin import WeightsRef
    from embedder.models.registry import get_backbone
    from embedder.store.provenance import Provenance
    from embedder.store.shards import Store, embeddings_to_arrow

    prov = Provenance("synthetic", WeightsRef("file", "none", "0"), "penultimate", "avg",
                      get_backbone("tiny_test").preprocessing(), 2, dtype="float16")
    with Store.writer(path, prov) as st:
        schema = st.read().schema
        for s in range(0, n, SHARD):
            ids = ids_for(min(SHARD, n - s), s)
            m = len(ids)
            st.write_shard(pa.table({
                "id": ids, "path": [f"/data/{i}.jpg" for i in ids], "label": [None] * m,
                "embedding": embeddings_to_arrow(np.zeros((m, 2), np.float32), "float16"),
                "width": pa.array([0] * m, pa.int32()), "height": pa.array([0] * m, pa.int32()),
                "file_hash": [None] * m, "caption": [None] * m}, schema=schema))
        st.update_manifest()


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(method: str, path: Path, n: int) -> dict:  # type: ignore[type-arg]
    from embedder.store.shards import Store

    asked = ids_for(n + n // 10)  # the store's N ids and 10 % new ones
    st = Store.open(path)
    st.shard_files()
    base = peak_mib()
    t0 = time.perf_counter()
    if method == "set":
        present = st.ids()
        found = sum(1 for i in asked if i in present)
    else:
        found = int(st.present(asked).sum())
    seconds = time.perf_counter() - t0
    return {"method": method, "seconds": round(seconds, 2), "found": found,
            "peak_rss_above_list_mib": round(peak_mib() - base), "rss_with_list_mib": round(base)}


def manifest_upkeep(shards: int, commits: int = 50) -> dict:  # type: ignore[type-arg]
    """Seconds per shard commit spent on the manifest, per shard and throttled, at SHARDS shards."""
    from embedder.store.shards import FORMAT, MANIFEST, Store

    out: dict = {"shards": shards, "commits": commits}  # type: ignore[type-arg]
    for mode in ("every shard", "embedder"):
        with tempfile.TemporaryDirectory(prefix="bench_manifest_") as t:
            m = {"format": FORMAT, "provenance": {}, "runs": [],
                 "shards": [{"file": f"part-{i:05d}-{i:08x}.parquet", "rows": SHARD} for i in range(shards)]}
            Path(t, MANIFEST).write_text(json.dumps(m, indent=2))
            st = Store(t)
            t0 = time.perf_counter()
            for i in range(commits):
                st.update_manifest({"run_id": "r", "done": i * SHARD}, [(f"part-{shards + i:05d}-new.parquet", SHARD)],
                                   now=mode == "every shard")
            st._save_manifest()  # what closing the writer does
            seconds = time.perf_counter() - t0
            assert len(json.loads(Path(t, MANIFEST).read_text())["shards"]) == shards + commits
            out[mode] = {"seconds": round(seconds, 2), "ms_per_commit": round(seconds / commits * 1000, 1),
                         "manifest_mib": round(Path(t, MANIFEST).stat().st_size / 2**20, 1)}
        print(mode, json.dumps(out[mode]), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--manifest-shards", type=int)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--_child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        print(json.dumps(child(args._child[0], Path(args._child[1]), int(args._child[2]))))
        return
    if args.manifest_shards:
        res = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               **manifest_upkeep(args.manifest_shards)}
        if args.json:
            args.json.write_text(json.dumps(res, indent=1))
        return
    with tempfile.TemporaryDirectory(prefix="bench_resume_") as t:
        store = Path(t) / "s"
        t0 = time.perf_counter()
        make(args.rows, store)
        index_mib = sum(f.stat().st_size for f in (store / "_ids").iterdir()) / 2**20
        out = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "rows": args.rows, "shards": len(list(store.glob("part-*.parquet"))),
               "make_s": round(time.perf_counter() - t0, 1), "id_index_mib": round(index_mib, 1), "runs": []}
        for method in ("set", "index"):
            r = subprocess.run([sys.executable, __file__, "--_child", method, str(store), str(args.rows)],
                               check=True, stdout=subprocess.PIPE, text=True)
            out["runs"].append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(json.dumps(out["runs"][-1]), flush=True)
        a, b = out["runs"]
        out["index_vs_set"] = {"time": round(b["seconds"] / max(a["seconds"], 1e-9), 2),
                               "memory": round(b["peak_rss_above_list_mib"] / max(a["peak_rss_above_list_mib"], 1), 3)}
        print(json.dumps(out, indent=1))
        if args.json:
            args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

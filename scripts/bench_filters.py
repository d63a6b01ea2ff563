"""Filtered and id queries on a big index, as the service answers them: load (the service's loader,
``Engine._load``), then the first and later filtered queries, and the first lookup by id, with the
peak RSS of each phase — for this checkout and, with --old, another checkout of embedder (e.g. a
worktree of an earlier commit) on the same data.

Data: a synthetic store of N small vectors (--dim 16) with embedder-shaped ids (32 hex characters),
a ``label`` of 100 values, a unique ``path`` and ``file_hash`` and a ``width`` of 10 values, and an
on-disk (streamed) IVF index over it (--in-memory: a flat one). Each measurement runs in a fresh
process (its peak RSS is its own). Wall times are indicative only on a shared machine.

    python scripts/bench_filters.py --n 1000000 10000000 --old /tmp/filters-old --md out.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

SHARD = 500_000


def anon_mib() -> float:
    """This process's anonymous RSS now (the heap: without the memory-mapped index files and the
    page cache of what it read, which VmHWM counts too)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return 0.0


def rss_mib() -> float:
    """This process's peak RSS (VmHWM: reset by exec, where ru_maxrss keeps the parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make(root: Path, n: int, dim: int, in_memory: bool) -> tuple[str, str]:
    """The store and the index home under ROOT (made once, kept for later runs)."""
    import pyarrow as pa

    from embedder.index import build as idx
    from embedder.index import plan as index_plan
    from embedder.models.origin import WeightsRef
    from embedder.models.preprocessing import Preprocessing
    from embedder.store.provenance import Provenance
    from embedder.store.shards import Store, embeddings_to_arrow

    store, home = root / "store", root / ("home-mem" if in_memory else "home")
    if not (store / "_manifest.json").exists():
        prov = Provenance("synthetic", WeightsRef("file", "none", "0"), "penultimate", "avg",
                          Preprocessing(256, 224, "bilinear", (0.5,) * 3, (0.5,) * 3), dim)
        rng = np.random.default_rng(0)
        centers = rng.normal(0, 1, (256, dim)).astype(np.float32)
        with Store.writer(store, prov) as st:
            schema = st.read().schema
            for start in range(0, n, SHARD):
                m = min(SHARD, n - start)
                x = centers[rng.integers(0, 256, m)] + rng.normal(0, 0.3, (m, dim)).astype(np.float32)
                ids = [r.tobytes().hex() for r in rng.integers(0, 256, (m, 16), dtype=np.uint8)]
                rows = np.arange(start, start + m)
                st.write_shard(pa.table({
                    "id": ids, "path": [f"/data/img/{i:09d}.jpg" for i in rows],
                    "label": [f"c{i % 100}" for i in rows], "embedding": embeddings_to_arrow(x, "float32"),
                    "width": pa.array((rows % 10) * 64 + 64, pa.int32()), "height": pa.array([480] * m, pa.int32()),
                    "file_hash": [f"{i:016x}" for i in rows * 2654435761], "caption": pa.nulls(m, pa.string())},
                    schema=schema))
            st.update_manifest()
    if not (home / "big").exists():
        opts = index_plan.BuildOptions(kind="flat", queries=50) if in_memory else \
            index_plan.BuildOptions(kind="ivf", on_disk=True, queries=50, text_recall=False)
        idx.build(str(store), "big", opts, str(home))
    return str(store), str(home)


def measure(home: str, dim: int, repeats: int) -> dict[str, Any]:
    """In this process: load as the service does, then filtered queries and lookups by id."""
    from embedder.service.engine import Engine
    from embedder.service.options import ServeOptions

    out: dict[str, Any] = {"rss_start_mib": rss_mib()}
    engine = Engine(ServeOptions(home=home, poll_seconds=0))
    t0 = time.perf_counter()
    loaded = engine._load("big")
    out["load_s"] = time.perf_counter() - t0
    out["peak_after_load_mib"] = rss_mib()
    out["anon_after_load_mib"] = anon_mib()
    some = loaded.ids.column("id")[len(loaded.ids) // 3].as_py()
    path = loaded.ids.column("path")[len(loaded.ids) // 5].as_py()
    t0 = time.perf_counter()
    assert loaded.row_of(some) == len(loaded.ids) // 3
    out["first_id_lookup_s"] = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    q = rng.normal(0, 1, (1, dim)).astype(np.float32)
    cases = {"label (id map, 100 values)": {"label": "c7"}, "width (store, 10 values)": {"width": "320"},
             "label+width": {"label": "c7", "width": "512"}, "path (id map, unique)": {"path": path},
             "file_hash (store, unique)": {"file_hash": f"{(len(loaded.ids) // 7) * 2654435761:016x}"}}
    for name, where in cases.items():
        times, filters = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            hits = loaded.search(q, 10, where)[0]
            times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            loaded.allowed_faiss_ids(where)  # the filter alone (the rest is FAISS's search)
            filters.append(time.perf_counter() - t0)
        assert hits, (name, where)
        out[name] = {"first_s": times[0], "median_s": float(np.median(times[1:] or times)),
                     "filter_s": float(np.median(filters)), "hits": len(hits)}
    out["peak_mib"] = rss_mib()
    out["anon_end_mib"] = anon_mib()
    from embedder.index.search import LoadedIndex

    cold = LoadedIndex("big", home)  # as the CLI and the Python API open it: the id order made on first use
    t0 = time.perf_counter()
    assert cold.row_of(some) == len(loaded.ids) // 3
    out["cold_first_id_lookup_s"] = time.perf_counter() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[1_000_000])
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--data", type=Path, default=Path("/tmp/bench_filters"))
    ap.add_argument("--old", help="another checkout of embedder to measure beside this one")
    ap.add_argument("--in-memory", action="store_true", help="a flat in-memory index instead of an on-disk IVF")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--md", type=Path, help="append the table here")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.dim, args.repeats)))
        return
    here = str(Path(__file__).resolve().parent.parent)
    rows = []
    for n in args.n:
        t0 = time.perf_counter()
        _, home = make(args.data / f"n{n}", n, args.dim, args.in_memory)
        print(f"n={n}: data ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        for label, code in [("before", args.old), ("after", here)]:
            if code is None:
                continue
            env = {**os.environ, "PYTHONPATH": code}
            r = subprocess.run([sys.executable, __file__, "--measure", home, "--dim", str(args.dim),
                                "--repeats", str(args.repeats)], env=env, capture_output=True, text=True, cwd=code)
            if r.returncode:
                print(r.stderr[-3000:], file=sys.stderr)
                continue
            res = json.loads(r.stdout.strip().splitlines()[-1])
            print(n, label, json.dumps(res), file=sys.stderr)
            rows.append((n, label, res))
    kind = "flat, in memory" if args.in_memory else "IVF, lists on disk"
    names = ["label (id map, 100 values)", "width (store, 10 values)", "label+width", "path (id map, unique)",
             "file_hash (store, unique)"]
    lines = [f"| rows ({kind}) | code | load s | peak RSS after load MiB (anon) | first id lookup ms "
             "(after the service's load / on a fresh index) | "
             + " | ".join(f"{c}: first query / filter / query ms" for c in names)
             + " | peak RSS MiB (anon at end) |", "|" + "---|" * (6 + len(names))]
    for n, label, r in rows:
        def ms(k: str, r: dict[str, Any] = r) -> str:
            return f"{r[k]['first_s'] * 1e3:.0f} / {r[k]['filter_s'] * 1e3:.1f} / {r[k]['median_s'] * 1e3:.0f}"
        lines.append(f"| {n:,} | {label} | {r['load_s']:.1f} | {r['peak_after_load_mib']:.0f} "
                     f"({r['anon_after_load_mib']:.0f}) | "
                     f"{r['first_id_lookup_s'] * 1e3:.2f} / {r['cold_first_id_lookup_s'] * 1e3:.0f} | "
                     + " | ".join(ms(c) for c in names)
                     + f" | {r['peak_mib']:.0f} ({r['anon_end_mib']:.0f}) |")
    table = "\n".join(lines)
    print(table)
    if args.md:
        with args.md.open("a") as f:
            f.write(table + "\n\n")


if __name__ == "__main__":
    main()

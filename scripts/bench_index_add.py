"""`embedder index add` of 1 % to an on-disk IVF-PQ index of N vectors: a delta beside the lists
against rewriting every list (what every add did before, and what `--merge` still does).

A generated store (clustered synthetic vectors, stored as float16, written in chunks) of N vectors
is indexed with `index build --kind ivfpq --on-disk`; a second store holding the same rows plus 1 %
more is then added twice, to two copies of the index home: once as a delta (the default) and once
with `--merge`. Each step runs in its own process: wall time, peak RSS (VmHWM: its own) and the bytes the
new generation wrote (files that are hard links to the previous generation's count zero). Then the
same 200 fresh queries are searched in both homes: the answers must be the same.

    python scripts/bench_index_add.py [--n 5000000] [--dim 64] [--json out.json]

``--in-memory KIND`` measures an in-memory index (flat, hnsw, ivf) instead: built on the store, then
1 % appended to the same store as a new shard (a second extract) and added by this checkout (which
reads only the shard the index has not read: its meta records the shards it read), by the same
checkout on a copy of the index without that record (every shard read, as before), and with
``--before DIR`` by an earlier checkout. The three must answer the same 200 queries the same.

    python scripts/bench_index_add.py --in-memory flat --n 1000000 [--before DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHILD = r"""
import json, resource, sys, time
from embedder.index import build as idx
op, home, store = sys.argv[1:4]
t0 = time.perf_counter()
if op == "build":
    r = idx.build(store, "big", idx.BuildOptions(kind="ivfpq", on_disk=True, queries=200), home)
    out = {"count": r["count"], "recall_at_10": r["quality"]["recall_at_10"]}
elif op.startswith("build-"):  # an in-memory index of the kind named
    r = idx.build(store, "big", idx.BuildOptions(kind=op[6:], queries=200), home)
    out = {"count": r["count"], "recall_at_10": r["quality"]["recall_at_10"]}
else:
    r = idx.add("big", store, home, merge=(op == "merge"))
    out = dict(r)
out["seconds"] = round(time.perf_counter() - t0, 2)
try:  # this process's own peak: ru_maxrss keeps the parent's across fork + exec (the parent holds the case)
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
    out["peak_rss_mib"] = round(int(hwm.split()[1]) / 1024)
except (OSError, StopIteration):  # not Linux
    out["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
print(json.dumps(out))
"""

SEARCH = r"""
import json, sys
import numpy as np
from embedder.index import build as idx
home, qfile = sys.argv[1:3]
hits = idx.LoadedIndex("big", home).search(np.load(qfile), 10)
print(json.dumps([[h["id"] for h in q] for q in hits]))
"""


def write_store(path: Path, n: int, dim: int, seed: int = 0, start: int = 0) -> None:
    """N clustered vectors (the first n of one fixed sequence: a larger store holds a smaller one's
    rows); START: rows START … N - 1 only, appended to the store at PATH."""
    import pyarrow as pa

    from embedder.models.origin import WeightsRef
    from embedder.models.registry import get_backbone
    from embedder.store.provenance import Provenance
    from embedder.store.shards import Store, embeddings_to_arrow

    prov = Provenance("synthetic", WeightsRef("file", "none", "0"), "penultimate", "avg",
                      get_backbone("tiny_test").preprocessing(), dim, dtype="float16")
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, (200, 16))
    lift = rng.normal(0, 1, (16, dim)) / 4
    with Store.writer(path, prov) as st:
        schema = st.read().schema
        for s in range(start, n, 250_000):
            m = min(250_000, n - s)
            r = np.random.default_rng(seed + 1 + s // 250_000)
            z = centers[r.integers(0, 200, m)] + r.normal(0, 1, (m, 16))
            x = (z @ lift + 0.1 * r.normal(0, 1, (m, dim))).astype(np.float16)
            ids = [f"v{s + i:09d}" for i in range(m)]
            st.write_shard(pa.table({
                "id": ids, "path": [f"/data/{i}.jpg" for i in ids], "label": [f"c{i % 5}" for i in range(m)],
                "embedding": embeddings_to_arrow(x, "float16"), "width": pa.array([1] * m, pa.int32()),
                "height": pa.array([1] * m, pa.int32()), "file_hash": [None] * m,
                "caption": [None] * m}, schema=schema))
        st.update_manifest()


def run(code: str, *args: str, tree: Path | None = None) -> str:
    """CODE in a fresh process; TREE: another checkout's embedder (its root on the path)."""
    env = {**os.environ, "EMBEDDER_OFFLINE": "1", **({"PYTHONPATH": str(tree)} if tree else {})}
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=7200,
                       env=env, cwd=tree or Path(__file__).parent.parent)
    if r.returncode != 0:
        raise SystemExit(f"child {args[0]} {args[1:]} failed ({r.returncode}): {r.stderr[-3000:]}{r.stdout[-300:]}")
    return r.stdout.strip().splitlines()[-1]


def written(gen: Path) -> int:
    """Bytes of the generation's files that are not hard links shared with another file."""
    return sum(f.stat().st_size for f in gen.iterdir() if f.is_file() and f.stat().st_nlink == 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--in-memory", metavar="KIND", help="an in-memory index of KIND, 1 %% appended to its store")
    ap.add_argument("--before", type=Path, help="--in-memory: a checkout of an earlier embedder adds too")
    args = ap.parse_args()
    if args.in_memory:
        return in_memory(args)
    extra = args.n // 100
    with tempfile.TemporaryDirectory(dir=os.environ.get("EMBEDDER_TMPDIR")) as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        write_store(root / "base", args.n, args.dim)
        write_store(root / "more", args.n + extra, args.dim)
        made = time.perf_counter() - t0
        build = json.loads(run(CHILD, "build", str(root / "delta"), str(root / "base")))
        shutil.copytree(root / "delta", root / "merge", copy_function=os.link)  # the same files, twice linked
        rows = {"build": build}
        for op in ("delta", "merge"):
            r = json.loads(run(CHILD, "add" if op == "delta" else "merge", str(root / op), str(root / "more")))
            gen = next((root / op / "big").glob("gen-*"))
            r["written_mib"] = round(written(gen) / 2**20, 1)
            rows[op] = r
        rng = np.random.default_rng(99)
        q = rng.normal(0, 1, (200, args.dim)).astype(np.float32)
        np.save(root / "q.npy", q)
        answers = {op: run(SEARCH, str(root / op), str(root / "q.npy")) for op in ("delta", "merge")}
        same = answers["delta"] == answers["merge"]
    d, m = rows["delta"], rows["merge"]
    print(f"N = {args.n:,} x {args.dim} (float16 store), +{extra:,} (1 %); stores written in {made:.0f} s")
    print(f"build: {build['seconds']:.0f} s, peak RSS {build['peak_rss_mib']:,} MiB, recall@10 {build['recall_at_10']}")
    print(f"{'add':>8} {'seconds':>8} {'peak RSS MiB':>13} {'written MiB':>12} {'deltas':>7}")
    for name, r in (("delta", d), ("--merge", m)):
        print(f"{name:>8} {r['seconds']:>8.1f} {r['peak_rss_mib']:>13,} {r['written_mib']:>12,.1f} {r['deltas']:>7}")
    print(f"delta / merge: {d['seconds'] / m['seconds']:.3f} of the time, "
          f"{d['written_mib'] / max(m['written_mib'], 1e-9):.4f} of the bytes; same answers: {same}")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    if args.json:
        args.json.write_text(json.dumps({"n": args.n, "dim": args.dim, **rows, "same_answers": same}, indent=2))


def in_memory(args: argparse.Namespace) -> None:
    extra = args.n // 100
    with tempfile.TemporaryDirectory(dir=os.environ.get("EMBEDDER_TMPDIR")) as tmp:
        root = Path(tmp)
        write_store(root / "store", args.n, args.dim)
        build = json.loads(run(CHILD, f"build-{args.in_memory}", str(root / "after"), str(root / "store")))
        write_store(root / "store", args.n + extra, args.dim, start=args.n)  # a second extract: one shard more
        homes = ["after", "legacy", *(["before"] if args.before else [])]
        for h in homes[1:]:
            shutil.copytree(root / "after", root / h, copy_function=os.link)
        for meta_file in (root / "legacy").rglob("index.json"):  # an index from before the record
            meta = json.loads(meta_file.read_text())
            meta.pop("indexed_shards", None)
            meta_file.unlink()  # a linked file: written anew, the other homes' copies untouched
            meta_file.write_text(json.dumps(meta))
        rows = {h: json.loads(run(CHILD, "add", str(root / h), str(root / "store"),
                                  tree=args.before if h == "before" else None)) for h in homes}
        q = np.random.default_rng(99).normal(0, 1, (200, args.dim)).astype(np.float32)
        np.save(root / "q.npy", q)
        answers = {h: run(SEARCH, str(root / h), str(root / "q.npy")) for h in homes}
        same = len(set(answers.values())) == 1
    print(f"N = {args.n:,} x {args.dim} (float16 store), in-memory {args.in_memory} index; "
          f"+{extra:,} (1 %) appended as one shard")
    print(f"build: {build['seconds']:.0f} s, peak RSS {build['peak_rss_mib']:,} MiB")
    print(f"{'add by':>28} {'seconds':>8} {'peak RSS MiB':>13} {'added':>8}")
    names = {"after": "this checkout", "legacy": "this checkout, no record", "before": "--before checkout"}
    for h in homes:
        r = rows[h]
        print(f"{names[h]:>28} {r['seconds']:>8.1f} {r['peak_rss_mib']:>13,} {r['added']:>8,}")
    print(f"same answers: {same}; {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    if args.json:
        args.json.write_text(json.dumps({"n": args.n, "dim": args.dim, "kind": args.in_memory, "build": build,
                                         **rows, "same_answers": same}, indent=2))


if __name__ == "__main__":
    main()

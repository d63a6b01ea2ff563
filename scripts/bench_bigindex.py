"""Indexes larger than RAM: streamed IVF-PQ builds with on-disk inverted lists under a memory budget.

A generated store (clustered synthetic vectors, 256-d, stored as float16, written as a real embedder
store in chunks: nothing here ever holds it whole) of N vectors is indexed with
`index build --kind ivfpq --memory-budget 512MB` in its own process; then a search process loads
the index (lists memory-mapped) and answers fresh queries from the same distribution one at a time
and batched, with and without exact re-ranking; then `embedder serve` loads it and its peak RSS
(VmHWM) is read. Beside it, at the smallest N only, the in-memory build (the same IVF-PQ, budget
large enough that the store is read whole) — what the tool did before, and what a user writing
`faiss.index_factory(...).add(all_vectors)` does.

Recall@10 is tie-aware against exact search over the whole store, computed by streaming over it.

At sizes up to --variants-max, the same store is also built (and searched) with the flat coarse
quantizer, with OPQ, and with the adds as Ray tasks on a local Ray instance (`--engine ray`).

Usage: python scripts/bench_bigindex.py [--sizes 1000000 5000000] [--budget 512MB] [--variants ...]
       [--baseline-max N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).parent.parent))

DIM = 256


def peak_rss_mib() -> int:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def status_mib(pid: int | str, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return round(next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024)


class AnonPeak:
    """Peak anonymous RSS (heap: what the process itself holds), sampled every 50 ms. RSS also
    counts file pages the process has mapped (memory-mapped lists, vectors, id map), which the
    kernel reclaims under pressure; both are reported."""

    def __init__(self, pid: int | str = "self") -> None:
        import threading

        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, status_mib(self.pid, "RssAnon"))
            except (OSError, StopIteration):
                return
            self._stop.wait(0.05)

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        return self.peak


def generator(dim: int, clusters: int = 2000, latent: int = 32,
              seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(0, 3, (clusters, latent)).astype(np.float32), rng.normal(0, 1, (latent, dim)).astype(np.float32)


def chunk(centers: np.ndarray, lift: np.ndarray, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z = centers[rng.integers(0, len(centers), n)] + rng.normal(0, 1, (n, centers.shape[1])).astype(np.float32)
    return (z @ lift + rng.normal(0, 0.2, (n, lift.shape[1])).astype(np.float32)).astype(np.float32)


def make_store(n: int, path: Path) -> None:
    from embedder.models.origin import WeightsRef
    from embedder.models.registry import get_backbone
    from embedder.store.provenance import Provenance
    from embedder.store.shards import Store, embeddings_to_arrow

    centers, lift = generator(DIM)
    prov = Provenance("synthetic", WeightsRef("file", "none", "0"), "penultimate", "avg",
                      get_backbone("tiny_test").preprocessing(), DIM, dtype="float16")
    step = 65_536  # rows per shard (embedder extract writes 4,096)
    with Store.writer(path, prov) as st:
        schema = st.read().schema
        for s in range(0, n, step):
            m = min(step, n - s)
            x = chunk(centers, lift, m, seed=1 + s // step)
            ids = [f"v{s + i:09d}" for i in range(m)]
            st.write_shard(pa.table({
                "id": ids, "path": ids, "label": [None] * m, "embedding": embeddings_to_arrow(x, "float16"),
                "width": pa.array([0] * m, pa.int32()), "height": pa.array([0] * m, pa.int32()),
                "file_hash": [None] * m, "caption": [None] * m}, schema=schema))
        st.update_manifest()


# build variants compared at sizes up to --variants-max (same store, same budget)
VARIANTS: dict[str, dict[str, object]] = {
    "auto": {},  # what `index build` picks (a flat coarse quantizer below 16,384 lists)
    "flat-coarse": {"coarse": "flat"},  # nlist distances per vector added or searched (BLAS)
    "hnsw-coarse": {"coarse": "hnsw"},  # an HNSW graph over the centroids
    "opq": {"opq": True},
    "ray": {"engine": "ray"},  # the adds as Ray tasks on a local Ray instance (all cores)
}


def child_build(store: Path, home: Path, budget: int, name: str, variant: str = "auto") -> dict:  # type: ignore[type-arg]
    import faiss  # noqa: F401

    from embedder.index import build as idx
    from embedder.index import plan as index_plan

    floor = peak_rss_mib()  # Python, NumPy, Arrow, FAISS loaded: the fixed overhead
    anon = AnonPeak()
    t0 = time.perf_counter()
    opts = index_plan.BuildOptions(kind="ivfpq", memory_budget=budget, **VARIANTS[variant])  # type: ignore[arg-type]
    meta = idx.build(str(store), name, opts, str(home))
    anon_peak = anon.stop()
    gen = (home / name).resolve() / f"gen-{meta['generation']:06d}"
    disk = sum(p.stat().st_size for p in gen.iterdir())
    return {"build_s": round(time.perf_counter() - t0, 1), "peak_rss_mib": peak_rss_mib(),
            "rss_after_imports_mib": floor, "peak_anon_mib": anon_peak,
            "factory": meta["factory"], "on_disk": bool(meta.get("on_disk")), "disk_mib": round(disk / 2**20),
            "tuned": f"{meta['search']['param']}={meta['search']['value']}",
            "build_recall_at_10": meta["quality"]["recall_at_10"]}


def exact_knn(store: Path, q: np.ndarray, k: int) -> np.ndarray:
    """Exact L2 (cosine on unit vectors) top-k distances, streamed over the store."""
    import faiss

    from embedder.index import stream as index_stream
    from embedder.index.faiss_util import prepare_rows
    from embedder.store.shards import Store

    heap = faiss.ResultHeap(len(q), k)
    for b in index_stream.batches(Store.open(store), lambda v: prepare_rows(v, "cosine"), ("id",)):
        d, i = faiss.knn(q, b.x, k)
        heap.add_result(d, i + b.start)
    heap.finalize()
    return np.asarray(heap.D, np.float32)


def child_search(store: Path, home: Path, name: str, n_queries: int) -> dict:  # type: ignore[type-arg]
    from embedder.index import faiss_util
    from embedder.index import quality as index_quality
    from embedder.index import search as index_search

    centers, lift = generator(DIM)
    q = faiss_util.prepare_rows(chunk(centers, lift, n_queries, seed=99_999), "cosine")
    exact = exact_knn(store, q, 10)  # first, and not in the search figures below
    base = peak_rss_mib()
    anon = AnonPeak()
    t0 = time.perf_counter()
    loaded = index_search.LoadedIndex(name, str(home))
    load_s = time.perf_counter() - t0
    out: dict = {"load_s": round(load_s, 2), "rss_before_load_mib": base}  # type: ignore[type-arg]
    for label, searcher in (("rerank", loaded.searcher),
                            ("no_rerank", index_quality.Searcher(loaded.index, "cosine", None))):
        searcher.search(q[:5], 10)
        t = time.perf_counter()
        for i in range(len(q)):
            searcher.search(q[i:i + 1], 10)
        one = len(q) / (time.perf_counter() - t)
        t = time.perf_counter()
        d, ids = searcher.search(q, 10)
        batched = len(q) / (time.perf_counter() - t)
        found = _true(loaded, q, ids)
        recall = index_quality.tie_aware_recall(exact, found, ids, False, 10, tol=1e-3)
        out[label] = {"recall_at_10": round(recall, 4), "qps_one_at_a_time": round(one, 1),
                      "qps_batched": round(batched, 1)}
    out["peak_anon_mib"] = anon.stop()
    out["rss_mib"] = status_mib("self", "VmRSS")
    out["rss_file_mib"] = status_mib("self", "RssFile")
    return out


def _true(loaded: object, q: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Exact distances of returned ids, from the float16 copies (hence the 1e-3 tolerance)."""
    rows = np.sort(np.unique(ids[ids >= 0]))
    v = np.asarray(loaded.lookup_vectors[rows], np.float32)  # type: ignore[attr-defined]
    vv = v[np.searchsorted(rows, np.maximum(ids, 0))]
    return ((vv - q[:, None, :]) ** 2).sum(-1)


def serve_rss(home: Path) -> dict:  # type: ignore[type-arg]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).parent / "embedder"
    proc = subprocess.Popen(
        [str(exe), "serve", "--home", str(home), "--port", str(port), "--poll-seconds", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.perf_counter()
    anon = AnonPeak(proc.pid)
    try:
        while time.perf_counter() - t0 < 600:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        ready = time.perf_counter() - t0
        time.sleep(1.0)
        return {"ready_s": round(ready, 1), "peak_rss_mib": status_mib(proc.pid, "VmHWM"),
                "peak_anon_mib": anon.stop(), "rss_file_mib": status_mib(proc.pid, "RssFile")}
    finally:
        proc.terminate()
        proc.wait(30)


def run(args: list[str]) -> dict:  # type: ignore[type-arg]
    r = subprocess.run([sys.executable, __file__, *args], check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(r.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    from embedder.cli.index_cmd import parse_size

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="*", default=[1_000_000, 5_000_000])
    ap.add_argument("--budget", default="512MB")
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--baseline-max", type=int, default=1_000_000, help="in-memory build only up to this N")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS),
                    help="build variants compared (each built and searched) at sizes up to --variants-max")
    ap.add_argument("--variants-max", type=int, default=1_000_000)
    ap.add_argument("--no-serve", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--_make", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--_build", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--_search", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._make:
        make_store(int(args._make[0]), Path(args._make[1]))
        print(json.dumps({}))
        return
    if args._build:
        b = args._build
        print(json.dumps(child_build(Path(b[0]), Path(b[1]), int(b[2]), b[3], b[4])))
        return
    if args._search:
        print(json.dumps(child_search(Path(args._search[0]), Path(args._search[1]), args._search[2], args.queries)))
        return
    budget = parse_size(args.budget)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    result: dict = {"machine": machine, "budget": args.budget, "rows": []}  # type: ignore[type-arg]
    with tempfile.TemporaryDirectory(prefix="bench_bigindex_") as t:
        tmp = Path(t)
        for n in args.sizes:
            store, home = tmp / f"s{n}", tmp / f"h{n}"
            t0 = time.perf_counter()
            run(["--_make", str(n), str(store)])
            size = sum(p.stat().st_size for p in store.iterdir())
            row: dict = {"n": n, "dim": DIM, "store_mib": round(size / 2**20),  # type: ignore[type-arg]
                         "make_s": round(time.perf_counter() - t0, 1)}
            row["build"] = run(["--_build", str(store), str(home), str(budget), "big", "auto"])
            row["search"] = run(["--queries", str(args.queries), "--_search", str(store), str(home), "big"])
            print(json.dumps(row), flush=True)
            if not args.no_serve:
                row["serve"] = serve_rss(home)
            if n <= args.variants_max:
                row["variants"] = {}
                for v in args.variants:
                    if v == "auto":
                        continue
                    vb = run(["--_build", str(store), str(home), str(budget), v, v])
                    vs = run(["--queries", str(args.queries), "--_search", str(store), str(home), v])
                    row["variants"][v] = {"build": vb, "search": vs}
                    print(json.dumps({"n": n, "variant": v, "build": vb, "search": vs}), flush=True)
            if n <= args.baseline_max:
                row["in_memory_build"] = run(["--_build", str(store), str(tmp / f"m{n}"), str(64 << 30), "mem",
                                              "auto"])
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(store, ignore_errors=True)
            shutil.rmtree(home, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

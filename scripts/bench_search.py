"""Search quality and speed per index kind, beside brute-force numpy, in one run.

Data: clustered synthetic vectors with low intrinsic dimension (a Gaussian mixture in a 16-d latent
space, linearly lifted to --dim and noised), or a real store with --store. Queries are held out
from the same distribution and never indexed. For each kind: recall@10 against exact search
(tie-aware, on true scores), QPS batched and one-by-one, index size on disk, build time (including
embedder's recall measurement and parameter tuning).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from embedder.index import build as idx
from embedder.index import generations as index_generations
from embedder.index import plan as index_plan
from embedder.index import quality as index_quality
from embedder.index import search as index_search
from embedder.models.origin import WeightsRef
from embedder.models.preprocessing import Preprocessing
from embedder.store.provenance import Provenance
from embedder.store.shards import Store, arrow_to_embeddings, embeddings_to_arrow


def clustered(n: int, dim: int, latent: int = 16, clusters: int = 200, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, (clusters, latent))
    z = centers[rng.integers(0, clusters, n)] + rng.normal(0, 1, (n, latent))
    lift = rng.normal(0, 1, (latent, dim)).astype(np.float32)
    return (z.astype(np.float32) @ lift + rng.normal(0, 0.2, (n, dim)).astype(np.float32)).astype(np.float32)


def write_store(path: Path, x: np.ndarray) -> str:
    prov = Provenance("synthetic", WeightsRef("file", "none", "0"), "penultimate", "avg",
                      Preprocessing(256, 224, "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), x.shape[1])
    with Store.writer(path, prov) as st:
        schema = st.read().schema
        for start in range(0, len(x), 50_000):
            chunk = x[start:start + 50_000]
            ids = [f"v{start + i:08d}" for i in range(len(chunk))]
            st.write_shard(pa.table({
                "id": ids, "path": ids, "label": [None] * len(ids),
                "embedding": embeddings_to_arrow(chunk, "float32"),
                "width": pa.array([0] * len(ids), pa.int32()), "height": pa.array([0] * len(ids), pa.int32()),
                "file_hash": [None] * len(ids), "caption": [None] * len(ids)}, schema=schema))
        st.update_manifest()
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--one-by-one", type=int, default=200, help="queries timed one at a time")
    ap.add_argument("--kinds", default="flat,hnsw,ivf,ivfpq")
    ap.add_argument("--store", help="benchmark on a real store's embeddings instead")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_search_"))
    try:
        if args.store:
            x = arrow_to_embeddings(Store.open(args.store).read(["embedding"]).column("embedding"))
            rng = np.random.default_rng(0)
            perm = rng.permutation(len(x))
            nq = min(args.queries, len(x) // 10)
            q, x = x[perm[:nq]], x[perm[nq:]]
        else:
            both = clustered(args.n + args.queries, args.dim)
            x, q = both[: args.n], both[args.n:]
        store = write_store(tmp / "store", x)
        xn = x / np.linalg.norm(x, axis=1, keepdims=True)
        qn = q / np.linalg.norm(q, axis=1, keepdims=True)

        # Brute force numpy: what a user writes without an index (cosine = dot of unit vectors).
        t0 = time.perf_counter()
        exact_ids = np.empty((len(qn), 10), dtype=np.int64)
        exact_scores = np.empty((len(qn), 10), dtype=np.float32)
        for s in range(0, len(qn), 256):
            sims = qn[s:s + 256] @ xn.T
            part = np.argpartition(-sims, 10, axis=1)[:, :10]
            ps = np.take_along_axis(sims, part, 1)
            order = np.argsort(-ps, axis=1)
            exact_ids[s:s + 256] = np.take_along_axis(part, order, 1)
            exact_scores[s:s + 256] = np.take_along_axis(ps, order, 1)
        numpy_batched = len(qn) / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for i in range(args.one_by_one):
            sims = xn @ qn[i]
            np.argpartition(-sims, 10)[:10]
        numpy_single = args.one_by_one / (time.perf_counter() - t0)

        rows = [{"kind": "numpy brute force", "recall_at_10": 1.0, "qps_batched": round(numpy_batched),
                 "qps_one_by_one": round(numpy_single), "bytes": int(xn.nbytes), "build_s": 0.0}]
        home = str(tmp / "home")
        for kind in args.kinds.split(","):
            meta = idx.build(store, kind, index_plan.BuildOptions(kind=kind), home)
            loaded = index_search.LoadedIndex(kind, home)
            searcher = loaded.searcher  # what `embedder search` runs: FAISS, plus re-ranking for PQ
            t0 = time.perf_counter()
            d, ids = searcher.search(qn, 10)
            batched = len(qn) / (time.perf_counter() - t0)
            t0 = time.perf_counter()
            for i in range(args.one_by_one):
                searcher.search(qn[i:i + 1], 10)
            single = args.one_by_one / (time.perf_counter() - t0)
            true = index_quality.true_scores(xn, qn, ids, "ip")  # faiss ids are store row positions here
            recall = index_quality.tie_aware_recall(exact_scores, true, ids, True, 10)
            rows.append({"kind": f"{kind} ({meta['factory']}, {meta['search']['param']}="
                                 f"{meta['search']['value']})",
                         "recall_at_10": round(recall, 4), "qps_batched": round(batched),
                         "qps_one_by_one": round(single), "bytes": meta["index_bytes"],
                         "rerank_bytes": (Path(home) / kind / index_generations.VECTORS_FILE).stat().st_size
                         if meta.get("rerank") else 0,
                         "build_s": meta["build_seconds"],
                         "speedup_batched_vs_numpy": round(batched / numpy_batched, 1),
                         "speedup_one_by_one_vs_numpy": round(single / numpy_single, 1),
                         "recall_measured_at_build": meta["quality"]["recall_at_10"]})
            print(json.dumps(rows[-1]), flush=True)
        result = {"n": len(x), "dim": x.shape[1], "queries": len(q), "data": args.store or "clustered synthetic",
                  "cores": os.cpu_count(), "cpu": platform.machine(), "rows": rows}
        print("\n| kind | recall@10 | QPS batched | QPS one-by-one | ×numpy batched | ×numpy 1-by-1 "
              "| index MiB (RAM) | + mmap'd vectors MiB | build s |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['kind']} | {r['recall_at_10']:.3f} | {r['qps_batched']:,} | {r['qps_one_by_one']:,} | "
                  f"{r.get('speedup_batched_vs_numpy', 1.0)} | {r.get('speedup_one_by_one_vs_numpy', 1.0)} | "
                  f"{r['bytes'] / 2**20:.0f} | {r.get('rerank_bytes', 0) / 2**20:.0f} | {r['build_s']:.1f} |")
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

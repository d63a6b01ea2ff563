"""Drawing text -> image recall's caption sample from a large store, against what a user would write.

``sample_captions`` (row numbers drawn from the footers' null counts, only the row groups holding a
drawn row read) against the plain way: read the store's ``caption`` column with pyarrow and draw
1,000 of its non-null rows with numpy. Each method runs in a fresh process (time and peak RSS), at
N rows and 10 N rows, so the growth shows.

    python scripts/bench_text_recall.py [--rows 1000000] [--sample 1000] [--cache DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time
method, store, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
t = time.perf_counter()
if method == "sample_captions":
    from embedder.index.text_recall import sample_captions
    got = len(sample_captions(store, n, 0).rows)
else:  # what a user would write: the caption column, then numpy
    import numpy as np
    import pyarrow.dataset as ds
    col = ds.dataset(store, format="parquet").to_table(columns=["caption"]).column("caption")
    valid = np.flatnonzero(col.is_valid().to_numpy(zero_copy_only=False))
    pick = np.sort(np.random.default_rng(0).choice(valid, size=min(n, len(valid)), replace=False))
    got = len(col.take(pick).to_pylist())
dt = time.perf_counter() - t
# VmHWM, not ru_maxrss: Linux carries a forked parent's high-water mark across exec into ru_maxrss
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"method": method, "sampled": got, "seconds": dt, "peak_rss_mib": hwm / 1024}))
"""


def make_store(path: Path, rows: int, shard_rows: int = 250_000) -> None:
    """A store of ROWS two-dimensional vectors, two rows in three captioned, one row group per shard."""
    import numpy as np
    import pyarrow as pa

    from embedder.models.registry import get_backbone
    from embedder.store.provenance import Provenance, WeightsRef
    from embedder.store.shards import Store, embeddings_to_arrow

    prov = Provenance("synthetic", WeightsRef("file", "none", "0"), "penultimate", "avg",
                      get_backbone("tiny_test").preprocessing(), 2)
    with Store.writer(path, prov) as st:
        schema = st.read().schema
        for start in range(0, rows, shard_rows):
            n = min(shard_rows, rows - start)
            ids = [f"v{start + i:09d}" for i in range(n)]
            st.write_shard(pa.table({
                "id": ids, "path": [f"/data/{i}.jpg" for i in ids], "label": [None] * n,
                "embedding": embeddings_to_arrow(np.ones((n, 2), np.float32), "float32"),
                "width": pa.array([1] * n, pa.int32()), "height": pa.array([1] * n, pa.int32()),
                "file_hash": [None] * n,
                "caption": [None if (start + i) % 3 == 0 else f"a caption of row {start + i} with some words"
                            for i in range(n)],
            }, schema=schema))
        st.update_manifest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--sample", type=int, default=1000)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache/embedder-bench/text-recall")
    args = ap.parse_args()
    results = []
    for rows in (args.rows, 10 * args.rows):
        store = args.cache / f"store-{rows}"
        if not (store / "_manifest.json").exists():
            make_store(store, rows)
        for method in ("plain", "sample_captions"):
            out = subprocess.run([sys.executable, "-c", CHILD, method, str(store), str(args.sample)],
                                 check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1]) | {"rows": rows}
            results.append(r)
            print(json.dumps(r), flush=True)
    print("\n| rows | method | seconds | peak RSS |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['rows']:,} | {r['method']} | {r['seconds']:.2f} | {r['peak_rss_mib']:,.0f} MiB |")


if __name__ == "__main__":
    main()

"""Driver memory of an extraction against the number of images it discovers: 10,000, 1,000,000 and
(``--sizes 1000000,10000000``) 10,000,000.

The case a large collection meets every day: a resume. A text list of N image paths, of which all but
64 are already in the store (written here as synthetic shards with the real ids of those paths), and
64 real new JPEGs that the run embeds with the tiny registered backbone. Each measurement is a fresh
process; peak RSS (VmHWM: its own) is reported beside the wall time. "work list": discovery and the
store's membership check alone (``worklist.build`` + ``drop_held``, no torch), the part that grows with
the listing. In the same run, as yardsticks: what
list-based discovery holds (``discover()``: an ``ImageRef`` per image in a dict, then the store's
membership check over those ids, without torch or a model), and with ``--before DIR`` the extract of
an earlier checkout (the same command, its code).

    python scripts/bench_discovery.py [--sizes 10000,1000000] [--before DIR] [--no-list] [--out results.json]

At 10⁷ the list-based yardstick alone holds ~3.5 GB and takes minutes: ``--no-list`` leaves it out.
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

CHILD = r"""
import json, resource, sys, time
mode, lst, store = sys.argv[1:4]
t0 = time.perf_counter()
if mode == "extract":
    from embedder.embed.fill import extract
    from embedder.models.features import ModelSpec
    s = extract([lst], store, ModelSpec("tiny_test"))
    out = {"discovered": s.discovered, "present": s.skipped_present, "done": s.done}
elif mode == "worklist":  # discovery and the membership check alone: no torch, no model
    from embedder.embed import worklist
    from embedder.io.sources import iter_discover
    from embedder.store.shards import Store
    st = Store.open(store)
    with worklist.build(iter_discover([lst])) as w:
        w.drop_held(st.shard_files(), st.errors().column("id"))
        out = {"discovered": w.counts.discovered, "present": w.counts.present, "done": 0}
else:  # the previous way: a list of ImageRefs, then the membership check over their ids
    from embedder.io.sources import discover
    from embedder.store.shards import Store
    refs = discover([lst])
    held = Store.open(store).present([r.id for r in refs])
    out = {"discovered": len(refs), "present": int(held.sum()), "done": 0}
out["seconds"] = round(time.perf_counter() - t0, 2)
try:  # this process's own peak: ru_maxrss keeps the parent's across fork + exec (the parent holds the case)
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
    out["peak_rss_mib"] = round(int(hwm.split()[1]) / 1024, 1)
except (OSError, StopIteration):  # not Linux
    out["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
print(json.dumps(out))
"""


def make_case(root: Path, n: int) -> tuple[Path, Path]:
    """A store holding n - 64 synthetic rows (ids of listed paths), 64 real new JPEGs, the list."""
    import numpy as np
    import pyarrow as pa
    from PIL import Image

    from embedder.embed.fill import extract
    from embedder.io.uri import image_id
    from embedder.models.builder import ModelSpec
    from embedder.store.shards import Store, embeddings_to_arrow

    real = root / "new"
    real.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(64):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(real / f"new_{i:03d}.jpg")
    seed = root / "seed"
    seed.mkdir()
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(seed / "seed.jpg")
    store = root / "store"
    extract([str(seed)], str(store), ModelSpec("tiny_test"))  # the store and its provenance
    fake = [f"{root}/collection/{i // 1000:04d}/img_{i:07d}.jpg" for i in range(n - 64)]
    with Store.writer(store, Store.open(store).provenance) as st:
        schema = st.read().schema
        dim = st.dim
        for s in range(0, len(fake), 65_536):
            part = fake[s:s + 65_536]
            st.write_shard(pa.table({
                "id": [image_id(p) for p in part], "path": part, "label": [None] * len(part),
                "embedding": embeddings_to_arrow(np.zeros((len(part), dim), np.float32), "float32"),
                "width": pa.array([48] * len(part), pa.int32()), "height": pa.array([40] * len(part), pa.int32()),
                "file_hash": [None] * len(part), "caption": [None] * len(part)}, schema=schema))
        st.update_manifest()
    lst = root / "list.txt"
    with open(lst, "w") as f:
        for p in fake:
            f.write(p + "\n")
        for p in sorted(real.iterdir()):
            f.write(str(p) + "\n")
    return lst, store


def fresh(store: Path) -> Path:
    """A copy of STORE: every run starts from the same store (an extract adds its 64 images)."""
    import uuid

    copy = store.with_name(f"store-{uuid.uuid4().hex[:8]}")
    shutil.copytree(store, copy)
    return copy


def run(mode: str, lst: Path, store: Path, tree: Path | None = None) -> dict[str, float]:
    """One measurement in a fresh process; TREE: run another checkout's embedder (its root on the path)."""
    env = {**os.environ, "EMBEDDER_OFFLINE": "1"}
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    r = subprocess.run([sys.executable, "-c", CHILD, mode, str(lst), str(store)], capture_output=True, text=True,
                       env=env, timeout=3600, cwd=tree or Path(__file__).parent.parent)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,1000000")
    ap.add_argument("--before", type=Path, help="a checkout of an earlier embedder: its extract is measured too")
    ap.add_argument("--no-list", action="store_true", help="leave out the list-based discover() yardstick")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rows = []
    print(f"{'images':>10} {'method':>24} {'peak RSS MiB':>13} {'seconds':>8} {'present':>9} {'embedded':>9}")
    for n in [int(s) for s in args.sizes.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            lst, store = make_case(Path(tmp), n)
            setup = time.perf_counter() - t0
            measured: list[tuple[str, dict[str, float]]] = []
            if not args.no_list:
                measured.append(("discover() + check", run("previous", lst, fresh(store))))
            if args.before:
                measured.append(("work list, --before tree", run("worklist", lst, store, args.before)))
            measured.append(("work list", run("worklist", lst, store)))
            if args.before:
                measured.append(("extract, --before tree", run("extract", lst, fresh(store), args.before)))
            measured.append(("embedder extract", run("extract", lst, fresh(store))))
            for name, r in measured:
                rows.append({"images": n, "method": name, **r, "setup_seconds": round(setup, 1)})
                print(f"{n:>10,} {name:>24} {r['peak_rss_mib']:>13,.0f} {r['seconds']:>8.1f} {r['present']:>9,} "
                      f"{r['done']:>9,}")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "cpus": os.cpu_count()}, indent=2))


if __name__ == "__main__":
    main()

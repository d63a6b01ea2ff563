"""`embedder import` + `embedder inspect` on synthetic stores with planted near-duplicates, leaks and
flipped labels at 10^5, 10^6 (and, on request, 10^7) x 128: seconds, peak RSS, rows/s, duplicate-pair
and leak recall, label-error precision and recall; at the smallest size the same inspect with the code
of another checkout beside it (``--old``: today's in-memory path, a worktree of 2c344d2).

Data (streamed, deterministic: chunk j of 100k rows is drawn from ``default_rng([seed, j])``, so the
generator's memory is one chunk whatever the size):
- unit vectors of ``--classes`` classes: ``normalize(sqrt(s) * centre + sqrt(1 - s) * u)`` with the
  centres and ``u`` uniform on the sphere and ``s = --signal`` (0.135: a linear probe reaches ≈ 0.95;
  two distinct rows of one class have cosine ≈ 0.135 ± 0.08, so nearest distinct neighbours stay far
  below 0.97 even at 10^7);
- near-duplicates: 1 % of train rows are copies of another row of their chunk at an exact cosine
  drawn from [0.975, 0.995] (``t * x + sqrt(1 - t^2) * v``, v a unit vector orthogonal to x); 5 % of
  the copies make groups of 3-5 (2-4 copies of one source); a copy keeps its source's class;
- a test file of N/10 rows from the same classes, 0.5 % of which are copies of train rows at cosine
  [0.975, 0.995] (leaks);
- 2 % of train rows get a random other class (flipped labels).
Ground truth beside the data: truth_pairs.parquet (source, copy, cosine), truth_leaks.parquet (test,
train, cosine), truth_flips.parquet (id, given, true). Columns of the data: id (string), label
(string), embedding fixed_size_list<float32>[dim].

Each step runs in its own process through a tiny wrapper that appends that process's VmHWM (peak
RSS) to a file at exit (multiprocessing or Ray workers are not counted), so the benchmark's own
memory is never in the figure. "graph recall@k" and "own pair recall" are what inspect itself prints
(its kNN graph's recall and, on the bucketed path, its duplicate-pair recall against exact search from
a sample of queries). A planted pair is found when both ids are in one duplicate group; a
planted leak when a leak finding starts with its test id and names its train row (or a planted copy
of it); a flipped row when a label_error finding names it (the "likely" tier and the whole list).

    python scripts/bench_scale.py                         # 1e5 and 1e6, with today's path at 1e5
    python scripts/bench_scale.py --sizes 1e5,1e6,1e7     # + the 10^7 row (5 GB of vectors)
    python scripts/bench_scale.py --check --sizes 3e5,1e6 # the outside check: PASS/FAIL lines
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CHUNK = 100_000
DUP_RATE, GROUP_SHARE, LEAK_RATE, FLIP_RATE, TEST_SHARE = 0.01, 0.05, 0.005, 0.02, 0.1
COS_LO, COS_HI = 0.975, 0.995
OLD_COMMIT = "2c344d2"
# --check thresholds: recall of what was planted; memory and time between the two sizes
CHECK_PAIR_RECALL, CHECK_LEAK_RECALL, CHECK_FLIP_RECALL = 0.99, 0.99, 0.90
CHECK_RSS_SLACK_MIB, CHECK_TIME_FACTOR = 150, 1.5

# The wrapper each measured step runs in: argv[1] is the file its peak RSS goes to, argv[2] the
# program ("embedder", or a script path), the rest its arguments. atexit runs after the CLI's sys.exit.
WRAP = r"""
import atexit, sys
def _hwm(path=sys.argv[1]):
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    with open(path, "a") as f:
        f.write(f"{kb}\n")
atexit.register(_hwm)
prog = sys.argv[2]
sys.argv = sys.argv[2:]
if prog == "embedder":
    from embedder.cli import main
    main()
else:
    import runpy
    runpy.run_path(prog, run_name="__main__")
"""


# ---- data -----------------------------------------------------------------------------------
def unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def centres(classes: int, dim: int, seed: int) -> np.ndarray:
    return unit(np.random.default_rng([seed, 2**31]).normal(size=(classes, dim)))


def draw(rng: np.random.Generator, y: np.ndarray, cen: np.ndarray, signal: float) -> np.ndarray:
    u = unit(rng.normal(size=(len(y), cen.shape[1])))
    return unit(np.sqrt(signal) * cen[y] + np.sqrt(1 - signal) * u)


def near_copies(rng: np.random.Generator, src: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Copies of the unit rows SRC at a cosine drawn from [COS_LO, COS_HI]; (copies float32, cosines)."""
    t = rng.uniform(COS_LO, COS_HI, len(src))
    g = rng.normal(size=src.shape)
    v = unit(g - (g * src).sum(1, keepdims=True) * src)
    out = unit(t[:, None] * src + np.sqrt(1 - t**2)[:, None] * v).astype(np.float32)
    cos = (out.astype(np.float64) * unit(src.astype(np.float32).astype(np.float64))).sum(1)
    return out, cos


def share(rate: float, start: int, m: int) -> int:
    """Rows START..START+M's part of RATE (rounded cumulatively: the totals are exact whatever the chunks)."""
    return int(rate * (start + m) + 0.5) - int(rate * start + 0.5)


def copies_per_source(rng: np.random.Generator, n_copies: int) -> list[int]:
    """How many copies each source gets: GROUP_SHARE of the copies (at least one group of 3 when there
    are 10 copies) in groups of 3-5, the rest pairs."""
    sizes: list[int] = []
    multi = max(int(round(GROUP_SHARE * n_copies)), 2 if n_copies >= 10 else 0)
    while multi >= 2:
        k = min(int(rng.integers(2, 5)), multi)
        sizes.append(k)
        multi -= k
    return sizes + [1] * (n_copies - sum(sizes))


@dataclass
class Chunk:
    ids: list[str]
    labels: np.ndarray  # given (after flips), int
    x: np.ndarray  # float32 unit rows
    test_ids: list[str]
    test_labels: np.ndarray
    test_x: np.ndarray
    pairs: list[tuple[str, str, float]] = field(default_factory=list)
    leaks: list[tuple[str, str, float]] = field(default_factory=list)
    flips: list[tuple[str, int, int]] = field(default_factory=list)


def make_chunk(j: int, start: int, m: int, test_start: int, mt: int, cen: np.ndarray, signal: float,
               seed: int) -> Chunk:
    rng = np.random.default_rng([seed, j])
    classes = len(cen)
    y = rng.integers(0, classes, m)
    x = draw(rng, y, cen, signal).astype(np.float32)
    ids = [f"r{start + i:010d}" for i in range(m)]
    ch = Chunk(ids, y.copy(), x, [f"q{test_start + i:09d}" for i in range(mt)], np.empty(0, np.int64),
               np.empty((0, x.shape[1]), np.float32))
    # near-duplicates: sources and copies disjoint, a copy keeps its source's class
    per = copies_per_source(rng, share(DUP_RATE, start, m))
    perm = rng.permutation(m)
    sources = perm[:len(per)]
    copy_rows = perm[len(per):len(per) + sum(per)]
    src_of_copy = np.repeat(sources, per)
    x[copy_rows], cos = near_copies(rng, x[src_of_copy].astype(np.float64))
    y[copy_rows] = y[src_of_copy]
    ch.pairs = [(ids[s], ids[c], float(t)) for s, c, t in zip(src_of_copy, copy_rows, cos)]
    # the test rows: fresh draws, LEAK_RATE of them copies of train rows (never of a planted copy)
    ty = rng.integers(0, classes, mt)
    tx = draw(rng, ty, cen, signal).astype(np.float32)
    n_leaks = share(LEAK_RATE, test_start, mt)
    if n_leaks:
        leak_rows = rng.choice(mt, n_leaks, replace=False)
        free = np.setdiff1d(np.arange(m), copy_rows)
        leak_src = rng.choice(free, n_leaks, replace=False)
        tx[leak_rows], lcos = near_copies(rng, x[leak_src].astype(np.float64))
        ty[leak_rows] = y[leak_src]
        ch.leaks = [(ch.test_ids[t], ids[s], float(c)) for t, s, c in zip(leak_rows, leak_src, lcos)]
    ch.test_labels, ch.test_x = ty, tx
    # flipped labels: any train row, to a random other class
    flip = rng.choice(m, share(FLIP_RATE, start, m), replace=False)
    given = y.copy()
    given[flip] = (y[flip] + rng.integers(1, classes, len(flip))) % classes
    ch.flips = [(ids[r], int(given[r]), int(y[r])) for r in flip]
    ch.labels = given
    return ch


def generate(n: int, out: Path, dim: int = 128, classes: int = 100, signal: float = 0.135, seed: int = 0,
             chunk: int = CHUNK) -> dict[str, Any]:
    """train.parquet, test.parquet and the truth_*.parquet files under OUT, chunk by chunk."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    cen = centres(classes, dim, seed)
    names = np.array([f"c{k:03d}" for k in range(classes)], dtype=object)
    schema = pa.schema([("id", pa.string()), ("label", pa.string()),
                        ("embedding", pa.list_(pa.float32(), dim))])

    def table(ids: list[str], labels: np.ndarray, x: np.ndarray) -> pa.Table:
        emb = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), pa.float32()), dim)
        return pa.table([pa.array(ids, pa.string()), pa.array(names[labels], pa.string()), emb], schema=schema)

    pairs: list[tuple[str, str, float]] = []
    leaks: list[tuple[str, str, float]] = []
    flips: list[tuple[str, int, int]] = []
    test_rows = 0
    with pq.ParquetWriter(out / "train.parquet", schema) as wt, pq.ParquetWriter(out / "test.parquet", schema) as we:
        for j, start in enumerate(range(0, n, chunk)):
            m = min(chunk, n - start)
            mt = share(TEST_SHARE, start, m)
            ch = make_chunk(j, start, m, test_rows, mt, cen, signal, seed)
            wt.write_table(table(ch.ids, ch.labels, ch.x), row_group_size=chunk)
            if mt:
                we.write_table(table(ch.test_ids, ch.test_labels, ch.test_x), row_group_size=chunk)
            test_rows += mt
            pairs += ch.pairs
            leaks += ch.leaks
            flips += ch.flips
    pq.write_table(pa.table({"source": [p[0] for p in pairs], "copy": [p[1] for p in pairs],
                             "cosine": [p[2] for p in pairs]}), out / "truth_pairs.parquet")
    pq.write_table(pa.table({"test": [p[0] for p in leaks], "train": [p[1] for p in leaks],
                             "cosine": [p[2] for p in leaks]}), out / "truth_leaks.parquet")
    pq.write_table(pa.table({"id": [f[0] for f in flips], "given": names[[f[1] for f in flips]].tolist(),
                             "true": names[[f[2] for f in flips]].tolist()}), out / "truth_flips.parquet")
    return {"train": n, "test": test_rows, "pairs": len(pairs), "leaks": len(leaks), "flips": len(flips)}


# ---- scoring ----------------------------------------------------------------------------------
def score(findings_path: Path, data: Path) -> dict[str, float | None]:
    """Recall/precision of the planted duplicates, leaks and flips in a findings.parquet."""
    import pyarrow.parquet as pq

    f = pq.read_table(findings_path, columns=["kind", "ids", "detail"]).to_pydict()
    pairs = pq.read_table(data / "truth_pairs.parquet").to_pydict()
    leaks = pq.read_table(data / "truth_leaks.parquet").to_pydict()
    flips = set(pq.read_table(data / "truth_flips.parquet").column("id").to_pylist())
    # planted groups: a source and its copies share one group id
    planted: dict[str, str] = {}
    for s, c in zip(pairs["source"], pairs["copy"]):
        planted[s] = planted[c] = s
    group_of: dict[str, int] = {}
    leak_found: dict[str, list[str]] = {}
    dup_groups: list[list[str]] = []
    flagged: dict[str, str | None] = {}
    for kind, ids, detail in zip(f["kind"], f["ids"], f["detail"]):
        if kind == "duplicate":
            for i in ids:
                group_of[i] = len(dup_groups)
            dup_groups.append(ids)
        elif kind == "leak":
            leak_found.setdefault(ids[0], []).extend(ids[1:])
        elif kind == "label_error":
            flagged[ids[0]] = detail
    n_pairs = len(pairs["source"])
    found_pairs = sum(1 for s, c in zip(pairs["source"], pairs["copy"])
                      if s in group_of and group_of.get(c) == group_of[s])
    # a found group is right when all its members belong to one planted group
    right_groups = sum(1 for g in dup_groups if len({planted.get(i, "?" + i) for i in g}) == 1)
    truth_leak = dict(zip(leaks["test"], leaks["train"]))
    leak_hits = sum(1 for t, tr in truth_leak.items()
                    if any(planted.get(i, i) == planted.get(tr, tr) for i in leak_found.get(t, [])))
    right_leaks = sum(1 for t, trs in leak_found.items()
                      if t in truth_leak and any(planted.get(i, i) == planted.get(truth_leak[t], truth_leak[t])
                                                 for i in trs))
    likely = {i for i, d in flagged.items() if d == "likely"}

    def ratio(a: int, b: int) -> float | None:
        return round(a / b, 4) if b else None

    return {"pair_recall": ratio(found_pairs, n_pairs), "group_precision": ratio(right_groups, len(dup_groups)),
            "leak_recall": ratio(leak_hits, len(truth_leak)), "leak_precision": ratio(right_leaks, len(leak_found)),
            "likely_precision": ratio(len(likely & flips), len(likely)),
            "likely_recall": ratio(len(likely & flips), len(flips)),
            "all_precision": ratio(len(set(flagged) & flips), len(flagged)),
            "all_recall": ratio(len(set(flagged) & flips), len(flips))}


# ---- measured steps -----------------------------------------------------------------------------
@dataclass
class Step:
    seconds: float
    peak_rss_mib: float
    stdout: str
    error: str | None = None  # the last line of stderr when the step failed


def measured(argv: list[str], pythonpath: str | None = None, cwd: Path | None = None) -> Step:
    """Run ARGV (``["embedder", ...]`` or ``[script, ...]``) in a fresh interpreter; its wall time and VmHWM."""
    with tempfile.NamedTemporaryFile("r", suffix=".hwm") as hwm:
        env = dict(os.environ)
        if pythonpath:
            env["PYTHONPATH"] = pythonpath
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", WRAP, hwm.name, *argv], env=env, cwd=cwd,
                           capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        kb = [int(v) for v in Path(hwm.name).read_text().split()]
    error = None
    if r.returncode:
        print(f"{' '.join(argv[:2])} failed ({r.returncode}):\n{r.stderr[-3000:]}", file=sys.stderr, flush=True)
        error = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1][:200]
    return Step(round(seconds, 1), round(max(kb) / 1024, 1) if kb else float("nan"), r.stdout, error)


def has_import(pythonpath: str | None = None) -> bool:
    env = dict(os.environ, **({"PYTHONPATH": pythonpath} if pythonpath else {}))
    r = subprocess.run([sys.executable, "-m", "embedder", "import", "--help"], env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return r.returncode == 0


def store_from_parquet(parquet: Path, store: Path, batch: int = 65_536) -> None:
    """Until `embedder import` exists: the store written directly, streamed (the way tests do)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from embedder.models.origin import WeightsRef
    from embedder.models.registry import get_backbone
    from embedder.store.provenance import Provenance
    from embedder.store.shards import Store

    f = pq.ParquetFile(parquet)
    dim = f.schema_arrow.field("embedding").type.list_size
    prov = Provenance("external", WeightsRef("file", "none", "0"), "penultimate", "avg",
                      get_backbone("tiny_test").preprocessing(), dim)
    with Store.writer(store, prov) as st:
        schema = st.read().schema
        for b in f.iter_batches(batch_size=batch):
            n = b.num_rows
            ids = b.column("id")
            st.write_shard(pa.table({
                "id": ids, "path": pc.binary_join_element_wise("/synthetic/", ids, ""),
                "label": b.column("label"), "embedding": b.column("embedding"),
                "width": pa.array([0] * n, pa.int32()), "height": pa.array([0] * n, pa.int32()),
                "file_hash": pa.nulls(n, pa.string()), "caption": pa.nulls(n, pa.string())}, schema=schema))
        st.update_manifest()


def import_step(parquet: Path, store: Path, use_cli: bool) -> Step:
    if use_cli:
        return measured(["embedder", "import", str(parquet), "--out", str(store), "--vector-column", "embedding",
                         "--id-column", "id", "--label-column", "label"])
    return measured([str(Path(__file__).resolve()), "--_store", str(parquet), str(store)])


def inspect_help(pythonpath: str | None = None) -> str:
    env = dict(os.environ, **({"PYTHONPATH": pythonpath} if pythonpath else {}))
    return subprocess.run([sys.executable, "-m", "embedder", "inspect", "--help"], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                          ).stdout


def inspect_step(store: Path, test: Path, out: Path, extra: list[str],
                 pythonpath: str | None = None) -> tuple[Step, dict[str, Any]]:
    argv = ["embedder", "inspect", str(store), "--test", str(test), "--out", str(out), "--thumbnails", "none",
            "--duplicate-threshold", "0.97", "--json", *extra]
    st = measured(argv, pythonpath, cwd=Path(pythonpath) if pythonpath else None)
    return st, (json.loads(st.stdout) if st.error is None else {})


# ---- the run ------------------------------------------------------------------------------------
def parse_sizes(text: str) -> list[int]:
    return [int(float(s)) for s in text.split(",") if s.strip()]


def machine() -> str:
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {ram:.0f} GiB"


def load() -> float:
    """The 1-minute load average: above the core count, others' work shares the CPU (wall times are upper bounds)."""
    return round(os.getloadavg()[0], 1)


def old_checkout(commit: str) -> Path:
    path = Path(tempfile.gettempdir()) / "bench-old"
    if not (path / "embedder").is_dir():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), commit], check=True,
                       stdout=subprocess.DEVNULL)
    return path


def run_size(n: int, work: Path, args: argparse.Namespace, use_cli: bool, old: Path | None,
             rows: list[dict[str, Any]]) -> None:
    d = work / f"n{n}"
    if d.exists():
        shutil.rmtree(d)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--_gen", str(n), str(d), "--dim", str(args.dim),
                    "--classes", str(args.classes), "--signal", str(args.signal), "--seed", str(args.seed)],
                   check=True)
    gen_s = round(time.perf_counter() - t0, 1)
    planted = json.loads((d / "planted.json").read_text())
    print(f"# {n:,}: generated in {gen_s} s: {planted}", flush=True)
    for split in ("train", "test"):
        st = import_step(d / f"{split}.parquet", d / f"{split}_store", use_cli)
        nrows = planted[split]
        rows.append({"size": n, "step": f"import {split}" + ("" if use_cli else " (Store.writer)"),
                     "seconds": st.seconds, "peak_rss_mib": st.peak_rss_mib,
                     "rows_per_s": round(nrows / max(st.seconds, 1e-9)), "error": st.error})
        print(json.dumps(rows[-1]), flush=True)
        if st.error:
            raise SystemExit(f"import of {split} at {n:,} failed: {st.error}")
    (d / "train.parquet").unlink()  # the stores hold the vectors now: half the disk
    (d / "test.parquet").unlink()
    variants: list[tuple[str, list[str], str | None]] = [("inspect", args.inspect_args, None)]
    if old is not None and n == min(parse_sizes(args.sizes)):
        variants.append((f"inspect @{OLD_COMMIT} (today's in-memory path)", [], str(old)))
        if "--graph" in inspect_help():
            variants.append(("inspect --graph memory", [*args.inspect_args, "--graph", "memory"], None))
    for name, extra, pp in variants:
        out = d / f"report_{len(rows)}"
        st, summary = inspect_step(d / "train_store", d / "test_store", out, extra, pp)
        row = {"size": n, "step": name, "seconds": st.seconds, "peak_rss_mib": st.peak_rss_mib,
               "rows_per_s": round(n / max(st.seconds, 1e-9)), "error": st.error,
               **(score(out / "findings.parquet", d) if st.error is None else {}),
               "graph_recall": summary.get("graph", {}).get("recall"),
               "own_pair_recall": summary.get("graph", {}).get("duplicate_pair_recall"),
               "probe_accuracy": summary.get("probe_accuracy"), "stage_seconds": summary.get("seconds")}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if not args.keep:
        shutil.rmtree(d)


COLS = [("size", "size"), ("step", "step"), ("seconds", "s"), ("peak_rss_mib", "peak RSS MiB"),
        ("rows_per_s", "rows/s"), ("pair_recall", "dup-pair recall"), ("group_precision", "group prec."),
        ("leak_recall", "leak recall"), ("leak_precision", "leak prec."),
        ("likely_precision", "likely P"), ("likely_recall", "likely R"), ("all_precision", "all P"),
        ("all_recall", "all R"), ("graph_recall", "graph recall@k"), ("own_pair_recall", "own pair recall"),
        ("probe_accuracy", "probe acc.")]


def fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.3f}" if v < 1.5 else f"{v:,.1f}"
    return str(v)


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(h for _, h in COLS) + " |", "|" + "---|" * len(COLS)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(k)) for k, _ in COLS) + " |")
    lines += [f"- {r['size']:,} {r['step']} FAILED: {r['error']}" for r in rows if r.get("error")]
    return "\n".join(lines)


def sci(n: int) -> str:
    """1000000 -> 1e6, 300000 -> 3e5."""
    e = len(str(n)) - 1
    return f"{n / 10**e:g}e{e}"


def ratios(rows: list[dict[str, Any]]) -> list[str]:
    """Peak RSS and seconds of the largest size over the next one, per step (new code only)."""
    out = []
    by = {(r["size"], r["step"].split(" (")[0]): r for r in rows if not r.get("error")}
    sizes = sorted({r["size"] for r in rows})
    for small, big in zip(sizes, sizes[1:]):
        for step in ("import train", "inspect"):
            a, b = by.get((small, step)), by.get((big, step))
            if a is None or b is None:
                continue
            out.append(f"{step} {sci(big)}/{sci(small)}: peak RSS x{b['peak_rss_mib'] / a['peak_rss_mib']:.2f} "
                       f"({b['peak_rss_mib'] - a['peak_rss_mib']:+.0f} MiB; goal at 1e7/1e6 ≤ 1.10), "
                       f"seconds x{b['seconds'] / max(a['seconds'], 1e-9):.1f} for x{big / small:.0f} rows")
    return out


def check(rows: list[dict[str, Any]]) -> list[tuple[bool, str]]:
    ins = sorted((r for r in rows if r["step"] == "inspect"), key=lambda r: r["size"])
    imp = sorted((r for r in rows if r["step"].startswith("import train")), key=lambda r: r["size"])
    res: list[tuple[bool, str]] = []
    for r in ins:
        for key, goal in (("pair_recall", CHECK_PAIR_RECALL), ("leak_recall", CHECK_LEAK_RECALL),
                          ("all_recall", CHECK_FLIP_RECALL)):
            v = r.get(key)
            res.append((v is not None and v >= goal, f"{r['size']:,}: {key} {fmt(v)} ≥ {goal}"))
    for kind, pair in (("inspect", ins), ("import train", imp)):
        if len(pair) < 2:
            continue
        a, b = pair[0], pair[-1]
        res.append((b["peak_rss_mib"] <= a["peak_rss_mib"] + CHECK_RSS_SLACK_MIB,
                    f"{kind} peak RSS {b['size']:,}: {b['peak_rss_mib']:.0f} MiB ≤ {a['size']:,}'s "
                    f"{a['peak_rss_mib']:.0f} + {CHECK_RSS_SLACK_MIB}"))
        limit = CHECK_TIME_FACTOR * b["size"] / a["size"]
        res.append((b["seconds"] <= limit * a["seconds"],
                    f"{kind} time ratio {b['seconds'] / max(a['seconds'], 1e-9):.2f} ≤ {limit:.2f} "
                    f"({CHECK_TIME_FACTOR} x the size ratio)"))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1e5,1e6", help="comma-separated train rows (1e7 only on request)")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--signal", type=float, default=0.135,
                    help="share of the class centre in each vector (0.135: a linear probe ≈ 0.95)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="where the data and stores go (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep each size's data, stores and reports")
    ap.add_argument("--old", default=OLD_COMMIT,
                    help="commit (or checkout dir) whose inspect runs beside at the smallest size; '' for none")
    ap.add_argument("--inspect-args", default="",
                    help="extra arguments for the new inspect, e.g. '--memory-budget 1GB --engine ray'")
    ap.add_argument("--check", action="store_true", help="the outside check only: PASS/FAIL lines")
    ap.add_argument("--out", type=Path, default=None, help="write the markdown table here too")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--_gen", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--_store", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._gen:
        planted = generate(int(args._gen[0]), Path(args._gen[1]), args.dim, args.classes, args.signal, args.seed)
        (Path(args._gen[1]) / "planted.json").write_text(json.dumps(planted))
        return
    if args._store:
        store_from_parquet(Path(args._store[0]), Path(args._store[1]))
        return
    args.inspect_args = args.inspect_args.split()
    sizes = parse_sizes(args.sizes)
    use_cli = has_import()
    old = None
    if args.old and not args.check:
        old = Path(args.old) if Path(args.old).is_dir() else old_checkout(args.old)
    work = (args.work or Path(tempfile.mkdtemp(prefix="bench_scale_"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    # train + test (1.1) as Parquet, as stores, and inspect's on-disk buckets: ≈ 3.5 x the vectors
    need_gb = max(sizes) * args.dim * 4 * 1.1 * 3.5 / 1e9
    free_gb = shutil.disk_usage(work).free / 1e9
    load_start = load()
    how = "embedder import" if use_cli else "Store.writer (no `embedder import` yet)"
    print(f"machine: {machine()}, load average {load_start}\nwork dir {work}: {free_gb:.0f} GB free, "
          f"≈{need_gb:.1f} GB needed at the largest size; import: {how}", flush=True)
    if need_gb > free_gb:
        raise SystemExit(f"not enough disk in {work}: {free_gb:.0f} GB free, {need_gb:.0f} GB needed")
    rows: list[dict[str, Any]] = []
    try:
        for n in sizes:
            run_size(n, work, args, use_cli, old, rows)
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    text = "\n".join([f"machine: {machine()}; load average {load_start} at start, {load()} at the end "
                      "(above the core count others' work shared the CPU: wall times are upper bounds)",
                      "", table(rows), "", *ratios(rows)])
    if args.check:
        results = check(rows)
        text += "\n\n" + "\n".join(f"{'PASS' if ok else 'FAIL'} {line}" for ok, line in results)
    print("\n" + text)
    if args.out:
        args.out.write_text(text + "\n")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "load": [load_start, load()], "rows": rows},
                                        indent=1))
    if args.check and not all(ok for ok, _ in check(rows)):
        sys.exit(1)


if __name__ == "__main__":
    main()

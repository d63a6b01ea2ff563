"""The streamed label-error probe (embedder/analysis/label_stream.py) against the in-memory one
(labels.cross_validate + label_issues): precision/recall of planted label flips, agreement of the
likely tiers, time; and the streamed version's peak RSS at 10^5 and 10^6 rows x 128, fed in batches
of 65,536 from a generator (the vectors are never held whole).

Data, labels flipped uniformly at random to another class at 2 %, 5 % and 10 %:
  - digits-pixels: scikit-learn's 1,797 digits, raw 8x8 pixels, unit length;
  - digits-mobilenet: their MobileNetV2 IMAGENET1K_V1 penultimate embeddings (as
    scripts/bench_inspect.py makes them; --no-embeddings skips them);
  - mixture: 10^5 x 128, 100 Gaussian classes in a 32-d latent space lifted through a ReLU
    (bench_inspect.synthetic's recipe, generated per batch), unit length.
Methods: exact (the in-memory path), streamed with the sample = every row (its heads are the exact
path's: the same folds and C), streamed with the sample = 20 % of the rows (the other 80 % predicted by
the mean of the 5 fold heads). Per method: likely tier P/R, every disagreement (likely + possible)
P/R, precision of the top N of the self-confidence ranking (N = number of flips: precision = recall),
Jaccard of the likely set with the exact one, seconds.

Usage: python scripts/bench_label_stream.py [--quality] [--rss 100000 1000000] [--json out.json]
       python scripts/bench_label_stream.py --child-rss N [--sample-rows S]   (one measurement)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

BATCH = 65_536


def peak_rss_mib() -> int:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


class Mixture:
    """N x DIM unit vectors of CLASSES Gaussian classes, generated batch by batch (the same batch
    every time it is asked for), with a fraction FLIP of labels flipped to another class."""

    def __init__(self, n: int, dim: int = 128, classes: int = 100, flip: float = 0.05, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.n, self.dim, self.classes, self.flip, self.seed = n, dim, classes, flip, seed
        self.centres = rng.normal(0, 1.2, (classes, 32))
        self.lift = rng.normal(0, 1, (32, dim)).astype(np.float32)

    def batch(self, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(store rows, x, true y, given y) of batch B."""
        s = b * BATCH
        m = min(BATCH, self.n - s)
        rng = np.random.default_rng([self.seed, b])
        y = rng.integers(0, self.classes, m)
        z = (self.centres[y] + rng.normal(0, 1, (m, 32))).astype(np.float32)
        x = np.maximum(z @ self.lift, 0) + rng.normal(0, 0.05, (m, self.dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        given = y.copy()
        flip = rng.random(m) < self.flip
        given[flip] = (y[flip] + rng.integers(1, self.classes, int(flip.sum()))) % self.classes
        return np.arange(s, s + m, dtype=np.int64), x, y, given

    def batches(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        for b in range(-(-self.n // BATCH)):
            yield self.batch(b)

    def gather(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The vectors and given labels of sorted store ROWS (one pass)."""
        xs, ys = [], []
        for r, x, _y, g in self.batches():
            pick = np.searchsorted(rows, r)
            hit = (pick < len(rows)) & (rows[np.minimum(pick, len(rows) - 1)] == r)
            xs.append(x[hit])
            ys.append(g[hit])
        return np.concatenate(xs), np.concatenate(ys)


def stream_mixture(mix: Mixture, sample_rows: int, options: Any = None) -> tuple[Any, float]:
    """The streamed probe over MIX in batches from its generator: (StreamedLabels, seconds)."""
    from embedder.analysis.label_stream import LabelStream, sample_positions
    from embedder.analysis.options import LabelOptions

    options = options or LabelOptions()
    t0 = time.perf_counter()
    rows = sample_positions(mix.n, sample_rows, 0)  # every row is labelled: positions are store rows
    sx, sy = mix.gather(rows)
    stream = LabelStream(mix.classes, rows, sx, sy, options)
    del sx, sy
    for r, x, _y, g in mix.batches():
        stream.add_thresholds(r, x, g)
    for r, x, _y, g in mix.batches():
        stream.add(r, x, g)
    return stream.result(), time.perf_counter() - t0


def child_rss(n: int, sample_rows: int) -> dict[str, Any]:
    import torch  # noqa: F401  (the solver's library, loaded first: its RSS is the floor)

    from embedder.analysis.options import LabelOptions

    floor = peak_rss_mib()
    mix = Mixture(n, flip=0.05)
    res, secs = stream_mixture(mix, sample_rows, LabelOptions(sample_rows=sample_rows))
    truth_n = 0
    for _r, _x, y, g in mix.batches():
        truth_n += int((y != g).sum())
    return {"rows": n, "sample_rows": min(n, sample_rows), "seconds": round(secs, 1), "peak_rss_mib": peak_rss_mib(),
            "rss_after_imports_mib": floor, "accuracy": round(res.accuracy, 4), "disagreements": res.disagreements,
            "listed": res.listed, "likely": int(res.issues.likely.sum()), "flipped": truth_n}


def scores(rows: np.ndarray, likely: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """P/R of the likely tier and of every listed row, precision of the top N (N = flips)."""
    n = int(truth.sum())

    def pr(flagged: np.ndarray) -> tuple[float, float]:
        tp = int(truth[flagged].sum())
        return tp / max(len(flagged), 1), tp / max(n, 1)

    lp, lr = pr(rows[likely])
    ap, ar = pr(rows)
    return {"likely_p": lp, "likely_r": lr, "all_p": ap, "all_r": ar, "top_n_p": float(truth[rows[:n]].sum()) / n}


def compare(x: np.ndarray, y: np.ndarray, noisy: np.ndarray, n_classes: int, fraction: float = 0.2,
            exact_time: bool = True) -> dict[str, dict[str, float]]:
    """Exact, streamed (sample = all), streamed (sample = FRACTION) on in-memory X (unit rows)."""
    from embedder.analysis.label_stream import LabelStream, sample_positions
    from embedder.analysis.labels import CrossValidated, cross_validate, label_issues
    from embedder.analysis.options import LabelOptions

    classes = [str(c) for c in range(n_classes)]
    rows = np.arange(len(y), dtype=np.int64)
    truth = noisy != y
    out: dict[str, dict[str, float]] = {}
    t0 = time.perf_counter()
    stream = LabelStream(n_classes, rows, x, noisy, LabelOptions())
    for add in (stream.add_thresholds, stream.add):
        for s in range(0, len(rows), BATCH):
            add(rows[s:s + BATCH], x[s:s + BATCH], noisy[s:s + BATCH])
    new = stream.result()
    t_all = time.perf_counter() - t0
    if exact_time:
        t0 = time.perf_counter()
        cv = cross_validate(x, noisy, rows, classes)
        old = label_issues(cv)
        t_old = time.perf_counter() - t0
        assert cv.accuracy == new.accuracy and np.array_equal(old.rows, new.issues.rows)
    else:  # the same heads (same C, folds, solver): the exact path's probabilities without a second fit
        proba = np.concatenate([stream.proba(rows[s:s + BATCH], x[s:s + BATCH]) for s in range(0, len(y), BATCH)])
        old = label_issues(CrossValidated(rows, noisy, proba, stream.C, stream.standardize, stream.folds))
        t_old = float("nan")
    old_likely = set(old.rows[old.likely].tolist())
    out["exact"] = {**scores(old.rows, old.likely, truth), "jaccard": 1.0, "seconds": t_old}
    for name, res, secs in [("stream-all", new, t_all), ("stream-all-argmax", stream.result(cell="argmax"), t_all)] + [
            ("stream-20%", *_timed_sample(x, noisy, n_classes, sample_positions(len(y), int(fraction * len(y)), 0)))]:
        lk = set(res.issues.rows[res.issues.likely].tolist())
        out[name] = {**scores(res.issues.rows, res.issues.likely, truth),
                     "jaccard": len(lk & old_likely) / max(len(lk | old_likely), 1), "seconds": secs}
    return out


def _timed_sample(x: np.ndarray, noisy: np.ndarray, n_classes: int, sample: np.ndarray) -> tuple[Any, float]:
    from embedder.analysis.label_stream import LabelStream

    t0 = time.perf_counter()
    rows = np.arange(len(noisy), dtype=np.int64)
    stream = LabelStream(n_classes, rows[sample], x[sample], noisy[sample])
    for add in (stream.add_thresholds, stream.add):
        for s in range(0, len(rows), BATCH):
            add(rows[s:s + BATCH], x[s:s + BATCH], noisy[s:s + BATCH])
    return stream.result(), time.perf_counter() - t0


def flipped(y: np.ndarray, rate: float, n_classes: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(100 + seed)
    flip = rng.choice(len(y), int(round(rate * len(y))), replace=False)
    noisy = y.copy()
    noisy[flip] = (y[flip] + rng.integers(1, n_classes, len(flip))) % n_classes
    return noisy


def digits_embeddings() -> tuple[np.ndarray, np.ndarray]:
    cache = Path(tempfile.gettempdir()) / "bench_label_stream_digits.npz"
    if cache.exists():
        d = np.load(cache)
        return d["x"], d["y"]
    from bench_inspect import digits_vectors

    with tempfile.TemporaryDirectory() as tmp:
        x, y = digits_vectors(Path(tmp))
    np.savez(cache, x=x, y=y)
    return x, y


def quality(seeds: int, embeddings: bool, rates: list[float], exact_time: bool,
            digits: bool = True, mixture: bool = True) -> list[dict[str, Any]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    sets: list[tuple[str, np.ndarray, np.ndarray, int]] = [
        ("digits-pixels", d.data.astype(np.float32), d.target, seeds)] if digits else []
    if embeddings:
        ex, ey = digits_embeddings()
        sets.append(("digits-mobilenet", ex, ey, seeds))
    out = []
    for name, x, y, n_seeds in sets:
        xn = (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)
        n_classes = int(y.max()) + 1
        for rate in (0.02, 0.05, 0.10):
            runs = [compare(xn, y, flipped(y, rate, n_classes, s), n_classes, exact_time=exact_time)
                    for s in range(n_seeds)]
            row = {"data": name, "rows": len(y), "flipped": rate,
                   **{m: {k: round(float(np.mean([r[m][k] for r in runs])), 3) for k in runs[0][m]} for m in runs[0]}}
            out.append(row)
            print(json.dumps(row), flush=True)
    for rate in rates if mixture else []:
        mix = Mixture(100_000, flip=rate)
        parts = list(mix.batches())
        x = np.concatenate([p[1] for p in parts])
        y = np.concatenate([p[2] for p in parts])
        noisy = np.concatenate([p[3] for p in parts])
        res = compare(x, y, noisy, mix.classes, exact_time=exact_time)
        row = {"data": "mixture", "rows": len(y), "flipped": rate,
               **{m: {k: round(v, 3) for k, v in r.items()} for m, r in res.items()}}
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


def table(quality_rows: list[dict[str, Any]], rss_rows: list[dict[str, Any]]) -> str:
    lines = ["| data | flipped | method | likely P / R | all disagreements P / R | top-N precision "
             "| likely Jaccard vs exact | seconds |", "|---|---|---|---|---|---|---|---|"]
    for r in quality_rows:
        for m in ("exact", "stream-all", "stream-all-argmax", "stream-20%"):
            if m not in r:
                continue
            v = r[m]
            secs = "—" if v["seconds"] != v["seconds"] else f"{v['seconds']:.1f}"
            lines.append(f"| {r['data']} ({r['rows']:,}) | {r['flipped']:.0%} | {m} | {v['likely_p']:.3f} / "
                         f"{v['likely_r']:.3f} | {v['all_p']:.3f} / {v['all_r']:.3f} | {v['top_n_p']:.3f} | "
                         f"{v['jaccard']:.3f} | {secs} |")
    if rss_rows:
        lines += ["", "| rows × 128 | probe sample | seconds | peak RSS MiB | RSS after imports MiB | accuracy |",
                  "|---|---|---|---|---|---|"]
        for r in rss_rows:
            lines.append(f"| {r['rows']:,} | {r['sample_rows']:,} | {r['seconds']} | {r['peak_rss_mib']} | "
                         f"{r['rss_after_imports_mib']} | {r['accuracy']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quality", action="store_true")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--no-embeddings", action="store_true")
    ap.add_argument("--no-digits", action="store_true")
    ap.add_argument("--no-mixture", action="store_true")
    ap.add_argument("--rates", type=float, nargs="*", default=[0.02, 0.05, 0.10])
    ap.add_argument("--exact-time", action="store_true", help="the mixture's exact path fitted again, timed")
    ap.add_argument("--rss", type=int, nargs="*", default=[])
    ap.add_argument("--sample-rows", type=int, nargs="*", default=[200_000])
    ap.add_argument("--child-rss", type=int)
    ap.add_argument("--json")
    ap.add_argument("--table")
    a = ap.parse_args()
    if a.child_rss:
        print(json.dumps(child_rss(a.child_rss, a.sample_rows[0])))
        return
    q = quality(a.seeds, not a.no_embeddings, a.rates, a.exact_time, not a.no_digits,
                not a.no_mixture) if a.quality else []
    rss = []
    for s in a.sample_rows:
        for n in a.rss:
            p = subprocess.run([sys.executable, __file__, "--child-rss", str(n), "--sample-rows", str(s)],
                               capture_output=True, text=True, check=True)
            rss.append(json.loads(p.stdout.strip().splitlines()[-1]))
            print(json.dumps(rss[-1]), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"quality": q, "rss": rss}, indent=1))
    text = table(q, rss)
    print(text)
    if a.table:
        Path(a.table).write_text(text + "\n")


if __name__ == "__main__":
    main()

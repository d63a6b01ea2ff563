"""scripts/bench_scale.py's generator plants what its scoring counts: near-duplicate pairs and leaks at
the promised cosines, distinct rows far below them, flipped labels that differ from the truth, the
same data for the same seed; and the scoring reads a findings table the way `embedder inspect`
writes it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SCRIPT = Path(__file__).parent.parent / "scripts" / "bench_scale.py"


def load_bench():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("bench_scale", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_scale"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def vectors(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    t = pq.read_table(path)
    assert t.schema.field("embedding").type == pa.list_(pa.float32(), 128)
    x = t.column("embedding").combine_chunks().values.to_numpy().reshape(-1, 128)
    return t.column("id").to_pylist(), t.column("label").to_pylist(), x


def test_generator_plants_pairs_leaks_and_flips_at_the_promised_cosines(tmp_path: Path) -> None:
    bench = load_bench()
    planted = bench.generate(2_000, tmp_path / "a", dim=128, classes=10, signal=0.135, seed=3, chunk=1000)
    assert planted == {"train": 2_000, "test": 200, "pairs": 20, "leaks": 1, "flips": 40}
    ids, labels, x = vectors(tmp_path / "a" / "train.parquet")
    tids, _, tx = vectors(tmp_path / "a" / "test.parquet")
    assert len(set(ids)) == 2_000 and len(set(tids)) == 200
    assert np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    row = {i: k for k, i in enumerate(ids)}
    pairs = pq.read_table(tmp_path / "a" / "truth_pairs.parquet").to_pydict()
    cos = np.array([x[row[a]] @ x[row[b]] for a, b in zip(pairs["source"], pairs["copy"])])
    assert cos.min() >= 0.975 - 1e-5 and cos.max() <= 0.995 + 1e-5
    assert np.allclose(cos, pairs["cosine"], atol=1e-5)
    assert max(pairs["source"].count(s) for s in pairs["source"]) >= 2  # a group of 3 or more
    leaks = pq.read_table(tmp_path / "a" / "truth_leaks.parquet").to_pydict()
    trow = {i: k for k, i in enumerate(tids)}
    lcos = np.array([tx[trow[t]] @ x[row[s]] for t, s in zip(leaks["test"], leaks["train"])])
    assert lcos.min() >= 0.975 - 1e-5
    # nothing else comes near: the nearest unplanted neighbour is far below the 0.97 threshold
    sims = x @ x.T
    np.fill_diagonal(sims, -1)
    for a, b in zip(pairs["source"], pairs["copy"]):
        sims[row[a], row[b]] = sims[row[b], row[a]] = -1
    copies: dict[str, list[int]] = {}
    for a, b in zip(pairs["source"], pairs["copy"]):
        copies.setdefault(a, []).append(row[b])
    for rows in copies.values():  # copies of one source are near each other too
        sims[np.ix_(rows, rows)] = -1
    assert sims.max() < 0.9
    flips = pq.read_table(tmp_path / "a" / "truth_flips.parquet").to_pydict()
    assert all(labels[row[i]] == g != t for i, g, t in zip(flips["id"], flips["given"], flips["true"]))
    # deterministic: a chunk drawn again from its seed is the same bytes
    again = bench.make_chunk(1, 1000, 1000, 100, 100, bench.centres(10, 128, 3), 0.135, 3)
    assert again.ids == ids[1000:] and np.array_equal(again.x, x[1000:])

    # scoring: a findings table as inspect writes it
    some = {pairs["source"][0], pairs["copy"][0]}
    findings = pa.table({
        "kind": ["leak", "duplicate", "label_error", "label_error"],
        "ids": [[leaks["test"][0], leaks["train"][0]], sorted(some), [flips["id"][0]], [ids[1]]],
        "detail": [None, None, "likely", "possible"]})
    pq.write_table(findings, tmp_path / "findings.parquet")
    s = bench.score(tmp_path / "findings.parquet", tmp_path / "a")
    assert s["pair_recall"] == round(1 / 20, 4) and s["group_precision"] == 1.0
    assert s["leak_recall"] == 1.0 and s["leak_precision"] == 1.0
    assert s["likely_precision"] == 1.0 and s["likely_recall"] == round(1 / 40, 4)
    assert s["all_recall"] == round((1 + (ids[1] in flips["id"])) / 40, 4)

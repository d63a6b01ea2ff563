"""The bucketed `inspect` / `dedup` path (analysis.streamed) refuses what the in-memory path
refuses, and its bucket folder's errors are one line with nothing left behind (review R1)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from embedder.analysis.dedup import dedup
from embedder.analysis.inspection import inspect_store
from embedder.analysis.options import InspectOptions
from embedder.cli import app
from embedder.errors import InspectError
from tests.test_inspect import classes_data, write_store

runner = CliRunner()


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("hostile")
    x, y = classes_data(k=2, per_class=40, dim=8)
    return {"tmp": str(tmp), "train": write_store(tmp / "train", x, [f"c{c}" for c in y]),
            "other": write_store(tmp / "other", x[:5], None, "t", weights_tag="1")}


@pytest.mark.parametrize("graph", ["memory", "buckets"])
def test_a_test_store_embedded_differently_is_refused_on_both_paths(stores: dict[str, str], graph: str) -> None:
    out = Path(stores["tmp"]) / f"out-{graph}"
    with pytest.raises(InspectError, match="embedded differently.*weights differs"):
        inspect_store(stores["train"], str(out), stores["other"], InspectOptions(graph=graph, thumbnails="none"))
    assert not out.exists()  # nothing left behind: no bucket folder, no empty report folder


def test_a_work_dir_that_cannot_be_made_is_one_line(stores: dict[str, str]) -> None:
    blocker = Path(stores["tmp"]) / "a-file"
    blocker.write_text("")
    out = Path(stores["tmp"]) / "out-cli"
    r = runner.invoke(app, ["inspect", stores["train"], "--out", str(out), "--graph", "buckets",
                            "--thumbnails", "none", "--work-dir", str(blocker / "sub")])
    assert r.exit_code == 2, r.output
    assert "cannot make the bucket folder" in r.output and "Traceback" not in r.output
    with pytest.raises(InspectError, match="--work-dir"):
        dedup(stores["train"], str(out / "d.parquet"),
              options=InspectOptions(graph="buckets", work_dir=str(blocker / "sub")))


def test_a_missing_work_dir_is_made_and_removed_after(stores: dict[str, str]) -> None:
    work = Path(stores["tmp"]) / "work" / "deeper"
    out = Path(stores["tmp"]) / "out-work"
    inspect_store(stores["train"], str(out), None,
                  InspectOptions(graph="buckets", thumbnails="none", work_dir=str(work)))
    assert work.is_dir() and not list(work.iterdir())


def test_dedup_cli_takes_the_graph_and_refuses_an_unknown_one(stores: dict[str, str]) -> None:
    out = Path(stores["tmp"]) / "dd"
    r = runner.invoke(app, ["dedup", stores["train"], "--out", str(out / "d.parquet"), "--graph", "bogus"])
    assert r.exit_code == 2 and "unknown --graph 'bogus'" in r.output, r.output
    r = runner.invoke(app, ["dedup", stores["train"], "--out", str(out / "d.parquet"), "--graph", "buckets",
                            "--work-dir", str(out / "work")])
    assert r.exit_code == 0, r.output
    assert (out / "d.parquet").exists() and not list((out / "work").iterdir())


def test_outliers_beyond_max_listed_are_counted_not_held(stores: dict[str, str]) -> None:
    """Rows beyond the fence grow with the store: only the --max-listed farthest are kept (and
    written); the summary counts them all and says so."""
    x = np.random.default_rng(5).normal(0, 1, (300, 8)).astype(np.float32)
    x[:40] *= 0  # 40 zero vectors: as far as can be from everything
    x[40:60] = -x[60:80]  # and 20 turned the other way
    store = write_store(Path(stores["tmp"]) / "far", x, None)
    out = Path(stores["tmp"]) / "out-far"
    r = runner.invoke(app, ["inspect", store, "--out", str(out), "--graph", "buckets", "--thumbnails", "none",
                            "--max-listed", "5", "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    rows = [f for f in pq.read_table(out / "findings.parquet").to_pylist() if f["kind"] == "outlier"]
    assert s["outliers"] >= 40 and len(rows) == 5 and [f["rank"] for f in rows] == [1, 2, 3, 4, 5]
    assert any("the 5 farthest of" in m for m in s["skipped"])
    full = inspect_store(store, str(out) + "-full", None, InspectOptions(graph="buckets", thumbnails="none"))
    assert full.counts["outlier"] == s["outliers"]
    assert [f.score for f in full.findings if f.kind == "outlier"][:5] == [f["score"] for f in rows]


def test_duplicate_groups_are_flat_arrays_equal_to_a_union_find() -> None:
    """At 10^8 rows a store may hold millions of groups: they are arrays (rows, offsets, weakest
    link), not one object each; the same groups and order as a plain union-find."""
    from embedder.analysis.duplicates import group_arrays, groups_from_edges

    rng = np.random.default_rng(7)
    a, b = rng.integers(0, 500, 300), rng.integers(0, 500, 300)
    s = rng.choice([0.95, 0.97, 0.99], 300).astype(np.float32)
    parent = list(range(500))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i, j in zip(a.tolist(), b.tolist()):
        parent[root(i)] = root(j)
    members: dict[int, list[int]] = {}
    for i in sorted(set(a.tolist()) | set(b.tolist())):
        members.setdefault(root(i), []).append(i)
    weakest = {r: min(float(w) for i, w in zip(a.tolist(), s) if root(i) == r) for r in members}
    want = sorted(((m, weakest[r]) for r, m in members.items() if len(m) > 1),
                  key=lambda q: (-len(q[0]), -q[1], q[0][0]))
    g = group_arrays(a, b, s)
    got = [(g.rows[g.offsets[i]:g.offsets[i + 1]].tolist(), float(g.similarity[i])) for i in range(len(g))]
    assert got == want and g.rows.dtype == np.int64
    assert [(x.rows.tolist(), x.similarity) for x in groups_from_edges(a, b, s)] == got
    f = g.by_first_row()
    assert [f.rows[f.offsets[i]:f.offsets[i + 1]].tolist() for i in range(len(f))] == sorted(m for m, _ in got)
    assert len(group_arrays(a[:0], b[:0], s[:0])) == 0 and len(group_arrays(a[:0], b[:0], s[:0]).by_first_row()) == 0


def test_knn_vote_is_the_dense_argmax_without_a_rows_by_classes_matrix() -> None:
    from embedder.analysis.streamed import knn_vote

    rng = np.random.default_rng(0)
    for _ in range(50):
        k, c = int(rng.integers(1, 12)), int(rng.integers(1, 6))
        ny = rng.integers(-1, c, (40, k))
        ny[:3] = -1  # no neighbour with a label: class 0, as argmax of zeros
        w = np.where(ny >= 0, rng.choice([0.5, 1.0, np.exp(-3.0), 0.3], (40, k)), 0.0)
        dense = np.zeros((40, c))
        np.add.at(dense, (np.repeat(np.arange(40), k), np.maximum(ny, 0).ravel()), w.ravel())
        assert (knn_vote(ny, w) == dense.argmax(1)).all()


def test_many_classes_name_their_codes_in_linear_time_and_skip_what_the_budget_cannot_hold(
        stores: dict[str, str]) -> None:
    import time

    import pyarrow as pa

    from embedder.analysis.streamed import ClassCodes

    codes = ClassCodes()
    codes.codes(pa.array([f"k{i}" for i in range(40_000)][::-1]))
    t = time.perf_counter()
    classes, remap = codes.final()
    assert time.perf_counter() - t < 2.0  # was quadratic: 11 s at 40,000 classes
    assert classes[remap[0]] == "k39999" and classes[remap[-1]] == "k0"
    x, y = classes_data(k=300, per_class=2, dim=8)
    store = write_store(Path(stores["tmp"]) / "many", x, [f"c{c}" for c in y])
    insp = inspect_store(store, str(Path(stores["tmp"]) / "out-many"), None,
                         InspectOptions(graph="buckets", thumbnails="none", memory_budget=32 << 20))
    assert any("300 classes need about" in m for m in insp.summary.skipped)
    assert insp.summary.label_issues is None and insp.summary.images == 600


def test_api_takes_the_budget_as_the_cli_writes_it(stores: dict[str, str]) -> None:
    import embedder
    from embedder.errors import EmbedderError

    out = Path(stores["tmp"]) / "api"
    with pytest.raises(EmbedderError, match="unknown --graph"):  # the budget read, then the options checked
        embedder.inspect(stores["train"], out, memory_budget="64MB", graph="bogus")
    d = embedder.dedup(stores["train"], out / "d.parquet", memory_budget="64MB", graph="buckets")
    assert d["images"] == 80
    with pytest.raises(EmbedderError, match="memory budget"):
        embedder.dedup(stores["train"], out / "d.parquet", memory_budget="lots")

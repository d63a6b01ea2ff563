"""`inspect` and `dedup` over the bucketed, bounded-memory graph (analysis.streamed): the same
duplicates, leaks and label errors as the in-memory path, recall measured and printed, the same
findings.parquet columns; the per-bucket search on Ray gives the same answer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from embedder.analysis.dedup import dedup
from embedder.analysis.inspection import inspect_store, write_outputs
from embedder.analysis.options import InspectOptions
from embedder.analysis.streamed import Reservoir
from embedder.cli import app
from tests.test_inspect import classes_data, write_store

runner = CliRunner()

try:  # test_ray's fixtures: a throwaway cluster (module-scoped, shut down after), a time limit per test
    from tests.test_ray import cluster, time_limit  # noqa: F401
except pytest.skip.Exception:  # no Ray here: only the Ray test is skipped
    @pytest.fixture
    def cluster() -> str:
        pytest.skip("ray is not installed")


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> dict:  # type: ignore[type-arg]
    """1,600 labelled rows in 4 classes, 40 near-copies (some in groups of 3), 24 flipped labels,
    a test store with 12 leaked near-copies."""
    tmp = tmp_path_factory.mktemp("planted")
    x, y = classes_data(k=4, per_class=400, dim=24, sep=2.0)
    rng = np.random.default_rng(3)
    src = rng.choice(len(x), 30, replace=False)
    twice = src[:10]
    copies = np.vstack([x[src], x[twice]]) + rng.normal(0, 0.02, (40, x.shape[1])).astype(np.float32)
    xs = np.vstack([x, copies])
    ys = np.concatenate([y, y[src], y[twice]])
    flip = rng.choice(len(x), 24, replace=False)
    ys[flip] = (ys[flip] + 1 + rng.integers(0, 3, len(flip))) % 4
    store = write_store(tmp / "train", xs, [f"c{c}" for c in ys])
    leaked = rng.choice(len(x), 12, replace=False)
    fresh, _ = classes_data(k=4, per_class=25, dim=24, sep=2.0, seed=11)
    test_x = np.vstack([xs[leaked] + rng.normal(0, 0.02, (12, x.shape[1])).astype(np.float32), fresh])
    test = write_store(tmp / "test", test_x, None, "t")
    groups = {frozenset({f"v{s:05d}", f"v{len(x) + i:05d}"} | ({f"v{len(x) + 30 + i:05d}"} if i < 10 else set()))
              for i, s in enumerate(src)}
    return {"tmp": tmp, "store": store, "test": test, "groups": groups, "flip": {f"v{i:05d}" for i in flip},
            "leaks": {(f"t{i:05d}", f"v{j:05d}") for i, j in enumerate(leaked)}}


def _run(p: dict, name: str, **kw: object) -> tuple[dict, list[dict]]:  # type: ignore[type-arg]
    out = p["tmp"] / name
    opts = InspectOptions(thumbnails="none", duplicate_threshold=0.97, **kw)  # type: ignore[arg-type]
    s = write_outputs(inspect_store(p["store"], str(out), p["test"], opts), str(out))
    return s.to_dict(), pq.read_table(out / "findings.parquet").to_pylist()


def test_buckets_find_what_the_exact_path_finds(planted: dict) -> None:  # type: ignore[type-arg]
    exact, f_exact = _run(planted, "exact", graph="memory")
    s, f = _run(planted, "buckets", graph="buckets", bucket_rows=120)
    g = s["graph"]
    assert g["method"] == "buckets" and g["buckets"] >= 10 and not (planted["tmp"] / "buckets" / ".inspect-").exists()
    groups = {frozenset(r["ids"]) for r in f if r["kind"] == "duplicate"}
    assert groups == planted["groups"] == {frozenset(r["ids"]) for r in f_exact if r["kind"] == "duplicate"}
    assert {tuple(r["ids"]) for r in f if r["kind"] == "leak"} == planted["leaks"]
    assert [r["kind"] for r in f[:12]] == ["leak"] * 12  # the same order of kinds, ranks from 1
    assert [r["rank"] for r in f if r["kind"] == "duplicate"][:3] == [1, 2, 3]
    likely = {r["ids"][0] for r in f if r["kind"] == "label_error" and r["detail"] == "likely"}
    assert len(likely & planted["flip"]) >= 0.85 * len(planted["flip"])
    assert len(likely & planted["flip"]) >= 0.9 * len(likely)
    assert s["probe_accuracy"] == pytest.approx(exact["probe_accuracy"], abs=0.01)
    assert s["knn_accuracy"] == pytest.approx(exact["knn_accuracy"], abs=0.02)
    # recall measured against exact search from sampled rows, and said
    assert g["recall_queries"] == 1640 and 0.5 < g["recall"] <= 1.0
    assert g["duplicate_pairs_checked"] > 0 and g["duplicate_pair_recall"] == 1.0
    lo, hi = g["duplicate_pair_recall_95"]  # a few dozen pairs: an interval, not a point
    assert lo < 0.99 < hi == 1.0
    assert set(f[0]) == {"kind", "rank", "ids", "paths", "score", "given", "suggested", "detail"}
    html = (planted["tmp"] / "buckets" / "index.html").read_text()
    assert "k-means buckets" in html and "duplicate-pair recall" in html


def test_cli_auto_switches_above_the_exact_limit_and_bad_options_are_one_line(planted: dict) -> None:  # type: ignore[type-arg]
    out = planted["tmp"] / "cli"
    r = runner.invoke(app, ["inspect", planted["store"], "--test", planted["test"], "--out", str(out),
                            "--thumbnails", "none", "--duplicate-threshold", "0.97", "--memory-budget", "64MB",
                            "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["graph"]["exact"] is True  # 1,640 rows: under the exact limit
    for bad, says in ((["--graph", "nope"], "unknown --graph"), (["--memory-budget", "lots"], "memory budget"),
                      (["--engine", "spark"], "unknown --engine")):
        r = runner.invoke(app, ["inspect", planted["store"], "--out", str(out), *bad])
        assert r.exit_code == 2 and says in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_dedup_buckets_equal_exact(planted: dict, tmp_path: Path) -> None:  # type: ignore[type-arg]
    a = dedup(planted["store"], str(tmp_path / "exact.parquet"), 0.97)
    b = dedup(planted["store"], str(tmp_path / "buckets.parquet"), 0.97,
              options=InspectOptions(graph="buckets", bucket_rows=150))
    assert (a.groups, a.duplicates) == (b.groups, b.duplicates) == (30, 40)
    # 328 buckets: two-level k-means and the inverted file over the centroids
    c = dedup(planted["store"], str(tmp_path / "two.parquet"), 0.97,
              options=InspectOptions(graph="buckets", bucket_rows=5))
    assert (c.groups, c.duplicates) == (30, 40)
    ta, tb, tc = (pq.read_table(tmp_path / f).to_pylist() for f in ("exact.parquet", "buckets.parquet", "two.parquet"))
    assert ta == tb == tc


def test_reservoir_is_a_uniform_prefix_whatever_the_batches() -> None:
    rng = np.random.default_rng(0)
    keys = rng.random(10_000)
    rows = np.arange(10_000)
    whole = Reservoir(500, 2)
    whole.offer(keys, rows, rows, np.zeros((10_000, 2), np.float32))
    parts = Reservoir(500, 2)
    for s in range(0, 10_000, 777):
        parts.offer(keys[s:s + 777], rows[s:s + 777], rows[s:s + 777], np.zeros((len(rows[s:s + 777]), 2), np.float32))
    a, b = whole.by_key()[0], parts.by_key()[0]
    assert list(a) == list(b) == list(np.argsort(keys)[:500])


@pytest.mark.slow
def test_ray_engine_searches_the_buckets_as_tasks(planted: dict, tmp_path: Path,  # type: ignore[type-arg]
                                                  request: pytest.FixtureRequest) -> None:
    from embedder.embed.options import RayOptions

    address = request.getfixturevalue("cluster")  # test_ray's throwaway cluster: no local instance left behind

    local = dedup(planted["store"], str(tmp_path / "local.parquet"), 0.97,
                  options=InspectOptions(graph="buckets", bucket_rows=150))
    ray = dedup(planted["store"], str(tmp_path / "ray.parquet"), 0.97,
                options=InspectOptions(graph="buckets", bucket_rows=150, engine="ray", ray_task_cpus=0.25,
                                       ray=RayOptions(address=address)))
    assert (local.groups, local.duplicates) == (ray.groups, ray.duplicates)
    assert pq.read_table(tmp_path / "local.parquet").equals(pq.read_table(tmp_path / "ray.parquet"))


def test_api_runs_the_same_functions(planted: dict, tmp_path: Path) -> None:  # type: ignore[type-arg]
    import embedder
    from embedder.errors import EmbedderError

    d = embedder.dedup(planted["store"], tmp_path / "d.parquet", threshold=0.97, graph="buckets", bucket_rows=150)
    assert (d["groups"], d["duplicates"]) == (30, 40)
    with pytest.raises(EmbedderError, match="unknown option bogus; valid: .*memory_budget"):
        embedder.inspect(planted["store"], tmp_path / "r", bogus=1)

"""`embedder select`: which images to label first. Planted mixtures (generated vectors written as real
stores) and one store extracted with the tiny backbone; the CLI's one-line errors; --evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from embedder.cli import app
from embedder.learn import active
from embedder.models.origin import WeightsRef
from embedder.models.registry import get_backbone
from embedder.store.provenance import Provenance
from embedder.store.shards import Store, embeddings_to_arrow
from tests.conftest import make_images

runner = CliRunner()


def write_store(path: Path, x: np.ndarray, labels: list[str | None] | None = None, shard: int = 1000) -> str:
    prov = Provenance("synthetic", WeightsRef("file", "none", "0"), "penultimate", "avg",
                      get_backbone("tiny_test").preprocessing(), x.shape[1])
    n = len(x)
    with Store.writer(path, prov) as st:
        schema = st.read().schema
        for s in range(0, n, shard):
            m = min(shard, n - s)
            ids = [f"v{i:05d}" for i in range(s, s + m)]
            st.write_shard(pa.table({
                "id": ids, "path": [f"/images/{i}.jpg" for i in ids],
                "label": labels[s:s + m] if labels is not None else [None] * m,
                "embedding": embeddings_to_arrow(x[s:s + m], "float32"),
                "width": pa.array([1] * m, pa.int32()), "height": pa.array([1] * m, pa.int32()),
                "file_hash": [None] * m, "caption": [None] * m}, schema=schema))
        st.update_manifest()
    return str(path)


def mixture(sizes: list[int], dim: int = 24, spread: float = 0.35, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Well separated Gaussian clusters of the given sizes (cluster = class), shuffled."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (len(sizes), dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    y = np.repeat(np.arange(len(sizes)), sizes)
    x = centres[y] + rng.normal(0, spread / np.sqrt(dim), (len(y), dim))
    order = rng.permutation(len(y))
    return x[order].astype(np.float32), y[order]


SIZES = [400, 300, 250, 200, 150, 120, 90, 70, 50, 40]  # imbalanced: random picks miss the small ones


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, np.ndarray]:
    x, y = mixture(SIZES)
    return write_store(tmp_path_factory.mktemp("planted") / "s", x), y


def rows_of(ids: list[str]) -> np.ndarray:
    return np.array([int(i[1:]) for i in ids])


def one_line(output: str) -> str:
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, output
    assert lines[0].startswith("error: "), output
    return lines[0]


def test_cold_start_covers_the_planted_clusters_better_than_random_and_is_reproducible(
        planted: tuple[str, np.ndarray]) -> None:
    store, y = planted
    sel = active.select(store, 10, seed=3)
    assert sel.strategy == "typical" and "cold start" in sel.reason and sel.labelled == 0
    covered = len(set(y[rows_of(sel.ids)].tolist()))
    rng = np.random.default_rng(0)
    random_cover = np.mean([len(set(y[rng.choice(len(y), 10, replace=False)].tolist())) for _ in range(200)])
    assert covered >= 9 and covered >= random_cover + 2, (covered, random_cover)
    why = sel.table.column("why").to_pylist()
    assert all(w.startswith("typical of a group of ") and w.endswith("(none labelled)") for w in why)
    # the same seed, the same picks in the same order; the picks' groups are largest first
    again = active.select(store, 10, seed=3)
    assert again.ids == sel.ids
    sizes = [int(w.split("group of ")[1].split()[0].replace(",", "")) for w in sel.table.column("why").to_pylist()]
    assert sizes == sorted(sizes, reverse=True)
    # typical: a pick sits nearer its cluster's centre than the cluster's average member
    xs = Store.open(store).read_embeddings()
    xs /= np.linalg.norm(xs, axis=1, keepdims=True)
    for r in rows_of(sel.ids)[:5]:
        members = xs[y == y[r]]
        centre = members.mean(0)
        assert xs[r] @ centre > np.median(members @ centre)


def test_output_file_schema_and_metadata_exactly(planted: tuple[str, np.ndarray], tmp_path: Path) -> None:
    store, _ = planted
    out = tmp_path / "sub" / "picks.parquet"
    r = runner.invoke(app, ["select", store, "--budget", "7", "--out", str(out), "--seed", "1"])
    assert r.exit_code == 0, r.output
    assert "typical: 7 of 1,670 unlabelled images picked" in r.output and "cold start" in r.output
    t = pq.read_table(out)
    assert t.schema.names == ["id", "path", "rank", "why"]
    assert [f.type for f in t.schema] == [pa.string(), pa.string(), pa.int32(), pa.string()]
    assert t.column("rank").to_pylist() == list(range(1, 8))
    meta = json.loads(t.schema.metadata[b"embedder.selection"])
    assert meta == {"store": store, "strategy": "typical", "budget": 7, "seed": 1, "labelled": 0, "version": 1}
    assert t.column("path").to_pylist() == [f"/images/{i}.jpg" for i in t.column("id").to_pylist()]
    assert not list(out.parent.glob(".*tmp"))  # written whole, through a temporary
    # a second run replaces the file (as dedup's and probe's --out)
    r = runner.invoke(app, ["select", store, "--budget", "3", "--out", str(out)])
    assert r.exit_code == 0 and pq.read_table(out).num_rows == 3


def boundary_store(tmp_path: Path, per_class_labelled: int) -> tuple[str, np.ndarray, Path, list[str]]:
    """Two classes along the first axis (overlapping near 0) plus 6 noise dimensions; a labels file of
    the PER_CLASS_LABELLED rows of each class farthest from the boundary, and 3 ids the store lacks."""
    rng = np.random.default_rng(1)
    n = 800
    y = rng.integers(0, 2, n)
    x = np.concatenate([(np.where(y == 1, 1.0, -1.0) + rng.normal(0, 0.6, n))[:, None],
                        rng.normal(0, 0.5, (n, 6)), np.full((n, 1), 3.0)], 1).astype(np.float32)
    store = write_store(tmp_path / "b", x)
    ids = [f"v{i:05d}" for i in range(n)]
    chosen = []
    for c in (0, 1):
        idx = np.flatnonzero(y == c)
        far = idx[np.argsort(-np.abs(x[idx, 0]))][:per_class_labelled]
        chosen.extend(far.tolist())
    lab_ids = [ids[i] for i in chosen] + ["nope-1", "nope-2", "nope-3"]
    lab = ["pos" if y[i] else "neg" for i in chosen] + ["pos", "neg", "pos"]
    f = tmp_path / "labels.csv"
    pacsv.write_csv(pa.table({"id": lab_ids, "label": lab}), f)
    return store, x, f, [ids[i] for i in chosen]


def test_warm_start_picks_near_the_boundary_never_a_labelled_id_and_counts_unknown_ids(tmp_path: Path) -> None:
    store, x, labels, labelled_ids = boundary_store(tmp_path, 12)
    sel = active.select(store, 8, labels=labels, seed=0)
    assert sel.strategy == "uncertain" and sel.reason.startswith("warm start: 24 labels in 2 classes")
    assert sel.joined is not None and sel.joined.unknown == 3 and sel.joined.used == 24
    assert not set(sel.ids) & set(labelled_ids)
    picked = np.abs(x[rows_of(sel.ids), 0])
    assert np.median(picked) < 0.35 < np.median(np.abs(x[:, 0])), picked
    assert all(w.startswith("probe unsure: '") and " vs '" in w for w in sel.table.column("why").to_pylist())
    # diversity: no two picks are (nearly) the same image
    xs = x[rows_of(sel.ids)]
    d = np.linalg.norm(xs[:, None] - xs[None], axis=2) + np.eye(len(xs)) * 9
    assert d.min() > 0.05
    # the CLI: the labels file's line (unknown ids counted) and the summary
    out = tmp_path / "p.parquet"
    r = runner.invoke(app, ["select", store, "--budget", "8", "--labels", str(labels), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "24 of 27 used; 3 ids not in the store ignored" in r.output
    assert "uncertain: 8 of 776 unlabelled images picked" in r.output
    assert pq.read_table(out).column("id").to_pylist() == sel.ids


def test_auto_stays_cold_while_labels_are_few_and_explicit_strategies(tmp_path: Path) -> None:
    store, x, labels, labelled_ids = boundary_store(tmp_path, 1)
    sel = active.select(store, 5, labels=labels)
    assert sel.strategy == "typical" and "1 of 'neg'" in sel.reason and "under 2 a class" in sel.reason
    assert not set(sel.ids) & set(labelled_ids)
    # one label a class: no C can be chosen, the probe is fitted at a fixed one
    unc = active.select(store, 5, strategy="uncertain", labels=labels)
    assert unc.strategy == "uncertain" and unc.reason.startswith("asked for")
    assert np.median(np.abs(x[rows_of(unc.ids), 0])) < np.median(np.abs(x[:, 0]))
    div = active.select(store, 6, strategy="diverse", labels=labels)
    assert not set(div.ids) & set(labelled_ids)
    # k-center greedy: picks spread out more than random ones
    xs = x / np.linalg.norm(x, axis=1, keepdims=True)

    def spread(rows: np.ndarray) -> float:
        p = xs[rows]
        s = p @ p.T - np.eye(len(p)) * 9
        return float(1 - s.max())

    rng = np.random.default_rng(0)
    assert spread(rows_of(div.ids)) > np.mean([spread(rng.choice(len(x), 6, replace=False)) for _ in range(50)])


def test_one_line_errors(planted: tuple[str, np.ndarray], tmp_path: Path) -> None:
    store, _ = planted
    out = str(tmp_path / "p.parquet")
    cases = [
        (["--budget", "0", "--out", out], "'--budget'"),
        (["--budget", "5000", "--out", out], "more than the 1,670 unlabelled images"),
        (["--budget", "3"], "--out FILE is needed"),
        (["--budget", "3", "--out", out, "--strategy", "uncertain"], "needs labels of at least 2 classes"),
        (["--budget", "3", "--out", out, "--strategy", "best"], "'best' is not one of"),
        (["--budget", "3", "--out", out, "--label-column", "klass"], "has no column 'klass'"),
        (["--budget", "3", "--out", str(tmp_path)], "is a folder"),
        (["--budget", "3", "--evaluate", "--out", out], "writes no selection"),
        (["--budget", "3", "--evaluate"], "--evaluate needs labels"),
    ]
    for args, expected in cases:
        r = runner.invoke(app, ["select", store, *args])
        assert r.exit_code == 2, (args, r.output)
        assert expected in one_line(r.output), (args, r.output)
    # labels none of whose ids are in the store; an empty store
    bad = tmp_path / "l.csv"
    bad.write_text("id,label\n/a/b.jpg,cat\n")
    r = runner.invoke(app, ["select", store, "--budget", "3", "--out", out, "--labels", str(bad)])
    assert r.exit_code == 2 and "none of the 1 ids" in one_line(r.output)
    empty = write_store(tmp_path / "empty", np.zeros((0, 4), np.float32))
    r = runner.invoke(app, ["select", empty, "--budget", "3", "--out", out])
    assert r.exit_code == 2 and "holds no vectors" in one_line(r.output)
    # every image labelled: nothing left
    x, y = mixture([10, 10], dim=4)
    full = write_store(tmp_path / "full", x, [f"c{v}" for v in y])
    r = runner.invoke(app, ["select", full, "--budget", "3", "--out", out])
    assert r.exit_code == 2 and "every image of" in one_line(r.output) and "--ignore-store-labels" in r.output
    assert not Path(out).exists()
    # folders that are not classes: their labels set aside
    r = runner.invoke(app, ["select", full, "--budget", "3", "--out", out, "--ignore-store-labels"])
    assert r.exit_code == 0 and pq.read_table(out).num_rows == 3, r.output


def test_bounded_sample_and_hostile_vectors(tmp_path: Path) -> None:
    x, y = mixture([900, 700, 500], dim=8)
    x[5] = np.nan
    x[6] = np.inf
    store = write_store(tmp_path / "s", x, shard=256)
    opts = active.ActiveOptions(sample_bytes=1, max_sample_rows=1000)  # the floor: 1,000 rows
    sel = active.select(store, 6, options=opts)
    assert sel.sampled == 1000 and sel.unlabelled == 2098 and sel.skipped == 2
    assert "uniform sample of 1,000" in sel.summary() and "about" in sel.table.column("why")[0].as_py()
    assert not {"v00005", "v00006"} & set(sel.ids)
    assert len(set(y[rows_of(sel.ids)].tolist())) == 3
    div = active.select(store, 4, strategy="diverse", options=opts)
    assert not {"v00005", "v00006"} & set(div.ids)
    # the warm start's margins cover every unlabelled row, not the sample
    f = tmp_path / "l.csv"
    f.write_text("id,label\nv00000,a\nv00001,a\nv00002,b\nv00003,b\n")
    unc = active.select(store, 3, strategy="uncertain", labels=f, options=opts)
    assert unc.sampled == unc.unlabelled == 2094 and "uniform sample" not in unc.summary()
    assert not {"v00005", "v00006", "v00000", "v00003"} & set(unc.ids)


def test_evaluate_learning_curve_selected_against_random(tmp_path: Path) -> None:
    x, y = mixture([120, 100, 80, 60, 40, 30], dim=16, spread=0.9, seed=2)
    store = write_store(tmp_path / "lab", x, [f"c{v}" for v in y])
    ev = active.evaluate(store, 30, seed=0)
    assert [p.per_class for p in ev.points] == [1, 2, 5] and [p.budget for p in ev.points] == [6, 12, 30]
    assert ev.strategy == "typical" and ev.labelled == 430 and ev.draws == 5
    first = ev.points[0]
    assert first.classes_hit >= first.random_classes_hit
    assert first.selected >= first.random_mean and 0 < first.random_mean < 1 and first.random_sd >= 0
    assert 0 < first.knn_selected <= 1
    r = runner.invoke(app, ["select", store, "--budget", "6", "--evaluate"])
    assert r.exit_code == 0, r.output
    assert "picks by typical with the labels hidden" in r.output and "random (mean ± sd)" in r.output
    png = tmp_path / "c.png"
    r = runner.invoke(app, ["select", store, "--budget", "6", "--evaluate", "--json", "--plot", str(png)])
    data = json.loads(r.output)
    assert data["points"][0]["budget"] == 6 and set(data["points"][0]) >= {"selected", "random_mean", "knn_selected"}
    assert png.stat().st_size > 1000


def test_a_store_of_real_images_with_no_labels(tmp_path: Path) -> None:
    """The user's case: images in one folder (empty label column), the tiny backbone, select by CLI."""
    make_images(tmp_path / "flat", {"": 14})
    store = tmp_path / "pool.store"
    r = runner.invoke(app, ["extract", str(tmp_path / "flat"), "--out", str(store), "--backbone", "tiny_test"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "picks.parquet"
    r = runner.invoke(app, ["select", str(store), "--budget", "4", "--out", str(out)])
    assert r.exit_code == 0, r.output
    picks = pq.read_table(out)
    ids = set(Store.open(str(store)).read(["id"]).column("id").to_pylist())
    assert picks.num_rows == 4 and set(picks.column("id").to_pylist()) <= ids
    assert all(Path(p).exists() for p in picks.column("path").to_pylist())


def test_nothing_left_to_pick_says_why(tmp_path: Path) -> None:
    """A store without labels that a file labels whole: no --ignore-store-labels hint (it cannot help);
    a store whose unlabelled vectors are all NaN: said so, not 'every image is labelled (0)'."""
    x, _ = mixture([6, 6], dim=4)
    store = write_store(tmp_path / "s", x)
    f = tmp_path / "all.csv"
    f.write_text("id,label\n" + "".join(f"v{i:05d},c{i % 2}\n" for i in range(12)))
    out = str(tmp_path / "p.parquet")
    r = runner.invoke(app, ["select", store, "--budget", "3", "--out", out, "--labels", str(f)])
    line = one_line(r.output)
    assert r.exit_code == 2 and "every image of" in line and f"(12 by {f})" in line, r.output
    assert "--ignore-store-labels" not in line
    nan = write_store(tmp_path / "nan", np.full((5, 4), np.nan, np.float32))
    r = runner.invoke(app, ["select", nan, "--budget", "3", "--out", out])
    line = one_line(r.output)
    assert r.exit_code == 2 and "no unlabelled image" in line and "5 with a NaN" in line, r.output
    assert not Path(out).exists()

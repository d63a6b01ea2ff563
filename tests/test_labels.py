"""Labels as data (issue 37): a file of id,label rows put over a store's labels by id in probe,
inspect, compare and finetune; what it did said in one line and recorded; hostile files refused in
one line; probe's accuracy against the number of labels."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import embedder
from embedder.cli import app
from embedder.io.uri import image_id
from embedder.store.labels import LabelJoin, LabelsError, read_labels
from tests.conftest import make_images
from tests.test_index import vector_store

runner = CliRunner()


def write_csv(path: Path, rows: list[tuple[str, str]], header: str = "id,label") -> Path:
    path.write_text(header + "\n" + "".join(f"{i},{lab}\n" for i, lab in rows))
    return path


def clusters(n_per: int, classes: int = 4, dim: int = 16, seed: int = 0, spread: float = 1.0
             ) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(0, 1, (classes, dim)) * 2.5
    y = np.repeat(np.arange(classes), n_per)
    return (centres[y] + rng.normal(0, spread, (len(y), dim))).astype(np.float32), y


def ids(n: int, start: int = 0) -> list[str]:
    return [f"v{start + i:06d}" for i in range(n)]  # what tests.test_index.vector_store writes


# ---- the file -----------------------------------------------------------------------------------

def test_careless_files_are_read_as_meant(tmp_path: Path) -> None:
    # numeric ids keep their zeros, labels are names, spaces and empty labels are not labels
    f = tmp_path / "l.csv"
    f.write_text("ID , Label\n001, cat\n002,dog \n003,\n004,cat\n004,cat\n 005 ,  \n")
    lf = read_labels(f)
    assert dict(zip(lf.ids.to_pylist(), lf.labels.to_pylist())) == {"001": "cat", "002": "dog", "004": "cat"}
    assert (lf.blank, lf.repeated, lf.classes) == (2, 1, ["cat", "dog"])
    assert len(lf.sha256) == 64 and lf.size == f.stat().st_size
    # semicolons (a spreadsheet's export), tabs, and 'class' for 'label'
    (tmp_path / "s.csv").write_text("id;class\n7;a\n8;b\n")
    assert read_labels(tmp_path / "s.csv").ids.to_pylist() == ["7", "8"]
    # Parquet with integer ids: the ids as text; only the two columns are read
    pq.write_table(pa.table({"id": [1, 2], "label": ["a", "b"], "embedding": [[0.0], [1.0]]}), tmp_path / "l.parquet")
    assert read_labels(tmp_path / "l.parquet").ids.to_pylist() == ["1", "2"]


@pytest.mark.parametrize("content,message", [
    ("id,label\na,cat\na,dog\n", "gives id 'a' 2 labels ('cat', 'dog')"),
    ("a.jpg,cat\nb.jpg,dog\n", "needs an 'id' and a 'label' column (the first line must be a header: id,label)"),
    ("path,label\nx,cat\n", "(labels are joined on the store's 'id' column, not on paths or file names)"),
    ("", "cannot read labels file"),
    (bytes(range(256)) * 4, "cannot read labels file"),  # not a table
    (b"\xff\xd8\xff\xe0JFIF\x00\n\x89PNG\x1a\n", "cannot read labels file"),  # a UnicodeDecodeError escaped before
    ("ID , Label\n001, cat\n", "no error"),  # refused before: the names as a spreadsheet writes them
])
def test_hostile_files_are_one_line(tmp_path: Path, content: str | bytes, message: str) -> None:
    f = tmp_path / "bad.csv"
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    if message == "no error":
        assert read_labels(f).ids.to_pylist() == ["001"]
        return
    with pytest.raises(LabelsError) as e:
        read_labels(f)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_folder_a_missing_file_and_a_picture_are_one_line(tmp_path: Path) -> None:
    make_images(tmp_path / "img", {"": 1})
    for path, message in ((tmp_path, "is a folder"), (tmp_path / "none.csv", "does not exist"),
                          (next((tmp_path / "img").iterdir()), "cannot read labels file")):
        r = runner.invoke(app, ["probe", str(tmp_path), "--labels", str(path), "--out", str(tmp_path / "p")])
        assert r.exit_code != 0 and message in r.output and r.output.count("\n") == 1, r.output


def test_a_csv_of_100k_rows_reads_and_joins_in_well_under_a_second_each(tmp_path: Path) -> None:
    n = 100_000
    f = tmp_path / "big.csv"
    pacsv.write_csv(pa.table({"id": [f"{i:08d}" for i in range(n)], "label": [f"c{i % 50}" for i in range(n)]}), f)
    t = time.perf_counter()
    lf = read_labels(f)
    read_s = time.perf_counter() - t
    join = LabelJoin(lf)
    store_ids = pa.array([f"{i:08d}" for i in range(n // 2, n + n // 2)])
    t = time.perf_counter()
    for s in range(0, n, 8192):  # batch by batch, as the streamed paths apply it
        join.apply(store_ids.slice(s, 8192), pa.array(["x"] * len(store_ids.slice(s, 8192))))
    join_s = time.perf_counter() - t
    r = join.result()
    assert (len(lf), r.used, r.unknown, r.overridden) == (n, n // 2, n // 2, n // 2)
    assert read_s < 2.0 and join_s < 2.0, (read_s, join_s)  # measured ~0.15 s and ~0.1 s


# ---- probe ----------------------------------------------------------------------------------------

@pytest.fixture
def pool(tmp_path: Path) -> dict[str, Path]:
    """An unlabelled pool of 4 classes x 20, a labelled test store of 3 of them (class c3 absent),
    and a labels file: 10 of each class, 2 ids from nowhere, one empty label."""
    x, y = clusters(20)
    store = Path(vector_store(tmp_path / "pool", x, [""] * len(y)))
    xt, yt = clusters(10, seed=1)
    keep = yt < 3
    test = Path(vector_store(tmp_path / "test", xt[keep], [f"c{c}" for c in yt[keep]], start=50_000))
    picked = np.concatenate([np.flatnonzero(y == c)[:10] for c in range(4)])
    the_ids = ids(len(y))
    rows = [(the_ids[i], f"c{y[i]}") for i in picked] + [("nowhere1", "c0"), ("nowhere2", "c1"), (the_ids[79], "")]
    return {"store": store, "test": test, "labels": write_csv(tmp_path / "labels.csv", rows)}


def test_probe_learns_the_files_labels_and_says_what_they_bought(pool: dict[str, Path], tmp_path: Path) -> None:
    from embedder.learn.probe import load_probe

    out = tmp_path / "p.safetensors"
    r = runner.invoke(app, ["probe", str(pool["store"]), "--labels", str(pool["labels"]), "--test",
                            str(pool["test"]), "--out", str(out), "--no-zero-shot"], terminal_width=200)
    assert r.exit_code == 0, r.output
    # the one line, then the table
    assert f"labels from {pool['labels']}: 40 of 42 used; 2 ids not in the store ignored (e.g. 'nowhere" in r.output
    assert "1 row without a label skipped" in r.output and "labels → accuracy: scored on the --test store" in r.output
    # recorded in the probe file: which labels made it, and what they bought
    _, meta = load_probe(out)
    lab = meta["labels"]
    assert (lab["given"], lab["used"], lab["unknown"], lab["blank"]) == (42, 40, 2, 1)
    assert sorted(lab["unknown_examples"]) == ["nowhere1", "nowhere2"] and len(lab["sha256"]) == 64
    assert meta["n_train"] == 40 and meta["classes"] == ["c0", "c1", "c2", "c3"]
    curve = meta["curve"]
    assert curve["scored_on"] == "test" and curve["n_eval"] == 30  # the test store has no c3: nothing to leave out
    points = curve["points"]
    assert [p["per_class"] for p in points] == [1, 2, 5, "all"] and [p["labels"] for p in points] == [4, 8, 20, 40]
    assert [p["draws"] for p in points] == [5, 5, 5, 1] and points[0]["sd"] is not None
    # the last point is the probe reported above (trained once), and labels buy accuracy
    assert points[-1]["accuracy"] == pytest.approx(meta["metrics"]["test"]["accuracy"], abs=1e-4)
    assert points[-1]["accuracy"] >= points[0]["accuracy"] and points[-1]["accuracy"] > 0.9
    # --json: the same record
    r = runner.invoke(app, ["probe", str(pool["store"]), "--labels", str(pool["labels"]), "--out", str(out),
                            "--no-zero-shot", "--no-curve", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["labels"] == lab and "curve" not in data


def test_one_label_a_class_trains_a_probe_at_the_default_c(pool: dict[str, Path], tmp_path: Path) -> None:
    """select's first round aims at one typical image a class: probe --labels on it trains (C=1, said
    so, no validation accuracy) instead of 'too few images per class to choose the probe's C'."""
    from embedder.learn.probe import load_probe

    x, y = clusters(20)
    the_ids = ids(len(y))
    one = write_csv(tmp_path / "one.csv", [(the_ids[int(np.flatnonzero(y == c)[0])], f"c{c}") for c in range(4)])
    out = tmp_path / "p.safetensors"
    r = runner.invoke(app, ["probe", str(pool["store"]), "--labels", str(one), "--test", str(pool["test"]),
                            "--out", str(out), "--no-zero-shot", "--no-curve", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["C"] == 1.0 and data["val_accuracy"] is None and data["n_train"] == 4
    assert "not chosen: one labelled image a class" in data["selection"]
    assert data["test_accuracy"] > 0.9  # well separated clusters: one image each is enough
    _, meta = load_probe(out)
    assert meta["C"] == 1.0 and meta["val_accuracy"] is None


def test_a_file_none_of_whose_ids_is_in_the_store_is_one_line(pool: dict[str, Path], tmp_path: Path) -> None:
    f = write_csv(tmp_path / "paths.csv", [("/photos/a.jpg", "cat"), ("/photos/b.jpg", "dog")])
    for cmd in (["probe", str(pool["store"]), "--out", str(tmp_path / "p")],
                ["inspect", str(pool["store"]), "--out", str(tmp_path / "r")],
                ["inspect", str(pool["store"]), "--out", str(tmp_path / "r2"), "--graph", "buckets"]):
        r = runner.invoke(app, [*cmd, "--labels", str(f)])
        assert r.exit_code == 2 and "none of the 2 ids in" in r.output and "'/photos/a.jpg'" in r.output, r.output
        assert r.output.strip().count("\n") == 0  # (the bucketed path: after its progress bar)


def test_the_file_overrides_the_stores_labels_and_the_curve_scores_on_the_rest(tmp_path: Path) -> None:
    x, y = clusters(25, classes=3)
    store = vector_store(tmp_path / "s", x, [f"c{c}" for c in y])
    the_ids = ids(len(y))
    # 5 per class re-stated (no change), 2 changed to a new class name, 1 set to the class it already has
    rows = [(the_ids[i], f"c{y[i]}") for c in range(3) for i in np.flatnonzero(y == c)[:5]]
    rows += [(the_ids[70], "renamed"), (the_ids[71], "renamed")]
    f = write_csv(tmp_path / "l.csv", rows)
    probe = embedder.train_probe(store, labels=f)
    m = probe.metrics
    assert (m["labels"]["used"], m["labels"]["overridden"]) == (17, 2)
    assert probe.classes == ["c0", "c1", "c2", "renamed"] and probe.result.n_train == 75
    curve = m["curve"]
    # scored on the store's own labels the file does not touch (58 rows), of the file's classes
    assert curve["scored_on"] == "store" and curve["n_eval"] == 58 and curve["classes"] == 4
    assert [p["per_class"] for p in curve["points"]] == [1, 2, "all"]  # "all": 5 of each class
    # streamed from the store (a tiny memory budget): the same curve
    again = embedder.train_probe(store, labels=f, memory_budget=4096)
    assert again.metrics["curve"]["points"][:2] == [
        {**p, "seconds": q["seconds"]} for p, q in zip(curve["points"][:2], again.metrics["curve"]["points"][:2])]


# ---- inspect ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("graph", ["memory", "buckets"])
def test_inspect_analyses_the_files_labels(tmp_path: Path, graph: str) -> None:
    """A labelled store and a file that relabels one image wrongly: that image is the label error
    found, on the in-memory and on the bucketed (streamed) path alike."""
    x, y = clusters(30, classes=3, spread=0.6)
    store = vector_store(tmp_path / "s", x, [f"c{c}" for c in y])
    the_ids = ids(len(y))
    f = write_csv(tmp_path / "l.csv", [(the_ids[5], "c2"), ("elsewhere", "c1")])
    summary = embedder.inspect(store, tmp_path / "r", labels=f, graph=graph, thumbnails="none")
    assert summary["classes"] == {"c0": 29, "c1": 30, "c2": 31}
    assert (summary["labels"]["used"], summary["labels"]["unknown"], summary["labels"]["overridden"]) == (1, 1, 1)
    found = pq.read_table(tmp_path / "r" / "findings.parquet").to_pylist()
    errors = [f for f in found if f["kind"] == "label_error" and f["detail"] == "likely"]
    assert [(e["ids"], e["given"], e["suggested"]) for e in errors] == [([the_ids[5]], "c2", "c0")]
    page = (tmp_path / "r" / "index.html").read_text()
    assert f"labels from {f}: 1 of 2 used" in page and "&quot;sha256&quot;" in page  # the line, the summary's JSON
    r = runner.invoke(app, ["inspect", store, "--out", str(tmp_path / "r3"), "--labels", str(f),
                            "--graph", graph, "--thumbnails", "none"], terminal_width=200)
    assert r.exit_code == 0 and f"labels from {f}: 1 of 2 used; 1 id not in the store ignored" in r.output


# ---- compare and finetune: the ids extraction gives the images -------------------------------------

def test_compare_and_finetune_take_labels_for_unsorted_images(tmp_path: Path) -> None:
    """Images in one flat folder (no class folders) and a file naming their classes by id."""
    imgs = make_images(tmp_path / "src", {"a": 8, "b": 8})
    flat = tmp_path / "flat"
    flat.mkdir()
    rows = []
    for p in imgs:
        target = flat / p.name
        p.rename(target)
        rows.append((image_id(target), p.parent.name))
    f = write_csv(tmp_path / "l.csv", rows + [("ffff", "a")])
    r = runner.invoke(app, ["compare", str(flat), "--backbones", "tiny_test", "--work", str(tmp_path / "w"),
                            "--labels", str(f), "--json"])
    assert r.exit_code == 0, r.output
    board = json.loads(r.output)
    assert board["n_train"] + board["n_test"] == 16 and board["labels"]["used"] == 16
    assert board["labels"]["unknown_examples"] == ["ffff"]
    r = runner.invoke(app, ["compare", str(flat), "--backbones", "tiny_test", "--work", str(tmp_path / "w2"),
                            "--labels", str(write_csv(tmp_path / "names.csv", [("a_0000.jpg", "a")]))])
    assert r.exit_code == 2 and "none of the 1 ids" in r.output and not (tmp_path / "w2").exists()  # before any work
    from embedder.models import checkpoint

    res = embedder.finetune(flat, tmp_path / "ck.safetensors", labels=f, backbone="tiny_test", batch_size=8,
                            workers=0, epochs=1)
    assert res["classes"] == ["a", "b"] and res["n_train"] + res["n_val"] == 16 and res["labels"]["used"] == 16
    meta = checkpoint.read_meta(tmp_path / "ck.safetensors")
    assert meta is not None and meta["labels"]["sha256"] == res["labels"]["sha256"]
    # without the file: no labels, one line naming --labels
    r = runner.invoke(app, ["finetune", str(flat), "--out", str(tmp_path / "c2.safetensors"),
                            "--backbone", "tiny_test"])
    assert r.exit_code != 0 and "--labels FILE" in r.output


def test_the_c_sweep_on_a_few_hundred_labels_runs_on_one_thread() -> None:
    """A sweep of few labels is many small tensor operations: on busy cores torch's threads cost far
    more than they share (sklearn digits, 300 images, --standardize auto: 38-94 s on 2 threads, 1.7 s
    on one, measured with 4 agents on 2 cores)."""
    import torch
    from sklearn.datasets import load_digits

    from embedder.learn import logreg
    from embedder.learn import probe as pr
    from embedder.learn.options import ProbeOptions

    d = load_digits()
    p = np.random.default_rng(0).permutation(len(d.target))[:300]
    x, y = d.data[p].astype(np.float32), d.target[p]
    before = torch.get_num_threads()
    with logreg.threads_for(300 * 64 * 10 * 120):  # its work per pass: rows x dim x classes x 12 C x 2 x 5 folds
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    t = time.perf_counter()
    r = pr.train_probe(pr.Dataset(x, y, [str(c) for c in range(10)], [], [], {}), ProbeOptions())
    assert time.perf_counter() - t < 20 and r.val_accuracy is not None and r.val_accuracy > 0.9


def test_labels_given_twice_are_rounds_a_later_file_winning(tmp_path: Path) -> None:
    """`--labels` repeated (rounds of labelling) used to keep only the last file: round 1's labelled
    images were picked again. Now both, a later file's label winning for an id both name."""
    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from embedder.cli import app
    from embedder.store.labels import read_labels
    from embedder.store.shards import Store
    from tests.test_select import mixture, write_store

    (tmp_path / "r1.csv").write_text("id,label\na,cat\nb,dog\n")
    (tmp_path / "r2.csv").write_text("id,label\nb,cow\nc,cat\n")
    f = read_labels([tmp_path / "r1.csv", tmp_path / "r2.csv"])
    assert dict(zip(f.ids.to_pylist(), f.labels.to_pylist())) == {"a": "cat", "b": "cow", "c": "cat"}
    x, _ = mixture([12, 12], dim=4)
    store = write_store(tmp_path / "s", x, [None] * len(x))
    ids = Store.open(store).read(["id"]).column("id").to_pylist()
    (tmp_path / "a.csv").write_text("id,label\n" + "".join(f"{i},c0\n" for i in ids[:3]))
    (tmp_path / "b.csv").write_text("id,label\n" + "".join(f"{i},c1\n" for i in ids[12:15]))
    out = tmp_path / "o.parquet"
    r = CliRunner().invoke(app, ["select", store, "--budget", "6", "--out", str(out), "--labels",
                                 str(tmp_path / "a.csv"), "--labels", str(tmp_path / "b.csv")])
    assert r.exit_code == 0 and "6 of 6 used" in r.output, r.output
    picked = set(pq.read_table(out).column("id").to_pylist())
    assert len(picked) == 6 and not picked & (set(ids[:3]) | set(ids[12:15]))

"""`embedder import`: vectors made elsewhere (Parquet with a list or fixed-size-list column,
clip-retrieval's img_emb/ + metadata/) become a store that index, search, probe and inspect take."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from typer.testing import CliRunner

from embedder.cli import app
from embedder.store.importer import ImportOptions, import_vectors
from embedder.store.shards import Store
from tests import test_families

runner = CliRunner()
tiny_clip = test_families.tiny_clip  # the fixture: a one-block OpenCLIP model and its weights file
TINY_CLIP = test_families.TINY_CLIP
DIM = 16


def _vectors(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def _table(v: np.ndarray, ids: list[str], kind: str = "fixed", labels: list[str] | None = None) -> pa.Table:
    if kind == "fixed":
        emb: pa.Array = pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), v.shape[1])
    else:
        emb = pa.array([list(map(float, r)) for r in v], pa.list_(pa.float64()))
    cols = {"id": pa.array(ids), "embedding": emb}
    if labels is not None:
        cols["label"] = pa.array(labels)
    return pa.table(cols)


def _write(path: Path, v: np.ndarray, ids: list[str] | None = None, kind: str = "fixed",
           labels: list[str] | None = None, row_group_size: int | None = None) -> Path:
    ids = ids if ids is not None else [f"id{i}" for i in range(len(v))]
    labels = labels if labels is not None else [f"c{i % 3}" for i in range(len(v))]
    pq.write_table(_table(v, ids, kind, labels), path, row_group_size=row_group_size)
    return path


def _cli(*args: str, code: int = 0) -> str:
    r = runner.invoke(app, list(args))
    assert r.exit_code == code, (r.exit_code, r.output, r.exception)
    return r.output


def _stored(store: Path) -> tuple[list[str], np.ndarray, pa.Table]:
    s = Store.open(store)
    t = s.read(["id", "label", "path", "caption"])
    return t.column("id").to_pylist(), s.vectors(), t


def test_fixed_size_and_list_columns_give_the_same_store(tmp_path: Path) -> None:
    v = _vectors(3000)
    fixed = _write(tmp_path / "fixed.parquet", v, row_group_size=1000)
    listed = _write(tmp_path / "list.parquet", v, kind="list")
    out = json.loads(_cli("import", str(fixed), "--out", str(tmp_path / "a"), "--vector-column", "embedding",
                          "--id-column", "id", "--label-column", "label", "--json"))
    assert out["imported"] == 3000 and out["failed"] == 0 and out["dim"] == DIM
    import embedder

    s = embedder.import_vectors(listed, tmp_path / "b", batch_rows=700, shard_rows=1000)  # the Python API
    assert s.imported == 3000
    for store in ("a", "b"):
        ids, vec, t = _stored(tmp_path / store)
        assert ids == [f"id{i}" for i in range(3000)]
        np.testing.assert_array_equal(vec, v)  # float64 lists cast to float32: the same numbers
        assert t.column("label").to_pylist()[:4] == ["c0", "c1", "c2", "c0"]
    prov = Store.open(tmp_path / "a").provenance
    assert prov.backbone == "external" and prov.weights.kind == "external" and prov.text is None
    assert prov.dim == DIM and prov.normalize == "none" and prov.dtype == "float32"
    runs = Store.open(tmp_path / "a").manifest()["runs"]
    assert runs[-1]["engine"] == "import" and runs[-1]["imported_from"] == [str(fixed)]
    assert runs[-1]["finished"] == [str(fixed)]
    assert len(list((tmp_path / "b").glob("_ids/*.npy"))) == 3  # each shard has its id index


def test_clip_retrieval_layout(tmp_path: Path) -> None:
    v = _vectors(500)
    (tmp_path / "out" / "img_emb").mkdir(parents=True)
    (tmp_path / "out" / "metadata").mkdir()
    np.save(tmp_path / "out" / "img_emb" / "img_emb_0.npy", v[:300].astype(np.float16))
    np.save(tmp_path / "out" / "img_emb" / "img_emb_1.npy", v[300:].astype(np.float16))
    for n, part in ((0, range(0, 300)), (1, range(300, 500))):
        meta = {"url": [f"http://x/{i}.jpg" for i in part], "caption": [f"a photo {i}" for i in part],
                "key": [f"{i:09d}" for i in part]}
        pq.write_table(pa.table(meta), tmp_path / "out" / "metadata" / f"metadata_{n}.parquet")
    _cli("import", str(tmp_path / "out"), "--out", str(tmp_path / "st"))
    ids, vec, t = _stored(tmp_path / "st")
    assert ids == [f"{i:09d}" for i in range(500)]
    np.testing.assert_array_equal(vec, v.astype(np.float16).astype(np.float32))
    assert t.column("path").to_pylist()[301] == "http://x/301.jpg"
    assert t.column("caption").to_pylist()[0] == "a photo 0"
    # the two files side by side; the .npy given itself
    side = tmp_path / "side"
    side.mkdir()
    np.save(side / "img_emb_0.npy", v[:10])
    pq.write_table(pa.table({"image_path": [f"/im/{i}.png" for i in range(10)]}), side / "metadata_0.parquet")
    _cli("import", str(side / "img_emb_0.npy"), "--out", str(tmp_path / "st2"))
    ids, vec, t = _stored(tmp_path / "st2")
    assert len(set(ids)) == 10 and t.column("path").to_pylist()[3] == "/im/3.png"
    np.testing.assert_array_equal(vec, v[:10])
    # rows that do not line up
    pq.write_table(pa.table({"image_path": ["/im/0.png"]}), side / "metadata_0.parquet")
    assert "must line up" in _cli("import", str(side), "--out", str(tmp_path / "st3"), code=2)


def test_duplicate_ids_within_and_across_files_and_the_store(tmp_path: Path) -> None:
    v = _vectors(2000)
    a = _write(tmp_path / "a.parquet", v[:1000], [f"k{i}" for i in range(999)] + ["k5"])  # k5 twice in a
    b = _write(tmp_path / "b.parquet", v[1000:], [f"k{i}" for i in range(900, 1900)])  # k900…k998 again
    s = import_vectors([str(a), str(b)], str(tmp_path / "st"), ImportOptions(batch_rows=256, shard_rows=512))
    assert (s.imported, s.duplicates, s.rows) == (1900, 100, 2000)
    ids, vec, _ = _stored(tmp_path / "st")
    assert len(ids) == len(set(ids)) == 1900
    np.testing.assert_array_equal(vec[ids.index("k900")], v[900])  # the first one wins
    np.testing.assert_array_equal(vec[ids.index("k5")], v[5])
    errors = Store.open(tmp_path / "st").errors().to_pylist()
    assert len(errors) == 100 and {e["id"] for e in errors} == {"k5", *(f"k{i}" for i in range(900, 999))}
    assert all("duplicate id" in e["reason"] for e in errors)
    # a later import of a new file whose ids the store holds
    c = _write(tmp_path / "c.parquet", v[:3], ["k1", "new", "k1500"])
    out = _cli("import", str(c), "--out", str(tmp_path / "st"), code=3)
    assert "1 imported, 2 failed (duplicate id 2" in out
    assert Store.open(tmp_path / "st").count() == 1901


def test_nan_and_null_rows_are_recorded_failures(tmp_path: Path) -> None:
    v = _vectors(100)
    v[7, 3] = np.nan
    v[40, 0] = np.inf
    t = _table(v, [f"i{i}" for i in range(100)])
    emb = t.column("embedding").combine_chunks()
    mask = np.zeros(100, bool)
    mask[50] = True
    emb = pa.FixedSizeListArray.from_arrays(emb.values, DIM, mask=pa.array(mask))
    t = t.set_column(1, "embedding", emb)
    pq.write_table(t, tmp_path / "v.parquet")
    out = json.loads(_cli("import", str(tmp_path / "v.parquet"), "--out", str(tmp_path / "st"), "--json", code=3))
    assert (out["imported"], out["non_finite"], out["no_vector"]) == (97, 2, 1)
    ids, vec, _ = _stored(tmp_path / "st")
    assert "i7" not in ids and "i50" not in ids and np.isfinite(vec).all()
    reasons = {e["id"]: e["reason"] for e in Store.open(tmp_path / "st").errors().to_pylist()}
    assert reasons == {"i7": "vector holds NaN or inf", "i40": "vector holds NaN or inf", "i50": "no vector (null)"}


def test_one_line_errors(tmp_path: Path) -> None:
    v = _vectors(20)
    good = _write(tmp_path / "good.parquet", v)
    out = _cli("import", str(good), "--out", str(tmp_path / "s1"), "--vector-column", "vec", code=2)
    assert "no vector column 'vec'; columns: id, embedding, label" in out
    out = _cli("import", str(good), "--out", str(tmp_path / "s1"), "--id-column", "key", code=2)
    assert "no id column 'key'" in out
    rows = [list(map(float, r)) for r in v]
    rows[13] = rows[13][:-1]
    pq.write_table(pa.table({"embedding": rows}), tmp_path / "ragged.parquet")
    out = _cli("import", str(tmp_path / "ragged.parquet"), "--out", str(tmp_path / "s2"), code=2)
    assert "ragged: row 13 has 15 values" in out
    pq.write_table(pa.table({"embedding": [["a", "b"]] * 3}), tmp_path / "text.parquet")
    out = _cli("import", str(tmp_path / "text.parquet"), "--out", str(tmp_path / "s3"), code=2)
    assert "holds lists of string, not of numbers" in out
    pq.write_table(pa.table({"embedding": ["a", "b"]}), tmp_path / "str.parquet")
    assert "not vectors" in _cli("import", str(tmp_path / "str.parquet"), "--out", str(tmp_path / "s3"), code=2)
    assert "does not exist" in _cli("import", str(tmp_path / "nope.parquet"), "--out", str(tmp_path / "s3"), code=2)
    other = _write(tmp_path / "other.parquet", _vectors(5)[:, :8])
    out = _cli("import", str(good), str(other), "--out", str(tmp_path / "s4"), code=2)
    assert "differ in length" in out and "has 16" in out and "has 8" in out
    assert not (tmp_path / "s4").exists()  # refused before anything is written
    _cli("import", str(good), "--out", str(tmp_path / "s5"))
    out = _cli("import", str(other), "--out", str(tmp_path / "s5"), code=2)
    assert "dim=16" in out and "dim=8" in out
    assert "--model" in _cli("import", "--help")


KILLED = """
import sys, time
from embedder.store import shards
orig = shards.Store.write_shard
def slow(self, *a):
    time.sleep(0.15)  # a kill lands here: the unit is announced, its failures written, its shard not
    return orig(self, *a)
shards.Store.write_shard = slow
from embedder.store.importer import ImportOptions, import_vectors
import_vectors(sys.argv[1:3], sys.argv[3], ImportOptions(batch_rows=100, shard_rows=100))
"""


def test_resume_after_sigkill_writes_each_row_once(tmp_path: Path) -> None:
    v = _vectors(3000)
    v[::50, 0] = np.nan  # failures in every unit: the errors table must not repeat them
    a = _write(tmp_path / "a.parquet", v[:1500], [f"a{i}" for i in range(1500)], row_group_size=400)
    b = _write(tmp_path / "b.parquet", v[1500:], [f"b{i}" for i in range(1500)])
    store = tmp_path / "st"
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(a), str(b), str(store)])
    deadline = time.time() + 60
    while time.time() < deadline and len(list(store.glob("part-*.parquet"))) < 4:
        time.sleep(0.02)
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = Store.open(store).count()
    assert 0 < partial < 2940, partial
    s = import_vectors([str(a), str(b)], str(store), ImportOptions(batch_rows=100, shard_rows=100))
    assert s.duplicates == 0, s.failures[:3]
    ids, vec, _ = _stored(store)
    want = [f"a{i}" for i in range(1500) if i % 50] + [f"b{i}" for i in range(1500) if (i + 1500) % 50]
    assert sorted(ids) == sorted(want)
    errors = Store.open(store).errors().column("id").to_pylist()
    assert sorted(errors) == sorted({f"a{i}" for i in range(0, 1500, 50)} | {f"b{i}" for i in range(0, 1500, 50)})
    # done: the same command again reads nothing
    again = import_vectors([str(a), str(b)], str(store))
    assert again.rows == 0 and again.sources_done_before == 2


def test_an_imported_store_is_probed_indexed_searched_and_inspected(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((3, DIM)).astype(np.float32) * 3
    lab = rng.integers(0, 3, 600)
    v = centres[lab] + rng.standard_normal((600, DIM)).astype(np.float32)
    v[1] = v[0] + 1e-4  # a planted near-duplicate
    labels = [f"c{x}" for x in lab]
    _write(tmp_path / "v.parquet", v, [f"r{i}" for i in range(600)], labels=labels)
    store, home = str(tmp_path / "st"), str(tmp_path / "home")
    _cli("import", str(tmp_path / "v.parquet"), "--out", store, "--id-column", "id", "--label-column", "label")
    probe = json.loads(_cli("probe", store, "--out", str(tmp_path / "p.probe"), "--json"))
    assert probe["val_accuracy"] > 0.9, probe
    _cli("index", "build", store, "--name", "imp", "--home", home)
    hits = _cli("search", "imp", "--home", home, "--id", "r0", "-k", "2")
    assert "r1" in hits
    np.save(tmp_path / "q.npy", v[5])
    assert "r5" in _cli("search", "imp", "--home", home, str(tmp_path / "q.npy"), "-k", "1")
    # what needs an image, or a text tower, is refused as one line
    assert "no text tower" in _cli("search", "imp", "--home", home, "--text", "a cat", code=2)
    from PIL import Image
    Image.new("RGB", (32, 32)).save(tmp_path / "x.jpg")
    assert "imported" in _cli("search", "imp", "--home", home, str(tmp_path / "x.jpg"), code=2)
    _cli("inspect", store, "--out", str(tmp_path / "rep"), "--thumbnails", "none", "--json")
    found = pq.read_table(tmp_path / "rep" / "findings.parquet").to_pylist()
    assert any(f["kind"].startswith("duplicate") and {"r0", "r1"} <= set(f["ids"]) for f in found), found[:5]


def test_an_openclip_model_named_records_its_text_tower(tiny_clip: Path, tmp_path: Path) -> None:
    """Vectors an OpenCLIP model made elsewhere: naming it (with its weights) records its text tower,
    so text search works on them; a model of another dimension is refused as one line."""
    from embedder.embed.batch import BatchEmbedder
    from embedder.embed.options import EmbedOptions
    from embedder.models.builder import spec_for

    name = f"open_clip:{TINY_CLIP}"
    emb = BatchEmbedder(spec_for(name, tiny_clip), EmbedOptions(device="cpu"))
    texts = ["a red square", "a blue circle", "a green line"]
    v = emb.embed_texts(texts)  # vectors in the model's space (its text tower's: a stand-in for images)
    _write(tmp_path / "v.parquet", v, ["red", "blue", "green"], labels=["a", "b", "c"])
    store, home = str(tmp_path / "st"), str(tmp_path / "home")
    _cli("import", str(tmp_path / "v.parquet"), "--out", store, "--model", name, "--weights", str(tiny_clip))
    prov = Store.open(store).provenance
    assert prov.has_text and prov.backbone == name
    _cli("index", "build", store, "--name", "clip", "--home", home, "--weights", str(tiny_clip))
    out = _cli("search", "clip", "--home", home, "--text", "a blue circle", "-k", "1", "--weights", str(tiny_clip))
    assert "blue" in out
    _write(tmp_path / "w.parquet", _vectors(4))
    out = _cli("import", str(tmp_path / "w.parquet"), "--out", str(tmp_path / "s2"), "--model", name,
               "--weights", str(tiny_clip), code=2)
    assert "makes 32-d vectors; these are 16-d" in out

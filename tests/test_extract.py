from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from embedder.embed.batch import BatchEmbedder
from embedder.embed.fill import extract
from embedder.embed.options import EmbedOptions, RunOptions
from embedder.errors import ProvenanceMismatch, StoreError, UnknownLayer
from embedder.models.builder import ModelSpec
from embedder.store.shards import Store, arrow_to_embeddings
from tests.conftest import make_images

TINY = ModelSpec("tiny_test")


def _vectors(store: str) -> dict[str, np.ndarray]:
    t = Store.open(store).read(["id", "embedding"])
    return dict(zip(t.column("id").to_pylist(), arrow_to_embeddings(t.column("embedding"))))


def test_store_schema_provenance_and_foreign_readers(image_tree: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "store")
    s = extract([str(image_tree)], out, TINY, run=RunOptions(batch_size=4, shard_rows=5))
    assert (s.done, s.failed, s.discovered) == (11, 0, 11)
    table = ds.dataset(out).to_table()  # plain pyarrow, no embedder
    assert table.num_rows == 11
    assert str(table.schema.field("embedding").type) == "fixed_size_list<element: float>[32]"
    assert set(table.column_names) >= {"id", "path", "label", "embedding", "width", "height"}
    assert sorted(set(table.column("label").to_pylist())) == ["cat", "dog"]
    assert set(table.column("width").to_pylist()) == {48}
    shard = Store(out).shard_files()[0]
    meta = json.loads(pq.read_schema(shard).metadata[b"embedder"])
    assert meta["backbone"] == "tiny_test" and meta["preprocessing"]["crop_size"] == 32
    assert meta["weights"]["sha256"] and meta["versions"]["torch"]
    manifest = json.loads((Path(out) / "_manifest.json").read_text())
    assert sum(s["rows"] for s in manifest["shards"]) == 11 and manifest["runs"][0]["device"] == "cpu"

    import duckdb
    import pandas as pd
    import polars as pl

    assert len(pd.read_parquet(out)) == 11
    assert pl.read_parquet(f"{out}/*.parquet").height == 11
    n = duckdb.connect().execute(f"select count(*) from read_parquet('{out}/*.parquet')").fetchall()
    assert n == [(11,)]


def test_incremental_and_refuses_other_provenance(image_tree: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "store")
    extract([str(image_tree)], out, TINY)
    make_images(image_tree, {"bird": 3}, seed=5)
    s = extract([str(image_tree)], out, TINY)
    assert (s.done, s.skipped_present) == (3, 11)
    assert Store.open(out).count() == 14
    with pytest.raises(ProvenanceMismatch, match="layer"):
        extract([str(image_tree)], out, ModelSpec("tiny_test", layer="stage1"))
    with pytest.raises(ProvenanceMismatch, match="dtype"):
        extract([str(image_tree)], out, TINY, EmbedOptions(dtype="float16"))


def test_same_vector_whatever_the_batch(image_tree: Path, tmp_path: Path) -> None:
    runs = {}
    for bs in (1, 3, 11):
        out = str(tmp_path / f"s{bs}")
        extract([str(image_tree)], out, TINY, run=RunOptions(batch_size=bs, workers=2))
        runs[bs] = _vectors(out)
    for bs in (3, 11):
        assert runs[bs].keys() == runs[1].keys()
        for k in runs[1]:
            np.testing.assert_allclose(runs[bs][k], runs[1][k], rtol=1e-5, atol=1e-5)
    # and reproducible across runs
    out = str(tmp_path / "again")
    extract([str(image_tree)], out, TINY, run=RunOptions(batch_size=3))
    again = _vectors(out)
    for k in again:
        np.testing.assert_allclose(again[k], runs[3][k], rtol=1e-6, atol=1e-6)


def test_bad_images_are_recorded_and_skipped(image_tree: Path, tmp_path: Path) -> None:
    (image_tree / "cat" / "zero.jpg").write_bytes(b"")
    (image_tree / "dog" / "text.png").write_text("hello")
    good = (image_tree / "cat" / "cat_0000.jpg").read_bytes()
    (image_tree / "cat" / "trunc.jpg").write_bytes(good[: len(good) // 3])
    out = str(tmp_path / "store")
    s = extract([str(image_tree)], out, TINY, run=RunOptions(batch_size=4))
    assert (s.done, s.failed) == (11, 3)
    st = Store.open(out)
    errs = st.errors()
    assert errs.num_rows == 3
    assert {Path(p).name for p in errs.column("path").to_pylist()} == {"zero.jpg", "text.png", "trunc.jpg"}
    assert st.info().errors == 3
    again = extract([str(image_tree)], out, TINY)
    assert (again.done, again.failed, again.skipped_failed_before) == (0, 0, 3)
    (image_tree / "cat" / "zero.jpg").write_bytes(good)  # fixed by the user
    retry = extract([str(image_tree)], out, TINY, run=RunOptions(retry_failed=True))
    assert (retry.done, retry.failed) == (1, 2)
    assert Store.open(out).info().errors == 2


def test_layers_pooling_float16_and_l2(image_tree: Path, tmp_path: Path) -> None:
    s1 = str(tmp_path / "stage1")
    extract([str(image_tree)], s1, ModelSpec("tiny_test", layer="stage1", pool="gem"))
    v = _vectors(s1)
    assert next(iter(v.values())).shape == (16,)
    assert Store.open(s1).provenance.layer == "stage1"
    mx = str(tmp_path / "max")
    extract([str(image_tree)], mx, ModelSpec("tiny_test", pool="max"))
    assert Store.open(mx).provenance.layer == "stage2"
    h = str(tmp_path / "half")
    extract([str(image_tree)], h, TINY, EmbedOptions(dtype="float16", normalize="l2"))
    t = Store.open(h).read(["embedding"])
    assert str(t.schema.field("embedding").type) == "fixed_size_list<element: halffloat>[32]"
    norms = np.linalg.norm(arrow_to_embeddings(t.column("embedding")), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=2e-3)
    with pytest.raises(UnknownLayer, match="stage-level layers: stem, stage1, stage2"):
        extract([str(image_tree)], str(tmp_path / "x"), ModelSpec("tiny_test", layer="layer9"))


def test_batch_embedder_is_engine_agnostic(image_tree: Path, tmp_path: Path) -> None:
    """The Ray-style entry point: pa.Table of paths in, pa.Table out, errors as a column."""
    emb = BatchEmbedder(TINY)
    paths = sorted(str(p) for p in image_tree.rglob("*.jpg"))[:4] + [str(tmp_path / "missing.jpg")]
    out = emb(pa.table({"path": paths}))
    assert out.num_rows == 5
    errors = out.column("error").to_pylist()
    assert errors[:4] == [None] * 4 and "cannot read" in errors[4]
    assert out.column("embedding").null_count == 1
    # same vectors as the local pipeline
    store = str(tmp_path / "s")
    extract([str(image_tree)], store, TINY)
    ref = _vectors(store)
    got = arrow_to_embeddings(out.column("embedding").drop_null())
    for i, row_id in enumerate(out.column("id").to_pylist()[:4]):
        np.testing.assert_allclose(got[i], ref[row_id], rtol=1e-5, atol=1e-5)


def test_store_errors(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="not an embedding store"):
        Store.open(tmp_path)
    (tmp_path / "file").write_text("x")
    prov = BatchEmbedder(TINY).provenance()
    with pytest.raises(StoreError, match="cannot create store"), Store.writer(tmp_path / "file" / "store", prov):
        pass
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "something").write_text("x")
    with pytest.raises(StoreError, match="not empty"), Store.writer(tmp_path / "full", prov):
        pass


def test_weights_file_gives_same_vectors_and_records_it(image_tree: Path, tmp_path: Path) -> None:
    import torch

    from embedder.models.registry import get_backbone

    f = tmp_path / "tiny.pth"
    torch.save(get_backbone("tiny_test").build_architecture().state_dict(), f)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    extract([str(image_tree)], a, TINY)
    extract([str(image_tree)], b, ModelSpec("tiny_test", weights_file=f))
    assert Store.open(b).provenance.weights.kind == "file"
    assert Store.open(b).provenance.weights.name == "tiny.pth"
    va, vb = _vectors(a), _vectors(b)
    for k in va:
        np.testing.assert_allclose(va[k], vb[k], rtol=1e-6, atol=1e-6)
    bad = tmp_path / "bad.pth"
    torch.save({"nope": torch.zeros(1)}, bad)
    from embedder.errors import WeightsMismatch

    with pytest.raises(WeightsMismatch, match="do not fit tiny_test"):
        extract([str(image_tree)], str(tmp_path / "c"), ModelSpec("tiny_test", weights_file=bad))


def test_second_writer_is_refused(image_tree: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "store")
    extract([str(image_tree)], out, TINY)
    with Store(out).writer_lock():  # another process holds it (flock is per open file)
        with pytest.raises(StoreError, match="another embedder process"):
            extract([str(image_tree)], out, TINY)
    extract([str(image_tree)], out, TINY)  # free again


def _embed_in_worker(args: tuple) -> pa.Table:
    cls, ctor, batch = args
    return cls(*ctor)(batch)


def test_batch_embedder_travels_to_another_process(image_tree: Path) -> None:
    """What a Ray actor pool does: pickle the class and its constructor args, build it in a
    worker process (model loaded there, once), send Arrow batches in, get Arrow tables back."""
    import multiprocessing as mp
    import pickle

    paths = sorted(str(p) for p in image_tree.rglob("*.jpg"))
    job = (BatchEmbedder, (TINY, EmbedOptions(device="cpu")), pa.table({"path": paths}))
    pickle.dumps(job)
    with mp.get_context("spawn").Pool(1) as pool:
        out = pool.map(_embed_in_worker, [job])[0]
    local = BatchEmbedder(TINY, EmbedOptions(device="cpu"))(pa.table({"path": paths}))
    assert out.schema == local.schema and out.num_rows == len(paths)
    np.testing.assert_allclose(arrow_to_embeddings(out.column("embedding")),
                               arrow_to_embeddings(local.column("embedding")), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compiled_model_gives_the_same_vectors(image_tree: Path, tmp_path: Path) -> None:
    """--compile: one graph for one batch shape (the last batch padded), the same vectors."""
    eager, compiled = str(tmp_path / "e"), str(tmp_path / "c")
    extract([str(image_tree)], eager, TINY, run=RunOptions(batch_size=4))
    s = extract([str(image_tree)], compiled, TINY, EmbedOptions(compile=True), RunOptions(batch_size=4))
    assert s.done == 11  # 4 + 4 + a padded last batch of 3
    a, b = _vectors(eager), _vectors(compiled)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5)
    import json as _json

    runs = _json.loads((Path(compiled) / "_manifest.json").read_text())["runs"]
    assert runs[-1]["compiled"] is True and runs[-1]["decoder"] == "pil"


def test_count_reads_the_manifest_not_a_footer_per_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``Store.count`` takes the manifest's row counts (in object storage a footer is a ranged GET per
    shard) and reads a footer only for a shard the manifest does not list yet."""
    src = tmp_path / "imgs"
    make_images(src, {"a": 11, "b": 10}, size=(40, 40))
    out = str(tmp_path / "s")
    extract([str(src)], out, TINY, run=RunOptions(batch_size=4, shard_rows=5))
    store = Store.open(out)
    files = store.shard_files()
    assert len(files) == 5
    from embedder.io import storage

    footers: list[str] = []
    open_parquet = storage.open_parquet

    def counting(path: str) -> object:
        footers.append(path)
        return open_parquet(path)

    monkeypatch.setattr(storage, "open_parquet", counting)
    assert store.count() == 21 and footers == []
    # a shard the manifest does not list yet (a writer killed before its manifest update)
    manifest_path = tmp_path / "s" / "_manifest.json"
    m = json.loads(manifest_path.read_text())
    dropped = m["shards"].pop()
    manifest_path.write_text(json.dumps(m))
    assert store.count() == 21 and [Path(p).name for p in footers] == [dropped["file"]]
    # a shard the manifest lists but that is gone is not counted
    gone = pq.read_metadata(files[0]).num_rows
    Path(files[0]).unlink()
    assert store.count() == 21 - gone

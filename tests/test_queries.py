"""One query builder for the CLI, the Python API and the service (the same vectors accepted and
refused, with the same messages); `index add` refuses vectors that would rank differently; the API's
probe rebuilds a model made from a weights file; text → image recall's caption sample is drawn by row
number (no Python call per store row)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

import embedder
from embedder.cli import app
from embedder.errors import IndexError_, ProvenanceMismatch
from embedder.index import build as idx
from embedder.index import plan as index_plan
from embedder.index import search as index_search
from embedder.index.text_recall import sample_captions
from embedder.models.origin import WeightsRef
from embedder.models.registry import get_backbone
from embedder.store.provenance import Provenance
from embedder.store.shards import Store, embeddings_to_arrow

pytest.importorskip("faiss", reason="the index extra is not installed")

runner = CliRunner()


def vectors(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, dim)).astype(np.float32)


def vector_store(path: Path, shards: list[np.ndarray], normalize: str = "none",
                 captions: list[list[str | None]] | None = None, start: int = 0) -> str:
    """A store of the given vectors, one shard per array (row numbers, and ids from START, run on across
    shards)."""
    prov = Provenance("synthetic", WeightsRef("file", "none", "0"), "penultimate", "avg",
                      get_backbone("tiny_test").preprocessing(), shards[0].shape[1], normalize=normalize)
    with Store.writer(path, prov) as st:
        for s, x in enumerate(shards):
            n = len(x)
            ids = [f"v{start + i:07d}" for i in range(n)]
            st.write_shard(pa.table({
                "id": ids, "path": [f"/data/{i}.jpg" for i in ids], "label": [f"c{i % 5}" for i in range(n)],
                "embedding": embeddings_to_arrow(x, "float32"),
                "width": pa.array([1] * n, pa.int32()), "height": pa.array([1] * n, pa.int32()),
                "file_hash": [None] * n, "caption": captions[s] if captions else [None] * n,
            }, schema=st.read().schema))
            start += n
        st.update_manifest()
    return str(path)


def one_line_error(args: list[str]) -> str:
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error:") and r.output.count("\n") == 1, r.output  # one line
    return " ".join(r.output.split())


@pytest.fixture
def flat(tmp_path: Path) -> str:
    home = str(tmp_path / "h")
    idx.build(vector_store(tmp_path / "s", [vectors(200)]), "n", index_plan.BuildOptions(kind="flat"), home)
    return home


def test_cli_refuses_nan_and_zero_query_vectors(flat: str, tmp_path: Path) -> None:
    nan = vectors(2)
    nan[1, 3] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    np.save(tmp_path / "zero.npy", np.zeros(16, np.float32))
    np.save(tmp_path / "inf.npy", np.full(16, np.inf, np.float32))
    msg = one_line_error(["search", "n", str(tmp_path / "nan.npy"), "--home", flat])
    assert "nan.npy" in msg and "query vector 1 holds NaN or infinite values" in msg
    msg = one_line_error(["search", "n", str(tmp_path / "zero.npy"), "--home", flat])
    assert "all zeros" in msg and "ranks by cosine" in msg
    assert "NaN or infinite" in one_line_error(["search", "n", str(tmp_path / "inf.npy"), "--home", flat])
    np.save(tmp_path / "ok.npy", vectors(1)[0])
    assert runner.invoke(app, ["search", "n", str(tmp_path / "ok.npy"), "--home", flat]).exit_code == 0


def test_api_index_search_raises_the_domain_error(flat: str) -> None:
    index = embedder.open_index("n", home=flat)
    with pytest.raises(IndexError_, match="holds NaN or infinite values"):
        index.search(np.full(16, np.nan, np.float32))
    with pytest.raises(IndexError_, match="query vector 1 is all zeros"):
        index.search(np.stack([vectors(1)[0], np.zeros(16, np.float32)]))
    with pytest.raises(IndexError_, match=r"query vectors must be \(n, 16\)"):
        index.search(np.zeros((2, 3, 16), np.float32))
    loaded = index_search.LoadedIndex("n", flat)
    with pytest.raises(IndexError_, match="NaN"):
        loaded.search(np.full((1, 16), np.nan, np.float32), 3)
    assert len(index.search(vectors(1)[0], k=3)[0]) == 3


def test_l2_index_takes_zero_vectors_and_the_service_keeps_its_400(tmp_path: Path) -> None:
    from embedder.service.engine import BadQuery, Engine, Query
    from embedder.service.options import ServeOptions

    home = str(tmp_path / "h")
    idx.build(vector_store(tmp_path / "s", [vectors(100)]), "l2", index_plan.BuildOptions(kind="flat", metric="l2"),
              home)
    idx.build(str(tmp_path / "s"), "cos", index_plan.BuildOptions(kind="flat"), home)
    # L2 from the origin is a ranking (smallest norms first): a zero vector is a fine query there
    assert len(embedder.open_index("l2", home=home).search(np.zeros(16, np.float32), k=2)[0]) == 2
    engine = Engine(ServeOptions(home=home, poll_seconds=0))
    try:
        engine.load_all()
        nan, zero = [float("nan")] + [0.0] * 15, [0.0] * 16
        out = engine.run_batch([Query("cos", vector=nan), Query("cos", vector=zero), Query("l2", vector=zero),
                                Query("cos", vector=[[0.0] * 16]),  # type: ignore[list-item]
                                Query("cos", id="v0000003")])
        assert isinstance(out[0], BadQuery) and "NaN" in str(out[0])
        assert isinstance(out[1], BadQuery) and "all zeros" in str(out[1])
        assert not isinstance(out[2], Exception) and len(out[2].hits) == 10
        assert isinstance(out[3], BadQuery) and "flat list" in str(out[3])
        assert not isinstance(out[4], Exception) and out[4].hits[0].get("id") == "v0000003"
    finally:
        engine.close()


def test_index_add_refuses_another_normalisation_where_it_changes_the_ranking(tmp_path: Path) -> None:
    x = vectors(300)
    raw = vector_store(tmp_path / "raw", [x[:200]])
    unit = vector_store(tmp_path / "unit", [x[200:] / np.linalg.norm(x[200:], axis=1, keepdims=True)],
                        normalize="l2", start=200)
    home = str(tmp_path / "h")
    for metric in ("l2", "ip", "cosine"):
        idx.build(raw, metric, index_plan.BuildOptions(kind="flat", metric=metric), home)
    for metric in ("l2", "ip"):
        msg = one_line_error(["index", "add", metric, unit, "--home", home])
        assert "normalize=none" in msg and "normalize=l2" in msg and "change the ranking" in msg
        with pytest.raises(ProvenanceMismatch, match="normalize"):
            idx.add(metric, unit, home)
        assert index_search.LoadedIndex(metric, home).index.ntotal == 200  # nothing was added
    assert idx.add("cosine", unit, home)["added"] == 100  # cosine normalises both: the same ranking


def test_on_disk_index_add_refuses_another_normalisation(tmp_path: Path) -> None:
    x = vectors(2000)
    home = str(tmp_path / "h")
    idx.build(vector_store(tmp_path / "raw", [x[:1500]]), "n",
              index_plan.BuildOptions(kind="ivf", metric="l2", on_disk=True, queries=50), home)
    unit = vector_store(tmp_path / "unit", [x[1500:] / np.linalg.norm(x[1500:], axis=1, keepdims=True)],
                        normalize="l2", start=1500)
    with pytest.raises(ProvenanceMismatch, match="change the ranking"):
        idx.add("n", unit, home)


def test_the_api_probe_takes_the_weights_file_its_store_was_made_from(image_tree: Path, tmp_path: Path) -> None:
    import torch

    from embedder.embed.fill import extract
    from embedder.models.builder import ModelSpec

    pytest.importorskip("sklearn", reason="the probe extra is not installed")
    f = tmp_path / "w.pth"
    torch.save(get_backbone("tiny_test").build_architecture().state_dict(), f)
    store = str(tmp_path / "store")
    extract([str(image_tree)], store, ModelSpec("tiny_test", weights_file=f))
    files = sorted(image_tree.rglob("*.jpg"))[:3]
    assert len(embedder.train_probe(store).predict(files)) == 3  # the store remembers where its file is
    moved = f.rename(tmp_path / "moved.pth")  # gone from there: never guessed
    with pytest.raises(ProvenanceMismatch, match="--weights"):
        embedder.train_probe(store).predict(files)
    probe = embedder.train_probe(store, weights=moved)
    stored = embedder.open_store(store)
    by_id = dict(zip(stored.table(["id"]).column("id").to_pylist(), stored.vectors()))
    from embedder.io.uri import image_id

    assert probe.predict(files) == probe.predict_vectors(np.stack([by_id[image_id(p)] for p in files]))


def _captioned_store(tmp_path: Path) -> tuple[str, list[str | None]]:
    sizes = [20_000, 15_000, 25_000]
    caps: list[list[str | None]] = []
    start = 0
    for n in sizes:
        caps.append([None if (start + i) % 3 == 0 else f"caption {start + i}" for i in range(n)])
        start += n
    store = vector_store(tmp_path / "caps", [np.zeros((n, 2), np.float32) + 1 for n in sizes], captions=caps)
    return store, [c for part in caps for c in part]


def test_caption_sample_is_drawn_by_row_number(tmp_path: Path) -> None:
    store, caps = _captioned_store(tmp_path)
    captioned = sum(c is not None for c in caps)
    s = sample_captions(store, 500, seed=1)
    assert s.captioned_rows == captioned and len(s.rows) == len(set(s.rows.tolist())) == 500
    assert s.captions == [caps[r] for r in s.rows]  # each row number is the row its caption is on
    assert s.rows.min() < 20_000 and s.rows.max() >= 35_000  # every shard contributes
    assert np.all(s.rows[1:] > s.rows[:-1])
    few = sample_captions(store, 10_000, seed=1, limit=100)  # only the first LIMIT rows (an index's)
    assert few.rows.max() < 100 and few.captioned_rows == len(few.rows) == sum(c is not None for c in caps[:100])
    assert sample_captions(store, 500, seed=1).captions == s.captions  # seeded
    assert sample_captions(store, 500, seed=2).captions != s.captions


def test_caption_sampling_makes_no_python_call_per_store_row(tmp_path: Path) -> None:
    store, _ = _captioned_store(tmp_path)
    calls = 0

    def count(frame: object, event: str, arg: object) -> None:
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    sys.setprofile(count)
    try:
        sample_captions(store, 200, seed=0)
    finally:
        sys.setprofile(None)
    assert calls < 20_000, calls  # 60,000 rows (40,000 captioned): per-row work would be 40,000+ calls


def test_huge_and_empty_query_vectors_are_refused_alike_on_every_path(flat: str, tmp_path: Path) -> None:
    """A finite vector whose squared norm overflows float32 (the search would return nothing, or
    arbitrary hits), and an empty batch: refused by the CLI and the API as the service refuses them.
    On a cosine index a huge vector still has a direction: it searches as its unit vector."""
    home = str(tmp_path / "l2h")
    idx.build(vector_store(tmp_path / "s2", [vectors(200)]), "l2",
              index_plan.BuildOptions(kind="flat", metric="l2"), home)
    np.save(tmp_path / "huge.npy", np.full(16, 1e30, np.float32))
    np.save(tmp_path / "empty.npy", np.zeros((0, 16), np.float32))
    assert "too large" in one_line_error(["search", "l2", str(tmp_path / "huge.npy"), "--home", home])
    assert "no query vectors" in one_line_error(["search", "l2", str(tmp_path / "empty.npy"), "--home", home])
    with pytest.raises(IndexError_, match="too large"):
        embedder.open_index("l2", home=home).search(np.full(16, 1e30, np.float32))
    cos = embedder.open_index("n", home=flat)
    v = vectors(1)[0]
    ids = lambda hits: [h.id for h in hits[0]]  # noqa: E731
    assert ids(cos.search(v * 1e30, k=3)) == ids(cos.search(v, k=3))


def test_the_api_takes_a_vector_as_a_plain_list_as_the_service_does(flat: str) -> None:
    index = embedder.open_index("n", home=flat)
    v = vectors(2)
    assert index.search(v[0].tolist(), k=3) == index.search(v[0], k=3)
    assert index.search(v.tolist(), k=3) == index.search(v, k=3)

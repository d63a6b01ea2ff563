"""The Python API at the package's face: the same vectors, stores, indexes and probes as the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import embedder
from embedder.cli import app
from embedder.errors import EmbedderError, IndexError_, UnknownBackbone
from embedder.io.uri import image_id
from tests.conftest import make_images

pytest.importorskip("sklearn", reason="the probe extra is not installed")
pytest.importorskip("faiss", reason="the index extra is not installed")


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, Path]:
    """Train and test images of 3 classes, their stores written by `embedder extract` (the CLI)."""
    root = tmp_path_factory.mktemp("api")
    train, test = root / "train", root / "test"
    make_images(train, {"red": 12, "green": 12, "blue": 12}, seed=1)
    make_images(test, {"red": 5, "green": 5, "blue": 5}, seed=2)
    make_images(train, {"odd": 2}, fmt="PNG", seed=3)  # another format, another class
    for src, out in ((train, root / "train_store"), (test, root / "test_store")):
        r = CliRunner().invoke(app, ["extract", str(src), "--out", str(out), "--backbone", "tiny_test", "--json"])
        assert r.exit_code == 0, r.output
    return train, test, root / "train_store", root / "test_store"


def _stored(store: Path) -> dict[str, np.ndarray]:
    s = embedder.open_store(store)
    return dict(zip(s.table(["id"]).column("id").to_pylist(), s.vectors()))


def test_embedder_gives_what_extract_stored_for_files_and_pil_images(collection) -> None:  # type: ignore[no-untyped-def]
    train, _, train_store, _ = collection
    files = sorted(train.rglob("*.jpg"))[:7] + sorted(train.rglob("*.png"))
    emb = embedder.Embedder("tiny_test")
    got = emb.embed(files)
    assert got.dtype == np.float32 and got.shape == (len(files), emb.dim)
    stored = _stored(train_store)
    want = np.stack([stored[image_id(f)] for f in files])
    np.testing.assert_array_equal(got, want)  # the same decode, the same model, the same arithmetic
    pil = emb.embed([Image.open(f) for f in files], batch_size=3)  # batches of 3: the same again
    np.testing.assert_array_equal(pil, want)
    assert emb.provenance.same_store(embedder.open_store(train_store).provenance)


def test_embedder_options_and_bad_input_are_clear_errors(collection, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UnknownBackbone, match="tiny_test"):
        embedder.Embedder("tiny_tset")
    with pytest.raises(EmbedderError, match=r"unknown option decodr; valid: .*decoder"):
        embedder.Embedder("tiny_test", decodr="pil")
    emb = embedder.Embedder("tiny_test", normalize="l2")
    v = emb.embed([Image.new("RGB", (50, 40), (200, 10, 10))])
    assert abs(float(np.linalg.norm(v[0])) - 1.0) < 1e-5
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(EmbedderError, match=r"image 1 \(.*bad.jpg\)"):
        emb.embed([Image.new("RGB", (50, 40)), bad])
    with pytest.raises(EmbedderError, match="expected a path or a PIL image, got int"):
        emb.embed([3])


def test_extract_and_open_store(collection, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    train, _, train_store, _ = collection
    out = tmp_path / "store"
    summary = embedder.extract(str(train), out, backbone="tiny_test", shard_rows=8)
    assert summary.done == 38 and summary.failed == 0
    again = embedder.extract([str(train)], out, backbone="tiny_test")
    assert again.done == 0 and again.skipped_present == 38  # resumable, as the CLI's
    store = embedder.open_store(out)
    assert len(store) == 38 and store.provenance.backbone == "tiny_test"
    table = store.table(["id", "label"])
    assert table.column_names == ["id", "label"] and table.num_rows == 38
    vecs = store.vectors()
    assert vecs.dtype == np.float32 and vecs.shape == (38, store.dim)
    cli = _stored(train_store)
    np.testing.assert_array_equal(vecs, np.stack([cli[i] for i in table.column("id").to_pylist()]))
    with pytest.raises(EmbedderError, match="unknown option shard_row; valid:"):
        embedder.extract(str(train), out, backbone="tiny_test", shard_row=8)


def test_build_open_and_search_an_index(collection, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    train, _, train_store, _ = collection
    home = tmp_path / "indexes"
    index = embedder.build_index(train_store, "colours", home=home, kind="flat")
    assert len(index) == 38 and index.info["kind"] == "flat"
    same = embedder.open_index("colours", home=home)
    assert repr(same).startswith("Index('colours': Flat, ") and "exact" in repr(same)  # not <object at 0x…>
    query = sorted((train / "green").glob("*.jpg"))[0]
    by_image = same.search(str(query), k=3)
    assert len(by_image) == 1 and [h.rank for h in by_image[0]] == [1, 2, 3]
    top = by_image[0][0]
    assert top.id == image_id(query) and top.label == "green" and top.score == pytest.approx(1.0, abs=1e-5)
    vec = _stored(train_store)[image_id(query)]
    by_vector = same.search(vec, k=3)  # one vector, (dim,)
    assert [h.id for h in by_vector[0]] == [h.id for h in by_image[0]]
    both = same.search(np.stack([vec, vec]), k=2, where={"label": "red"})
    assert len(both) == 2 and all(h.label == "red" for hits in both for h in hits)
    with pytest.raises(EmbedderError, match=r"query vectors must be \(n, 32\)"):
        same.search(np.zeros((1, 5), np.float32))
    with pytest.raises(IndexError_, match="colours"):
        embedder.open_index("colour", home=home)


def test_train_probe_and_predict(collection) -> None:  # type: ignore[no-untyped-def]
    _, test, train_store, test_store = collection
    probe = embedder.train_probe(train_store, test_store=test_store)
    assert probe.classes == ["blue", "green", "odd", "red"]
    m = probe.metrics
    assert m["test"]["accuracy"] >= 0.9 and "knn_test_accuracy" in m and m["selection"].startswith("C=")
    files = sorted(test.rglob("*.jpg"))
    labels = probe.predict(files)
    assert np.mean([lab == f.parent.name for lab, f in zip(labels, files)]) >= 0.9
    stored = _stored(test_store)
    assert labels == probe.predict_vectors(np.stack([stored[image_id(f)] for f in files]))
    proba = probe.predict_proba(files[:2])
    assert proba.shape == (2, 4) and np.allclose(proba.sum(1), 1.0, atol=1e-5)


def test_the_api_probe_file_is_the_clis(collection, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, test, train_store, _ = collection
    path = tmp_path / "probe.json"
    embedder.train_probe(train_store).save(path)
    files = sorted(test.rglob("*.jpg"))[:4]
    out = tmp_path / "pred.parquet"
    r = CliRunner().invoke(app, ["predict", str(path), *map(str, files), "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    import pyarrow.parquet as pq

    t = pq.read_table(out).to_pylist()
    assert [row["predicted"] for row in t] == embedder.train_probe(train_store).predict([row["path"] for row in t])


def test_import_embedder_is_as_light_as_the_cli() -> None:
    heavy = ("torch", "torchvision", "faiss", "sklearn", "scipy", "matplotlib", "ray", "pandas")
    store = Path(__file__).parent / "data" / "store-v1"
    code = ("import sys, json, embedder\n"
            "api = [embedder.Embedder, embedder.open_store, embedder.build_index, embedder.open_index,"
            " embedder.train_probe, embedder.extract]\n"
            f"s = embedder.open_store({str(store)!r}); n = len(s)\n"
            f"print(json.dumps([n, sorted(m for m in {heavy!r} if m in sys.modules)]))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ})
    assert r.returncode == 0, r.stderr
    n, loaded = json.loads(r.stdout.strip().splitlines()[-1])
    assert n > 0 and loaded == []
    for name in embedder.__all__:  # every public name resolves, documented, and is listed by dir()
        assert name in dir(embedder) and (name == "__version__" or getattr(embedder, name).__doc__)
    with pytest.raises(AttributeError, match="no attribute 'embed_images'"):
        embedder.embed_images  # noqa: B018


def test_the_readme_example_runs(tmp_path: Path) -> None:
    """The README's Python API block, as written (the tiny backbone in place of MobileNetV2)."""
    import re

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = re.search(r"<!-- api-example[^>]*-->\n```python\n(.*?)```", readme, re.S)
    assert block, "the README lost its api-example block"
    code = block.group(1).replace("mobilenet_v2:IMAGENET1K_V1", "tiny_test")
    make_images(tmp_path / "photos", {"cat": 8, "dog": 8})
    (tmp_path / "photos" / "cat" / "cat_0000.jpg").rename(tmp_path / "photos" / "cat" / "1.jpg")
    (tmp_path / "photos" / "dog" / "dog_0000.jpg").rename(tmp_path / "photos" / "dog" / "2.jpg")
    env = {**os.environ, "EMBEDDER_HOME": str(tmp_path / "indexes")}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("16 tiny_test (16, 32) 16")
    assert lines[1].startswith("1 1.0 cat ") and lines[1].endswith("1.jpg")
    assert lines[-1].endswith("['dog']")

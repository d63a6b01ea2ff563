"""The CPU runtime (``--runtime``): ONNX Runtime gives eager torch's vectors, its exported graph and
auto's decisions are cached on disk (a damaged cache is rebuilt, never a crash), every run and the
provenance say which runtime computed the vectors, and ``--runtime torch`` is the torch path as before."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from embedder.cli import app
from embedder.embed.batch import BatchEmbedder
from embedder.embed.fill import extract
from embedder.embed.options import EmbedOptions, RunOptions
from embedder.errors import StoreError
from embedder.models import runtime as rt
from embedder.models.builder import ModelSpec
from embedder.store.provenance import Provenance
from embedder.store.shards import Store
from tests.conftest import make_images

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install 'embedder[onnx]'")

TINY = ModelSpec("tiny_test")


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "runtime-cache"
    monkeypatch.setenv(rt.CACHE_ENV, str(d))
    return d


@pytest.fixture
def images(tmp_path: Path) -> Path:
    make_images(tmp_path / "imgs", {"a": 5, "b": 4}, size=(48, 40))
    return tmp_path / "imgs"


def _vectors(store: Path) -> np.ndarray:
    t = Store.open(store).read(["id", "embedding"]).sort_by("id")
    return np.stack(t.column("embedding").to_numpy(zero_copy_only=False))


def _run(store: Path) -> dict[str, Any]:
    return Store.open(store).manifest()["runs"][-1]  # type: ignore[no-any-return]


def _extract(images: Path, store: Path, runtime: str, spec: ModelSpec = TINY, **run: Any) -> BatchEmbedder:
    emb = BatchEmbedder(spec, EmbedOptions(runtime=runtime))
    s = extract([str(images)], str(store), spec, EmbedOptions(runtime=runtime), RunOptions(batch_size=4, **run),
                embedder=emb)
    assert s.done == 9 and s.failed == 0
    return emb


def test_onnx_gives_torchs_vectors_and_its_graph_is_cached(images: Path, tmp_path: Path, cache: Path) -> None:
    torch_emb = _extract(images, tmp_path / "torch", "torch")
    assert _run(tmp_path / "torch")["runtime"]["name"] == "torch"
    assert torch_emb.model is torch_emb._eager and not cache.exists()  # torch: nothing exported, as before
    emb = _extract(images, tmp_path / "onnx", "onnx")
    assert isinstance(emb.model, rt.OnnxModule)  # ORT really computes the batches
    run = _run(tmp_path / "onnx")["runtime"]
    assert run["name"] == "onnxruntime" and run["export_s"] > 0 and run["cosine"] >= rt.MIN_COSINE
    assert emb.provenance().runtime == {"name": "onnxruntime", "version": rt.ort_version()}
    assert torch_emb.provenance().runtime == {"name": "torch", "version": torch.__version__}
    eager, onnx = _vectors(tmp_path / "torch"), _vectors(tmp_path / "onnx")
    assert rt.min_cosine(eager, onnx) >= rt.MIN_COSINE
    np.testing.assert_allclose(onnx, eager, rtol=0, atol=1e-5 * float(np.abs(eager).max()))
    graphs = list(cache.glob("*.onnx"))
    assert len(graphs) == 1 and not list(cache.glob(".*"))  # one graph, no temporary file left
    # the second run reads the graph from the cache: nothing exported
    _extract(images, tmp_path / "onnx2", "onnx")
    assert "export_s" not in _run(tmp_path / "onnx2")["runtime"]
    assert list(cache.glob("*.onnx")) == graphs


def test_a_damaged_cache_is_rebuilt_not_a_crash(images: Path, tmp_path: Path, cache: Path) -> None:
    _extract(images, tmp_path / "a", "onnx")
    graph = next(cache.glob("*.onnx"))
    graph.write_bytes(b"not an onnx graph" * 10)
    (cache / rt.DECISIONS).write_text("{ torn")
    _extract(images, tmp_path / "b", "onnx")
    assert _run(tmp_path / "b")["runtime"]["export_s"] > 0  # exported again
    np.testing.assert_allclose(_vectors(tmp_path / "b"), _vectors(tmp_path / "a"), rtol=0, atol=1e-6)
    graph.write_bytes(b"")  # an empty file too
    _extract(images, tmp_path / "c", "onnx")
    assert _run(tmp_path / "c")["runtime"]["name"] == "onnxruntime"


def test_auto_times_once_per_model_and_machine_then_reads_the_decision(
        images: Path, tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a short run is not timed: torch, and the record says why
    _extract(images, tmp_path / "short", "auto")
    run = _run(tmp_path / "short")["runtime"]
    assert run["name"] == "torch" and "not timed" in run["reason"] and not cache.exists()
    # a long one (threshold lowered): ORT timed against torch on a lane, vectors checked, the faster kept
    monkeypatch.setattr(rt, "AUTO_MIN_BATCHES", 2)
    emb = _extract(images, tmp_path / "long", "auto", model_lanes=2)
    run = _run(tmp_path / "long")["runtime"]
    ms = run["ms"]
    faster = ms["torch"] >= rt.MIN_GAIN * ms["onnxruntime"]
    assert run["name"] == ("onnxruntime" if faster else "torch")
    assert isinstance(emb.model, rt.OnnxModule) == faster
    decisions = json.loads((cache / rt.DECISIONS).read_text())
    assert any(d.get("ms") == ms for d in decisions.values())
    # the next run, short again, reads that decision instead of timing or skipping
    monkeypatch.setattr(rt, "AUTO_MIN_BATCHES", 1000)
    _extract(images, tmp_path / "again", "auto", model_lanes=2)
    again = _run(tmp_path / "again")["runtime"]
    assert again["name"] == run["name"] and again["ms"] == ms and "cached" in again["reason"]
    assert "export_s" not in again
    np.testing.assert_allclose(_vectors(tmp_path / "again"), _vectors(tmp_path / "short"), rtol=0,
                               atol=1e-5 * float(np.abs(_vectors(tmp_path / "short")).max()))


def test_a_timm_vit_on_onnx_matches_eager(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    wfile = tmp_path / "test_vit.pth"
    torch.save(timm.create_model("test_vit", pretrained=False).state_dict(), wfile)
    make_images(tmp_path / "imgs", {"a": 5, "b": 4}, size=(96, 80))
    from embedder.models.builder import spec_for

    spec = spec_for("timm:test_vit", wfile, None, None, None)
    _extract(tmp_path / "imgs", tmp_path / "torch", "torch", spec)
    _extract(tmp_path / "imgs", tmp_path / "onnx", "onnx", spec)
    assert _run(tmp_path / "onnx")["runtime"]["name"] == "onnxruntime"
    assert rt.min_cosine(_vectors(tmp_path / "onnx"), _vectors(tmp_path / "torch")) >= rt.MIN_COSINE


def test_provenance_records_the_runtime_and_reads_older_records() -> None:
    emb = BatchEmbedder(TINY)
    prov = emb.provenance()
    assert prov.runtime is None  # not settled before prepare_graph
    rec = prov.replace(runtime={"name": "onnxruntime", "version": "1.0"})
    assert Provenance.from_json(rec.to_json()).runtime == {"name": "onnxruntime", "version": "1.0"}
    assert rec.comparable(prov) and rec.same_store(prov)  # the same vectors, whichever runtime
    old = {**rec.to_dict(), "version": 3}
    del old["runtime"]
    assert Provenance.from_dict(old).runtime is None
    with pytest.raises(StoreError, match="runtime"):
        Provenance.from_dict({**rec.to_dict(), "runtime": "onnx"})


def test_bad_runtime_is_a_one_line_error(images: Path, tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["extract", str(images), "--out", str(tmp_path / "s"), "--backbone", "tiny_test",
                                 "--runtime", "tensorrt"])
    assert r.exit_code == 2 and r.output.strip().count("\n") == 0, r.output
    assert "'tensorrt' is not one of 'auto', 'torch', 'onnx'" in r.output
    assert not (tmp_path / "s").exists()

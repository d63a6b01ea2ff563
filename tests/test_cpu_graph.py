"""The CPU graph (``--cpu-graph``): the oneDNN TorchScript graph gives eager's vectors, ``auto``
keeps the faster graph only when it is clearly faster and only on long runs, and every run record
says which graph computed its vectors."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from embedder.cli import app
from embedder.embed import batch as embed_batch
from embedder.embed.batch import BatchEmbedder
from embedder.embed.fill import extract
from embedder.embed.options import EmbedOptions, RunOptions
from embedder.models.builder import ModelSpec
from embedder.models.cpu_graph import MIN_GAIN, onednn_graph, pick
from embedder.models.features import fold_batchnorm, set_module
from embedder.models.registry import get_backbone
from embedder.store.shards import Store
from tests.conftest import make_images

TINY = ModelSpec("tiny_test")


def _vectors(store: str) -> np.ndarray:
    t = Store.open(store).read(["id", "embedding"]).sort_by("id")
    return np.stack(t.column("embedding").to_numpy(zero_copy_only=False))


def _runs(store: str) -> list[dict[str, object]]:
    return Store.open(store).manifest()["runs"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("name", ["tiny_test", "mobilenet_v2"])
def test_onednn_graph_gives_eager_outputs_at_every_batch_size(name: str) -> None:
    """A real oneDNN graph (convolutions run as mkldnn ops, not a plain trace), equal to eager within
    fp32 rounding on the traced batch size and on others (a run's last batch is smaller)."""
    entry = get_backbone(name)
    torch.manual_seed(0)
    net = entry.build_architecture()
    set_module(net, entry.head, nn.Identity())
    net = fold_batchnorm(net.eval()).to(memory_format=torch.channels_last)
    size = 64
    example = torch.randn(4, 3, size, size).contiguous(memory_format=torch.channels_last)
    graph = onednn_graph(net, example)
    assert graph is not None
    assert "prim::mkldnn_convolution" in {n.kind() for n in graph.graph.nodes()}  # type: ignore[attr-defined]
    with torch.inference_mode():
        for n in (4, 3, 1):
            x = torch.randn(n, 3, size, size).contiguous(memory_format=torch.channels_last)
            ref, got = net(x), graph(x)
            assert got.shape == ref.shape
            assert float((got - ref).abs().max()) <= 1e-4 * float(ref.abs().max()), (name, n)


def test_a_model_torchscript_cannot_take_stays_eager() -> None:
    class Pair(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x, x

    assert onednn_graph(Pair(), torch.randn(2, 3, 8, 8)) is None


def test_pick_keeps_the_faster_graph_only_when_clearly_faster() -> None:
    def slow() -> None:
        time.sleep(0.02)

    def fast() -> None:
        time.sleep(0.002)

    assert pick(slow, fast).graph == "onednn"
    choice = pick(fast, slow)
    assert choice.graph == "eager" and choice.eager_ms is not None and choice.onednn_ms is not None
    assert choice.onednn_ms > choice.eager_ms
    assert pick(fast, fast).graph == "eager"  # level: eager, the reference
    assert MIN_GAIN > 1


def test_extract_records_the_graph_and_onednn_gives_eager_vectors(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "imgs"
    make_images(src, {"a": 9, "b": 8}, size=(48, 40))
    stores = {}
    for graph in ("eager", "onednn"):
        stores[graph] = str(tmp_path / graph)
        emb = BatchEmbedder(TINY, EmbedOptions(cpu_graph=graph))
        s = extract([str(src)], stores[graph], TINY, EmbedOptions(cpu_graph=graph), RunOptions(batch_size=4),
                    embedder=emb)
        assert s.done == 17
        assert _runs(stores[graph])[-1]["cpu_graph"] == graph
        if graph == "onednn":  # the graph really computes the batches
            assert emb._onednn is not None and emb.model is emb._onednn
        else:
            assert emb.model is emb._eager
    info = CliRunner().invoke(app, ["info", stores["onednn"]])
    assert info.exit_code == 0 and "CPU graph onednn" in info.output, info.output
    eager, onednn = _vectors(stores["eager"]), _vectors(stores["onednn"])
    np.testing.assert_allclose(onednn, eager, rtol=0, atol=1e-5 * float(np.abs(eager).max()))

    # auto on a short run: not timed, eager, and the record says why
    s = extract([str(src)], str(tmp_path / "auto-short"), TINY, EmbedOptions(), RunOptions(batch_size=4))
    run = _runs(str(tmp_path / "auto-short"))[-1]
    assert run["cpu_graph"] == "eager" and "not timed" in str(run["cpu_graph_reason"])

    # auto on a long run (the threshold lowered): both graphs timed on a lane, the faster kept
    monkeypatch.setattr(embed_batch, "AUTO_MIN_BATCHES", 2)
    emb = BatchEmbedder(TINY)
    extract([str(src)], str(tmp_path / "auto"), TINY, EmbedOptions(), RunOptions(batch_size=4, model_lanes=2),
            embedder=emb)
    run = _runs(str(tmp_path / "auto"))[-1]
    timings = run["cpu_graph_ms"]
    assert isinstance(timings, dict) and timings["eager"] > 0 and timings["onednn"] > 0
    faster = "onednn" if timings["eager"] >= MIN_GAIN * timings["onednn"] else "eager"
    assert run["cpu_graph"] == faster
    assert (emb.model is emb._onednn) == (faster == "onednn")
    np.testing.assert_allclose(_vectors(str(tmp_path / "auto")), eager, rtol=0,
                               atol=1e-5 * float(np.abs(eager).max()))


def test_bad_cpu_graph_is_a_one_line_error(tmp_path: Path) -> None:
    src = tmp_path / "imgs"
    make_images(src, {"a": 2})
    r = CliRunner().invoke(app, ["extract", str(src), "--out", str(tmp_path / "s"), "--backbone", "tiny_test",
                                 "--cpu-graph", "jit"])
    assert r.exit_code == 2, r.output
    assert r.output.strip().count("\n") == 0 and "'jit' is not one of 'auto', 'eager', 'onednn'" in r.output
    assert not (tmp_path / "s").exists()

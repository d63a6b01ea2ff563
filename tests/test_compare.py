"""`embedder compare`: the ranking finds the cell that carries the signal, says when a margin is
noise, caches its stores, and refuses bad names in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from embedder.analysis.compare import Cell, CellData, rank, score_cell
from embedder.analysis.options import CompareOptions
from embedder.analysis.transfer import logme, mcnemar, wilson
from embedder.analysis.vectors import load_vectors
from embedder.cli import app
from embedder.learn.options import ProbeOptions
from embedder.learn.probe import Dataset, train_probe
from embedder.learn.selection import stratified_split
from tests.conftest import make_images

runner = CliRunner()


def cell_data(signal: float, seed: int, n: int = 400, dim: int = 32, classes: int = 4) -> CellData:
    """The same 400 labelled images in every cell (as compare has); class signal of strength SIGNAL."""
    y = np.random.default_rng(0).integers(0, classes, n)
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (classes, dim))
    x = (signal * centres[y] + rng.normal(0, 1, (n, dim)) + 2.0).astype(np.float32)
    a, b = stratified_split(y, 0.3, 0)
    return CellData(x[a], y[a], x[b], y[b], [f"c{i}" for i in range(classes)])


def test_ranking_picks_the_layer_that_carries_the_planted_signal() -> None:
    # four "layers" of one backbone; the signal is planted in layer3 only, weakly in layer2
    strengths = {"layer1": 0.0, "layer2": 0.35, "layer3": 1.5, "layer4": 0.1}
    cells = [Cell("b", name, i / 4) for i, name in enumerate(strengths, 1)]
    data = [cell_data(s, seed=i) for i, s in enumerate(strengths.values())]
    options = CompareOptions(backbones=("b",), probe_top=2)
    for c, d in zip(cells, data):
        score_cell(c, d, options)
    by = {c.layer: c for c in cells}
    # both cheap scores order the cells by planted strength
    assert by["layer3"].knn_loo > by["layer2"].knn_loo > by["layer1"].knn_loo  # type: ignore[operator]
    assert by["layer3"].logme > by["layer2"].logme > by["layer1"].logme  # type: ignore[operator]
    board = rank(cells, data, options, "held out", "w")
    assert board.winner == "b layer3" and board.runner_up == "b layer2"
    assert [c.probed for c in board.cells] == [True, True, False, False]  # only the promising two
    assert board.margin is not None and board.margin > 0.1 and board.within_noise is False
    top = board.cells[0]
    assert top.probe_ci is not None and top.probe_ci[0] <= top.probe_accuracy <= top.probe_ci[1]  # type: ignore[operator]
    # the winner's accuracy is the probe's own protocol on that cell, recomputed independently
    d = data[2]
    head = train_probe(Dataset(d.xtr, d.ytr, d.classes, [], [], {}), ProbeOptions()).head
    assert top.probe_accuracy == pytest.approx(float((head.logits(d.xte).argmax(1) == d.yte).mean()))


def test_equal_cells_are_called_within_noise() -> None:
    cells = [Cell("a", "penultimate", 1.0), Cell("b", "penultimate", 1.0)]
    data = [cell_data(0.6, seed=0), cell_data(0.6, seed=0)]
    data[1] = CellData(data[0].xtr + 0.01, data[0].ytr, data[0].xte + 0.01, data[0].yte, data[0].classes)
    for c, d in zip(cells, data):
        score_cell(c, d, CompareOptions(backbones=("a", "b")))
    board = rank(cells, data, CompareOptions(backbones=("a", "b")), "held out", "w")
    assert board.within_noise is True and board.p_value is not None and board.p_value >= 0.05


def test_transfer_statistics() -> None:
    lo, hi = wilson(90, 100)
    assert lo == pytest.approx(0.8256, abs=1e-3) and hi == pytest.approx(0.9448, abs=1e-3)
    a = np.ones(100, bool)
    b = a.copy()
    b[:10] = False
    assert mcnemar(a, b) == pytest.approx(2 / 2 ** 10)  # 10 discordant pairs, all one way
    assert mcnemar(a, a) == 1.0
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 300)
    informative = np.hstack([np.eye(5)[y] * 3 + rng.normal(0, 1, (300, 5)), rng.normal(0, 1, (300, 20))])
    noise = rng.normal(0, 1, (300, 25))
    assert logme(informative, y) > logme(noise, y) + 0.2
    assert logme(informative[:20], y[:20]) > logme(noise[:20], y[:20])  # n < d path


def test_end_to_end_cached_and_consistent(tmp_path: Path) -> None:
    imgs = tmp_path / "imgs"
    make_images(imgs, {"a": 15, "b": 15, "c": 15})
    work = tmp_path / "work"
    args = ["compare", str(imgs), "--backbones", "tiny_test", "--layers", "stem,stage1,penultimate",
            "--work", str(work), "--probe-top", "2", "--json"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    board = json.loads(r.output)
    cells = {c["layer"]: c for c in board["cells"]}
    assert set(cells) == {"stem", "stage1", "penultimate"}
    assert sum(c["probed"] for c in board["cells"]) == 2
    assert cells["stem"]["dim"] == 8 and cells["stage1"]["dim"] == 16 and cells["penultimate"]["dim"] == 32
    assert all(c["gflops"] is not None and c["images_per_second"] for c in board["cells"])
    assert (work / "accuracy_vs_depth.png").stat().st_size > 5000 and (work / "accuracy_vs_speed.png").exists()
    assert json.loads((work / "leaderboard.json").read_text())["winner"] == board["winner"]
    # each cell is an ordinary store with the layer in its provenance
    stem = load_vectors(work / "tiny_test" / "stem" / "train")
    assert stem.provenance.layer == "stem" and len(stem) == 45
    # a second run embeds nothing and gives the same board
    mtimes = {p: p.stat().st_mtime for p in work.rglob("part-*.parquet")}
    r2 = runner.invoke(app, args)
    assert r2.exit_code == 0, r2.output
    again = json.loads(r2.output)
    assert {p: p.stat().st_mtime for p in work.rglob("part-*.parquet")} == mtimes
    strip = lambda b: [{k: v for k, v in c.items() if k not in ("seconds",)} for c in b["cells"]]  # noqa: E731
    assert strip(again) == strip(board)


def test_bad_names_one_line(tmp_path: Path) -> None:
    imgs = tmp_path / "imgs"
    make_images(imgs, {"a": 4, "b": 4})
    r = runner.invoke(app, ["compare", str(imgs), "--backbones", "resnet5O", "--work", str(tmp_path / "w")])
    assert r.exit_code == 2 and "unknown backbone" in r.output and "resnet50" in r.output
    r = runner.invoke(app, ["compare", str(imgs), "--backbones", "tiny_test", "--layers", "stage9",
                            "--work", str(tmp_path / "w")])
    assert r.exit_code == 2 and "no layer 'stage9'" in r.output and "stage1" in r.output
    assert not (tmp_path / "w").exists()  # names are checked before any work
    flat = tmp_path / "flat"
    make_images(flat, {"": 6})
    r = runner.invoke(app, ["compare", str(flat), "--backbones", "tiny_test", "--work", str(tmp_path / "w2")])
    assert r.exit_code == 2 and "labelled images" in r.output and r.output.count("\n") == 1
    assert not (tmp_path / "w2").exists()  # refused before embedding anything


@pytest.mark.slow
def test_gflops_counted_up_to_the_layer_match_torchvision() -> None:
    """Multiply-adds counted by torch agree with torchvision's published figure for the whole
    MobileNetV2 (0.30 GFLOPS), and a tap halfway costs less."""
    from embedder.analysis.compare import _gflops
    from embedder.embed.batch import BatchEmbedder
    from embedder.models.builder import ModelSpec
    from embedder.models.hub import import_weights
    from tests.conftest import mobilenet_weights_file

    import_weights(mobilenet_weights_file())
    full = _gflops(BatchEmbedder(ModelSpec("mobilenet_v2", "IMAGENET1K_V1")))
    assert full == pytest.approx(0.301, rel=0.03)
    half = _gflops(BatchEmbedder(ModelSpec("mobilenet_v2", "IMAGENET1K_V1", None, "features.7")))
    assert 0.05 < half < full * 0.6


def test_a_rerun_with_other_images_ranks_only_those(tmp_path: Path) -> None:
    """The cells' stores are a cache shared by runs with the same --work: a second run with other
    images embeds them, and ranks them alone (never the union with the first run's)."""
    first, second = tmp_path / "first", tmp_path / "second"
    make_images(first, {"a": 15, "b": 15, "c": 15})
    make_images(second, {"a": 6, "b": 6, "c": 6}, seed=9)
    work = tmp_path / "work"
    base = ["--backbones", "tiny_test", "--layers", "penultimate", "--work", str(work), "--json"]
    r = runner.invoke(app, ["compare", str(first), *base])
    assert r.exit_code == 0, r.output
    one = json.loads(r.output)
    assert one["n_train"] + one["n_test"] == 45
    r = runner.invoke(app, ["compare", str(second), *base])
    assert r.exit_code == 0, r.output
    two = json.loads(r.output)
    assert two["n_train"] + two["n_test"] == 18  # not 63
    assert len(load_vectors(work / "tiny_test" / "penultimate" / "train")) == 63  # the cache keeps both
    assert not list(work.rglob(".cell.json.tmp"))

"""`embedder compare`: which backbone and layer transfer best to the user's own labelled images.

Each backbone × layer is extracted into its own store under WORK (cached and resumable: the
stores are ordinary embedder stores, a second run only embeds what is missing), scored cheaply on
train (leave-one-out kNN accuracy, LogME), the most promising cells get the full linear probe
(the probe's own protocol) on the test images, and the leaderboard says who wins and whether the
margin is more than noise (exact McNemar test on the shared test images).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embedder.analysis.options import PENULTIMATE, CompareOptions
from embedder.errors import InspectError
from embedder.store.labels import LabelJoin

SAFE = re.compile(r"[^A-Za-z0-9._@-]")


@dataclass
class Cell:
    backbone: str  # registry spec, e.g. mobilenet_v2:IMAGENET1K_V1
    layer: str
    depth: float  # position of the layer in the forward pass, 0..1 (penultimate = 1)
    dim: int = 0
    images_per_second: float | None = None  # extraction on this machine (the run that embedded them)
    gflops: float | None = None  # multiply-adds per image up to this layer, torchvision's convention
    knn_loo: float | None = None  # leave-one-out kNN accuracy on train
    logme: float | None = None
    probed: bool = False
    probe_accuracy: float | None = None  # on the test images
    probe_ci: tuple[float, float] | None = None  # Wilson 95 % interval from the test size
    knn_accuracy: float | None = None  # kNN (k = knn_k) on the test images
    seconds: float = 0.0
    _correct: Any = field(default=None, repr=False)


@dataclass
class Leaderboard:
    cells: list[Cell]
    test: str  # "given" or "held out 20 % of train"
    n_train: int
    n_test: int
    winner: str | None
    runner_up: str | None
    margin: float | None
    p_value: float | None
    within_noise: bool | None
    work: str
    labels: dict[str, Any] | None = None  # the labels file behind the labels (``Joined.to_dict()``)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for c in d["cells"]:
            c.pop("_correct", None)
        return d


def cell_dir(work: Path, backbone: str, layer: str) -> Path:
    return work / SAFE.sub("_", backbone.replace(":", "@")) / SAFE.sub("_", layer)


def plan_cells(options: CompareOptions) -> list[Cell]:
    """Validate every backbone and layer name before any work (unknown names list the valid ones)."""
    from embedder.models.layers import check_layer, layer_depth, suggested_layers
    from embedder.models.registry import parse_backbone_spec

    if not options.backbones:
        raise InspectError("--backbones names at least one backbone (see `embedder backbones`)")
    cells = []
    for spec in options.backbones:
        entry, _ = parse_backbone_spec(spec)
        # stages up to the pooled features: pooling, dropout and the head only repeat the penultimate
        stages = [n for n in suggested_layers(entry.name)
                  if not (entry.head == n or entry.head.startswith(n + ".")
                          or any(w in n.lower() for w in ("pool", "dropout", "flatten")))]
        wanted = list(options.layers)
        if "all" in wanted:
            wanted = stages + [PENULTIMATE]
        for layer in dict.fromkeys(wanted):
            if layer != PENULTIMATE:
                check_layer(entry.name, layer)  # an unknown name lists the stage-level layers
            cells.append(Cell(spec, layer, 1.0 if layer == PENULTIMATE else layer_depth(entry.name, layer)))
    return cells


def _gflops(embedder: Any) -> float:
    """Multiply-adds of one image through the (truncated) model, counted by torch's FlopCounterMode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    size = embedder.loaded.preprocessing.crop_size
    model = embedder.loaded.model.to("cpu").float()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, size, size))
    return round(counter.get_total_flops() / 2 / 1e9, 3)


def _extract_cell(cell: Cell, sources: list[str], test_sources: list[str] | None, work: Path,
                  options: CompareOptions, progress: Callable[[str, int, int, int], None] | None) -> None:
    from embedder.embed.batch import BatchEmbedder
    from embedder.embed.fill import extract
    from embedder.embed.options import EmbedOptions, RunOptions
    from embedder.models.builder import ModelSpec
    from embedder.models.registry import parse_backbone_spec

    d = cell_dir(work, cell.backbone, cell.layer)
    d.mkdir(parents=True, exist_ok=True)
    meta_file = d / "cell.json"
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    entry, tag = parse_backbone_spec(cell.backbone)
    spec = ModelSpec(entry.name, tag, None, None if cell.layer == PENULTIMATE else cell.layer)
    embedder = BatchEmbedder(spec, EmbedOptions(device=options.device))
    run = RunOptions(batch_size=options.batch_size)
    label = f"{cell.backbone} {cell.layer}"
    for split, srcs in (("train", sources), ("test", test_sources)):
        if not srcs:
            continue

        def tick(total: int, advanced: int, failed: int, split: str = split) -> None:
            if progress:
                progress(f"{label} ({split})", total, advanced, failed)

        summary = extract(srcs, str(d / split), spec, EmbedOptions(device=options.device), run, tick,
                          embedder=embedder)
        if split == "train" and summary.done >= 16:  # too few images measure start-up, not speed
            meta["images_per_second"] = round(summary.images_per_second, 1)
            meta["device"] = summary.device
    if "gflops" not in meta:
        meta["gflops"] = _gflops(embedder)
    tmp = meta_file.with_name(".cell.json.tmp")
    tmp.write_text(json.dumps(meta))
    tmp.replace(meta_file)  # never half a file for the next run to read
    cell.images_per_second = meta.get("images_per_second")
    cell.gflops = meta["gflops"]


@dataclass
class CellData:
    xtr: np.ndarray
    ytr: np.ndarray
    xte: np.ndarray
    yte: np.ndarray
    classes: list[str]


def _cell_data(d: Path, has_test: bool, sources: list[str], options: CompareOptions,
               train_ids: list[str] | None = None, test_ids: list[str] | None = None,
               labels: LabelJoin | None = None) -> CellData:
    """The cell's vectors of this run's images only: a cell's stores are a cache shared by every run
    with the same WORK, and may hold images an earlier run was given (TRAIN_IDS / TEST_IDS, the ids
    of this run's sources, select them; None takes everything). LABELS: a labels file's join, put
    over the folders' labels (counted once, on the sources, by ``compare``)."""
    from embedder.analysis.vectors import load_vectors

    tr = load_vectors(d / "train", options.label_column, labels=labels, count=False)
    if train_ids is not None:
        _keep_only(tr, train_ids)
    if (tr.y >= 0).sum() == 0:
        raise InspectError(f"compare needs labelled images (one folder per class, or --labels FILE); "
                           f"{sources[0]} has none")
    if len(tr.classes) < 2:
        raise InspectError(f"compare needs at least 2 classes, found one ({tr.classes[0]})")
    keep = tr.y >= 0
    # rows in a fixed order (by id) so that every cell sees the same split and the same test images
    order = np.argsort(np.asarray(tr.ids.to_pylist(), dtype=object)[keep], kind="stable")
    x, y = tr.x[keep][order], tr.y[keep][order]
    if has_test:
        te = load_vectors(d / "test", options.label_column, classes=tr.classes, labels=labels, count=False)
        if test_ids is not None:
            _keep_only(te, test_ids)
        tk = te.y >= 0
        t_order = np.argsort(np.asarray(te.ids.to_pylist(), dtype=object)[tk], kind="stable")
        return CellData(x, y, te.x[tk][t_order], te.y[tk][t_order], tr.classes)
    from embedder.learn.selection import stratified_split

    a, b = stratified_split(y, options.test_fraction, options.seed)
    return CellData(x[a], y[a], x[b], y[b], tr.classes)


def _keep_only(v: Any, ids: list[str]) -> None:
    """Mark rows whose id is not in IDS as unlabelled (y = -1): they take part in nothing."""
    import pyarrow as pa
    import pyarrow.compute as pc

    inside = pc.is_in(v.ids, value_set=pa.array(ids, pa.string())).to_numpy(zero_copy_only=False)
    v.y = np.where(np.asarray(inside, bool), v.y, -1)


def score_cell(cell: Cell, data: CellData, options: CompareOptions) -> None:
    """The cheap scores: leave-one-out kNN and LogME on train, kNN accuracy on test."""
    from embedder.analysis.knn import knn_graph
    from embedder.analysis.labels import knn_accuracy
    from embedder.analysis.transfer import logme
    from embedder.learn.probe import knn_predict

    cell.dim = data.xtr.shape[1]
    unit = data.xtr / np.maximum(np.linalg.norm(data.xtr, axis=1, keepdims=True), 1e-12)
    cell.knn_loo = knn_accuracy(knn_graph(unit.astype(np.float32), options.knn_k), data.ytr)
    cell.logme = logme(data.xtr, data.ytr)
    scores = knn_predict(data.xtr, data.ytr, data.xte, len(data.classes), options.knn_k)
    cell.knn_accuracy = float((scores.argmax(1) == data.yte).mean()) if len(data.yte) else None


def rank(cells: list[Cell], data: list[CellData], options: CompareOptions, test: str, work: str,
         status: Callable[[str], None] | None = None) -> Leaderboard:
    """Probe the most promising cells (mean rank of the two cheap scores), order the board, and
    say whether the winner's margin over the runner-up is more than noise."""
    from embedder.analysis.transfer import mcnemar, wilson
    from embedder.learn.options import ProbeOptions
    from embedder.learn.probe import Dataset, train_probe

    say = status or (lambda _m: None)
    rank_knn = np.argsort(np.argsort([-(c.knn_loo or 0) for c in cells], kind="stable"), kind="stable")
    rank_logme = np.argsort(np.argsort([-(c.logme if c.logme is not None else -np.inf) for c in cells],
                                       kind="stable"), kind="stable")
    promising = np.argsort(rank_knn + rank_logme, kind="stable")[:max(1, options.probe_top)]
    for i in promising:
        cell, d = cells[int(i)], data[int(i)]
        say(f"probing {cell.backbone} {cell.layer}")
        result = train_probe(Dataset(d.xtr, d.ytr, d.classes, [], [], {}), ProbeOptions(seed=options.seed))
        correct = result.head.logits(d.xte).argmax(1) == d.yte
        cell.probed = True
        cell._correct = correct
        cell.probe_accuracy = float(correct.mean()) if len(d.yte) else None
        cell.probe_ci = wilson(int(correct.sum()), len(d.yte))
    # ties go to the cheaper cell: fewer multiply-adds, then fewer dimensions
    order = sorted(range(len(cells)), key=lambda i: (not cells[i].probed, -(cells[i].probe_accuracy or 0),
                                                     -(cells[i].knn_loo or 0), cells[i].gflops or 0.0,
                                                     cells[i].dim))
    board_cells = [cells[i] for i in order]
    probed = [c for c in board_cells if c.probed]
    winner = f"{probed[0].backbone} {probed[0].layer}" if probed else None
    runner = margin = p = noise = None
    if len(probed) > 1:
        runner = f"{probed[1].backbone} {probed[1].layer}"
        margin = float((probed[0].probe_accuracy or 0) - (probed[1].probe_accuracy or 0))
        if len(probed[0]._correct) == len(probed[1]._correct):  # the same test images (always, from compare)
            p = mcnemar(probed[0]._correct, probed[1]._correct)
            noise = p >= 0.05
    return Leaderboard(board_cells, test, len(data[0].ytr) if data else 0, len(data[0].yte) if data else 0,
                       winner, runner, margin, p, noise, work)


def compare(sources: list[str], work: str, options: CompareOptions, test_sources: list[str] | None = None,
            progress: Callable[[str, int, int, int], None] | None = None,
            status: Callable[[str], None] | None = None, labels_file: LabelJoin | None = None) -> Leaderboard:
    """LABELS_FILE: a labels file's join, its labels put over the folders' by image id (train and
    test), checked on the sources before anything is embedded."""
    import pyarrow as pa

    from embedder.io.sources import discover

    say = status or (lambda _m: None)
    cells = plan_cells(options)
    refs = discover(sources)
    test_refs = discover(test_sources) if test_sources else []
    train_ids = [r.id for r in refs]
    test_ids = [r.id for r in test_refs] if test_sources else None
    given = [r.label for r in refs]
    joined = None
    if labels_file is not None:
        given = labels_file.apply(pa.array(train_ids, pa.string()), pa.array(given, pa.string())).to_pylist()
        if test_refs:
            labels_file.apply(pa.array([r.id for r in test_refs], pa.string()),
                              pa.array([r.label for r in test_refs], pa.string()))
        joined = labels_file.require_some(", ".join(sources + (test_sources or [])))
        say(joined.summary("the images"))
    labels = {g for g in given if g}
    del refs, test_refs
    if not labels:
        raise InspectError(f"compare needs labelled images (one folder per class, or --labels FILE); "
                           f"{sources[0]} has none")
    if len(labels) < 2:
        raise InspectError(f"compare needs at least 2 classes, found one ({labels.pop()})")
    wd = Path(work)
    wd.mkdir(parents=True, exist_ok=True)
    data = []
    for cell in cells:
        t0 = time.perf_counter()
        _extract_cell(cell, sources, test_sources, wd, options, progress)
        d = _cell_data(cell_dir(wd, cell.backbone, cell.layer), bool(test_sources), sources, options,
                       train_ids, test_ids, labels_file)
        score_cell(cell, d, options)
        data.append(d)
        cell.seconds = round(time.perf_counter() - t0, 1)
        say(f"{cell.backbone} {cell.layer}: kNN (leave-one-out) {cell.knn_loo:.3f}, LogME {cell.logme:.3f}")
    test = "given" if test_sources else f"held out {options.test_fraction:.0%} of train"
    board = rank(cells, data, options, test, str(wd), say)
    board.labels = joined.to_dict() if joined is not None else None
    (wd / "leaderboard.json").write_text(json.dumps(board.to_dict(), indent=1))
    plot(board, wd)
    return board


def plot(board: Leaderboard, work: Path) -> None:
    """accuracy_vs_depth.png (per backbone) and accuracy_vs_speed.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def acc(c: Cell) -> float:
        return c.probe_accuracy if c.probe_accuracy is not None else (c.knn_accuracy or 0.0)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for bb in dict.fromkeys(c.backbone for c in board.cells):
        cs = sorted((c for c in board.cells if c.backbone == bb), key=lambda c: c.depth)
        ax.plot([c.depth for c in cs], [c.knn_accuracy or 0 for c in cs], "o--", alpha=0.5, label=f"{bb} kNN")
        pc = [c for c in cs if c.probed]
        if pc:
            ax.plot([c.depth for c in pc], [acc(c) for c in pc], "s-", label=f"{bb} probe")
        for c in cs:
            ax.annotate(c.layer, (c.depth, c.knn_accuracy or 0), fontsize=7, alpha=0.7)
    ax.set_xlabel("layer depth (position in the forward pass; penultimate = 1)")
    ax.set_ylabel(f"test accuracy ({board.n_test} images)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(work / "accuracy_vs_depth.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c in board.cells:
        if c.images_per_second:
            ax.scatter(c.images_per_second, acc(c), marker="s" if c.probed else "o")
            ax.annotate(f"{c.backbone} {c.layer}", (c.images_per_second, acc(c)), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("extraction images/s on this machine")
    ax.set_ylabel("test accuracy (probe ■, kNN ●)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(work / "accuracy_vs_speed.png", dpi=120)
    plt.close(fig)

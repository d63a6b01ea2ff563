"""Linear probes on frozen features, measured the way the CLIP and DINOv2 papers do.

Multinomial logistic regression; C chosen on held-out predictions over a log grid from 1e-6 to 1e5
(coarse decades, then a refinement around the best, warm-started along the path): a stratified
validation split when it holds enough images, stratified K-fold on all of train when it does not,
near-ties broken by log-loss (``embedder.learn.selection``); refit on all of train with the best C. A
temperature-weighted cosine kNN is the second baseline. The probe file is safetensors (arrays) plus
JSON metadata: loading it never executes code.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embedder.errors import ProbeError
from embedder.learn.logreg import CHUNK_ROWS, ArrayRows, RowSource
from embedder.learn.options import ProbeOptions
from embedder.learn.selection import Selection, SelectOptions, fit_all, select_c, sweep_steps
from embedder.models.heads import LinearHead
from embedder.sizes import default_budget
from embedder.store.labels import LabelJoin
from embedder.store.provenance import Provenance
from embedder.store.shards import Store

log = logging.getLogger(__name__)

PROBE_KEY = "embedder_probe"
PROBE_FORMAT = "embedder-probe/1"
BACKENDS = ("auto", "torch")  # the solver is embedder's float32 L-BFGS (``logreg``), on CPU or CUDA


@dataclass
class Dataset:
    x: np.ndarray | RowSource  # float32 rows in memory, or streamed from the store (``StoreRows``)
    y: np.ndarray  # int class indices (-1: a class outside ``classes``)
    classes: list[str]
    ids: Any  # Arrow array or list of the rows' ids
    paths: Any
    provenance: dict[str, Any]
    dropped_unlabelled: int = 0
    unseen: list[str] = field(default_factory=list)  # labels absent from the given class list (y = -1)
    from_file: np.ndarray | None = None  # per row: its label is a labels file's (--labels), not the store's
    store: str = ""  # where the vectors are (the weights file its manifest remembers: store.remembered)

    @property
    def dim(self) -> int:
        return int(self.x.shape[1]) if isinstance(self.x, np.ndarray) else self.x.dim


class StoreRows:
    """A store's labelled rows streamed record batch by record batch on every pass (a ``RowSource``):
    what the probe reads when the vectors are larger than its memory budget."""

    def __init__(self, store: Store, keep: np.ndarray, batch_rows: int = CHUNK_ROWS) -> None:
        self.store, self.keep, self.batch_rows = store, keep, batch_rows
        self.n, self.dim = int(keep.sum()), store.dim
        self.reads = 0
        # the shards as loaded (every pass reads the same ones) and their footers once read
        self.footers: dict[str, Any] = {loc: None for loc in store.shard_files()}

    def chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        self.reads += 1
        row = at = 0
        for block in self.store.iter_embeddings(self.batch_rows, self.footers):
            sel = self.keep[row:row + len(block)]
            row += len(block)
            if not sel.all():
                block = block[sel]
            if len(block):
                require_finite(block, at, self.store.root)
                yield at, block
                at += len(block)
        if at != self.n:
            raise ProbeError(f"{self.store.root} changed while the probe was reading it; rerun")


@dataclass
class ProbeResult:
    head: LinearHead
    classes: list[str]
    C: float
    standardize: bool
    val_accuracy: float | None  # None: nothing was held out (one image a class, C not chosen)
    sweep: list[dict[str, Any]]
    n_train: int
    metrics: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    backend: str = "torch-cpu"
    seconds: float = 0.0
    selection: str = ""  # how C was chosen, and on how many images
    n_select: int = 0
    select_seconds: float = 0.0  # of ``seconds``: choosing C
    refit_seconds: float = 0.0  # of ``seconds``: the refit on all of train
    labels: dict[str, Any] | None = None  # the labels file behind it (``Joined.to_dict()``): path, sha256, counts
    curve: dict[str, Any] | None = None  # accuracy against the number of labels (``learn.curve``)
    store: str = ""  # the training store (the weights file its manifest remembers: store.remembered)


def load_dataset(store_path: str, label_column: str = "label", classes: list[str] | None = None,
                 memory_budget: int | None = None, labels: LabelJoin | None = None) -> Dataset:
    """A store's labelled rows. Their vectors are one float32 matrix (filled record batch by record
    batch: no Arrow copy beside it, never float64) unless that matrix would exceed MEMORY_BUDGET
    bytes (default: a quarter of RAM); then they are streamed from the store on every pass
    (``StoreRows``). LABELS: a labels file's join, its labels put over the store's by id (the
    caller reads ``labels.result()`` once every store it applies to is loaded)."""
    import pyarrow.compute as pc

    store = Store.open(store_path)
    names = store.dataset().schema.names
    has_column = label_column in names
    if not has_column and labels is None:
        raise ProbeError(f"{store_path} has no column {label_column!r}; columns: "
                         f"{', '.join(n for n in names if n != 'embedding')}")
    t = store.read(["id", "path"] + ([label_column] if has_column else []))
    if not t.num_rows:
        raise ProbeError(f"{store_path} is empty: extract images into it first")
    own = t.column(label_column).cast("string").combine_chunks() if has_column else None
    if labels is not None:
        lab = labels.apply(t.column("id"), own)
        in_file = np.asarray(pc.is_in(t.column("id").cast("string"), value_set=labels.file.ids)
                             .to_numpy(zero_copy_only=False), bool)
    else:
        lab, in_file = own, None
    assert lab is not None
    keep = np.asarray(pc.and_(pc.is_valid(lab), pc.not_equal(lab, "")).fill_null(False), bool)
    if not keep.any():
        if labels is not None:
            labels.require_some(store_path)  # none of the file's ids is here: that is the error
            raise ProbeError(f"{store_path} has no labelled rows: neither {labels.file.path} nor its "
                             f"{label_column!r} column labels any of them")
        raise ProbeError(f"{store_path} has no labels in {label_column!r}: put images in one "
                         "subfolder per class (ImageFolder) or extract from a list with a label column, "
                         "or give --labels FILE (id,label)")
    rows = np.flatnonzero(keep)
    encoded = lab.take(rows).dictionary_encode()
    names_here = [str(v) for v in encoded.dictionary.to_pylist()]
    known = classes or sorted(set(names_here))
    index = {c: i for i, c in enumerate(known)}
    lut = np.array([index.get(v, -1) for v in names_here], np.int64)
    y = lut[encoded.indices.to_numpy(zero_copy_only=False)]
    n = len(rows)
    budget = default_budget() if memory_budget is None else memory_budget
    if n * store.dim * 4 > budget:
        # a pass reads record batches of about an eighth of the budget
        batch = int(np.clip(budget // (8 * store.dim * 4), 1024, CHUNK_ROWS))
        x: np.ndarray | RowSource = StoreRows(store, keep, batch)
        log.info("probe: %d x %d vectors exceed the memory budget (%d MB): streamed from the store",
                 n, store.dim, budget >> 20)
    else:
        x = store.read_embeddings(keep)
        require_finite(x, 0, store_path)
    return Dataset(x, y, known, t.column("id").take(rows), t.column("path").take(rows),
                   store.provenance.to_dict(), dropped_unlabelled=t.num_rows - n,
                   unseen=sorted(set(names_here) - set(known)),
                   from_file=in_file[rows] if in_file is not None else None, store=str(store_path))


def select_options(options: ProbeOptions, criterion: str = "accuracy") -> SelectOptions:
    """The selection's settings from a probe's (one place: probe, finetune, inspect, compare)."""
    return SelectOptions(c_min_exp=options.c_min_exp, c_max_exp=options.c_max_exp, refine=options.refine,
                         val_fraction=options.val_fraction, min_val_rows=options.min_val_rows,
                         folds=options.folds, seed=options.seed, standardize=options.standardize,
                         criterion=criterion, max_iter=options.max_iter, device=solver_device(options))


def solver_device(options: ProbeOptions) -> str:
    """Where the solver runs: CUDA when asked or (auto) present, else the CPU."""
    if options.backend not in BACKENDS:
        raise ProbeError(f"unknown backend {options.backend!r}; valid: {', '.join(BACKENDS)}")
    if options.device not in ("auto", "cpu") or options.backend == "torch":
        from embedder.models.devices import resolve_device

        return str(resolve_device(options.device))
    if options.device == "cpu":
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def train_probe(train: Dataset, options: ProbeOptions = ProbeOptions(),
                progress: Callable[[int, int, str], None] | None = None) -> ProbeResult:
    """C and standardisation chosen on held-out predictions (``selection.select_c``: a split when it
    is large, K-fold on all of train when it is not), then refit on all of train, warm-started from
    the chosen folds' mean. ``train.x`` is a float32 array or a ``logreg.RowSource`` (streamed)."""
    t0 = time.perf_counter()
    counts = np.bincount(train.y[train.y >= 0], minlength=len(train.classes))
    if len(train.classes) < 2 or (counts > 0).sum() < 2:
        raise ProbeError(f"need at least 2 classes to train a probe, found {len(train.classes)} "
                         f"({', '.join(train.classes)})")
    sel_opts = select_options(options)
    total = sweep_steps(train.y, sel_opts) + 1
    done = 0

    def tick(n: int, desc: str = "C sweep") -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total, desc)

    x = np.asarray(train.x, np.float32) if isinstance(train.x, np.ndarray) else train.x
    if isinstance(x, np.ndarray):
        require_finite(x, 0, "the training vectors")
    if counts.max() < 2:
        return _one_a_class(x, train, sel_opts, counts, t0, tick)
    chosen: Selection = select_c(x, train.y, len(train.classes), sel_opts, tick)
    t_refit = time.perf_counter()
    head, sol = fit_all(x, train.y, len(train.classes), chosen.C, chosen.standardize, chosen.solution, sel_opts,
                        chosen.history, chosen.eig)
    tick(1, "refit")
    log.info("probe: %s; refit %d iterations", chosen.describe(), int(sol.iterations[0]))
    if not sol.converged.all():  # at a very large C on separable vectors float32 cannot resolve the optimum
        log.info("probe: the refit at C=%.3g stopped before its gradient test (%d iterations; "
                    "float32's resolution or max_iter): the head is usable, the optimum is not exact",
                    chosen.C, int(sol.iterations.max()))
    return ProbeResult(head, train.classes, chosen.C, chosen.standardize, chosen.accuracy, chosen.sweep,
                       int((train.y >= 0).sum()), provenance=train.provenance, backend=f"torch-{sel_opts.device}",
                       seconds=time.perf_counter() - t0, selection=chosen.describe(), n_select=chosen.n_rows,
                       select_seconds=chosen.seconds, refit_seconds=time.perf_counter() - t_refit,
                       store=getattr(train, "store", ""))


def _one_a_class(x: np.ndarray | RowSource, train: Dataset, sel_opts: SelectOptions, counts: np.ndarray,
                 t0: float, tick: Callable[[int, str], None]) -> ProbeResult:
    """One labelled image a class (``embedder select``'s aim: a first round of one typical image a
    class): nothing can be held out to choose C, so scikit-learn's default C=1 on the raw vectors, as
    the learning curve's first point and the frozen probe of ``finetune`` do; no validation accuracy."""
    from embedder.learn.selection import DEFAULT_C

    t_refit = time.perf_counter()
    head, _ = fit_all(x, train.y, len(train.classes), DEFAULT_C, False, None, sel_opts)
    tick(1, "refit")
    n = int((train.y >= 0).sum())
    why = (f"C={DEFAULT_C:g} (scikit-learn's default), not chosen: one labelled image a class "
           f"({int((counts > 0).sum())} classes), none to hold out")
    log.info("probe: %s", why)
    return ProbeResult(head, train.classes, DEFAULT_C, False, None, [], n, provenance=train.provenance,
                       backend=f"torch-{sel_opts.device}", seconds=time.perf_counter() - t0, selection=why,
                       n_select=0, select_seconds=0.0, refit_seconds=time.perf_counter() - t_refit,
                       store=getattr(train, "store", ""))


def require_finite(x: np.ndarray, first: int, where: str) -> None:
    """A NaN or an infinity in the vectors would make every fit NaN: say which row, once."""
    for s in range(0, len(x), 8192):  # in blocks: a boolean copy of the whole matrix is a quarter of it
        bad = ~np.isfinite(x[s:s + 8192]).all(1)
        if bad.any():
            raise ProbeError(f"{where}: labelled row {first + s + int(np.flatnonzero(bad)[0])} has a NaN or "
                             "infinite value in its vector; re-extract it or drop it from the store")


def as_rows(x: np.ndarray | RowSource) -> RowSource:
    return ArrayRows(np.asarray(x, np.float32)) if isinstance(x, np.ndarray) else x


def knn_predict(xtr: np.ndarray | RowSource, ytr: np.ndarray, xte: np.ndarray | RowSource, n_classes: int,
                k: int = 20, temperature: float = 0.07, test_chunk: int = 2048) -> np.ndarray:
    """DINOv2's kNN: cosine, votes weighted by exp(sim / T). Returns class scores [n_test, classes].
    Train and test are in memory or streamed: the train rows' norms are taken once (no normalised
    copy), and each block of test rows keeps its k best across the train chunks."""
    train, test = as_rows(xtr), as_rows(xte)
    k = min(k, train.n)
    norms = np.empty(train.n, np.float32)
    for start, a in train.chunks():
        norms[start:start + len(a)] = np.maximum(np.linalg.norm(a, axis=1), 1e-12)
    scores = np.zeros((test.n, n_classes), np.float64)
    for t0, block in test.chunks():
        for s in range(0, len(block), test_chunk):
            b = block[s:s + test_chunk]
            b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
            m = len(b)
            best_s = np.full((m, 0), -np.inf, np.float32)
            best_i = np.zeros((m, 0), np.int64)
            for start, a in train.chunks():
                sims = b @ a.T
                sims /= norms[start:start + len(a)]
                sims[:, ytr[start:start + len(a)] < 0] = -np.inf  # rows without a class never vote
                kk = min(k, sims.shape[1])
                top = np.argpartition(-sims, kk - 1, axis=1)[:, :kk] if sims.shape[1] > kk else \
                    np.broadcast_to(np.arange(kk), (m, kk))
                chunk_s = np.take_along_axis(sims, top, 1)  # this chunk's k best, then merged with the k so far
                del sims
                cand_s = np.concatenate([best_s, chunk_s], 1)
                cand_i = np.concatenate([best_i, top + start], 1)
                keep = np.argpartition(-cand_s, k - 1, axis=1)[:, :k] if cand_s.shape[1] > k else \
                    np.broadcast_to(np.arange(cand_s.shape[1]), cand_s.shape)
                best_s = np.take_along_axis(cand_s, keep, 1)
                best_i = np.take_along_axis(cand_i, keep, 1)
            w = np.where(np.isfinite(best_s), np.exp(best_s.astype(np.float64) / temperature), 0.0)
            best_i = np.where(np.isfinite(best_s), best_i, np.flatnonzero(ytr >= 0)[0])
            flat = (np.arange(m)[:, None] * n_classes + ytr[best_i]).ravel()
            at = t0 + s
            scores[at:at + m] = np.bincount(flat, weights=w.ravel(), minlength=m * n_classes).reshape(m, n_classes)
    return scores


def evaluate(head: LinearHead, classes: list[str], x: np.ndarray | RowSource, y: np.ndarray) -> dict[str, Any]:
    """Accuracy, balanced accuracy, per-class precision/recall/F1, confusion and top-5 on the rows
    with a known class (y >= 0), predicted block by block."""
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix, precision_recall_fscore_support

    pred = np.empty(len(y), np.int64)
    top5_hit = np.zeros(len(y), bool)
    for start, block in as_rows(x).chunks():
        proba = head.proba(block)
        yy = y[start:start + len(block)]
        pred[start:start + len(block)] = proba.argmax(1)
        if len(classes) > 5:
            top5_hit[start:start + len(block)] = (np.argsort(-proba, axis=1)[:, :5] == yy[:, None]).any(1)
    known = y >= 0
    pred, yk, top5_hit = pred[known], y[known], top5_hit[known]
    labels = list(range(len(classes)))
    p, r, f, sup = precision_recall_fscore_support(yk, pred, labels=labels, zero_division=0)
    out: dict[str, Any] = {
        "accuracy": float((pred == yk).mean()),
        "balanced_accuracy": float(balanced_accuracy_score(yk, pred)),
        "per_class": {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                          "support": int(sup[i])} for i, c in enumerate(classes)},
        "confusion_matrix": confusion_matrix(yk, pred, labels=labels).tolist(),
    }
    if len(classes) > 5:
        out["top5_accuracy"] = float(top5_hit.mean())
    return out


def check_compatible(train: Dataset, test: Dataset) -> None:
    if train.dim != test.dim:
        raise ProbeError(f"train vectors have dim {train.dim}, test vectors {test.dim}: "
                         "embed both with the same backbone and layer")
    a, b = Provenance.from_dict(train.provenance), Provenance.from_dict(test.provenance)
    diff = a.differences(b, Provenance.COMPARABLE)
    if diff:
        raise ProbeError(f"train and test stores were embedded differently ({diff[0]} differs); "
                         "re-extract the test images with the train store's settings")


# ---- the probe file --------------------------------------------------------------------------
def load_test(path: str, train: Dataset, label_column: str = "label",
              memory_budget: int | None = None, labels: LabelJoin | None = None) -> Dataset:
    """A test store for a trained probe: embedded as train was (else an error), its rows of
    classes train never saw left out of every metric (named in ``.unseen``). LABELS: the same
    labels file as train's (an id of the file found here labels this row)."""
    test = load_dataset(path, label_column, train.classes, memory_budget, labels)
    check_compatible(train, test)
    if test.unseen and isinstance(test.x, np.ndarray):
        keep = test.y >= 0
        test.x, test.y = test.x[keep], test.y[keep]
        test.ids, test.paths = test.ids.filter(pa_mask(keep)), test.paths.filter(pa_mask(keep))
        if test.from_file is not None:
            test.from_file = test.from_file[keep]
    return test


def pa_mask(keep: np.ndarray) -> Any:
    import pyarrow as pa

    return pa.array(keep, pa.bool_())


def test_metrics(result: ProbeResult, train: Dataset, test: Dataset, options: ProbeOptions) -> dict[str, Any]:
    """Test accuracy (overall, per class, confusion) and the kNN baseline on the same images."""
    metrics: dict[str, Any] = {"knn_k": options.knn_k}
    known = test.y >= 0
    if known.any():
        metrics["test"] = evaluate(result.head, train.classes, test.x, test.y)
        scores = knn_predict(train.x, train.y, test.x, len(train.classes), options.knn_k, options.knn_temperature)
        metrics["knn_test_accuracy"] = float((scores.argmax(1) == test.y)[known].mean())
        metrics["n_test"] = int(known.sum())
    return metrics


def save_probe(path: Path, result: ProbeResult) -> None:
    from safetensors.numpy import save_file

    meta = {"format": PROBE_FORMAT, "classes": result.classes, "C": result.C,
            "standardize": result.standardize, "val_accuracy": result.val_accuracy,
            "selection": result.selection, "n_select": result.n_select, "n_train": result.n_train,
            "backend": result.backend, "seconds": round(result.seconds, 2), "provenance": result.provenance,
            "metrics": {k: v for k, v in result.metrics.items() if k != "sweep"},
            **({"labels": result.labels} if result.labels else {}), **({"curve": result.curve} if result.curve else {}),
            **({"store": result.store} if result.store else {})}
    h = result.head
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({"coef": h.coef, "intercept": h.intercept, "mean": h.mean, "scale": h.scale}, str(tmp),
              metadata={PROBE_KEY: json.dumps(meta)})
    tmp.replace(path)


def load_probe(path: Path) -> tuple[LinearHead, dict[str, Any]]:
    from safetensors import safe_open

    if not path.is_file():
        raise ProbeError(f"probe file {path} does not exist")
    try:
        with safe_open(str(path), framework="numpy") as f:
            raw = (f.metadata() or {}).get(PROBE_KEY)
            arrays = {k: f.get_tensor(k) for k in ("coef", "intercept", "mean", "scale")}
    except Exception as e:  # noqa: BLE001 - any parse failure means the same to the user
        raise ProbeError(f"{path} is not a readable probe file ({type(e).__name__}); "
                         "create one with `embedder probe STORE --out PROBE`") from None
    if not raw:
        raise ProbeError(f"{path} is a safetensors file but not an embedder probe")
    meta = json.loads(raw)
    head = LinearHead(arrays["coef"], arrays["intercept"], arrays["mean"], arrays["scale"])
    if head.coef.shape[0] != len(meta["classes"]):
        raise ProbeError(f"{path} is inconsistent: {head.coef.shape[0]} rows for {len(meta['classes'])} classes")
    return head, meta


def result_json(result: ProbeResult) -> dict[str, Any]:
    m = result.metrics
    return {
        "C": result.C, "standardize": result.standardize, "val_accuracy": result.val_accuracy,
        "selection": result.selection, "n_select": result.n_select,
        "test_accuracy": m.get("test", {}).get("accuracy"),
        "test_top5_accuracy": m.get("test", {}).get("top5_accuracy"),
        "test_balanced_accuracy": m.get("test", {}).get("balanced_accuracy"),
        "knn_test_accuracy": m.get("knn_test_accuracy"), "knn_k": m.get("knn_k"),
        "n_train": result.n_train, "n_test": m.get("n_test", 0), "classes": result.classes,
        "backend": result.backend, "seconds": round(result.seconds, 2),
        "select_seconds": round(result.select_seconds, 2), "refit_seconds": round(result.refit_seconds, 2),
        "per_class": m.get("test", {}).get("per_class"),
        "confusion_matrix": m.get("test", {}).get("confusion_matrix"),
        "sweep": result.sweep,
        **({"zero_shot": m["zero_shot"]} if "zero_shot" in m else {}),
        **({"labels": result.labels} if result.labels else {}),
        **({"curve": result.curve} if result.curve else {}),
    }


def write_report(directory: Path, result: ProbeResult) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    data = result_json(result)
    (directory / "metrics.json").write_text(json.dumps(data, indent=2))
    cm = data["confusion_matrix"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    if cm is not None:
        arr = np.array(cm, dtype=float)
        norm = arr / np.maximum(arr.sum(1, keepdims=True), 1)
        ax = axes[0]
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        n = len(result.classes)
        ax.set_xticks(range(n), result.classes, rotation=90 if n > 6 else 0)
        ax.set_yticks(range(n), result.classes)
        if n <= 20:
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, int(arr[i, j]), ha="center", va="center",
                            color="white" if norm[i, j] > 0.5 else "black", fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"test confusion (acc {data['test_accuracy']:.3f})")
    else:
        axes[0].axis("off")
    ax = axes[1]
    for std in sorted({bool(r["standardize"]) for r in result.sweep}):
        rows = sorted((r for r in result.sweep if bool(r["standardize"]) == std), key=lambda r: r["C"])
        ax.semilogx([r["C"] for r in rows], [r["val_accuracy"] for r in rows], "o-",
                    label="standardised" if std else "raw")
    ax.axvline(result.C, color="gray", ls="--", label=f"chosen C={result.C:.3g}")
    ax.set_xlabel("C (inverse regularisation)")
    ax.set_ylabel(f"held-out accuracy ({result.n_select} images)")
    ax.set_title("C sweep")
    ax.legend()
    fig.tight_layout()
    fig.savefig(directory / "confusion_matrix.png", dpi=110)
    plt.close(fig)

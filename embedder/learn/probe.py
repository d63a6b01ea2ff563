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
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embedder.errors import ProbeError
from embedder.learn.options import ProbeOptions
from embedder.learn.selection import Selection, SelectOptions, scaler, select_c, sweep_steps
from embedder.models.heads import LinearHead
from embedder.store.provenance import Provenance
from embedder.store.shards import Store, arrow_to_embeddings

log = logging.getLogger(__name__)

PROBE_KEY = "embedder_probe"
SMALL_FIT = 2_000_000  # rows x dim below which a fit runs on one BLAS thread
PROBE_FORMAT = "embedder-probe/1"




@dataclass
class Dataset:
    x: np.ndarray
    y: np.ndarray  # int class indices
    classes: list[str]
    ids: list[str]
    paths: list[str]
    provenance: dict[str, Any]
    dropped_unlabelled: int = 0
    unseen: list[str] = field(default_factory=list)  # labels absent from the given class list (y = -1)


@dataclass
class ProbeResult:
    head: LinearHead
    classes: list[str]
    C: float
    standardize: bool
    val_accuracy: float
    sweep: list[dict[str, Any]]
    n_train: int
    metrics: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    backend: str = "sklearn"
    seconds: float = 0.0
    selection: str = ""  # how C was chosen, and on how many images
    n_select: int = 0


def load_dataset(store_path: str, label_column: str = "label",
                 classes: list[str] | None = None) -> Dataset:
    store = Store.open(store_path)
    names = store.dataset().schema.names
    if label_column not in names:
        raise ProbeError(f"{store_path} has no column {label_column!r}; columns: "
                         f"{', '.join(n for n in names if n != 'embedding')}")
    t = store.read(["id", "path", "embedding", label_column])
    labels = t.column(label_column).to_pylist()
    keep = [i for i, lab in enumerate(labels) if lab is not None and lab != ""]
    if not keep:
        raise ProbeError(f"{store_path} has no labels in {label_column!r}: put images in one "
                         "subfolder per class (ImageFolder) or extract from a list with a label column")
    n_rows = t.num_rows
    t = t.take(keep)
    labels = [str(labels[i]) for i in keep]
    x = arrow_to_embeddings(t.column("embedding"))
    known = classes or sorted(set(labels))
    index = {c: i for i, c in enumerate(known)}
    y = np.array([index.get(lab, -1) for lab in labels], dtype=np.int64)
    return Dataset(x, y, known, t.column("id").to_pylist(), t.column("path").to_pylist(),
                   store.provenance.to_dict(), dropped_unlabelled=n_rows - len(keep),
                   unseen=sorted(set(labels) - set(known)))


class _SklearnFitter:
    """Warm-started multinomial L-BFGS along a C path (sklearn's objective: C·Σloss + ½‖W‖²)."""

    name = "sklearn"

    def __init__(self, n_classes: int, max_iter: int) -> None:
        from sklearn.linear_model import LogisticRegression

        self.model = LogisticRegression(C=1.0, max_iter=max_iter, warm_start=True, tol=1e-4)
        self.n_classes = n_classes

    def init(self, coef: np.ndarray, icpt: np.ndarray, y: np.ndarray) -> None:
        """Start the final fit from a known solution (sklearn's warm_start reads coef_); converge
        it tightly, since a warm start at small C otherwise stops at once."""
        self.model.set_params(tol=1e-7)
        present = np.unique(y)
        if len(present) > 2:
            self.model.coef_ = coef[present].astype(np.float64)
            self.model.intercept_ = icpt[present].astype(np.float64)

    def fit(self, x: np.ndarray, y: np.ndarray, C: float) -> tuple[np.ndarray, np.ndarray]:
        from sklearn.exceptions import ConvergenceWarning
        from threadpoolctl import threadpool_limits

        self.model.set_params(C=C)
        # a small problem on one BLAS thread: threads that wait for each other cost more than the
        # products (measured: 100 x 1280, 10 classes, the whole K-fold sweep on 2 busy cores,
        # 151.6 s with OpenBLAS's 2 threads, 4.2 s with 1)
        with threadpool_limits(1 if x.size < SMALL_FIT else None), warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            # few images per class (2 each of 21 classes) is a classification all the same
            warnings.filterwarnings("ignore", message="The number of unique classes is greater than 50%")
            self.model.fit(x, y)
        coef, icpt = self.model.coef_, self.model.intercept_
        if coef.shape[0] == 1:  # binary: sklearn keeps one row; expand to a softmax pair
            coef = np.vstack([-coef / 2, coef / 2])
            icpt = np.array([-icpt[0] / 2, icpt[0] / 2])
        full_c = np.zeros((self.n_classes, x.shape[1]), np.float32)
        full_i = np.full(self.n_classes, -1e9, np.float32)  # classes absent from train never win
        present = self.model.classes_
        full_c[present] = coef
        full_i[present] = icpt
        return full_c, full_i


class _TorchFitter:
    """Full-batch L-BFGS in torch (the GPU path), same objective as scikit-learn's."""

    name = "torch"

    def __init__(self, n_classes: int, max_iter: int, device: str) -> None:
        import torch

        from embedder.models.devices import resolve_device

        self.torch = torch
        self.device = resolve_device(device)
        self.n_classes = n_classes
        self.max_iter = max_iter
        self.w: Any = None
        self.b: Any = None

    def init(self, coef: np.ndarray, icpt: np.ndarray, y: np.ndarray) -> None:
        torch = self.torch
        self.w = torch.tensor(coef, device=self.device, dtype=torch.float32, requires_grad=True)
        self.b = torch.tensor(icpt, device=self.device, dtype=torch.float32, requires_grad=True)

    def fit(self, x: np.ndarray, y: np.ndarray, C: float) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        X = torch.as_tensor(x, device=self.device, dtype=torch.float32)
        Y = torch.as_tensor(y, device=self.device)
        if self.w is None:
            self.w = torch.zeros(self.n_classes, x.shape[1], device=self.device, requires_grad=True)
            self.b = torch.zeros(self.n_classes, device=self.device, requires_grad=True)
        opt = torch.optim.LBFGS([self.w, self.b], lr=1, max_iter=self.max_iter, history_size=20,
                                tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")
        n = len(y)

        def closure() -> Any:
            opt.zero_grad()
            # sklearn's C·Σloss + ½‖W‖², divided by C·n: same minimiser, gradients of order one
            # (so L-BFGS's tolerances mean the same at C=1e-6 as at C=1e5).
            loss = torch.nn.functional.cross_entropy(X @ self.w.T + self.b, Y, reduction="mean")
            loss = loss + (self.w * self.w).sum() / (2 * C * n)
            loss.backward()
            return loss

        opt.step(closure)
        return self.w.detach().cpu().numpy(), self.b.detach().cpu().numpy()


def _fitter(options: ProbeOptions, n_classes: int) -> _SklearnFitter | _TorchFitter:
    backend = options.backend
    if backend == "auto":
        import torch

        backend = "torch" if torch.cuda.is_available() and options.device != "cpu" else "sklearn"
    if backend == "torch":
        return _TorchFitter(n_classes, options.max_iter, options.device)
    if backend != "sklearn":
        raise ProbeError(f"unknown backend {backend!r}; valid: auto, sklearn, torch")
    return _SklearnFitter(n_classes, options.max_iter)


def select_options(options: ProbeOptions, criterion: str = "accuracy") -> SelectOptions:
    return SelectOptions(c_min_exp=options.c_min_exp, c_max_exp=options.c_max_exp, refine=options.refine,
                         val_fraction=options.val_fraction, min_val_rows=options.min_val_rows,
                         folds=options.folds, seed=options.seed, standardize=options.standardize,
                         criterion=criterion)


def train_probe(train: Dataset, options: ProbeOptions = ProbeOptions(),
                progress: Callable[[int, int, str], None] | None = None) -> ProbeResult:
    """C and standardisation chosen on held-out predictions (``selection.select_c``: a split when it
    is large, K-fold on all of train when it is not), then refit on all of train."""
    t0 = time.perf_counter()
    counts = np.bincount(train.y, minlength=len(train.classes))
    if len(train.classes) < 2 or (counts > 0).sum() < 2:
        raise ProbeError(f"need at least 2 classes to train a probe, found {len(train.classes)} "
                         f"({', '.join(train.classes)})")
    sel_opts = select_options(options)
    total = sweep_steps(train.y, sel_opts) + 1
    done = 0

    def tick(desc: str = "C sweep") -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, total, desc)

    def factory() -> Any:
        return _fitter(options, len(train.classes))

    chosen: Selection = select_c(train.x, train.y, len(train.classes), sel_opts, factory, tick)
    # Refit on all of train with the chosen C and standardisation.
    mean, scale = scaler(train.x, chosen.standardize)
    fitter = factory()
    if chosen.solution is not None:
        fitter.init(*chosen.solution, train.y)  # warm start from the held-out fit at that C
    coef, icpt = fitter.fit((train.x - mean) / scale, train.y, chosen.C)
    tick("refit")
    head = LinearHead(coef.astype(np.float32), icpt.astype(np.float32), mean, scale)
    log.info("probe: %s", chosen.describe())
    return ProbeResult(head, train.classes, chosen.C, chosen.standardize, chosen.accuracy, chosen.sweep,
                       len(train.y), provenance=train.provenance, backend=fitter.name,
                       seconds=time.perf_counter() - t0, selection=chosen.describe(), n_select=chosen.n_rows)


def knn_predict(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, n_classes: int, k: int = 20,
                temperature: float = 0.07) -> np.ndarray:
    """DINOv2's kNN: cosine on unit vectors, votes weighted by exp(sim / T). Returns class scores."""
    a = xtr / np.maximum(np.linalg.norm(xtr, axis=1, keepdims=True), 1e-12)
    b = xte / np.maximum(np.linalg.norm(xte, axis=1, keepdims=True), 1e-12)
    k = min(k, len(a))
    scores = np.zeros((len(b), n_classes), np.float64)
    for s in range(0, len(b), 1024):
        sims = b[s:s + 1024] @ a.T
        nn = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        w = np.exp(np.take_along_axis(sims, nn, 1) / temperature)
        for j in range(k):
            np.add.at(scores[s:s + 1024], (np.arange(len(nn)), ytr[nn[:, j]]), w[:, j])
    return scores


def evaluate(head: LinearHead, classes: list[str], x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix, precision_recall_fscore_support

    proba = head.proba(x)
    pred = proba.argmax(1)
    labels = list(range(len(classes)))
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    out: dict[str, Any] = {
        "accuracy": float((pred == y).mean()),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
        "per_class": {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                          "support": int(s[i])} for i, c in enumerate(classes)},
        "confusion_matrix": confusion_matrix(y, pred, labels=labels).tolist(),
    }
    if len(classes) > 5:
        top5 = np.argsort(-proba, axis=1)[:, :5]
        out["top5_accuracy"] = float((top5 == y[:, None]).any(1).mean())
    return out


def check_compatible(train: Dataset, test: Dataset) -> None:
    if train.x.shape[1] != test.x.shape[1]:
        raise ProbeError(f"train vectors have dim {train.x.shape[1]}, test vectors {test.x.shape[1]}: "
                         "embed both with the same backbone and layer")
    a, b = Provenance.from_dict(train.provenance), Provenance.from_dict(test.provenance)
    diff = a.differences(b, Provenance.COMPARABLE)
    if diff:
        raise ProbeError(f"train and test stores were embedded differently ({diff[0]} differs); "
                         "re-extract the test images with the train store's settings")


# ---- the probe file --------------------------------------------------------------------------
def load_test(path: str, train: Dataset, label_column: str = "label") -> Dataset:
    """A test store for a trained probe: embedded as train was (else an error), its rows of
    classes train never saw dropped (named in ``.unseen``)."""
    test = load_dataset(path, label_column, train.classes)
    check_compatible(train, test)
    if test.unseen:
        keep = test.y >= 0
        test.x, test.y = test.x[keep], test.y[keep]
    return test


def test_metrics(result: ProbeResult, train: Dataset, test: Dataset, options: ProbeOptions) -> dict[str, Any]:
    """Test accuracy (overall, per class, confusion) and the kNN baseline on the same images."""
    metrics: dict[str, Any] = {"knn_k": options.knn_k}
    if len(test.y):
        metrics["test"] = evaluate(result.head, train.classes, test.x, test.y)
        scores = knn_predict(train.x, train.y, test.x, len(train.classes), options.knn_k, options.knn_temperature)
        metrics["knn_test_accuracy"] = float((scores.argmax(1) == test.y).mean())
        metrics["n_test"] = int(len(test.y))
    return metrics


def save_probe(path: Path, result: ProbeResult) -> None:
    from safetensors.numpy import save_file

    meta = {"format": PROBE_FORMAT, "classes": result.classes, "C": result.C,
            "standardize": result.standardize, "val_accuracy": result.val_accuracy,
            "selection": result.selection, "n_select": result.n_select, "n_train": result.n_train,
            "backend": result.backend, "provenance": result.provenance,
            "metrics": {k: v for k, v in result.metrics.items() if k != "sweep"}}
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
        "per_class": m.get("test", {}).get("per_class"),
        "confusion_matrix": m.get("test", {}).get("confusion_matrix"),
        "sweep": result.sweep,
        **({"zero_shot": m["zero_shot"]} if "zero_shot" in m else {}),
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

"""The Python API: a few typed entry points for notebooks and other programs. Each is a thin layer
over the functions the CLI and the service call; nothing here re-implements a step. Heavy libraries
load when a function needs them, so ``import embedder`` stays as light as the CLI."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from embedder.errors import EmbedderError

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from embedder.embed.batch import BatchEmbedder
    from embedder.embed.fill import ExtractSummary
    from embedder.index.search import LoadedIndex
    from embedder.learn.probe import ProbeResult
    from embedder.store.importer import ImportSummary
    from embedder.store.labels import LabelsArg
    from embedder.store.provenance import Provenance
    from embedder.store.shards import Store

ImageLike = Union[str, Path, "Image.Image"]


def _split_options(options: dict[str, Any], *targets: type) -> list[dict[str, Any]]:
    """Keyword options dealt to the options dataclasses that declare them; an unknown one is an
    error that lists every valid name."""
    fields = [{f.name for f in dataclasses.fields(t)} for t in targets]
    unknown = sorted(k for k in options if not any(k in f for f in fields))
    if unknown:
        valid = sorted(set().union(*fields))
        raise EmbedderError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                            f"valid: {', '.join(valid)}")
    return [{k: v for k, v in options.items() if k in f} for f in fields]


class Embedder:
    """A frozen backbone that turns images into vectors exactly as ``embedder extract`` stores them.

    >>> emb = embedder.Embedder("mobilenet_v2:IMAGENET1K_V1")
    >>> emb.embed(["a.jpg", "b.png"]).shape
    (2, 1280)

    ``options`` are ``EmbedOptions`` fields (``decoder``, ``precision``, ``normalize``, ``dtype``…),
    with the same defaults as the CLI's. ``backbone=None`` with ``weights=`` a fine-tuned checkpoint:
    the checkpoint's own backbone."""

    def __init__(self, backbone: str | None, *, weights: str | Path | None = None,
                 layer: str | None = None, pool: str = "avg", device: str = "auto", image_size: int | None = None,
                 **options: Any) -> None:
        from embedder.embed.batch import BatchEmbedder
        from embedder.embed.options import EmbedOptions
        from embedder.models.builder import spec_for

        (embed_kw,) = _split_options(options, EmbedOptions)
        # "avg" without a layer is the model's own pooled features: the spec the CLI's default makes
        spec = spec_for(backbone, weights, layer, None if (layer is None and pool == "avg") else pool, image_size)
        self._batch: BatchEmbedder = BatchEmbedder(spec, EmbedOptions(device=device, **embed_kw))

    @classmethod
    def _wrap(cls, batch: BatchEmbedder) -> Embedder:
        self = cls.__new__(cls)
        self._batch = batch
        return self

    @property
    def provenance(self) -> Provenance:
        """How these vectors are made (the record every store shard carries)."""
        return self._batch.provenance()

    @property
    def dim(self) -> int:
        return int(self._batch.loaded.dim)

    def embed(self, images: Iterable[ImageLike], batch_size: int = 32) -> np.ndarray:
        """Paths (local or object-storage URIs) or PIL images → float32 ``(n, dim)``. A path decodes
        with the embedder's decoder, as extraction does; a PIL image goes through the ``pil`` path (the
        weights' own transforms). An image that cannot be decoded is an error naming it."""
        import numpy as np
        import torch

        from embedder.decode.cpu import pil_pixels
        from embedder.errors import DecodeError

        items = list(images)
        if batch_size < 1:
            raise EmbedderError(f"batch_size must be at least 1, got {batch_size}")
        out = np.empty((len(items), self.dim), np.float32)
        pre, max_pixels = self._batch.loaded.preprocessing, self._batch.options.max_pixels
        for start in range(0, len(items), batch_size):
            pixels = []
            for i, item in enumerate(items[start:start + batch_size], start):
                try:
                    if isinstance(item, (str, Path)):
                        pixels.append(self._batch.decode(str(item)).pixels)
                    else:
                        pixels.append(pil_pixels(item, pre, max_pixels))
                except DecodeError as e:
                    raise DecodeError(f"image {i} ({item if isinstance(item, (str, Path)) else 'PIL image'}): "
                                      f"{e}") from None
                except (AttributeError, TypeError):
                    raise EmbedderError(f"image {i}: expected a path or a PIL image, got "
                                        f"{type(item).__name__}") from None
            if pixels:
                out[start:start + len(pixels)] = self._batch.embed_pixels(torch.stack(pixels))
        return out

    def embed_text(self, texts: str | Sequence[str], normalize: bool = True) -> np.ndarray:
        """Texts → float32 ``(n, dim)`` in the space of the image vectors, by the model's text tower
        (CLIP-family backbones; others raise). Unit length by default (a text vector's own norm is the
        text tower's scale, ~20 for ViT-B-32, meaningless beside an image vector's): compare with image
        vectors by cosine (``embed(...)`` normalised, or ``Embedder(..., normalize=True)``). An empty
        text or one over the context length is an error, never cut."""
        import numpy as np

        v = self._batch.embed_texts([texts] if isinstance(texts, str) else list(texts))
        if normalize:
            v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        return v.astype(np.float32, copy=False)

    def zero_shot(self, images: Iterable[ImageLike], classes: Sequence[str],
                  templates: Sequence[str] | None = None) -> np.ndarray:
        """Zero-shot class probabilities ``(n, classes)`` of IMAGES over CLASSES (words: ``golden
        retriever``), by the text tower through OpenCLIP's prompt ensemble (or TEMPLATES, each with
        one ``{}``) and the model's logit scale — the head ``embedder probe`` reports zero-shot with."""
        import numpy as np

        from embedder.learn.zeroshot import build_head

        head = build_head(self._batch, list(classes), templates)
        logits = head.logits(self.embed(images))
        logits = logits - logits.max(1, keepdims=True)
        p = np.exp(logits)
        return (p / p.sum(1, keepdims=True)).astype(np.float32)


def extract(sources: str | Sequence[str], out: str | Path, *, backbone: str | None,
            weights: str | Path | None = None, layer: str | None = None, pool: str | None = None,
            image_size: int | None = None, engine: str = "local", **options: Any) -> ExtractSummary:
    """``embedder extract``: embed every image under SOURCES not already in the store at OUT
    (created or appended; resumable). ``options`` are ``EmbedOptions``, ``RunOptions`` or (with
    ``engine="ray"``) ``RayOptions`` fields. Returns the run's summary (``.done``, ``.failed``,
    ``.failures``, ``.to_dict()``)."""
    from embedder.embed.options import EmbedOptions, RayOptions, RunOptions
    from embedder.embed.run import run_extract
    from embedder.io.options import SourceOptions
    from embedder.models.builder import spec_for

    if engine not in ("local", "ray"):
        raise EmbedderError(f"unknown engine {engine!r}; valid: local, ray")
    ray_fields = {f.name for f in dataclasses.fields(RayOptions)}
    ray_kw = {k: options.pop(k) for k in list(options) if k in ray_fields and engine == "ray"
              and k not in {f.name for f in dataclasses.fields(RunOptions)}}
    embed_kw, run_kw, source_kw = _split_options(options, EmbedOptions, RunOptions, SourceOptions)
    spec = spec_for(backbone, weights, layer, pool, image_size)
    srcs = [sources] if isinstance(sources, (str, Path)) else [str(s) for s in sources]
    ray = RayOptions(**ray_kw, batch_size=run_kw.get("batch_size")) if engine == "ray" else None
    run = RunOptions(**run_kw, sources=SourceOptions(**source_kw))
    return run_extract([str(s) for s in srcs], str(out), spec, EmbedOptions(**embed_kw), run, ray)


def import_vectors(sources: str | Path | Sequence[str | Path], out: str | Path, *, vector_column: str = "embedding",
                   **options: Any) -> ImportSummary:
    """``embedder import``: vectors made elsewhere (Parquet files with a list or fixed-size-list vector
    column; clip-retrieval's ``img_emb_N.npy`` + ``metadata_N.parquet``) into the store at OUT
    (created, or continued where an interrupted run stopped). ``options`` are ``ImportOptions`` fields
    (``id_column``, ``label_column``, ``path_column``, ``caption_column``, ``model``…). Returns the
    run's summary (``.imported``, ``.failed``, ``.duplicates``, ``.to_dict()``)."""
    from embedder.store.importer import ImportOptions
    from embedder.store.importer import import_vectors as run_import

    (kw,) = _split_options(options, ImportOptions)
    srcs = [str(sources)] if isinstance(sources, (str, Path)) else [str(s) for s in sources]
    return run_import(srcs, str(out), ImportOptions(vector_column=vector_column, **kw))


def open_store(path: str | Path) -> Store:
    """An embedding store: ``len(store)``, ``.provenance``, ``.table(columns=None)`` (a
    ``pyarrow.Table``) and ``.vectors()`` (float32 numpy, in the table's row order)."""
    from embedder.store.shards import Store

    return Store.open(str(path))


@dataclass(frozen=True)
class Hit:
    """One search result. ``caption`` and ``key`` (the ``--id-column`` value) where the index keeps
    them (by default where the store has them); ``columns``: the other kept columns, as text
    (``index build --keep-columns``)."""

    id: str
    path: str
    label: str | None
    score: float
    rank: int
    caption: str | None = None
    key: str | None = None
    columns: dict[str, str | None] = dataclasses.field(default_factory=dict)


class Index:
    """A built index: ``.search(queries, k=10, where=None)``, ``len(index)``, ``.info``."""

    def __init__(self, loaded: LoadedIndex, device: str = "auto", weights: str | Path | None = None) -> None:
        self._loaded = loaded
        self._device = device
        self._weights = str(weights) if weights is not None else None
        self._embedder: Embedder | None = None

    @property
    def name(self) -> str:
        return str(self._loaded.name)

    @property
    def info(self) -> dict[str, Any]:
        """The index's metadata: kind, factory, metric, count, measured recall and speed."""
        return dict(self._loaded.meta)

    def __len__(self) -> int:
        return int(self._loaded.index.ntotal)

    def __repr__(self) -> str:
        m = self._loaded.meta
        q = m.get("quality", {})
        recall = ("exact" if q.get("exact") else f"recall@10 {q['recall_at_10']:.3f}"
                  if q.get("recall_at_10") is not None else "recall not measured")
        return (f"Index({self.name!r}: {m.get('factory')}, {len(self):,} vectors of dim {m.get('dim')}, "
                f"{m.get('metric')}, {recall}, generation {self._loaded.generation}, store {m.get('store')!r})")

    def embedder(self) -> Embedder:
        """The model the index's store was made with, rebuilt from its provenance (for image queries)."""
        if self._embedder is None:
            from embedder.embed.query import embedder_for

            self._embedder = Embedder._wrap(embedder_for(self._loaded.provenance, self._weights, self._device,
                                                         store=self._loaded.meta.get("store")))
        return self._embedder

    def search(self, queries: Any = None, k: int = 10, where: dict[str, str] | None = None, *,
               text: str | Sequence[str] | None = None) -> list[list[Hit]]:
        """Nearest items per query. QUERIES: a vector ``(dim,)``, vectors ``(n, dim)``, or images
        (paths or PIL images, embedded with the index's own model); or ``text=`` (a text or texts, by
        the model's text tower). ``where`` filters on store columns (``{"label": "cat"}``); k results
        whenever k rows match. A vector with NaN or infinite values, or all zeros on a cosine or
        inner-product index, is an ``IndexError_`` (the same checks as the CLI's and the service's)."""
        from embedder.embed.query import QueryBuilder, QueryRequest

        builder = QueryBuilder(self._loaded, lambda: self.embedder()._batch)
        if text is not None:
            if queries is not None:
                raise EmbedderError("give queries or text=, not both")
            request = QueryRequest(texts=(text,) if isinstance(text, str) else tuple(text))
        elif queries is None:
            raise EmbedderError("no query: give vectors, images or text=")
        elif (hasattr(queries, "__array__") and not hasattr(queries, "convert")) or _numbers(queries):
            request = QueryRequest(vectors=queries)  # an array (not a PIL image), or lists of numbers
        else:
            items = [queries] if isinstance(queries, (str, Path)) or hasattr(queries, "convert") else list(queries)
            request = QueryRequest(images=tuple(items))
        q, _ = builder.build(request)
        return [[Hit(h["id"], h["path"], h["label"], float(h["score"]), int(h["rank"]), h.get("caption"),
                     h.get("key"), dict(h.get("columns") or {})) for h in hits]
                for hits in self._loaded.search(q, k, where)]


def _numbers(queries: Any) -> bool:
    """A vector or vectors as plain lists (``[0.1, …]``, ``[[0.1, …], …]``), as the service takes them."""
    import numbers

    if not isinstance(queries, (list, tuple)) or not queries:
        return False
    first = queries[0]
    if isinstance(first, (list, tuple)):
        first = first[0] if first else None
    return isinstance(first, numbers.Real) and not isinstance(first, bool)


def build_index(store: str | Path, name: str, *, home: str | Path | None = None, kind: str = "auto",
                keep_columns: Sequence[str] | None = None, **options: Any) -> Index:
    """``embedder index build``: a FAISS index over STORE, named NAME in the index home (``home``,
    else ``$EMBEDDER_HOME``, else ``./indexes``), its recall measured against exact search, and, on a
    store with captions whose model has a text tower, text → image recall (``.info["text_recall"]``).
    ``options`` are ``BuildOptions`` fields (``metric``, ``target_recall``, ``memory_budget``,
    ``weights``: the file the store was made from, which the text tower needs…). ``keep_columns``:
    what hits carry beyond id, path and label (``index build --keep-columns``; default: the caption
    and the key where the store has them; ``[]``: nothing)."""
    from embedder.index.build import build
    from embedder.index.plan import BuildOptions

    (build_kw,) = _split_options(options, BuildOptions)
    build(str(store), name, BuildOptions(kind=kind, **build_kw), None if home is None else str(home),
          None if keep_columns is None else (tuple(keep_columns) or ("none",)))
    return open_index(name, home=home)


def open_index(name: str, *, home: str | Path | None = None, device: str = "auto",
               weights: str | Path | None = None) -> Index:
    """A built index by name (an unknown name lists the valid ones); WEIGHTS: the file its store was made
    from, when it was (image and text queries rebuild that model)."""
    from embedder.index.search import LoadedIndex

    return Index(LoadedIndex(name, None if home is None else str(home)), device, weights)


class Probe:
    """A linear probe trained on a store: ``.predict(images)``, ``.classes``, ``.metrics``."""

    def __init__(self, result: ProbeResult, device: str = "auto", weights: str | Path | None = None) -> None:
        self.result = result
        self._device = device
        self._weights = str(weights) if weights is not None else None  # the file its store was made from
        self._embedder: Embedder | None = None

    @property
    def classes(self) -> list[str]:
        return list(self.result.classes)

    @property
    def metrics(self) -> dict[str, Any]:
        """Validation and (with a test store) test accuracy, the kNN baseline, how C was chosen; with
        a labels file, what it did (``labels``) and the learning curve (``curve``)."""
        extra = {k: v for k, v in (("labels", self.result.labels), ("curve", self.result.curve)) if v is not None}
        return {"C": self.result.C, "selection": self.result.selection, **self.result.metrics, **extra}

    def save(self, path: str | Path) -> None:
        """The probe file ``embedder predict`` reads."""
        from embedder.learn.probe import save_probe

        save_probe(Path(path), self.result)

    @classmethod
    def load(cls, path: str | Path, *, device: str = "auto", weights: str | Path | None = None) -> Probe:
        """A probe file written by ``embedder probe --out`` or ``.save`` (WEIGHTS: the file its store
        was made from, when it was: images are embedded with that model)."""
        from embedder.learn.probe import ProbeResult, load_probe

        head, meta = load_probe(Path(path))
        result = ProbeResult(head, list(meta["classes"]), float(meta.get("C", 0.0)), bool(meta.get("standardize")),
                             float(meta.get("val_accuracy") or 0.0), [], int(meta.get("n_train", 0)),
                             dict(meta.get("metrics", {})), dict(meta.get("provenance", {})),
                             str(meta.get("backend", "")), float(meta.get("seconds", 0.0)),
                             str(meta.get("selection", "")), int(meta.get("n_select", 0)),
                             labels=meta.get("labels"), curve=meta.get("curve"), store=str(meta.get("store", "")))
        return cls(result, device, weights)

    def __repr__(self) -> str:
        acc = self.result.metrics.get("test", {}).get("accuracy")
        shown = f", test accuracy {acc:.3f}" if acc is not None else ""
        return (f"Probe({len(self.classes)} classes, C={self.result.C:g}, {self.result.n_train:,} training vectors"
                f"{shown}, backbone {self.result.provenance.get('backbone')!r})")

    def predict_vectors(self, vectors: np.ndarray) -> list[str]:
        return [self.result.classes[i] for i in self.result.head.logits(vectors).argmax(1)]

    def predict_proba(self, images: Iterable[ImageLike]) -> np.ndarray:
        """Class probabilities ``(n, classes)``, columns in ``.classes`` order."""
        return self.result.head.proba(self._embed(images))

    def predict(self, images: Iterable[ImageLike]) -> list[str]:
        """The most likely class of each image, embedded exactly as the training store was."""
        return self.predict_vectors(self._embed(images))

    def _embed(self, images: Iterable[ImageLike]) -> np.ndarray:
        if self._embedder is None:
            from embedder.embed.query import embedder_for
            from embedder.store.provenance import Provenance

            prov = Provenance.from_dict(self.result.provenance)
            self._embedder = Embedder._wrap(embedder_for(prov, self._weights, self._device,
                                                         store=self.result.store or None))
        return self._embedder.embed(images)


def _join(labels: LabelsArg | None) -> Any:
    """A labels file's join (``embedder.store.labels``), or None."""
    if labels is None:
        return None
    from embedder.store.labels import LabelJoin, read_labels

    return LabelJoin(read_labels(labels))


def train_probe(train_store: str | Path, *, test_store: str | Path | None = None, device: str = "auto",
                weights: str | Path | None = None, labels: LabelsArg | None = None, curve: bool = True,
                **options: Any) -> Probe:
    """``embedder probe``: logistic regression on a labelled store's frozen features, C chosen on
    held-out predictions; with ``test_store``, its test accuracy and the kNN baseline in
    ``.metrics``. ``options`` are ``ProbeOptions`` fields (``label_column``, ``standardize``…).
    WEIGHTS: the file the store was made from, when it was (``.predict`` rebuilds that model, as
    ``embedder predict --weights`` does). LABELS: a CSV or Parquet file of id,label rows put over
    the stores' own labels by id (``.metrics["labels"]``: what it did; an error when none of its
    ids is in the stores); with CURVE, the probe retrained on 1, 2, 5, … of its labels per class
    (``.metrics["curve"]``: accuracy against the number of labels)."""
    from embedder.errors import ProbeError
    from embedder.learn.options import ProbeOptions
    from embedder.learn.probe import load_dataset, load_test, test_metrics
    from embedder.learn.probe import train_probe as fit
    from embedder.sizes import parse_size

    (probe_kw,) = _split_options(options, ProbeOptions)
    if isinstance(probe_kw.get("memory_budget"), str):  # "8GB", as the CLI takes it
        probe_kw["memory_budget"] = parse_size(probe_kw["memory_budget"], ProbeError)
    opts = ProbeOptions(**probe_kw)
    join = _join(labels)
    train = load_dataset(str(train_store), opts.label_column, memory_budget=opts.memory_budget, labels=join)
    test = load_test(str(test_store), train, opts.label_column, opts.memory_budget, join) \
        if test_store is not None else None
    joined = join.require_some(str(train_store) + (f" or {test_store}" if test_store is not None else "")) \
        if join is not None else None
    result = fit(train, opts)
    result.metrics = {"knn_k": opts.knn_k} if test is None else test_metrics(result, train, test, opts)
    if joined is not None:
        result.labels = joined.to_dict()
        if curve:
            from embedder.learn.curve import learning_curve

            result.curve = learning_curve(train, test, opts, full=result)
    return Probe(result, device, weights)


def _inspect_budget(kw: dict[str, Any]) -> dict[str, Any]:
    """``memory_budget`` in bytes or as the CLI takes it ("2GB"), as ``train_probe``."""
    if isinstance(kw.get("memory_budget"), str):
        from embedder.errors import InspectError
        from embedder.sizes import parse_size

        kw["memory_budget"] = parse_size(kw["memory_budget"], InspectError)
    return kw


def inspect(store: str | Path, out: str | Path, *, test: str | Path | None = None,
            labels: LabelsArg | None = None, **options: Any) -> dict[str, Any]:
    """``embedder inspect``: duplicates, leaks (with ``test``), likely label errors, outliers and class
    overlap of STORE → ``OUT/findings.parquet`` and ``OUT/index.html``; returns the summary the CLI
    prints with ``--json``. ``options`` are ``InspectOptions`` fields (``duplicate_threshold``,
    ``memory_budget`` in bytes or "2GB", ``graph``, ``engine``, ``thumbnails``…): above 20,000 images the
    bucketed graph runs in memory set by the budget, whatever the store's size. LABELS: a CSV or
    Parquet file of id,label rows put over the store's labels by id (the summary's ``labels``: what
    it did)."""
    from embedder.analysis.inspection import inspect_store, write_outputs
    from embedder.analysis.options import InspectOptions

    (kw,) = _split_options(options, InspectOptions)
    opts = InspectOptions(**_inspect_budget(kw))
    join = _join(labels)
    insp = inspect_store(str(store), str(out), str(test) if test is not None else None, opts, labels=join)
    joined = join.result() if join is not None else None
    summary = write_outputs(insp, str(out), labels=joined).to_dict()
    return summary | ({"labels": joined.to_dict()} if joined is not None else {})


def dedup(store: str | Path, out: str | Path, *, threshold: float | None = None, **options: Any) -> dict[str, Any]:
    """``embedder dedup``: near-duplicate groups of STORE → the Parquet file OUT (group, id, path);
    returns the counts. ``options`` are ``InspectOptions`` fields (``memory_budget``, ``engine``, ``k``…)."""
    from embedder.analysis.dedup import dedup as run
    from embedder.analysis.options import InspectOptions

    (kw,) = _split_options(options, InspectOptions)
    k = kw.pop("k", InspectOptions.k)
    s = run(str(store), str(out), threshold, k, InspectOptions(**_inspect_budget(kw)))
    return dataclasses.asdict(s)


def export(path: str | Path, out: str | Path, *, format: str = "onnx", opset: int | None = None,
           weights: str | Path | None = None, force: bool = False) -> dict[str, Any]:
    """``embedder export``: a fine-tuned checkpoint or a probe file (with the frozen backbone its store
    was made with) as ONE model in OUT: ``model.onnx`` (uint8 RGB NCHW pixels at crop size in, class
    probabilities out, the mean/std normalisation inside) and ``embedder-export.json`` (classes,
    preprocessing, source, verification), checked by onnxruntime against PyTorch; returns what was
    written. WEIGHTS: the file a probe's store was made from, when it was. OUT must be new or empty
    unless FORCE (which replaces those two files)."""
    from embedder.learn.export import export as run

    result = run(path, out, format, opset, weights=str(weights) if weights is not None else None, force=force)
    return result.to_dict()


def finetune(train: str | Path | Sequence[str | Path], out: str | Path, *,
             val: str | Path | Sequence[str | Path] | None = None, resume: bool = False,
             labels: LabelsArg | None = None, **options: Any) -> dict[str, Any]:
    """``embedder finetune``: a pretrained backbone with a new head trained on TRAIN (labelled images,
    one subfolder per class) → the checkpoint OUT; returns the run's summary (accuracy per epoch, the
    frozen probe's for comparison). ``options`` are ``FinetuneOptions`` fields (``backbone`` as
    ``NAME`` or ``NAME:WEIGHTS_TAG``, ``weights_file``, ``epochs``, ``lr_head``, ``budget_minutes``…),
    with the CLI's defaults; an unknown name is an error that lists the valid ones. LABELS: a CSV or
    Parquet file of id,label rows (the ids extraction gives the images) put over the folders' labels
    (the result's ``labels``: what it did)."""
    from embedder.learn.finetune.options import FinetuneOptions
    from embedder.learn.finetune.train import finetune as run
    from embedder.models.builder import spec_for

    (kw,) = _split_options(options, FinetuneOptions)
    if kw.get("weights_file") is not None:
        kw["weights_file"] = Path(kw["weights_file"])
        kw.setdefault("backbone", None)  # as the CLI: a checkpoint names its own backbone
    if kw.get("backbone") is not None and kw.get("weights_tag") is None:  # "NAME:TAG", as the CLI takes it
        spec = spec_for(kw["backbone"], kw.get("weights_file"))
        kw["backbone"], kw["weights_tag"] = spec.backbone, spec.weights_tag
    opts = FinetuneOptions(**kw)

    def sources(s: str | Path | Sequence[str | Path]) -> list[str]:
        return [str(s)] if isinstance(s, (str, Path)) else [str(x) for x in s]

    result = run(sources(train), Path(out), opts, sources(val) if val is not None else None, resume,
                 labels=_join(labels))
    return result.to_dict()


def compare(train: str | Path | Sequence[str | Path], work: str | Path, *, backbones: str | Sequence[str],
            test: str | Path | Sequence[str | Path] | None = None, labels: LabelsArg | None = None,
            **options: Any) -> dict[str, Any]:
    """``embedder compare``: which backbone (and layer) transfers best to TRAIN's labelled images
    (one subfolder per class, or LABELS: a CSV or Parquet file of id,label rows over them) — kNN,
    LogME and the linear probe per cell, on TEST or a held-out 20 %; the cells' stores are cached
    under WORK. ``options`` are ``CompareOptions`` fields (``layers``, ``probe_top``, ``device``…).
    Returns the leaderboard (``cells``, ``winner``, ``margin``, ``p_value``, ``labels``)."""
    from embedder.analysis.compare import compare as run
    from embedder.analysis.options import CompareOptions

    (kw,) = _split_options(options, CompareOptions)
    for key in ("backbones", "layers"):
        if isinstance(kw.get(key), str):
            kw[key] = tuple(x.strip() for x in kw[key].split(",") if x.strip())
        elif key in kw:
            kw[key] = tuple(kw[key])
    names = backbones.split(",") if isinstance(backbones, str) else list(backbones)
    opts = CompareOptions(backbones=tuple(b.strip() for b in names if b.strip()), **kw)

    def sources(s: str | Path | Sequence[str | Path]) -> list[str]:
        return [str(s)] if isinstance(s, (str, Path)) else [str(x) for x in s]

    board = run(sources(train), str(work), opts, sources(test) if test is not None else None,
                labels_file=_join(labels))
    return board.to_dict()


def zero_shot(store: str | Path, *, test_store: str | Path | None = None, templates: Sequence[str] | None = None,
              class_names: dict[str, str] | str | Path | None = None, weights: str | Path | None = None,
              labels: LabelsArg | None = None, label_column: str = "label", device: str = "auto") -> dict[str, Any]:
    """``embedder probe --zero-shot-only``: the zero-shot accuracy of the model that made STORE (a
    CLIP-family backbone's own image embedding) on TEST_STORE, else on STORE's labelled images (which
    zero-shot never trains on). CLASS_NAMES: words for labels that are not (``{"0": "T-shirt"}``, or a
    file of ``label,name`` rows / one name per line); numeric labels without them are refused."""
    from embedder.learn.probe import load_dataset, load_test
    from embedder.learn.zeroshot import read_class_names, zero_shot_metrics

    join = _join(labels)
    train = load_dataset(str(store), label_column, labels=join)
    test = load_test(str(test_store), train, label_column, None, join) if test_store is not None else None
    names = (read_class_names(class_names, train.classes) if isinstance(class_names, (str, Path))
             else class_names)
    out = zero_shot_metrics(train, test, templates, None if weights is None else str(weights), device,
                            required=True, class_names=names)
    return dict(out or {})


def select(store: str | Path, budget: int, *, strategy: str = "auto", labels: LabelsArg | None = None, seed: int = 0,
           label_column: str | None = "label", out: str | Path | None = None) -> Any:
    """``embedder select``: which BUDGET images of STORE to label first (``Selection``: ``.table`` of
    id, path, rank, why; ``.strategy``; ``.reason``). ``label_column=None`` sets the store's own labels
    aside; OUT: also write the selection file the labelling page reads."""
    from embedder.learn.active import select as pick
    from embedder.learn.active import write_selection

    sel = pick(str(store), budget, strategy, labels, seed, label_column)
    if out is not None:
        write_selection(out, sel)
    return sel

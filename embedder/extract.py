"""Batched inference of a frozen backbone into a store.

``BatchEmbedder`` is the engine-agnostic unit: the model is loaded once in ``__init__``; a
``pa.Table`` of paths goes in and a ``pa.Table`` of vectors comes out. The local pipeline below
and a Ray Data actor pool (``map_batches(BatchEmbedder, fn_constructor_args=..., batch_format=
"pyarrow")``) both drive it unchanged. The local pipeline adds what one machine needs: decode
threads that run ahead of the model, atomic shards, resume and error bookkeeping.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import platform
import time
import uuid
from collections import deque
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from embedder import __version__
from embedder.decode import (
    DECODERS,
    DEFAULT_MAX_PIXELS,
    Decoded,
    ImageMeta,
    decode_file,
    decode_into,
    normalize_batch,
)
from embedder.errors import DecodeError, EmbedderError, ProvenanceMismatch
from embedder.model import LoadedModel, ModelSpec, load_model, resolve_device
from embedder.provenance import Provenance
from embedder.sources import ImageRef, discover, image_id
from embedder.store import ERRORS_SCHEMA, ShardBuffer, Store, embeddings_to_arrow, row_schema

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class EmbedOptions:
    """How vectors are computed (device, precision) and stored (dtype, normalisation)."""

    device: str = "auto"
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    dtype: str = "float32"  # stored dtype: float32 | float16
    normalize: str = "none"  # none | l2
    channels_last: bool = True
    compile: bool = False  # torch.compile the model (fixed batch shape; the last batch is padded)
    max_pixels: int = DEFAULT_MAX_PIXELS
    decoder: str = "pil"  # pil (bit-identical to weights.transforms()) | pil-draft | torchvision


@dataclass(frozen=True)
class RunOptions:
    """How the local pipeline schedules work."""

    batch_size: int | None = None  # None: 8 on CPU (cache-friendly, measured), 128 on CUDA
    workers: int | None = None  # decode threads; None: from the core count
    prefetch_batches: int = 4
    shard_rows: int = 4096
    flush_seconds: float = 60.0
    retry_failed: bool = False


@dataclass
class ExtractSummary:
    discovered: int = 0
    skipped_present: int = 0
    skipped_failed_before: int = 0
    done: int = 0
    failed: int = 0
    seconds: float = 0.0
    device: str = ""
    store: str = ""
    failures: list[tuple[str, str]] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return (self.done + self.failed) / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "failures"}
        d["images_per_second"] = round(self.images_per_second, 2)
        d["failures"] = [{"path": p, "reason": r} for p, r in self.failures[:100]]
        return d


ProgressFn = Callable[[int, int], None]  # (images advanced, failed so far)


def _versions() -> dict[str, str]:
    import PIL
    import pyarrow
    import torchvision

    return {"embedder": __version__, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "pillow": PIL.__version__,
            "pyarrow": pyarrow.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


class BatchEmbedder:
    """Model loaded once; batch of paths in, Arrow table out."""

    def __init__(self, spec: ModelSpec, options: EmbedOptions = EmbedOptions()) -> None:
        if options.dtype not in ("float32", "float16"):
            raise EmbedderError(f"unknown dtype {options.dtype!r}; valid: float32, float16")
        if options.normalize not in ("none", "l2"):
            raise EmbedderError(f"unknown normalisation {options.normalize!r}; valid: none, l2")
        if options.decoder not in DECODERS:
            raise EmbedderError(f"unknown decoder {options.decoder!r}; valid: {', '.join(DECODERS)}")
        if options.precision not in PRECISIONS:
            raise EmbedderError(f"unknown precision {options.precision!r}; valid: {', '.join(PRECISIONS)}")
        self.spec = spec
        self.options = options
        self.device = resolve_device(options.device)
        self.loaded: LoadedModel = load_model(spec)
        self.precision = options.precision
        if self.precision == "auto":
            self.precision = "bf16" if self.device.type == "cuda" else "fp32"
        if self.device.type == "cuda" and self.precision == "fp32":
            # fp32 means fp32: cuDNN would otherwise run convolutions in TF32 on Ampere and later
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        model = self.loaded.model.to(self.device)
        if options.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if options.compile:
            # one graph for one shape: embed_stream always passes whole batch buffers
            model = torch.compile(model, dynamic=False)  # type: ignore[assignment]
        self.model = model
        self.schema = row_schema(self.loaded.dim, options.dtype)

    @property
    def dim(self) -> int:
        return self.loaded.dim

    def provenance(self) -> Provenance:
        """How this embedder's vectors are made (stamped on every shard it writes)."""
        return Provenance(
            backbone=self.loaded.backbone.name, weights=self.loaded.weights.info,
            layer=self.loaded.layer, pool=self.loaded.pool, preprocessing=self.loaded.preprocessing,
            dim=self.loaded.dim, decoder=self.options.decoder,
            precision=self.precision, normalize=self.options.normalize, dtype=self.options.dtype,
            versions=_versions(), created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        )

    def decode(self, path: str) -> Decoded:
        return decode_file(path, self.loaded.preprocessing, self.options.max_pixels, self.options.decoder)

    def decode_into(self, path: str, out: torch.Tensor) -> ImageMeta:
        return decode_into(path, self.loaded.preprocessing, out, self.options.max_pixels, self.options.decoder)

    @torch.inference_mode()
    def embed_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """uint8 [N,3,H,W] → float32 [N, dim] (L2-normalised when asked)."""
        if self.device.type == "cuda" and not pixels.is_pinned():
            pixels = pixels.pin_memory()  # lets the host-to-device copy run asynchronously
        x = pixels.to(self.device, non_blocking=True)
        x = normalize_batch(x, self.loaded.preprocessing)
        if self.options.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            with torch.autocast(self.device.type, dtype=dtype):
                out = self.model(x)
        else:
            out = self.model(x)
        out = out.float()
        if self.options.normalize == "l2":
            out = torch.nn.functional.normalize(out, dim=1)
        return out.cpu().numpy()

    def rows(self, refs: Sequence[ImageRef], decoded: Sequence[Decoded]) -> pa.Table:
        vectors = self.embed_pixels(torch.stack([d.pixels for d in decoded]))
        return self.rows_from(refs, decoded, vectors)

    def rows_from(self, refs: Sequence[ImageRef], metas: Sequence[ImageMeta | Decoded],
                  vectors: np.ndarray) -> pa.Table:
        return pa.Table.from_arrays([
            pa.array([r.id for r in refs], pa.string()),
            pa.array([r.path for r in refs], pa.string()),
            pa.array([r.label for r in refs], pa.string()),
            embeddings_to_arrow(vectors, self.options.dtype),
            pa.array([d.width for d in metas], pa.int32()),
            pa.array([d.height for d in metas], pa.int32()),
            pa.array([d.file_hash for d in metas], pa.string()),
        ], schema=self.schema)

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Ray-style entry point: columns path (+ optional id, label) → rows plus an error column.

        Failed images come back with a null embedding and the reason in ``error``.
        """
        paths = batch.column("path").to_pylist()
        ids = batch.column("id").to_pylist() if "id" in batch.column_names else None
        labels = batch.column("label").to_pylist() if "label" in batch.column_names else None
        refs = [ImageRef(ids[i] if ids else image_id(p), p, labels[i] if labels else None)
                for i, p in enumerate(paths)]
        good_refs, good, errors = [], [], {}
        for ref in refs:
            try:
                good.append(self.decode(ref.path))
                good_refs.append(ref)
            except DecodeError as e:
                errors[ref.id] = str(e)
        table = self.rows(good_refs, good) if good else self.schema.empty_table()
        table = table.append_column("error", pa.nulls(table.num_rows, pa.string()))
        if errors:
            failed = [r for r in refs if r.id in errors]
            fail_table = pa.Table.from_pydict({
                "id": [r.id for r in failed], "path": [r.path for r in failed],
                "label": [r.label for r in failed],
                "embedding": pa.nulls(len(failed), self.schema.field("embedding").type),
                "width": pa.nulls(len(failed), pa.int32()), "height": pa.nulls(len(failed), pa.int32()),
                "file_hash": pa.nulls(len(failed), pa.string()),
                "error": [errors[r.id] for r in failed],
            }, schema=table.schema)
            table = pa.concat_tables([table, fail_table])
        return table


def default_workers() -> int:
    cores = os.cpu_count() or 2
    return max(1, min(16, cores - 1))


class _Batch:
    """One slot of the ring: a reused uint8 pixel buffer and the decode futures writing into it."""

    def __init__(self, pixels: torch.Tensor) -> None:
        self.pixels = pixels
        self.refs: list[ImageRef] = []
        self.futures: list[Future[ImageMeta]] = []


def embed_stream(
    refs: Sequence[ImageRef],
    embedder: BatchEmbedder,
    run: RunOptions,
    on_error: Callable[[ImageRef, str], None],
) -> Generator[tuple[pa.Table, int], None, None]:
    """Decode in threads that run ahead of the model; yield (rows, failed in this batch) per batch.

    Decode threads write pixels straight into a fixed ring of ``prefetch_batches + 1`` reused
    batch buffers (pinned on CUDA, so host-to-device copies need no staging): no per-image tensors,
    no per-batch stacking, and the memory of the pipeline is fixed. (What made extraction memory
    grow with the collection was elsewhere: see ``store.ShardBuffer``.) Shared by extract (which
    writes shards) and predict (which applies a head).
    """
    bs = run.batch_size or (128 if embedder.device.type == "cuda" else 8)
    crop = embedder.loaded.preprocessing.crop_size
    n_slots = max(2, run.prefetch_batches) + 1
    pin = embedder.device.type == "cuda"
    slots = [_Batch(torch.empty((bs, 3, crop, crop), dtype=torch.uint8, pin_memory=pin))
             for _ in range(n_slots)]
    in_flight: deque[_Batch] = deque()
    free: deque[_Batch] = deque(slots)
    it = iter(refs)
    with ThreadPoolExecutor(max_workers=run.workers or default_workers(),
                            thread_name_prefix="decode") as pool:

        def fill(slot: _Batch) -> bool:
            slot.refs = [r for _, r in zip(range(bs), it)]
            slot.futures = [pool.submit(embedder.decode_into, r.path, slot.pixels[i])
                            for i, r in enumerate(slot.refs)]
            return bool(slot.refs)

        try:
            while free and fill(free[0]):
                in_flight.append(free.popleft())
            while in_flight:
                slot = in_flight.popleft()
                good: list[int] = []
                metas: list[ImageMeta] = []
                failed = 0
                for i, (ref, fut) in enumerate(zip(slot.refs, slot.futures)):
                    try:
                        metas.append(fut.result())
                        good.append(i)
                    except DecodeError as e:
                        failed += 1
                        on_error(ref, str(e))
                        log.info("skipped %s: %s", ref.path, e)
                if good:
                    # a compiled model sees one shape: the whole buffer (the last batch padded with
                    # stale rows, whose outputs are dropped)
                    n = bs if embedder.options.compile else len(slot.refs)
                    vectors = embedder.embed_pixels(slot.pixels[:n])[:len(slot.refs)]
                    if failed:
                        vectors = vectors[good]
                    table = embedder.rows_from([slot.refs[i] for i in good], metas, vectors)
                else:
                    table = embedder.schema.empty_table()
                slot.futures = []
                if fill(slot):  # the buffer is free again: decode the batch after the queued ones
                    in_flight.append(slot)
                yield table, failed
        finally:
            for slot in in_flight:
                for fut in slot.futures:
                    fut.cancel()


def extract(
    sources: Sequence[str],
    store_path: str,
    spec: ModelSpec,
    embed: EmbedOptions = EmbedOptions(),
    run: RunOptions = RunOptions(),
    progress: Callable[[int, int, int], None] | None = None,
    embedder: BatchEmbedder | None = None,
) -> ExtractSummary:
    """Embed every image under SOURCES not already in STORE; resumable, atomic, incremental.

    ``progress(total, advanced, failed)`` is called once with advanced=0 to announce the total,
    then after every batch.
    """
    t_start = time.perf_counter()
    refs = discover(sources)
    embedder = embedder or BatchEmbedder(spec, embed)
    summary = ExtractSummary(discovered=len(refs), device=str(embedder.device), store=store_path)
    provenance = embedder.provenance()
    with Store.writer(store_path, provenance) as store:
        _fill(store, refs, embedder, provenance, run, summary, progress, t_start)
    return summary


def _fill(store: Store, refs: Sequence[ImageRef], embedder: BatchEmbedder, provenance: Provenance,
          run: RunOptions,
          summary: ExtractSummary, progress: Callable[[int, int, int], None] | None,
          t_start: float) -> None:
    """Embed what the store lacks, flushing whole shards as it goes (caller holds the lock)."""
    present = store.ids()
    failed_before = set() if run.retry_failed else store.failed_ids() - present
    todo = []
    for r in refs:
        if r.id in present:
            summary.skipped_present += 1
        elif r.id in failed_before:
            summary.skipped_failed_before += 1
        else:
            todo.append(r)
    if progress:
        progress(len(todo), 0, 0)
    run_record: dict[str, Any] = {
        "run_id": uuid.uuid4().hex[:12],
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": str(embedder.device), "precision": embedder.precision,
        "torch_threads": torch.get_num_threads(), "host": platform.node(),
        "decoder": embedder.options.decoder, "compiled": embedder.options.compile,
    }
    if not todo:
        summary.seconds = time.perf_counter() - t_start
        return

    buffer = ShardBuffer(embedder.dim, embedder.options.dtype, run.shard_rows)
    pending_errors: list[dict[str, Any]] = []
    last_flush = time.monotonic()

    def flush() -> None:
        nonlocal last_flush
        if buffer.rows:
            store.write_shard(buffer.take(), provenance)
        if pending_errors:
            store.write_errors(pa.Table.from_pylist(pending_errors, schema=ERRORS_SCHEMA))
        pending_errors.clear()
        last_flush = time.monotonic()
        run_record.update(done=summary.done, failed=summary.failed,
                          seconds=round(time.perf_counter() - t_start, 2))
        store.update_manifest(run_record)

    def on_error(ref: ImageRef, reason: str) -> None:
        summary.failed += 1
        summary.failures.append((ref.path, reason))
        pending_errors.append({"id": ref.id, "path": ref.path, "reason": reason,
                               "time": dt.datetime.now(dt.UTC)})

    try:
        with closing(embed_stream(todo, embedder, run, on_error)) as stream:
            for table, n_failed in stream:
                summary.done += table.num_rows
                rest = buffer.append(table)
                while rest.num_rows:  # a batch larger than what is left of the shard
                    flush()
                    rest = buffer.append(rest)
                if progress:
                    progress(len(todo), table.num_rows + n_failed, summary.failed)
                if buffer.full or time.monotonic() - last_flush >= run.flush_seconds:
                    flush()
    finally:
        # Whatever finished is kept, even on Ctrl-C or an unexpected error.
        summary.seconds = time.perf_counter() - t_start
        flush()


def spec_from_provenance(prov: Provenance, weights_file: str | None = None) -> ModelSpec:
    """The ModelSpec that reproduces a store's vectors (for queries and predictions)."""
    path = None
    if prov.weights.needs_file:
        if weights_file is None:
            raise ProvenanceMismatch(f"these vectors were made with {prov.weights.kind} weights "
                                     f"{prov.weights.name}; pass that file with --weights FILE")
        path = Path(weights_file)
    layer = None if prov.layer == "penultimate" else prov.layer
    pool = prov.pool if layer is not None else None
    return ModelSpec(prov.backbone, prov.weights.tag, path, layer, pool, prov.preprocessing.crop_size)


def embedder_for(prov: Provenance, weights_file: str | None = None, device: str = "auto") -> BatchEmbedder:
    """A BatchEmbedder that provably makes vectors comparable with those ``prov`` describes."""
    emb = BatchEmbedder(spec_from_provenance(prov, weights_file),
                        EmbedOptions(device=device, normalize=prov.normalize, precision=prov.precision,
                                     decoder=prov.decoder))
    prov.require(emb.provenance(), store=False, what="the indexed or training vectors were",
                 fix="the query model must be the same backbone, weights, layer, preprocessing and precision")
    return emb


def embed_files(emb: BatchEmbedder, paths: Sequence[str]) -> np.ndarray:
    """Embed a few query images; a file that fails to decode is a one-line error naming it."""
    decoded = []
    for p in paths:
        try:
            decoded.append(emb.decode(p))
        except DecodeError as e:
            raise DecodeError(f"query image {p}: {e}") from None
    return emb.embed_pixels(torch.stack([d.pixels for d in decoded]))

"""Batched inference of a frozen backbone into a store.

``BatchEmbedder`` is the engine-agnostic unit: the model is loaded once in ``__init__``; decoded
uint8 pixels go in (``launch`` / ``embed_pixels``, the pixels-in entry point) and vectors come out;
``__call__`` is the paths-in entry point built on it (a ``pa.Table`` of paths in, rows out). The
local pipeline below (decode workers running ahead of the model into a ring of batch buffers) and
the Ray engine (``ray_engine``: decode tasks, model actors) both feed the pixels-in entry point, and
both write through ``fill_store``: atomic shards, resume and error bookkeeping.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import platform
import time
import uuid
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, cast

import numpy as np
import pyarrow as pa
import torch

from embedder import __version__, choices
from embedder.choices import DECODERS
from embedder.decode.common import DEFAULT_MAX_PIXELS, Decoded, ImageMeta, normalize_batch
from embedder.decode.decoders import decode_file, resolve_decoder
from embedder.decode.pool import (
    DECODE_IN,
    DECODE_PRIORITIES,
    DecodeSpec,
    DecodeWorkers,
    Outcome,
    Ring,
    decode_rows,
    default_workers,
    resolve_decode_in,
    start_server,
)
from embedder.embed import worklist
from embedder.errors import DecodeError, EmbedderError, ProvenanceMismatch
from embedder.io import storage
from embedder.io.sources import ImageRef, image_id, iter_discover
from embedder.models.builder import ModelSpec
from embedder.models.cpu_graph import AUTO_MIN_BATCHES, CPU_GRAPHS, GraphChoice, onednn_graph, pick
from embedder.models.devices import resolve_device
from embedder.models.features import LoadedModel, load_model
from embedder.store.provenance import Provenance
from embedder.store.shards import ERRORS_SCHEMA, ShardBuffer, Store, embeddings_to_arrow, row_schema

log = logging.getLogger(__name__)

PRECISIONS = choices.PRECISION_CHOICES
# Batch sizes when none is given. CPU: small batches keep activations in cache; measured on 2 cores
# in one interleaved run (MobileNetV2, 500x375 JPEGs, 5 rounds): batch 4 against 8, model only
# 182-189 vs 144-156 img/s, extract with two lanes 117-124 vs 96-104; batches 2 and 6 level with 4;
# ResNet-50 level or better at 4; the Ray engine's CPU actors level or slightly ahead at 4
# (docs/benchmarks.md, "Model lanes" and "Ray engine"). CUDA: 128.
CPU_BATCH, CUDA_BATCH = 4, 128


def default_batch(device: torch.device) -> int:
    return CUDA_BATCH if device.type == "cuda" else CPU_BATCH


def default_lanes() -> int:
    """CPU model lanes (``BatchEmbedder.cpu_lanes``): two batches at once wherever there are two
    cores to run them on."""
    return 2 if (os.cpu_count() or 1) >= 2 else 1


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
    # pil (bit-identical to weights.transforms()) | pil-draft | pil-reduce | torchvision | nvjpeg | auto
    decoder: str = "pil"
    cpu_graph: str = "auto"  # CPU, fp32: eager | onednn (TorchScript, oneDNN) | auto (timed on long runs)


@dataclass(frozen=True)
class RunOptions:
    """How the local pipeline schedules work."""

    batch_size: int | None = None  # None: default_batch (4 on CPU, 128 on CUDA)
    workers: int | None = None  # decode workers; None: one per core but one
    decode_in: str = "auto"  # threads | processes | lanes | auto (processes with a GPU; lanes on a CPU
    # when each model lane has one thread, threads otherwise)
    decode_priority: str = "normal"  # normal | idle (decode workers only on cores nothing else wants)
    model_lanes: int | None = None  # CPU: batches computed at once; None: 2 where there are 2+ cores
    prefetch_batches: int = 4
    shard_rows: int = 4096
    flush_seconds: float = 60.0
    retry_failed: bool = False

    def __post_init__(self) -> None:
        # checked before anything is created or started, not when the first batch is decoded
        if self.decode_in not in DECODE_IN:
            raise EmbedderError(f"unknown --decode-in {self.decode_in!r}; valid: {', '.join(DECODE_IN)}")
        if self.model_lanes is not None and self.model_lanes < 1:
            raise EmbedderError(f"--model-lanes must be at least 1, got {self.model_lanes}")
        if self.decode_priority not in DECODE_PRIORITIES:
            raise EmbedderError(f"unknown --decode-priority {self.decode_priority!r}; "
                                f"valid: {', '.join(DECODE_PRIORITIES)}")


MAX_FAILURES_SHOWN = 100  # failures a summary lists (all of them are in the store's errors table)


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
    failures: list[tuple[str, str]] = field(default_factory=list)  # the first MAX_FAILURES_SHOWN only
    stages: dict[str, Any] = field(default_factory=dict)  # StageTimes.report: what bounded the run

    def note_failure(self, path: str, reason: str) -> None:
        """Every failure is in the store's errors table; the summary keeps the first few to show."""
        if len(self.failures) < MAX_FAILURES_SHOWN:
            self.failures.append((path, reason))

    @property
    def images_per_second(self) -> float:
        return (self.done + self.failed) / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "failures"}
        d["images_per_second"] = round(self.images_per_second, 2)
        d["failures"] = [{"path": p, "reason": r} for p, r in self.failures[:100]]
        return d


@dataclass
class StageTimes:
    """Where a run's time went, to name the stage that bounds throughput."""

    decode_wait_s: float = 0.0  # the model loop waiting for decoded pixels
    copy_s: float = 0.0  # host-to-device copies (CUDA events on the copy stream)
    # the model: on CUDA the span from its first to its last kernel of each batch (CUDA events; it
    # includes gaps where the GPU waits for the host to launch kernels), wall time on CPU
    model_s: float = 0.0
    launch_s: float = 0.0  # CUDA: host time spent launching the model's kernels (Python, the GIL)
    write_s: float = 0.0  # rows into the shard buffer, and waiting for the shard writer
    decode_s: float = 0.0  # decoding inside the CPU model lanes (--decode-in lanes), summed over them
    lanes: int = 1  # batches the model computes at once (CPU lanes); model_s sums over them

    def report(self, wall_s: float) -> dict[str, Any]:
        busy = {"decode": self.decode_wait_s + self.decode_s / self.lanes, "copy": self.copy_s,
                "model": self.model_s / self.lanes,
                "launch": self.launch_s, "write": self.write_s}
        if self.launch_s > 0.8 * self.model_s > 0:  # the GPU spent its span waiting for launches
            busy["model"] = 0.0
        return {**{k: round(v, 3) for k, v in self.__dict__.items()},
                "model_utilisation": round(self.model_s / self.lanes / wall_s, 3) if wall_s > 0 else 0.0,
                "bound_by": max(busy, key=lambda k: busy[k])}


@dataclass(frozen=True)
class LaneResult:
    """What a lane that decoded its own batch returns (``BatchEmbedder.launch_decoding``)."""

    outcomes: list[Outcome]  # per row: its metadata, or why it was skipped
    vectors: np.ndarray | None  # one row per outcome (None: every row failed)
    decode_s: float
    model_s: float


class Pending:
    """A batch launched on the model (see ``BatchEmbedder.launch``)."""

    def __init__(self, embedder: BatchEmbedder, vectors: np.ndarray | None, host: torch.Tensor | None = None,
                 done: Any = None, copied: Any = None, timing: list[Any] | None = None,
                 lane: Future[tuple[np.ndarray, float]] | None = None) -> None:
        self._embedder, self._vectors, self._host = embedder, vectors, host
        self._done, self._copied, self._timing = done, copied, timing
        self._lane = lane

    def wait_copied(self) -> None:
        """Block until the input pixels are on the device (their host buffer may then be reused);
        on a CPU lane the pixels are in use until the batch is computed."""
        if self._copied is not None:
            self._copied.synchronize()
        elif self._lane is not None:
            self.result()

    def result(self) -> np.ndarray:
        if self._lane is not None:
            self._vectors, seconds = self._lane.result()
            self._embedder.stages.model_s += seconds
            self._lane = None
        if self._vectors is None:
            self._done.synchronize()
            if self._timing is not None:
                t = self._timing
                self._embedder.stages.copy_s += t[0].elapsed_time(t[1]) / 1000
                self._embedder.stages.model_s += t[2].elapsed_time(t[3]) / 1000
            self._vectors = cast(torch.Tensor, self._host).numpy()
        return self._vectors


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
        if options.decoder not in (*DECODERS, "auto"):
            raise EmbedderError(f"unknown decoder {options.decoder!r}; valid: auto, {', '.join(DECODERS)}")
        options = replace(options, decoder=resolve_decoder(options.decoder))  # provenance names the real one
        if options.precision not in PRECISIONS:
            raise EmbedderError(f"unknown precision {options.precision!r}; valid: {', '.join(PRECISIONS)}")
        if options.cpu_graph not in CPU_GRAPHS:
            raise EmbedderError(f"unknown --cpu-graph {options.cpu_graph!r}; valid: {', '.join(CPU_GRAPHS)}")
        self.spec = spec
        self.options = options
        self.device = resolve_device(options.device)
        if options.decoder == "nvjpeg" and self.device.type != "cuda":
            raise EmbedderError("--decoder nvjpeg decodes on the GPU and needs a CUDA device; "
                                "on CPU use --decoder torchvision (the same resize, libjpeg-turbo)")
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
        self.model: torch.nn.Module = model
        self._eager: torch.nn.Module = model
        self._onednn: torch.nn.Module | None = None
        self._onednn_built = False
        self._graph_choices: dict[tuple[str, int, int], GraphChoice] = {}
        self.graph_choice: GraphChoice | None = None  # set by prepare_graph (CPU runs)
        self.schema = row_schema(self.loaded.dim, options.dtype)
        self.stages = StageTimes()
        self._copy_stream: Any = None
        self._lanes: ThreadPoolExecutor | None = None
        self._lane_count = 1

    @contextmanager
    def cpu_lanes(self, lanes: int) -> Iterator[int]:
        """On a CPU, compute up to LANES batches at once, each on its own thread with its share of
        torch's threads (``launch`` then returns at once). Yields the number of lanes in use: 1 on
        CUDA, with a compiled model (its kernels fix their thread count when compiled) or when
        LANES is 1.

        Why: a parallel region is as slow as its slowest thread, so one batch on all cores stalls
        whenever anything else (decoding) takes a core from one of torch's threads; independent
        lanes do not wait for each other. Measured on 2 cores, MobileNetV2 at batch 8, 500x375
        JPEGs: the model alone is as fast either way, end to end two lanes were faster than one in
        each of 7 interleaved runs, by 1-16 % (docs/benchmarks.md, "Model lanes").
        """
        lanes = self.usable_lanes(lanes)
        if lanes <= 1:
            yield 1
            return
        threads = self.lane_threads(lanes)
        self._lanes = ThreadPoolExecutor(max_workers=lanes, thread_name_prefix="model-lane",
                                         initializer=torch.set_num_threads, initargs=(threads,))
        self.stages.lanes = self._lane_count = lanes
        try:
            yield lanes
        finally:
            self._lanes.shutdown(wait=True)
            self._lanes = None
            self._lane_count = 1

    def prepare_graph(self, batch: int, batches: int) -> GraphChoice:
        """Settle which graph computes this run's batches (``cpu_graph``), for BATCH-sized batches on
        the lanes now open (``cpu_lanes``), the run being BATCHES batches long. ``auto`` times the
        eager model against the oneDNN graph on a lane (its thread count is the run's) and keeps the
        faster; a run shorter than ``AUTO_MIN_BATCHES`` is not worth the timing and stays eager,
        unless this embedder has timed that setting already. Only on a CPU, in fp32, uncompiled."""
        if self.device.type != "cpu":
            return GraphChoice("eager")  # not recorded: there is no CPU graph to speak of
        choice = self._settle_graph(batch, batches)
        if choice.graph == "onednn" and self._onednn is not None:
            self.model = self._onednn
        elif self.model is self._onednn:
            self.model = self._eager
        self.graph_choice = choice
        log.info("CPU graph: %s %s", choice.graph, choice.record())
        return choice

    def _settle_graph(self, batch: int, batches: int) -> GraphChoice:
        option = self.options.cpu_graph
        if self.options.compile or self.precision != "fp32":
            return GraphChoice("eager", reason="the oneDNN graph is for fp32, uncompiled")
        if option == "eager":
            return GraphChoice("eager")
        key = (option, batch, self._lane_count)
        if key in self._graph_choices:
            return self._graph_choices[key]
        if option == "auto" and batches < AUTO_MIN_BATCHES:
            return GraphChoice("eager", reason=f"a run of fewer than {AUTO_MIN_BATCHES} batches is not timed")
        crop = self.loaded.preprocessing.crop_size
        x = self._model_input(torch.randint(0, 256, (batch, 3, crop, crop), dtype=torch.uint8))
        graph = self._onednn_graph(x)
        if graph is None:
            choice = GraphChoice("eager", reason="no oneDNN graph for this model")
        elif option == "onednn":
            choice = GraphChoice("onednn")
        else:
            task = partial(pick, partial(self._eager, x), partial(graph, x))
            choice = self._lanes.submit(task).result() if self._lanes is not None else task()
        self._graph_choices[key] = choice
        return choice

    def _onednn_graph(self, example: torch.Tensor) -> torch.nn.Module | None:
        if not self._onednn_built:
            self._onednn = onednn_graph(self._eager, example)
            self._onednn_built = True
        return self._onednn

    def usable_lanes(self, lanes: int) -> int:
        """The lanes ``cpu_lanes(LANES)`` runs: 1 on CUDA or with a compiled model."""
        return 1 if self.device.type != "cpu" or self.options.compile else max(1, lanes)

    @staticmethod
    def lane_threads(lanes: int) -> int:
        """Torch threads each of LANES lanes computes on: its share of the caller's."""
        return max(1, torch.get_num_threads() // lanes)

    def launch_decoding(self, decode: Callable[[], list[Outcome]], pixels: torch.Tensor) -> Future[LaneResult]:
        """On a CPU lane (inside ``cpu_lanes``): run DECODE, which fills PIXELS and says per row what
        came of it, then embed PIXELS, as one task. A lane's thread decodes its own batch and then
        computes it, so the cores never hold more busy threads than there are lanes (decode threads
        beside the lanes take cores from them; measured on 2 cores, docs/benchmarks.md "Decoding in
        the lanes"). Rows that failed to decode are computed on stale pixels and dropped by the caller."""
        if self._lanes is None:
            raise EmbedderError("decoding in lanes needs CPU model lanes (inside cpu_lanes, 2 or more)")
        return self._lanes.submit(self._decode_and_compute, decode, pixels)

    def _decode_and_compute(self, decode: Callable[[], list[Outcome]], pixels: torch.Tensor) -> LaneResult:
        t0 = time.perf_counter()
        outcomes = decode()
        decoded = time.perf_counter() - t0
        if not any(isinstance(o, ImageMeta) for o in outcomes):
            return LaneResult(outcomes, None, decoded, 0.0)
        vectors, seconds = self._compute(pixels[:len(outcomes)])
        return LaneResult(outcomes, vectors, decoded, seconds)

    def _compute(self, pixels: torch.Tensor) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        with torch.inference_mode():
            vectors = self._forward(pixels.to(self.device)).numpy()
        return vectors, time.perf_counter() - t0

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

    def _model_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [N,3,H,W] → the normalised float batch the model takes, in its memory layout."""
        x = normalize_batch(pixels, self.loaded.preprocessing)
        return x.contiguous(memory_format=torch.channels_last) if self.options.channels_last else x

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [N,3,H,W] on the model's device → float32 [N, dim] on that device."""
        x = self._model_input(x)
        if self.precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            with torch.autocast(self.device.type, dtype=dtype):
                out = self.model(x)
        else:
            out = self.model(x)
        out = out.float()
        if self.options.normalize == "l2":
            out = torch.nn.functional.normalize(out, dim=1)
        return out

    @torch.inference_mode()
    def launch(self, pixels: torch.Tensor) -> Pending:
        """Start embedding a uint8 batch [N,3,H,W] (host memory, or already on the model's device).

        On CUDA nothing here waits for the GPU: the host-to-device copy runs on a side stream
        (overlapping the previous batch's compute), the model on the current stream after it, and
        the result comes back into page-locked host memory; ``Pending.wait_copied`` says when the
        host buffer may be refilled and ``Pending.result`` waits for the vectors. On CPU the batch
        is computed before this returns.
        """
        if self.device.type != "cuda":
            if self._lanes is not None:
                return Pending(self, None, lane=self._lanes.submit(self._compute, pixels))
            vectors, seconds = self._compute(pixels)
            self.stages.model_s += seconds
            return Pending(self, vectors)
        t_host = time.perf_counter()
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)
        timing = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        copied = timing[1]
        if pixels.device.type == "cuda":
            x = pixels
            timing[0].record()
            copied.record()
        else:
            if not pixels.is_pinned():
                pixels = pixels.pin_memory()  # staged: an asynchronous copy needs page-locked memory
            with torch.cuda.stream(self._copy_stream):
                timing[0].record(self._copy_stream)
                x = pixels.to(self.device, non_blocking=True)
                copied.record(self._copy_stream)
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(copied)
            x.record_stream(compute)  # allocated on the copy stream, consumed on this one
        timing[2].record()
        out = self._forward(x)
        timing[3].record()
        host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
        host.copy_(out, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self.stages.launch_s += time.perf_counter() - t_host
        return Pending(self, None, host, done, copied, timing)

    def embed_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """uint8 [N,3,H,W] → float32 [N, dim] (L2-normalised when asked)."""
        return self.launch(pixels).result()

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


@dataclass
class _Launched:
    """A batch on the model: which rows came through decoding, and the pending vectors."""

    slot: int
    refs: list[ImageRef]
    metas: list[ImageMeta]
    good: list[int]
    failed: int
    pending: Pending | None


def _run_lanes(embedder: BatchEmbedder, run: RunOptions) -> int:
    """The CPU model lanes a run gets: ``--model-lanes`` or the default, as far as the model allows."""
    return embedder.usable_lanes(default_lanes() if run.model_lanes is None else run.model_lanes)


def embed_stream(
    refs: worklist.Refs,
    embedder: BatchEmbedder,
    run: RunOptions,
    on_error: Callable[[ImageRef, str], None],
) -> Generator[tuple[pa.Table, int], None, None]:
    """Decode in workers that run ahead of the model; yield (rows, failed in this batch) per batch.

    Decode workers (threads or processes, ``decode_pool``) write pixels straight into a fixed ring
    of ``prefetch_batches + 1`` reused batch buffers (shared and page-locked where that helps): no
    per-image tensors, no per-batch stacking, fixed memory. Batch k+1 is launched on the model
    before batch k's vectors are collected, so on a GPU the device works while the host turns
    vectors into rows, and on a CPU two lanes compute batches k and k+1 at once (see
    ``BatchEmbedder.cpu_lanes``); a slot is refilled as soon as its pixels are on the device (on a
    CPU lane: once its vectors are back). With ``decode_in="lanes"`` (what ``auto`` picks on a CPU
    whose lanes have one thread each) there are no decode workers: each lane decodes its own batch
    and then computes it (``_stream_in_lanes``). Shared by extract (which writes shards) and predict
    (which applies a head).
    """
    bs = run.batch_size or default_batch(embedder.device)
    crop = embedder.loaded.preprocessing.crop_size
    n_slots = max(2, run.prefetch_batches) + 1
    workers = run.workers or default_workers()
    lanes_wanted = _run_lanes(embedder, run)
    kind = resolve_decode_in(run.decode_in, embedder.device, workers, n_slots * bs * 3 * crop * crop,
                             embedder.options.decoder,
                             # idle decode priority is for decode workers: auto keeps them then
                             embedder.lane_threads(lanes_wanted) if lanes_wanted > 1 and (
                                 run.decode_in == "lanes" or run.decode_priority == "normal") else None)
    if kind == "lanes":
        yield from _stream_in_lanes(refs, embedder, bs, lanes_wanted, on_error)
        return
    ring = Ring(n_slots, bs, crop, shared=kind == "processes", pin=embedder.device.type == "cuda")
    spec = DecodeSpec(embedder.loaded.preprocessing, embedder.options.max_pixels, embedder.options.decoder)
    on_device = spec.decoder == "nvjpeg"  # decode threads write the batch on the GPU directly
    slot_device: list[torch.Tensor | None] = [None] * n_slots
    slot_refs: list[list[ImageRef]] = [[] for _ in range(n_slots)]
    slot_futures: list[list[Future[list[Outcome]]]] = [[] for _ in range(n_slots)]
    in_flight: deque[int] = deque()
    it = iter(refs)
    stages = embedder.stages

    def finish(b: _Launched) -> tuple[pa.Table, int]:
        if b.pending is None:
            return embedder.schema.empty_table(), b.failed
        vectors = b.pending.result()[:len(b.refs)]
        if b.failed:
            vectors = vectors[b.good]
        return embedder.rows_from([b.refs[i] for i in b.good], b.metas, vectors), b.failed

    try:
        with DecodeWorkers(ring, spec, kind, workers, run.decode_priority) as pool, \
                embedder.cpu_lanes(lanes_wanted) as lanes:
            embedder.prepare_graph(bs, -(-len(refs) // bs))
            # with CPU lanes a batch's slot is in use until its vectors are back: it is refilled
            # then, one batch later, while the next batch computes on the other lane
            deferred = lanes > 1

            def fill(slot: int) -> bool:
                slot_refs[slot] = [r for _, r in zip(range(bs), it)]
                target, ready = None, None
                if on_device and slot_refs[slot]:
                    # a fresh block from the caching allocator; written on the decode threads' streams
                    # only after the model's stream has passed this point (it may hold a batch that
                    # used the block before)
                    target = torch.empty((bs, 3, crop, crop), dtype=torch.uint8, device=embedder.device)
                    ready = torch.cuda.Event()
                    ready.record()
                slot_device[slot] = target
                slot_futures[slot] = pool.submit(slot, [r.path for r in slot_refs[slot]], target, ready)
                if slot_refs[slot]:
                    in_flight.append(slot)
                return bool(slot_refs[slot])

            for slot in range(n_slots):
                if not fill(slot):
                    break
            # batches launched and not yet collected: the newest computes while the oldest is
            # turned into rows (on CPU lanes, as many compute at once as there are lanes)
            launched: deque[_Launched] = deque()
            depth = max(lanes, 2)
            while in_flight or launched:
                if in_flight:
                    slot = in_flight.popleft()
                    t0 = time.perf_counter()
                    outcomes = [o for fut in slot_futures[slot] for o in fut.result()]
                    stages.decode_wait_s += time.perf_counter() - t0
                    batch = _Launched(slot, slot_refs[slot], [], [], 0, None)
                    n = bs if embedder.options.compile else len(batch.refs)
                    source = slot_device[slot] if on_device else ring.pixels[slot]
                    pixels = cast(torch.Tensor, source)[:n]
                    for i, (ref, outcome) in enumerate(zip(batch.refs, outcomes)):
                        if isinstance(outcome, str):
                            batch.failed += 1
                            on_error(ref, outcome)
                            log.info("skipped %s: %s", ref.path, outcome)
                        else:
                            batch.metas.append(outcome)
                            batch.good.append(i)
                    if batch.good:
                        # a compiled model sees one shape: the whole buffer (the last batch padded with
                        # stale rows, whose outputs are dropped)
                        batch.pending = embedder.launch(pixels)
                    slot_futures[slot] = []
                    if not deferred:
                        if batch.pending is not None:
                            batch.pending.wait_copied()
                        fill(slot)  # the buffer is free again: decode the batch after the queued ones
                    launched.append(batch)
                    if len(launched) < depth and in_flight:
                        continue
                oldest = launched.popleft()
                done = finish(oldest)  # while the newer batches run on the device (or the other lanes)
                if deferred:
                    fill(oldest.slot)
                yield done
    finally:
        for futures in slot_futures:
            for fut in futures:
                fut.cancel()
        ring.close()


def _stream_in_lanes(refs: worklist.Refs, embedder: BatchEmbedder, bs: int, lanes: int,
                     on_error: Callable[[ImageRef, str], None]) -> Generator[tuple[pa.Table, int], None, None]:
    """``embed_stream`` with ``--decode-in lanes``: every batch is one lane task that decodes its
    images into its slot of a fixed ring and then computes them (``BatchEmbedder.launch_decoding``).
    One task per lane is queued behind the running ones, so a lane that finishes starts its next
    batch at once; rows come out in order, and a slot is refilled as soon as its batch is back."""
    spec = DecodeSpec(embedder.loaded.preprocessing, embedder.options.max_pixels, embedder.options.decoder)
    n_slots = 2 * lanes
    ring = Ring(n_slots, bs, spec.pre.crop_size, shared=False, pin=False)
    it = iter(refs)
    queued: deque[tuple[int, list[ImageRef], Future[LaneResult]]] = deque()
    stages = embedder.stages
    with embedder.cpu_lanes(lanes):
        embedder.prepare_graph(bs, -(-len(refs) // bs))
        try:
            def fill(slot: int) -> None:
                chunk = [r for _, r in zip(range(bs), it)]
                if chunk:
                    paths = [r.path for r in chunk]
                    decode = partial(decode_rows, ring.pixels, spec, slot, 0, paths)
                    queued.append((slot, chunk, embedder.launch_decoding(decode, ring.pixels[slot])))

            for slot in range(n_slots):
                fill(slot)
            while queued:
                slot, chunk, fut = queued.popleft()
                done = fut.result()  # waiting here is waiting for the lanes: decode_s and model_s say on what
                stages.decode_s += done.decode_s
                stages.model_s += done.model_s
                fill(slot)  # its pixels are no longer needed: the vectors are back
                good = [i for i, o in enumerate(done.outcomes) if isinstance(o, ImageMeta)]
                for ref, outcome in zip(chunk, done.outcomes):
                    if isinstance(outcome, str):
                        on_error(ref, outcome)
                        log.info("skipped %s: %s", ref.path, outcome)
                if done.vectors is None:
                    yield embedder.schema.empty_table(), len(chunk)
                    continue
                metas = [cast(ImageMeta, done.outcomes[i]) for i in good]
                yield embedder.rows_from([chunk[i] for i in good], metas, done.vectors[good]), len(chunk) - len(good)
        finally:
            for _, _, fut in queued:
                fut.cancel()
            ring.close()


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
    if (embedder is None and run.decode_in != "threads" and embed.decoder != "nvjpeg"
            and resolve_device(embed.device).type == "cuda"):
        start_server()  # decode processes' imports overlap loading the model
    with worklist.build(iter_discover(sources)) as work:
        embedder = embedder or BatchEmbedder(spec, embed)
        lanes = _run_lanes(embedder, run)
        # a combination that cannot run is refused before the store is created
        resolve_decode_in(run.decode_in, embedder.device, 1, 0, embedder.options.decoder,
                          embedder.lane_threads(lanes) if lanes > 1 else None)
        summary = ExtractSummary(device=str(embedder.device), store=store_path)
        provenance = embedder.provenance()
        local = embedder

        def stream(todo: worklist.Refs, on_error: Callable[[ImageRef, str], None]
                   ) -> Generator[tuple[pa.Table, int], None, None]:
            return embed_stream(todo, local, run, on_error)

        with Store.writer(store_path, provenance) as store:
            still_to_do(store, work, run, summary)
            fill_store(store, work, embedder, provenance, run, summary, progress, t_start, stream)
    return summary


def still_to_do(store: Store, work: worklist.WorkList, run: RunOptions, summary: ExtractSummary) -> None:
    """Leave out of WORK what the store holds (resume: its id index, never its ids as a set) and
    earlier failures unless they are to be retried; the counts go to SUMMARY."""
    work.drop_held(store.shard_files(), None if run.retry_failed else store.errors().column("id"))
    summary.discovered = work.counts.discovered
    summary.skipped_present = work.counts.present
    summary.skipped_failed_before = work.counts.failed_before


def new_run_record(embedder: BatchEmbedder, engine: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the manifest says of one run (updated with its counts as it goes)."""
    return {
        "run_id": uuid.uuid4().hex[:12],
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": str(embedder.device), "precision": embedder.precision,
        "torch_threads": torch.get_num_threads(), "host": platform.node(),
        "decoder": embedder.options.decoder, "compiled": embedder.options.compile,
        **(engine or {"engine": "local"}),
    }


# Rows in, per batch: (the batch's embedded rows, how many of its images failed); failures are
# reported through the callback. The local pipeline and the Ray engine both produce one.
StreamFn = Callable[[worklist.Refs, Callable[[ImageRef, str], None]],
                    Generator[tuple[pa.Table, int], None, None]]


def fill_store(store: Store, todo: worklist.Refs, embedder: BatchEmbedder, provenance: Provenance,
               run: RunOptions, summary: ExtractSummary, progress: Callable[[int, int, int], None] | None,
               t_start: float, stream_fn: StreamFn, engine: dict[str, Any] | None = None) -> None:
    """Embed TODO (what the store lacks: ``still_to_do``), flushing whole shards as it goes (caller
    holds the lock). ``embedder`` gives the shapes and the run record; ``stream_fn`` computes the
    vectors."""
    if progress:
        progress(len(todo), 0, 0)
    run_record = new_run_record(embedder, engine)
    if not todo:
        summary.seconds = time.perf_counter() - t_start
        return

    # Two shard buffers: one fills while the other is written by one writer thread (Parquet
    # encoding, zstd and fsync release the GIL, so writing overlaps the model loop). At most one
    # write is in flight, so memory stays two shards, and shards land in order.
    buffers = [ShardBuffer(embedder.dim, embedder.options.dtype, run.shard_rows) for _ in range(2)]
    buffer = buffers[0]
    pending_errors: list[dict[str, Any]] = []
    last_flush = time.monotonic()
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")
    in_flight: Future[None] | None = None

    def write(table: pa.Table | None, errors: pa.Table | None, record: dict[str, Any]) -> None:
        added = []
        if table is not None:
            added.append((storage.name(store.write_shard(table, provenance)), table.num_rows))
        if errors is not None:
            store.write_errors(errors)
        store.update_manifest(record, added)

    def flush(wait: bool = False) -> None:
        nonlocal last_flush, buffer, in_flight
        if in_flight is not None:
            in_flight.result()  # the other buffer is free again (and a failed write surfaces here)
            in_flight = None
        table = buffer.take() if buffer.rows else None
        errors = pa.Table.from_pylist(pending_errors, schema=ERRORS_SCHEMA) if pending_errors else None
        pending_errors.clear()
        last_flush = time.monotonic()
        run_record.update(done=summary.done, failed=summary.failed,
                          seconds=round(time.perf_counter() - t_start, 2))
        if embedder.graph_choice is not None:  # what computed the vectors on a CPU
            run_record.update(embedder.graph_choice.record())
        in_flight = writer.submit(write, table, errors, dict(run_record))
        buffer = buffers[1] if buffer is buffers[0] else buffers[0]
        if wait:
            in_flight.result()
            in_flight = None

    def on_error(ref: ImageRef, reason: str) -> None:
        summary.failed += 1
        summary.note_failure(ref.path, reason)
        pending_errors.append({"id": ref.id, "path": ref.path, "reason": reason,
                               "time": dt.datetime.now(dt.UTC)})

    embedder.stages = StageTimes()
    t_stream = time.perf_counter()  # the stages share this span, not model loading or discovery
    try:
        with closing(stream_fn(todo, on_error)) as stream:
            for table, n_failed in stream:
                t_write = time.perf_counter()
                summary.done += table.num_rows
                rest = buffer.append(table)
                while rest.num_rows:  # a batch larger than what is left of the shard
                    flush()
                    rest = buffer.append(rest)
                if progress:
                    progress(len(todo), table.num_rows + n_failed, summary.failed)
                if buffer.full or time.monotonic() - last_flush >= run.flush_seconds:
                    flush()
                embedder.stages.write_s += time.perf_counter() - t_write
    finally:
        # Whatever finished is kept, even on Ctrl-C or an unexpected error.
        try:
            flush(wait=True)
        finally:
            writer.shutdown(wait=True)
        summary.seconds = time.perf_counter() - t_start
        summary.stages = embedder.stages.report(time.perf_counter() - t_stream)


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

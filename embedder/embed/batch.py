"""The batch embedder: a loaded model on its device, decoding into reused pinned buffers, embedding a
batch at a time, timing each stage."""

from __future__ import annotations

import datetime as dt
import logging
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, cast

import numpy as np
import pyarrow as pa
import torch

from embedder._version import __version__
from embedder.choices import DECODERS
from embedder.decode.common import Decoded, ImageMeta
from embedder.decode.decoders import decode_file, normalize_batch, resolve_decoder
from embedder.decode.pool import (
    Outcome,
)
from embedder.embed.options import PRECISIONS, EmbedOptions
from embedder.errors import DecodeError, EmbedderError
from embedder.io.sources import ImageRef
from embedder.io.uri import image_id
from embedder.models import runtime as rt
from embedder.models.builder import ModelSpec
from embedder.models.cpu_graph import AUTO_MIN_BATCHES, CPU_GRAPHS, GraphChoice, onednn_graph, pick
from embedder.models.devices import resolve_device
from embedder.models.features import LoadedModel, load_model
from embedder.store.provenance import Provenance
from embedder.store.shards import embeddings_to_arrow, row_schema

log = logging.getLogger(__name__)


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
    # settling the CPU graph and runtime (tracing, exporting, timing, building a session) inside the
    # images' span, before the first batch
    prepare_s: float = 0.0

    def report(self, wall_s: float) -> dict[str, Any]:
        busy = {"decode": self.decode_wait_s + self.decode_s / self.lanes, "copy": self.copy_s,
                "model": self.model_s / self.lanes,
                "launch": self.launch_s, "write": self.write_s}
        if self.launch_s > 0.8 * self.model_s > 0:  # the GPU spent its span waiting for launches
            busy["model"] = 0.0
        return {**{k: round(v, 3) for k, v in self.__dict__.items()},
                "stream_s": round(wall_s, 3),  # the images' span: model loading and discovery before it
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
        if options.runtime not in rt.RUNTIMES:
            raise EmbedderError(f"unknown --runtime {options.runtime!r}; valid: {', '.join(rt.RUNTIMES)}")
        self.spec = spec
        self.options = options
        self.device = resolve_device(options.device)
        if options.decoder == "nvjpeg" and self.device.type != "cuda":
            raise EmbedderError("--decoder nvjpeg decodes on the GPU and needs a CUDA device; "
                                "on CPU use --decoder torchvision (the same resize, libjpeg-turbo)")
        t_load = time.perf_counter()
        self.loaded: LoadedModel = load_model(spec)
        self.load_s = time.perf_counter() - t_load  # building the network and reading its weights
        log.info("model %s loaded in %.2f s", self.loaded.backbone.name, self.load_s)
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
        self._runtime_choices: dict[tuple[str, int, int], GraphChoice] = {}
        self._onnx: dict[int, rt.OnnxGraph] = {}  # ORT sessions by intra-op threads
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
        """Settle what computes this run's batches, for BATCH-sized batches on the lanes now open
        (``cpu_lanes``), the run being BATCHES batches long: the torch graph (``cpu_graph``), then
        the runtime (``runtime``: torch or ONNX Runtime). ``auto`` times the choices on a lane (its
        thread count is the run's) and keeps the faster; a run too short to win the timing back uses
        the decision an earlier run cached for this model on this machine, else eager torch. Only on
        a CPU, in fp32, uncompiled. The time it takes is ``stages.prepare_s``."""
        if self.device.type != "cpu":
            return GraphChoice("eager")  # not recorded: there is no CPU graph to speak of
        t0 = time.perf_counter()
        choice = self._settle_graph(batch, batches)
        torch_model = self._onednn if choice.graph == "onednn" and self._onednn is not None else self._eager
        choice = self._settle_runtime(choice, torch_model, batch, batches)
        threads = self._threads()
        if choice.runtime == "onnxruntime":
            self.model = self._onnx[threads].module
        elif torch_model is not self._eager:
            self.model = torch_model
        elif self.model is self._onednn or any(self.model is g.module for g in self._onnx.values()):
            self.model = self._eager  # back from a graph of an earlier run; a model set by the caller is kept
        self.graph_choice = choice
        self.stages.prepare_s += time.perf_counter() - t0
        log.info("CPU graph and runtime (%.2f s): %s", time.perf_counter() - t0, choice.record())
        return choice

    def _threads(self) -> int:
        """Torch threads of a batch's computation: a lane's share, or all of them."""
        return self.lane_threads(self._lane_count) if self._lanes is not None else torch.get_num_threads()

    def _decision_key(self, what: str, batch: int) -> str:
        """The cache key of a timing: the model, the machine, the batch and thread count it was timed at."""
        pre = self.loaded.preprocessing
        model = rt.graph_key(self.loaded.weights.info.sha256, self.loaded.backbone.name, self.loaded.layer,
                             self.loaded.pool, pre.crop_size)
        return f"{what}:" + rt.digest(model, rt.machine_key(), batch, self._threads(), self._lane_count,
                                      self.options.channels_last)

    def _trial_input(self, batch: int) -> torch.Tensor:
        crop = self.loaded.preprocessing.crop_size
        pixels = torch.randint(0, 256, (batch, 3, crop, crop), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(0))
        return self._model_input(pixels)

    def _settle_graph(self, batch: int, batches: int) -> GraphChoice:
        option = self.options.cpu_graph
        if self.options.compile or self.precision != "fp32":
            return GraphChoice("eager", reason="the oneDNN graph is for fp32, uncompiled")
        if option == "eager":
            return GraphChoice("eager")
        key = (option, batch, self._lane_count)
        if key in self._graph_choices:
            return self._graph_choices[key]
        decision_key = self._decision_key("cpu_graph", batch)
        if option == "auto":
            cached = rt.read_decision(decision_key)
            known = GraphChoice.from_timing(cached) if cached is not None else None
            if known is not None:
                if known.graph == "onednn" and self._onednn_graph(self._trial_input(batch)) is None:
                    known = GraphChoice("eager", reason="no oneDNN graph for this model")
                self._graph_choices[key] = known
                return known
            if batches < AUTO_MIN_BATCHES:
                return GraphChoice("eager", reason=f"a run of fewer than {AUTO_MIN_BATCHES} batches is not timed")
        x = self._trial_input(batch)
        graph = self._onednn_graph(x)
        if graph is None:
            choice = GraphChoice("eager", reason="no oneDNN graph for this model")
        elif option == "onednn":
            choice = GraphChoice("onednn")
        else:
            task = partial(pick, partial(self._eager, x), partial(graph, x))
            choice = self._lanes.submit(task).result() if self._lanes is not None else task()
            rt.write_decision(decision_key, choice.timing())
        self._graph_choices[key] = choice
        return choice

    def _settle_runtime(self, choice: GraphChoice, torch_model: torch.nn.Module, batch: int,
                        batches: int) -> GraphChoice:
        """CHOICE with the runtime settled: torch, or ONNX Runtime (``runtime``: onnx, or auto where
        a trial on this machine measured it at least ``rt.MIN_GAIN`` times faster than TORCH_MODEL)."""
        option = self.options.runtime
        if option == "torch":
            return choice
        if self.options.compile or self.precision != "fp32":
            if option == "onnx":
                raise EmbedderError("--runtime onnx computes in fp32, uncompiled: drop --precision/--compile "
                                    "or use --runtime torch")
            return replace(choice, runtime_reason="ONNX Runtime is for fp32, uncompiled")
        key = (choice.graph, batch, self._lane_count)
        if key in self._runtime_choices and option == "auto":
            return self._runtime_choices[key]
        decision_key = self._decision_key(f"runtime-{choice.graph}", batch)
        x = self._trial_input(batch)
        if option == "auto":
            cached = rt.read_decision(decision_key)
            if cached is not None and cached.get("runtime") in ("torch", "onnxruntime"):
                settled = self._cached_runtime(choice, cached, x)
                self._runtime_choices[key] = settled
                return settled
            if batches < rt.AUTO_MIN_BATCHES:
                return replace(choice, runtime_reason=f"a run of fewer than {rt.AUTO_MIN_BATCHES} batches is not "
                                                      "timed against ONNX Runtime")
        try:
            graph = self._onnx_graph(x)
        except rt.RuntimeUnavailable as e:
            if option == "onnx":
                raise
            log.info("%s; torch computes this run", e)
            if rt.ort_version() is not None:  # an export that failed fails again: not tried on every run
                rt.write_decision(decision_key, {"runtime": "torch", "reason": str(e)[:200]})
            return replace(choice, runtime_reason=str(e)[:200])
        with torch.inference_mode():
            cosine = rt.min_cosine(self._eager(x).float().numpy(), graph.module(x).numpy())
        ort = {"runtime": "onnxruntime", "runtime_version": rt.ort_version() or "", "export_s": (
            round(graph.export_s, 2) if not graph.cached else None), "cosine": round(cosine, 6)}
        if cosine < rt.MIN_COSINE:
            why = f"ONNX Runtime's vectors are at cosine {cosine:.6f} to eager torch's (under {rt.MIN_COSINE})"
            if option == "onnx":
                raise rt.RuntimeUnavailable(f"{why}: use --runtime torch")
            log.warning("%s; torch computes this run", why)
            rt.write_decision(decision_key, {"runtime": "torch", "reason": why, "cosine": cosine})
            return replace(choice, runtime_reason=why, cosine=round(cosine, 6))
        if option == "onnx":
            return replace(choice, **ort)  # type: ignore[arg-type]
        task = partial(self._time_runtimes, torch_model, graph.module, x)
        t_torch, t_ort = self._lanes.submit(task).result() if self._lanes is not None else task()
        ms = {"torch": round(t_torch * 1000, 2), "onnxruntime": round(t_ort * 1000, 2)}
        faster = ms["torch"] >= rt.MIN_GAIN * ms["onnxruntime"]  # on the figures the record keeps
        rt.write_decision(decision_key, {"runtime": "onnxruntime" if faster else "torch", "ms": ms,
                                         "cosine": cosine})
        settled = replace(choice, runtime_ms=ms, **(ort if faster else {"export_s": ort["export_s"]}))  # type: ignore[arg-type]
        self._runtime_choices[key] = settled
        return settled

    def _cached_runtime(self, choice: GraphChoice, cached: dict[str, Any], x: torch.Tensor) -> GraphChoice:
        """CHOICE with the runtime an earlier run's trial on this machine chose (its graph from the
        cache, exported again where it is gone or damaged)."""
        ms = cached.get("ms") if isinstance(cached.get("ms"), dict) else None
        if cached["runtime"] == "torch":
            return replace(choice, runtime_ms=ms, runtime_reason=f"cached: {cached.get('reason') or 'torch faster'}")
        try:
            graph = self._onnx_graph(x)
        except rt.RuntimeUnavailable as e:
            log.warning("%s; torch computes this run", e)
            return replace(choice, runtime_reason=str(e)[:200])
        cosine = cached.get("cosine")
        if not graph.cached:  # exported again: checked again
            with torch.inference_mode():
                cosine = rt.min_cosine(self._eager(x).float().numpy(), graph.module(x).numpy())
            if cosine < rt.MIN_COSINE:
                log.warning("ONNX Runtime's vectors are at cosine %.6f to eager torch's; torch computes this run",
                            cosine)
                return replace(choice, runtime_reason=f"ONNX Runtime's vectors at cosine {cosine:.6f}")
        return replace(choice, runtime="onnxruntime", runtime_version=rt.ort_version() or "", runtime_ms=ms,
                       runtime_reason="cached", cosine=round(float(cosine), 6) if cosine is not None else None,
                       export_s=None if graph.cached else round(graph.export_s, 2))

    def _onnx_graph(self, x: torch.Tensor) -> rt.OnnxGraph:
        threads = self._threads()
        if threads not in self._onnx:
            key = rt.graph_key(self.loaded.weights.info.sha256, self.loaded.backbone.name, self.loaded.layer,
                               self.loaded.pool, self.loaded.preprocessing.crop_size)
            self._onnx[threads] = rt.onnx_graph(self._eager, x, key, threads)
        return self._onnx[threads]

    @staticmethod
    def _time_runtimes(torch_model: torch.nn.Module, ort_model: torch.nn.Module,
                       x: torch.Tensor) -> tuple[float, float]:
        """Seconds per batch of each, best of interleaved calls after one each to warm up."""
        best = [float("inf"), float("inf")]
        with torch.inference_mode():
            for call in range(1 + rt.TIMED):
                for i, model in enumerate((torch_model, ort_model)):
                    t0 = time.perf_counter()
                    model(x)
                    if call:
                        best[i] = min(best[i], time.perf_counter() - t0)
        return best[0], best[1]

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
            text=self.loaded.text.spec() if self.loaded.text is not None else None,
            runtime=self.runtime_record(),
        )

    def runtime_record(self) -> dict[str, str] | None:
        """What computes the vectors: {"name", "version"}; None on a CPU before ``prepare_graph``
        settled it."""
        if self.device.type != "cpu":
            return {"name": "torch", "version": torch.__version__}
        if self.graph_choice is None:
            return None
        record = self.graph_choice.record()["runtime"]
        return {"name": str(record["name"]), "version": str(record["version"])}  # type: ignore[index]

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts → float32 [N, dim] by the model's text tower, at this embedder's precision and
        normalisation (the space of its image vectors). ``TextQueryError`` for a model without one,
        an empty text or one over the context length."""
        from embedder.errors import TextQueryError

        if self.loaded.text is None:
            raise TextQueryError(f"{self.loaded.backbone.name} has no text tower: text queries need a CLIP-family "
                                 "backbone (open_clip:ARCH:PRETRAINED)")
        if self.loaded.layer != "penultimate":
            raise TextQueryError(f"these vectors are {self.loaded.layer}'s features, not the model's image "
                                 "embedding: text shares only the embedding's space")
        out = torch.from_numpy(self.loaded.text.encode(texts, self.device, self.precision))
        if self.options.normalize == "l2":
            out = torch.nn.functional.normalize(out, dim=1)
        return out.numpy()

    def decode(self, path: str) -> Decoded:
        return decode_file(path, self.loaded.preprocessing, self.options.max_pixels, self.options.decoder,
                           self.options.max_image_bytes)

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
            pa.array([r.caption for r in refs], pa.string()),
        ], schema=self.schema)

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Ray-style entry point: columns path (+ optional id, label) → rows plus an error column.

        Failed images come back with a null embedding and the reason in ``error``.
        """
        paths = batch.column("path").to_pylist()
        ids = batch.column("id").to_pylist() if "id" in batch.column_names else None
        labels = batch.column("label").to_pylist() if "label" in batch.column_names else None
        caps = batch.column("caption").to_pylist() if "caption" in batch.column_names else None
        refs = [ImageRef(ids[i] if ids else image_id(p), p, labels[i] if labels else None, caps[i] if caps else None)
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
                "caption": [r.caption for r in failed],
                "error": [errors[r.id] for r in failed],
            }, schema=table.schema)
            table = pa.concat_tables([table, fail_table])
        return table

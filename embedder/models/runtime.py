"""Which runtime computes a CPU batch: torch (the eager model, or its oneDNN graph: ``cpu_graph``) or
ONNX Runtime on the same network exported once to ONNX — and the on-disk caches that keep a start-up
short: the exported graphs, and the decisions each timing made, per model and machine.

Why ONNX Runtime: on 2 cores, fp32, ORT's CPU provider computed a ViT 1.2-1.25x faster than eager
torch at the batch and threads embedder runs (OpenCLIP ViT-B-32: 10.7 against 8.8-9.2 img/s per
one-thread lane at batch 4; timm ViT-S/16: 9.8-10.2 against 7.9-8.3), with vectors at cosine
0.99999+ to eager's. TorchScript's frozen graph was level or slower at batch 4 (9.7 / 6.0) and
dynamic int8 fell below the 0.9999 bar (0.9998 / 0.9966, docs/benchmarks.md "CPU runtimes"). Neither
wins for every model, so ``auto`` times ORT against torch on a lane of the run and keeps it only
when it is clearly faster and its vectors match eager's; the decision is kept on disk, so a model
is timed once per machine and later runs, short ones too, start with the faster runtime.

Caches live in ``$EMBEDDER_RUNTIME_CACHE`` (default ``$XDG_CACHE_HOME/embedder/runtime``, else
``~/.cache/embedder/runtime``): ``<key>.onnx`` per graph, the key a digest of the weights' SHA-256,
architecture, layer, pooling, input size, opset and the torch and ORT versions; ``decisions.json``
for the timings. Every write is atomic (a temporary file renamed); an unreadable graph or decision
file is rebuilt, never a crash.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from embedder import choices
from embedder.errors import EmbedderError

log = logging.getLogger(__name__)

RUNTIMES = choices.RUNTIMES
CACHE_ENV = "EMBEDDER_RUNTIME_CACHE"
OPSET = 17
MIN_COSINE = 0.9999  # ORT's vectors against eager's, the worst row of the trial batch
MIN_GAIN = 1.05  # auto keeps ORT only when torch takes at least this much longer per batch
# auto times ORT only on runs of at least this many batches (100 images at batch 4): exporting and
# timing cost a few seconds once per model and machine (ViT-B-32 on 2 cores: export ~4 s, timing
# ~4 s); shorter runs use a decision already cached, else torch
AUTO_MIN_BATCHES = 25
TIMED = 3  # timed calls of each after one to warm up (ORT's first run allocates): 8 batches in all
DECISIONS = "decisions.json"


class RuntimeUnavailable(EmbedderError):
    """ONNX Runtime cannot compute this model here (not installed, export failed, vectors moved)."""


@dataclass(frozen=True)
class OnnxGraph:
    """An ONNX Runtime session over a cached graph, and what it cost to get."""

    module: nn.Module  # OnnxModule: float batch in, features out, like the torch model
    path: str
    export_s: float  # 0 when the graph came from the cache
    session_s: float
    cached: bool


def cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "embedder" / "runtime"


def ort_version() -> str | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    return str(ort.__version__)


def machine_key() -> str:
    """This machine, as far as speed goes: CPU model, cores, torch and ORT versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return digest(cpu, os.cpu_count(), torch.__version__, ort_version())


def graph_key(weights_sha256: str, backbone: str, layer: str, pool: str, crop: int) -> str:
    """The cache key of a model's exported graph: the weights' bytes, what is cut from them, the input
    size, and what wrote and reads the graph."""
    return digest(weights_sha256, backbone, layer, pool, crop, OPSET, torch.__version__, ort_version())


def digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:24]


# ---- decisions ---------------------------------------------------------------------------------------
def read_decision(key: str) -> dict[str, Any] | None:
    """A decision cached under KEY; None where there is none or the file is unreadable."""
    got = _decisions().get(key)
    return got if isinstance(got, dict) else None


def write_decision(key: str, decision: dict[str, Any]) -> None:
    """Keep DECISION under KEY (read, update, atomic rename: a concurrent run's entry may be lost,
    never the file). A cache that cannot be written is logged and skipped."""
    try:
        directory = cache_dir()
        directory.mkdir(parents=True, exist_ok=True)
        table = _decisions()
        table[key] = decision
        with _atomic(directory / DECISIONS) as tmp:
            tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
    except OSError as e:
        log.info("runtime decision not cached (%s)", e)


def _decisions() -> dict[str, Any]:
    path = cache_dir() / DECISIONS
    try:
        table = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:  # damaged: timed again and rewritten
        log.warning("runtime decisions %s unreadable (%s); timing again", path, str(e)[:100])
        return {}
    return table if isinstance(table, dict) else {}


@contextmanager
def _atomic(target: Path) -> Iterator[Path]:
    """A temporary path beside TARGET, renamed over it when the block succeeds, removed otherwise."""
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep the cache from other users of a shared one
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


# ---- graphs ------------------------------------------------------------------------------------------
class OnnxModule(nn.Module):
    """An ORT session as a module: a float batch [N,3,H,W] in (any memory layout), features out."""

    def __init__(self, session: Any) -> None:
        super().__init__()
        self.session = session
        self.input = session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().contiguous().numpy()  # ORT reads NCHW; a channels_last batch is copied
        return torch.from_numpy(self.session.run(None, {self.input: array})[0])


def onnx_graph(model: nn.Module, example: torch.Tensor, key: str, threads: int) -> OnnxGraph:
    """MODEL as an ORT session on THREADS intra-op threads, its graph read from the cache under KEY or
    exported there from MODEL traced on EXAMPLE (a float batch). ``RuntimeUnavailable`` where ORT
    is missing or the model does not export."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise RuntimeUnavailable("--runtime onnx needs onnxruntime: pip install 'embedder[onnx]'") from None
    directory = cache_dir()
    path = directory / f"{key}.onnx"
    export_s, cached = 0.0, path.is_file()
    if cached:
        t0 = time.perf_counter()
        try:
            session = _session(path, threads)
            return OnnxGraph(OnnxModule(session), str(path), 0.0, time.perf_counter() - t0, True)
        except Exception as e:  # noqa: BLE001 - ORT's errors for a damaged file have no common type
            log.warning("cached ONNX graph %s unreadable (%s: %s); exporting again", path.name, type(e).__name__,
                        str(e)[:160])
            path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with _atomic(path) as tmp:
            export_onnx(model, example, tmp)
    except OSError as e:
        raise RuntimeUnavailable(f"cannot write the ONNX graph cache {directory}: {e.strerror or e}") from None
    export_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    session = _session(path, threads)
    log.info("exported %s to ONNX in %.1f s (%s)", type(model).__name__, export_s, path)
    return OnnxGraph(OnnxModule(session), str(path), export_s, time.perf_counter() - t0, False)


def _session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = max(1, threads)
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # errors only: no per-session warnings on the console
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """MODEL traced on EXAMPLE into PATH (dynamic batch), the way ``embedder export`` does it:
    nn.MultiheadAttention's fused kernel off while tracing (it has no ONNX form), a timm ViT's
    position embeddings fixed to EXAMPLE's size (on a copy: the eager model keeps its own)."""
    crop = int(example.shape[-1])
    if any(getattr(m, "dynamic_img_size", False) and hasattr(m, "set_input_size") for m in model.modules()):
        model = copy.deepcopy(model)
        for m in model.modules():
            if getattr(m, "dynamic_img_size", False) and hasattr(m, "set_input_size"):
                m.set_input_size(img_size=crop)  # type: ignore[operator]
    mha = getattr(torch.backends, "mha", None)
    fastpath = mha.get_fastpath_enabled() if mha is not None else False
    if mha is not None:
        mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings: the vectors are checked against eager's
            torch.onnx.export(model, (example.contiguous(),), str(path), dynamo=False, opset_version=OPSET,
                              input_names=["pixels"], output_names=["features"],
                              dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"}},
                              do_constant_folding=True)
    except Exception as e:  # noqa: BLE001 - the exporter raises many types; any means: no ONNX graph
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise RuntimeUnavailable(f"cannot export {type(model).__name__} to ONNX: {type(e).__name__}: {first}") from None
    finally:
        if mha is not None:
            mha.set_fastpath_enabled(fastpath)


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The smallest cosine between matching rows of A and B."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    dots = (a * b).sum(1)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.where(norms > 0, dots / np.maximum(norms, 1e-300), (np.abs(a - b).max(1) == 0).astype(np.float64))
    return float(cos.min())

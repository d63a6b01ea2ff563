"""Which graph computes a CPU batch: the eager model, or the same model traced into TorchScript,
frozen and optimised for inference (``torch.jit.optimize_for_inference``: oneDNN layouts across
convolution chains, convolution + activation fused) — and the timing that picks one.

Neither wins everywhere. Measured on 2 cores, batch 4, one thread (docs/benchmarks.md, "A faster CPU
graph"): the oneDNN graph is 24 % faster for MobileNetV2, 17 % for MNASNet, 18 % for ResNet-50, level
for ResNet-18 or VGG, 18-40 % slower for EfficientNets and DenseNet, and ResNet-50's gain at two
threads moved between 0 and 12 % from one run to the next. So ``auto`` times both, on the batch
size and the thread count the run will use, and keeps the oneDNN graph only when it is clearly
faster. The two give the same vectors to fp32 rounding
(checked on every build: a graph further than ``MAX_REL_DIFF`` from eager is refused).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from embedder import choices

log = logging.getLogger(__name__)

CPU_GRAPHS = choices.CPU_GRAPHS
# auto keeps the oneDNN graph only when it is at least this much faster (timing noise on a shared
# machine is a few per cent; eager is the reference)
MIN_GAIN = 1.05
# auto times the graphs only when the run has at least this many batches: the timing costs 12
# batches plus tracing (measured at batch 4 on 2 cores: ~1 s for MobileNetV2, ~3 s for ResNet-50),
# which a short run would not win back
AUTO_MIN_BATCHES = 250
MAX_REL_DIFF = 1e-4
_WARMUP, _TIMED = 3, 3  # TorchScript's profiling executor optimises a graph on its first calls


@dataclass(frozen=True)
class GraphChoice:
    """What ``auto`` (or the options) settled on, for the run record: the torch graph, and the
    runtime that computes the batches (torch, or ONNX Runtime: ``embedder.models.runtime``)."""

    graph: str  # eager | onednn
    eager_ms: float | None = None  # per batch, best of the timed calls (auto only)
    onednn_ms: float | None = None
    reason: str = ""
    cached: bool = False  # the timing of an earlier run on this machine (``runtime.read_decision``)
    runtime: str = "torch"  # torch | onnxruntime
    runtime_version: str = ""
    runtime_ms: dict[str, float] | None = None  # auto's trial, per batch: {"torch": ms, "onnxruntime": ms}
    runtime_reason: str = ""
    export_s: float | None = None  # a graph exported for this run (not read from the cache)
    cosine: float | None = None  # ORT's vectors against eager's on the trial batch, the worst row

    def record(self) -> dict[str, object]:
        out: dict[str, object] = {"cpu_graph": self.graph}
        if self.eager_ms is not None:
            out["cpu_graph_ms"] = {"eager": self.eager_ms, "onednn": self.onednn_ms}
        if self.reason:
            out["cpu_graph_reason"] = self.reason
        if self.cached:
            out["cpu_graph_cached"] = True
        runtime: dict[str, object] = {"name": self.runtime, "version": self.runtime_version or torch.__version__}
        extra = {"ms": self.runtime_ms, "reason": self.runtime_reason, "export_s": self.export_s,
                 "cosine": self.cosine}
        runtime.update({k: v for k, v in extra.items() if v not in (None, "")})
        out["runtime"] = runtime
        return out

    def timing(self) -> dict[str, object]:
        """The torch graph's decision, as the cache keeps it."""
        return {"graph": self.graph, "eager_ms": self.eager_ms, "onednn_ms": self.onednn_ms, "reason": self.reason}

    @classmethod
    def from_timing(cls, d: dict[str, object]) -> GraphChoice | None:
        """A cached ``timing``; None where the entry is not one."""
        graph, eager, onednn = d.get("graph"), d.get("eager_ms"), d.get("onednn_ms")
        if graph not in ("eager", "onednn") or not all(isinstance(v, (int, float)) for v in (eager, onednn)):
            return None
        return cls(str(graph), float(eager), float(onednn), str(d.get("reason") or ""),  # type: ignore[arg-type]
                   cached=True)


def onednn_graph(model: nn.Module, example: torch.Tensor) -> nn.Module | None:
    """MODEL traced on EXAMPLE (a float batch in the model's input layout), frozen and optimised for
    CPU inference; None where tracing or optimising fails or the graph's output moves from eager's."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TorchScript's deprecation and tracer warnings
        try:
            graph = torch.jit.optimize_for_inference(torch.jit.trace(model.eval(), example))
            reference, got = model(example), graph(example)
        except Exception as e:  # noqa: BLE001 - a graph TorchScript cannot take stays eager
            log.info("no oneDNN graph for this model (%s: %s); eager", type(e).__name__, str(e)[:200])
            return None
    if not isinstance(got, torch.Tensor) or got.shape != reference.shape:
        log.info("the oneDNN graph returns another shape; eager")
        return None
    scale = float(reference.abs().max()) or 1.0
    diff = float((got - reference).abs().max()) / scale
    if diff > MAX_REL_DIFF:
        log.info("the oneDNN graph differs from eager by %.2e (relative); eager", diff)
        return None
    return graph  # type: ignore[no-any-return]


def seconds_per_call(fn: Callable[[], object], warmup: int = _WARMUP, timed: int = _TIMED) -> float:
    """The best of TIMED calls of FN after WARMUP untimed ones."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(timed):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def pick(eager: Callable[[], object], onednn: Callable[[], object]) -> GraphChoice:
    """Time both on the calling thread (its thread count is the run's); eager unless oneDNN is at
    least ``MIN_GAIN`` times faster."""
    with torch.inference_mode():
        t_eager = seconds_per_call(eager)
        t_onednn = seconds_per_call(onednn)
    ms_eager, ms_onednn = round(t_eager * 1000, 2), round(t_onednn * 1000, 2)
    # decided on the figures the record keeps, so that the record always explains the choice (deciding
    # on the unrounded times made the two disagree near MIN_GAIN: a fresh-clone CI run caught it)
    graph = "onednn" if ms_eager >= MIN_GAIN * ms_onednn else "eager"
    return GraphChoice(graph, ms_eager, ms_onednn)

"""What an extraction run is told, with every default in one place: how to embed (device, precision,
decoder, batch) and how to run (lanes, workers, shards, resume)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from embedder import choices
from embedder.decode.common import DEFAULT_MAX_PIXELS
from embedder.errors import EmbedderError
from embedder.io.limits import MAX_IMAGE_BYTES
from embedder.io.options import SourceOptions

if TYPE_CHECKING:  # light: the CLI reads these defaults without loading torch
    import torch

PRECISIONS = choices.PRECISION_CHOICES
DECODE_IN = choices.DECODE_IN
DECODE_PRIORITIES = choices.DECODE_PRIORITIES


# Batch sizes when none is given. CPU: small batches keep activations in cache; measured on 2 cores
# in one interleaved run (MobileNetV2, 500x375 JPEGs, 5 rounds): batch 4 against 8, model only
# 182-189 vs 144-156 img/s, extract with two lanes 117-124 vs 96-104; batches 2 and 6 level with 4;
# ResNet-50 level or better at 4; the Ray engine's CPU actors level or slightly ahead at 4
# (docs/benchmarks.md, "Model lanes" and "Ray engine"). CUDA: 128.
CPU_BATCH = 4
CUDA_BATCH = 128


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
    max_image_bytes: int = MAX_IMAGE_BYTES  # an image's encoded bytes (file, object, member, row)
    # pil (bit-identical to weights.transforms()) | pil-draft | pil-reduce | torchvision | nvjpeg | auto
    decoder: str = "pil"
    cpu_graph: str = "auto"  # CPU, fp32: eager | onednn (TorchScript, oneDNN) | auto (timed on long runs)
    # CPU, fp32: torch | onnx (ONNX Runtime on the exported graph) | auto (ORT where a trial on this
    # machine measured it faster, vectors at cosine >= 0.9999 to eager's: embedder.models.runtime)
    runtime: str = "auto"


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
    sources: SourceOptions = SourceOptions()  # tar shards' and image tables' columns and keys

    def __post_init__(self) -> None:
        # checked before anything is created or started, not when the first batch is decoded
        if self.decode_in not in DECODE_IN:
            raise EmbedderError(f"unknown --decode-in {self.decode_in!r}; valid: {', '.join(DECODE_IN)}")
        if self.model_lanes is not None and self.model_lanes < 1:
            raise EmbedderError(f"--model-lanes must be at least 1, got {self.model_lanes}")
        if self.decode_priority not in DECODE_PRIORITIES:
            raise EmbedderError(f"unknown --decode-priority {self.decode_priority!r}; "
                                f"valid: {', '.join(DECODE_PRIORITIES)}")


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide the Ray engine runs (defaults in one place)."""

    address: str | None = None  # None: start a local Ray instance sized to this machine
    workers: int = 1  # model actors
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 0.5  # fractional: actors that take whole CPUs starve decode tasks
    decode_cpus: float = 0.5  # per decode task
    batch_size: int | None = None  # None: the local engine's default (4 without GPUs, 128 with)
    local_cpus: int | None = None  # a local instance's CPUs; None: all of this machine's

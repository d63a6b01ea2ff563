"""The fixed vocabularies of options, in one leaf module (nothing but the standard library): each
is a ``StrEnum``, which the CLI takes as a typed choice (checked when the command line is parsed, a
wrong value answered with the valid ones, all of them listed in ``--help``); the library validates
against the tuples derived from them. No torch, FAISS or Arrow is imported to know them."""

from __future__ import annotations

from enum import StrEnum


class Decoder(StrEnum):
    pil = "pil"
    pil_draft = "pil-draft"
    pil_reduce = "pil-reduce"
    torchvision = "torchvision"
    nvjpeg = "nvjpeg"
    auto = "auto"


class Precision(StrEnum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Dtype(StrEnum):
    float32 = "float32"
    float16 = "float16"


class Normalize(StrEnum):
    none = "none"
    l2 = "l2"


class Pool(StrEnum):
    avg = "avg"
    max = "max"
    gem = "gem"


class CpuGraph(StrEnum):
    auto = "auto"
    eager = "eager"
    onednn = "onednn"


class Runtime(StrEnum):
    auto = "auto"
    torch = "torch"
    onnx = "onnx"


class DecodeIn(StrEnum):
    auto = "auto"
    threads = "threads"
    processes = "processes"
    lanes = "lanes"


class DecodePriority(StrEnum):
    normal = "normal"
    idle = "idle"


class Engine(StrEnum):
    local = "local"
    ray = "ray"


class Metric(StrEnum):
    cosine = "cosine"
    l2 = "l2"
    ip = "ip"


class Coarse(StrEnum):
    auto = "auto"
    flat = "flat"
    hnsw = "hnsw"


class Standardize(StrEnum):
    auto = "auto"
    yes = "yes"
    no = "no"


class ProbeBackend(StrEnum):
    auto = "auto"
    torch = "torch"


class BatchNorm(StrEnum):
    frozen = "frozen"
    train = "train"
    adapt = "adapt"


class Projection(StrEnum):
    pca = "pca"
    umap = "umap"


class Strategy(StrEnum):
    """`embedder select`: which images to label first."""

    auto = "auto"
    typical = "typical"
    uncertain = "uncertain"
    diverse = "diverse"


def values(choice: type[StrEnum]) -> tuple[str, ...]:
    return tuple(m.value for m in choice)


DECODERS = tuple(v for v in values(Decoder) if v != "auto")  # what a record names: never "auto"
PRECISIONS = tuple(v for v in values(Precision) if v != "auto")  # as recorded
PRECISION_CHOICES = values(Precision)
POOLS = values(Pool)
CPU_GRAPHS = values(CpuGraph)
RUNTIMES = values(Runtime)
DECODE_IN = values(DecodeIn)
DECODE_PRIORITIES = values(DecodePriority)
ENGINES = values(Engine)
INDEX_KINDS = ("auto", "flat", "hnsw", "ivf", "ivfpq")  # or a FAISS factory string: not a closed set
METRICS = values(Metric)
COARSE = values(Coarse)
STRATEGIES = values(Strategy)

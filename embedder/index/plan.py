"""Which index for which collection: kinds, metrics, the memory budget, and the plan (factory string,
training size, why) that a build follows."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from embedder import choices
from embedder.errors import IndexError_

KINDS = choices.INDEX_KINDS


METRICS = choices.METRICS


RERANK_FACTOR = 8


EXACT_BELOW = 50_000


ENGINES = choices.ENGINES


@dataclass(frozen=True)
class BuildOptions:
    kind: str = "auto"  # auto | flat | hnsw | ivf | ivfpq | any FAISS factory string
    metric: str = "cosine"
    target_recall: float = 0.95
    memory_budget: int | None = None  # bytes; None: a quarter of physical RAM
    queries: int = 1000  # held-out random queries used to measure recall
    seed: int = 0
    on_disk: bool = False  # IVF kinds: streamed build, inverted lists on disk (automatic over budget)
    coarse: str = "auto"  # IVF kinds' coarse quantizer: auto | flat | hnsw
    opq: bool = False  # IVF-PQ: learn a rotation (OPQ) before product quantization
    engine: str = "local"  # local | ray (streamed IVF builds: the adds as Ray tasks)
    address: str | None = None  # the Ray cluster (None: a local Ray instance)
    # text → image recall on the store's captions, where its model has a text tower (see text_recall)
    text_recall: bool = True
    text_recall_sample: int = 1000  # captions evaluated
    weights: str | None = None  # the weights file the store was made from, if it was (the text tower)
    device: str = "auto"  # where the text tower runs


@dataclass
class Plan:
    factory: str
    kind: str
    reason: str
    train_size: int = 0


@dataclass
class IndexInfo:
    name: str
    path: str
    meta: dict[str, Any] = field(default_factory=dict)


COARSE = choices.COARSE


# From this many lists (n ≥ 16.7M at 4√n) an HNSW graph over the centroids assigns vectors. Below,
# the flat quantizer's BLAS distances win: measured at 1M × 256 (4,000 lists) on 2 cores, see
# docs/benchmarks.md; FAISS's guidelines use HNSW quantizers for 65,536 lists and more.
HNSW_COARSE_FROM = 16_384


def plan(n: int, dim: int, kind: str, budget: int, coarse: str = "auto", opq: bool = False) -> Plan:
    """Pick an index from size and a memory budget, and say why."""
    if coarse not in COARSE:
        raise IndexError_(f"unknown coarse quantizer {coarse!r}; valid: {', '.join(COARSE)}")
    flat_bytes = n * dim * 4
    # ≈4√n lists, but never fewer than 39 vectors per list to train on (FAISS's own floor: k-means
    # with fewer gives poor centroids, and fewer vectors than lists cannot train at all): the cap
    # binds below ~24,000 vectors, i.e. only for an IVF kind asked for on a small store
    nlist = max(1, min(65536, int(4 * math.sqrt(max(n, 1))), n // 39))
    if kind not in KINDS:
        return Plan(kind, "factory", "FAISS factory string given by the user",
                    train_size=min(n, 256 * 64))
    if kind == "auto":
        if n < EXACT_BELOW and flat_bytes <= budget:
            kind, why = "flat", f"{n:,} vectors < {EXACT_BELOW:,}: exact search is fast enough"
        elif flat_bytes * 1.5 <= budget:
            kind, why = "hnsw", (f"{n:,} vectors, {flat_bytes / 2**20:,.0f} MiB raw fits the "
                                 f"{budget / 2**20:,.0f} MiB budget: HNSW for speed at high recall")
        else:
            kind, why = "ivfpq", (f"{flat_bytes / 2**20:,.0f} MiB raw exceeds the "
                                  f"{budget / 2**20:,.0f} MiB budget: IVF-PQ compresses vectors")
    else:
        why = f"--kind {kind}"
    if kind == "flat":
        return Plan("Flat", kind, why)
    if kind == "hnsw":
        return Plan("HNSW32", kind, why)
    if opq and kind != "ivfpq":
        raise IndexError_(f"--opq rotates vectors for product quantization: it needs --kind ivfpq, not {kind!r}")
    train = min(n, max(64 * nlist, 10_000))
    hnsw = coarse == "hnsw" or (coarse == "auto" and nlist >= HNSW_COARSE_FROM)
    ivf = f"IVF{nlist}_HNSW32" if hnsw else f"IVF{nlist}"
    if hnsw:  # a flat quantizer costs nlist distances per vector added or searched
        why += "; HNSW32 coarse quantizer" + (f" (≥ {HNSW_COARSE_FROM:,} lists)" if coarse == "auto" else "")
    if kind == "ivf":
        return Plan(f"{ivf},Flat", kind, why + f"; nlist={nlist} (≈4√n, ≥ 39 vectors per list)", train)
    # 8-bit PQ at 4 dims per byte: 1/16 of float32's memory (d=512 → PQ128, 128 bytes/vector).
    # (4-bit fast-scan trains faster but reached only ~0.6 recall@10 on our clustered tests.)
    m = next((m for m in (dim // 4, dim // 2, dim) if m >= 1 and dim % m == 0), 1)
    rotation = f"OPQ{m}_{dim}," if opq else ""
    return Plan(f"{rotation}{ivf},PQ{m}", kind, why + f"; nlist={nlist}, {'OPQ + ' if opq else ''}PQ{m} "
                f"({m} bytes/vector)", train)

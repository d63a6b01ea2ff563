"""FAISS on GPUs, where the ``gpu`` extra (faiss-gpu) finds a device.

Used for the work of a build that is large and whose result is a CPU index all the same: the k-means
of IVF training (every iteration assigns the whole sample to every centroid: the build's dominant
cost) and the exact ground truth behind every recall figure (``index``, ``inspect``). The index
that is written, loaded and served is the same file either way.

Not used for serving: a served index keeps ``IDSelector`` filters, exact re-ranking from
memory-mapped copies and on-disk inverted lists, which FAISS's GPU indexes do not support, and the
service searches from a thread pool where a GPU index is not thread-safe.

``EMBEDDER_FAISS_GPU=0`` keeps FAISS on the CPU. Where faiss-cpu is installed there is no GPU to
find, and nothing here changes what FAISS computes.
"""

from __future__ import annotations

import os
import threading
from typing import Any

ENV = "EMBEDDER_FAISS_GPU"
# FAISS's GPU indexes and their resources are not thread-safe: one GPU call at a time per process.
_LOCK = threading.Lock()


def gpu_count() -> int:
    """GPUs FAISS can use here: 0 with faiss-cpu, without a device, or with EMBEDDER_FAISS_GPU=0."""
    if os.environ.get(ENV, "").strip() == "0":
        return 0
    import faiss

    get = getattr(faiss, "get_num_gpus", None)
    try:
        return int(get()) if get is not None else 0
    except RuntimeError:  # a CUDA driver that cannot be initialised
        return 0


def assigner_metric(ivf: Any) -> int:
    """The metric FAISS's own IVF training assigns with: the coarse quantizer's, except for a
    quantizer that trains alone (an HNSW graph over the centroids), which FAISS clusters with L2."""
    import faiss

    alone = ivf.quantizer_trains_alone
    alone = ord(alone) if isinstance(alone, str) and alone else int(alone or 0)
    return int(faiss.METRIC_L2) if alone == 2 else int(ivf.quantizer.metric_type)


def train(index: Any, sample: Any, assigner: Any = None) -> str:
    """Train INDEX on SAMPLE (``_train``), without FAISS's clustering warnings on stdout/stderr."""
    from embedder.native_output import quiet

    with quiet():
        return _train(index, sample, assigner)


def _train(index: Any, sample: Any, assigner: Any = None) -> str:
    """Train INDEX on SAMPLE; for an IVF index, its k-means assigns with ASSIGNER (default: a flat
    index of FAISS's own metric on every GPU, when there are GPUs). Returns where the k-means ran.

    The centroids are those FAISS's default training computes, up to the arithmetic of the device
    (a CPU assigner gives the very same centroids: tested)."""
    import faiss

    ivf: Any = faiss.try_extract_index_ivf(index)
    if ivf is None:
        index.train(sample)
        return "cpu"
    where = "cpu"
    if assigner is None:
        n = gpu_count()
        if n == 0:
            index.train(sample)
            return "cpu"
        assigner = faiss.index_cpu_to_all_gpus(faiss.IndexFlat(ivf.d, assigner_metric(ivf)))
        where = f"{n} GPU" + ("s" if n > 1 else "")
    with _LOCK:
        ivf.clustering_index = assigner  # FAISS's hook for "cluster with this index instead"
        try:
            index.train(sample)
        finally:
            ivf.clustering_index = None
    return where

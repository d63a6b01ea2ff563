"""The FAISS calls every index module shares, as a leaf (like faiss's own contrib modules): loading
FAISS with a clear error, metric and score conventions, search parameters, exact search."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from embedder.errors import IndexError_

_TABLE_LOCK = threading.RLock()  # FAISS's precomputed-table switch is process-wide


def import_faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise IndexError_("faiss is not installed: pip install 'embedder[index]'") from None
    return faiss


def prepare_rows(x: np.ndarray, metric: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if metric == "cosine":
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x = x / np.maximum(norms, 1e-12)
    return x


def faiss_metric(metric: str) -> int:
    # Cosine runs as L2 on unit vectors: the same ranking (|a-b|² = 2 - 2cos), and IVF-PQ's
    # residual codes are built for L2.
    faiss = import_faiss()
    return faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2


def to_score(d: np.ndarray, metric: str) -> np.ndarray:
    """FAISS distances → the score users read: cosine similarity, L2 distance, or inner product."""
    return 1.0 - d / 2.0 if metric == "cosine" else d


def set_search_param(index: Any, name: str | None, value: int | None) -> None:
    if name is None or value is None:
        return
    faiss = import_faiss()
    faiss.ParameterSpace().set_index_parameter(index, name, value)


def search_param(index: Any) -> tuple[str | None, list[int]]:
    faiss = import_faiss()
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    if isinstance(inner, faiss.IndexHNSW):
        return "efSearch", [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024]
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is not None:
        values = [v for v in (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512,
                              768, 1024, 2048, 4096) if v <= ivf.nlist]
        return "nprobe", values or [1]
    return None, []


def exact_index(x: np.ndarray, metric: str) -> Any:
    faiss = import_faiss()
    flat = faiss.IndexFlat(x.shape[1], faiss_metric(metric))
    flat.add(x)
    return flat


QUANTIZER_EF = 128  # an HNSW coarse quantizer's efSearch for searches (kept in the index file)


QUANTIZER_EF_ADD = 32  # ... and while adding: one nearest centroid per vector needs less


def set_quantizer_ef(index: Any, ef: int = QUANTIZER_EF) -> None:
    """An HNSW coarse quantizer searches its centroids at efSearch ≥ nprobe (FAISS's default, 16,
    would cap the lists it can return well below the nprobe values tuned to); adds assign each
    vector to one list, at a smaller efSearch."""
    faiss = import_faiss()
    q = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
    if isinstance(q, faiss.IndexHNSW):
        q.hnsw.efSearch = ef


@contextmanager
def no_precomputed_tables() -> Iterator[None]:
    """FAISS gives every IVF-PQ index (on training, reading and cloning) a precomputed distance table
    of nlist × M × 256 floats when it is under 2 GB: 586 MiB for IVF8944,PQ64, copied into every slice
    clone — measured: the 5M build's own memory peaked at 3.7 GB for a 512 MB budget. At the small
    nprobe these indexes are tuned to, computing the tables per query costs little; so they are
    skipped for on-disk indexes (FAISS's process-wide limit, set for the duration and restored)."""
    faiss = import_faiss()
    with _TABLE_LOCK:
        before = faiss.cvar.precomputed_table_max_bytes
        faiss.cvar.precomputed_table_max_bytes = 0
        try:
            yield
        finally:
            faiss.cvar.precomputed_table_max_bytes = before

"""A store's vectors, streamed shard by shard and batch by batch into one preallocated float32
block (no Arrow combine, no second copy), L2-normalised in place, with ids, paths and labels."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embedder.errors import InspectError
from embedder.io import storage
from embedder.store.labels import LabelJoin
from embedder.store.provenance import Provenance
from embedder.store.shards import Store

BATCH_ROWS = 8192


@dataclass
class Vectors:
    x: np.ndarray  # [n, dim] float32, unit length (cosine = inner product)
    ids: pa.Array  # string
    paths: pa.Array  # string
    y: np.ndarray  # int64 class index per row; -1 where the row has no label
    classes: list[str]
    provenance: Provenance
    store: str

    def __len__(self) -> int:
        return len(self.x)

    @property
    def labelled(self) -> np.ndarray:
        return np.flatnonzero(self.y >= 0)


class ClassCodes:
    """Label strings → class codes, the dictionary growing as batches come (first seen, first code);
    ``final()`` maps the provisional codes to sorted class names."""

    def __init__(self, classes: list[str] | None = None) -> None:
        self.names: dict[str, int] = {c: i for i, c in enumerate(classes or [])}
        self.fixed = classes is not None

    def codes(self, column: pa.Array | pa.ChunkedArray) -> np.ndarray:
        lab = column.cast(pa.string())
        if isinstance(lab, pa.ChunkedArray):
            lab = lab.combine_chunks()
        valid = np.asarray(pc.and_(lab.is_valid(), pc.not_equal(lab, "").fill_null(False))
                           .to_numpy(zero_copy_only=False), bool)
        enc = lab.dictionary_encode()
        lookup = []
        for d in enc.dictionary.to_pylist():
            if d not in self.names and not self.fixed and d:
                self.names[d] = len(self.names)
            lookup.append(self.names.get(d, -1))
        codes = enc.indices.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        table = np.array(lookup or [-1], np.int64)
        return np.where(valid, table[codes], -1)

    def final(self) -> tuple[list[str], np.ndarray]:
        classes = sorted(self.names)
        at = {c: i for i, c in enumerate(classes)}
        remap = np.array([at[c] for c in self.names] or [0], np.int64)
        return classes, remap


def normalize_rows(x: np.ndarray, block: int = 65_536) -> None:
    """Unit rows in place, block by block: ``np.linalg.norm(x, axis=1)`` would first square a
    full-size temporary copy (measured: +0.9 GB transient for 100k × 1280)."""
    for s in range(0, len(x), block):
        part = x[s:s + block]
        part /= np.maximum(np.sqrt(np.einsum("ij,ij->i", part, part)), 1e-12)[:, None]


def load_vectors(store_path: str | Path, label_column: str = "label", classes: list[str] | None = None,
                 allow_empty: bool = False, labels: LabelJoin | None = None, count: bool = True) -> Vectors:
    """Read STORE into memory once: n × dim × 4 bytes plus ids and paths, whatever the shard count.
    LABELS: a labels file's join, its labels put over the store's batch by batch (COUNT: recorded
    in the join's tally; the caller reads ``labels.result()``)."""
    store = Store.open(store_path)
    n = store.count()
    if n == 0 and not allow_empty:
        raise InspectError(f"{store_path} holds no vectors: run `embedder extract` into it first")
    names = store.dataset().schema.names if n else ["id", "path", "embedding"]
    has_column = label_column in names
    has_labels = has_column or labels is not None
    columns = ["id", "path", "embedding"] + ([label_column] if has_column else [])
    x = np.empty((n, store.dim), np.float32)
    ids, paths, found = [], [], []
    row = 0
    pool = pa.default_memory_pool()
    for shard in store.shard_files():
        for batch in storage.open_parquet(shard).iter_batches(batch_size=BATCH_ROWS, columns=columns):
            emb = batch.column("embedding")
            flat = emb.flatten() if emb.offset == 0 else emb.values.slice(emb.offset * store.dim,
                                                                            len(emb) * store.dim)
            block = flat.to_numpy(zero_copy_only=False).reshape(len(batch), store.dim)
            x[row:row + len(batch)] = block
            row += len(batch)
            ids.append(batch.column("id"))
            paths.append(batch.column("path"))
            own = batch.column(label_column).cast(pa.string()) if has_column else None
            if labels is not None:
                found.append(labels.apply(batch.column("id"), own, count))
            elif own is not None:
                found.append(own)
        pool.release_unused()  # Arrow's allocator keeps freed pages otherwise: a shard's worth each time
    normalize_rows(x)
    id_arr = pa.concat_arrays(ids) if ids else pa.array([], pa.string())
    path_arr = pa.concat_arrays(paths) if paths else pa.array([], pa.string())
    y = np.full(n, -1, np.int64)
    names_found: list[str] = list(classes or [])
    if has_labels and found:
        codes = ClassCodes(classes)
        y = codes.codes(pa.concat_arrays(found))
        if classes is None:  # the classes present, sorted
            names_found, remap = codes.final()
            y = np.where(y >= 0, remap[np.maximum(y, 0)], -1)
    return Vectors(x, id_arr, path_arr, y, names_found, store.provenance, str(store_path))

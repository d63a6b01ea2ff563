"""The store's compact id index: which of these ids does the store hold, without listing its ids.

Each shard has a sidecar ``_ids/<shard stem>.npy``: the sorted 16-byte digests of its ids (16 bytes
per row, written beside the shard by every writer; built from the shard's id column the first time
it is missing, e.g. in a store written before the index existed). embedder's ids are already 128-bit
BLAKE2b digests written as 32 hex characters: their digest is those 16 bytes, decoded in bulk with
NumPy; any other id string (a store written by other tools) is hashed with BLAKE2b-128. A resume check sorts the
N ids it asks about once, then looks each shard's digests up in them: memory is O(N + one shard)
whatever the store's size, and no id of the store becomes a Python string. (Reading every shard's
id column into a set costs the store's ids as Python objects — see scripts/bench_resume.py.)
A 128-bit digest makes a false "present" (an image skipped on resume) a 2⁻¹²⁸-per-pair event:
about 10⁻²¹ for a billion stored ids against a billion asked.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

INDEX_DIR = "_ids"
DIGEST = np.dtype("S16")


_HEX = np.full(256, 255, np.uint8)
_HEX[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16, dtype=np.uint8)


def digests(ids: Iterable[str] | pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The 16-byte digest of each id, in order (an ``S16`` array)."""
    arr = ids if isinstance(ids, (pa.Array, pa.ChunkedArray)) else pa.array(list(ids), pa.string())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks else pa.array([], pa.string())
    arr = arr.cast(pa.large_string())
    n = len(arr)
    out = np.empty(n, DIGEST)
    if n == 0:
        return out
    offsets = np.frombuffer(arr.buffers()[1], np.int64, n + 1, arr.offset * 8)
    data = np.frombuffer(arr.buffers()[2], np.uint8) if arr.buffers()[2] is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    hexlike = (lengths == 32) & (np.asarray(arr.is_valid()) if arr.null_count else True)
    if hexlike.all() and len(data) >= offsets[-1] and offsets[-1] - offsets[0] == 32 * n:
        nib = _HEX[data[offsets[0]:offsets[-1]]].reshape(n, 32)
        if (nib != 255).all():  # every id is 32 lowercase hex characters: the digest is in the text
            packed = (nib[:, 0::2] << 4) | nib[:, 1::2]
            return np.ascontiguousarray(packed).view(DIGEST).reshape(n)
    for i, text in enumerate(arr.to_pylist()):  # mixed ids: one at a time
        out[i] = _one(text or "")
    return out


def _one(text: str) -> bytes:
    if len(text) == 32:
        try:
            if text == text.lower():
                return bytes.fromhex(text)
        except ValueError:
            pass
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def path_for(shard: Path) -> Path:
    return shard.parent / INDEX_DIR / f"{shard.stem}.npy"


def write(shard: Path, ids: Iterable[str] | pa.Array | pa.ChunkedArray) -> None:
    """Atomically write SHARD's index (sorted digests of IDS)."""
    p = path_for(shard)
    p.parent.mkdir(exist_ok=True)
    tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, np.sort(digests(ids)))
    os.replace(tmp, p)


def load(shard: Path) -> np.ndarray:
    """SHARD's sorted digests: its index file (memory-mapped), or built from its id column (and
    saved, when the store is writable)."""
    p = path_for(shard)
    try:
        return np.load(p, mmap_mode="r")
    except (OSError, ValueError):
        pass
    ids = pq.ParquetFile(shard).read(columns=["id"]).column("id")
    try:
        write(shard, ids)
    except OSError:  # a read-only store: compute, do not keep
        return np.sort(digests(ids))
    return np.load(p, mmap_mode="r")


def contains(shards: Sequence[Path], ids: Sequence[str]) -> np.ndarray:
    """For each of IDS, whether one of SHARDS holds it (a bool array)."""
    if not len(ids):
        return np.zeros(0, bool)
    asked = digests(ids)
    order = np.argsort(asked, kind="stable")
    asked = asked[order]  # sorted; ~40 bytes per asked id in all, whatever the store's size
    hit = np.zeros(len(asked), bool)
    for shard in shards:
        d = load(shard)
        if not len(d):
            continue
        pos = np.searchsorted(asked, d)
        ok = pos < len(asked)
        pos, d = pos[ok], d[ok]
        hit[pos[asked[pos] == d]] = True
    dup = np.flatnonzero(asked[1:] == asked[:-1]) + 1  # an id asked twice: searchsorted found its first
    for i in dup:  # (rare: the same file given twice)
        hit[i] = hit[i - 1]
    out = np.empty(len(asked), bool)
    out[order] = hit
    return out


def sweep(store_dir: Path, shard_stems: set[str]) -> None:
    """Under the writer lock: index files whose shard is gone, and temporaries, are removed."""
    d = store_dir / INDEX_DIR
    if not d.is_dir():
        return
    for f in d.iterdir():
        if f.name.endswith(".tmp") or (f.suffix == ".npy" and f.stem not in shard_stems):
            f.unlink(missing_ok=True)

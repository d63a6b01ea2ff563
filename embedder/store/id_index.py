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
from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow as pa

from embedder.errors import StoreError
from embedder.io import storage

INDEX_DIR = "_ids"
DIGEST = np.dtype("S16")


_HEX = np.full(256, 255, np.uint8)
_HEX[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16, dtype=np.uint8)


CHUNK = 1 << 18  # ids converted at a time (bounded temporaries)


def digests(ids: Iterable[str] | pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The 16-byte digest of each id, in order (an ``S16`` array)."""
    if isinstance(ids, pa.ChunkedArray):
        parts = [_digests(c) for c in ids.chunks]
        return np.concatenate(parts) if parts else np.empty(0, DIGEST)
    if isinstance(ids, pa.Array):
        return _digests(ids)
    seq = ids if isinstance(ids, Sequence) else list(ids)
    out = np.empty(len(seq), DIGEST)
    for s in range(0, len(seq), CHUNK):  # Python strings → Arrow a chunk at a time
        out[s:s + CHUNK] = _digests(pa.array(seq[s:s + CHUNK], pa.string()))
    return out


def _digests(arr: pa.Array) -> np.ndarray:
    n = len(arr)
    out = np.empty(n, DIGEST)
    if n == 0:
        return out
    if arr.type not in (pa.string(), pa.large_string()):
        arr = arr.cast(pa.string())
    wide = np.int64 if arr.type == pa.large_string() else np.int32
    offsets = np.frombuffer(arr.buffers()[1], wide, n + 1, arr.offset * np.dtype(wide).itemsize).astype(np.int64)
    data = arr.buffers()[2]
    if not arr.null_count and data is not None and offsets[-1] - offsets[0] == 32 * n \
            and (np.diff(offsets) == 32).all():
        text = np.frombuffer(data, np.uint8, offsets[-1] - offsets[0], offsets[0])
        nib = _HEX[text].reshape(n, 32)
        if (nib != 255).all():  # every id is 32 lowercase hex characters: the digest is in the text
            nib[:, 0::2] <<= 4
            nib[:, 0::2] |= nib[:, 1::2]
            return np.ascontiguousarray(nib[:, 0::2]).view(DIGEST).reshape(n)
    for i, text_ in enumerate(arr.to_pylist()):  # mixed ids: one at a time
        out[i] = _one(text_ or "")
    return out


def _one(text: str) -> bytes:
    if len(text) == 32:
        try:
            if text == text.lower():
                return bytes.fromhex(text)
        except ValueError:
            pass
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def path_for(shard: str) -> str:
    return storage.join(storage.parent(shard), INDEX_DIR, f"{storage.stem(shard)}.npy")


def write(shard: str, ids: Iterable[str] | pa.Array | pa.ChunkedArray, dest: str | None = None) -> None:
    """Atomically write SHARD's index (sorted digests of IDS), to DEST if given (a staged shard's
    index, renamed into place when the shard is committed)."""
    p = dest or path_for(shard)
    storage.makedirs(storage.parent(p))
    storage.write_bytes(p, storage.npy_bytes(_sorted(digests(ids))))


def load(shard: str) -> np.ndarray:
    """SHARD's sorted digests: its index file (memory-mapped when local), or built from its id
    column (and saved, when the store is writable)."""
    p = path_for(shard)
    try:
        return storage.load_npy(p)
    except (OSError, ValueError):
        pass
    ids = storage.open_parquet(shard).read(columns=["id"]).column("id")
    try:
        write(shard, ids)
    except (OSError, StoreError):  # a read-only store: compute, do not keep
        return _sorted(digests(ids))
    return storage.load_npy(p)


def _sorted(d: np.ndarray) -> np.ndarray:
    """Digests in the order of their first 8 bytes read as a native uint64 (how lookups compare)."""
    return d[np.argsort(_halves(d)[0], kind="stable")]


def _halves(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A digest array as two uint64 arrays (first and last 8 bytes): integer sorts and compares."""
    u = np.ascontiguousarray(d).view(np.uint64).reshape(-1, 2)
    return u[:, 0], u[:, 1]


def contains(shards: Sequence[str], ids: Sequence[str]) -> np.ndarray:
    """For each of IDS, whether one of SHARDS holds it (a bool array)."""
    return contains_digests(shards, digests(ids))


def contains_digests(shards: Sequence[str], asked: np.ndarray) -> np.ndarray:
    """For each asked digest (``digests``), whether one of SHARDS holds its id. The asked digests are
    put in lookup order once (``order_of``: ~40 bytes per asked id in all); each shard's digests are
    looked up in them (``find``: a binary search, also within a run sharing the first 8 bytes) —
    one shard in memory at a time."""
    if not len(asked):
        return np.zeros(0, bool)
    order = order_of(asked)
    s = np.ascontiguousarray(asked[order])
    hit = np.zeros(len(s), bool)
    for shard in shards:
        d = load(shard)
        if not len(d):
            continue
        pos = find(s, np.asarray(d))
        hit[pos[pos >= 0]] = True
    shi, slo = _halves(s)
    repeat = (shi[1:] == shi[:-1]) & (slo[1:] == slo[:-1])  # the same id asked twice: ``find`` gives the first
    if repeat.any():
        group = np.cumsum(np.r_[True, ~repeat]) - 1
        held = np.zeros(int(group[-1]) + 1, bool)
        held[group[hit]] = True
        hit = held[group]
    out = np.empty(len(s), bool)
    out[order] = hit
    return out


def sweep(store_root: str, shard_stems: set[str]) -> None:
    """Under the writer lock: index files whose shard is gone, and temporaries, are removed."""
    d = storage.join(store_root, INDEX_DIR)
    for n in storage.list_names(d):
        if n.endswith(".tmp") or (n.endswith(".npy") and n[:-4] not in shard_stems):
            storage.delete(storage.join(d, n))


def order_of(d: np.ndarray) -> np.ndarray:
    """The positions that put digests D in lookup order (``_sorted``'s: by the first 8 bytes read as
    a native uint64; digests sharing those, by their last 8, so that ``find`` binary-searches a run
    too): an integer argsort, never a sort of id strings. Runs are rare for hashed ids, but ids of
    32 hex characters are their own digest: zero-padded numbers all share their first 8 bytes."""
    hi, lo = _halves(d)
    order = np.argsort(hi, kind="stable")
    shi = hi[order]
    dup = np.flatnonzero(shi[1:] == shi[:-1])
    if len(dup):  # the runs' positions (contiguous, ascending hi) re-sorted by both halves
        at = np.unique(np.concatenate([dup, dup + 1]))
        sub = order[at]
        order[at] = sub[np.lexsort((lo[sub], hi[sub]))]
    return order


def find(sorted_d: np.ndarray, asked: np.ndarray) -> np.ndarray:
    """For each asked digest, its position in SORTED_D (digests in ``order_of`` order), or -1: a
    binary search on the first 8 bytes, confirmed on the other 8; within a run of digests sharing
    their first 8 bytes, a (vectorised) binary search on the last 8."""
    out = np.full(len(asked), -1, np.int64)
    n = len(sorted_d)
    if not n or not len(asked):
        return out
    shi, slo = _halves(sorted_d)
    hi, lo = _halves(asked)
    by = np.argsort(hi)  # searched in order: the binary searches walk the sorted digests forwards
    pos = np.empty(len(hi), np.int64)
    pos[by] = np.searchsorted(shi, hi[by])
    at = np.minimum(pos, n - 1)
    same_hi = shi[at] == hi
    hit = same_hi & (slo[at] == lo)
    out[hit] = at[hit]
    j = np.flatnonzero(same_hi & ~hit)
    if len(j):  # in a run: the first position whose last 8 bytes are not below the asked ones
        left, right = pos[j], np.searchsorted(shi, hi[j], "right").astype(np.int64)
        want = lo[j]
        while True:
            active = left < right
            if not active.any():
                break
            mid = np.where(active, (left + right) // 2, 0)
            below = active & (slo[mid] < want)
            left = np.where(below, mid + 1, left)
            right = np.where(active & ~below, mid, right)
        at = np.minimum(left, n - 1)
        found = (left < n) & (shi[at] == hi[j]) & (slo[at] == want)
        out[j[found]] = at[found]
    return out

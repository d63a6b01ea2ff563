"""The store's compact id index: which of these ids does the store hold, without listing its ids.

Each shard has a sidecar ``_ids/<shard stem>.npy``: the sorted 16-byte BLAKE2b digests of its ids
(16 bytes per row, written beside the shard by every writer; built from the shard's id column the
first time it is missing, e.g. in a store written before the index existed). A resume check sorts the
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
import pyarrow.parquet as pq

INDEX_DIR = "_ids"
DIGEST = np.dtype("S16")


def digests(ids: Iterable[str]) -> np.ndarray:
    """The 16-byte BLAKE2b digest of each id, in order."""
    return np.frombuffer(b"".join(hashlib.blake2b(i.encode(), digest_size=16).digest() for i in ids),
                         dtype=DIGEST)


def path_for(shard: Path) -> Path:
    return shard.parent / INDEX_DIR / f"{shard.stem}.npy"


def write(shard: Path, ids: Iterable[str]) -> None:
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
    ids = pq.ParquetFile(shard).read(columns=["id"]).column("id").to_pylist()
    try:
        write(shard, ids)
    except OSError:  # a read-only store: compute, do not keep
        return np.sort(digests(ids))
    return np.load(p, mmap_mode="r")


def contains(shards: Sequence[Path], ids: Sequence[str]) -> np.ndarray:
    """For each of IDS, whether one of SHARDS holds it (a bool array)."""
    if not len(ids):
        return np.zeros(0, bool)
    unique, inverse = np.unique(digests(ids), return_inverse=True)
    hit = np.zeros(len(unique), bool)
    for shard in shards:
        d = load(shard)
        if not len(d):
            continue
        pos = np.searchsorted(unique, d)
        ok = pos < len(unique)
        pos, d = pos[ok], d[ok]
        hit[pos[unique[pos] == d]] = True
    return hit[inverse.reshape(-1)]


def sweep(store_dir: Path, shard_stems: set[str]) -> None:
    """Under the writer lock: index files whose shard is gone, and temporaries, are removed."""
    d = store_dir / INDEX_DIR
    if not d.is_dir():
        return
    for f in d.iterdir():
        if f.name.endswith(".tmp") or (f.suffix == ".npy" and f.stem not in shard_stems):
            f.unlink(missing_ok=True)

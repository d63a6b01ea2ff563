"""The weights file a store was made from, remembered where it was: each run of ``extract --weights
FILE`` records the file's absolute path in the store's manifest (``runs[].weights_file``), and the
steps after it — ``probe``'s zero-shot, ``search`` by image or text, ``serve``, the Python API — take
that file when no ``--weights`` is given, provided its SHA-256 is still the one the store's provenance
records (a file changed or replaced since is never used: the store would silently mean other vectors).

Hashing a large file costs seconds (ViT-B-32: 600 MB), so a match is kept per process by (path, size,
modification time).
"""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

from embedder.io import storage
from embedder.store.shards import MANIFEST

log = logging.getLogger(__name__)
_matched: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) → its sha256


def file_digest(path: str) -> str | None:
    """PATH's SHA-256, or None when it is not a readable plain file (cached by path, size and mtime).

    Only a regular file is read: a FIFO recorded in a manifest would block the open for ever, a device
    (/dev/zero) would be read for ever, and a directory cannot be read."""
    from embedder.models.origin import sha256_file

    try:
        st = os.stat(path)
    except (OSError, ValueError):  # ValueError: a path with a NUL byte
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    key = (path, st.st_size, st.st_mtime_ns)
    if key not in _matched:
        try:
            _matched[key] = sha256_file(Path(path))
        except OSError:
            return None
    return _matched[key]


def recorded_paths(store: str) -> list[str]:
    """The weights files the store's runs recorded, newest first (none: an older store, or none used)."""
    try:
        manifest = json.loads(storage.read_bytes(storage.join(storage.resolve(store), MANIFEST)))
    except (OSError, ValueError, FileNotFoundError):
        return []
    runs = manifest.get("runs") if isinstance(manifest, dict) else None
    if not isinstance(runs, list):
        return []
    seen: list[str] = []
    for run in reversed(runs):
        p = run.get("weights_file") if isinstance(run, dict) else None
        if isinstance(p, str) and p and p not in seen:
            seen.append(p)
    return seen


def remembered_weights(store: str | None, sha256: str) -> str | None:
    """The file STORE was made from, where it still is and still has SHA256; else None."""
    if not store or not sha256:
        return None
    for path in recorded_paths(store):
        if file_digest(path) == sha256:
            return path
        log.info("weights file %s recorded by %s is gone or changed (SHA-256 differs): not used", path, store)
    return None

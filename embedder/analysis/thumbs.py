"""Small JPEG thumbnails beside the report, named by a hash of the store id (never by a path
taken from the data), made on a thread pool, reused across runs; a missing or unreadable image is
reported as missing and never stops the report."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

THUMB_PX = 128
THUMBS_DIR = "thumbs"


def thumb_name(store_id: str) -> str:
    return hashlib.blake2b(store_id.encode(), digest_size=8).hexdigest() + ".jpg"


def _make(path: str, target: Path) -> bool:
    from PIL import Image

    from embedder.decode.common import read_bytes
    from embedder.decode.cpu import load_rgb
    from embedder.errors import DecodeError

    if target.exists():
        return True
    try:  # a file, a tar shard's member, a table's row: read where the store says it lives
        img = load_rgb(read_bytes(path, None), draft_size=THUMB_PX)
        img.thumbnail((THUMB_PX, THUMB_PX), Image.Resampling.BILINEAR)
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        img.save(tmp, "JPEG", quality=80)
        os.replace(tmp, target)
        return True
    except (OSError, DecodeError):
        return False


def make_thumbnails(items: Iterable[tuple[str, str]], report_dir: Path, workers: int | None = None,
                    progress: Callable[[int, int], None] | None = None) -> set[str]:
    """Thumbnails for (id, path) pairs; returns the ids that have one."""
    folder = report_dir / THUMBS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    todo = list(dict(items).items())
    ok: set[str] = set()
    with ThreadPoolExecutor(workers or max(2, os.cpu_count() or 2)) as pool:
        done = 0
        for (store_id, _), made in zip(todo, pool.map(lambda it: _make(it[1], folder / thumb_name(it[0])), todo)):
            if made:
                ok.add(store_id)
            done += 1
            if progress and (done % 256 == 0 or done == len(todo)):
                progress(done, len(todo))
    return ok

"""Where indexes live on disk: safe names, one writer at a time, atomic generations.

    HOME/NAME/CURRENT          "gen-000042": the generation readers open (replaced atomically)
    HOME/NAME/gen-000042/      one complete index (every file of it)
    HOME/NAME/.lock            held by the one writer (build, add, drop)

A write builds a complete new generation in a temporary folder, renames it into place and only
then replaces CURRENT: a reader sees the old generation or the new one, never a mix, and a crash
at any point leaves the previous generation current. Superseded generations are removed after
the switch. A name is a plain name (letters, digits, ``._-``, no leading dot) whose resolved path
stays under the home: names arrive from the command line and from HTTP requests.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from embedder.errors import IndexError_, shown
from embedder.io.locks import exclusive

HOME_ENV = "EMBEDDER_HOME"
CURRENT = "CURRENT"
LOCK = ".lock"
META_FILE = "index.json"
LEGACY_META = META_FILE  # indexes written before generations: files directly in NAME/
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_GEN = re.compile(r"^gen-(\d{6,})$")


def home(path: str | os.PathLike[str] | None = None) -> Path:
    return Path(path or os.environ.get(HOME_ENV) or "indexes")


def index_dir(name: str, index_home: str | os.PathLike[str] | None = None) -> Path:
    """NAME's folder under the home; anything but a plain name is refused."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise IndexError_(f"invalid index name {shown(name)}: use letters, digits, '.', '_' and '-' "
                          "(at most 128, not starting with '.')")
    root = home(index_home).resolve()
    d = (root / name).resolve()
    if d.parent != root:  # e.g. a symlink planted in the home pointing elsewhere
        raise IndexError_(f"index name {shown(name)} resolves outside the index home {root}")
    return root / name


def generation_of(folder: Path) -> int:
    m = _GEN.match(folder.name)
    return int(m.group(1)) if m else 0


def current(d: Path) -> Path | None:
    """The current generation's folder (or NAME/ itself for a legacy index), None if there is none."""
    try:
        text = (d / CURRENT).read_text().strip()
    except FileNotFoundError:
        return d if (d / LEGACY_META).is_file() else None
    except OSError as e:
        raise IndexError_(f"cannot read {d / CURRENT}: {e.strerror or e}") from None
    if not _GEN.match(text):
        raise IndexError_(f"{d / CURRENT} names no generation ({text[:40]!r}); rebuild the index")
    return d / text


def exists(d: Path) -> bool:
    return current(d) is not None


@contextmanager
def writer(d: Path) -> Iterator[None]:
    """The one writer of index folder D; a second gets a one-line error at once."""
    d.mkdir(parents=True, exist_ok=True)
    busy = IndexError_(f"index {d.name!r} is being written by another embedder process; "
                       "try again when it has finished")
    with exclusive(d / LOCK, lambda: busy):
        for stale in d.glob(".gen-*.tmp"):  # left by a killed writer
            shutil.rmtree(stale, ignore_errors=True)
        yield


def staging(d: Path) -> Path:
    """A fresh temporary folder for the next generation (caller holds the writer lock)."""
    tmp = d / f".gen-{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    return tmp


def next_generation(d: Path) -> int:
    cur = current(d)
    return (generation_of(cur) if cur is not None else 0) + 1


def commit(d: Path, staged: Path) -> Path:
    """Make STAGED the next generation and current, in one atomic step; remove superseded ones."""
    cur = current(d)
    number = next_generation(d)
    final = d / f"gen-{number:06d}"
    if final.exists():  # a crash after rename, before CURRENT moved: that folder never became current
        shutil.rmtree(final)
    _fsync_dir_files(staged)
    staged.rename(final)
    tmp = d / f".{CURRENT}.{uuid.uuid4().hex[:8]}"
    tmp.write_text(final.name + "\n")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, d / CURRENT)
    for old in d.iterdir():
        if old.is_dir() and _GEN.match(old.name) and old != final:
            shutil.rmtree(old, ignore_errors=True)
    if cur == d:  # migrated from the legacy layout: its loose files are superseded too
        for loose in d.iterdir():
            if loose.is_file() and loose.name not in (CURRENT, LOCK):
                loose.unlink()
    return final


def remove(d: Path) -> None:
    """Delete the whole index. Under the writer lock (so never in the middle of a write) the folder
    is renamed out of the home in one step; only then, lock released, is the renamed copy deleted:
    a writer that starts meanwhile makes a new folder and never sees a half-deleted one."""
    tomb = d.parent / f".dropped-{d.name}-{uuid.uuid4().hex[:8]}"
    with writer(d):
        os.rename(d, tomb)
    shutil.rmtree(tomb, ignore_errors=True)


def _fsync_dir_files(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


# ---- reading the layout (no FAISS, numpy or Arrow: `index list|info` start fast) -------------
def names(index_home: str | None = None) -> list[str]:
    h = home(index_home)
    if not h.is_dir():
        return []
    out = []
    for d in h.iterdir():
        try:
            if d.is_dir() and exists(index_dir(d.name, index_home)):
                out.append(d.name)
        except IndexError_:
            continue  # not an index folder (or an unsafe name): never listed
    return sorted(out)


def locate(name: str, index_home: str | None = None) -> Path:
    """The folder of NAME's current generation."""
    d = index_dir(name, index_home)
    cur = current(d) if d.is_dir() else None
    if cur is None or not (cur / META_FILE).is_file():
        available = names(index_home)
        listing = ", ".join(available) if available else "none; build one with `embedder index build`"
        raise IndexError_(f"no index named {shown(name)} in {home(index_home)}; available: {listing}")
    return cur


def identity(folder: Path) -> str:
    """What tells one generation from every other, ever: its build id (a fresh one per commit,
    so a drop and rebuild that restarts at gen-000001 is still a new generation), or for indexes
    written before build ids, the generation's name and index.json's modification time."""
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        meta = {}
    build = meta.get("build_id") if isinstance(meta, dict) else None
    if build:
        return str(build)
    try:
        stamp = (folder / META_FILE).stat().st_mtime_ns
    except OSError:
        stamp = 0
    return f"{folder.name}@{stamp}"


def read_meta(folder: Path, name: str) -> dict[str, Any]:
    try:
        meta: dict[str, Any] = json.loads((folder / META_FILE).read_text())
    except json.JSONDecodeError as e:
        raise IndexError_(f"index {name!r} has a corrupt {META_FILE}: {e}") from None
    meta.setdefault("generation", generation_of(folder))
    return meta


def info(name: str, index_home: str | None = None) -> dict[str, Any]:
    for _ in range(2):  # a writer may retire the generation between locating and reading it
        try:
            return read_meta(locate(name, index_home), name)
        except FileNotFoundError:
            continue
    return read_meta(locate(name, index_home), name)


def drop(name: str, index_home: str | None = None) -> None:
    locate(name, index_home)  # a clear error for a name that is not an index
    remove(index_dir(name, index_home))


INDEX_FILE = "index.faiss"


IDS_FILE = "ids.parquet"


VECTORS_FILE = "vectors.npy"  # float16 copies for exact re-ranking of compressed (PQ) indexes


def commit_index(target: Path, tmpdir: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """index.json goes in last; then the staged folder becomes the current generation."""
    meta["generation"] = next_generation(target)
    meta["build_id"] = uuid.uuid4().hex  # never reused: see generations.identity
    (tmpdir / META_FILE).write_text(json.dumps(meta, indent=2))
    commit(target, tmpdir)
    return meta

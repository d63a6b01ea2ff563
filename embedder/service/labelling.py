"""Labelling a selection in the service (no HTTP here: ``routes.labelling`` is the HTTP side).

A selection is a ranked list of images to label, as ``embedder select STORE --budget N --out
HOME/labelling/NAME.parquet`` writes it (columns id, path, rank, why; rank 1 is labelled first).
Its labels go next to it, to ``HOME/labelling/NAME.labels.parquet`` (id, label, labelled_at): a
file ``read_labels`` reads, so ``embedder probe STORE --labels …`` takes it as it is.

- Names are plain (letters, digits, '.', '_', '-'; not starting with '.'; never ending in
  '.labels'), and the file they name must resolve inside ``HOME/labelling`` (a planted symlink
  pointing elsewhere is refused): a name is never a path.
- A file that is no selection (not Parquet, no id or rank column, an id twice, over ``MAX_ROWS``
  rows or ``MAX_BYTES`` bytes) is refused in one line (``NotASelection``, ``SelectionTooLarge``),
  before it is read whole where its metadata says so.
- Every change rewrites the labels file whole, atomically (a temporary file of a new name, created
  exclusively, then a rename): a reader sees the old file or the new one, never a part. Changes to one
  selection run one at a time (a lock per selection in this process, and an advisory lock on
  ``.NAME.lock`` for other processes on the same home), each a read-modify-write of the file as it
  is on disk (re-read when its inode, size or mtime changed), so two tabs — or two servers —
  labelling at once lose nothing. A labels file that exists but cannot be read is never
  overwritten (``LabelsFileError``).

Memory: a selection is at most ``MAX_ROWS`` rows; ``CACHED`` parsed selections are kept (least
recently used dropped), and each selection's labels (at most its rows, plus any ids a hand-edited
file adds).
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from embedder.errors import EmbedderError, shown
from embedder.index import generations as layout
from embedder.service.engine import NotFound

FOLDER = "labelling"  # under the service's home
SUFFIX = ".parquet"
LABELS_SUFFIX = ".labels.parquet"
SELECTION_META = b"embedder.selection"
LABELS_META = b"embedder.labels"
MAX_ROWS = 100_000  # a selection is what a person labels: far below this
MAX_BYTES = 64 * 2**20
MAX_LABEL = 100  # characters in a label, after trimming
MAX_LISTED = 1000  # selections GET /labelling lists
CACHED = 8  # parsed selections kept
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}\Z")
# never in a label: bidirectional overrides and isolates (they reorder what the page shows)
_BIDI = set(range(0x202A, 0x202F)) | set(range(0x2066, 0x206A))
# the invisible format characters a label may hold: the zero-width (non-)joiner (emoji sequences, Persian
# and Indic words) and tag characters (subdivision flags); any other (U+200B, U+200E/F, U+2060, U+FEFF,
# U+00AD…) would make two classes that look the same ('cat' and 'cat\u200b') or a class that shows nothing
_FORMAT_KEPT = {0x200C, 0x200D} | set(range(0xE0020, 0xE0080))


class LabellingError(EmbedderError):
    """A labelling request that cannot be done as asked."""


class BadName(LabellingError):
    """Not a plain selection name."""


class UnknownSelection(NotFound, LabellingError):
    """No selection of that name."""


class UnknownItem(NotFound, LabellingError):
    """An id that is not in the selection."""


class NotASelection(LabellingError):
    """A file in the labelling folder that is no selection."""


class SelectionTooLarge(NotASelection):
    """A selection over MAX_ROWS rows or MAX_BYTES bytes."""


class BadLabel(LabellingError):
    """An empty, over-long or control-character label."""


class LabelsFileError(LabellingError):
    """A labels file that exists but cannot be read: left as it is, never overwritten."""


class CannotWrite(LabellingError):
    """The labels file cannot be written (a read-only home, a full disk): nothing changed."""


@dataclass(frozen=True)
class Selection:
    """A selection's rows in rank order."""

    name: str
    table: pa.Table  # id, rank, why, path (why and path null where the file has none)
    position: dict[str, int]  # id → row of table
    meta: dict[str, Any] = field(default_factory=dict)  # the file's embedder.selection metadata (if any)

    def __len__(self) -> int:
        return self.table.num_rows


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or name.endswith(".labels"):
        raise BadName(f"invalid selection name {shown(name)}: use letters, digits, '.', '_' and '-' "
                      "(at most 128, not starting with '.', not ending in '.labels')")
    return name


def check_label(label: str) -> str:
    """LABEL trimmed; a one-line ``BadLabel`` for one that is empty, over MAX_LABEL characters or holds
    a control character (a line break, a tab, a bidirectional override…)."""
    text = label.strip() if isinstance(label, str) else ""
    if not text:
        raise BadLabel("a label needs at least one character that is not a space")
    if len(text) > MAX_LABEL:
        raise BadLabel(f"a label has at most {MAX_LABEL} characters, got {len(text):,}")
    for ch in text:
        category = unicodedata.category(ch)
        if category in ("Cc", "Cs", "Zl", "Zp") or ord(ch) in _BIDI:
            raise BadLabel(f"a label cannot hold the control character U+{ord(ch):04X}")
        if category == "Cf" and ord(ch) not in _FORMAT_KEPT:
            raise BadLabel(f"a label cannot hold the invisible character U+{ord(ch):04X}")
    if all(unicodedata.category(ch)[0] in "ZMC" for ch in text):  # spaces, marks, joiners only
        raise BadLabel("a label needs at least one visible character")
    return text


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _stat_key(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def read_selection(path: Path, name: str) -> Selection:
    """The selection file PATH, checked (module docstring): its size from the metadata before any row
    is read."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    size = path.stat().st_size
    if size > MAX_BYTES:
        raise SelectionTooLarge(f"selection {name} is {size / 2**20:,.0f} MiB; at most {MAX_BYTES // 2**20} MiB "
                                "is served (split it: a person labels far fewer)")
    try:
        f = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise NotASelection(f"{name}{SUFFIX} is not a selection: not a Parquet file ({_first_line(e)})") from None
    rows = f.metadata.num_rows
    if rows > MAX_ROWS:
        raise SelectionTooLarge(f"selection {name} has {rows:,} rows; at most {MAX_ROWS:,} are served "
                                "(a person labels far fewer: `embedder select --budget`)")
    schema = f.schema_arrow
    missing = [c for c in ("id", "rank") if c not in schema.names]
    if missing:
        raise NotASelection(f"{name}{SUFFIX} is not a selection: no {' or '.join(missing)} column (it has "
                            f"{', '.join(schema.names[:10]) or 'none'}); make one with `embedder select`")
    if not pa.types.is_integer(schema.field("rank").type):
        raise NotASelection(f"{name}{SUFFIX} is not a selection: its rank column is {schema.field('rank').type}, "
                            "not integers")
    columns = [c for c in ("id", "rank", "why", "path") if c in schema.names]
    try:
        table = f.read(columns=columns)
        ids = table.column("id").cast(pa.string())
        extra = {c: (table.column(c).cast(pa.string()) if c in columns else pa.nulls(rows, pa.string()))
                 for c in ("why", "path")}
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
        raise NotASelection(f"{name}{SUFFIX} is not a selection: {_first_line(e)}") from None
    if ids.null_count or table.column("rank").null_count:
        raise NotASelection(f"{name}{SUFFIX} is not a selection: a row without an id or a rank")
    table = pa.table({"id": ids, "rank": table.column("rank").cast(pa.int64()), **extra})
    table = table.take(pc.sort_indices(table, [("rank", "ascending")]))  # stable: ties keep file order
    id_list = table.column("id").to_pylist()
    position = {i: n for n, i in enumerate(id_list)}
    if len(position) < len(id_list):
        seen: set[str] = set()
        twice = next(i for i in id_list if i in seen or seen.add(i))  # type: ignore[func-returns-value]
        raise NotASelection(f"{name}{SUFFIX} is not a selection: id {shown(twice)} is in it twice")
    return Selection(name, table.combine_chunks(), position, _meta(schema.metadata))


def _meta(metadata: dict[bytes, bytes] | None) -> dict[str, Any]:
    """The selection's own record (store, strategy, budget…): plain values only, each cut short."""
    raw = (metadata or {}).get(SELECTION_META)
    try:
        doc = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    if not isinstance(doc, dict):
        return {}
    return {str(k)[:40]: (v if not isinstance(v, str) else v[:300]) for k, v in list(doc.items())[:20]
            if isinstance(v, str | int | float | bool) or v is None}


@dataclass
class _Labels:
    """One selection's labels as on disk: id → (label, labelled_at in ms), in the file's order."""

    entries: dict[str, tuple[str, int]] = field(default_factory=dict)
    key: tuple[int, int, int] | None = None  # the file's (inode, size, mtime) when read or written
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True)
class Change:
    """What one label change did."""

    id: str
    label: str | None  # now (None: unlabelled)
    previous: str | None  # before


class Labelling:
    """The selections and labels under one home (``for_home``: one object per home and process, so
    that its locks are the only ones)."""

    def __init__(self, home: str | os.PathLike[str] | None) -> None:
        self.root = layout.home(home).resolve() / FOLDER
        self._selections: OrderedDict[tuple[str, tuple[int, int, int] | None], Selection] = OrderedDict()
        self._labels: dict[str, _Labels] = {}
        self._lock = threading.Lock()  # the two caches above

    # ---- names and files ------------------------------------------------------------------------
    def path_of(self, name: str, suffix: str = SUFFIX) -> Path:
        check_name(name)
        path = self.root / f"{name}{suffix}"
        if path.resolve().parent != self.root.resolve():  # a symlink planted in the folder
            raise BadName(f"selection name {shown(name)} resolves outside {self.root}")
        return path

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            n = p.name
            if n.endswith(SUFFIX) and not n.endswith(LABELS_SUFFIX) and p.is_file():
                try:
                    out.append(check_name(n[:-len(SUFFIX)]))
                except BadName:
                    continue
        return sorted(out)[:MAX_LISTED]

    def selection(self, name: str) -> Selection:
        path = self.path_of(name)
        key = _stat_key(path)
        if key is None or not path.is_file():
            listing = ", ".join(self.names()[:20]) or f"none; write one with `embedder select STORE --budget N --out " \
                                                      f"{self.root}/NAME.parquet`"
            raise UnknownSelection(f"no selection named {shown(name)} in {self.root}; available: {listing}")
        with self._lock:
            cached = self._selections.get((name, key))
            if cached is not None:
                self._selections.move_to_end((name, key))
                return cached
        made = read_selection(path, name)  # outside the lock: other selections are served meanwhile
        with self._lock:
            for old in [k for k in self._selections if k[0] == name]:
                del self._selections[old]
            self._selections[(name, key)] = made
            while len(self._selections) > CACHED:
                self._selections.popitem(last=False)
        return made

    # ---- labels ---------------------------------------------------------------------------------
    def _state(self, name: str) -> _Labels:
        with self._lock:
            return self._labels.setdefault(name, _Labels())

    @contextmanager
    def _held(self, name: str) -> Iterator[_Labels]:
        """NAME's labels, locked and as the file now is (re-read if another process changed it)."""
        state = self._state(name)
        with state.lock, _file_lock(self.root / f".{name}.lock"):
            path = self.path_of(name, LABELS_SUFFIX)
            key = _stat_key(path)
            if key is not None and not path.is_file():  # a folder (read as a dataset), a pipe…
                raise LabelsFileError(f"labels file {path} is not a file; it is left as it is: move it away "
                                      "to label this selection again")
            if key != state.key:
                state.entries = _read_labels_file(path) if key is not None else {}
                state.key = key
            yield state

    def _write(self, name: str, state: _Labels) -> None:
        path = self.path_of(name, LABELS_SUFFIX)
        ids = list(state.entries)
        table = pa.table({
            "id": pa.array(ids, pa.string()),
            "label": pa.array([state.entries[i][0] for i in ids], pa.string()),
            "labelled_at": pa.array([state.entries[i][1] for i in ids], pa.timestamp("ms", tz="UTC")),
        }).replace_schema_metadata({LABELS_META: json.dumps({"selection": name, "version": 1}).encode()})
        try:
            _write_atomically(path, table)
        except OSError as e:
            raise CannotWrite(f"cannot write labels file {path}: {_first_line(e)}; the label was not "
                              "changed") from None
        state.key = _stat_key(path)

    def labels(self, name: str) -> dict[str, str]:
        """NAME's labels (id → label), as the file has them."""
        self.path_of(name)
        if not self.root.is_dir():
            return {}
        with self._held(name) as state:
            return {i: v[0] for i, v in state.entries.items()}

    def set_label(self, name: str, item_id: str, label: str | None) -> Change:
        """Label ITEM_ID of selection NAME (None: take its label away), written before this returns."""
        sel = self.selection(name)
        if item_id not in sel.position:
            raise UnknownItem(f"id {shown(item_id)} is not in selection {name}")
        text = None if label is None else check_label(label)
        with self._held(name) as state:
            before = state.entries.get(item_id)
            previous = before[0] if before else None
            if previous == text:
                return Change(item_id, text, previous)
            kept = dict(state.entries)
            if text is None:
                del state.entries[item_id]
            else:
                state.entries[item_id] = (text, int(time.time() * 1000))
            try:
                self._write(name, state)
            except BaseException:
                state.entries = kept  # nothing changed on disk: nor here
                raise
            return Change(item_id, text, previous)


_homes: dict[Path, Labelling] = {}
_homes_lock = threading.Lock()


def for_home(home: str | os.PathLike[str] | None) -> Labelling:
    """The one ``Labelling`` of HOME in this process."""
    root = layout.home(home).resolve()
    with _homes_lock:
        if root not in _homes:
            _homes[root] = Labelling(root)
        return _homes[root]


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An advisory lock on PATH for other processes on the same home (none where fcntl is missing, or
    where the folder is read-only: nothing can be written there anyway)."""
    try:
        import fcntl
    except ImportError:  # Windows: the lock in this process only
        yield
        return
    try:  # never through a link planted in its place (it would create or lock a file elsewhere)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _write_atomically(path: Path, table: pa.Table) -> None:
    """TABLE as the Parquet file PATH, whole or not at all: written to a temporary file of a new name
    in PATH's folder (created exclusively: a link planted there is never followed), synced, renamed."""
    import tempfile

    import pyarrow.parquet as pq

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # as a plain write makes it (mkstemp's 0600 would hide it from others)
            pq.write_table(table, f, compression="zstd")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_labels_file(path: Path) -> dict[str, tuple[str, int]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
        ids = table.column("id").cast(pa.string()).to_pylist()
        labels = table.column("label").cast(pa.string()).to_pylist()
        at = (table.column("labelled_at").cast(pa.timestamp("ms", tz="UTC")).cast(pa.int64()).to_pylist()
              if "labelled_at" in table.schema.names else [0] * len(ids))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, KeyError) as e:
        raise LabelsFileError(f"labels file {path} cannot be read ({_first_line(e)}); it is left as it is: "
                              "move it away to label this selection again") from None
    return {i: (lab, t or 0) for i, lab, t in zip(ids, labels, at) if i is not None and lab}


def progress(sel: Selection, labels: dict[str, str]) -> dict[str, int]:
    """How many of the selection's items have a label (a hand-edited file's other ids do not count)."""
    done = sum(1 for i in labels if i in sel.position)
    return {"labelled": done, "total": len(sel)}


def classes(sel: Selection, labels: dict[str, str]) -> list[dict[str, Any]]:
    """The classes given so far, in the order first used, with how many of the selection's items each has."""
    counts: dict[str, int] = {}
    for i, label in labels.items():
        if i in sel.position:
            counts[label] = counts.get(label, 0) + 1
    return [{"name": k, "count": v} for k, v in counts.items()]

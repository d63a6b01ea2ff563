"""Parquet, Arrow and Feather files whose rows hold image bytes, as a source: Hugging Face
datasets (an ``image`` column that is a struct of ``bytes`` and ``path``; ``ClassLabel`` integers
named in the schema's metadata), img2dataset's Parquet output, any table with a binary column.

Told apart from a Parquet *list of paths* by the schema: a table is read as images when it has an
image column (``--image-column``, default the first binary or ``{bytes, path}`` struct column).
Each row is located as ``FILE#COLUMN/GROUP/ROW`` (row group for Parquet, record batch for Arrow): its
id is a hash of that location, or, with ``--id-column``, of the row's key in its file (stable however
the rows are regrouped), or of the key alone with ``--global-keys`` (the same key in two tables is one
item). Discovery reads only the small columns (id, label, caption). Decoding reads a Parquet row
group's image column forward a window of rows at a time, shared by a process's decode threads, and
an Arrow file's record batches as views of the mapped file (one reader per file and process), so
memory holds a few windows of images per process, whatever the size of the table or of its row
groups. A null or empty image, a missing key or a repeated one is a failing location that decoding
records with its reason; a ``ClassLabel`` of -1 (``datasets``' "no label") is no label.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from embedder.errors import DecodeError, SourceError
from embedder.io import location
from embedder.io.limits import MAX_IMAGE_BYTES, MAX_METADATA_BYTES, too_big
from embedder.io.options import SourceOptions
from embedder.io.uri import failing, filesystem, image_id, is_uri

TABLE_SUFFIXES = location.TABLE_SUFFIXES
DISCOVERY_ROWS = 4096  # discovery reads the small columns (key, label, caption) this many rows at a time


@dataclass(frozen=True)
class Row:
    id: str
    locator: str
    label: str | None
    caption: str | None


def is_table(path: str) -> bool:
    return path.lower().endswith(TABLE_SUFFIXES)


def _is_image_type(t: pa.DataType) -> bool:
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return True
    return pa.types.is_struct(t) and any(t.field(i).name == "bytes" for i in range(t.num_fields))


def image_column(schema: pa.Schema, wanted: str | None = None) -> str | None:
    """The column holding image bytes: WANTED (an error naming the columns when absent or not
    bytes), else the first binary or ``{bytes, path}`` struct column, else None (a list of paths)."""
    if wanted is not None:
        if wanted not in schema.names:
            raise SourceError(f"no column {wanted!r}; columns: {', '.join(schema.names)}")
        if not _is_image_type(schema.field(wanted).type):
            raise SourceError(f"column {wanted!r} holds {schema.field(wanted).type}, not image bytes "
                              "(binary, or a struct with a 'bytes' field)")
        return wanted
    return next((f.name for f in schema if _is_image_type(f.type)), None)


def class_names(schema: pa.Schema, column: str) -> list[str] | None:
    """A Hugging Face ``ClassLabel`` column's names, from the schema metadata ``datasets`` writes."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if raw is None:
        return None
    try:
        info = json.loads(raw)
    except ValueError:
        return None
    feats = (info.get("info") or {}).get("features") or {}
    feat = feats.get(column) if isinstance(feats, dict) else None
    if isinstance(feat, dict) and feat.get("_type") == "ClassLabel" and isinstance(feat.get("names"), list):
        return [str(n) for n in feat["names"]]
    return None


class _Reader:
    """Row groups (Parquet) or record batches (Arrow IPC file or stream) of one table file.
    BUFFERED: a Parquet column chunk is read page by page through a 1 MiB buffer, not whole (for
    reading the image column a window of rows at a time)."""

    def __init__(self, path: str, buffered: bool = False) -> None:
        self.path = path
        self.lock = threading.Lock()  # decoding's threads read a shared reader one at a time
        self._windows: dict[tuple[int, str], int] = {}  # window_rows, once per group and column
        self.parquet = path.lower().endswith(".parquet")
        try:
            if self.parquet:
                kw: dict[str, Any] = {"buffer_size": 1 << 20, "pre_buffer": False} if buffered else {}
                self.pf = pq.ParquetFile(_local_or_uri(path), **kw)
                self.schema = self.pf.schema_arrow
                self.groups = self.pf.num_row_groups
            else:
                self._ipc = _open_ipc(path)
                self.schema = self._ipc.schema
                self.groups = self._ipc.num_record_batches
        except (OSError, pa.ArrowInvalid) as e:
            raise SourceError(f"cannot read {path} as a table: {str(e).splitlines()[0][:200]}") from None

    def rows(self, i: int) -> int:
        """Row group (record batch) I's length, from metadata: no column is read."""
        if self.parquet:
            return int(self.pf.metadata.row_group(i).num_rows)
        return int(self._ipc.get_batch(i).num_rows)

    def group(self, i: int, columns: list[str]) -> pa.Table:
        if self.parquet:
            return self.pf.read_row_group(i, columns=columns)
        return pa.Table.from_batches([self._ipc.get_batch(i)]).select(columns)

    def small_batches(self, i: int, columns: list[str]) -> Iterator[pa.RecordBatch | pa.Table]:
        """Row group I's COLUMNS, DISCOVERY_ROWS rows at a time (a million-row group is not read whole)."""
        if self.parquet:
            yield from self.pf.iter_batches(batch_size=DISCOVERY_ROWS, row_groups=[i], columns=columns)
        else:
            yield self.group(i, columns)

    def batch(self, i: int) -> pa.RecordBatch:
        """Arrow: record batch I (views of the mapped file)."""
        return self._ipc.get_batch(i)

    def window_rows(self, group: int, column: str) -> int:
        """Parquet: how many rows of COLUMN hold about WINDOW_BYTES in row group GROUP (from its
        metadata: the column chunks' uncompressed size)."""
        rows = self._windows.get((group, column))
        if rows is None:
            g = self.pf.metadata.row_group(group)
            size = sum(g.column(j).total_uncompressed_size for j in range(g.num_columns)
                       if g.column(j).path_in_schema.split(".")[0] == column)
            per_row = max(1, size // max(1, g.num_rows))
            rows = self._windows[(group, column)] = max(1, min(g.num_rows, WINDOW_BYTES // per_row))
        return rows


class _IpcBatches:
    """Random access to an Arrow IPC file's or stream's record batches (memory-mapped: a stream's
    batches are indexed once, nothing is copied)."""

    def __init__(self, path: str) -> None:
        source = pa.memory_map(path)
        try:
            self._file: Any = pa.ipc.open_file(source)
            self.schema = self._file.schema
            self.num_record_batches = self._file.num_record_batches
            self._batches: list[pa.RecordBatch] | None = None
        except pa.ArrowInvalid:
            self._file = None
            reader = pa.ipc.open_stream(pa.memory_map(path))
            self.schema = reader.schema
            self._batches = list(reader)  # zero-copy views of the mapped file
            self.num_record_batches = len(self._batches)

    def get_batch(self, i: int) -> pa.RecordBatch:
        return self._file.get_batch(i) if self._file is not None else self._batches[i]  # type: ignore[index]


def _open_ipc(path: str) -> _IpcBatches:

    if is_uri(path):
        raise SourceError(f"{path}: Arrow files are read locally (Parquet reads from object storage)")
    return _IpcBatches(path)


def _local_or_uri(path: str) -> Any:

    if not is_uri(path):
        return path
    fs, key = filesystem(path)
    return fs.open_input_file(key)  # type: ignore[attr-defined]


def _text(v: Any) -> str | None:
    return None if v is None else str(v)


def _too_long(label: Any, caption: Any) -> str | None:
    """Why a row's label or caption is not stored (over MAX_METADATA_BYTES, as a tar shard's member
    would be), or None."""
    for what, v in (("label", label), ("caption", caption)):
        if v is not None and len(str(v)) > MAX_METADATA_BYTES:
            return (f"its {what} is {len(str(v)):,} characters, over the {MAX_METADATA_BYTES:,} limit of a "
                    "label or caption: the row is not embedded")
    return None


def _key_id(value: Any, scope: str | None = None) -> str:
    """The id of the row whose key is VALUE: of the key alone (global keys), or of the key in
    SCOPE (its table file and key column)."""
    text = f"key:{value}" if scope is None else "key:" + json.dumps([scope, str(value)])
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _label(value: Any, classes: list[str] | None) -> str | None:
    """A ClassLabel integer as its class name; -1 (``datasets``' "no label") is no label."""
    if classes is not None and isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            return None
        if value < len(classes):
            return classes[value]
    return _text(value)


def iter_rows(path: str, options: SourceOptions = SourceOptions(),
              keys_seen: set[str] | None = None) -> Iterator[Row]:
    """Every row of an image table, in order, with its id, location, label and caption.

    With ``options.id_column`` a row's id comes from its key: of the key in this file, or of the key
    alone with ``options.global_keys``; a key seen before (KEYS_SEEN: the keys of the tables read
    before in the same discovery, for global keys) or no key is a failing row, recorded, never merged."""

    r = _Reader(path)
    names = r.schema.names
    col = image_column(r.schema, options.image_column)
    if col is None:
        raise SourceError(f"{path} has no image column (binary, or a struct with 'bytes'); columns: "
                          f"{', '.join(names)}")
    for given in (options.label_column, options.caption_column, options.id_column):
        if given is not None and given not in names:
            raise SourceError(f"{path} has no column {given!r}; columns: {', '.join(names)}")
    label_col = options.label_column or ("label" if "label" in names else None)
    caption_col = options.caption_column or next((c for c in ("caption", "text", "txt") if c in names), None)
    classes = class_names(r.schema, label_col) if label_col else None
    small = [c for c in dict.fromkeys([options.id_column, label_col, caption_col]) if c]
    seen: set[str] = keys_seen if keys_seen is not None else set()
    scope = None if options.global_keys else f"{path}#{options.id_column}"
    for g in range(r.groups):
        n_group = r.rows(g)  # never the image column: discovery reads only the small ones
        parts: Iterator[Any] = r.small_batches(g, small) if small else iter([None])
        first = 0
        for t in parts:
            n = n_group if t is None else t.num_rows
            keys = t.column(options.id_column).to_pylist() if options.id_column and t is not None else None
            labels = t.column(label_col).to_pylist() if label_col and t is not None else [None] * n
            caps = t.column(caption_col).to_pylist() if caption_col and t is not None else [None] * n
            for j in range(n):
                i = first + j
                locator = location.row(path, col, g, i)
                long = _too_long(labels[j], caps[j])
                if long is not None:
                    yield Row(image_id(failing(path, f"{g}/{i}", "")), failing(path, f"{g}/{i}", long), None, None)
                    continue
                if keys is not None:
                    k = keys[j]
                    if k is None or str(k) in seen:
                        why = "no key" if k is None else f"duplicate key {k}"
                        yield Row(image_id(failing(path, f"{g}/{i}", "")), failing(
                            path, f"{g}/{i}", f"{why} in --id-column {options.id_column}: the row is not embedded"),
                            None, None)
                        continue
                    seen.add(str(k))
                    rid = _key_id(k, scope)
                else:
                    rid = image_id(locator)
                yield Row(rid, locator, _label(labels[j], classes), _text(caps[j]))
            first += n


# ---- reading a row's image back by its location --------------------------------------------------
# Per process, shared by its decode threads: the table files open (one reader per file: an Arrow
# stream is indexed once, not once per record batch), and the last windows of rows read from them.
# A Parquet row group is read forward a window at a time (WINDOW_BYTES of images, through a 1 MiB
# buffer, never the whole group: pyarrow's default row group is 1 Mi rows, so most tables are one
# group); decoding asks for rows in order, so each window is read once and shared by the threads
# that decode its rows. Memory: CACHE_BYTES of windows per process, whatever the group's size, and
# the page being read (a page is read whole: pyarrow writes pages of up to 1,024 rows by default).
WINDOW_BYTES = 2 << 20  # rows read together from a Parquet row group: about this many image bytes
CACHE_BYTES = 8 << 20  # windows kept per process, least recently used out first (at least one)
OPEN_FILES = 8  # table files kept open per process
MAX_CURSORS = 4  # places in Parquet row groups being read forward at once, per process


class _Cursor:
    """One Parquet row group's image column, read forward window by window (``next``: the next
    window's number)."""

    def __init__(self, reader: _Reader, column: str, group: int, window: int) -> None:
        self.lock = threading.Lock()
        self.reader, self.column, self.group, self.window = reader, column, group, window
        self.key = (reader.path, column, group)
        self.next = 0
        self._batches: Iterator[pa.RecordBatch] = reader.pf.iter_batches(
            batch_size=window, row_groups=[group], columns=[column], use_threads=False)
        self._pending: list[pa.Array] = []

    def read(self, k: int, keep: Any) -> pa.Array:
        """Window K (rows ``k*window`` on; not behind ``next``), calling ``keep(number, window)``
        for each window read on the way to it (the decode threads ask for their neighbours next)."""
        while True:
            have = sum(len(a) for a in self._pending)
            while have < self.window:
                with self.reader.lock:  # one read at a time per file (two groups' cursors may share it)
                    batch = next(self._batches, None)
                if batch is None:  # the group's end: its reader's buffers go now
                    self._batches = iter(())
                    break
                arr = batch.column(0)
                self._pending.append(arr)
                have += len(arr)
            if not have:
                raise IndexError(k)
            joined = self._pending[0] if len(self._pending) == 1 else pa.concat_arrays(self._pending)
            win, rest = joined.slice(0, self.window), joined.slice(self.window)
            self._pending = [rest] if len(rest) else []
            win = _image_bytes(win)
            n = self.next
            keep(n, win)  # kept before ``next`` passes it: a window behind ``next`` was kept
            self.next = n + 1
            if n == k:
                return win


def _image_bytes(arr: pa.Array) -> pa.Array:
    return arr.field("bytes") if pa.types.is_struct(arr.type) else arr


class _Cache:
    """The process's open table files, Parquet cursors and windows of rows (see above)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.opening = threading.Lock()
        self.readers: OrderedDict[str, _Reader] = OrderedDict()
        self.cursors: list[_Cursor] = []  # the least recently used first
        self.windows: OrderedDict[tuple[str, str, int, int], pa.Array] = OrderedDict()
        self.window_bytes = 0

    def reader(self, path: str) -> _Reader:
        with self.lock:
            r = self.readers.get(path)
            if r is not None:
                self.readers.move_to_end(path)
                return r
        with self.opening:  # once per file: the decode threads asking at once wait for the one reader
            with self.lock:
                r = self.readers.get(path)
            if r is not None:
                return r
            r = _Reader(path, buffered=True)
            with self.lock:
                self.readers[path] = r
                while len(self.readers) > OPEN_FILES:
                    gone, _ = self.readers.popitem(last=False)
                    self.cursors = [c for c in self.cursors if c.key[0] != gone]
                    for wkey in [w for w in self.windows if w[0] == gone]:
                        self.window_bytes -= self.windows.pop(wkey).get_total_buffer_size()
            return r

    def _window(self, key: tuple[str, str, int, int]) -> pa.Array | None:
        with self.lock:
            w = self.windows.get(key)
            if w is not None:
                self.windows.move_to_end(key)
            return w

    def keep(self, key: tuple[str, str, int, int], w: pa.Array) -> None:
        with self.lock:
            old = self.windows.pop(key, None)
            if old is not None:
                self.window_bytes -= old.get_total_buffer_size()
            self.windows[key] = w
            self.window_bytes += w.get_total_buffer_size()
            while len(self.windows) > 1 and self.window_bytes > CACHE_BYTES:
                _, gone = self.windows.popitem(last=False)
                self.window_bytes -= gone.get_total_buffer_size()

    def cursor(self, r: _Reader, column: str, group: int, k: int) -> _Cursor | None:
        """The cursor of the row group that is furthest along but not past window K, or a new one at
        the group's start (decoders far apart in a group, such as two CPU model lanes decoding a
        batch each, get one each: neither makes the other read the group again from its start);
        None when window K has been kept meanwhile."""
        with self.lock:
            if (r.path, column, group, k) in self.windows:
                return None
            here = [c for c in self.cursors if c.key == (r.path, column, group) and c.next <= k]
            if here:
                c = max(here, key=lambda c: c.next)
            else:
                c = _Cursor(r, column, group, r.window_rows(group, column))
                self.cursors.append(c)
                if len(self.cursors) > MAX_CURSORS:
                    self.cursors.pop(0)
            self.cursors.remove(c)
            self.cursors.append(c)  # the most recently used last
            return c

    def scalar(self, path: str, column: str, group: int, row: int) -> pa.Scalar:
        """Row ROW of row group (record batch) GROUP's image COLUMN (its bytes)."""
        if row < 0:
            raise IndexError(row)
        r = self.reader(path)
        if column not in r.schema.names:
            raise KeyError(column)
        if not 0 <= group < r.groups:
            raise IndexError(group)
        if not r.parquet:  # Arrow: the batch is a view of the mapped file (read once if compressed)
            key = (path, column, group, -1)
            w = self._window(key)
            if w is None:
                with r.lock:
                    w = _image_bytes(r.batch(group).column(column))
                self.keep(key, w)
            return w[row]
        per = r.window_rows(group, column)
        k = row // per
        key = (path, column, group, k)
        w = self._window(key)
        while w is None:
            c = self.cursor(r, column, group, k)
            if c is None:
                w = self._window(key)
                continue
            with c.lock:  # one thread reads on; the others find its windows kept
                w = self._window(key)
                if w is None and c.next <= k:  # (else another thread took it past K meanwhile)
                    w = c.read(k, lambda n, win: self.keep((path, column, group, n), win))
        return w[row - k * per]


_CACHE = _Cache()


def read_row(locator: str, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """The image bytes at ``FILE#COLUMN/GROUP/ROW``; a failing location raises DecodeError."""
    loc = location.parse(locator)  # the file by its suffix: a '#' in a column's name is the column's
    if loc is None or loc.kind == location.MEMBER:
        raise DecodeError(f"{locator} is not a table's row")
    if loc.kind == location.FAILING:
        raise DecodeError(loc.reason or "not embedded")
    path, where = loc.container, loc.member
    try:
        column, group, row = where.rsplit("/", 2)
        value = _CACHE.scalar(path, column, int(group), int(row)).as_py()  # a window of rows read
    except (ValueError, IndexError, KeyError):
        raise DecodeError(f"no row {where} in {os.path.basename(path)}") from None
    except SourceError as e:
        raise DecodeError(str(e)) from None
    if not value:
        raise DecodeError("the row's image is null or empty")
    if len(value) > max_bytes:
        raise DecodeError(too_big(f"row {where}", len(value), max_bytes))
    return bytes(value)


# ---- the user's columns, read back at rows' locations ----------------------------------------------
# ``index build --keep-columns`` and the user's key (``--id-column``) are carried into an index's id map
# from the source tables, read at each stored row's location (``FILE#COLUMN/GROUP/ROW``): extraction
# keeps only id, path, label and caption, so the store's schema (and every reader of it) is unchanged.
def _text_array(a: pa.ChunkedArray | pa.Array) -> pa.Array:
    """A column's values as text (numbers as Arrow writes them; lists and structs as JSON)."""
    import pyarrow.compute as pc

    if isinstance(a, pa.ChunkedArray):
        a = a.combine_chunks() if a.num_chunks else pa.array([], a.type)
    try:
        return pc.cast(a, pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return pa.array([None if v is None else json.dumps(v, default=str, ensure_ascii=False)
                         for v in a.to_pylist()], pa.string())


class ColumnReader:
    """The values of the source tables' COLUMNS at stored rows' locations, as text (``read``: one batch
    of paths at a time). One table file open and one row group's asked columns held at a time (rows
    come back in the order they were discovered: each group is read once), never the table. A path
    that is not a table's row (a file, a tar member), or a table without the column, gives null.
    ``found``: the columns some table had. A table that cannot be read raises ``SourceError``."""

    def __init__(self, columns: dict[str, str]) -> None:
        self.columns = dict(columns)  # name in the result → the source table's column
        self.found: set[str] = set()
        self._file: str | None = None
        self._reader: _Reader | None = None
        self._group = -1
        self._values: dict[str, pa.Array] = {}

    def _at(self, path: str, group: int) -> dict[str, pa.Array]:
        if path != self._file:
            self._reader, self._file, self._group = _Reader(path), path, -1
        r = self._reader
        assert r is not None
        if group != self._group:
            self._values, self._group = {}, group
            present = [s for s in dict.fromkeys(self.columns.values()) if s in r.schema.names]
            for s in present:
                if _is_image_type(r.schema.field(s).type):
                    raise SourceError(f"{path}: column {s!r} holds image bytes; it is not kept in an index")
            if 0 <= group < r.groups and present:
                try:
                    t = r.group(group, present)
                except (OSError, pa.ArrowInvalid) as e:
                    raise SourceError(f"cannot read {path}: {str(e).splitlines()[0][:200]}") from None
                self._values = {s: _text_array(t.column(s)) for s in present}
                self.found.update(n for n, s in self.columns.items() if s in present)
        return self._values

    def read(self, paths: list[str | None]) -> dict[str, pa.Array]:
        """For each name of ``columns``, the values at PATHS (null where there is none)."""
        runs: list[tuple[str | None, int, list[int | None]]] = []  # (file, group, rows) of consecutive paths
        prefix, container = "\0", ""  # the last table's "FILE#": the next rows mostly share it (not parsed again)
        for p in paths:
            where: tuple[str | None, int, int | None] = (None, -1, None)
            member = None
            if p and p.startswith(prefix) and p[len(prefix):len(prefix) + 1] not in (location.FAILED, location.ESCAPE):
                member = p[len(prefix):]
            else:
                loc = location.parse(p) if p else None
                if p and loc is not None and loc.kind == location.ROW:
                    member, container = loc.member, loc.container
                    prefix = p[:len(p) - len(member)] if p.endswith(member) else "\0"
            if member is not None:
                try:
                    _, g, r = member.rsplit("/", 2)
                    where = (container, int(g), int(r))
                except ValueError:
                    pass
            if runs and runs[-1][:2] == where[:2]:
                runs[-1][2].append(where[2])
            else:
                runs.append((where[0], where[1], [where[2]]))
        pieces: dict[str, list[pa.Array]] = {n: [] for n in self.columns}
        for file, group, rows in runs:
            values = self._at(file, group) if file is not None else {}
            for n, s in self.columns.items():
                v = values.get(s)
                if v is None:
                    pieces[n].append(pa.nulls(len(rows), pa.string()))
                    continue
                idx = pa.array([r if r is not None and 0 <= r < len(v) else None for r in rows], pa.int64())
                pieces[n].append(v.take(idx))
        return {n: pa.concat_arrays(ps) if ps else pa.array([], pa.string()) for n, ps in pieces.items()}

"""Parquet, Arrow and Feather files whose rows hold image bytes, as a source: Hugging Face
datasets (an ``image`` column that is a struct of ``bytes`` and ``path``; ``ClassLabel`` integers
named in the schema's metadata), img2dataset's Parquet output, any table with a binary column.

Told apart from a Parquet *list of paths* by the schema: a table is read as images when it has an
image column (``--image-column``, default the first binary or ``{bytes, path}`` struct column).
Each row is located as ``FILE#COLUMN/GROUP/ROW`` (row group for Parquet, record batch for Arrow): its
id is a hash of that location, or of ``--id-column``'s value when one is given (stable however the
rows are regrouped). Discovery reads only the small columns (id, label, caption); decoding reads a
row group's image column once per process and takes rows from it, so memory holds one row group of
images at most, whatever the table's size. A null or empty image, or a repeated key, is a failing
location that decoding records with its reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from embedder.errors import DecodeError, SourceError
from embedder.io.options import SourceOptions
from embedder.io.uri import failing, filesystem, image_id, is_uri

TABLE_SUFFIXES = (".parquet", ".arrow", ".feather", ".ipc")


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
    """Row groups (Parquet) or record batches (Arrow IPC file or stream) of one table file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.parquet = path.lower().endswith(".parquet")
        try:
            if self.parquet:
                self.pf = pq.ParquetFile(_local_or_uri(path))
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


def _key_id(value: Any) -> str:
    return hashlib.blake2b(f"key:{value}".encode(), digest_size=16).hexdigest()


def iter_rows(path: str, options: SourceOptions = SourceOptions()) -> Iterator[Row]:
    """Every row of an image table, in order, with its id, location, label and caption."""

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
    seen: set[str] = set()
    for g in range(r.groups):
        t = r.group(g, small) if small else None
        n = r.rows(g)  # never the image column: discovery reads only the small ones
        keys = t.column(options.id_column).to_pylist() if options.id_column and t is not None else None
        labels = t.column(label_col).to_pylist() if label_col and t is not None else [None] * n
        caps = t.column(caption_col).to_pylist() if caption_col and t is not None else [None] * n
        for i in range(n):
            locator = f"{path}#{col}/{g}/{i}"
            if keys is not None:
                k = keys[i]
                if k is None or str(k) in seen:
                    why = "no key" if k is None else f"duplicate key {k}"
                    yield Row(image_id(failing(path, f"{g}/{i}", "")), failing(
                        path, f"{g}/{i}", f"{why} in --id-column {options.id_column}: the row is not embedded"),
                        None, None)
                    continue
                seen.add(str(k))
                rid = _key_id(k)
            else:
                rid = image_id(locator)
            lab = labels[i]
            if classes is not None and isinstance(lab, int) and 0 <= lab < len(classes):
                lab = classes[lab]
            yield Row(rid, locator, _text(lab), _text(caps[i]))


# ---- reading a row's image back by its location --------------------------------------------------
_CACHE: dict[int, tuple[tuple[str, str, int], pa.Array]] = {}  # per thread: the last row group read
_LOCK = threading.Lock()


def _group_images(path: str, column: str, group: int) -> pa.Array:
    key = (path, column, group)
    tid = threading.get_ident()
    with _LOCK:
        hit = _CACHE.get(tid)
    if hit is not None and hit[0] == key:
        return hit[1]
    arr = _Reader(path).group(group, [column]).column(column).combine_chunks()
    if pa.types.is_struct(arr.type):
        arr = arr.field("bytes")
    with _LOCK:
        _CACHE[tid] = (key, arr)
    return arr


def read_row(locator: str) -> bytes:
    """The image bytes at ``FILE#COLUMN/GROUP/ROW``; a failing location raises DecodeError."""
    from embedder.io import location

    loc = location.parse(locator)  # the file by its suffix: a '#' in a column's name is the column's
    if loc is None or loc.kind == location.MEMBER:
        raise DecodeError(f"{locator} is not a table's row")
    if loc.kind == location.FAILING:
        raise DecodeError(loc.reason or "not embedded")
    path, where = loc.container, loc.member
    try:
        column, group, row = where.rsplit("/", 2)
        arr = _group_images(path, column, int(group))
        value = arr[int(row)].as_py()
    except (ValueError, IndexError, KeyError):
        raise DecodeError(f"no row {where} in {os.path.basename(path)}") from None
    except SourceError as e:
        raise DecodeError(str(e)) from None
    if not value:
        raise DecodeError("the row's image is null or empty")
    return bytes(value)

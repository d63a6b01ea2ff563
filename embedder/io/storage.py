"""Where a store's files live: a local directory, or a prefix in object storage (``s3://bucket/prefix``,
through ``pyarrow.fs``; credentials and endpoint from the usual environment). A location is a plain
string — an absolute local path or a URI — so that it travels to remote workers as is.

What each write guarantees, on each:
- local: written to a temporary name, flushed to disk and renamed (a reader sees the old file or
  the whole new one; a killed writer leaves a ``.*.tmp`` the next writer removes);
- object storage: one PUT (an object appears whole when its upload completes, never in part); a
  move is a server-side copy, then a delete of the source — the copy is atomic, and a move killed
  between the two leaves only the source behind, which the store's next writer sweeps.
"""

from __future__ import annotations

import contextlib
import io
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedder.errors import SourceError, StoreError
from embedder.io.uri import filesystem, is_uri

if TYPE_CHECKING:
    import pyarrow.dataset as ds


def resolve(where: str | os.PathLike[str]) -> str:
    """A location as the store keeps it: a URI without its trailing '/', or an absolute path."""
    s = str(where)
    return s.rstrip("/") if is_uri(s) else os.path.abspath(s)


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts]) if is_uri(base) else os.path.join(base, *parts)


def name(loc: str) -> str:
    return loc.rstrip("/").rsplit("/", 1)[-1]


def stem(loc: str) -> str:
    n = name(loc)
    return n.rsplit(".", 1)[0] if "." in n.lstrip(".") else n


def parent(loc: str) -> str:
    return loc.rstrip("/").rsplit("/", 1)[0]


def _fs(loc: str) -> tuple[Any, str]:
    try:
        return filesystem(loc)
    except SourceError as e:
        raise StoreError(str(e)) from None


def _failed(what: str, loc: str, e: BaseException) -> StoreError:
    text = str(e).strip()
    if "NO_SUCH_BUCKET" in text or "bucket does not exist" in text.lower():
        bucket = loc.partition("://")[2].split("/", 1)[0]
        return StoreError(f"cannot {what} {loc}: bucket {bucket!r} does not exist (embedder does not create "
                          "buckets: create it first)")
    first = text.splitlines()[0][:200] if text else type(e).__name__
    return StoreError(f"cannot {what} {loc}: {first}")


def exists(loc: str) -> bool:
    """Whether LOC is a file (an object)."""
    if not is_uri(loc):
        return os.path.isfile(loc)
    import pyarrow.fs as pafs

    fs, key = _fs(loc)
    try:
        return bool(fs.get_file_info(key).type == pafs.FileType.File)
    except OSError as e:
        raise _failed("reach", loc, e) from None


def list_names(folder: str, folders: bool = False) -> list[str]:
    """The names of the files (with FOLDERS, and of the folders) directly in FOLDER, sorted ([] when
    it does not exist)."""
    if not is_uri(folder):
        try:
            return sorted(e.name for e in os.scandir(folder) if e.is_file() or (folders and e.is_dir()))
        except (FileNotFoundError, NotADirectoryError):
            return []
    import pyarrow.fs as pafs

    fs, key = _fs(folder)
    try:
        infos = fs.get_file_info(pafs.FileSelector(key, allow_not_found=True))
    except OSError as e:
        raise _failed("list", folder, e) from None
    kinds = (pafs.FileType.File, pafs.FileType.Directory) if folders else (pafs.FileType.File,)
    return sorted(i.base_name for i in infos if i.type in kinds)


def read_bytes(loc: str) -> bytes:
    if not is_uri(loc):
        with open(loc, "rb") as f:
            return f.read()
    fs, key = _fs(loc)
    try:
        with fs.open_input_stream(key) as f:
            return bytes(f.read())
    except FileNotFoundError:
        raise
    except OSError as e:
        raise _failed("read", loc, e) from None


def write_bytes(loc: str, data: bytes) -> None:
    """Write LOC whole or not at all (see the module's docstring)."""
    if not is_uri(loc):
        tmp = os.path.join(os.path.dirname(loc), f".{name(loc)}.{uuid.uuid4().hex[:8]}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, loc)
        return
    fs, key = _fs(loc)
    try:
        with fs.open_output_stream(key) as f:
            f.write(data)
    except OSError as e:
        raise _failed("write", loc, e) from None


def write_parquet(loc: str, table: pa.Table) -> None:
    """Write TABLE as one Parquet file at LOC, whole or not at all. Locally through a temporary file
    of a fresh name created exclusively beside LOC (a fixed name let a link planted there redirect the
    write, and two writers share it), then renamed over LOC."""
    if not is_uri(loc):
        import tempfile

        fd, tmp = tempfile.mkstemp(prefix=f".{name(loc)}.", suffix=".tmp", dir=os.path.dirname(loc) or ".")
        try:
            with os.fdopen(fd, "wb") as f:
                pq.write_table(table, f, compression="zstd")
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, loc)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return
    fs, key = _fs(loc)
    try:
        pq.write_table(table, key, filesystem=fs, compression="zstd")
    except OSError as e:
        raise _failed("write", loc, e) from None


def delete(loc: str) -> None:
    """Remove the file LOC if it exists."""
    if not is_uri(loc):
        Path(loc).unlink(missing_ok=True)
        return
    fs, key = _fs(loc)
    try:
        fs.delete_file(key)
    except FileNotFoundError:
        pass
    except OSError as e:
        if "does not exist" not in str(e).lower() and "not found" not in str(e).lower():
            raise _failed("delete", loc, e) from None


def move(src: str, dst: str) -> None:
    """SRC becomes DST (locally one atomic rename; in object storage a copy, then a delete)."""
    if not is_uri(src):
        os.replace(src, dst)
        return
    fs, skey = _fs(src)
    _, dkey = _fs(dst)
    try:
        fs.copy_file(skey, dkey)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise _failed("copy", src, e) from None
    delete(src)


def makedirs(folder: str) -> None:
    """Locally, create FOLDER; in object storage folders are key prefixes and need nothing."""
    if not is_uri(folder):
        os.makedirs(folder, exist_ok=True)


def open_parquet(loc: str, metadata: Any = None, buffered: bool = False) -> pq.ParquetFile:
    """A Parquet file, local or in object storage, opened for reading (footer first, then ranges);
    METADATA: its footer, read before (a file read again and again skips parsing it each time);
    BUFFERED: column chunks read through 1 MiB buffers, page by page, not whole."""
    kw: dict[str, Any] = {"metadata": metadata}
    if buffered:
        kw.update(buffer_size=1 << 20, pre_buffer=False)
    if not is_uri(loc):
        return pq.ParquetFile(loc, **kw)
    fs, key = _fs(loc)
    try:
        return pq.ParquetFile(fs.open_input_file(key), **kw)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise _failed("read", loc, e) from None


def load_npy(loc: str) -> np.ndarray:
    """A ``.npy`` file: memory-mapped when local, read whole from object storage."""
    if not is_uri(loc):
        return np.load(loc, mmap_mode="r")
    return np.load(io.BytesIO(read_bytes(loc)))


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def dataset(locs: list[str], schema: pa.Schema) -> ds.Dataset:
    """A pyarrow dataset over Parquet files that all live in one place (one disk or one bucket)."""
    import pyarrow.dataset as ds

    if not locs or not is_uri(locs[0]):
        return ds.dataset(locs, format="parquet", schema=schema)
    fs, _ = _fs(locs[0])
    return ds.dataset([_fs(loc)[1] for loc in locs], format="parquet", schema=schema, filesystem=fs)

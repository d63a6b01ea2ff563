"""The embedding store: a directory of Parquet shards that any Parquet reader sees as one table.

Layout (files starting with '_' or '.' are ignored by pyarrow/pandas datasets, and DuckDB's and
Polars' ``STORE/*.parquet`` globs never reach the subfolder):

    STORE/part-<n>-<uuid>.parquet   rows: id, path, label, embedding, width, height, file_hash
    STORE/_errors/part-*.parquet    images that failed: id, path, reason, time
    STORE/_manifest.json            provenance, shard list, run history

Shards are written to a temporary name and renamed, so a killed run leaves only whole shards.
The directory, not the manifest, is the truth about which rows exist; the manifest is rewritten
after every shard and reconciled on open.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from embedder.errors import ProvenanceMismatch, StoreError

FORMAT = "embedder-store/1"
MANIFEST = "_manifest.json"
ERRORS_DIR = "_errors"
META_KEY = b"embedder"

# Provenance fields that define what a vector means; a store never mixes two values of these.
IDENTITY_FIELDS = ("backbone", "weights", "layer", "pool", "preprocessing", "decode", "normalize",
                   "dtype", "dim")

ERRORS_SCHEMA = pa.schema([("id", pa.string()), ("path", pa.string()), ("reason", pa.string()),
                           ("time", pa.timestamp("s", tz="UTC"))])


def embedding_type(dim: int, dtype: str) -> pa.DataType:
    # "element" is what Parquet's compliant nested layout calls it; readers see the same type back.
    value = pa.float16() if dtype == "float16" else pa.float32()
    return pa.list_(pa.field("element", value), dim)


def row_schema(dim: int, dtype: str) -> pa.Schema:
    return pa.schema([
        ("id", pa.string()),
        ("path", pa.string()),
        ("label", pa.string()),
        ("embedding", embedding_type(dim, dtype)),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("file_hash", pa.string()),
    ])


def embeddings_to_arrow(vectors: np.ndarray, dtype: str) -> pa.FixedSizeListArray:
    np_dtype = np.float16 if dtype == "float16" else np.float32
    flat = np.ascontiguousarray(vectors, dtype=np_dtype).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat), type=embedding_type(vectors.shape[1], dtype))


def arrow_to_embeddings(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """FixedSizeList column → float32 [N, dim] without a Python loop."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    dim = column.type.list_size
    flat = column.flatten().to_numpy(zero_copy_only=False)
    return np.array(flat.reshape(-1, dim), dtype=np.float32)  # writable, float32


def identity(provenance: dict[str, Any]) -> dict[str, Any]:
    return {k: provenance.get(k) for k in IDENTITY_FIELDS}


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_table(path: Path, table: pa.Table) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class StoreInfo:
    path: str
    provenance: dict[str, Any]
    rows: int
    dim: int
    labels: dict[str, int]
    errors: int
    shards: int
    runs: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


class Store:
    """Read and append access to one store directory."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    # ---- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Store:
        store = cls(path)
        if not (store.path / MANIFEST).is_file():
            if store.path.is_dir() and any(store.path.glob("part-*.parquet")):
                raise StoreError(f"{path}: shards present but {MANIFEST} is missing")
            raise StoreError(f"{path} is not an embedding store (no {MANIFEST}); create one with "
                             "`embedder extract SOURCE --out STORE`")
        return store

    @classmethod
    def create_or_append(cls, path: str | os.PathLike[str], provenance: dict[str, Any]) -> Store:
        """Open for appending, refusing vectors that would mean something different."""
        store = cls(path)
        if (store.path / MANIFEST).is_file():
            existing = store.provenance
            mine, theirs = identity(provenance), identity(existing)
            diffs = [k for k in IDENTITY_FIELDS if mine[k] != theirs[k]]
            if diffs:
                k = diffs[0]
                raise ProvenanceMismatch(
                    f"{path} holds vectors made with {k}={_short(theirs[k])}, this run would use "
                    f"{k}={_short(mine[k])}; write to a new --out STORE instead"
                )
            return store
        try:
            store.path.mkdir(parents=True, exist_ok=True)
            if any(p for p in store.path.iterdir() if not p.name.startswith(".")):
                raise StoreError(f"{path} exists, is not empty and is not an embedding store")
            probe = store.path / f".write-test-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except PermissionError:
            raise StoreError(f"cannot write to {path}: permission denied") from None
        except OSError as e:
            raise StoreError(f"cannot create store {path}: {e.strerror or e}") from None
        manifest = {"format": FORMAT, "provenance": provenance, "shards": [], "runs": []}
        _atomic_write_bytes(store.path / MANIFEST, json.dumps(manifest, indent=2).encode())
        return store

    # ---- metadata -------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / MANIFEST).read_text())  # type: ignore[no-any-return]
        except (OSError, json.JSONDecodeError) as e:
            raise StoreError(f"{self.path}/{MANIFEST} is unreadable: {e}") from None

    @property
    def provenance(self) -> dict[str, Any]:
        return self.manifest()["provenance"]  # type: ignore[no-any-return]

    @property
    def dim(self) -> int:
        return int(self.provenance["dim"])

    def shard_files(self) -> list[Path]:
        return sorted(self.path.glob("part-*.parquet"))

    def error_files(self) -> list[Path]:
        return sorted((self.path / ERRORS_DIR).glob("part-*.parquet"))

    # ---- reading --------------------------------------------------------------------------
    def dataset(self) -> ds.Dataset:
        return ds.dataset([str(p) for p in self.shard_files()], format="parquet",
                          schema=row_schema(self.dim, self.provenance["dtype"]))

    def read(self, columns: list[str] | None = None, filter: Any = None) -> pa.Table:
        if not self.shard_files():
            return row_schema(self.dim, self.provenance["dtype"]).empty_table().select(
                columns or row_schema(self.dim, self.provenance["dtype"]).names)
        try:
            return self.dataset().to_table(columns=columns, filter=filter)
        except (pa.ArrowInvalid, OSError) as e:
            raise StoreError(f"{self.path}: cannot read shards ({str(e).splitlines()[0]}); a shard "
                             "damaged outside embedder can be moved away and the extraction rerun") from None

    def ids(self) -> set[str]:
        return set(self.read(["id"]).column("id").to_pylist())

    def errors(self) -> pa.Table:
        files = self.error_files()
        if not files:
            return ERRORS_SCHEMA.empty_table()
        return ds.dataset([str(p) for p in files], format="parquet", schema=ERRORS_SCHEMA).to_table()

    def failed_ids(self) -> set[str]:
        return set(self.errors().column("id").to_pylist())

    def count(self) -> int:
        return sum(pq.ParquetFile(p).metadata.num_rows for p in self.shard_files())

    def info(self) -> StoreInfo:
        labels = self.read(["label"]).column("label").to_pylist()
        counts = Counter("(none)" if lab is None else lab for lab in labels)
        errors = self.errors()
        # An image that failed once and succeeded on a retry is no longer an error.
        ok = self.ids() if errors.num_rows else set()
        n_err = len({i for i in errors.column("id").to_pylist() if i not in ok})
        m = self.manifest()
        return StoreInfo(str(self.path), m["provenance"], len(labels), self.dim,
                         dict(sorted(counts.items())), n_err, len(self.shard_files()), m["runs"])

    # ---- writing --------------------------------------------------------------------------
    @contextmanager
    def writer_lock(self) -> Iterator[None]:
        """One writer at a time: two extractions into one store would embed images twice."""
        import fcntl

        f = open(self.path / ".lock", "a+")  # noqa: SIM115 - held for the duration of the block
        try:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreError(f"{self.path} is being written by another embedder process; "
                                 "wait for it to finish (it resumes where it stops)") from None
            yield
        finally:
            f.close()

    def write_shard(self, table: pa.Table) -> Path:
        meta = {META_KEY: json.dumps(self.provenance).encode()}
        table = table.replace_schema_metadata(meta)
        n = len(self.shard_files())
        path = self.path / f"part-{n:05d}-{uuid.uuid4().hex[:8]}.parquet"
        _atomic_write_table(path, table)
        return path

    def write_errors(self, table: pa.Table) -> None:
        d = self.path / ERRORS_DIR
        d.mkdir(exist_ok=True)
        _atomic_write_table(d / f"part-{int(time.time() * 1e6)}-{uuid.uuid4().hex[:8]}.parquet",
                            table.cast(ERRORS_SCHEMA))

    def update_manifest(self, run: dict[str, Any] | None = None) -> None:
        m = self.manifest()
        m["shards"] = [{"file": p.name, "rows": pq.ParquetFile(p).metadata.num_rows}
                       for p in self.shard_files()]
        if run is not None:
            runs = [r for r in m["runs"] if r.get("run_id") != run.get("run_id")]
            m["runs"] = [*runs, run]
        _atomic_write_bytes(self.path / MANIFEST, json.dumps(m, indent=2).encode())


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."

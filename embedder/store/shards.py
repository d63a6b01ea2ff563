"""The embedding store: a directory (or an object-storage prefix, ``s3://bucket/prefix``) of Parquet
shards that any Parquet reader sees as one table.

Layout (files starting with '_' or '.' are ignored by pyarrow/pandas datasets, and DuckDB's and
Polars' ``STORE/*.parquet`` globs never reach the subfolder):

    STORE/part-<n>-<uuid>.parquet   rows: id, path, label, embedding, width, height, file_hash
    STORE/_errors/part-*.parquet    images that failed: id, path, reason, time
    STORE/_ids/part-<n>-<uuid>.npy  per shard, the sorted digests of its ids (see embedder.store.id_index)
    STORE/_manifest.json            provenance, shard list, run history, tables' id scheme
    STORE/.staging/                 shards written by remote workers, not yet committed
    STORE/.lock | STORE/.writer.lock  the writer's lock file (on disk) or lease (object storage)

Every file is written whole or not at all (see embedder.io.storage), so a killed run leaves only
whole shards. The directory, not the manifest, is the truth about which rows exist; the manifest
is rewritten after every shard and reconciled on open. One writer at a time: a lock file on disk,
a renewed lease object in object storage (embedder.io.locks).
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from embedder.errors import StoreError
from embedder.io import storage
from embedder.io.uri import is_uri
from embedder.store.provenance import Provenance

if TYPE_CHECKING:
    import pyarrow.dataset as ds

FORMAT = "embedder-store/1"
MANIFEST = "_manifest.json"
ERRORS_DIR = "_errors"
STAGING_DIR = ".staging"  # shards written by remote workers, part of the store only once committed
META_KEY = b"embedder"
MANIFEST_EVERY_S = 10.0  # a long run rewrites the manifest at most this often (and when it closes)

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
        ("caption", pa.string()),  # a sample's caption (tar .txt, a table's caption column); null elsewhere
    ])


def _with_columns(f: Any, columns: list[str]) -> pa.Table:
    """COLUMNS of one shard; a column added to the schema after the shard was written (``caption``)
    reads as nulls."""
    have = set(f.schema_arrow.names)
    t = f.read(columns=[c for c in columns if c in have])
    for c in columns:
        if c not in have:
            t = t.append_column(c, pa.nulls(t.num_rows, pa.string()))
    return t.select(columns)


def embeddings_to_arrow(vectors: np.ndarray, dtype: str) -> pa.FixedSizeListArray:
    """[N, dim] → a FixedSizeList column whose values live in Arrow's own memory pool.

    Always a copy into Arrow's pool: ``pa.array(numpy)`` is zero-copy, and the column would keep
    alive whatever owns the numpy memory (for extraction, the model's output tensor)."""
    np_dtype = np.float16 if dtype == "float16" else np.float32
    n, dim = vectors.shape
    buf = pa.allocate_buffer(n * dim * np.dtype(np_dtype).itemsize)
    np.frombuffer(buf, dtype=np_dtype).reshape(n, dim)[...] = vectors
    values = pa.Array.from_buffers(pa.float16() if dtype == "float16" else pa.float32(), n * dim, [None, buf])
    return pa.FixedSizeListArray.from_arrays(values, type=embedding_type(dim, dtype))


class ShardBuffer:
    """Rows waiting for the next shard, in one preallocated block.

    Measured: keeping each batch's small Arrow table until the shard is written pinned a few tens
    of KiB per batch between the forward pass's large transient allocations, and RSS grew by
    ~0.5-1 MB per image (4.3 GB at 3,200 images) until the shard was flushed. Copying every batch
    into this fixed block and building the table only at flush time keeps RSS flat."""

    def __init__(self, dim: int, dtype: str, capacity: int) -> None:
        self.dim, self.dtype, self.capacity = dim, dtype, capacity
        self.vectors = np.empty((capacity, dim), dtype=np.float16 if dtype == "float16" else np.float32)
        self.columns: dict[str, list[Any]] = {c: [] for c in ("id", "path", "label", "width", "height",
                                                              "file_hash", "caption")}
        self.rows = 0

    @property
    def full(self) -> bool:
        return self.rows >= self.capacity

    def append(self, table: pa.Table) -> pa.Table:
        """Take as many rows of TABLE as fit; return the rest (empty when all fitted)."""
        take = min(table.num_rows, self.capacity - self.rows)
        head = table.slice(0, take)
        if take:
            self.vectors[self.rows:self.rows + take] = arrow_to_embeddings(head.column("embedding"))
            for c, values in self.columns.items():
                values.extend(head.column(c).to_pylist())
            self.rows += take
        return table.slice(take)

    def take(self) -> pa.Table:
        """The buffered rows as a table (row_schema); the buffer is empty afterwards."""
        schema = row_schema(self.dim, self.dtype)
        c = self.columns
        table = pa.Table.from_arrays([
            pa.array(c["id"], pa.string()), pa.array(c["path"], pa.string()),
            pa.array(c["label"], pa.string()), embeddings_to_arrow(self.vectors[:self.rows], self.dtype),
            pa.array(c["width"], pa.int32()), pa.array(c["height"], pa.int32()),
            pa.array(c["file_hash"], pa.string()), pa.array(c["caption"], pa.string())], schema=schema)
        for values in c.values():
            values.clear()
        self.rows = 0
        return table


def arrow_to_embeddings(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """FixedSizeList column → float32 [N, dim] without a Python loop."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    dim = column.type.list_size
    flat = column.flatten().to_numpy(zero_copy_only=False)
    return np.array(flat.reshape(-1, dim), dtype=np.float32)  # writable, float32


@dataclass
class StoreInfo:
    path: str
    provenance: Provenance
    rows: int
    dim: int
    labels: dict[str, int]
    errors: int
    shards: int
    runs: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "provenance": self.provenance.to_dict()}


class Store:
    """Read and append access to one store (a local directory or an object-storage prefix)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.root = storage.resolve(path)  # an absolute path or a URI: what workers are given
        self.remote = is_uri(self.root)
        self._shard_count: int | None = None  # kept by the writer: numbering without a listing
        self._manifest_lock = threading.Lock()  # a writer thread and the closing writer both save
        self._unsaved: list[tuple[str, int]] = []  # shards (name, rows) not yet in the manifest
        self._unsaved_run: dict[str, Any] | None = None
        self._saved_at = -MANIFEST_EVERY_S

    def __len__(self) -> int:
        return self.count()

    def table(self, columns: list[str] | None = None) -> pa.Table:
        """The store's rows as one Arrow table (``columns``: a subset, e.g. ``["id", "label"]``)."""
        return self.read(columns)

    def vectors(self) -> np.ndarray:
        """Every embedding as float32 ``(len(store), dim)``, in ``table()``'s row order."""
        return arrow_to_embeddings(self.read(["embedding"]).column("embedding"))

    def iter_embeddings(self, batch_rows: int = 8192, footers: dict[str, Any] | None = None) -> Iterator[np.ndarray]:
        """Every embedding, in ``table()``'s row order, as float32 ``[≤ batch_rows, dim]`` blocks read
        record batch by record batch (one batch in memory at a time). FOOTERS: a caller's snapshot of
        the shards (``{location: None}`` at first) read again and again: the same shards every
        pass, each footer parsed once."""
        try:
            for loc in self.shard_files() if footers is None else list(footers):
                # buffered, not pre-buffered: a row group's pages are decoded as its batches are
                # read (measured: half the transient of the default on one 80,000-row group)
                f = storage.open_parquet(loc, None if footers is None else footers.get(loc), buffered=True)
                if footers is not None:
                    footers[loc] = f.metadata
                for batch in f.iter_batches(batch_size=batch_rows, columns=["embedding"]):
                    yield arrow_to_embeddings(batch.column(0))
        except (pa.ArrowInvalid, OSError) as e:
            raise StoreError(f"{self.root}: cannot read shards ({str(e).splitlines()[0]}); a shard "
                             "damaged outside embedder can be moved away and the extraction rerun") from None

    def read_embeddings(self, keep: np.ndarray | None = None, batch_rows: int = 8192) -> np.ndarray:
        """The embeddings of the rows where KEEP (bool, table order) is True, as one float32 matrix
        filled batch by batch: one float32 copy plus one batch, never the Arrow table beside it."""
        n = self.count() if keep is None else int(keep.sum())
        out = np.empty((n, self.dim), np.float32)
        at = row = 0
        for block in self.iter_embeddings(batch_rows):
            if keep is not None:
                sel = keep[row:row + len(block)]
                row += len(block)
                block = block[sel]
            if at + len(block) > n:
                raise StoreError(f"{self.root}: its shards changed while being read; rerun")
            out[at:at + len(block)] = block
            at += len(block)
        if at != n:
            raise StoreError(f"{self.root}: its shards changed while being read; rerun")
        return out

    def __str__(self) -> str:
        return self.root

    def _at(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    # ---- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Store:
        store = cls(path)
        if not storage.exists(store._at(MANIFEST)):
            if store.shard_files():
                raise StoreError(f"{path}: shards present but {MANIFEST} is missing")
            raise StoreError(f"{path} is not an embedding store (no {MANIFEST}); create one with "
                             "`embedder extract SOURCE --out STORE`")
        return store

    @classmethod
    @contextmanager
    def writer(cls, path: str | os.PathLike[str], provenance: Provenance) -> Iterator[Store]:
        """Open for appending (created on first use) as the only writer.

        The lock is taken before anything is checked or written, so two first-time writers cannot
        both create the store, and vectors that would mean something different are refused under
        it. Temporaries left by a killed writer are removed once the lock is held."""
        store = cls(path)
        try:
            storage.makedirs(store.root)
        except PermissionError:
            raise StoreError(f"cannot write to {path}: permission denied") from None
        except OSError as e:
            raise StoreError(f"cannot create store {path}: {e.strerror or e}") from None
        if not storage.exists(store._at(MANIFEST)) and any(
                not n.startswith(".") for n in storage.list_names(store.root, folders=True)):
            raise StoreError(f"{path} exists, is not empty and is not an embedding store")
        with store.writer_lock():
            names = storage.list_names(store.root)  # one listing (a LIST per 1,000 keys in object storage)
            shards = store._shards_among(names)
            store._remove_stale_temporaries(names, shards)
            if storage.exists(store._at(MANIFEST)):
                store.provenance.require(provenance, store=True, what=f"{path} holds vectors",
                                         fix="write to a new --out STORE instead")
                store._reconcile_shards(shards)
            else:
                manifest = {"format": FORMAT, "provenance": provenance.to_dict(), "shards": [], "runs": []}
                storage.write_bytes(store._at(MANIFEST), json.dumps(manifest, indent=2).encode())
            store._shard_count = len(shards)
            try:
                yield store
            finally:
                store._shard_count = None
                store._save_manifest()

    def _reconcile_shards(self, shards: list[str]) -> None:
        """Under the lock, once per writer: the manifest's shard list matches the files SHARDS (a
        writer killed between a shard and its manifest update left it behind). Footers are read only
        for files the list lacks."""
        m = self.manifest()
        on_disk = {storage.name(p): p for p in shards}
        listed = [s for s in m["shards"] if s["file"] in on_disk]
        missing = sorted(set(on_disk) - {s["file"] for s in listed})
        if missing or len(listed) != len(m["shards"]):
            m["shards"] = listed + [{"file": n, "rows": storage.open_parquet(on_disk[n]).metadata.num_rows}
                                    for n in missing]
            storage.write_bytes(self._at(MANIFEST), json.dumps(m, indent=2).encode())

    def _remove_stale_temporaries(self, names: list[str], shards: list[str]) -> None:
        """Under the lock: temporaries of a killed writer (NAMES: the store's top level), shards
        staged by workers of a run that ended before committing them, index files whose shard
        (of SHARDS) is gone."""
        errors = self._at(ERRORS_DIR)
        for d, listed in ((self.root, names), (errors, storage.list_names(errors))):
            for n in listed:
                if n.startswith(".") and n.endswith(".tmp"):
                    storage.delete(storage.join(d, n))
        staging = self._at(STAGING_DIR)
        for orphan in storage.list_names(staging):
            storage.delete(storage.join(staging, orphan))
        from embedder.store import id_index

        id_index.sweep(self.root, {storage.stem(p) for p in shards})

    # ---- metadata -------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        try:
            return json.loads(storage.read_bytes(self._at(MANIFEST)))  # type: ignore[no-any-return]
        except (OSError, json.JSONDecodeError) as e:
            raise StoreError(f"{self._at(MANIFEST)} is unreadable: {e}") from None

    @property
    def provenance(self) -> Provenance:
        return Provenance.from_dict(self.manifest()["provenance"])

    @property
    def dim(self) -> int:
        return self.provenance.dim

    @property
    def dtype(self) -> str:
        return self.provenance.dtype

    def shard_files(self) -> list[str]:
        """The shards' locations (absolute paths, or URIs), in the order they joined the store."""
        return self._shards_among(storage.list_names(self.root))

    def _shards_among(self, names: list[str]) -> list[str]:
        return [self._at(n) for n in names if n.startswith("part-") and n.endswith(".parquet")]

    def error_files(self) -> list[str]:
        return [storage.join(self._at(ERRORS_DIR), n) for n in storage.list_names(self._at(ERRORS_DIR))
                if n.startswith("part-") and n.endswith(".parquet")]

    # ---- reading --------------------------------------------------------------------------
    def dataset(self) -> ds.Dataset:
        return storage.dataset(self.shard_files(), row_schema(self.dim, self.dtype))

    def read(self, columns: list[str] | None = None, filter: Any = None) -> pa.Table:
        if filter is None and columns is not None and "embedding" not in columns:
            return self._read_plain(columns)  # no pyarrow.dataset import: `embedder info` starts fast
        if not self.shard_files():
            return row_schema(self.dim, self.dtype).empty_table().select(
                columns or row_schema(self.dim, self.dtype).names)
        try:
            return self.dataset().to_table(columns=columns, filter=filter)
        except (pa.ArrowInvalid, OSError) as e:
            raise StoreError(f"{self.root}: cannot read shards ({str(e).splitlines()[0]}); a shard "
                             "damaged outside embedder can be moved away and the extraction rerun") from None

    def _read_plain(self, columns: list[str]) -> pa.Table:
        schema = row_schema(self.dim, self.dtype)
        try:
            sub = pa.schema([schema.field(c) for c in columns])
            parts = [_with_columns(storage.open_parquet(p), columns).cast(sub) for p in self.shard_files()]
        except (pa.ArrowInvalid, OSError) as e:
            raise StoreError(f"{self.root}: cannot read shards ({str(e).splitlines()[0]}); a shard "
                             "damaged outside embedder can be moved away and the extraction rerun") from None
        return pa.concat_tables(parts) if parts else pa.schema([schema.field(c) for c in columns]).empty_table()

    def ids(self) -> set[str]:
        """Every id, as Python strings: O(rows) memory; resume uses ``present`` instead."""
        return set(self.read(["id"]).column("id").to_pylist())

    def present(self, ids: Sequence[str]) -> np.ndarray:
        """For each of IDS, whether the store holds it — through the per-shard id index (memory
        O(len(ids) + one shard), whatever the store's size)."""
        from embedder.store import id_index

        return id_index.contains(self.shard_files(), ids)

    def errors(self) -> pa.Table:
        files = self.error_files()
        if not files:
            return ERRORS_SCHEMA.empty_table()
        return pa.concat_tables([storage.open_parquet(p).read().cast(ERRORS_SCHEMA) for p in files])

    def failed_ids(self) -> set[str]:
        return set(self.errors().column("id").to_pylist())

    def count(self, files: list[str] | None = None) -> int:
        """Rows in the store (or in FILES, a snapshot of ``shard_files()``): the manifest's row count
        for each shard it lists (one read, where a footer per shard would be a ranged GET each in
        object storage), a footer for a shard it does not list yet (a running writer's newest
        shards, a killed writer's last)."""
        listed = {s["file"]: int(s["rows"]) for s in self.manifest().get("shards", [])}
        total = 0
        for p in self.shard_files() if files is None else files:
            rows = listed.get(storage.name(p))
            total += rows if rows is not None else storage.open_parquet(p).metadata.num_rows
        return total

    def info(self) -> StoreInfo:
        labels = self.read(["label"]).column("label").to_pylist()
        counts = Counter("(none)" if lab is None else lab for lab in labels)
        n_err = 0
        if self.error_files():  # (an empty Arrow table would import pandas: `info` starts fast)
            errors = self.errors()
            # An image that failed once and succeeded on a retry is no longer an error.
            failed = list({i for i in errors.column("id").to_pylist() if i is not None})
            n_err = int((~self.present(failed)).sum()) if failed else 0
        m = self.manifest()
        return StoreInfo(self.root, Provenance.from_dict(m["provenance"]), len(labels), self.dim,
                         dict(sorted(counts.items())), n_err, len(self.shard_files()), m["runs"])

    # ---- writing --------------------------------------------------------------------------
    @contextmanager
    def writer_lock(self) -> Iterator[None]:
        """One writer at a time: two extractions into one store would embed images twice."""
        from embedder.io.locks import exclusive, lease

        busy = StoreError(f"{self.root} is being written by another embedder process; "
                          "wait for it to finish (it resumes where it stops)")
        if not self.remote:
            with exclusive(Path(self._at(".lock")), lambda: busy):
                yield
            return
        with lease(self._at(".writer.lock"), lambda holder: StoreError(
                f"{self.root} is being written by {holder}; wait for it to finish (it resumes where it "
                f"stops), or, if that run is gone, wait for its lease to end or delete {self._at('.writer.lock')}")):
            yield

    def write_shard(self, table: pa.Table, provenance: Provenance | None = None) -> str:
        """Write one shard atomically, stamped with the provenance of the run that wrote it
        (default: the store's)."""
        meta = {META_KEY: (provenance or self.provenance).to_json().encode()}
        table = table.replace_schema_metadata(meta)
        path = self._next_shard_path(uuid.uuid4().hex[:8])
        from embedder.store import id_index

        id_index.write(path, table.column("id"))  # first: a shard never lacks its index
        storage.write_parquet(path, table)
        self._joined()
        return path

    def _next_shard_path(self, tag: str) -> str:
        """Shards are numbered in the order they joined the store (the tag keeps names unique)."""
        n = self._shard_count if self._shard_count is not None else len(self.shard_files())
        return self._at(f"part-{n:05d}-{tag}.parquet")

    def require_id_scheme(self, scheme: str) -> None:
        """Under the writer lock, before a run that read tables writes: the store's table rows keep
        one id scheme (``SourceOptions.id_scheme``). The first such run records it in the manifest
        (so does the first on a store written before schemes were recorded); a run with another is
        refused: the same rows would come again under other ids."""
        from embedder.io.options import id_scheme_flags

        m = self.manifest()
        had = m.get("id_scheme")
        if had is None and m.get("shards") and scheme.startswith("key:"):
            # filled before schemes were recorded, when a key's id was the key's alone (today's
            # --global-keys): per-file ids would add every row again
            column = scheme.partition(":")[2]
            raise StoreError(f"{self.root} was filled before ids from --id-column were made per table file "
                             f"(its key ids are the key's alone): give --id-column {column} --global-keys to go "
                             "on with it, or write to a new --out STORE")
        if had is None:
            m["id_scheme"] = scheme
            storage.write_bytes(self._at(MANIFEST), json.dumps(m, indent=2).encode())
        elif had != scheme:
            raise StoreError(f"{self.root}: its table rows have ids made with {id_scheme_flags(had)}; this run "
                             f"({id_scheme_flags(scheme)}) would add the same rows again under other ids: give "
                             f"{id_scheme_flags(had)}, or write to a new --out STORE")

    def _joined(self) -> None:
        if self._shard_count is not None:
            self._shard_count += 1

    def stage_shard(self, table: pa.Table, provenance_json: str, name: str) -> str:
        """In a remote worker (no lock): write a shard under ``.staging/NAME`` atomically. A
        retried task writes the same NAME again; nothing is in the store until ``commit_shard``."""
        from embedder.store import id_index

        d = self._at(STAGING_DIR)
        storage.makedirs(d)
        path = storage.join(d, name)
        id_index.write(path, table.column("id"), dest=storage.join(d, f"{name}.ids.npy"))  # first, like write_shard
        storage.write_parquet(path, table.replace_schema_metadata({META_KEY: provenance_json.encode()}))
        return path

    def commit_shard(self, name: str) -> str:
        """Under the writer lock: a staged shard becomes part of the store (one atomic rename
        locally; a copy and a delete in object storage, see embedder.io.storage)."""
        from embedder.store import id_index

        staged = self._at(STAGING_DIR, name)
        path = self._next_shard_path(name[:8])
        index = f"{staged}.ids.npy"  # written by the worker that staged the shard
        storage.makedirs(storage.parent(id_index.path_for(path)))
        try:
            storage.move(index, id_index.path_for(path))
        except FileNotFoundError:  # staged by an older worker: built here from the shard's ids
            id_index.write(path, storage.open_parquet(staged).read(columns=["id"]).column("id"))
        storage.move(staged, path)
        self._joined()
        return path

    def write_errors(self, table: pa.Table) -> None:
        d = self._at(ERRORS_DIR)
        storage.makedirs(d)
        storage.write_parquet(storage.join(d, f"part-{int(time.time() * 1e6)}-{uuid.uuid4().hex[:8]}.parquet"),
                              table.cast(ERRORS_SCHEMA))

    def update_manifest(self, run: dict[str, Any] | None = None,
                        added: Sequence[tuple[str, int]] | None = None, *, now: bool = False) -> None:
        """Record RUN and the shards listed in ADDED (name, rows). Without ADDED, the shard list is
        rebuilt from the files (reading every footer: O(shards)) and written at once. With it, the
        entries are appended — written at once the first time, then at most every MANIFEST_EVERY_S
        seconds (or with NOW), and when the writer closes: the manifest is O(shards), so rewriting
        it per shard would cost a billion-image run ~0.8 s per shard at its end (see
        scripts/bench_resume.py). A killed writer loses nothing: the next one reconciles the list."""
        with self._manifest_lock:
            if added is not None:
                self._unsaved.extend(added)
            if run is not None:
                self._unsaved_run = run
            if added is not None and not now and time.monotonic() - self._saved_at < MANIFEST_EVERY_S:
                return
            m = self.manifest()
            if added is None:
                m["shards"] = [{"file": storage.name(p), "rows": storage.open_parquet(p).metadata.num_rows}
                               for p in self.shard_files()]
            else:
                known = {s["file"] for s in m["shards"]}
                m["shards"] += [{"file": name, "rows": rows} for name, rows in self._unsaved if name not in known]
            if self._unsaved_run is not None:
                runs = [r for r in m["runs"] if r.get("run_id") != self._unsaved_run.get("run_id")]
                m["runs"] = [*runs, self._unsaved_run]
            storage.write_bytes(self._at(MANIFEST), json.dumps(m, indent=2).encode())
            self._unsaved, self._unsaved_run = [], None
            self._saved_at = time.monotonic()

    def _save_manifest(self) -> None:
        """Write what ``update_manifest`` has held back, if anything."""
        if self._unsaved or self._unsaved_run is not None:
            self.update_manifest(added=[], now=True)

"""IVF builds larger than RAM: the store streamed in record batches, slices added to on-disk inverted
lists, merged; `index add` on such an index."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from embedder.errors import EmbedderError, IndexError_
from embedder.index import gpu as index_gpu
from embedder.index.faiss_util import QUANTIZER_EF_ADD, import_faiss, no_precomputed_tables, set_quantizer_ef
from embedder.index.ondisk import (
    DELTA_FRACTION,
    DELTA_MAX,
    IDS_ARROW,
    LISTS_FILE,
    TRAINED_FILE,
    link_or_copy,
    merge_into,
    merge_lists,
    point_lists_at,
    read_ondisk,
)
from embedder.io import storage
from embedder.store.shards import Store

BATCH_ROWS = 16_384
log = logging.getLogger(__name__)


@dataclass
class Batch:
    start: int  # global row number of the first row
    x: np.ndarray  # [n, dim] float32, prepared for the metric
    table: pa.Table  # id, path, label


def batches(store: Store, prepare: Callable[[np.ndarray], np.ndarray],
            columns: tuple[str, ...] = ("id", "path", "label")) -> Iterator[Batch]:
    """The store in global row order, one record batch at a time."""
    return batches_of([str(f) for f in store.shard_files()], 0, prepare, columns)


def batches_of(files: list[str], start: int, prepare: Callable[[np.ndarray], np.ndarray],
               columns: tuple[str, ...] = ("id", "path", "label")) -> Iterator[Batch]:
    """The given shards (whose first row is global row START), one record batch at a time."""
    return batches_past([(f, 0) for f in files], start, prepare, columns)


def batches_past(parts: list[tuple[str, int]], start: int, prepare: Callable[[np.ndarray], np.ndarray],
                 columns: tuple[str, ...] = ("id", "path", "label")) -> Iterator[Batch]:
    """Each (shard, skip) of PARTS' rows past its first SKIP, one record batch at a time (row
    groups wholly before SKIP are never read); the first row yielded is row START."""
    from embedder.store.shards import arrow_to_embeddings

    row = start
    pool = pa.default_memory_pool()
    for shard, skip in parts:
        for rb in record_batches(shard, skip, [*columns, "embedding"]):
            x = prepare(arrow_to_embeddings(rb.column("embedding")))
            yield Batch(row, x, pa.Table.from_batches([rb]).select(list(columns)))
            row += rb.num_rows
        pool.release_unused()


def _past(f: Any, skip: int) -> tuple[list[int], int]:
    """The row groups of Parquet file F that hold rows past its first SKIP, and how many rows of
    the first of them to skip."""
    groups = list(range(f.metadata.num_row_groups))
    if not skip:
        return groups, 0
    ends = np.cumsum([f.metadata.row_group(g).num_rows for g in groups])
    first = int(np.searchsorted(ends, skip, side="right"))
    return groups[first:], skip - (int(ends[first - 1]) if first else 0)


def _with_nulls(t: Any, columns: list[str]) -> Any:
    """T (a table or record batch read with the COLUMNS its shard has) with COLUMNS in order, a
    column the shard lacks (``caption`` in shards written before it) as nulls."""
    if t.schema.names == columns:
        return t
    return type(t).from_arrays([t.column(c) if c in t.schema.names else pa.nulls(t.num_rows, pa.string())
                                for c in columns], names=columns)


def table_past(shard: str, skip: int, columns: list[str]) -> pa.Table:
    """SHARD's COLUMNS past its first SKIP rows, as one table; a row group that ends before SKIP
    is not read."""
    f = storage.open_parquet(shard)
    groups, skip = _past(f, skip)
    have = [c for c in columns if c in f.schema_arrow.names]
    return _with_nulls(f.read_row_groups(groups, columns=have).slice(skip), columns)


def record_batches(shard: str, skip: int, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """SHARD's COLUMNS past its first SKIP rows, a record batch at a time; a row group that ends
    before SKIP is not read."""
    f = storage.open_parquet(shard)
    groups, skip = _past(f, skip)
    if not groups:
        return
    have = [c for c in columns if c in f.schema_arrow.names]
    for rb in f.iter_batches(batch_size=BATCH_ROWS, columns=have, row_groups=groups):
        if skip >= rb.num_rows:
            skip -= rb.num_rows
            continue
        yield _with_nulls(rb.slice(skip) if skip else rb, columns)
        skip = 0


# ---- which store rows an index has read ---------------------------------------------------------
# The index meta (written on commit, with the generation) records, per store root, the shards it
# has read and how many rows of each: ``{"indexed_shards": {ROOT: {SHARD NAME: ROWS}}}``. An add
# then reads only the shards it has not seen, and of a shard seen in part only the rows past the
# count; shards are append-only files, so a name and a count say which rows were read.
INDEXED = "indexed_shards"


def shard_rows(store: Store, files: list[str]) -> dict[str, int]:
    """Rows of each of FILES by shard name: the manifest's count, or its footer where the manifest
    does not list it yet."""
    listed = {s["file"]: int(s["rows"]) for s in store.manifest().get("shards", [])}
    out = {}
    for f in files:
        name = storage.name(f)
        rows = listed.get(name)
        out[name] = rows if rows is not None else storage.open_parquet(f).metadata.num_rows
    return out


def unseen(meta: dict[str, Any], store: Store, files: list[str], rows: dict[str, int]) -> list[tuple[str, int]]:
    """The (shard, rows to skip) of FILES that hold rows an index (its META) has not read. Every
    shard whole where META records nothing for this store (an index built before the record, or
    added to from another store) or where a recorded shard now holds fewer rows than were read (a
    rewritten shard: nothing is assumed)."""
    seen = (meta.get(INDEXED) or {}).get(store.root)
    if seen is None or any(int(seen.get(storage.name(f), 0)) > rows[storage.name(f)] for f in files):
        return [(f, 0) for f in files]
    parts = [(f, int(seen.get(storage.name(f), 0))) for f in files]
    return [(f, skip) for f, skip in parts if rows[storage.name(f)] > skip]


def record_read(meta: dict[str, Any], store: Store, rows: dict[str, int]) -> dict[str, dict[str, int]]:
    """META's record of the shards read, with this store's now ROWS (every listed shard read to
    its count)."""
    record = {root: dict(names) for root, names in (meta.get(INDEXED) or {}).items()}
    record[store.root] = {**record.get(store.root, {}), **rows}
    return record


def gather(store: Store, rows: np.ndarray, prepare: Callable[[np.ndarray], np.ndarray],
           files: list[str] | None = None) -> np.ndarray:
    """Vectors of the given global rows (sorted) of FILES (default: the store's shards now), in one
    streamed pass."""
    out = np.empty((len(rows), store.dim), np.float32)
    shards = [str(f) for f in store.shard_files()] if files is None else files
    for b in batches_of(shards, 0, prepare, ("id",)):
        lo, hi = np.searchsorted(rows, [b.start, b.start + len(b.x)])
        if hi > lo:
            out[lo:hi] = b.x[rows[lo:hi] - b.start]
    return out


ID_SCHEMA = pa.schema([("faiss_id", pa.int64()), ("id", pa.string()), ("path", pa.string()), ("label", pa.string())])


# ---- what an id map carries beyond its fixed columns (hits' caption, key and the user's columns) ----
# An index's meta lists them (``"columns"``; absent in indexes built before: none). Each is text (null
# where a row has none): ``caption`` and the store's other columns from the store; ``key``, the
# user's --id-column value, and any other name, from the source tables at each row's location (see
# ``embedder.io.tables.ColumnReader``). The id map holds only these: the default is the caption where
# the store has captions and the key where its ids come from --id-column.
FIXED_COLUMNS = ("faiss_id", "id", "path", "label")
STORE_COLUMNS = ("caption", "width", "height", "file_hash")  # read from the store's shards
KEY = "key"  # the user's --id-column value
ON_HITS = ("caption", KEY)  # a hit's own fields; the other kept columns come as its ``columns``


def id_schema(extras: tuple[str, ...] = ()) -> pa.Schema:
    return pa.schema([*ID_SCHEMA, *(pa.field(c, pa.string()) for c in extras)])


def key_column(store: Store) -> str | None:
    """The source tables' key column the store's table rows have their ids from (--id-column), or None."""
    kind, _, column = str(store.manifest().get("id_scheme") or "").partition(":")
    return column if kind in ("key", "global-key") and column else None


def has_values(files: list[str], column: str) -> bool:
    """Whether some row of the shards FILES has a non-null COLUMN: from their footers' statistics
    (no column is read; a row group without statistics counts as having values)."""
    for shard in files:
        meta = storage.open_parquet(shard).metadata
        names = meta.schema.to_arrow_schema().names
        if column not in names:
            continue
        j = names.index(column)
        for g in range(meta.num_row_groups):
            rg = meta.row_group(g)
            stats = rg.column(j).statistics
            if stats is None or not stats.has_null_count or stats.null_count < rg.num_rows:
                return True
    return False


@dataclass(frozen=True)
class Extras:
    """The id map's columns beyond FIXED_COLUMNS (``columns``, in order) and where each comes from."""

    columns: tuple[str, ...] = ()
    key_column: str | None = None  # the source tables' key column, where ``key`` is one of them
    required: bool = True  # a source table that cannot be read fails the build (else: nulls, warned)

    @property
    def from_store(self) -> list[str]:
        return [c for c in self.columns if c in STORE_COLUMNS]

    @property
    def from_sources(self) -> dict[str, str]:
        return {c: (self.key_column or c) if c == KEY else c for c in self.columns if c not in STORE_COLUMNS}

    def reader(self) -> Any:
        from embedder.io.tables import ColumnReader

        return ColumnReader(self.from_sources) if self.from_sources else None

    def arrays(self, table: Any, reader: Any) -> dict[str, pa.Array]:
        """The extra columns of TABLE's rows (a table or record batch with ``path`` and the store
        columns of ``from_store``), READER: ``reader()``'s, kept across batches."""
        out: dict[str, pa.Array] = {}
        got: dict[str, pa.Array] = {}
        if reader is not None:
            parts: dict[str, list[pa.Array]] = {c: [] for c in self.from_sources}
            for s in range(0, max(table.num_rows, 1), BATCH_ROWS):  # a batch of paths as Python strings at a time
                paths = table.column("path").slice(s, BATCH_ROWS).to_pylist()
                try:
                    read = reader.read(paths)
                except EmbedderError as e:
                    if self.required:
                        raise IndexError_(f"cannot read the kept columns {', '.join(self.from_sources)}: {e} (they "
                                          "are read from the source tables at each row's location: the tables must "
                                          "be there; or leave them out of --keep-columns)") from None
                    log.warning("index: %s left empty for %d rows: %s", ", ".join(self.from_sources), len(paths), e)
                    read = {c: pa.nulls(len(paths), pa.string()) for c in self.from_sources}
                for c, a in read.items():
                    parts[c].append(a)
            got = {c: pa.concat_arrays(a) for c, a in parts.items()}
        for c in self.columns:
            if c in STORE_COLUMNS:
                col = table.column(c)
                col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
                out[c] = col.cast(pa.string())
            else:
                out[c] = got[c]
        return out

    def check(self, reader: Any) -> None:
        """After every row was read: a column asked of the source tables that none of them has."""
        if reader is None or not self.required:
            return
        missing = [c for c in self.from_sources if c not in reader.found]
        if missing:
            raise IndexError_(f"no source table of this store has column {self.from_sources[missing[0]]!r} "
                              "(--keep-columns names store columns caption, width, height, file_hash, key, or "
                              "columns of the tables the store was extracted from)")


def extras_for(store: Store, files: list[str], asked: tuple[str, ...] | None) -> Extras:
    """What an index built over STORE's FILES keeps in its id map: ASKED (``--keep-columns``), or by
    default the caption where the store holds captions and the key where its ids come from a key
    column (a table that cannot be read then leaves the key empty, with a warning)."""
    key = key_column(store)
    if asked is None:
        cols = (("caption",) if has_values(files, "caption") else ()) + ((KEY,) if key else ())
        return Extras(cols, key, required=False)
    cols = tuple(dict.fromkeys(c.strip() for c in asked if c.strip() and c.strip() != "none"))
    for c in cols:
        if c in FIXED_COLUMNS or c == "embedding":
            raise IndexError_(f"--keep-columns: {c!r} is in every index already; name other columns "
                              "(caption, width, height, file_hash, key, or the source tables' columns)")
    return Extras(cols, key)


def extras_of(meta: dict[str, Any]) -> Extras:
    """The extras an index records (META), for rows an add brings."""
    return Extras(tuple(meta.get("columns") or ()), meta.get("key_column"), required=False)


def id_rows(fids: np.ndarray, table: Any, extras: Extras, reader: Any, schema: pa.Schema) -> pa.Table:
    """Id-map rows of TABLE's rows (FAISS ids FIDS) in SCHEMA (``id_schema(extras.columns)``)."""
    more = extras.arrays(table, reader)
    return pa.table({"faiss_id": pa.array(fids, pa.int64()), "id": table.column("id").cast(pa.string()),
                     "path": table.column("path").cast(pa.string()),
                     "label": table.column("label").cast(pa.string()),
                     **{c: more[c] for c in schema.names if c in more}}, schema=schema)


@dataclass(frozen=True)
class Part:
    """A run of consecutive shards to add to slice indexes: the unit of a parallel build."""

    shards: list[str]
    start: int  # global row number of the first row of the first shard
    tag: str  # names this part's files in the staging folder ("" for a single local part)
    held: np.ndarray  # the held-out query rows (global, sorted): never added, ground truth only
    queries: np.ndarray  # their vectors
    k: int  # ground-truth depth (0: no queries)
    per_slice: int  # rows per slice index
    metric: str

# a runner of slices in parallel (index.ray): slice → its list files and held-out query results
Parallel = Callable[[Part, Path], tuple[list[str], list[tuple[np.ndarray, np.ndarray]]]]


def write_npy_header(f: Any, n: int, dim: int) -> None:
    np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)),
                                             "fortran_order": False, "shape": (n, dim)})


def add_part(part: Part, staging: Path, vectors: Any, ids_out: Any, prepare: Callable[[np.ndarray], np.ndarray],
             faiss_metric: int, extras: Extras = Extras()) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Add PART's rows to clones of the trained index in STAGING, writing a slice whenever one
    reaches ``per_slice`` rows; the rows' float16 copies go to VECTORS (a binary file) and their
    id-map rows (with EXTRAS, in IDS_OUT's schema) to IDS_OUT (an Arrow IPC writer), in row order.
    Returns the slice files and the part's exact top-k of the held-out queries (distances, global ids)."""
    faiss = import_faiss()
    base = faiss.read_index(str(staging / TRAINED_FILE))
    held = part.held
    heap = faiss.ResultHeap(len(held), part.k, keep_max=(part.metric == "ip")) if part.k else None
    prefix = f"slice-{part.tag}-" if part.tag else "slice-"
    slices: list[str] = []
    current = faiss.clone_index(base)
    in_slice = 0

    def flush() -> None:
        nonlocal current, in_slice
        slices.append(str(staging / f"{prefix}{len(slices):05d}.faiss"))
        faiss.write_index(current, slices[-1])
        current = faiss.clone_index(base)
        in_slice = 0

    reader = extras.reader()
    for b in batches_of(part.shards, part.start, prepare, ("id", "path", "label", *extras.from_store)):
        m = len(b.x)
        rows = np.arange(b.start, b.start + m, dtype=np.int64)
        vectors.write(np.ascontiguousarray(b.x, np.float16).tobytes())
        ids_out.write_table(id_rows(rows, b.table, extras, reader, id_schema(extras.columns)))
        lo, hi = np.searchsorted(held, [b.start, b.start + m])
        keep = np.ones(m, bool)
        keep[held[lo:hi] - b.start] = False
        if keep.any():
            xs, ids = b.x[keep], rows[keep]
            current.add_with_ids(xs, ids)
            in_slice += len(ids)
            if heap is not None:
                d, i = faiss.knn(part.queries, xs, min(heap.k, len(xs)), metric=faiss_metric)
                heap.add_result(d, ids[i])
        if in_slice >= part.per_slice:
            flush()
    if in_slice:
        flush()
    extras.check(reader)
    if heap is None:
        return slices, np.zeros((0, 0), np.float32), np.zeros((0, 0), np.int64)
    heap.finalize()
    return slices, np.asarray(heap.D, np.float32), np.asarray(heap.I, np.int64)


def slice_rows(dim: int, code_bytes: int, budget: int) -> int:
    """Rows per slice index: a quarter of the budget for its codes and ids (the rest is the
    training sample, the queries' ground truth, one record batch and FAISS's own buffers)."""
    return max(BATCH_ROWS, int(budget // 4 // max(code_bytes + 8, 1)))


def train_rows(plan_rows: int, dim: int, budget: int) -> int:
    """The training sample, capped at a quarter of the budget."""
    return int(max(1, min(plan_rows, budget // 4 // (dim * 4))))


def build_streamed(*args: Any, **kwargs: Any) -> dict[str, Any]:
    with no_precomputed_tables():
        return _build_streamed(*args, **kwargs)


def _build_streamed(store: Store, staging: Path, factory: str, metric: str, train_size: int, budget: int,
                   queries: int, seed: int, faiss_metric: int,
                   prepare: Callable[[np.ndarray], np.ndarray], parallel: Parallel | None = None,
                   extras: Extras = Extras()) -> dict[str, Any]:
    """Write index.faiss (+ lists.ivfdata), trained.faiss, ids.arrow and vectors.npy into STAGING.
    Returns what the caller needs for tuning and the metadata."""
    faiss = import_faiss()

    # one listing: a writer appending shards meanwhile must not make the count, the sample and the
    # adds see different stores (duplicate FAISS ids, rows missing from the id map)
    files = [str(f) for f in store.shard_files()]
    n, dim = store.count(files), store.dim
    rng = np.random.default_rng(seed)
    nq = min(queries, max(1, n // 10)) if n > 1 else 0
    held = np.sort(rng.choice(n, nq, replace=False)) if nq else np.zeros(0, np.int64)
    # OPQ's training holds several rotated copies of its sample (measured at 1M × 256: 667 MiB of its
    # own for a 512 MiB budget with the usual sample): half the sample keeps it within the budget
    n_train = min(train_rows(train_size, dim, budget // 2 if factory.startswith("OPQ") else budget), n - nq)
    # uniform over all rows of all shards, never a held-out query; O(sample) memory, whatever n
    candidates = rng.choice(n, min(n, n_train + nq), replace=False)
    sample_rows = np.sort(candidates[~np.isin(candidates, held)][:n_train])
    t0 = time.perf_counter()
    both = np.union1d(sample_rows, held)
    got = gather(store, both, prepare, files)
    train_x = got[np.searchsorted(both, sample_rows)]
    query_x = got[np.searchsorted(both, held)]
    del got
    try:
        base = faiss.index_factory(dim, factory, faiss_metric)
    except RuntimeError as e:
        raise IndexError_(f"FAISS cannot build {factory!r}: {str(e).splitlines()[-1]}") from None
    try:
        trained_on = index_gpu.train(base, train_x)
    except RuntimeError as e:
        raise IndexError_(f"training {factory} failed ({str(e).splitlines()[-1]}); too few vectors?") from None
    del train_x
    set_quantizer_ef(base, QUANTIZER_EF_ADD)  # the trained index is cloned for every slice's adds
    train_seconds = time.perf_counter() - t0
    faiss.write_index(base, str(staging / TRAINED_FILE))
    code_bytes = faiss.extract_index_ivf(base).code_size
    per_slice = slice_rows(dim, code_bytes, budget)

    k = 10
    heap = faiss.ResultHeap(nq, min(k, max(n - nq, 1)), keep_max=(metric == "ip")) if nq else None
    part = Part(shards=files, start=0, tag="", held=held, queries=query_x,
                k=heap.k if heap is not None else 0, per_slice=per_slice, metric=metric)
    if parallel is not None:  # e.g. Ray: one task per group of shards, then the parts joined here
        slices, results = parallel(part, staging)
    else:
        # float16 copies appended with plain writes (rows arrive in order): a writable memory map
        # would count every written page in this process's RSS (measured: +0.5 GB at 1M × 256)
        with open(staging / "vectors.npy", "wb") as vectors:
            write_npy_header(vectors, n, dim)
            with pa.OSFile(str(staging / IDS_ARROW), "wb") as sink, \
                    pa.ipc.new_file(sink, id_schema(extras.columns)) as ids_out:
                slices, d_, i_ = add_part(part, staging, vectors, ids_out, prepare, faiss_metric, extras)
        results = [(d_, i_)]
    if heap is not None:
        for d_, i_ in results:
            heap.add_result(d_, i_)
    held_slice = str(staging / "slice-held.faiss")
    h = faiss.clone_index(base)
    if nq:
        h.add_with_ids(query_x, held.astype(np.int64))
    faiss.write_index(h, held_slice)
    del h
    # Tuning needs the index without the held-out queries, and FAISS's on-disk lists must not be
    # added to after a merge (measured: ids came back corrupted once the file was resized), so the
    # slices are merged twice: without the queries for tuning, then with them for good.
    tuning = merge_lists(faiss.read_index(str(staging / TRAINED_FILE)), slices, str(staging / "tuning.ivfdata"))

    def finish() -> Any:
        with no_precomputed_tables():
            return _finish()

    def _finish() -> Any:
        final = merge_lists(faiss.read_index(str(staging / TRAINED_FILE)), [*slices, held_slice],
                            str(staging / LISTS_FILE))
        for f in [*slices, held_slice, str(staging / "tuning.ivfdata")]:
            Path(f).unlink(missing_ok=True)
        return final

    exact = None
    if heap is not None:
        heap.finalize()
        exact = np.asarray(heap.D, np.float32)
    return {"index": tuning, "finish": finish, "held": held, "sample": sample_rows, "queries": query_x,
            "exact": exact, "n": n, "files": files,
            "dim": dim, "slices": len(slices), "slice_rows": per_slice, "train_rows": len(sample_rows),
            "train_seconds": round(train_seconds, 3), "trained_on": trained_on}


def add_streamed(loaded: Any, d: Path, store_path: str, merge: bool = False) -> dict[str, int]:
    with no_precomputed_tables():
        return _add_streamed(loaded, d, store_path, merge)


def _add_streamed(loaded: Any, d: Path, store_path: str, merge: bool) -> dict[str, int]:
    """``index add`` for an on-disk index: only the store's new rows are embedded, into a delta
    (its own small IVF lists of the same trained quantizer, id map rows and float16 copies) beside
    hard links to the current generation's files: the add costs what it adds. When the deltas hold
    more than DELTA_FRACTION of the rows, number more than DELTA_MAX, or MERGE asks, the lists and
    every delta are merged into one lists file instead (streamed, on disk). The current generation
    is never written to."""

    faiss = import_faiss()

    from embedder.index import generations as gens
    from embedder.index.faiss_util import prepare_rows
    from embedder.index.generations import INDEX_FILE, VECTORS_FILE, commit_index

    store = Store.open(store_path)
    loaded.require_addable(store.provenance, store_path)
    from embedder.store import id_index

    # the index's ids as sorted 16-byte digests, once: asking Arrow's is_in per record batch rebuilt
    # a hash set of every indexed id each time (measured: 340 s of a 1 % add to a 5M index)
    present = np.sort(id_index.digests(loaded.ids.column("id")))
    masks = []
    files = [str(f) for f in store.shard_files()]  # one listing for both passes
    rows = shard_rows(store, files)
    parts = unseen(loaded.meta, store, files, rows)  # only rows the index has not read
    for shard, skip in parts:  # pass 1: ids only
        for rb in record_batches(shard, skip, ["id"]):
            asked = id_index.digests(rb.column("id"))
            pos = np.minimum(np.searchsorted(present, asked), max(len(present) - 1, 0))
            held = present[pos] == asked if len(present) else np.zeros(len(asked), bool)
            masks.append(~held)
    del present
    n_new = int(sum(m.sum() for m in masks))
    total = sum(rows.values())
    deltas: list[dict[str, Any]] = list(loaded.meta.get("deltas") or [])
    if n_new == 0 and not (merge and deltas):
        return {"added": 0, "skipped": total, "count": int(loaded.index.ntotal), "deltas": len(deltas)}
    start = int(loaded.meta["next_id"])
    dim = loaded.dim
    in_deltas = sum(int(x["rows"]) for x in deltas)
    merge = merge or len(deltas) + 1 > DELTA_MAX or in_deltas + n_new > DELTA_FRACTION * (start - in_deltas)
    tmpdir = gens.staging(d)
    k = max((int(x["k"]) for x in deltas), default=0) + 1
    delta: dict[str, Any] = {"k": k, "index": f"delta-{k:04d}.faiss", "ids": f"ids-delta-{k:04d}.arrow",
                             "vectors": f"vectors-delta-{k:04d}.npy", "rows": n_new, "first_id": start}
    schema = loaded.ids.schema
    extras = extras_of(loaded.meta)
    extras = Extras(tuple(c for c in extras.columns if c in schema.names), extras.key_column, False)
    reader = extras.reader()
    trained = faiss.read_index(str(loaded.dir / TRAINED_FILE))
    slice_index = faiss.clone_index(trained)
    vectors = np.lib.format.open_memmap(tmpdir / delta["vectors"], mode="w+", dtype=np.float16, shape=(n_new, dim))
    row = start
    with pa.OSFile(str(tmpdir / delta["ids"]), "wb") as sink, pa.ipc.new_file(sink, schema) as ids_out:
        for mask, b in zip(masks, batches_past(parts, 0, lambda v: prepare_rows(v, loaded.metric),  # pass 2
                                               ("id", "path", "label", *extras.from_store))):
            if not mask.any():
                continue
            x = b.x[mask]
            fids = np.arange(row, row + len(x), dtype=np.int64)
            vectors[row - start:row - start + len(x)] = x.astype(np.float16)
            ids_out.write_table(id_rows(fids, b.table.filter(pa.array(mask)), extras, reader, schema))
            slice_index.add_with_ids(x, fids)
            row += len(x)
    vectors.flush()
    del vectors
    faiss.write_index(slice_index, str(tmpdir / delta["index"]))
    del slice_index
    if n_new:
        deltas.append(delta)
    else:  # a merge with nothing new: the empty delta's files go
        for f in ("index", "ids", "vectors"):
            (tmpdir / delta[f]).unlink()
    search = loaded.meta.get("search", {})
    if merge:
        index = _merge_generation(trained, loaded, tmpdir, deltas, str(tmpdir / LISTS_FILE), schema, dim)
        if search.get("param") and search.get("value"):
            faiss.ParameterSpace().set_index_parameter(index, search["param"], search["value"])
        point_lists_at(index, d / f"gen-{gens.next_generation(d):06d}" / LISTS_FILE)
        faiss.write_index(index, str(tmpdir / INDEX_FILE))
        faiss.write_index(trained, str(tmpdir / TRAINED_FILE))
        del index
        for x in deltas:
            for f in ("index", "ids", "vectors"):
                (tmpdir / x[f]).unlink(missing_ok=True)
        deltas = []
    else:  # the unchanged files of the current generation, linked: no byte of them is copied
        for f in (INDEX_FILE, LISTS_FILE, TRAINED_FILE, IDS_ARROW, VECTORS_FILE):
            link_or_copy(loaded.dir / f, tmpdir / f)
        for x in deltas[:-1]:
            for f in ("index", "ids", "vectors"):
                link_or_copy(loaded.dir / x[f], tmpdir / x[f])
    count = start + n_new
    nbytes = (tmpdir / INDEX_FILE).stat().st_size + (tmpdir / LISTS_FILE).stat().st_size + sum(
        (tmpdir / x["index"]).stat().st_size for x in deltas)
    meta = {**loaded.meta, "count": count, "next_id": count, "deltas": deltas, "index_bytes": nbytes,
            INDEXED: record_read(loaded.meta, store, rows)}
    commit_index(d, tmpdir, meta)
    return {"added": n_new, "skipped": total - n_new, "count": count, "deltas": len(deltas)}


def _merge_generation(trained: Any, loaded: Any, tmpdir: Path, deltas: list[dict[str, Any]], ivfdata: str,
                      schema: pa.Schema, dim: int) -> Any:
    """The current lists and every delta (the newest in TMPDIR, the others in the current
    generation) merged into one on-disk lists file; the id maps and float16 copies concatenated by
    streamed copies. Returns the merged index."""
    from embedder.index.generations import INDEX_FILE, VECTORS_FILE

    faiss = import_faiss()

    def where(name: str) -> Path:
        return tmpdir / name if (tmpdir / name).exists() else loaded.dir / name

    sources = [read_ondisk(str(loaded.dir / INDEX_FILE)),
               *(faiss.read_index(str(where(x["index"]))) for x in deltas)]
    index = merge_into(faiss.clone_index(trained), sources, ivfdata)
    del sources
    parts = [np.load(loaded.dir / VECTORS_FILE, mmap_mode="r"),
             *(np.load(where(x["vectors"]), mmap_mode="r") for x in deltas)]
    with open(tmpdir / VECTORS_FILE, "wb") as out:  # plain writes: a writable map would count in RSS
        write_npy_header(out, sum(len(p) for p in parts), dim)
        for part in parts:
            for s in range(0, len(part), 1 << 18):
                out.write(np.ascontiguousarray(part[s:s + (1 << 18)], dtype=np.float16).tobytes())
    del parts
    with pa.OSFile(str(tmpdir / IDS_ARROW), "wb") as sink, pa.ipc.new_file(sink, schema) as ids_out:
        for name in [str(loaded.dir / IDS_ARROW), *(str(where(x["ids"])) for x in deltas)]:
            with pa.memory_map(name) as src:
                reader = pa.ipc.open_file(src)
                for i in range(reader.num_record_batches):
                    ids_out.write_batch(reader.get_batch(i))
    return index

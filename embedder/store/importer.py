"""Vectors made elsewhere, as a store: ``embedder import``.

Two kinds of SOURCE (a file, a folder, a glob, or an object-storage location the io layer reads):

- any Parquet file with a numeric ``list``, ``large_list`` or ``fixed_size_list`` vector column
  (``--vector-column``) and, optionally, id, label, path and caption columns;
- clip-retrieval / img2dataset output: ``img_emb/img_emb_N.npy`` with ``metadata/metadata_N.parquet``
  (or the two files side by side): the ``.npy`` is memory-mapped and read a row batch at a time, its
  rows line up with the metadata's (``key`` gives the id, ``image_path`` or ``url`` the path,
  ``caption`` the caption, unless the options name other columns).

The rows become shards exactly as ``embedder extract`` writes them (the id index beside each, the
manifest, the errors table), so index, search, probe and inspect work on them. The provenance says
the vectors are external: the model name as the user gives it, weights of kind ``external``, no
text tower — unless the name is an OpenCLIP model (``open_clip:ARCH:TAG``) whose dimension matches:
then the model's own record, text tower included, so ``search --text`` and zero-shot work.

Streamed: Parquet is read ``batch_rows`` at a time page by page (a huge row group is never read
whole), the ``.npy`` through its memory map; a shard is written every ``shard_rows`` rows. Memory
does not grow with the rows read except for the duplicate-id check: 8 bytes of each imported
id's 16-byte digest (``id_index``; its halves mixed) stay in memory as sorted runs (8 bytes per
row, 16 for a moment while two runs merge); a hit there is confirmed on the full digest against the store's id
index before a row is refused.

Every row is accounted for: written, or a failure in the errors table with its reason (a null or
non-finite vector, a null id, an id already imported — the first one wins). Errors that concern
a source as a whole stop the run as one line: a missing column, a vector column that is not a list
of numbers, dims that differ (all before anything is written), a ragged row (when it is reached:
the rows before it are kept, a rerun stops there again).

Resumable: the manifest's run record holds, per source, how many of its rows are done (written or
failed) and which sources are finished; a unit (one shard and its failures) is announced before it
is written and confirmed after, so a run killed in between is reconciled on the next start — the
same command continues where it stopped, never writing a row twice.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import glob
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from embedder.errors import SourceError, StoreError
from embedder.io import location, storage
from embedder.io.uri import filesystem, image_id, is_uri
from embedder.store import id_index
from embedder.store.provenance import Provenance
from embedder.store.shards import ERRORS_SCHEMA, Store, embeddings_to_arrow, row_schema

BATCH_BYTES = 8 << 20  # vectors read at a time (float32): 16,384 rows of 128 values, 1,638 of 1,280
SHARD_BYTES = 32 << 20  # vectors per shard: 65,536 rows of 128 values
MAX_BATCH_ROWS = 32_768
ENGINE = "import"  # the manifest run record's engine
EXTERNAL = "external"  # the default model name, and the weights' kind
MAX_FAILURES_SHOWN = 100
CLIP_ID_COLUMNS = ("key",)
CLIP_PATH_COLUMNS = ("image_path", "url")


@dataclass(frozen=True)
class ImportOptions:
    vector_column: str = "embedding"  # Parquet sources (a clip-retrieval .npy is the vectors)
    id_column: str | None = None  # None: "id" (clip-retrieval: "key") if present, else made from the row's location
    label_column: str | None = None  # None: "label" if present
    # None: "path" (clip-retrieval: "image_path", "url") if present, else the row's location
    path_column: str | None = None
    caption_column: str | None = None  # None: "caption" if present
    model: str = EXTERNAL  # what made the vectors, as the user names it
    weights: str | None = None  # an OpenCLIP model's weights file (its text tower is recorded)
    batch_rows: int | None = None  # None: BATCH_BYTES of float32 vectors (≤ MAX_BATCH_ROWS)
    shard_rows: int | None = None  # None: SHARD_BYTES of float32 vectors

    def sized(self, dim: int) -> ImportOptions:
        """These options with the row counts left open sized for DIM-value vectors."""
        batch = self.batch_rows or max(256, min(MAX_BATCH_ROWS, BATCH_BYTES // (4 * dim)))
        shard = self.shard_rows or max(batch, SHARD_BYTES // (4 * dim))
        return dataclasses.replace(self, batch_rows=batch, shard_rows=shard)


@dataclass
class ImportSummary:
    store: str = ""
    sources: int = 0
    sources_done_before: int = 0  # finished by an earlier run: skipped
    rows: int = 0  # rows read by this run
    imported: int = 0
    duplicates: int = 0  # ids imported before (in this run, an earlier one, or the store)
    non_finite: int = 0  # NaN or inf in the vector
    no_vector: int = 0  # a null vector
    no_id: int = 0  # a null id
    dim: int = 0
    seconds: float = 0.0
    seen_id_bytes: int = 0  # the duplicate check's memory at the end (8 bytes per stored row)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (id or path, reason): the first few

    @property
    def failed(self) -> int:
        return self.duplicates + self.non_finite + self.no_vector + self.no_id

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "failures"}
        d.update(failed=self.failed, rows_per_second=round(self.rows_per_second, 1),
                 failures=[{"id": i, "reason": r} for i, r in self.failures])
        return d


# ---- sources ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class VectorSource:
    """One file of vectors: a Parquet table, or a clip-retrieval ``.npy`` with its metadata table."""

    vectors: str  # its location (what the manifest records)
    metadata: str | None = None  # clip-retrieval: the metadata Parquet whose rows line up with the .npy's

    @property
    def npy(self) -> bool:
        return self.vectors.lower().endswith(".npy")


def _clip_metadata(npy: str) -> str:
    """img_emb/img_emb_N.npy → metadata/metadata_N.parquet (or metadata_N.parquet beside it)."""
    base = storage.name(npy)
    n = base[len("img_emb_"):-len(".npy")] if base.startswith("img_emb_") else None
    if n is None:
        raise SourceError(f"{npy}: a .npy source must be clip-retrieval's img_emb_N.npy (its rows line up "
                          "with metadata_N.parquet)")
    folder = storage.parent(npy)
    candidates = [storage.join(folder, f"metadata_{n}.parquet")]
    if storage.name(folder) == "img_emb":
        candidates.insert(0, storage.join(storage.parent(folder), "metadata", f"metadata_{n}.parquet"))
    for c in candidates:
        if _exists(c):
            return c
    raise SourceError(f"{npy}: no metadata beside it (looked for {' and '.join(candidates)})")


def _exists(loc: str) -> bool:
    try:
        return storage.exists(loc)
    except StoreError as e:
        raise SourceError(str(e)) from None


def _files_under(folder: str) -> list[str]:
    """Every file below FOLDER (a local folder or an object-storage prefix), sorted."""
    if not is_uri(folder):
        out = []
        for d, dirs, files in os.walk(folder):
            dirs[:] = sorted(x for x in dirs if not x.startswith((".", "_")))
            out += [os.path.join(d, f) for f in files if not f.startswith((".", "_"))]
        return sorted(out)
    import pyarrow.fs as pafs

    fs, key = filesystem(folder)
    scheme = folder.partition("://")[0]
    try:
        infos = fs.get_file_info(pafs.FileSelector(key, recursive=True, allow_not_found=True))  # type: ignore[attr-defined]
    except OSError as e:
        raise SourceError(f"cannot list {folder}: {str(e).splitlines()[0][:200]}") from None
    return sorted(f"{scheme}://{i.path}" for i in infos if i.type == pafs.FileType.File
                  and not i.base_name.startswith((".", "_")))


def _is_dir(loc: str) -> bool:
    if not is_uri(loc):
        return os.path.isdir(loc)
    import pyarrow.fs as pafs

    fs, key = filesystem(loc)
    try:
        return bool(fs.get_file_info(key).type == pafs.FileType.Directory)  # type: ignore[attr-defined]
    except OSError as e:
        raise SourceError(f"cannot reach {loc}: {str(e).splitlines()[0][:200]}") from None


def resolve_sources(sources: Sequence[str]) -> list[VectorSource]:
    """SOURCE arguments → vector files, in a stable order. A folder: its clip-retrieval ``.npy`` files
    (with their metadata) if it has any, else its Parquet files."""
    if not sources:
        raise SourceError("no SOURCE given: pass Parquet files of vectors, folders or globs of them, or "
                          "clip-retrieval output (img_emb/ and metadata/)")
    out: list[VectorSource] = []
    for s in sources:
        s = str(s)
        if not is_uri(s):
            s = os.path.abspath(s)
        if _is_dir(s):
            files = _files_under(s)
        elif _exists(s):  # a file first: its name may hold glob characters ("a[1].parquet")
            files = [s]
        elif not is_uri(s) and set("*?[") & set(s):
            files = sorted(f for f in glob.glob(s, recursive=True) if os.path.isfile(f))
            if not files:
                raise SourceError(f"glob {s!r} matched no files")
        else:
            raise SourceError(f"SOURCE {s} does not exist")
        npys = [f for f in files if f.lower().endswith(".npy") and storage.name(f).startswith("img_emb_")]
        if npys or (len(files) == 1 and files[0].lower().endswith(".npy")):
            out += [VectorSource(f, _clip_metadata(f)) for f in (npys or files)]
        else:
            tables = [f for f in files if f.lower().endswith(".parquet")]
            if not tables:
                raise SourceError(f"{s}: no Parquet files of vectors (nor clip-retrieval img_emb_N.npy) in it"
                                  if len(files) != 1 else f"{s} is neither a Parquet file nor an img_emb_N.npy")
            out += [VectorSource(f) for f in tables]
    seen: set[str] = set()
    return [v for v in out if not (v.vectors in seen or seen.add(v.vectors))]  # type: ignore[func-returns-value]


# ---- reading ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Columns:
    """Which column of a source's table is which (None: not in the table)."""

    vector: str | None  # None for a .npy source
    id: str | None
    label: str | None
    path: str | None
    caption: str | None

    def wanted(self) -> list[str]:
        return list(dict.fromkeys(c for c in (self.vector, self.id, self.label, self.path, self.caption) if c))


def _pick(names: list[str], given: str | None, defaults: Sequence[str], what: str, where: str) -> str | None:
    if given is not None:
        if given not in names:
            raise SourceError(f"{where}: no {what} column {given!r}; columns: {', '.join(names)}")
        return given
    return next((d for d in defaults if d in names), None)


def _open_table(loc: str) -> Any:
    try:
        return storage.open_parquet(loc, buffered=True)
    except FileNotFoundError:
        raise SourceError(f"SOURCE {loc} does not exist") from None
    except StoreError as e:
        raise SourceError(str(e)) from None
    except (OSError, pa.ArrowInvalid) as e:
        raise SourceError(f"cannot read {loc} as Parquet: {str(e).splitlines()[0][:200]}") from None


def _vector_dim(pf: Any, column: str, where: str) -> int | None:
    """The vector column's length from its type (fixed_size_list) or its first non-null row; an error
    for a column that is not a list of numbers. None: no non-null row."""
    t = pf.schema_arrow.field(column).type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)):
        raise SourceError(f"{where}: column {column!r} holds {t}, not vectors (a list or fixed-size list of numbers)")
    v = t.value_type
    if not (pa.types.is_integer(v) or pa.types.is_floating(v)):
        raise SourceError(f"{where}: column {column!r} holds lists of {v}, not of numbers")
    if pa.types.is_fixed_size_list(t):
        return int(t.list_size)
    for batch in pf.iter_batches(batch_size=1024, columns=[column]):
        arr = batch.column(0)
        lengths = _lengths(arr)
        ok = np.flatnonzero(~_nulls(arr))
        if len(ok):
            return int(lengths[ok[0]])
    return None


def _nulls(arr: pa.Array) -> np.ndarray:
    if not arr.null_count:
        return np.zeros(len(arr), bool)
    return np.asarray(arr.is_null().to_numpy(zero_copy_only=False), bool)


def _lengths(arr: pa.Array) -> np.ndarray:
    return np.diff(np.asarray(arr.offsets.to_numpy(zero_copy_only=False), np.int64))


def to_matrix(arr: pa.Array, dim: int, where: str, first_row: int) -> tuple[np.ndarray, np.ndarray]:
    """A vector column's batch → (float32 [n, dim], which rows have a vector). Vectorised: one
    flatten, one cast. A row of another length is an error naming it (SOURCE row FIRST_ROW + i)."""
    n = len(arr)
    null = _nulls(arr)
    if not pa.types.is_fixed_size_list(arr.type):
        lengths = _lengths(arr)
        bad = np.flatnonzero((lengths != dim) & ~null)
        if len(bad):
            i = int(bad[0])
            raise SourceError(f"{where}: the vector column is ragged: row {first_row + i} has {lengths[i]} "
                              f"values, the rows before it {dim}")
    elif arr.type.list_size != dim:
        raise SourceError(f"{where}: vectors of {arr.type.list_size} values, the sources before it {dim}")
    values = arr.flatten()  # the non-null rows' values (slicing and null slots taken care of)
    if values.type != pa.float32():
        values = values.cast(pa.float32(), safe=False)
    flat = values.to_numpy(zero_copy_only=False)  # an element null becomes NaN: a non-finite row
    if not null.any():
        return flat.reshape(n, dim), ~null
    out = np.zeros((n, dim), np.float32)
    out[~null] = flat.reshape(-1, dim)
    return out, ~null


@dataclass
class Batch:
    start: int  # the source's row number of the first row
    vectors: np.ndarray  # float32 [n, dim]
    has_vector: np.ndarray  # bool [n]
    ids: pa.Array  # string (nulls: no id)
    labels: pa.Array
    paths: pa.Array
    captions: pa.Array


class SourceReader:
    """One source, read a batch of rows at a time from a row number on (resume)."""

    def __init__(self, src: VectorSource, opts: ImportOptions) -> None:
        self.src, self.opts = src, opts
        self.where = src.vectors
        self.npy: np.ndarray | None = None
        if src.npy:
            if is_uri(src.vectors):
                raise SourceError(f"{src.vectors}: clip-retrieval .npy files are read locally (memory-mapped)")
            try:
                self.npy = np.load(src.vectors, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise SourceError(f"cannot read {src.vectors}: {str(e).splitlines()[0][:200]}") from None
            if self.npy.ndim != 2 or self.npy.dtype.kind not in "fiu":
                raise SourceError(f"{src.vectors}: holds {self.npy.dtype} of shape {self.npy.shape}, not a "
                                  "2-d array of numbers")
            assert src.metadata is not None
            self.table = _open_table(src.metadata)
            self.where = f"{src.metadata}"
            names = self.table.schema_arrow.names
            self.cols = Columns(None, _pick(names, opts.id_column, CLIP_ID_COLUMNS + ("id",), "id", self.where),
                                _pick(names, opts.label_column, ("label",), "label", self.where),
                                _pick(names, opts.path_column, CLIP_PATH_COLUMNS + ("path",), "path", self.where),
                                _pick(names, opts.caption_column, ("caption",), "caption", self.where))
            self.rows = int(self.npy.shape[0])
            meta_rows = int(self.table.metadata.num_rows)
            if meta_rows != self.rows:
                raise SourceError(f"{src.vectors} has {self.rows} rows, its metadata {src.metadata} {meta_rows}: "
                                  "they must line up")
            self.dim: int | None = int(self.npy.shape[1])
        else:
            self.table = _open_table(src.vectors)
            names = self.table.schema_arrow.names
            vec = _pick(names, opts.vector_column, (), "vector", self.where)
            self.cols = Columns(vec, _pick(names, opts.id_column, ("id",), "id", self.where),
                                _pick(names, opts.label_column, ("label",), "label", self.where),
                                _pick(names, opts.path_column, ("path",), "path", self.where),
                                _pick(names, opts.caption_column, ("caption",), "caption", self.where))
            self.rows = int(self.table.metadata.num_rows)
            self.dim = _vector_dim(self.table, opts.vector_column, self.where)

    def batches(self, start: int, dim: int) -> Iterator[Batch]:
        """The rows from START on, ``batch_rows`` at a time."""
        wanted = self.cols.wanted()
        md = self.table.metadata
        group, first = 0, 0  # the row group holding START, and its first row
        while group < md.num_row_groups and first + md.row_group(group).num_rows <= start:
            first += md.row_group(group).num_rows
            group += 1
        if group >= md.num_row_groups:
            return
        at = first
        groups = list(range(group, md.num_row_groups))
        rows_at = self.opts.batch_rows or MAX_BATCH_ROWS
        it = self.table.iter_batches(batch_size=rows_at, row_groups=groups, columns=wanted) if wanted else None
        while at < self.rows:
            if it is not None:
                try:
                    rb = next(it)
                except StopIteration:
                    break
                n = rb.num_rows
            else:  # a .npy with a metadata table holding none of the columns
                n = min(rows_at, self.rows - at)
                rb = pa.record_batch([pa.nulls(n)], names=["_"])
            lo = max(start - at, 0)  # rows before START in the first group are skipped
            if lo >= n:
                at += n
                continue
            rb = rb.slice(lo)
            b0 = at + lo
            at += n
            yield self._batch(rb, b0, dim)

    def locations(self, start: int, n: int) -> pa.Array:
        """Rows START… of the source, located as ``FILE#COLUMN/GROUP/ROW`` (``embedder.io.location``;
        a .npy's rows are one group), built without a Python string per row."""
        import pyarrow.compute as pc

        rows = np.arange(start, start + n, dtype=np.int64)
        if self.npy is not None:
            group = np.zeros(n, np.int64)
        else:
            md = self.table.metadata
            starts = np.cumsum([0] + [md.row_group(g).num_rows for g in range(md.num_row_groups)])[:-1]
            group = np.searchsorted(starts, rows, side="right") - 1
            rows = rows - starts[group]
        prefix = location.row(self.src.vectors, self.cols.vector or "img_emb", 0, 0)[:-len("0/0")]
        return pc.binary_join_element_wise(pa.scalar(prefix), pa.array(group).cast(pa.string()), pa.scalar("/"),
                                           pa.array(rows).cast(pa.string()), "")

    def _batch(self, rb: pa.RecordBatch, start: int, dim: int) -> Batch:
        n = rb.num_rows
        c = self.cols
        if self.npy is not None:
            vectors = np.asarray(self.npy[start:start + n], dtype=np.float32)
            has = np.ones(n, bool)
        else:
            assert c.vector is not None
            vectors, has = to_matrix(rb.column(c.vector), dim, self.where, start)

        def strings(name: str | None) -> pa.Array | None:
            if name is None:
                return None
            col = rb.column(name)
            try:
                return col if col.type == pa.string() else col.cast(pa.string())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise SourceError(f"{self.where}: column {name!r} holds {col.type}, not text or numbers") from None

        ids = strings(c.id)
        paths = strings(c.path)
        if ids is None or paths is None:
            locs = self.locations(start, n)
            if ids is None:  # an id from where the row is (stable however often it is imported)
                ids = pa.array([image_id(s) for s in locs.to_pylist()], pa.string())
            if paths is None:
                paths = locs
        nulls = pa.nulls(n, pa.string())
        return Batch(start, vectors, has, ids, strings(c.label) or nulls, paths, strings(c.caption) or nulls)


# ---- the duplicate-id check ----------------------------------------------------------------
class SeenIds:
    """The ids imported so far, as 8 bytes of their digests (``_hi``): 8 bytes per id. They are
    split by their top byte into 256 buckets (mixed: uniform whatever the ids), each a list of sorted runs merged
    like a binary counter (amortised O(log n) merges per id; a lookup is a binary search per run), so
    a merge's transient copy is at most a bucket's, about 1/256 of the whole. A hit is only a
    candidate: ``Importer`` confirms it on the full digest."""

    BUCKETS = 256

    def __init__(self) -> None:
        self.buckets: list[list[np.ndarray]] = [[] for _ in range(self.BUCKETS)]

    @classmethod
    def _split(cls, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """HI sorted, and where each bucket starts in it (BUCKETS + 1 bounds)."""
        hi = np.sort(hi)
        return hi, np.searchsorted(hi >> np.uint64(56), np.arange(cls.BUCKETS + 1, dtype=np.uint64))

    def add(self, hi: np.ndarray) -> None:
        hi, bounds = self._split(hi)
        for b in np.flatnonzero(np.diff(bounds)):
            runs, run = self.buckets[b], hi[bounds[b]:bounds[b + 1]].copy()
            while runs and len(runs[-1]) <= len(run):
                run = np.sort(np.concatenate([runs.pop(), run]), kind="stable")  # two sorted runs: a merge
            runs.append(run)

    def maybe(self, hi: np.ndarray) -> np.ndarray:
        """For each of HI, whether an id with that prefix was added."""
        order = np.argsort(hi, kind="stable")
        sorted_hi, bounds = self._split(hi)
        hit = np.zeros(len(hi), bool)
        for b in np.flatnonzero(np.diff(bounds)):
            part = sorted_hi[bounds[b]:bounds[b + 1]]
            found = np.zeros(len(part), bool)
            for run in self.buckets[b]:
                pos = np.minimum(np.searchsorted(run, part), len(run) - 1)
                found |= run[pos] == part
            hit[order[bounds[b]:bounds[b + 1]]] = found
        return hit

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for runs in self.buckets for r in runs)


def _hi(d: np.ndarray) -> np.ndarray:
    """8 bytes of each digest for ``SeenIds``: both halves mixed (splitmix64's finaliser), not the
    first 8 bytes: ids of 32 hex characters are their own digest, and zero-padded numbers all share
    those (every row a candidate, each checked against every shard: quadratic)."""
    u = np.ascontiguousarray(d).view(np.uint64).reshape(-1, 2)
    with np.errstate(over="ignore"):
        x = u[:, 0] ^ (u[:, 1] * np.uint64(0x9E3779B97F4A7C15))
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


# ---- provenance ------------------------------------------------------------------------------
def external_provenance(model: str, dim: int, weights: str | None = None) -> Provenance:
    """The record of vectors made elsewhere by MODEL: no weights embedder knows, no preprocessing
    it did, no text tower — or, for an OpenCLIP model name, that model's own record (its text tower
    shares the vectors' space) when its dimension is DIM."""
    from embedder.models.origin import WeightsRef
    from embedder.models.preprocessing import Preprocessing

    if model.startswith("open_clip:"):
        from embedder.embed.batch import BatchEmbedder
        from embedder.embed.options import EmbedOptions
        from embedder.models.builder import spec_for

        prov = BatchEmbedder(spec_for(model, weights, None, None, None), EmbedOptions(device="cpu")).provenance()
        if prov.dim != dim:
            raise SourceError(f"--model {model} makes {prov.dim}-d vectors; these are {dim}-d")
        return prov
    if weights is not None:
        raise SourceError(f"--weights is for an OpenCLIP --model (open_clip:ARCH:TAG), not {model!r}")
    import platform

    from embedder._version import __version__

    versions = {"embedder": __version__, "pyarrow": pa.__version__, "numpy": np.__version__,
                "python": platform.python_version()}
    return Provenance(
        backbone=model, weights=WeightsRef(EXTERNAL, model, EXTERNAL), layer=EXTERNAL, pool=EXTERNAL,
        preprocessing=Preprocessing(0, 0, EXTERNAL, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), dim=dim,
        decoder=EXTERNAL, precision="fp32", normalize="none", dtype="float32", versions=versions,
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), text=None)


def is_imported(prov: Provenance) -> bool:
    """Whether a store's vectors were imported (made elsewhere, no image model embedder can run)."""
    return prov.weights.kind == EXTERNAL


# ---- the run ---------------------------------------------------------------------------------
def _previous_state(store: Store) -> tuple[dict[str, int], set[str], dict[str, Any] | None]:
    """From the store's import run records: rows done per source, finished sources, and the last
    run's unit in flight (announced, maybe not written)."""
    done: dict[str, int] = {}
    finished: set[str] = set()
    pending = None
    for r in store.manifest().get("runs", []):
        if r.get("engine") != ENGINE:
            continue
        for src, n in (r.get("rows_done") or {}).items():
            done[src] = max(done.get(src, 0), int(n))
        finished |= set(r.get("finished") or [])
        pending = r.get("pending")
    return done, finished, pending


def _reconcile(store: Store, pending: dict[str, Any], done: dict[str, int]) -> None:
    """A unit announced by a killed run: written (its shard is there) → its rows are done; not
    written → its failures (written before the shard) are removed, and it is done again."""
    last = pending.get("last_error_file")
    errs = store.error_files()
    if pending.get("rows"):
        written = len(store.shard_files()) > int(pending["shards_before"])
    else:  # failures only: written when an error file newer than the last one before is there
        written = not pending.get("errors") or bool(errs and (last is None or storage.name(errs[-1]) > last))
    if written:
        for src, end in pending["ends"].items():
            done[src] = max(done.get(src, 0), int(end))
        return
    for f in errs:
        if last is None or storage.name(f) > last:
            storage.delete(f)


class Importer:
    def __init__(self, store: Store, provenance: Provenance, opts: ImportOptions, summary: ImportSummary,
                 run: dict[str, Any]) -> None:
        self.store, self.provenance, self.opts, self.summary, self.run = store, provenance, opts, summary, run
        self.seen = SeenIds()
        for shard in store.shard_files():
            self.seen.add(_hi(np.asarray(id_index.load(shard))))
        self.parts: list[pa.Table] = []
        self.part_digests: list[np.ndarray] = []
        self.rows = 0
        self.errors: list[pa.Table] = []
        self.ends: dict[str, int] = {}  # per source, the row the buffered unit reaches

    def fail(self, b: Batch, rows: np.ndarray, reason: str) -> None:
        if not len(rows):
            return
        sel = pa.array(rows)
        ids = b.ids.take(sel)
        self.errors.append(pa.table({
            "id": ids, "path": b.paths.take(sel), "reason": pa.array([reason] * len(rows), pa.string()),
            "time": pa.array([dt.datetime.now(dt.UTC)] * len(rows), pa.timestamp("s", tz="UTC"))}))
        shown = self.summary.failures
        for i in ids.to_pylist()[:max(MAX_FAILURES_SHOWN - len(shown), 0)]:
            shown.append((str(i), reason))

    def add(self, src: str, b: Batch) -> None:
        n = len(b.vectors)
        s = self.summary
        s.rows += n
        finite = np.isfinite(b.vectors).all(axis=1)
        no_vec = np.flatnonzero(~b.has_vector)
        bad = np.flatnonzero(b.has_vector & ~finite)
        id_null = _nulls(b.ids)
        no_id = np.flatnonzero(b.has_vector & finite & id_null)
        self.fail(b, no_vec, "no vector (null)")
        self.fail(b, bad, "vector holds NaN or inf")
        self.fail(b, no_id, "no id (null)")
        s.no_vector += len(no_vec)
        s.non_finite += len(bad)
        s.no_id += len(no_id)
        ok = np.flatnonzero(b.has_vector & finite & ~id_null)
        d = id_index.digests(b.ids.take(pa.array(ok))) if len(ok) else np.empty(0, id_index.DIGEST)
        # the first of equal ids in the batch
        _, first = np.unique(d, return_index=True)
        keep = np.zeros(len(ok), bool)
        keep[first] = True
        # ids imported before: a hit on the 8-byte prefix, confirmed on the full digest
        cand = np.flatnonzero(keep & self.seen.maybe(_hi(d)))
        if len(cand):
            held = np.zeros(len(cand), bool)
            if self.part_digests:
                held |= np.isin(d[cand], np.concatenate(self.part_digests))
            held |= id_index.contains_digests(self.store.shard_files(), d[cand])
            keep[cand[held]] = False
        dup = ok[~keep]
        self.fail(b, dup, "duplicate id: an earlier row has it (the first one is kept)")
        s.duplicates += len(dup)
        rows, d = ok[keep], d[keep]
        if len(rows):
            self.seen.add(_hi(d))
            self.part_digests.append(d)
            sel = pa.array(rows)
            self.parts.append(pa.Table.from_arrays([
                b.ids.take(sel), b.paths.take(sel), b.labels.take(sel),
                embeddings_to_arrow(b.vectors if len(rows) == n else b.vectors[rows], "float32"),
                pa.nulls(len(rows), pa.int32()), pa.nulls(len(rows), pa.int32()),
                pa.nulls(len(rows), pa.string()), b.captions.take(sel)],
                schema=row_schema(self.provenance.dim, "float32")))
            self.rows += len(rows)
            s.imported += len(rows)
        self.ends[src] = b.start + n
        limit = self.opts.shard_rows or 1
        if self.rows >= limit or sum(len(e) for e in self.errors) >= limit:
            self.flush()

    def flush(self, finished: str | None = None) -> None:
        """Write the buffered unit: announce it in the manifest, write its failures, then its shard,
        then record its rows as done (see ``_reconcile`` for a run killed in between)."""
        store, run = self.store, self.run
        if self.ends:
            errs = store.error_files()
            run["pending"] = {"ends": dict(self.ends), "rows": self.rows, "errors": sum(len(e) for e in self.errors),
                              "shards_before": len(store.shard_files()),
                              "last_error_file": storage.name(errs[-1]) if errs else None}
            store.update_manifest(run, [], now=True)
            if self.errors:
                store.write_errors(pa.concat_tables(self.errors).cast(ERRORS_SCHEMA))
            added = []
            if self.rows:
                table = pa.concat_tables(self.parts)
                added.append((storage.name(store.write_shard(table, self.provenance)), table.num_rows))
            run["rows_done"].update(self.ends)
            run["pending"] = None
            self.parts, self.part_digests, self.errors, self.rows, self.ends = [], [], [], 0, {}
        else:
            added = []
        if finished is not None:
            run["finished"].append(finished)
        s = self.summary
        run.update(imported=s.imported, failed=s.failed, rows=s.rows, seconds=round(s.seconds, 2))
        store.update_manifest(run, added, now=True)


def import_vectors(sources: Sequence[str], out: str, opts: ImportOptions = ImportOptions()) -> ImportSummary:
    """Import the vectors under SOURCES into the store at OUT (created, or continued: a rerun after
    an interruption goes on where the last one stopped; sources finished before are skipped)."""
    t0 = time.perf_counter()
    if (opts.batch_rows is not None and opts.batch_rows < 1) or (opts.shard_rows is not None and opts.shard_rows < 1):
        raise SourceError("batch_rows and shard_rows must be at least 1")
    srcs = resolve_sources(sources)
    readers = [SourceReader(s, opts) for s in srcs]  # every column checked before anything is written
    dims = {r.where: r.dim for r in readers if r.dim is not None}
    if not dims:
        raise SourceError(f"no vectors in {', '.join(s.vectors for s in srcs)} "
                          "(no rows, or every row's vector is null)")
    if len(set(dims.values())) > 1:
        (one, d1), (other, d2) = next(iter(dims.items())), next((k, v) for k, v in dims.items()
                                                               if v != next(iter(dims.values())))
        raise SourceError(f"the sources' vectors differ in length: {one} has {d1}, {other} has {d2}")
    dim = next(iter(dims.values()))
    if dim < 1:
        raise SourceError(f"{next(iter(dims))}: its vectors hold no values (0-d)")
    opts = opts.sized(dim)
    for r in readers:
        r.opts = opts
    provenance = external_provenance(opts.model, dim, opts.weights)
    summary = ImportSummary(store=str(out), sources=len(srcs), dim=dim)
    with Store.writer(out, provenance) as store:
        summary.store = store.root
        done, finished, pending = _previous_state(store)
        if pending:
            _reconcile(store, pending, done)
        run: dict[str, Any] = {
            "run_id": uuid.uuid4().hex[:12], "engine": ENGINE,
            "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "imported_from": [s.vectors for s in srcs], "model": opts.model,
            "device": "none (imported)", "precision": "fp32",
            "rows_done": dict(done), "finished": sorted(finished), "pending": None}
        imp = Importer(store, provenance, opts, summary, run)
        for r in readers:
            name = r.src.vectors
            if name in finished:
                summary.sources_done_before += 1
                continue
            try:
                for b in r.batches(done.get(name, 0), dim):
                    imp.add(name, b)
                    summary.seconds = time.perf_counter() - t0
            finally:
                summary.seconds = time.perf_counter() - t0
                imp.flush()
            imp.flush(finished=name)
        summary.seen_id_bytes = imp.seen.nbytes
        summary.seconds = time.perf_counter() - t0
        run.update(finished_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
        imp.flush()
    return summary

"""An index ready to search: the FAISS object, its id map and metadata, filters, re-ranking, and hot
reload of new generations."""

from __future__ import annotations

import functools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from embedder.errors import IndexError_, ProvenanceMismatch, StoreError, shown
from embedder.index import generations as gens
from embedder.index.faiss_util import exact_index, import_faiss, prepare_rows, set_search_param, to_score
from embedder.index.generations import IDS_FILE, INDEX_FILE, VECTORS_FILE, locate, read_meta
from embedder.index.quality import Searcher
from embedder.io import storage
from embedder.store import id_index
from embedder.store.provenance import Provenance
from embedder.store.shards import Store, arrow_to_embeddings

log = logging.getLogger(__name__)

MAX_DISTINCT = 65_536  # a column with more values gets no selector: it is matched per query
SELECTOR_BATCH = 65_536  # rows per record batch while selectors are built


@dataclass(frozen=True)
class Selector:
    """The FAISS ids of each value of one low-cardinality column: those of the value numbered
    ``values[v]`` are ``fids[offsets[i]:offsets[i + 1]]``, sorted (4 bytes a row with a value, 8
    beyond 2³¹ FAISS ids)."""

    values: dict[str, int]
    offsets: np.ndarray
    fids: np.ndarray

    def ids(self, value: str) -> np.ndarray:
        i = self.values.get(value)
        if i is None:
            return np.empty(0, np.int64)
        return np.asarray(self.fids[self.offsets[i]:self.offsets[i + 1]], np.int64)

    @property
    def nbytes(self) -> int:
        return int(self.offsets.nbytes + self.fids.nbytes)


class _Collect:
    """One column's (value number, FAISS id) pairs, batch by batch, until ``finish`` sorts them into
    a ``Selector``: 2 + 4 (or 8) bytes a row while collected, 4 (or 8) more while sorted. ``add`` is
    False once the column has more than MAX_DISTINCT values (what it held is dropped)."""

    def __init__(self, fid_dtype: type[np.integer[Any]]) -> None:
        self.codes: dict[str, int] = {}
        self.parts: list[tuple[np.ndarray, np.ndarray]] = []
        self.fid_dtype = fid_dtype

    def add(self, values: pa.Array, fids: np.ndarray) -> bool:
        if values.type != pa.string():
            values = pc.cast(values, pa.string())  # compared as text, as filters are
        enc = pc.dictionary_encode(values)
        local = enc.dictionary.to_pylist()
        remap = np.fromiter((self.codes.setdefault(v, len(self.codes)) for v in local), np.int64, len(local))
        if len(self.codes) > MAX_DISTINCT:
            self.parts = []
            return False
        keep = fids >= 0  # rows of the store the index does not hold match nothing
        if enc.null_count:  # a null matches no value
            keep &= np.asarray(enc.indices.is_valid().to_numpy(zero_copy_only=False), bool)
        idx = np.asarray(enc.indices.fill_null(0).to_numpy(zero_copy_only=False), np.int64)
        self.parts.append((remap[idx[keep]].astype(np.uint16), fids[keep].astype(self.fid_dtype)))
        return True

    def finish(self) -> Selector:
        """The selector: each batch's pairs placed straight into their value's run of one array
        (a counting sort, batch by batch: no argsort of every row), each run sorted where the
        batches' FAISS ids were not already ascending."""
        parts: list[Any] = self.parts
        self.parts = []
        counts = np.zeros(len(self.codes), np.int64)
        for c, _ in parts:
            counts += np.bincount(c, minlength=len(self.codes))
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        fids = np.empty(int(offsets[-1]), self.fid_dtype)
        cursor = offsets[:-1].copy()
        ascending, last = True, -1
        for i in range(len(parts)):
            c, f = parts[i]
            parts[i] = None  # freed as it is placed
            if not len(c):
                continue
            o = np.argsort(c, kind="stable")
            cs, fs = c[o], f[o]
            starts = np.flatnonzero(np.r_[True, cs[1:] != cs[:-1]])
            first = np.repeat(starts, np.diff(np.r_[starts, len(cs)]))
            fids[cursor[cs] + (np.arange(len(cs)) - first)] = fs
            cursor += np.bincount(c, minlength=len(self.codes))
            ascending = ascending and int(f[0]) > last and bool((np.diff(f) > 0).all())
            last = int(f[-1])
        if not ascending:
            for v in range(len(counts)):
                fids[offsets[v]:offsets[v + 1]].sort()
        return Selector(dict(self.codes), offsets, fids)


def _as_text(value: Any) -> str:
    """A filter's value as the text a column's values are compared with (Arrow's casts)."""
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _equals(field: Any, type_: pa.DataType, value: str) -> Any:
    """A dataset expression: FIELD (of TYPE) equals VALUE compared as text. Typed where VALUE is what
    Arrow writes for a value of TYPE (row-group statistics can then rule row groups out), cast to
    text otherwise ("048" matches no 48, as a comparison of text would not)."""
    try:
        typed = pa.scalar(value).cast(type_)
        if pc.cast(typed, pa.string()).as_py() == value:
            return field == typed
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        pass
    return field.cast(pa.string()) == value


def shaped(row: dict[str, Any], extras: list[str]) -> dict[str, Any]:
    """An id-map ROW as a hit or an item shows it: its fixed fields, then ``caption`` and ``key`` where
    the index keeps them, and the user's other kept columns (EXTRAS) under ``columns``."""
    from embedder.index.stream import ON_HITS

    out = {c: v for c, v in row.items() if c not in extras}
    out.update({c: row[c] for c in extras if c in ON_HITS})
    more = {c: row[c] for c in extras if c not in ON_HITS}
    if more:
        out["columns"] = more
    return out


def without_item(hits: list[dict[str, Any]], item_id: str, k: int) -> list[dict[str, Any]]:
    """HITS without the query item ITEM_ID (an id query's own row, found first), re-ranked, at most K:
    searched with k + 1 (the CLI's ``--exclude-self``, the service's ``exclude_self``)."""
    return [dict(h, rank=r) for r, h in enumerate((h for h in hits if h["id"] != item_id), 1)][:k]


class LoadedIndex:
    """An index ready to search: FAISS object, id map and metadata."""

    def __init__(self, name: str, index_home: str | None = None) -> None:
        for attempt in range(3):  # a writer may retire the generation while we open it
            try:
                self._open(name, index_home)
                return
            except FileNotFoundError:
                if attempt == 2:
                    raise IndexError_(f"index {name!r} kept changing while being opened; try again") from None

    def _open(self, name: str, index_home: str | None) -> None:
        faiss = import_faiss()
        self.dir = locate(name, index_home)
        self.meta = read_meta(self.dir, name)
        if not (self.dir / INDEX_FILE).is_file():
            raise FileNotFoundError(self.dir / INDEX_FILE)
        on_disk = bool(self.meta.get("on_disk"))
        try:
            deltas = self.meta.get("deltas") or []  # on-disk adds not merged yet (bigindex: delta slices)
            self._keepalive: list[Any] = []
            if on_disk:
                from embedder.index.ondisk import TRAINED_FILE as big_trained
                from embedder.index.ondisk import read_ondisk, stack_deltas

                if deltas:  # searched with the lists as one set of inverted lists
                    self.index, self._keepalive = stack_deltas(
                        str(self.dir / INDEX_FILE), str(self.dir / big_trained),
                        [str(self.dir / x["index"]) for x in deltas])
                else:
                    self.index = read_ondisk(str(self.dir / INDEX_FILE))  # lists memory-mapped from disk
            else:
                self.index = faiss.read_index(str(self.dir / INDEX_FILE))
            id_map = self.meta.get("id_map", IDS_FILE)
            if id_map == IDS_FILE:
                self.ids = pq.read_table(self.dir / IDS_FILE)
            else:  # Arrow IPC files, memory-mapped: the id map of a huge index is not read into RAM
                self.ids = pa.concat_tables([pa.ipc.open_file(pa.memory_map(str(self.dir / f))).read_all()
                                             for f in [id_map, *(x["ids"] for x in deltas)]])
        except FileNotFoundError:
            raise  # a writer retired this generation while we opened it: the caller tries again
        except (RuntimeError, OSError, pa.ArrowInvalid) as e:
            raise IndexError_(f"index {name!r} is corrupt or unreadable ({str(e).splitlines()[0]}); "
                              f"rebuild it with `embedder index drop {name}` then `index build`") from None
        if self.index.ntotal != self.ids.num_rows or self.index.d != self.meta["dim"]:
            raise IndexError_(f"index {name!r} is inconsistent: {self.index.ntotal} vectors, "
                              f"{self.ids.num_rows} ids; rebuild it")
        search = self.meta.get("search", {})
        set_search_param(self.index, search.get("param"), search.get("value"))
        vectors = None
        if self.meta.get("rerank") or self.meta.get("vectors"):
            try:
                vectors = np.load(self.dir / VECTORS_FILE, mmap_mode="r")
                if deltas:
                    from embedder.index.ondisk import RowStack

                    vectors = RowStack([vectors, *(np.load(self.dir / x["vectors"], mmap_mode="r") for x in deltas)])
            except FileNotFoundError:
                raise
            except (OSError, ValueError) as e:
                raise IndexError_(f"index {name!r}: cannot map {VECTORS_FILE} ({e}); rebuild it") from None
            if vectors.shape != (int(self.meta["next_id"]), self.meta["dim"]):
                raise IndexError_(f"index {name!r}: {VECTORS_FILE} does not match the index; rebuild it")
        self.lookup_vectors = vectors  # float16 copies by FAISS id (memory-mapped), when the index has them
        self.searcher = Searcher(self.index, self.meta["metric"], vectors if self.meta.get("rerank") else None)
        self.name = name
        # FAISS id → id-map row: the identity for streamed builds (FAISS id = store row = map row);
        # otherwise vectorised through sorted ids + searchsorted, built once per load.
        self._identity = self.meta.get("id_map") == "ids.arrow"
        self._fid_of_row: np.ndarray | None = None
        if not self._identity:
            fids = np.asarray(self.ids.column("faiss_id").to_numpy(), dtype=np.int64)
            self._fid_of_row = fids
            self._order = np.argsort(fids, kind="stable")
            self._sorted_fids = fids[self._order]
        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is not None and self.lookup_vectors is None:
            # vectors by id (queries by id, exact fallback), set up at load, never mid-search; a hash
            # table because ids are not 0..n-1 in add order (held-out queries go in last)
            ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
        # lookups by id: the id map's 16-byte digests (embedder.store.id_index) in lookup order and the
        # id-map row of each, made once per loaded generation (``prepare_lookups``, by the service's
        # loader) or on the first lookup by id (the CLI, the Python API)
        self._id_digests: np.ndarray | None = None
        self._id_order: np.ndarray | None = None
        self._id_chunks: np.ndarray | None = None  # where each chunk of the id column starts
        self._selectors: dict[str, Selector] = {}  # low-cardinality columns: value → FAISS ids
        self._filter_cols: list[str] | None = None
        self._filter_lock = threading.Lock()
        self.generation = int(self.meta.get("generation", 0))
        self.identity = gens.identity(self.dir)  # what a reload compares (numbers restart after a drop)
        from embedder.index.stream import FIXED_COLUMNS, STORE_COLUMNS

        # the id map's columns beyond the fixed ones: caption, key, the user's (``index build --keep-columns``)
        self.extras = [c for c in self.ids.column_names if c not in FIXED_COLUMNS]
        # what filters match in the id map: copies of the store's columns (caption…) are still matched
        # in the store, as before they were copied (a filter answers as a join with the store does)
        self._in_map = [c for c in self.ids.column_names if c not in STORE_COLUMNS or c not in self.extras]

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @functools.cached_property
    def provenance(self) -> Provenance:  # parsed once per loaded index (the service asks per query)
        return Provenance.from_dict(self.meta["provenance"])

    @property
    def metric(self) -> str:
        return str(self.meta["metric"])

    def prepare(self, q: np.ndarray) -> np.ndarray:
        """Query vectors checked and made ready for this index's metric: of its dim, finite (FAISS ranks
        NaN arbitrarily), and, where the metric ranks by direction (cosine, ip), never all zeros (every
        item would tie). Every query path (CLI, API, service) comes through here."""
        q = np.atleast_2d(np.asarray(q, dtype=np.float32))
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise IndexError_(f"query vector has dim {q.shape[-1]}, index {self.name!r} has dim {self.dim}")
        which = lambda rows: "" if len(q) == 1 else f" {int(rows[0])}"  # noqa: E731
        bad = np.flatnonzero(~np.isfinite(q).all(1))
        if len(bad):
            raise IndexError_(f"query vector{which(bad)} holds NaN or infinite values: give finite numbers")
        if self.metric in ("cosine", "ip"):
            zero = np.flatnonzero(~q.any(1))
            if len(zero):
                raise IndexError_(f"query vector{which(zero)} is all zeros: it has no direction to search by "
                                  f"(index {self.name!r} ranks by {self.metric})")
        if self.metric == "cosine":  # only the direction counts: scaled first, a huge vector normalises
            q = q / np.abs(q).max(axis=1, keepdims=True)
        else:  # distances and products in float32: a vector whose squared norm overflows ranks nothing
            sq = np.einsum("ij,ij->i", q.astype(np.float64), q.astype(np.float64))
            huge = np.flatnonzero(sq > np.finfo(np.float32).max / 4)
            if len(huge):
                raise IndexError_(f"query vector{which(huge)} is too large (norm {np.sqrt(sq[huge[0]]):.3g}): "
                                  f"its {self.metric} scores overflow float32")
        return prepare_rows(q, self.metric)

    def require_addable(self, prov: Provenance, store_path: str) -> None:
        """Refuse to add vectors made otherwise than the indexed ones (``ProvenanceMismatch``): another
        model, and, where the index ranks raw vectors (l2, ip), another normalisation (unit vectors
        among unnormalised ones would rank by their norm). Cosine normalises both, so there it is
        harmless; a float16 store beside float32 rows differs by rounding only."""
        fix = f"{store_path} was embedded differently; build a new index for it"
        self.provenance.require(prov, store=False, what=f"index {self.name!r} holds vectors", fix=fix)
        if self.metric != "cosine" and prov.normalize != self.provenance.normalize:
            raise ProvenanceMismatch(
                f"index {self.name!r} ranks vectors made with normalize={self.provenance.normalize} by "
                f"{self.metric}; {store_path} holds normalize={prov.normalize} vectors, and mixing them would "
                "change the ranking: build a new index for it (or build both with --metric cosine)")

    # ---- filters and lookups by id ------------------------------------------------------------
    # Per loaded generation, made by ``prepare_lookups`` (the service's loader thread, never a
    # request): the id order (from the ids' 16-byte digests) and, for every column a filter may name
    # whose values are few (≤ MAX_DISTINCT: label, width, split…), a selector: value → sorted FAISS
    # ids, from one streamed pass over the id map and one over the store's other columns (never the
    # store in one table). A column with more values (path, file_hash, caption) is matched per query:
    # the id map's column scanned, or the store read with the condition pushed down to Parquet
    # (row-group statistics; only the id column of matching rows kept). The CLI and the Python API
    # build no selectors and match every condition that way.

    def prepare_lookups(self, selectors: bool = True) -> None:
        """The id order and (SELECTORS) the per-value selectors of this generation, built now. Memory:
        20-24 bytes a row for the id order (the digest, 16, and the row, 4 or 8), and 4 bytes a row
        per low-cardinality column (8 beyond 2³¹ FAISS ids) for the selectors."""
        self._ensure_id_order()
        cols = self.filter_columns()
        if not selectors:
            return
        t0 = time.perf_counter()
        wide = int(self.meta.get("next_id", self.index.ntotal)) >= 2**31
        collect = {c: _Collect(np.int64 if wide else np.int32) for c in cols if c != "id"}
        in_map = [c for c in collect if c in self._in_map]
        high: list[str] = []
        for rb in self.ids.select(["faiss_id", *in_map]).to_batches(max_chunksize=SELECTOR_BATCH):
            fids = np.asarray(rb.column(0).to_numpy(zero_copy_only=False), np.int64)
            for c in [c for c in in_map if c in collect]:
                if not collect[c].add(rb.column(c), fids):
                    del collect[c]
                    high.append(c)
        in_store = [c for c in collect if c not in in_map]
        if in_store:
            try:
                self._store_pass(in_store, collect, high)
            except StoreError as e:  # matched per query instead (and said so there, if it persists)
                log.warning("index %s: no selectors for store columns %s (%s)", self.name, in_store, e)
                for c in in_store:
                    collect.pop(c, None)
        self._selectors = {c: b.finish() for c, b in collect.items()}
        log.info("index %s: selectors for %s (%.1f MiB) in %.2f s; matched per query: %s", self.name,
                 sorted(self._selectors), sum(s.nbytes for s in self._selectors.values()) / 2**20,
                 time.perf_counter() - t0, [c for c in cols if c not in self._selectors] or "none")

    def selector(self, column: str) -> Selector | None:
        """COLUMN's selector, where ``prepare_lookups`` made one."""
        return self._selectors.get(column)

    def _store_pass(self, cols: list[str], collect: dict[str, _Collect], high: list[str]) -> None:
        """COLS of the store (not in the id map), read shard by shard, record batch by record batch
        (only those columns and the id), into their selectors; each row's FAISS id found through
        its id's digest. A column that turns out to have too many values is dropped as it does."""
        store = Store.open(self.meta["store"])
        start = 0
        try:
            for shard in store.shard_files():
                f = storage.open_parquet(shard, buffered=True)
                live = [c for c in cols if c in collect and c in f.schema_arrow.names]
                if not live:
                    start += f.metadata.num_rows
                    continue
                for rb in f.iter_batches(batch_size=SELECTOR_BATCH, columns=["id", *live]):
                    fids = self._fids_of(rb.column("id"), start)
                    start += rb.num_rows
                    for c in [c for c in live if c in collect]:
                        if not collect[c].add(rb.column(c), fids):
                            del collect[c]
                            high.append(c)
        except (pa.ArrowInvalid, OSError) as e:
            raise StoreError(f"{store.root}: cannot read shards ({str(e).splitlines()[0]})") from None

    def filter_columns(self) -> list[str]:
        """Columns a filter may name, without reading the store (its schema is enough); read once
        per loaded index (`GET /indexes/NAME` asks per request)."""
        if self._filter_cols is not None:
            return list(self._filter_cols)
        cols = [c for c in self.ids.column_names if c != "faiss_id" and c not in self.extras]
        try:
            store = Store.open(self.meta["store"])
            cols += [c for c in store.dataset().schema.names if c not in ("embedding", *cols)]
        except StoreError:
            pass
        cols += [c for c in self.extras if c not in cols]  # key, the user's kept columns
        self._filter_cols = cols
        return list(cols)

    def allowed_faiss_ids(self, where: dict[str, str]) -> np.ndarray:
        """FAISS ids (sorted) whose store rows match every column=value condition (values compared
        as text, as Arrow casts them)."""
        cols = self.filter_columns()
        missing = [c for c in where if c not in cols]
        if missing:
            raise IndexError_(f"cannot filter on {missing[0]!r}; columns: {', '.join(cols)}")
        out: np.ndarray | None = None
        for col, value in where.items():
            ids = self._matching(col, _as_text(value))
            out = ids if out is None else np.intersect1d(out, ids, assume_unique=True)
            if not len(out):
                break
        return out if out is not None else np.arange(self.index.ntotal, dtype=np.int64)

    def _matching(self, col: str, value: str) -> np.ndarray:
        """The sorted FAISS ids whose COL is VALUE."""
        sel = self._selectors.get(col)
        if sel is not None:
            return sel.ids(value)
        if col == "id":
            row = self.row_of(value)
            return np.empty(0, np.int64) if row is None else self._fids_at(np.array([row]))
        if col in self._in_map:  # a column of the id map with many values: scanned
            fids = self.ids.column("faiss_id").filter(pc.equal(pc.cast(self.ids.column(col), pa.string()), value))
            return np.sort(np.asarray(fids.to_numpy(), np.int64))
        return self._store_scan(col, value)

    def _store_scan(self, col: str, value: str) -> np.ndarray:
        """The store's rows whose COL is VALUE, read with the condition pushed down to Parquet
        (row groups whose statistics rule it out are skipped), only their ids kept; mapped to FAISS
        ids through the id order when it is made, else by one scan of the id map's ids."""
        import pyarrow.dataset as ds

        try:
            store = Store.open(self.meta["store"])
            dataset = store.dataset()
            expr = _equals(ds.field(col), dataset.schema.field(col).type, value)
            found: list[np.ndarray] = []
            asked: list[pa.Array] = []
            for rb in dataset.to_batches(columns=["id"], filter=expr, batch_readahead=2, fragment_readahead=1):
                if not rb.num_rows:
                    continue
                if self._id_order is not None:
                    fids = self._fids_of(rb.column(0))
                    found.append(fids[fids >= 0])
                else:
                    asked.append(rb.column(0))
        except StoreError as e:
            raise IndexError_(f"cannot filter on {col!r}: {e}") from None
        except (pa.ArrowInvalid, OSError) as e:
            raise IndexError_(f"cannot filter on {col!r}: the store is unreadable "
                              f"({str(e).splitlines()[0]})") from None
        if asked:
            ids = self.ids.column("id")
            hit = pc.is_in(ids, value_set=pa.concat_arrays([a.cast(ids.type) for a in asked]))
            rows = np.flatnonzero(np.asarray(hit.to_numpy(zero_copy_only=False), bool))
            found.append(self._fids_at(rows))
        return np.unique(np.concatenate(found)) if found else np.empty(0, np.int64)

    def _fids_at(self, rows: np.ndarray) -> np.ndarray:
        """FAISS ids of id-map ROWS."""
        rows = np.asarray(rows, np.int64)
        return rows if self._fid_of_row is None else self._fid_of_row[rows]

    def _fids_of(self, ids: pa.Array | pa.ChunkedArray, start: int | None = None) -> np.ndarray:
        """For each id, its FAISS id, or -1 where the index does not hold it (the id order's
        digests: vectorised, no id becomes a Python string). START: the ids' first store row, where
        they are a run of the store's rows: an index whose FAISS id is the id-map row (a streamed
        build) holds most of them at those very rows (FAISS id = store row), which one comparison
        of the ids confirms; only the others are looked up."""
        if start is not None and self._identity and start < self.ids.num_rows:
            m = min(len(ids), self.ids.num_rows - start)
            same = pc.equal(ids.slice(0, m), self.ids.column("id").slice(start, m).cast(ids.type))
            fids = np.full(len(ids), -1, np.int64)
            hit = np.asarray(same.fill_null(False).to_numpy(zero_copy_only=False), bool)
            fids[:m][hit] = np.arange(start, start + m, dtype=np.int64)[hit]
            rest = np.flatnonzero(fids < 0)
            if len(rest):
                fids[rest] = self._fids_of(ids.take(pa.array(rest)))
            return fids
        digests, order = self._ensure_id_order()
        pos = id_index.find(digests, id_index.digests(ids))
        rows = np.where(pos >= 0, order[np.maximum(pos, 0)], -1).astype(np.int64)
        if self._fid_of_row is None:
            return rows
        return np.where(rows >= 0, self._fid_of_row[np.maximum(rows, 0)], -1)

    def search(self, q: np.ndarray, k: int, where: dict[str, str] | None = None) -> list[list[dict[str, Any]]]:
        """k nearest per query. With ``where``, still k results whenever k rows match: the search
        parameter is widened for selective filters, and exact search over the matching rows is the
        last resort. Never silently fewer."""
        if k <= 0:
            raise IndexError_(f"k must be positive, got {k}")
        q = self.prepare(q)
        kk = min(k, self.index.ntotal)
        if not where:
            scores, ids = self.searcher.search(q, kk)
            return self._hits(scores, ids)
        allowed = self.allowed_faiss_ids(where)
        need = min(kk, len(allowed))
        if need == 0:
            return [[] for _ in range(len(q))]
        sel = self._selector_of(allowed)
        for scale in (1, 8, 64, 512):
            params = self._params_with(sel, scale, need)  # per call: concurrent searches share nothing
            try:
                scores, ids = self.searcher.search(q, need, params=params)
            except RuntimeError:  # this index type takes no selector: exact over the matches
                break
            if (ids >= 0).sum(1).min() >= need:
                return self._hits(scores, ids)
        return self._exact_among(q, allowed, need)

    def _selector_of(self, allowed: np.ndarray) -> Any:
        """A FAISS selector of ALLOWED: a bitmap over every FAISS id (one bit each) where that is
        smaller than a hash set of them (~40 bytes an id, built per query), else the set."""
        faiss = import_faiss()
        top = int(self.meta.get("next_id", self.index.ntotal))
        if len(allowed) * 40 > top // 8 and len(allowed) and int(allowed[-1]) < top:
            bitmap = np.zeros((top + 7) // 8, np.uint8)
            np.bitwise_or.at(bitmap, allowed >> 3, (1 << (allowed & 7)).astype(np.uint8))
            sel = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))
            sel.bitmap_ref = bitmap  # FAISS holds a raw pointer: the array lives as long as the selector
            return sel
        return faiss.IDSelectorBatch(allowed)

    def _vectors_of(self, fids: np.ndarray) -> np.ndarray:
        """Vectors for FAISS ids: the re-rank copies, the index itself, or the store on disk."""
        if self.lookup_vectors is not None:
            return np.asarray(self.lookup_vectors[np.sort(fids)], dtype=np.float32)[np.argsort(np.argsort(fids))]
        try:
            return np.asarray(self.index.reconstruct_batch(fids), dtype=np.float32)
        except RuntimeError:
            pass
        sub = self.ids.take(pa.array(self.rows_of(fids)))
        t = Store.open(self.meta["store"]).read(["id", "embedding"])
        pos = pc.index_in(sub.column("id"), value_set=t.column("id"))
        if pos.null_count:
            raise IndexError_(f"index {self.name!r}: some vectors are neither in the index nor in its "
                              "store; rebuild the index")
        x = arrow_to_embeddings(t.column("embedding").take(pos))
        return prepare_rows(x, self.metric)

    def _exact_among(self, q: np.ndarray, allowed: np.ndarray, k: int) -> list[list[dict[str, Any]]]:
        x = self._vectors_of(allowed)
        scores, pos = exact_index(x, self.metric).search(q, k)
        return self._hits(scores, np.where(pos >= 0, allowed[np.maximum(pos, 0)], -1))

    def rows_of(self, fids: np.ndarray) -> np.ndarray:
        if self._identity:
            return np.asarray(fids, dtype=np.int64)
        return self._order[np.searchsorted(self._sorted_fids, fids)]  # type: ignore[no-any-return]

    def _hits(self, scores: np.ndarray, ids: np.ndarray) -> list[list[dict[str, Any]]]:
        """Only the hit rows of the id map are materialised, not the whole map per search."""
        valid = ids >= 0
        meta = self.ids.select(["id", "path", "label", *self.extras]).take(
            pa.array(self.rows_of(ids[valid]))).to_pylist()
        it = iter(meta)
        out = []
        for qi in range(len(scores)):
            hits: list[dict[str, Any]] = []
            for s, ok in zip(to_score(scores[qi], self.metric), valid[qi]):
                if ok:
                    hits.append(shaped({"rank": len(hits) + 1, "score": float(s), **next(it)}, self.extras))
            out.append(hits)
        return out

    def _params_with(self, sel: Any, scale: int, k: int) -> Any:
        faiss = import_faiss()
        inner = faiss.downcast_index(self.index.index) if isinstance(self.index, faiss.IndexIDMap) else self.index
        value = int(self.meta.get("search", {}).get("value") or 1)
        ivf = faiss.try_extract_index_ivf(inner)
        if isinstance(inner, faiss.IndexHNSW):
            p = faiss.SearchParametersHNSW()
            p.efSearch = max(value * scale, k, 16)
        elif ivf is not None:
            p = faiss.SearchParametersIVF()
            p.nprobe = min(ivf.nlist, value * scale)
        else:
            p = faiss.SearchParameters()
        p.sel = sel  # the caller keeps sel alive while p is in use (FAISS holds a raw pointer)
        return p

    def _ensure_id_order(self) -> tuple[np.ndarray, np.ndarray]:
        """The id map's digests in lookup order and the id-map row of each (made once per loaded
        generation: 16 + 4 bytes a row, 16 + 8 beyond 2³¹ rows; while made, 40 bytes a row: the
        digests, their argsort and the sorted copy)."""
        with self._filter_lock:
            if self._id_digests is None or self._id_order is None:
                column = self.ids.column("id")
                d = np.empty(len(column), id_index.DIGEST)
                at = 0
                for c in column.chunks:  # a bounded piece at a time (others' ids are hashed one by one)
                    for s in range(0, len(c), id_index.CHUNK):
                        piece = c.slice(s, id_index.CHUNK)
                        d[at:at + len(piece)] = id_index.digests(piece)
                        at += len(piece)
                order = id_index.order_of(d)
                self._id_digests = d[order]
                del d
                self._id_order = order.astype(np.int32) if len(order) < 2**31 else order
            return self._id_digests, self._id_order

    def row_of(self, store_id: str) -> int | None:
        """The id map's row of STORE_ID, or None: its digest looked up in the id order (made once per
        loaded generation from the ids' digests; the id map itself may be memory-mapped), never a
        scan of the whole map per request. The row's id is compared too."""
        digests, order = self._ensure_id_order()
        pos = int(id_index.find(digests, id_index.digests(pa.array([store_id], pa.string())))[0])
        if pos < 0:
            return None
        row = int(order[pos])
        return row if self._id_at(row) == store_id else None

    def _id_at(self, row: int) -> str | None:
        """The id of id-map ROW: its chunk found by a binary search (a memory-mapped map has a chunk
        per record batch)."""
        chunks = self.ids.column("id").chunks
        if self._id_chunks is None:
            self._id_chunks = np.cumsum([0, *(len(c) for c in chunks)])
        c = int(np.searchsorted(self._id_chunks, row, side="right")) - 1
        value = chunks[c][row - int(self._id_chunks[c])].as_py()
        return None if value is None else str(value)

    def by_key(self, key: str) -> str | None:
        """The id of the one item whose user's key (``--id-column``, kept as the id map's ``key``) is
        KEY, or None (the index keeps no keys, or none is KEY). A scan of the key column (memory-mapped;
        the CLI's and the API's, never a request's). Several (per-file keys: the same key in two tables):
        an ``IndexError_`` naming two of their paths."""
        if "key" not in self.ids.column_names:
            return None
        found: list[tuple[str, str]] = []
        t = self.ids.select(["id", "path", "key"])
        for rb in t.to_batches():
            hit = rb.filter(pc.equal(rb.column(2), key).fill_null(False))
            found += [(str(r["id"]), str(r["path"])) for r in hit.slice(0, 2).to_pylist()]
            if len(found) > 1:
                raise IndexError_(f"key {shown(key)} is the key of several items of index {self.name!r} "
                                  f"({shown(found[0][1], 100)}, {shown(found[1][1], 100)}, …): give the id instead")
        return found[0][0] if found else None

    def full_id(self, given: str, shortest: int = 6) -> str:
        """GIVEN, or the id of the one item whose user's key is GIVEN (``by_key``), or the one id of the
        map that begins with it (the CLI's tables show ids cut to 12 characters). Only an id not found
        whole is looked up by key, and then, of at least SHORTEST characters, as a prefix: a scan of the
        id map (memory-mapped; ~1 s per 10⁷ ids), so the CLI's, never a request's. Several ids beginning
        with it: an ``IndexError_`` showing two."""
        import pyarrow.compute as pc

        if self.row_of(given) is not None:
            return given
        keyed = self.by_key(given)
        if keyed is not None:
            return keyed
        if len(given) < shortest:
            return given
        found: list[str] = []
        for chunk in self.ids.column("id").chunks:
            hits = chunk.filter(pc.starts_with(chunk, given).fill_null(False))
            found += [str(v) for v in hits.slice(0, 2).to_pylist()]
            if len(found) > 1:
                raise IndexError_(f"id {shown(given)} begins several ids of index {self.name!r} ({found[0]}, "
                                  f"{found[1]}, …): give more characters")
        return found[0] if found else given

    def item(self, store_id: str) -> dict[str, Any]:
        """The id map's row of STORE_ID (faiss_id, id, path, label; caption, key and ``columns`` where
        the index keeps them, as hits show them)."""
        row = self.row_of(store_id)
        if row is None:
            raise IndexError_(f"id {shown(store_id)} is not in index {self.name!r}")
        return shaped(dict(self.ids.slice(row, 1).to_pylist()[0]), self.extras)

    def vector_of(self, store_id: str) -> np.ndarray:
        fid = self.item(store_id)["faiss_id"]
        return self._vectors_of(np.array([fid], dtype=np.int64))

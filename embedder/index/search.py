"""An index ready to search: the FAISS object, its id map and metadata, filters, re-ranking, and hot
reload of new generations."""

from __future__ import annotations

import functools
import logging
import threading
from typing import Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from embedder.errors import IndexError_, ProvenanceMismatch, StoreError, shown
from embedder.index import generations as gens
from embedder.index.faiss_util import exact_index, import_faiss, prepare_rows, set_search_param, to_score
from embedder.index.generations import IDS_FILE, INDEX_FILE, VECTORS_FILE, locate, read_meta
from embedder.index.quality import Searcher
from embedder.store.provenance import Provenance
from embedder.store.shards import Store, arrow_to_embeddings

log = logging.getLogger(__name__)


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
        if not self._identity:
            fids = np.asarray(self.ids.column("faiss_id").to_numpy(), dtype=np.int64)
            self._order = np.argsort(fids, kind="stable")
            self._sorted_fids = fids[self._order]
        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is not None and self.lookup_vectors is None:
            # vectors by id (queries by id, exact fallback), set up at load, never mid-search; a hash
            # table because ids are not 0..n-1 in add order (held-out queries go in last)
            ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
        self._id_order: np.ndarray | None = None  # id-map rows in id order (row_of), made on first use
        self._id_chunks: np.ndarray | None = None
        self._filter_table: pa.Table | None = None  # id map + store columns, joined once
        self._filter_cols: list[str] | None = None
        self._filter_lock = threading.Lock()
        self.generation = int(self.meta.get("generation", 0))
        self.identity = gens.identity(self.dir)  # what a reload compares (numbers restart after a drop)

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

    def filter_table(self) -> pa.Table:
        """The id map joined with the store's other columns, read once per loaded index (a
        service filters on them per query without re-reading the store)."""
        with self._filter_lock:
            if self._filter_table is None:
                table = self.ids
                try:
                    store = Store.open(self.meta["store"])
                    cols = [c for c in store.dataset().schema.names
                            if c not in ("embedding", *table.column_names)]
                    if cols:
                        table = table.join(store.read(["id", *cols]), "id", join_type="left outer")
                except StoreError as e:  # the store moved away: filter on the id map alone
                    log.warning("index %s: store columns unavailable for filters (%s)", self.name, e)
                self._filter_table = table
            return self._filter_table

    def filter_columns(self) -> list[str]:
        """Columns a filter may name, without joining the store (its schema is enough); read once
        per loaded index (`GET /indexes/NAME` asks per request)."""
        if self._filter_cols is not None:
            return list(self._filter_cols)
        cols = [c for c in self.ids.column_names if c != "faiss_id"]
        try:
            store = Store.open(self.meta["store"])
            cols += [c for c in store.dataset().schema.names if c not in ("embedding", *cols)]
        except StoreError:
            pass
        self._filter_cols = cols
        return list(cols)

    def allowed_faiss_ids(self, where: dict[str, str]) -> np.ndarray:
        """FAISS ids whose store rows match every column=value condition."""
        table = self.ids
        if any(c not in table.column_names for c in where):
            table = self.filter_table()
        missing = [c for c in where if c not in table.column_names]
        if missing:
            valid = [c for c in table.column_names if c != "faiss_id"]
            raise IndexError_(f"cannot filter on {missing[0]!r}; columns: {', '.join(valid)}")
        mask = None
        for col, value in where.items():
            column = table.column(col)
            cond = pc.equal(pc.cast(column, pa.string()), value)
            mask = cond if mask is None else pc.and_(mask, cond)
        return np.asarray(table.filter(mask).column("faiss_id").to_numpy(), dtype=np.int64)

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
        faiss = import_faiss()
        allowed = self.allowed_faiss_ids(where)
        need = min(kk, len(allowed))
        if need == 0:
            return [[] for _ in range(len(q))]
        sel = faiss.IDSelectorBatch(allowed)
        for scale in (1, 8, 64, 512):
            params = self._params_with(sel, scale, need)  # per call: concurrent searches share nothing
            try:
                scores, ids = self.searcher.search(q, need, params=params)
            except RuntimeError:  # this index type takes no selector: exact over the matches
                break
            if (ids >= 0).sum(1).min() >= need:
                return self._hits(scores, ids)
        return self._exact_among(q, allowed, need)

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
        meta = self.ids.select(["id", "path", "label"]).take(pa.array(self.rows_of(ids[valid]))).to_pylist()
        it = iter(meta)
        out = []
        for qi in range(len(scores)):
            hits: list[dict[str, Any]] = []
            for s, ok in zip(to_score(scores[qi], self.metric), valid[qi]):
                if ok:
                    hits.append({"rank": len(hits) + 1, "score": float(s), **next(it)})
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

    def row_of(self, store_id: str) -> int | None:
        """The id map's row of STORE_ID, or None: a binary search over the ids in sorted order (the
        order computed once per loaded generation, 4-8 bytes a row; the id map itself may be
        memory-mapped), never a scan of the whole map per request."""
        with self._filter_lock:
            if self._id_order is None:
                column = self.ids.column("id")
                order = pc.sort_indices(column).to_numpy()
                self._id_order = order.astype(np.int32) if len(order) < 2**31 else order
                self._id_chunks = np.cumsum([0, *(len(c) for c in column.chunks)])
            order, starts = cast(np.ndarray, self._id_order), cast(np.ndarray, self._id_chunks)
        chunks = self.ids.column("id").chunks

        def at(i: int) -> str:
            row = int(order[i])
            c = int(np.searchsorted(starts, row, side="right")) - 1
            return str(chunks[c][row - int(starts[c])].as_py())

        lo, hi = 0, len(order)
        while lo < hi:
            mid = (lo + hi) // 2
            if at(mid) < store_id:
                lo = mid + 1
            else:
                hi = mid
        return int(order[lo]) if lo < len(order) and at(lo) == store_id else None

    def item(self, store_id: str) -> dict[str, Any]:
        """The id map's row of STORE_ID (faiss_id, id, path, label)."""
        row = self.row_of(store_id)
        if row is None:
            raise IndexError_(f"id {shown(store_id)} is not in index {self.name!r}")
        return dict(self.ids.slice(row, 1).to_pylist()[0])

    def vector_of(self, store_id: str) -> np.ndarray:
        fid = self.item(store_id)["faiss_id"]
        return self._vectors_of(np.array([fid], dtype=np.int64))

"""FAISS indexes over a store, with an explicit id map and measured quality.

``indexes/NAME/`` holds ``index.faiss``, ``ids.parquet`` (FAISS id → store id, path, label, and what
hits show beyond them: caption, key, kept columns — see ``stream.extras_for``; never alignment by row
position) and ``index.json`` (store provenance, kind, factory string, metric, dim,
count, build time, tuned search parameter and the recall/QPS measured against exact search on
held-out random queries).
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedder.errors import EmbedderError, IndexError_
from embedder.index import generations as gens
from embedder.index import gpu as index_gpu
from embedder.index.faiss_util import faiss_metric, import_faiss, prepare_rows, set_search_param
from embedder.index.generations import (  # noqa: F401
    HOME_ENV,
    IDS_FILE,
    INDEX_FILE,
    META_FILE,
    VECTORS_FILE,
    commit_index,
    drop,
    home,
    info,
    locate,
    names,
    read_meta,
)
from embedder.index.plan import ENGINES, METRICS, RERANK_FACTOR, BuildOptions, Plan, plan
from embedder.index.quality import Searcher, measure_and_tune, tune
from embedder.index.search import LoadedIndex
from embedder.io import storage
from embedder.sizes import default_budget
from embedder.store.shards import Store, arrow_to_embeddings

log = logging.getLogger(__name__)


def build(store_path: str, name: str, options: BuildOptions = BuildOptions(),
          index_home: str | None = None, keep_columns: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Build index NAME over the store. KEEP_COLUMNS: what the id map carries for hits beyond id,
    path and label (``index build --keep-columns``; see ``stream.extras_for``); None: the caption
    where the store has captions, the key where its ids come from --id-column."""
    import_faiss()  # a clear error before any work when FAISS is missing
    if options.metric not in METRICS:
        raise IndexError_(f"unknown metric {options.metric!r}; valid: {', '.join(METRICS)}")
    target = gens.index_dir(name, index_home)
    store = Store.open(store_path)
    n = store.count()
    if n == 0:
        raise IndexError_(f"{store_path} holds no vectors to index")
    budget = options.memory_budget or default_budget()
    if options.engine not in ENGINES:
        raise IndexError_(f"unknown engine {options.engine!r}; valid: {', '.join(ENGINES)}")
    p = plan(n, store.dim, options.kind, budget, options.coarse, options.opq)
    # IVF over budget (or asked): streamed, lists on disk; otherwise the store is read whole
    on_disk = options.on_disk or options.engine == "ray"
    streamed = p.kind in ("ivf", "ivfpq") and (on_disk or n * store.dim * 4 > budget)
    if on_disk and not streamed:
        why = "--engine ray builds" if options.engine == "ray" else "--on-disk needs"
        raise IndexError_(f"{why} an IVF index with lists on disk (--kind ivf or ivfpq); "
                          f"{p.kind!r} lives in memory")
    if gens.exists(target):
        raise IndexError_(f"index {name!r} already exists in {target.parent}; "
                          f"`embedder index drop {name}` first or pick another --name")
    with gens.writer(target):
        if gens.exists(target):
            raise IndexError_(f"index {name!r} was just built by another process")
        try:
            from embedder.index.stream import Extras, extras_for, shard_rows

            files = [str(f) for f in store.shard_files()]  # one listing: what is read is what is recorded
            if options.engine == "ray":  # its tasks write plain id maps
                if keep_columns and any(c.strip() not in ("", "none") for c in keep_columns):
                    raise IndexError_("--keep-columns is not supported with --engine ray yet; build without it")
                extras = Extras()
            else:
                extras = extras_for(store, files, keep_columns)
            if streamed:
                return _build_streamed(store, store_path, name, target, p, options, budget, extras)
            table = read_rows(store, [(f, 0) for f in files], ("id", "path", "label", "embedding", *extras.from_store))
            return _build(store, store_path, name, target, table, options, p, shard_rows(store, files), extras)
        finally:
            if not gens.exists(target):  # a failed first build leaves no empty folder behind
                shutil.rmtree(target, ignore_errors=True)


def _build_streamed(store: Store, store_path: str, name: str, target: Path, p: Plan, options: BuildOptions,
                    budget: int, extras: Any) -> dict[str, Any]:
    """IVF larger than RAM: see embedder.index.ondisk. Tuned like the in-memory build, against exact
    ground truth streamed over the store."""
    from embedder.index import ondisk
    from embedder.index import stream as index_stream
    from embedder.index.stream import INDEXED, record_read, shard_rows

    faiss = import_faiss()
    t0 = time.perf_counter()
    tmpdir = gens.staging(target)
    parallel = None
    if options.engine == "ray":
        from embedder.embed.options import RayOptions
        from embedder.index import ray as index_ray

        parallel = index_ray.parallel(RayOptions(address=options.address), faiss_metric(options.metric))
    r = index_stream.build_streamed(store, tmpdir, p.factory, options.metric, p.train_size, budget, options.queries,
                           options.seed, faiss_metric(options.metric), lambda v: prepare_rows(v, options.metric),
                           parallel, extras)
    index = r["index"]
    vectors = np.load(tmpdir / VECTORS_FILE, mmap_mode="r")
    rerank = p.kind == "ivfpq"
    searcher = Searcher(index, options.metric, vectors if rerank else None)
    quality = tune(searcher, r["queries"], r["exact"], 10, options.target_recall, options.metric,
                   tol=1e-3 if rerank else 1e-5)  # re-ranked scores come from float16 copies
    del searcher, index
    index = r["finish"]()  # the final lists, held-out queries included
    set_search_param(index, quality.get("param"), quality.get("value"))
    text_recall = _text_recall(store_path, store, Searcher(index, options.metric, vectors if rerank else None),
                               r["n"], options)
    ondisk.point_lists_at(index, target / f"gen-{gens.next_generation(target):06d}" / ondisk.LISTS_FILE)
    faiss.write_index(index, str(tmpdir / INDEX_FILE))
    del vectors
    meta = {
        "name": name, "store": storage.resolve(store_path),
        "provenance": store.provenance.to_dict(), "kind": p.kind, "factory": p.factory,
        "reason": p.reason + "; streamed build, inverted lists on disk"
                  + ("; adds as Ray tasks" if options.engine == "ray" else ""),
        "metric": options.metric, "dim": r["dim"], "count": int(index.ntotal), "next_id": r["n"],
        "build_seconds": round(time.perf_counter() - t0, 3), "memory_budget": budget,
        "trained_on": r["trained_on"],
        "index_bytes": (tmpdir / INDEX_FILE).stat().st_size + (tmpdir / ondisk.LISTS_FILE).stat().st_size,
        "on_disk": {"lists": ondisk.LISTS_FILE, "trained": ondisk.TRAINED_FILE, "slices": r["slices"],
                    "slice_rows": r["slice_rows"], "train_rows": r["train_rows"]},
        "id_map": ondisk.IDS_ARROW, "vectors": VECTORS_FILE, **_columns_meta(extras),
        INDEXED: record_read({}, store, shard_rows(store, r["files"])),
        "rerank": None if not rerank else {"file": VECTORS_FILE, "factor": RERANK_FACTOR,
                                           "dtype": "float16", "memory_mapped": True},
        "built_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "quality": quality, "search": {"param": quality.get("param"), "value": quality.get("value")},
        **({"text_recall": text_recall} if text_recall is not None else {}),
    }
    return commit_index(target, tmpdir, meta)


def _columns_meta(extras: Any) -> dict[str, Any]:
    """The index meta's record of its id map's extra columns (none: nothing, as before they existed)."""
    if not extras.columns:
        return {}
    return {"columns": list(extras.columns), **({"key_column": extras.key_column} if extras.key_column else {})}


def _build(store: Store, store_path: str, name: str, target: Path, table: pa.Table,
           options: BuildOptions, p: Plan, rows: dict[str, int], extras: Any) -> dict[str, Any]:
    from embedder.index.stream import INDEXED, id_rows, id_schema, record_read

    faiss = import_faiss()
    n, dim = table.num_rows, store.dim
    x = prepare_rows(arrow_to_embeddings(table.column("embedding")), options.metric)
    budget = options.memory_budget or default_budget()
    t0 = time.perf_counter()
    try:
        base = faiss.index_factory(dim, p.factory, faiss_metric(options.metric))
    except RuntimeError as e:
        raise IndexError_(factory_error(p.factory, e)) from None
    index = base if faiss.try_extract_index_ivf(base) is not None else faiss.IndexIDMap2(base)

    rng = np.random.default_rng(options.seed)
    order = rng.permutation(n)
    nq = min(options.queries, max(1, n // 10)) if n > 1 else 0
    held, rest = order[:nq], order[nq:]
    trained_on = None
    if not index.is_trained:
        # A random sample, never the first rows (which are often one class or one folder).
        sample = x[rng.choice(rest, size=min(len(rest), max(p.train_size, 1)), replace=False)]
        try:
            trained_on = index_gpu.train(index, sample)
        except RuntimeError as e:
            raise IndexError_(f"training {p.factory} failed ({str(e).splitlines()[-1]}); "
                              "too few vectors for this kind? try --kind flat") from None
    if faiss.try_extract_index_ivf(base) is not None:
        from embedder.index.faiss_util import QUANTIZER_EF_ADD, set_quantizer_ef

        set_quantizer_ef(base, QUANTIZER_EF_ADD)
    faiss_ids = np.arange(n, dtype=np.int64)
    index.add_with_ids(x[rest], faiss_ids[rest])
    if faiss.try_extract_index_ivf(base) is not None:
        from embedder.index.faiss_util import set_quantizer_ef

        set_quantizer_ef(base)  # searched from here on (the held-out rows' adds are few)
    vectors = x.astype(np.float16) if p.kind == "ivfpq" else None
    # While tuning, only indexed rows may be candidates: the held-out ones are not in FAISS yet.
    quality = measure_and_tune(Searcher(index, options.metric, vectors), x, rest, x[held], 10,
                               options.target_recall, options.metric)
    if nq:
        index.add_with_ids(x[held], faiss_ids[held])
    build_seconds = time.perf_counter() - t0
    del x
    text_recall = _text_recall(store_path, store, Searcher(index, options.metric, vectors), n, options)

    tmpdir = gens.staging(target)
    reader = extras.reader()
    ids = id_rows(faiss_ids, table, extras, reader, id_schema(extras.columns))
    extras.check(reader)
    pq.write_table(ids, tmpdir / IDS_FILE)
    faiss.write_index(index, str(tmpdir / INDEX_FILE))
    if vectors is not None:
        np.save(tmpdir / VECTORS_FILE, vectors)
    meta = {
        "name": name, "store": storage.resolve(store_path),
        "provenance": store.provenance.to_dict(), "kind": p.kind, "factory": p.factory, "reason": p.reason,
        "metric": options.metric, "dim": dim, "count": int(index.ntotal), "next_id": n,
        "build_seconds": round(build_seconds, 3), "memory_budget": budget, "trained_on": trained_on,
        "index_bytes": (tmpdir / INDEX_FILE).stat().st_size,
        "rerank": None if vectors is None else {"file": VECTORS_FILE, "factor": RERANK_FACTOR,
                                                 "dtype": "float16", "memory_mapped": True},
        "built_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "quality": quality, "search": {"param": quality.get("param"), "value": quality.get("value")},
        **({"text_recall": text_recall} if text_recall is not None else {}),
        INDEXED: record_read({}, store, rows), **_columns_meta(extras),
    }
    return commit_index(target, tmpdir, meta)


def read_rows(store: Store, parts: list[tuple[str, int]],
              columns: tuple[str, ...] = ("id", "path", "label", "embedding")) -> pa.Table:
    """PARTS' rows ((shard, rows to skip) each: see ``stream.unseen``) as one table in the store's
    schema."""
    from embedder.index.stream import table_past
    from embedder.store.shards import row_schema

    schema = row_schema(store.dim, store.dtype)
    sub = pa.schema([schema.field(c) for c in columns])
    try:
        tables = [table_past(f, skip, list(columns)).cast(sub) for f, skip in parts]
    except (pa.ArrowInvalid, OSError) as e:
        raise IndexError_(f"{store.root}: cannot read shards ({str(e).splitlines()[0]})") from None
    return pa.concat_tables(tables) if tables else sub.empty_table()


def _text_recall(store_path: str, store: Store, searcher: Searcher, count: int,
                 options: BuildOptions) -> dict[str, Any] | None:
    """Text → image recall of the index SEARCHER searches (FAISS id = store row), where the store's
    model has a text tower and some rows have captions (see ``text_recall``); what kept it from being
    measured is recorded instead (the index is built either way)."""
    if not options.text_recall or not store.provenance.has_text:
        return None
    from embedder.index import text_recall as tr

    def search(q: np.ndarray, k: int) -> np.ndarray:
        return searcher.search(prepare_rows(q, options.metric), min(k, searcher.index.ntotal))[1]  # type: ignore[no-any-return]

    try:
        return tr.measure(store_path, store.provenance, options.metric, search, count,
                          tr.TextRecallOptions(sample=options.text_recall_sample, weights=options.weights,
                                               device=options.device))
    except EmbedderError as e:
        log.warning("text → image recall not measured: %s", e)
        return {"not_measured": str(e)}


def add(name: str, store_path: str, index_home: str | None = None, merge: bool = False) -> dict[str, int]:
    """Add a store's rows that the index does not hold yet (ids already present are skipped), as a
    new generation: readers keep the old one until the switch; one writer at a time."""
    d = gens.index_dir(name, index_home)
    locate(name, index_home)
    with gens.writer(d):
        loaded = LoadedIndex(name, index_home)
        if loaded.meta.get("on_disk"):
            from embedder.index.stream import add_streamed

            return add_streamed(loaded, d, store_path, merge)
        import pyarrow.compute as pc

        from embedder.index.stream import INDEXED, record_read, shard_rows, unseen

        store = Store.open(store_path)
        loaded.require_addable(store.provenance, store_path)
        files = [str(f) for f in store.shard_files()]  # one listing: what is read is what is recorded
        rows = shard_rows(store, files)
        # only the rows the index has not read (its meta records the shards it read; an index
        # without the record reads every shard), embeddings included
        from embedder.index.stream import extras_of

        extras = extras_of(loaded.meta)
        table = read_rows(store, unseen(loaded.meta, store, files, rows),
                          ("id", "path", "label", "embedding", *extras.from_store))
        new = table.filter(pc.invert(pc.is_in(table.column("id"), value_set=loaded.ids.column("id"))))
        del table
        if new.num_rows:
            _add_generation(loaded, d, new, {INDEXED: record_read(loaded.meta, store, rows)})
        return {"added": new.num_rows, "skipped": sum(rows.values()) - new.num_rows,
                "count": int(loaded.index.ntotal)}


def _add_generation(loaded: LoadedIndex, d: Path, new: pa.Table, more: dict[str, Any]) -> None:
    from embedder.index.stream import Extras, extras_of, id_rows

    faiss = import_faiss()
    x = prepare_rows(arrow_to_embeddings(new.column("embedding")), loaded.metric)
    start = int(loaded.meta["next_id"])
    fids = np.arange(start, start + new.num_rows, dtype=np.int64)
    loaded.index.add_with_ids(x, fids)
    kept = extras_of(loaded.meta)
    extras = Extras(tuple(c for c in kept.columns if c in loaded.ids.schema.names), kept.key_column, False)
    ids = pa.concat_tables([loaded.ids, id_rows(fids, new, extras, extras.reader(), loaded.ids.schema)])
    tmpdir = gens.staging(d)
    if loaded.searcher.vectors is not None:
        grown = np.lib.format.open_memmap(tmpdir / VECTORS_FILE, mode="w+", dtype=np.float16,
                                          shape=(start + new.num_rows, loaded.dim))
        grown[:start] = loaded.searcher.vectors
        grown[start:] = x.astype(np.float16)
        grown.flush()
        del grown
    faiss.write_index(loaded.index, str(tmpdir / INDEX_FILE))
    pq.write_table(ids, tmpdir / IDS_FILE)
    meta = {**loaded.meta, "count": int(loaded.index.ntotal), "next_id": start + new.num_rows,
            "index_bytes": (tmpdir / INDEX_FILE).stat().st_size, **more}
    commit_index(d, tmpdir, meta)


def factory_error(factory: str, e: BaseException) -> str:
    """FAISS's own complaint without its C++ function and source path, and the kind that was probably
    meant (``--kind flatt``: flat)."""
    import difflib
    import re

    from embedder.index.plan import KINDS

    said = re.sub(r"^Error in .*? at \S+:\d+: ", "", str(e).strip().splitlines()[-1]).removeprefix("Error: ")
    if "," in factory:  # a factory string: FAISS's reason is the answer
        return f"FAISS cannot build {factory!r}: {said}"
    close = difflib.get_close_matches(factory.lower(), [k for k in KINDS if k != "auto"], n=1, cutoff=0.6)
    hint = (f"; did you mean --kind {close[0]}?" if close else
            f"; --kind takes {', '.join(KINDS)} or a FAISS factory string such as IVF1024,PQ32")
    return f"FAISS cannot build {factory!r}: {said}{hint}"

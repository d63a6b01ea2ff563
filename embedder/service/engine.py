"""The search service's engine, free of HTTP: loaded indexes (hot-swapped when a new generation
appears), one embedder per distinct provenance, and the batched query path (decode in a thread
pool, one forward pass per embedder, one FAISS call per index and filter).

The HTTP layer (``embedder.service.app``) only parses requests, calls ``Engine.run_batch`` (through
the micro-batcher) and turns ``EmbedderError``s into 4xx responses.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embedder.errors import EmbedderError, IndexError_, shown
from embedder.index import generations as layout
from embedder.service.options import ServeOptions

log = logging.getLogger(__name__)


class NotFound(EmbedderError):
    """An unknown index or id (HTTP 404)."""


class BadQuery(EmbedderError):
    """A query the service cannot answer as asked (HTTP 400/422)."""


@dataclass
class Query:
    """One query of a batch: exactly one of image (bytes), vector or id."""

    index: str
    k: int = 10
    where: dict[str, str] | None = None
    image: bytes | None = None
    vector: list[float] | None = None
    id: str | None = None
    text: str | None = None
    exclude_self: bool = False  # an id query: leave the query item out of its own results


@dataclass
class Answer:
    index: str
    generation: int
    hits: list[dict[str, Any]]


StageTimer = Callable[[str, float], None]  # (stage, seconds)


class Engine:
    def __init__(self, options: ServeOptions = ServeOptions()) -> None:
        self.options = options
        self.indexes: dict[str, Any] = {}  # name → LoadedIndex (the mapping replaced whole on reload)
        self._failed: dict[str, str] = {}  # name → identity of a generation that failed to load
        self.embedders: dict[str, Any] = {}  # comparable-provenance key → BatchEmbedder
        self._embed_locks: dict[str, threading.Lock] = {}
        # (model key, index identity) whose query model could not be made: not tried again for that
        # generation (GET /indexes/NAME and every query would each load it again otherwise)
        self._no_embedder: set[tuple[str, str]] = set()
        self._labels: dict[str, tuple[str, list[str]]] = {}  # name → (identity, labels): made at load
        self._reload_lock = threading.Lock()
        self._embedders_lock = threading.Lock()
        self.ready = False
        cores = os.cpu_count() or 2
        self.decode_pool = ThreadPoolExecutor(options.decode_threads or cores, thread_name_prefix="decode")
        self.stage_timer: StageTimer = lambda stage, seconds: None

    # ---- loading --------------------------------------------------------------------------
    def load_all(self) -> None:
        """Every index in the home and each distinct embedder their provenance names, once."""
        for name in layout.names(self.options.home):
            try:
                self._load(name)
            except EmbedderError as e:  # one broken index must not keep the others from serving
                log.error("index %s not served: %s", name, e)
        self.ready = True

    def _load(self, name: str) -> Any:
        from embedder.index.search import LoadedIndex

        loaded = LoadedIndex(name, self.options.home)
        self._embedder_for(loaded)
        # the per-generation work done here, in the loading thread, never by a request: the labels
        # GET /indexes/NAME lists, the filter columns, the id order lookups by id search in (from the
        # ids' digests) and the per-value selectors of the low-cardinality columns filters name (one
        # streamed pass over the id map and the store's other columns: the store is never held whole)
        loaded.prepare_lookups()
        self._labels[name] = (loaded.identity, _label_names(loaded))
        # one reference swap of the whole mapping: searches in flight and readers iterating it keep
        # the old objects (never a dict changing size under a reader)
        self.indexes = {**self.indexes, name: loaded}
        return loaded

    def _key(self, loaded: Any) -> str:
        """One query model per distinct way of making vectors: everything that makes them, their
        normalisation and dtype included (two indexes that differ only there need two models)."""
        prov = loaded.provenance
        return json.dumps([prov.show(f) for f in prov.SAME_STORE], sort_keys=True, default=str)

    def _embedder_for(self, loaded: Any) -> Any | None:
        key = self._key(loaded)
        with self._embedders_lock:  # the poller and request threads may ask at once: load once
            return self._embedder_locked(loaded, key)

    def _embedder_locked(self, loaded: Any, key: str) -> Any | None:
        if key not in self.embedders:
            from embedder.embed.query import embedder_for

            failed = (key, str(loaded.identity))
            if failed in self._no_embedder:  # said once for this generation
                return None
            prov = loaded.provenance
            weights = self.options.weights.get(loaded.name)
            if prov.weights.needs_file and weights is None:
                weights = self._weights_file(loaded)
            if prov.weights.needs_file and weights is None:
                self._no_embedder.add(failed)
                log.warning("index %s was made with weights file %s (not where its store recorded it, or "
                            "changed since): image and text queries need --weights FILE (matched by its "
                            "SHA-256) or --weights %s=FILE; vector and id queries work", loaded.name,
                            prov.weights.name, loaded.name)
                return None
            try:
                emb = embedder_for(prov, weights, self.options.device)
            except EmbedderError as e:
                self._no_embedder.add(failed)
                log.warning("index %s: no embedder for image queries (%s); not tried again before its "
                            "next generation", loaded.name, e)
                return None
            self.embedders[key] = emb
            self._embed_locks[key] = threading.Lock()
        return self.embedders[key]

    def _weights_file(self, loaded: Any) -> str | None:
        """The weights file of LOADED's store: one of ``serve --weights FILE`` whose SHA-256 is the one
        its provenance records, else the file its store's manifest remembers (``store.remembered``)."""
        from embedder.store.remembered import file_digest, remembered_weights

        want = loaded.provenance.weights.sha256
        for f in self.options.weight_files:
            if file_digest(str(Path(f).resolve())) == want:
                return str(f)
        return remembered_weights(loaded.meta.get("store"), want)

    def identity_on_disk(self, name: str) -> str | None:
        """The identity (``generations.identity``) of NAME's current generation, None if none."""
        d = layout.index_dir(name, self.options.home)
        cur = layout.current(d) if d.is_dir() else None
        return None if cur is None else layout.identity(cur)

    def reload(self, name: str | None = None) -> dict[str, int]:
        """Load every index (or NAME) whose current generation on disk is not the one served (by
        build id: a drop and rebuild is a new generation even where its number repeats), and any new
        index in the home. The old object answers until the new one is in place. A generation that
        failed to load is not read again until it changes (one warning, not one per poll). Asked for by
        NAME (``POST /indexes/NAME/reload``), its query model is tried again too, if it failed."""
        with self._reload_lock:
            if name and name in self.indexes:
                served_identity = str(self.indexes[name].identity)
                with self._embedders_lock:
                    self._no_embedder = {f for f in self._no_embedder if f[1] != served_identity}
            names = [name] if name else sorted(set(layout.names(self.options.home)) | set(self.indexes))
            changed = {}
            for n in names:
                try:
                    ident = self.identity_on_disk(n)
                except IndexError_:
                    ident = None
                if ident is None:
                    if name:
                        raise NotFound(self._unknown_index(n))
                    if n in self.indexes:  # dropped on disk
                        self.indexes = {k: v for k, v in self.indexes.items() if k != n}
                        changed[n] = -1
                        log.info("index %s dropped on disk: no longer served", n)
                    continue
                served = self.indexes.get(n)
                if served is not None and served.identity == ident:
                    continue
                if self._failed.get(n) == ident and not name:
                    continue
                try:
                    loaded = self._load(n)
                except (EmbedderError, FileNotFoundError) as e:
                    self._failed[n] = ident
                    log.warning("index %s: generation not loaded (%s); still serving %s", n, e,
                                "the previous one" if served is not None else "nothing for it")
                    continue
                self._failed.pop(n, None)
                changed[n] = loaded.generation
                log.info("index %s: serving generation %d (%d vectors)", n, loaded.generation,
                         int(loaded.index.ntotal))
            return changed

    def poll_forever(self, stop: threading.Event) -> None:
        while not stop.wait(self.options.poll_seconds):
            try:
                changed = self.reload()
                if changed:
                    log.info("reloaded %s", changed)
            except Exception as e:  # noqa: BLE001 - the poller must outlive any one bad reload
                log.error("index poll failed: %s", e)

    # ---- lookups ----------------------------------------------------------------------------
    def _unknown_index(self, name: str) -> str:
        return f"no index named {shown(name)}; available: {', '.join(sorted(self.indexes)) or 'none'}"

    def index(self, name: str) -> Any:
        loaded = self.indexes.get(name)
        if loaded is None:
            layout.index_dir(name, self.options.home)  # a bad name is a clear error, never a path
            raise NotFound(self._unknown_index(name))
        return loaded

    def describe(self, name: str) -> dict[str, Any]:
        loaded = self.index(name)
        m = loaded.meta
        made = self._labels.get(name)
        labels = made[1] if made is not None and made[0] == loaded.identity else _label_names(loaded)
        emb = self._embedder_for(loaded)
        return {"name": name, "generation": loaded.generation, "count": int(loaded.index.ntotal),
                "dim": loaded.dim, "kind": m.get("kind"), "factory": m.get("factory"), "metric": loaded.metric,
                "quality": m.get("quality"), "text_recall": m.get("text_recall"),
                "provenance": m.get("provenance"), "built_at": m.get("built_at"),
                "image_queries": emb is not None, "text_queries": loaded.provenance.has_text and emb is not None,
                "labels": labels, "filter_columns": loaded.filter_columns(), "max_k": self.options.max_k}

    def item(self, name: str, item_id: str) -> dict[str, Any]:
        loaded = self.index(name)
        try:
            return dict(loaded.item(item_id))
        except IndexError_ as e:
            raise NotFound(str(e)) from None

    def item_bytes(self, name: str, item_id: str) -> tuple[bytes, str]:
        """The image of an id, read by the location its index's id map records (a file, a tar
        shard's member, a table's row): never a path taken from the request. With its media type."""
        from embedder.decode.common import read_bytes
        from embedder.errors import DecodeError

        path = str(self.item(name, item_id)["path"])
        try:
            data = read_bytes(path, self.options.max_upload_bytes)  # --max-upload-mb: the image limit here
        except DecodeError as e:
            raise NotFound(f"the image of {shown(item_id)} cannot be read at {shown(path, 200)}: {e}") from None
        return data, _media_type(data)

    def thumbnail(self, name: str, item_id: str) -> bytes:
        import io

        from PIL import Image

        from embedder.decode.cpu import load_rgb

        data, _ = self.item_bytes(name, item_id)
        img = load_rgb(data, self.options.max_pixels)
        img.thumbnail((self.options.thumbnail_px, self.options.thumbnail_px), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        return buf.getvalue()

    # ---- queries ----------------------------------------------------------------------------
    def queries(self, loaded: Any) -> Any:
        """The query builder of a served index (``embedder.embed.query.QueryBuilder``): the checks and
        the embedding the CLI and the Python API apply, with this server's query model."""
        from embedder.embed.query import QueryBuilder

        def embedder() -> Any:
            emb = self._embedder_for(loaded)
            if emb is None:
                raise BadQuery(f"index {loaded.name!r} takes vector and id queries only (its weights file was "
                               "not given to the server)")
            return emb

        return QueryBuilder(loaded, embedder, self.options.max_pixels)

    def embed_images(self, name: str, images: list[bytes]) -> tuple[np.ndarray, Any]:
        """Decode (thread pool) and embed (one forward pass) images as index NAME's vectors are made."""
        loaded = self.index(name)
        builder = self.queries(loaded)
        emb = builder.embedder
        t0 = time.perf_counter()
        pixels = builder.decode(images, self.decode_pool.map)
        t1 = time.perf_counter()
        self.stage_timer("decode", t1 - t0)
        with self._embed_locks[self._key(loaded)]:  # one forward pass at a time per model
            vectors = builder.embed(pixels)
        self.stage_timer("embed", time.perf_counter() - t1)
        return vectors, emb

    def embed_texts(self, name: str, texts: list[str]) -> tuple[np.ndarray, Any]:
        """Texts through the text tower of index NAME's model (one pass for the batch), as vectors
        comparable with the index's."""
        from embedder.embed.query import require_text_tower

        loaded = self.index(name)
        require_text_tower(loaded.provenance, f"index {name!r}")
        builder = self.queries(loaded)
        emb = builder.embedder
        t0 = time.perf_counter()
        with self._embed_locks[self._key(loaded)]:  # one forward pass at a time per model
            vectors = builder.texts(texts)
        self.stage_timer("embed_text", time.perf_counter() - t0)
        return vectors, emb

    def run_batch(self, queries: list[Query]) -> list[Answer | Exception]:
        """Answer a batch: images per index embedded together, then one search per (index, filter)."""
        out: list[Answer | Exception | None] = [None] * len(queries)
        vectors: dict[int, np.ndarray] = {}
        by_index: dict[str, list[int]] = {}
        for i, q in enumerate(queries):
            by_index.setdefault(q.index, []).append(i)
        for name, members in by_index.items():
            try:
                loaded = self.index(name)
            except EmbedderError as e:
                for i in members:
                    out[i] = e
                continue
            builder = self.queries(loaded)
            images = [i for i in members if queries[i].image is not None]
            if images:
                _embed_each(functools.partial(self.embed_images, name), images,
                            [queries[i].image for i in images], vectors, out)
            texts = [i for i in members if queries[i].text is not None]
            if texts:
                _embed_each(functools.partial(self.embed_texts, name), texts,
                            [queries[i].text for i in texts], vectors, out)
            for i in members:
                q = queries[i]
                if out[i] is not None or i in vectors:
                    continue
                try:
                    if q.vector is not None:
                        vectors[i] = builder.vector(q.vector)[0]
                    elif q.id is not None:
                        vectors[i] = builder.ids([q.id])[0]
                    else:
                        raise BadQuery("a query needs an image, a vector or an id")
                except IndexError_ as e:
                    out[i] = NotFound(str(e)) if "is not in index" in str(e) else BadQuery(str(e))
                except EmbedderError as e:
                    out[i] = e
            groups: dict[str, list[int]] = {}
            for i in members:
                if out[i] is None:
                    groups.setdefault(json.dumps(queries[i].where or {}, sort_keys=True), []).append(i)
            for key, idxs in groups.items():
                t0 = time.perf_counter()
                # one more for queries that leave themselves out
                k = max(queries[i].k + int(queries[i].exclude_self) for i in idxs)
                try:
                    hits = loaded.search(np.stack([vectors[i] for i in idxs]), k, json.loads(key) or None)
                except EmbedderError as e:
                    for i in idxs:
                        out[i] = BadQuery(str(e))
                    continue
                self.stage_timer("search", time.perf_counter() - t0)
                for i, h in zip(idxs, hits):
                    q = queries[i]
                    if q.exclude_self and q.id is not None:
                        from embedder.index.search import without_item

                        h = without_item(h, q.id, q.k)
                    out[i] = Answer(name, loaded.generation, h[:q.k])
        return [o if o is not None else BadQuery("unanswered") for o in out]

    def close(self) -> None:
        self.decode_pool.shutdown(wait=False, cancel_futures=True)


_MAGIC = ((b"\xff\xd8\xff", "image/jpeg"), (b"\x89PNG", "image/png"), (b"GIF8", "image/gif"), (b"BM", "image/bmp"),
          (b"II*\x00", "image/tiff"), (b"MM\x00*", "image/tiff"))


def _embed_each(embed: Callable[[list[Any]], tuple[np.ndarray, Any]], members: list[int], items: list[Any],
                vectors: dict[int, np.ndarray], out: list[Any]) -> None:
    """Embed a batch's images (or texts) in one pass; when that fails, each alone, so that a bad one
    fails only its own query."""
    try:
        vectors.update(zip(members, embed(items)[0]))
    except EmbedderError as e:
        if len(members) == 1:
            out[members[0]] = e
            return
        for i, item in zip(members, items):  # find the culprit(s): embed one by one
            try:
                vectors[i] = embed([item])[0][0]
            except EmbedderError as e1:
                out[i] = e1


def _label_names(loaded: Any, most: int = 500) -> list[str]:
    """The first MOST of an index's distinct labels, in order (what GET /indexes/NAME lists): the
    label selector's values where it has one (no second pass over the id map)."""
    made = loaded.selector("label")
    labels = list(made.values) if made is not None else [
        v for v in loaded.ids.column("label").unique().to_pylist() if v is not None]
    return sorted(labels)[:most]


def _media_type(data: bytes) -> str:
    """By the bytes' signature, never by a name (a shard member's or a row's has none to trust)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return next((t for magic, t in _MAGIC if data.startswith(magic)), "application/octet-stream")

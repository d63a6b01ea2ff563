"""The HTTP layer: FastAPI routes over ``Engine``; domain errors become 4xx JSON bodies.

Every endpoint but ``/healthz`` requires the API key when one is configured (``X-API-Key`` or
``Authorization: Bearer``, compared in constant time). Request bodies are bounded before they are
read. Metrics in Prometheus text format at ``/metrics`` (prometheus-client).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from embedder.errors import DecodeError, EmbedderError, ProvenanceMismatch
from embedder.service.batcher import MicroBatcher
from embedder.service.engine import Answer, BadQuery, Engine, NotFound, Query, ServeOptions

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"


# ---- request and response models (the OpenAPI schema at /docs) ----------------------------------
class QueryIn(BaseModel):
    vector: list[float] | None = Field(None, description="A query vector of the index's dim")
    id: str | None = Field(None, description="An id in the index: search by its vector")


class SearchIn(QueryIn):
    index: str | None = Field(None, description="Index name (optional when one index is served)")
    k: int = Field(10, ge=1, description="Results per query")
    where: dict[str, str | int | float | bool] | None = Field(
        None, description="COLUMN: VALUE filters on the id map or the store's columns (compared as text)")
    queries: list[QueryIn] | None = Field(None, description="A batch of queries instead of vector/id")


class Hit(BaseModel):
    rank: int
    score: float
    id: str
    path: str
    label: str | None


class SearchOut(BaseModel):
    index: str
    generation: int
    results: list[list[Hit]]


class ErrorOut(BaseModel):
    error: str
    kind: str


ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": ErrorOut} for s in (400, 401, 404, 413, 422, 503)}


# ---- plumbing -----------------------------------------------------------------------------------
class BodyLimit:
    """Refuse bodies over LIMIT bytes before they are read: by Content-Length, and by counting
    what a chunked upload actually sends."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await _too_large(self.limit, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await _too_large(self.limit, send)


class _TooLarge(Exception):
    pass


async def _too_large(limit: int, send: Send) -> None:
    body = json.dumps({"error": f"request body over {limit // 2**20} MiB", "kind": "too_large"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _status(e: Exception) -> tuple[int, str]:
    if isinstance(e, NotFound):
        return 404, "not_found"
    if isinstance(e, DecodeError):
        return 422, "not_an_image"
    if isinstance(e, ProvenanceMismatch):
        return 409, "provenance"
    if isinstance(e, BadQuery | EmbedderError):
        return 400, "bad_query"
    return 500, "internal"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("embedder_requests", "HTTP requests", ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("embedder_request_seconds", "Request latency", ["endpoint"], registry=self.registry)
        self.stage = Histogram("embedder_stage_seconds", "Time per stage of a batch", ["stage"],
                               registry=self.registry)
        self.batch = Histogram("embedder_batch_size", "Queries per micro-batch", registry=self.registry,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.errors = Counter("embedder_errors", "Error responses by kind", ["kind"], registry=self.registry)


# ---- the app ------------------------------------------------------------------------------------
def create_app(options: ServeOptions = ServeOptions(), api_key: str | None = None,
               engine: Engine | None = None) -> FastAPI:
    import torch

    engine = engine or Engine(options)
    metrics = Metrics()
    engine.stage_timer = lambda stage, seconds: metrics.stage.labels(stage).observe(seconds)
    cores = os.cpu_count() or 2
    workers = 1 if options.micro_batching else min(4, cores)
    # Concurrent requests never ask for more threads than there are cores, and one core is left to
    # the event loop, HTTP parsing and decoding (measured on 2 cores: 2 torch threads made a lone
    # client's image queries 26 % slower than 1); large micro-batches take all cores (run_batch).
    threads = max(1, (cores - 1) // workers)
    torch.set_num_threads(threads)
    try:
        import faiss

        faiss.omp_set_num_threads(threads)
    except ImportError:
        pass
    executor = ThreadPoolExecutor(workers, thread_name_prefix="compute")

    def run_batch(queries: list[Query]) -> list[Answer | Exception]:
        if options.micro_batching:
            # one compute thread: small batches run best on one core (the rest serve HTTP), large
            # ones on all (measured on 2 cores: batch 1 at 1 thread 53 vs 41 QPS at 2; 16 clients'
            # batches at 2 threads 80 vs 59 QPS at 1)
            torch.set_num_threads(threads if len(queries) < 4 else cores)
        return engine.run_batch(queries)

    batcher: MicroBatcher[Query, Answer] = MicroBatcher(
        run_batch, options.batch_window_ms, options.max_batch, executor, options.micro_batching,
        on_batch=lambda n: metrics.batch.observe(n))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        stop = threading.Event()
        loading = asyncio.create_task(asyncio.to_thread(engine.load_all))  # /healthz answers meanwhile
        poller = None
        if options.poll_seconds > 0:
            poller = threading.Thread(target=engine.poll_forever, args=(stop,), daemon=True, name="index-poll")
            poller.start()
        await batcher.start()
        try:
            yield
        finally:
            stop.set()
            await batcher.stop()
            loading.cancel()
            executor.shutdown(wait=False, cancel_futures=True)
            engine.close()

    app = FastAPI(title="embedder", summary="Similarity search over image embeddings", lifespan=lifespan,
                  responses=ERRORS)
    app.state.engine = engine

    @app.middleware("http")
    async def guard_and_measure(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        t0 = time.perf_counter()
        searching = request.url.path == "/search"
        batcher.in_flight += searching  # the batcher waits for searches still being received
        try:
            if api_key and request.url.path != "/healthz" and not _authorised(request, api_key):
                response: Response = _error(401, "missing or wrong API key", "unauthorised")
            else:
                response = await call_next(request)
        finally:
            batcher.in_flight -= searching
        route = request.scope.get("route")
        endpoint = getattr(route, "path", "other")
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
        if response.status_code >= 400:
            kind = response.headers.get("x-error-kind", str(response.status_code))
            metrics.errors.labels(kind).inc()
        return response

    @app.exception_handler(EmbedderError)
    async def domain_error(_: Request, e: EmbedderError) -> JSONResponse:
        status, kind = _status(e)
        return _error(status, str(e), kind)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http")
        return _error(e.status_code, str(e.detail), kind)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(422, f"{where}: {first.get('msg', 'invalid request')}", "invalid")

    @app.exception_handler(Exception)
    async def unexpected(_: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return _error(500, f"internal error ({type(e).__name__})", "internal")

    def _need_ready() -> None:
        if not engine.ready:
            raise _NotReady()

    @app.exception_handler(_NotReady)
    async def not_ready(_: Request, e: _NotReady) -> JSONResponse:
        return _error(503, "still loading indexes and models", "not_ready")

    def _default_index(name: str | None) -> str:
        if name:
            return name
        if len(engine.indexes) == 1:
            return next(iter(engine.indexes))
        raise BadQuery(f"say which index: one of {', '.join(sorted(engine.indexes)) or '(none loaded)'}")

    async def _answer(queries: list[Query]) -> SearchOut:
        answers = await asyncio.gather(*(batcher.submit(q) for q in queries))
        first = answers[0]
        return SearchOut(index=first.index, generation=first.generation,
                         results=[[Hit(**h) for h in a.hits] for a in answers])

    @app.post("/search", response_model=SearchOut, openapi_extra={"requestBody": {"content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/SearchIn"}},
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "file": {"type": "string", "format": "binary"}, "index": {"type": "string"},
            "k": {"type": "integer"}, "where": {"type": "string", "description": "JSON object"}}}}}}})
    async def search(request: Request) -> SearchOut:
        """Nearest neighbours of an uploaded image (multipart `file`), or of vectors / ids (JSON)."""
        _need_ready()
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            async with request.form(max_files=1, max_fields=10) as form:  # closes the spooled upload
                upload = form.get("file")
                if upload is None or isinstance(upload, str):
                    raise BadQuery("multipart search needs an image in the 'file' field")
                data = await upload.read()
                k = _int(form.get("k"), 10)
                where = _where(form.get("where"))
                name = _default_index(_str(form.get("index")))
            _check_k(k)
            return await _answer([Query(name, k, where, image=data)])
        try:
            body = SearchIn.model_validate_json(await request.body())
        except ValidationError as e:
            first = e.errors()[0]
            where_ = ".".join(str(p) for p in first.get("loc", ()))
            raise BadQuery(f"{where_ or 'body'}: {first.get('msg')}") from None
        name = _default_index(body.index)
        _check_k(body.k)
        items = body.queries if body.queries is not None else [QueryIn(vector=body.vector, id=body.id)]
        if not items:
            raise BadQuery("queries is empty")
        where = {k: str(v) for k, v in body.where.items()} if body.where else None
        return await _answer([Query(name, body.k, where, vector=q.vector, id=q.id) for q in items])

    def _check_k(k: int) -> None:
        if not 1 <= k <= options.max_k:
            raise BadQuery(f"k must be between 1 and {options.max_k}, got {k}")

    @app.post("/embed")
    async def embed(request: Request) -> dict[str, Any]:
        """An uploaded image's vector, made as the index's vectors are, with that provenance."""
        _need_ready()
        async with request.form(max_files=1, max_fields=5) as form:
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise BadQuery("embed needs an image in the 'file' field (multipart)")
            name = _default_index(_str(form.get("index")))
            data = await upload.read()
        vectors, emb = await asyncio.get_running_loop().run_in_executor(
            executor, engine.embed_images, name, [data])
        return {"index": name, "vector": vectors[0].tolist(), "dim": int(vectors.shape[1]),
                "provenance": emb.provenance().to_dict()}

    @app.get("/indexes")
    async def indexes() -> list[dict[str, Any]]:
        """Every served index: count, generation, provenance and measured quality."""
        _need_ready()
        return [engine.describe(n) for n in sorted(engine.indexes)]

    @app.get("/indexes/{name}")
    async def index_info(name: str) -> dict[str, Any]:
        _need_ready()
        return engine.describe(name)

    @app.post("/indexes/{name}/reload")
    async def reload(name: str) -> dict[str, Any]:
        """Load NAME's current generation now (the poller does it every few seconds anyway)."""
        _need_ready()
        changed = await asyncio.to_thread(engine.reload, name)
        return {"name": name, "generation": engine.index(name).generation, "reloaded": name in changed}

    @app.get("/items/{name}/{item_id}")
    async def item(name: str, item_id: str) -> dict[str, Any]:
        _need_ready()
        return engine.item(name, item_id)

    @app.get("/items/{name}/{item_id}/image")
    async def item_image(name: str, item_id: str) -> FileResponse:
        """The image file of an id in that index (looked up in the id map, never a path from the URL)."""
        _need_ready()
        return FileResponse(engine.item_path(name, item_id))

    @app.get("/items/{name}/{item_id}/thumbnail")
    async def item_thumbnail(name: str, item_id: str) -> Response:
        _need_ready()
        data = await asyncio.to_thread(engine.thumbnail, name, item_id)
        return Response(data, media_type="image/jpeg", headers={"cache-control": "max-age=3600"})

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        if not engine.ready:
            return _error(503, "still loading indexes and models", "not_ready")
        return JSONResponse({"status": "ready", "indexes": sorted(engine.indexes)})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(BodyLimit, limit=options.max_upload_bytes)  # type: ignore[arg-type]
    return app


class _NotReady(Exception):
    pass


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": message, "kind": kind}, status_code=status, headers={"x-error-kind": kind})


def _authorised(request: Request, key: str) -> bool:
    given = request.headers.get("x-api-key") or ""
    auth = request.headers.get("authorization") or ""
    if not given and auth.lower().startswith("bearer "):
        given = auth[7:]
    return hmac.compare_digest(given.encode(), key.encode())


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _int(value: Any, default: int) -> int:
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise BadQuery(f"k must be an integer, got {str(value)[:20]!r}") from None


def _where(value: Any) -> dict[str, str] | None:
    if value is None or value == "":
        return None
    try:
        where = json.loads(value)
    except json.JSONDecodeError:
        raise BadQuery("where must be a JSON object of COLUMN: VALUE") from None
    if not isinstance(where, dict) or not all(isinstance(v, str | int | float) for v in where.values()):
        raise BadQuery("where must be a JSON object of COLUMN: VALUE")
    return {str(k): str(v) for k, v in where.items()}

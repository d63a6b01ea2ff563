"""The HTTP layer: FastAPI routes over ``Engine``; domain errors become 4xx JSON bodies.

With an API key configured, the API (search, embed, indexes, items, metrics) requires it, as a
FastAPI security dependency (``X-API-Key`` or ``Authorization: Bearer``, compared in constant time;
both schemes are in the OpenAPI, so /docs can authorise); the page, its assets, /docs and the health
checks stay public, and the page asks for the key once. Request bodies are bounded before they are
read (413 whether or not a Content-Length was sent). Swagger UI's assets are served from the
package (no CDN). Metrics in Prometheus text format at ``/metrics`` (prometheus-client).
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

from fastapi import APIRouter, Depends, FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from embedder.errors import DecodeError, EmbedderError, ProvenanceMismatch, shown
from embedder.service.batcher import MicroBatcher
from embedder.service.engine import Answer, BadQuery, Engine, NotFound, Query, ServeOptions

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"


# ---- request and response models (the OpenAPI schema at /docs) ----------------------------------
class QueryIn(BaseModel):
    vector: list[float] | None = Field(None, description="A query vector of the index's dim (not all zeros "
                                       "for a cosine or ip index)")
    id: str | None = Field(None, description="An id in the index: search by its vector")
    exclude_self: bool = Field(False, description="With id: leave the query item out of its results")


class SearchIn(QueryIn):
    index: str | None = Field(None, description="Index name (optional when one index is served)")
    k: int = Field(10, ge=1, description="Results per query")
    where: dict[str, Any] | None = Field(
        None, description="COLUMN: VALUE filters on the id map or the store's columns (a string or number, "
                          "compared as text)")
    queries: list[QueryIn] | None = Field(None, description="A batch of queries instead of vector/id (at most "
                                          "max_queries, and k × queries at most max_results)")


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
        except* _TooLarge:  # also when a middleware's task group wrapped it in an ExceptionGroup
            await _too_large(self.limit, send)


class _TooLarge(Exception):
    """Raised by the body counter; the app's own handler answers it (413) where it is raised, so it
    never reaches a middleware that would wrap it."""


def _too_large_message(limit: int) -> str:
    return f"request body over {limit / 2**20:.3g} MiB"


async def _too_large(limit: int, send: Send) -> None:
    body = json.dumps({"error": _too_large_message(limit), "kind": "too_large"}).encode()
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
        self.in_flight = Gauge("embedder_in_flight_requests", "HTTP requests being handled", registry=self.registry)


class IndexGauges:
    """Per served index, read at scrape time: its generation and its vector count."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Any:
        gen = GaugeMetricFamily("embedder_index_generation", "Generation served", labels=["index"])
        count = GaugeMetricFamily("embedder_index_vectors", "Vectors in the served generation", labels=["index"])
        for name, loaded in sorted(self.engine.indexes.items()):
            gen.add_metric([name], loaded.generation)
            count.add_metric([name], int(loaded.index.ntotal))
        yield gen
        yield count


# ---- the app ------------------------------------------------------------------------------------
def _docs_assets() -> Path | None:
    """Swagger UI's files as the ``fastapi-offline`` package ships them (no CDN); None without it."""
    import importlib.util

    spec = importlib.util.find_spec("fastapi_offline")
    if spec is None or not spec.submodule_search_locations:
        return None
    static = Path(spec.submodule_search_locations[0]) / "static"
    return static if (static / "swagger-ui-bundle.js").is_file() else None


def create_app(options: ServeOptions = ServeOptions(), api_key: str | None = None,
               engine: Engine | None = None) -> FastAPI:
    import torch

    engine = engine or Engine(options)
    metrics = Metrics()
    metrics.registry.register(IndexGauges(engine))  # type: ignore[arg-type]
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
    # id and vector queries never wait behind a forward pass: their own batcher, their own thread
    search_executor = ThreadPoolExecutor(1, thread_name_prefix="search")

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
    cheap: MicroBatcher[Query, Answer] = MicroBatcher(
        engine.run_batch, options.batch_window_ms, options.max_batch, search_executor, options.micro_batching)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        stop = threading.Event()
        loading = asyncio.create_task(asyncio.to_thread(engine.load_all))  # /healthz answers meanwhile
        poller = None
        if options.poll_seconds > 0:
            poller = threading.Thread(target=engine.poll_forever, args=(stop,), daemon=True, name="index-poll")
            poller.start()
        await batcher.start()
        await cheap.start()
        try:
            yield
        finally:
            stop.set()
            await batcher.stop()
            await cheap.stop()
            loading.cancel()
            executor.shutdown(wait=False, cancel_futures=True)
            search_executor.shutdown(wait=False, cancel_futures=True)
            engine.close()

    assets = _docs_assets()
    app = FastAPI(title="embedder", summary="Similarity search over image embeddings", lifespan=lifespan,
                  responses=ERRORS, docs_url=None if assets else "/docs")
    app.state.engine = engine

    # ---- the API key: a security dependency on the API routes (shown in OpenAPI) ----
    key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="The server's API key")
    bearer = HTTPBearer(auto_error=False, description="The API key as a bearer token")

    async def require_key(header: str | None = Security(key_header),
                          token: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:
        given = header or (token.credentials if token else "")
        if not api_key or not hmac.compare_digest(given.encode(), api_key.encode()):
            raise _Unauthorised()

    api = APIRouter(dependencies=[Depends(require_key)] if api_key else [])

    @app.middleware("http")
    async def measure(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        t0 = time.perf_counter()
        searching = request.url.path == "/search"
        batcher.in_flight += searching  # the batchers wait for searches still being received
        cheap.in_flight += searching
        metrics.in_flight.inc()
        try:
            response: Response = await call_next(request)
        finally:
            batcher.in_flight -= searching
            cheap.in_flight -= searching
            metrics.in_flight.dec()
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

    @app.exception_handler(_TooLarge)
    async def too_large(_: Request, e: _TooLarge) -> JSONResponse:
        return _error(413, _too_large_message(options.max_upload_bytes), "too_large")

    @app.exception_handler(_Unauthorised)
    async def unauthorised(_: Request, e: _Unauthorised) -> JSONResponse:
        return _error(401, "missing or wrong API key (X-API-Key or Authorization: Bearer)", "unauthorised")

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
        answers = await asyncio.gather(*((batcher if q.image is not None else cheap).submit(q) for q in queries))
        first = answers[0]
        return SearchOut(index=first.index, generation=first.generation,
                         results=[[Hit(**h) for h in a.hits] for a in answers])

    def _check_size(k: int, n: int) -> None:
        if not 1 <= k <= options.max_k:
            raise BadQuery(f"k must be between 1 and {options.max_k}, got {k}")
        if n > options.max_queries:
            raise BadQuery(f"at most {options.max_queries} queries per request, got {n}: send them in several")
        if k * n > options.max_results:
            raise BadQuery(f"k × queries is {k * n:,}; at most {options.max_results:,} results per request")

    @api.post("/search", response_model=SearchOut, openapi_extra={"requestBody": {"content": {
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
            _check_size(k, 1)
            return await _answer([Query(name, k, where, image=data)])
        try:
            body = SearchIn.model_validate_json(await request.body())
        except ValidationError as e:
            first = e.errors()[0]
            where_ = ".".join(str(p) for p in first.get("loc", ()))
            raise BadQuery(f"{where_ or 'body'}: {first.get('msg')}") from None
        name = _default_index(body.index)
        items = body.queries if body.queries is not None else [
            QueryIn(vector=body.vector, id=body.id, exclude_self=body.exclude_self)]
        if not items:
            raise BadQuery("queries is empty")
        _check_size(body.k, len(items))
        for n, q in enumerate(items):
            if q.vector is not None and q.id is not None:
                raise BadQuery(f"query {n}: give a vector or an id, not both")
            if q.vector is None and q.id is None:
                raise BadQuery(f"query {n}: needs a vector or an id (JSON), or an image (multipart 'file')")
        where = _where_values(body.where) if body.where else None
        return await _answer([Query(name, body.k, where, vector=q.vector, id=q.id, exclude_self=q.exclude_self)
                              for q in items])

    @api.post("/embed")
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

    @api.get("/indexes")
    async def indexes() -> list[dict[str, Any]]:
        """Every served index: count, generation, provenance and measured quality."""
        _need_ready()
        return [engine.describe(n) for n in sorted(engine.indexes)]

    @api.get("/indexes/{name}")
    async def index_info(name: str) -> dict[str, Any]:
        _need_ready()
        return engine.describe(name)

    @api.post("/indexes/{name}/reload")
    async def reload(name: str) -> dict[str, Any]:
        """Load NAME's current generation now (the poller does it every few seconds anyway)."""
        _need_ready()
        changed = await asyncio.to_thread(engine.reload, name)
        return {"name": name, "generation": engine.index(name).generation, "reloaded": name in changed}

    @api.get("/items/{name}/{item_id}")
    async def item(name: str, item_id: str) -> dict[str, Any]:
        _need_ready()
        return engine.item(name, item_id)

    @api.get("/items/{name}/{item_id}/image")
    async def item_image(name: str, item_id: str) -> FileResponse:
        """The image file of an id in that index (looked up in the id map, never a path from the URL)."""
        _need_ready()
        return FileResponse(engine.item_path(name, item_id))

    @api.get("/items/{name}/{item_id}/thumbnail")
    async def item_thumbnail(name: str, item_id: str) -> Response:
        _need_ready()
        data = await asyncio.to_thread(engine.thumbnail, name, item_id)
        return Response(data, media_type="image/jpeg", headers={"cache-control": "max-age=3600"})

    @api.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # ---- public: health, the page and its assets, the API docs ----
    @app.head("/healthz", include_in_schema=False)
    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.head("/readyz", include_in_schema=False)
    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        if not engine.ready:
            return _error(503, "still loading indexes and models", "not_ready")
        body: dict[str, Any] = {"status": "ready"}
        if not api_key:  # the index names are the API's to tell
            body["indexes"] = sorted(engine.indexes)
        return JSONResponse(body)

    @app.head("/", include_in_schema=False)
    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    if assets is not None:
        app.mount("/docs-assets", StaticFiles(directory=assets), name="docs-assets")

        @app.get("/docs", include_in_schema=False)
        async def docs() -> HTMLResponse:
            return get_swagger_ui_html(openapi_url="/openapi.json", title="embedder — API",
                                       swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                       swagger_css_url="/docs-assets/swagger-ui.css",
                                       swagger_favicon_url="/docs-assets/favicon.png")

    app.include_router(api)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(BodyLimit, limit=options.max_upload_bytes)  # type: ignore[arg-type]
    return app


class _Unauthorised(Exception):
    pass


class _NotReady(Exception):
    pass


MAX_MESSAGE = 1000  # an error body never echoes input at the length it came in


def _error(status: int, message: str, kind: str) -> JSONResponse:
    if len(message) > MAX_MESSAGE:
        message = message[:MAX_MESSAGE - 1] + "…"
    return JSONResponse({"error": message, "kind": kind}, status_code=status, headers={"x-error-kind": kind})


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
    """The multipart form's ``where`` (a JSON object as text)."""
    if value is None or value == "":
        return None
    try:
        where = json.loads(value)
    except json.JSONDecodeError:
        raise BadQuery("where must be a JSON object of COLUMN: VALUE (it is not JSON)") from None
    if not isinstance(where, dict):
        raise BadQuery(f"where must be a JSON object of COLUMN: VALUE, got a {type(where).__name__}")
    return _where_values(where)


def _where_values(where: dict[str, Any]) -> dict[str, str]:
    """COLUMN: VALUE filters, values compared as text: strings and numbers only."""
    out = {}
    for col, v in where.items():
        if not isinstance(v, str | int | float):  # bool is an int
            raise BadQuery(f"where[{shown(col, 40)}] must be a string, number or boolean, got "
                           f"{'null' if v is None else type(v).__name__}: one value per column")
        out[str(col)] = ("true" if v else "false") if isinstance(v, bool) else str(v)  # as Arrow casts
    return out

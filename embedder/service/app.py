"""The HTTP service assembled: the engine, its two micro-batchers and executors, metrics, the
routers (``routes.search``, ``routes.indexes``, ``routes.public``), the error handlers
(``http_errors``) and the body limit (``limits``).

With an API key configured, the API (search, embed, indexes, items, metrics) requires it, as a
FastAPI security dependency (``auth``); the page, its assets, /docs and the health checks stay
public, and the page asks for the key once. Request bodies are bounded before they are read (413
whether or not a Content-Length was sent). Swagger UI's assets are served from the package (no
CDN). Metrics in Prometheus text format at ``/metrics`` (prometheus-client).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles

from embedder.service import auth, http_errors
from embedder.service.batcher import MicroBatcher
from embedder.service.engine import Answer, Engine, Query
from embedder.service.limits import BodyLimit
from embedder.service.metrics import IndexGauges, Metrics
from embedder.service.options import ServeOptions
from embedder.service.routes import indexes, labelling, public, search
from embedder.service.schemas import ERRORS
from embedder.service.state import Service


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

    assets = public.docs_assets()
    app = FastAPI(title="embedder", summary="Similarity search over image embeddings", lifespan=lifespan,
                  responses=ERRORS, docs_url=None if assets else "/docs")
    app.state.engine = engine
    app.state.service = Service(engine, options, metrics, batcher, cheap, executor, api_key)

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

    http_errors.install(app)
    needs_key = auth.requirement(api_key)
    app.include_router(search.router, dependencies=needs_key)
    app.include_router(indexes.router, dependencies=needs_key)
    app.include_router(labelling.router, dependencies=needs_key)
    app.include_router(public.router)
    if assets is not None:
        app.mount("/docs-assets", StaticFiles(directory=assets), name="docs-assets")
        app.include_router(public.docs_router)
    app.mount("/static", StaticFiles(directory=public.STATIC), name="static")
    app.add_middleware(BodyLimit, limit=options.max_upload_bytes,  # type: ignore[arg-type]
                       json_limit=options.max_json_bytes)
    return app

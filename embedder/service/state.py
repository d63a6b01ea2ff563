"""What the routes share: the engine, the two micro-batchers (image queries; id and vector
queries, which never wait behind a forward pass), the compute executor, metrics and options; the
routers reach it through a dependency (``ServiceDep``)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from embedder.service.batcher import MicroBatcher
from embedder.service.engine import Answer, BadQuery, Engine, Query
from embedder.service.http_errors import NotReady
from embedder.service.metrics import Metrics
from embedder.service.options import ServeOptions
from embedder.service.schemas import Hit, SearchOut


@dataclass
class Service:
    engine: Engine
    options: ServeOptions
    metrics: Metrics
    batcher: MicroBatcher[Query, Answer]  # image queries (a forward pass each)
    cheap: MicroBatcher[Query, Answer]  # id and vector queries
    executor: ThreadPoolExecutor  # compute (embedding uploads)
    api_key: str | None = None

    def need_ready(self) -> None:
        if not self.engine.ready:
            raise NotReady()

    def default_index(self, name: str | None) -> str:
        if name:
            return name
        if len(self.engine.indexes) == 1:
            return next(iter(self.engine.indexes))
        raise BadQuery(f"say which index: one of {', '.join(sorted(self.engine.indexes)) or '(none loaded)'}")

    def check_size(self, k: int, n: int, texts: int = 0) -> None:
        """K results for each of N queries, TEXTS of them texts (a forward pass each), within the caps."""
        o = self.options
        if not 1 <= k <= o.max_k:
            raise BadQuery(f"k must be between 1 and {o.max_k}, got {k}")
        if n > o.max_queries:
            raise BadQuery(f"at most {o.max_queries} queries per request, got {n}: send them in several")
        if texts > o.max_text_queries:
            raise BadQuery(f"at most {o.max_text_queries} texts per request, got {texts}: send them in several")
        if k * n > o.max_results:
            raise BadQuery(f"k × queries is {k * n:,}; at most {o.max_results:,} results per request")

    async def answer(self, queries: list[Query]) -> SearchOut:
        # images and texts go through the model, micro-batched together; vectors and ids do not
        model = [q.image is not None or q.text is not None for q in queries]
        answers = await asyncio.gather(*((self.batcher if m else self.cheap).submit(q)
                                         for q, m in zip(queries, model)))
        first = answers[0]
        return SearchOut(index=first.index, generation=first.generation,
                         results=[[Hit(**h) for h in a.hits] for a in answers])


def get_service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


ServiceDep = Annotated[Service, Depends(get_service)]

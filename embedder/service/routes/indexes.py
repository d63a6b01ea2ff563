"""The served indexes (GET /indexes, /indexes/NAME, POST /indexes/NAME/reload) and their items
(GET /items/NAME/ID, its image and thumbnail: looked up in the id map, never a path from the URL).

Routes that read an index (its id map may be memory-mapped from disk) are plain ``def``: FastAPI runs
them in its thread pool, never on the event loop."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from embedder.service.state import ServiceDep

router = APIRouter()


@router.get("/indexes")
def indexes(svc: ServiceDep) -> list[dict[str, Any]]:
    """Every served index: count, generation, provenance and measured quality."""
    svc.need_ready()
    return [svc.engine.describe(n) for n in sorted(svc.engine.indexes)]


@router.get("/indexes/{name}")
def index_info(name: str, svc: ServiceDep) -> dict[str, Any]:
    svc.need_ready()
    return svc.engine.describe(name)


@router.post("/indexes/{name}/reload")
async def reload(name: str, svc: ServiceDep) -> dict[str, Any]:
    """Load NAME's current generation now (the poller does it every few seconds anyway)."""
    svc.need_ready()
    changed = await asyncio.to_thread(svc.engine.reload, name)
    return {"name": name, "generation": svc.engine.index(name).generation, "reloaded": name in changed}


@router.get("/items/{name}/{item_id}")
def item(name: str, item_id: str, svc: ServiceDep) -> dict[str, Any]:
    """The id map's row of an id: faiss_id, id, path, label, and, where the index keeps them, caption,
    key and the kept ``columns`` (as search hits show them)."""
    svc.need_ready()
    return svc.engine.item(name, item_id)


@router.get("/items/{name}/{item_id}/image")
async def item_image(name: str, item_id: str, svc: ServiceDep) -> Response:
    """The image of an id in that index, read where its id map says (a file, a tar shard's member, a
    table's row), never a path from the URL."""
    svc.need_ready()
    data, media_type = await asyncio.to_thread(svc.engine.item_bytes, name, item_id)
    return Response(data, media_type=media_type)


@router.get("/items/{name}/{item_id}/thumbnail")
async def item_thumbnail(name: str, item_id: str, svc: ServiceDep) -> Response:
    svc.need_ready()
    data = await asyncio.to_thread(svc.engine.thumbnail, name, item_id)
    return Response(data, media_type="image/jpeg", headers={"cache-control": "max-age=3600"})


@router.get("/metrics")
async def prometheus(svc: ServiceDep) -> Response:
    return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)

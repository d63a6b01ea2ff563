"""What needs no API key: the health checks, the web page and the API docs (Swagger UI from the
package's own copy, no CDN)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

from embedder.service.http_errors import error_response
from embedder.service.state import ServiceDep

STATIC = Path(__file__).resolve().parent.parent / "static"
router = APIRouter()


@router.head("/healthz", include_in_schema=False)
@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.head("/readyz", include_in_schema=False)
@router.get("/readyz")
async def readyz(svc: ServiceDep) -> JSONResponse:
    if not svc.engine.ready:
        return error_response(503, "still loading indexes and models", "not_ready")
    body: dict[str, Any] = {"status": "ready"}
    if not svc.api_key:  # the index names are the API's to tell
        body["indexes"] = sorted(svc.engine.indexes)
    return JSONResponse(body)


@router.head("/", include_in_schema=False)
@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html")


def docs_assets() -> Path | None:
    """Swagger UI's files as the ``fastapi-offline`` package ships them (no CDN); None without it."""
    import importlib.util

    spec = importlib.util.find_spec("fastapi_offline")
    if spec is None or not spec.submodule_search_locations:
        return None
    static = Path(spec.submodule_search_locations[0]) / "static"
    return static if (static / "swagger-ui-bundle.js").is_file() else None


docs_router = APIRouter()


@docs_router.get("/docs", include_in_schema=False)
async def docs() -> HTMLResponse:
    return get_swagger_ui_html(openapi_url="/openapi.json", title="embedder — API",
                               swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                               swagger_css_url="/docs-assets/swagger-ui.css",
                               swagger_favicon_url="/docs-assets/favicon.png")

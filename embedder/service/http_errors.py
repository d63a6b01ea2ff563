"""Errors as HTTP: a domain exception's status and kind, and the one JSON body every error has."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from embedder.errors import DecodeError, EmbedderError, ProvenanceMismatch
from embedder.service.engine import BadQuery, NotFound
from embedder.service.limits import TooLarge, too_large_message

log = logging.getLogger(__name__)


def status_of(e: Exception) -> tuple[int, str]:
    if isinstance(e, NotFound):
        return 404, "not_found"
    if isinstance(e, DecodeError):
        return 422, "not_an_image"
    if isinstance(e, ProvenanceMismatch):
        return 409, "provenance"
    if isinstance(e, BadQuery | EmbedderError):
        return 400, "bad_query"
    return 500, "internal"


class Unauthorised(Exception):
    pass


class NotReady(Exception):
    pass


MAX_MESSAGE = 1000  # an error body never echoes input at the length it came in


def error_response(status: int, message: str, kind: str) -> JSONResponse:
    if len(message) > MAX_MESSAGE:
        message = message[:MAX_MESSAGE - 1] + "…"
    return JSONResponse({"error": message, "kind": kind}, status_code=status, headers={"x-error-kind": kind})


def install(app: FastAPI) -> None:
    """Every error the app can meet answered as ``{"error", "kind"}`` with its status: domain
    exceptions by type, FastAPI's own (404, 405, 422), 401, 413, 503, and anything else as 500."""

    @app.exception_handler(EmbedderError)
    async def domain_error(_: Request, e: EmbedderError) -> JSONResponse:
        status, kind = status_of(e)
        return error_response(status, str(e), kind)

    @app.exception_handler(TooLarge)
    async def too_large(_: Request, e: TooLarge) -> JSONResponse:
        return error_response(413, too_large_message(e.limit, e.is_json), "too_large")

    @app.exception_handler(Unauthorised)
    async def unauthorised(_: Request, e: Unauthorised) -> JSONResponse:
        return error_response(401, "missing or wrong API key (X-API-Key or Authorization: Bearer)", "unauthorised")

    @app.exception_handler(NotReady)
    async def not_ready(_: Request, e: NotReady) -> JSONResponse:
        return error_response(503, "still loading indexes and models", "not_ready")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http")
        return error_response(e.status_code, str(e.detail), kind)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_response(422, f"{where}: {first.get('msg', 'invalid request')}", "invalid")

    @app.exception_handler(Exception)
    async def unexpected(_: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return error_response(500, f"internal error ({type(e).__name__})", "internal")

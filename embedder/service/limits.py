"""Request bodies bounded before they are read: 413 by Content-Length, and by counting what a chunked
upload actually sends. A multipart upload (an image) may take the upload limit; any other body is
JSON, parsed whole before its queries can be counted, and takes the far smaller JSON limit."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send


# ---- plumbing -----------------------------------------------------------------------------------
class BodyLimit:
    """Refuse bodies over LIMIT bytes (multipart uploads) or JSON_LIMIT bytes (anything else)
    before they are read: by Content-Length, and by counting what a chunked upload actually sends."""

    def __init__(self, app: ASGIApp, limit: int, json_limit: int | None = None) -> None:
        self.app, self.limit = app, limit
        self.json_limit = limit if json_limit is None else min(limit, json_limit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        upload = headers.get(b"content-type", b"").lower().startswith(b"multipart/form-data")
        limit, is_json = (self.limit, False) if upload else (self.json_limit, self.json_limit < self.limit)
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await _too_large(limit, is_json, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise TooLarge(limit, is_json)
            return message

        try:
            await self.app(scope, counted, send)
        except* TooLarge:  # also when a middleware's task group wrapped it in an ExceptionGroup
            await _too_large(limit, is_json, send)


class TooLarge(Exception):
    """Raised by the body counter; the app's own handler answers it (413) where it is raised, so it
    never reaches a middleware that would wrap it."""

    def __init__(self, limit: int, is_json: bool = False) -> None:
        super().__init__(limit, is_json)
        self.limit, self.is_json = limit, is_json


def too_large_message(limit: int, is_json: bool = False) -> str:
    hint = " (a JSON body: send its queries in several requests)" if is_json else ""
    return f"request body over {limit / 2**20:.3g} MiB{hint}"


async def _too_large(limit: int, is_json: bool, send: Send) -> None:
    body = json.dumps({"error": too_large_message(limit, is_json), "kind": "too_large"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})

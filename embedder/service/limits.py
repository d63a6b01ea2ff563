"""Request bodies bounded before they are read: 413 by Content-Length, and by counting what a chunked
upload actually sends."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send


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
                    raise TooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except* TooLarge:  # also when a middleware's task group wrapped it in an ExceptionGroup
            await _too_large(self.limit, send)



class TooLarge(Exception):
    """Raised by the body counter; the app's own handler answers it (413) where it is raised, so it
    never reaches a middleware that would wrap it."""



def too_large_message(limit: int) -> str:
    return f"request body over {limit / 2**20:.3g} MiB"



async def _too_large(limit: int, send: Send) -> None:
    body = json.dumps({"error": too_large_message(limit), "kind": "too_large"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})

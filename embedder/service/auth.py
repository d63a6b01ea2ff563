"""The API key, as a FastAPI security dependency: ``X-API-Key`` or ``Authorization: Bearer``,
compared in constant time; both schemes are in the OpenAPI, so /docs can authorise."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Depends, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from embedder.service.http_errors import Unauthorised


def requirement(api_key: str | None) -> list[Any]:
    """The dependencies of the API routes: the key check when a key is configured, else none."""
    if not api_key:
        return []
    key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="The server's API key")
    bearer = HTTPBearer(auto_error=False, description="The API key as a bearer token")

    async def require_key(header: str | None = Security(key_header),
                          token: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:
        given = header or (token.credentials if token else "")
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise Unauthorised()

    check: Callable[..., Awaitable[None]] = require_key
    return [Depends(check)]

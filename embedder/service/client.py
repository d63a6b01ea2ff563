"""A small client for `embedder search --server URL` (standard library only: no import cost)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from embedder.errors import EmbedderError

# what one request carries, within a server's default caps (ServeOptions: a 2 MiB JSON body, 32 texts)
VECTORS_PER_REQUEST = 64  # 64 vectors of 1,536 floats stay under 2 MiB of JSON
TEXTS_PER_REQUEST = 32


def _post(url: str, body: bytes, content_type: str, key: str | None) -> dict[str, Any]:
    headers = {"content-type": content_type}
    if key:
        headers["x-api-key"] = key
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:  # noqa: S310 - a URL the user gave
            return json.loads(r.read())  # type: ignore[no-any-return]
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read()).get("error", e.reason)
        except (json.JSONDecodeError, AttributeError):
            message = e.reason
        raise EmbedderError(f"server said {e.code}: {message}") from None
    except (urllib.error.URLError, OSError) as e:
        raise EmbedderError(f"cannot reach {url}: {getattr(e, 'reason', e)}") from None


def _multipart(fields: dict[str, str], file: Path) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\ncontent-disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    parts.append(f'--{boundary}\r\ncontent-disposition: form-data; name="file"; filename="{file.name}"\r\n'
                 f"content-type: application/octet-stream\r\n\r\n".encode() + file.read_bytes() + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def search_remote(server: str, index: str, queries: list[str], ids: list[str], k: int,
                  where: dict[str, str], key: str | None,
                  texts: list[str] | None = None) -> list[tuple[str, list[dict[str, Any]]]]:
    """(query label, hits) per query, answered by a running service."""
    url = server.rstrip("/") + "/search"
    out: list[tuple[str, list[dict[str, Any]]]] = []
    for q in queries:
        p = Path(q)
        if not p.is_file():
            raise EmbedderError(f"query {q} is not a file (images or .npy vectors)")
        if p.suffix == ".npy":
            import numpy as np

            vecs = np.atleast_2d(np.load(p, allow_pickle=False))
            for start in range(0, len(vecs), VECTORS_PER_REQUEST):  # a JSON body stays small
                body = json.dumps({"index": index, "k": k, "where": where or None, "queries": [
                    {"vector": v.tolist()} for v in vecs[start:start + VECTORS_PER_REQUEST]]}).encode()
                r = _post(url, body, "application/json", key)
                out += [(q, hits) for hits in r["results"]]
        else:
            fields = {"index": index, "k": str(k)}
            if where:
                fields["where"] = json.dumps(where)
            body, ctype = _multipart(fields, p)
            out.append((q, _post(url, body, ctype, key)["results"][0]))
    if ids:
        body = json.dumps({"index": index, "k": k, "where": where or None,
                           "queries": [{"id": i} for i in ids]}).encode()
        r = _post(url, body, "application/json", key)
        out += [(f"id:{i}", hits) for i, hits in zip(ids, r["results"])]
    for start in range(0, len(texts or []), TEXTS_PER_REQUEST):  # the server caps texts per request
        chunk = (texts or [])[start:start + TEXTS_PER_REQUEST]
        body = json.dumps({"index": index, "k": k, "where": where or None,
                           "queries": [{"text": t} for t in chunk]}).encode()
        r = _post(url, body, "application/json", key)
        out += [(f"text:{t}", hits) for t, hits in zip(chunk, r["results"])]
    if not out:
        raise EmbedderError("no query: give image files, .npy vectors, --id ID or --text TEXT")
    return out

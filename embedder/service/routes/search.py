"""POST /search (an uploaded image, vectors or ids; filters; batches) and POST /embed."""

from __future__ import annotations

import asyncio
import json
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from pydantic import BaseModel, ValidationError

from embedder.errors import shown
from embedder.service.engine import BadQuery, Query
from embedder.service.schemas import EmbedIn, QueryIn, SearchIn, SearchOut
from embedder.service.state import ServiceDep

router = APIRouter()
MULTIPART_SEARCH = {"requestBody": {"content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/SearchIn"}},
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "file": {"type": "string", "format": "binary"}, "index": {"type": "string"},
        "k": {"type": "integer"}, "where": {"type": "string", "description": "JSON object"}}}}}}}


# unset fields (caption, key, columns of an index that keeps none) are left out, not sent as nulls
@router.post("/search", response_model=SearchOut, response_model_exclude_unset=True, openapi_extra=MULTIPART_SEARCH)
async def search(request: Request, svc: ServiceDep) -> SearchOut:
    """Nearest neighbours of an uploaded image (multipart `file`), or of vectors / ids (JSON)."""
    svc.need_ready()
    ctype = request.headers.get("content-type", "").lower()  # media types are case-insensitive (RFC 9110)
    if ctype.startswith("multipart/form-data"):
        async with request.form(max_files=1, max_fields=10) as form:  # closes the spooled upload
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise BadQuery("multipart search needs an image in the 'file' field")
            data = await upload.read()
            k = _int(form.get("k"), 10)
            where = _where(form.get("where"))
            name = svc.default_index(_str(form.get("index")))
        svc.check_size(k, 1)
        return await svc.answer([Query(name, k, where, image=data)])
    body = await _parse_off_loop(SearchIn, await request.body(), svc.options.max_queries)
    name = svc.default_index(body.index)
    items = body.queries if body.queries is not None else [
        QueryIn(vector=body.vector, id=body.id, text=body.text, exclude_self=body.exclude_self)]
    if not items:
        raise BadQuery("queries is empty")
    svc.check_size(body.k, len(items), texts=sum(q.text is not None for q in items))
    for n, q in enumerate(items):
        given = sum(x is not None for x in (q.vector, q.id, q.text))
        if given > 1:
            raise BadQuery(f"query {n}: give one of a vector, an id or a text, not several")
        if given == 0:
            raise BadQuery(f"query {n}: needs a vector, an id or a text (JSON), or an image (multipart 'file')")
    where = _where_values(body.where) if body.where else None
    return await svc.answer([Query(name, body.k, where, vector=q.vector, id=q.id, text=q.text,
                                   exclude_self=q.exclude_self) for q in items])


EMBED_BODY = {"requestBody": {"content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/EmbedIn"}},
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "file": {"type": "string", "format": "binary"}, "index": {"type": "string"}}}}}}}


@router.post("/embed", openapi_extra=EMBED_BODY)
async def embed(request: Request, svc: ServiceDep) -> dict[str, Any]:
    """An uploaded image's vector (multipart ``file``), or texts' vectors (JSON ``{"text": ...}``, models
    with a text tower), made as the index's vectors are, with that provenance."""
    svc.need_ready()
    if request.headers.get("content-type", "").lower().startswith("application/json"):
        text_body = await _parse_off_loop(EmbedIn, await request.body())
        texts = [text_body.text] if isinstance(text_body.text, str) else text_body.text
        if not texts:
            raise BadQuery("text is an empty list")
        svc.check_size(1, len(texts), texts=len(texts))
        name = svc.default_index(text_body.index)
        vectors, emb = await asyncio.get_running_loop().run_in_executor(
            svc.executor, svc.engine.embed_texts, name, texts)
        return {"index": name, "vectors": vectors.tolist(), "dim": int(vectors.shape[1]),
                "provenance": emb.provenance().to_dict()}
    async with request.form(max_files=1, max_fields=5) as form:
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise BadQuery("embed needs an image in the 'file' field (multipart)")
        name = svc.default_index(_str(form.get("index")))
        data = await upload.read()
    vectors, emb = await asyncio.get_running_loop().run_in_executor(
        svc.executor, svc.engine.embed_images, name, [data])
    return {"index": name, "vector": vectors[0].tolist(), "dim": int(vectors.shape[1]),
            "provenance": emb.provenance().to_dict()}


M = TypeVar("M", bound=BaseModel)


PARSE_INLINE_BYTES = 64 * 1024  # smaller bodies parse in well under a millisecond: not worth a thread hop


async def _parse_off_loop(model: type[M], raw: bytes, max_queries: int | None = None) -> M:
    """``_parse`` in a worker thread for a large body, so that the event loop goes on answering
    meanwhile (as far as the GIL lets it: the JSON body limit bounds the rest); with MAX_QUERIES, a
    body of more queries is refused before a model is made of each (``_count_queries``)."""
    if len(raw) <= PARSE_INLINE_BYTES:
        return _parse(model, raw)

    def parse() -> M:
        if max_queries is not None:
            _count_queries(raw, max_queries)
        return _parse(model, raw)

    return await asyncio.to_thread(parse)


def _count_queries(raw: bytes, most: int) -> None:
    """Refuse a search body of over MOST queries before pydantic makes a model of each (measured: a
    2 MiB body of 175,000 tiny id queries, 0.19 s of held GIL and 100 MB; plain JSON parsing is a
    third of that). Each query is a JSON object: a body with few braces has few queries, and only a
    body with many is parsed twice."""
    if raw.count(b"{") <= most + 2:  # the body, the filter and the queries are the objects
        return
    try:
        doc = json.loads(raw)
    except ValueError:
        return  # pydantic says what is wrong with it
    queries = doc.get("queries") if isinstance(doc, dict) else None
    if isinstance(queries, list) and len(queries) > most:
        raise BadQuery(f"at most {most} queries per request, got {len(queries)}: send them in several")


def _parse(model: type[M], raw: bytes) -> M:
    """A JSON body as MODEL; the first thing wrong with it as a one-line 400 (for a value that may be
    a text or a list of texts, what is wrong with it rather than that it is not the other kind)."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        errors = e.errors()
        first = next((x for x in errors if not x["type"].endswith("_type")), errors[0])
        # a union's member appears in the location by its schema's name ("list[constrained-str]")
        where_ = ".".join(str(p) for p in first.get("loc", ()) if not (isinstance(p, str) and ("[" in p or "-" in p)))
        raise BadQuery(f"{where_ or 'body'}: {first.get('msg')}") from None


# ---- the multipart form's fields -----------------------------------------------------------------
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

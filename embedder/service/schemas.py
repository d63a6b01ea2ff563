"""Request and response models: the OpenAPI schema at /docs."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


# ---- request and response models (the OpenAPI schema at /docs) ----------------------------------
class QueryIn(BaseModel):
    vector: list[float] | None = Field(None, description="A query vector of the index's dim (not all zeros "
                                       "for a cosine or ip index)")
    id: str | None = Field(None, description="An id in the index: search by its vector")
    text: str | None = Field(None, description="A text, embedded by the text tower of the index's model (CLIP-family "
                             "backbones only); an empty text or one over the model's context length is refused "
                             "(400), never cut")
    exclude_self: bool = Field(False, description="With id: leave the query item out of its results")



class SearchIn(QueryIn):
    index: str | None = Field(None, description="Index name (optional when one index is served)")
    k: int = Field(10, ge=1, description="Results per query")
    where: dict[str, Any] | None = Field(
        None, description="COLUMN: VALUE filters on the id map or the store's columns (a string or number, "
                          "compared as text)")
    queries: list[QueryIn] | None = Field(None, description="A batch of queries instead of vector/id (at most "
                                          "max_queries, and k × queries at most max_results)")



class EmbedIn(BaseModel):
    index: str | None = Field(None, description="Index name (optional when one index is served)")
    text: str | list[str] = Field(..., description="A text or a list of texts to embed with the index's text tower")


class Hit(BaseModel):
    rank: int
    score: float
    id: str
    path: str
    label: str | None



class SearchOut(BaseModel):
    index: str
    generation: int
    results: list[list[Hit]]



class ErrorOut(BaseModel):
    error: str
    kind: str



ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": ErrorOut} for s in (400, 401, 404, 413, 422, 503)}

"""Request and response models: the OpenAPI schema at /docs."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field

# Hard ceilings on what one body may hold, whatever the server's options (its caps, ServeOptions'
# max_queries and max_text_queries, are lower and answered with a clearer message). They bound the
# schema at /docs; the work of parsing is bounded by the JSON body limit (``limits``).
MAX_LIST = 10_000  # queries, or texts to embed
MAX_DIM = 65_536  # floats in a vector
MAX_TEXT = 10_000  # characters in a text (a text tower's context is far shorter)
MAX_WHERE = 64  # columns in a filter
Text = Annotated[str, Field(max_length=MAX_TEXT)]


# ---- request and response models (the OpenAPI schema at /docs) ----------------------------------
class QueryIn(BaseModel):
    vector: list[float] | None = Field(None, max_length=MAX_DIM, description="A query vector of the index's "
                                       "dim (not all zeros for a cosine or ip index)")
    id: str | None = Field(None, description="An id in the index: search by its vector")
    text: Text | None = Field(None, description="A text, embedded by the text tower of the index's model (CLIP-family "
                             "backbones only); an empty text or one over the model's context length is refused "
                             "(400), never cut")
    exclude_self: bool = Field(False, description="With id: leave the query item out of its results")


class SearchIn(QueryIn):
    index: str | None = Field(None, description="Index name (optional when one index is served)")
    k: int = Field(10, ge=1, description="Results per query")
    where: dict[str, Any] | None = Field(
        None, max_length=MAX_WHERE, description="COLUMN: VALUE filters on the id map or the store's columns (a "
                                                "string or number, compared as text)")
    queries: list[QueryIn] | None = Field(None, max_length=MAX_LIST, description="A batch of queries instead of "
                                          "vector/id (at most max_queries, at most max_text_queries texts, and "
                                          "k × queries at most max_results)")


class EmbedIn(BaseModel):
    index: str | None = Field(None, description="Index name (optional when one index is served)")
    text: Text | Annotated[list[Text], Field(max_length=MAX_LIST)] = Field(
        ..., description="A text or a list of texts to embed with the index's text tower (at most max_text_queries)")


class Hit(BaseModel):
    rank: int
    score: float
    id: str
    path: str
    label: str | None
    # present where the index keeps them (`index build --keep-columns`; by default the caption and key
    # where the store has them), absent otherwise (indexes built before them answer as they did)
    caption: str | None = Field(None, description="The item's caption (a tar sample's .txt, a table's caption column)")
    key: str | None = Field(None, description="The user's key (the --id-column value the id was made from)")
    columns: dict[str, str | None] | None = Field(None, description="Other columns the index keeps, as text")


class SearchOut(BaseModel):
    index: str
    generation: int
    results: list[list[Hit]]


class ErrorOut(BaseModel):
    error: str
    kind: str


ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": ErrorOut} for s in (400, 401, 404, 413, 422, 503)}


# ---- labelling (routes.labelling) -----------------------------------------------------------------
class LabelIn(BaseModel):
    label: Annotated[str, Field(max_length=MAX_TEXT)] = Field(
        ..., description="The class: trimmed, 1 to 100 characters, no control characters")


class Progress(BaseModel):
    labelled: int
    total: int


class LabelClass(BaseModel):
    name: str
    count: int = Field(description="Items of the selection with this label")


class SelectionInfo(BaseModel):
    name: str
    size: int | None = Field(description="Items in the selection (None: the file is no selection)")
    labelled: int | None = Field(description="Items with a label (None: its labels file cannot be read)")
    error: str | None = Field(None, description="Why the file is no selection, or its labels file cannot be read")


class LabelItem(BaseModel):
    id: str
    rank: int
    why: str | None
    path: str | None
    label: str | None
    in_index: bool | None = Field(description="Whether the chosen index has this id (its thumbnail); None: no index")


class SelectionPage(BaseModel):
    name: str
    index: str | None
    offset: int
    items: list[LabelItem] = Field(description="The selection's items in rank order, from offset")
    not_in_index: int = Field(description="Of these items, how many the index does not have")
    classes: list[LabelClass] = Field(description="The classes given so far, in the order first used")
    progress: Progress
    meta: dict[str, Any] = Field(description="What `embedder select` recorded (store, strategy, budget…)")
    labels_file: str


class LabelChange(BaseModel):
    id: str
    label: str | None = Field(description="The item's label now (None: none)")
    previous: str | None = Field(description="Its label before (what undo puts back)")
    classes: list[LabelClass]
    progress: Progress

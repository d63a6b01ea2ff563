"""Labelling a selection from the page (``embedder.service.labelling`` does the work): GET /labelling
(the selections under HOME/labelling), GET /labelling/NAME (its items in rank order, a page at a time,
with their labels, the classes so far and the progress), PUT and DELETE /labelling/NAME/labels/ID
(label an item, take its label away: written to HOME/labelling/NAME.labels.parquet before the answer).

Every route is a plain ``def`` (files are read and written): FastAPI runs them in its thread pool, never
on the event loop. A name that is no plain name, a file that is no selection and a bad label are 4xx
with the one JSON error body, never a 500."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse

from embedder.service import labelling as lab
from embedder.service.http_errors import error_response
from embedder.service.schemas import ErrorOut, LabelChange, LabelIn, SelectionInfo, SelectionPage
from embedder.service.state import Service, ServiceDep

router = APIRouter()
MAX_PAGE = 5000
RESPONSES: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorOut, "description": "The labels file on disk cannot be read (it is left as it is)"},
    503: {"model": ErrorOut, "description": "The labels file cannot be written (a read-only home, a full disk); "
                                            "nothing changed"}}


def _error(e: lab.LabellingError) -> JSONResponse:
    if isinstance(e, lab.UnknownSelection | lab.UnknownItem):
        return error_response(404, str(e), "not_found")
    if isinstance(e, lab.SelectionTooLarge):
        return error_response(413, str(e), "too_large")
    if isinstance(e, lab.NotASelection):
        return error_response(422, str(e), "not_a_selection")
    if isinstance(e, lab.CannotWrite):  # a read-only home, a full disk: the server itself is fine
        return error_response(503, str(e), "cannot_write")
    if isinstance(e, lab.LabelsFileError):
        return error_response(409, str(e), "labels_file")
    return error_response(422, str(e), "invalid")  # a bad name or label


def _home(svc: Service) -> lab.Labelling:
    return lab.for_home(svc.options.home)


@router.get("/labelling", response_model=list[SelectionInfo])
def selections(svc: ServiceDep) -> Any:
    """The selections in HOME/labelling (write one with `embedder select STORE --budget N --out
    HOME/labelling/NAME.parquet`), each with its size and how many of its items are labelled."""
    home = _home(svc)
    out = []
    for name in home.names():
        try:
            sel = home.selection(name)
        except lab.LabellingError as e:
            out.append(SelectionInfo(name=name, size=None, labelled=None, error=str(e)))
            continue
        try:
            done: int | None = lab.progress(sel, home.labels(name))["labelled"]
            error = None
        except lab.LabellingError as e:  # its labels file cannot be read
            done, error = None, str(e)
        out.append(SelectionInfo(name=name, size=len(sel), labelled=done, error=error))
    return out


@router.get("/labelling/{name}", response_model=SelectionPage, responses=RESPONSES)
def selection(name: str, svc: ServiceDep, index: str | None = None,
              offset: int = Query(0, ge=0), limit: int = Query(1000, ge=1, le=MAX_PAGE)) -> Any:
    """Selection NAME's items in rank order (LIMIT from OFFSET), each with its label, and whether INDEX
    (whose thumbnails the page shows) has it; the classes so far and the progress."""
    home = _home(svc)
    try:
        sel = home.selection(name)
        labels = home.labels(name)
    except lab.LabellingError as e:
        return _error(e)
    loaded = None
    if index:
        svc.need_ready()
        loaded = svc.engine.index(index)  # unknown: 404
    rows = sel.table.slice(offset, limit).to_pylist()
    items = []
    for r in rows:
        in_index = None if loaded is None else loaded.row_of(r["id"]) is not None
        items.append({**r, "label": labels.get(r["id"]), "in_index": in_index})
    return {"name": name, "index": index or None, "offset": offset, "items": items,
            "not_in_index": sum(i["in_index"] is False for i in items), "classes": lab.classes(sel, labels),
            "progress": lab.progress(sel, labels), "meta": sel.meta,
            "labels_file": str(home.path_of(name, lab.LABELS_SUFFIX))}


def _change(svc: Service, name: str, item_id: str, label: str | None) -> Any:
    home = _home(svc)
    try:
        done = home.set_label(name, item_id, label)
        sel = home.selection(name)
        labels = home.labels(name)
    except lab.LabellingError as e:
        return _error(e)
    return {"id": done.id, "label": done.label, "previous": done.previous,
            "classes": lab.classes(sel, labels), "progress": lab.progress(sel, labels)}


@router.put("/labelling/{name}/labels/{item_id:path}", response_model=LabelChange, responses=RESPONSES)
def put_label(name: str, item_id: str, body: LabelIn, svc: ServiceDep) -> Any:
    """Label item ITEM_ID of selection NAME (an id the selection has; the label trimmed, 1 to 100
    characters, no control characters). The answer says its previous label, for undo."""
    return _change(svc, name, item_id, body.label)


@router.delete("/labelling/{name}/labels/{item_id:path}", response_model=LabelChange, responses=RESPONSES)
def delete_label(name: str, item_id: str, svc: ServiceDep) -> Any:
    """Take item ITEM_ID's label away (undo of a first label)."""
    return _change(svc, name, item_id, None)

"""`embedder search`: the nearest images to images, stored ids, vectors or text, from a built index."""

from __future__ import annotations

import json
import os
from typing import Annotated, Any, Optional

import typer
from rich.table import Table
from rich.text import Text

from embedder.cli.common import HomeOpt, console, fit_paths, handle_errors, out
from embedder.errors import IndexError_


def _parse_where(where: list[str]) -> dict[str, str]:
    cond = {}
    for w in where:
        col, sep, value = w.partition("=")
        if not sep or not col:
            raise IndexError_(f"--where takes COLUMN=VALUE, got {w!r}")
        cond[col.strip()] = value
    return cond


@handle_errors
def search_command(
    name: Annotated[str, typer.Argument(help="Index name.")],
    queries: Annotated[Optional[list[str]], typer.Argument(help="Image files or .npy vectors.")] = None,
    k: Annotated[int, typer.Option("-k", help="Results per query.")] = 10,
    ids: Annotated[Optional[list[str]], typer.Option("--id", help="Query by an indexed item's id.")] = None,
    texts: Annotated[Optional[list[str]], typer.Option("--text", help="Query by text (repeatable), on an index made with a CLIP-family backbone (open_clip:…): its text tower embeds it. An empty text, or one longer than the model's context length (77 tokens for CLIP), is refused, never cut.")] = None,
    where: Annotated[Optional[list[str]], typer.Option(help="COLUMN=VALUE filter, e.g. label=shirt.")] = None,
    weights: Annotated[Optional[str], typer.Option(help="Weights file, if the store was made from one.")] = None,
    device: Annotated[str, typer.Option()] = "auto",
    home: HomeOpt = None,
    server: Annotated[Optional[str], typer.Option(help="Ask a running `embedder serve` (e.g. http://127.0.0.1:8000) instead of loading anything.")] = None,
    api_key_env: Annotated[Optional[str], typer.Option(help="Environment variable holding the server's API key.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines.")] = False,
    exclude_self: Annotated[bool, typer.Option("--exclude-self", help="With --id: leave the query item out of its own results.")] = False,
) -> None:
    """Nearest neighbours of images, vectors, indexed ids or texts; several queries in one batch."""
    if k <= 0:
        raise IndexError_(f"-k must be positive, got {k}")
    if server:
        from embedder.service.client import search_remote

        key = os.environ.get(api_key_env) if api_key_env else None
        where_ = _parse_where(where or [])
        results = search_remote(server, name, queries or [], ids or [], k, where_, key, texts or [])
        _print_results(results, as_json)
        return
    import numpy as np

    from embedder.embed.query import QueryBuilder, QueryRequest, embedder_for
    from embedder.index import search as index_search

    loaded = index_search.LoadedIndex(name, home)
    queries_ = QueryBuilder(loaded, lambda: embedder_for(loaded.provenance, weights, device,
                                                         store=loaded.meta.get("store")))
    labels: list[str] = []
    vecs: list[np.ndarray] = []
    for q in queries or []:
        if q.endswith(".npy"):
            try:
                v = np.load(q, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise IndexError_(f"cannot read vector file {q}: {e}") from None
            try:
                vecs.append(queries_.vectors(v))
            except IndexError_ as e:
                raise IndexError_(f"{q}: {e}") from None
            labels += [q] * len(vecs[-1])
    request = QueryRequest(images=tuple(q for q in queries or [] if not q.endswith(".npy")),
                           texts=tuple(texts or ()), ids=tuple(loaded.full_id(i) for i in ids or ()))
    if request.images or request.texts or request.ids:
        v, more = queries_.build(request)
        vecs.append(v)
        labels += more
    if not vecs:
        raise IndexError_("no query: give image files, .npy vectors, --id ID or --text TEXT")
    where_ = _parse_where(where or [])
    found = loaded.search(np.concatenate(vecs), k + int(exclude_self), where_)
    if exclude_self:
        found = [index_search.without_item(h, lab[3:], k) if lab.startswith("id:") else h[:k]
                 for lab, h in zip(labels, found)]
    if where_ and not any(found):
        console.print(f"no item of index {name!r} matches {' and '.join(f'{c}={v}' for c, v in where_.items())}"
                      + _values_hint(loaded, where_), markup=False)
    _print_results(list(zip(labels, found)), as_json)


def _values_hint(loaded: Any, where: dict[str, str]) -> str:
    """The values of the first filter column, where the index keeps them (low-cardinality columns)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = next(iter(where))
    sel = loaded.selector(col)
    if sel is not None:
        values = sorted(sel.values)
    elif col in loaded.ids.column_names:  # the id map's: one pass, only when nothing matched
        values = sorted(str(v) for v in pc.unique(loaded.ids.column(col).cast(pa.string())).drop_null().to_pylist())
    else:
        values = []
    return f" (its values: {', '.join(values[:10])}{' …' if len(values) > 10 else ''})" if values else ""


ID_SHOWN = 12  # `search --id` takes this prefix back (LoadedIndex.full_id)


def _print_results(results: list, as_json: bool) -> None:  # type: ignore[type-arg]
    for label, hits in results:
        if as_json:
            for h in hits:
                out.print(json.dumps({"query": label, **h}), soft_wrap=True, markup=False)
            continue
        labels = [str(h["label"] or "") for h in hits]
        # rank 4, score 6, id 12, label, and the table's borders and padding (3 per column + 1)
        room = out.width - 4 - 6 - ID_SHOWN - min(max(map(len, labels), default=5), 16) - 16
        root, paths = fit_paths([str(h["path"]) for h in hits], room)
        title = f"query: {label}" + (f"   (paths under {root}/)" if root else "")
        table = Table("rank", "score", "id", "path", "label", title=title, title_justify="left")
        table.columns[3].no_wrap = True
        for h, path, lab in zip(hits, paths, labels):
            more = _more(h, max(room, 12))  # caption, key, kept columns: a second line under the path
            cell = Text(path) if not more else Text.assemble(path, "\n", (more, "dim"))
            table.add_row(str(h["rank"]), f"{h['score']:.4f}", h["id"][:ID_SHOWN], cell, lab)
        out.print(table)


def _more(hit: dict[str, Any], width: int) -> str:
    """What a hit holds beyond id, path and label (its key, caption and kept columns), as one line
    cut to WIDTH characters (``--json`` has them whole)."""
    parts = ([f"key {hit['key']}"] if hit.get("key") is not None else []) + (
        [" ".join(str(hit["caption"]).split())] if hit.get("caption") else []) + [
        f"{c}={v}" for c, v in (hit.get("columns") or {}).items() if v is not None]
    line = " · ".join(parts)
    return line if len(line) <= width else line[:width - 1] + "…"


def register(app: typer.Typer) -> None:
    app.command("search")(search_command)

"""`embedder index build|add|list|info|drop`, `embedder search`, `embedder dedup`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from embedder import choices
from embedder.cli.common import console, handle_errors, out
from embedder.errors import IndexError_
from embedder.index import generations as layout

index_app = typer.Typer(help="Build and manage FAISS indexes over stores.", no_args_is_help=True)

HomeOpt = Annotated[Optional[str], typer.Option("--home", help="Index home (default: $EMBEDDER_HOME or ./indexes).")]


def parse_size(text: str) -> int:
    """'512MB', '2GB', '1.5GiB', '1000000' → bytes (powers of 1024: budgets are memory)."""
    import re

    from embedder.errors import IndexError_

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?B)?\s*", text.upper())
    if not m:
        raise IndexError_(f"cannot read the memory budget {text!r}; write e.g. 512MB or 2GB")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " "))


@index_app.command("build")
@handle_errors
def build_command(
    store: Annotated[str, typer.Argument(help="Store directory or s3://bucket/prefix.")],
    name: Annotated[str, typer.Option("--name", help="Index name.")],
    kind: Annotated[str, typer.Option(help="auto | flat | hnsw | ivf | ivfpq | a FAISS factory string")] = "auto",
    metric: Annotated[choices.Metric, typer.Option(help="How vectors are compared.")] = choices.Metric.cosine,
    target_recall: Annotated[float, typer.Option(min=0.01, max=1.0, help="Recall@10 the search parameter is tuned to.")] = 0.95,
    memory_budget: Annotated[Optional[str], typer.Option(help="e.g. 512MB, 2GB (default: a quarter of RAM). IVF over budget is built streamed, its lists on disk.")] = None,
    on_disk: Annotated[bool, typer.Option("--on-disk", help="IVF kinds: streamed build with inverted lists on disk, even within budget.")] = False,
    coarse: Annotated[choices.Coarse, typer.Option(help="IVF coarse quantizer (auto: HNSW from 16,384 lists).")] = choices.Coarse.auto,
    opq: Annotated[bool, typer.Option("--opq", help="IVF-PQ: learn a rotation (OPQ) before product quantization.")] = False,
    engine: Annotated[choices.Engine, typer.Option(help="ray: the streamed IVF build's adds as Ray tasks (lists on disk).")] = choices.Engine.local,
    address: Annotated[Optional[str], typer.Option(help="--engine ray: auto, HOST:PORT or ray://… (default: a local Ray instance).")] = None,
    home: HomeOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Build an index over STORE; measures recall@10 against exact search on held-out queries."""
    from embedder.index import build as idx
    from embedder.index import plan as index_plan

    budget = parse_size(memory_budget) if memory_budget else None
    with console.status(f"building {name}…"):
        meta = idx.build(str(store), name, index_plan.BuildOptions(kind=kind, metric=str(metric),
                         target_recall=target_recall, memory_budget=budget, on_disk=on_disk,
                         coarse=str(coarse), opq=opq, engine=str(engine), address=address), home)
    if as_json:
        out.print_json(json.dumps(meta))
        return
    _print_info(meta)


def _print_info(meta: dict) -> None:  # type: ignore[type-arg]
    q = meta["quality"]
    out.print(f"[bold]{meta['name']}[/bold]: {meta['factory']} ({meta['kind']}), {meta['metric']}, "
              f"{meta['count']:,} vectors of dim {meta['dim']}, {meta['index_bytes'] / 2**20:.1f} MiB")
    out.print(f"why        {meta['reason']}")
    if q.get("recall_at_10") is not None:
        param = f"{q['param']}={q['value']}" if q.get("param") else "exact"
        out.print(f"quality    recall@{q['k']} {q['recall_at_10']:.3f} vs exact on {q['queries']} held-out "
                  f"queries, {q['qps']:,.0f} QPS batched ({param}, target {q['target']})")
    elif q.get("not_measured"):
        out.print(f"quality    recall@10 not measured: {q['not_measured']}")
    out.print(f"store      {meta['store']} ({meta['provenance']['backbone']}, layer "
              f"{meta['provenance']['layer']})")
    out.print(f"built      {meta['built_at']} in {meta['build_seconds']:.2f} s; generation {meta.get('generation', 0)}")


@index_app.command("info")
@handle_errors
def info_command(name: str, home: HomeOpt = None,
                 as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Kind, size, provenance and measured quality of an index."""
    meta = layout.info(name, home)
    if as_json:
        out.print_json(json.dumps(meta))
    else:
        _print_info(meta)


@index_app.command("list")
@handle_errors
def list_command(home: HomeOpt = None) -> None:
    """Indexes in the home."""
    table = Table("name", "kind", "count", "dim", "recall@10", "store")
    for n in layout.names(home):
        m = layout.info(n, home)
        table.add_row(n, m["factory"], f"{m['count']:,}", str(m["dim"]),
                      str(m["quality"].get("recall_at_10")), m["store"])
    out.print(table)


@index_app.command("drop")
@handle_errors
def drop_command(name: str, home: HomeOpt = None) -> None:
    """Delete an index."""
    layout.drop(name, home)
    out.print(f"dropped {name}")


@index_app.command("add")
@handle_errors
def add_command(name: str, store: str, home: HomeOpt = None,
                merge: Annotated[bool, typer.Option("--merge", help="On-disk index: merge every delta into the lists now (an add otherwise writes a delta and merges only once the deltas hold 10 % of the rows).")] = False) -> None:
    """Add STORE's rows that the index does not hold yet."""
    from embedder.index import build as idx

    r = idx.add(name, str(store), home, merge=merge)
    deltas = f"; {r['deltas']} delta{'s' if r['deltas'] != 1 else ''} beside the lists" if r.get("deltas") else ""
    out.print(f"added {r['added']}, skipped {r['skipped']} already present; {r['count']:,} vectors{deltas}")


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
    where: Annotated[Optional[list[str]], typer.Option(help="COLUMN=VALUE filter, e.g. label=shirt.")] = None,
    weights: Annotated[Optional[str], typer.Option(help="Weights file, if the store was made from one.")] = None,
    device: Annotated[str, typer.Option()] = "auto",
    home: HomeOpt = None,
    server: Annotated[Optional[str], typer.Option(help="Ask a running `embedder serve` (e.g. http://127.0.0.1:8000) instead of loading anything.")] = None,
    api_key_env: Annotated[Optional[str], typer.Option(help="Environment variable holding the server's API key.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines.")] = False,
) -> None:
    """Nearest neighbours of images, vectors or indexed ids; several queries in one batch."""
    if k <= 0:
        raise IndexError_(f"-k must be positive, got {k}")
    if server:
        from embedder.service.client import search_remote

        key = os.environ.get(api_key_env) if api_key_env else None
        where_ = _parse_where(where or [])
        results = search_remote(server, name, queries or [], ids or [], k, where_, key)
        _print_results(results, as_json)
        return
    import numpy as np

    from embedder.index import search as index_search

    loaded = index_search.LoadedIndex(name, home)
    labels: list[str] = []
    vecs: list[np.ndarray] = []
    images = [q for q in queries or [] if not q.endswith(".npy")]
    for q in queries or []:
        if q.endswith(".npy"):
            try:
                v = np.load(q, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise IndexError_(f"cannot read vector file {q}: {e}") from None
            v = np.atleast_2d(v)
            vecs.append(loaded.prepare(v))
            labels += [q] * len(v)
    if images:
        from embedder.embed.query import embed_files, embedder_for

        missing = [p for p in images if not Path(p).is_file()]
        if missing:
            raise IndexError_(f"query {missing[0]} is not a file (images or .npy vectors)")
        emb = embedder_for(loaded.provenance, weights, device)
        vecs.append(embed_files(emb, images))
        labels += images
    for i in ids or []:
        vecs.append(loaded.vector_of(i))
        labels.append(f"id:{i}")
    if not vecs:
        raise IndexError_("no query: give image files, .npy vectors or --id ID")
    found = loaded.search(np.concatenate(vecs), k, _parse_where(where or []))
    _print_results(list(zip(labels, found)), as_json)


def _print_results(results: list, as_json: bool) -> None:  # type: ignore[type-arg]
    for label, hits in results:
        if as_json:
            for h in hits:
                out.print(json.dumps({"query": label, **h}), soft_wrap=True, markup=False)
            continue
        table = Table("rank", "score", "id", "path", "label", title=f"query: {label}", title_justify="left")
        for h in hits:
            table.add_row(str(h["rank"]), f"{h['score']:.4f}", h["id"][:12], h["path"], h["label"] or "")
        out.print(table)


@handle_errors
def dedup_command(
    store: str,
    out_file: Annotated[Path, typer.Option("--out", help="Parquet file: group, id, path.")] = Path("duplicates.parquet"),
    threshold: Annotated[Optional[float], typer.Option(help="Cosine similarity at or above which images group (default 0.90, as `inspect`: JPEG-recompressed, downscaled copies measured 0.93-0.998, distinct photos ≤ 0.63).")] = None,
) -> None:
    """Near-duplicate groups by range search."""
    from embedder.analysis.dedup import dedup

    s = dedup(str(store), str(out_file), threshold)
    out.print(f"{s.images:,} images: {s.groups:,} near-duplicate groups, {s.duplicates:,} images beyond "
              f"the first of each group (cosine ≥ {s.threshold}) → {s.out}")


def register(app: typer.Typer) -> None:
    app.add_typer(index_app, name="index")
    app.command("search")(search_command)
    app.command("dedup")(dedup_command)

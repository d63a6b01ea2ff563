"""`embedder index build|add|list|info|drop`."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer
from rich.table import Table

from embedder import choices
from embedder.cli.common import HomeOpt, console, handle_errors, out
from embedder.errors import IndexError_
from embedder.index import generations as layout
from embedder.index.plan import BuildOptions

index_app = typer.Typer(help="Build and manage FAISS indexes over stores.", no_args_is_help=True)


def parse_size(text: str) -> int:
    from embedder.sizes import parse_size as parse

    return parse(text, IndexError_)


@index_app.command("build")
@handle_errors
def build_command(
    store: Annotated[str, typer.Argument(help="Store directory or s3://bucket/prefix.")],
    name: Annotated[str, typer.Option("--name", help="Index name.")],
    kind: Annotated[str, typer.Option(help="auto | flat | hnsw | ivf | ivfpq | a FAISS factory string")] = BuildOptions.kind,
    metric: Annotated[choices.Metric, typer.Option(help="How vectors are compared.")] = choices.Metric(BuildOptions.metric),
    target_recall: Annotated[float, typer.Option(min=0.01, max=1.0, help="Recall@10 the search parameter is tuned to.")] = BuildOptions.target_recall,
    memory_budget: Annotated[Optional[str], typer.Option(help="e.g. 512MB, 2GB (default: a quarter of RAM). IVF over budget is built streamed, its lists on disk.")] = None,
    on_disk: Annotated[bool, typer.Option("--on-disk", help="IVF kinds: streamed build with inverted lists on disk, even within budget.")] = False,
    coarse: Annotated[choices.Coarse, typer.Option(help="IVF coarse quantizer (auto: HNSW from 16,384 lists).")] = choices.Coarse(BuildOptions.coarse),
    opq: Annotated[bool, typer.Option("--opq", help="IVF-PQ: learn a rotation (OPQ) before product quantization.")] = False,
    engine: Annotated[choices.Engine, typer.Option(help="ray: the streamed IVF build's adds as Ray tasks (lists on disk).")] = choices.Engine(BuildOptions.engine),
    address: Annotated[Optional[str], typer.Option(help="--engine ray: auto, HOST:PORT or ray://… (default: a local Ray instance).")] = None,
    text_recall: Annotated[bool, typer.Option("--text-recall/--no-text-recall", help="On a store with captions made by a backbone with a text tower: measure text → image recall@1/5/10 (caption i should find image i) on a sample of captions.")] = True,
    weights: Annotated[Optional[str], typer.Option(help="Weights file, if the store was made from one (--text-recall loads the model).")] = None,
    keep_columns: Annotated[Optional[str], typer.Option("--keep-columns", metavar="COLS", help="What hits show beyond id, path and label, kept in the index's id map (comma-separated): caption, width, height, file_hash (the store's), key (the --id-column value), or any column of the source tables (read at each row's location); 'none' for nothing. Default: caption and key where the store has them.")] = None,
    home: HomeOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Build an index over STORE; measures recall@10 against exact search on held-out queries, and
    text → image recall on the store's captions where its model has a text tower."""
    from embedder.index import build as idx
    from embedder.index import plan as index_plan

    budget = parse_size(memory_budget) if memory_budget else None
    with console.status(f"building {name}…"):
        meta = idx.build(str(store), name, index_plan.BuildOptions(
            kind=kind, metric=str(metric), target_recall=target_recall, memory_budget=budget, on_disk=on_disk,
            coarse=str(coarse), opq=opq, engine=str(engine), address=address, text_recall=text_recall,
            weights=weights), home, None if keep_columns is None else tuple(keep_columns.split(",")))
    if as_json:
        out.print_json(json.dumps(meta))
        return
    _print_info(meta)


def _print_info(meta: dict) -> None:  # type: ignore[type-arg]
    q = meta["quality"]
    out.print(f"[bold]{meta['name']}[/bold]: {meta['factory']} ({meta['kind']}), {meta['metric']}, "
              f"{meta['count']:,} vectors of dim {meta['dim']}, {meta['index_bytes'] / 2**20:.1f} MiB")
    out.print(f"why        {meta['reason']}")
    if q.get("exact"):
        n = q.get("queries", 0)
        qps = f", {q['qps']:,.0f} QPS batched on {n} held-out {'query' if n == 1 else 'queries'}" if q.get("qps") else ""
        out.print(f"quality    exact search (flat index): recall@10 1.000 by construction{qps}")
    elif q.get("recall_at_10") is not None:
        param = f"{q['param']}={q['value']}" if q.get("param") else "exact"
        out.print(f"quality    recall@{q['k']} {q['recall_at_10']:.3f} vs exact on {q['queries']} held-out "
                  f"queries, {q['qps']:,.0f} QPS batched ({param}, target {q['target']})")
    elif q.get("not_measured"):
        out.print(f"quality    recall@10 not measured: {q['not_measured']}")
    tr = meta.get("text_recall")
    if tr and tr.get("captions"):
        out.print(f"text→image recall@1 {tr['recall_at_1']:.3f}  @5 {tr['recall_at_5']:.3f}  @10 "
                  f"{tr['recall_at_10']:.3f} on {tr['captions']:,} captions (caption i finds image i)"
                  + (f"; {tr['skipped']} left out (empty or over the context length)" if tr["skipped"] else ""))
    elif tr and tr.get("not_measured"):
        out.print(f"text → image recall not measured: {tr['not_measured']}", markup=False)
    elif tr:
        out.print(f"text → image recall not measured: none of {tr['skipped']:,} sampled captions fits the "
                  "text tower (empty or over the context length)")
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


def _recall_cell(q: dict) -> str:  # type: ignore[type-arg]
    if q.get("exact"):
        return "1.000 (exact)"
    r = q.get("recall_at_10")
    return f"{r:.3f}" if r is not None else "not measured"


@index_app.command("list")
@handle_errors
def list_command(home: HomeOpt = None) -> None:
    """Indexes in the home."""
    table = Table("name", "kind", "count", "dim", "recall@10", "store")
    for n in layout.names(home):
        m = layout.info(n, home)
        table.add_row(n, m["factory"], f"{m['count']:,}", str(m["dim"]),
                      _recall_cell(m["quality"]), m["store"])
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


def register(app: typer.Typer) -> None:
    app.add_typer(index_app, name="index")

"""`embedder info STORE`."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from embedder.cli.common import handle_errors, out


@handle_errors
def info_command(
    store: Annotated[str, typer.Argument(help="Store directory or s3://bucket/prefix.")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Provenance, row count, dim, label counts and error count of a store."""
    from embedder.store.shards import Store

    info = Store.open(store).info()
    if as_json:
        out.print_json(json.dumps(info.to_dict()))
        return
    p = info.provenance
    pre = p.preprocessing
    out.print(f"[bold]{info.path}[/bold]: {info.rows} rows, dim {info.dim}, {info.shards} shards, "
              f"{info.errors} failed images")
    out.print(f"backbone   {p.backbone}  layer {p.layer}  pool {p.pool}")
    out.print(f"weights    {p.weights.describe()}  sha256 {p.weights.sha256[:16]}…")
    resize = (f"squash to {pre.crop_size}×{pre.crop_size} ({pre.interpolation})" if pre.resize_mode == "squash"
              else f"resize {pre.resize_size} ({pre.interpolation}), crop {pre.crop_size}")
    out.print(f"preprocess {resize}, mean {list(pre.mean)}, std {list(pre.std)}; decoder {p.decoder}")
    if p.text:
        out.print(f"text tower {p.text.get('tokenizer')}, context length {p.text.get('context_length')} tokens")
    out.print(f"vectors    {p.precision} compute, stored {p.dtype}, normalize {p.normalize}; "
              f"created {p.created_at} (provenance v{p.version})")
    out.print("versions   " + ", ".join(f"{k} {v}" for k, v in p.versions.items()))
    if info.runs:
        last = info.runs[-1]
        graph = f", CPU graph {last['cpu_graph']}" if last.get("cpu_graph") else ""
        out.print(f"last run   {last.get('started')} on {last.get('device')} ({last.get('precision')}{graph})")
    if info.labels:
        table = Table("label", "images")
        for label, n in info.labels.items():
            table.add_row(label, str(n))
        out.print(table)


def register(app: typer.Typer) -> None:
    app.command("info")(info_command)

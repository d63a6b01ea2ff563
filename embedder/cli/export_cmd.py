"""`embedder export`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from embedder.cli.common import handle_errors, out, setup_logging


@handle_errors
def export_command(
    source: Annotated[Path, typer.Argument(help="An `embedder finetune` checkpoint, or an `embedder probe` file.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder to write model.onnx and embedder-export.json to (new or empty).")],
    format: Annotated[str, typer.Option("--format", help="Model format: onnx.")] = "onnx",
    opset: Annotated[Optional[int], typer.Option(help="ONNX opset (default: torch's exporter's own).")] = None,
    weights: Annotated[Optional[str], typer.Option(help="Weights file, if the probe's store was made from one.")] = None,
    force: Annotated[bool, typer.Option(help="Replace model.onnx and embedder-export.json in a folder that is not empty.")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """One model for deployment: backbone and head, uint8 RGB pixels in, class probabilities out,
    checked against PyTorch by onnxruntime; its preprocessing and classes in embedder-export.json."""
    from embedder.learn.export import export

    setup_logging(verbose)
    result = export(source, out_dir, format, opset, weights=weights, force=force)
    if as_json:
        out.print(json.dumps(result.to_dict()), soft_wrap=True, markup=False)
        return
    size = f"{result.size_bytes / 2**20:.1f} MiB" if result.size_bytes >= 2**20 else f"{result.size_bytes / 2**10:.0f} KiB"
    out.print(f"{result.source.get('backbone')} {result.source['kind']}, {len(result.classes)} classes → "
              f"{result.model} ({size}, opset {result.opset}), {result.metadata}", markup=False)
    out.print(f"onnxruntime {result.onnxruntime} against PyTorch: max |Δp| {result.max_abs_diff:.2g} "
              f"(tolerance {result.tolerance:g})", markup=False)
    for note in result.notes:
        out.print(f"note: {note}", markup=False)


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)

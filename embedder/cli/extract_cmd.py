"""`embedder extract`, `embedder backbones`, `embedder weights import`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.table import Table

from embedder.backbones import REGISTRY, parse_backbone_spec, weights_present
from embedder.cli.common import console, handle_errors, image_progress, out, setup_logging
from embedder.errors import EmbedderError

if TYPE_CHECKING:  # torch loads when a command needs a model, not at start-up
    from embedder.model import ModelSpec

DEFAULT_BACKBONE = "resnet50"  # the library's default (embedder.model.DEFAULT_BACKBONE; a test checks)

EXIT_SOME_FAILED = 3

weights_app = typer.Typer(help="Manage pretrained weights in torchvision's cache.", no_args_is_help=True)


def model_spec(backbone: Optional[str], weights: Optional[Path], layer: Optional[str], pool: Optional[str],
               image_size: Optional[int]) -> ModelSpec:
    """No --backbone: a checkpoint's own, else the default. A conflict is refused when loading."""
    from embedder.model import ModelSpec

    if backbone is None:
        return ModelSpec(None if weights is not None else DEFAULT_BACKBONE, None, weights, layer, pool, image_size)
    entry, tag = parse_backbone_spec(backbone)
    return ModelSpec(entry.name, tag, weights, layer, pool, image_size)


@handle_errors
def extract_command(
    sources: Annotated[list[str], typer.Argument(help="Folders, globs, image files, or CSV/Parquet/text lists.")],
    out_store: Annotated[str, typer.Option("--out", "-o", help="Store directory or s3://bucket/prefix (created or appended).")],
    backbone: Annotated[Optional[str], typer.Option(help="Registry name, optionally NAME:WEIGHTS_TAG (default: resnet50, or the --weights checkpoint's own).")] = None,
    weights: Annotated[Optional[Path], typer.Option(help="Local state dict or finetune checkpoint.")] = None,
    layer: Annotated[Optional[str], typer.Option(help="Take features from this module (e.g. layer3), pooled.")] = None,
    pool: Annotated[Optional[str], typer.Option(help="avg | max | gem (default: the model's own).")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Crop size; default: the weights' own.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Default: 4 on CPU, 128 on CUDA.")] = None,
    workers: Annotated[Optional[int], typer.Option(min=1, help="Decode workers (default: cores - 1); with --engine ray, model actors (default 1).")] = None,
    decode_in: Annotated[str, typer.Option(help="threads | processes | lanes (each CPU model lane decodes its own batch) | auto (processes when the model is on a GPU, lanes on a CPU whose lanes have one thread each).")] = "auto",
    decode_priority: Annotated[str, typer.Option(help="normal | idle (decode workers only on cores nothing else wants).")] = "normal",
    model_lanes: Annotated[Optional[int], typer.Option(help="CPU: batches computed at once, each on its share of the threads (default: 2 with 2+ cores).")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda[:N]")] = "auto",
    precision: Annotated[str, typer.Option(help="auto | fp32 | bf16 | fp16")] = "auto",
    dtype: Annotated[str, typer.Option(help="Stored dtype: float32 | float16")] = "float32",
    normalize: Annotated[str, typer.Option(help="none | l2")] = "none",
    shard_rows: Annotated[int, typer.Option(min=1, help="Rows per Parquet shard.")] = 4096,
    retry_failed: Annotated[bool, typer.Option(help="Try images that failed in earlier runs again.")] = False,
    decoder: Annotated[str, typer.Option(help="pil (bit-identical to the weights' transforms) | pil-draft | pil-reduce (large JPEGs ~2x faster: DCT-domain downscale to 2x the target, then the exact resize) | torchvision (JPEGs ~2x faster, pixels within 1 level) | nvjpeg (JPEGs decoded on the GPU) | auto (the fastest measured to match pil: torchvision).")] = "pil",
    fast_decode: Annotated[bool, typer.Option(help="Same as --decoder pil-draft (JPEG draft mode).")] = False,
    compile_model: Annotated[bool, typer.Option("--compile", help="torch.compile the model (tens of seconds up front; faster on long runs).")] = False,
    cpu_graph: Annotated[str, typer.Option(help="CPU, fp32: eager | onednn (TorchScript graph optimised for oneDNN) | auto (time both on runs of 1,000+ images at batch 4, keep the faster).")] = "auto",
    engine: Annotated[str, typer.Option(help="local | ray (Ray Data: decode tasks + model actors; pip install 'embedder[ray]').")] = "local",
    address: Annotated[Optional[str], typer.Option(help="Ray: auto | HOST:PORT | ray://HOST:PORT (default: a local Ray instance).")] = None,
    gpus_per_worker: Annotated[float, typer.Option(min=0, help="Ray: GPUs per model actor (--workers actors).")] = 0.0,
    cpus_per_worker: Annotated[float, typer.Option(min=0.01, help="Ray: CPUs per model actor (fractional).")] = 0.5,
    decode_cpus: Annotated[float, typer.Option(min=0.01, help="Ray: CPUs per decode task.")] = 0.5,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Embed images with a frozen pretrained backbone into a resumable Parquet store."""
    from embedder.extract import EmbedOptions, RunOptions, extract

    setup_logging(verbose)
    spec = model_spec(backbone, weights, layer, pool, image_size)
    embed = EmbedOptions(device=device, precision=precision, dtype=dtype, normalize=normalize,
                         decoder="pil-draft" if fast_decode else decoder, compile=compile_model, cpu_graph=cpu_graph)
    run = RunOptions(batch_size=batch_size, workers=workers, decode_in=decode_in, shard_rows=shard_rows,
                     retry_failed=retry_failed, decode_priority=decode_priority, model_lanes=model_lanes)
    if engine not in ("local", "ray"):
        raise EmbedderError(f"unknown engine {engine!r}; valid: local, ray")
    with image_progress("embedding", enabled=not as_json) as progress:
        if engine == "ray":
            from embedder.ray_engine import RayOptions, extract_ray

            ray_opts = RayOptions(address=address, workers=workers or 1, gpus_per_worker=gpus_per_worker,
                                  cpus_per_worker=cpus_per_worker, decode_cpus=decode_cpus, batch_size=batch_size)
            summary = extract_ray(sources, str(out_store), spec, embed, run, ray_opts, progress)
        else:
            summary = extract(sources, str(out_store), spec, embed, run, progress)
    if as_json:
        out.print_json(json.dumps(summary.to_dict()))
    else:
        console.print(
            f"[green]done[/green] {summary.done}  skipped (already present) {summary.skipped_present}"
            f"  skipped (failed before) {summary.skipped_failed_before}  failed {summary.failed}"
            f"  {summary.images_per_second:.1f} img/s on {summary.device}  → {out_store}"
        )
        st = summary.stages
        if st and summary.done:
            console.print(f"  bound by {st['bound_by']}: model busy {st['model_utilisation']:.0%} of the run, "
                          f"waited {st['decode_wait_s']:.1f} s for decoding, {st['write_s']:.1f} s writing")
        for path, reason in summary.failures[:10]:
            console.print(f"  [red]failed[/red] {path}: {reason}")
        if summary.failed > 10:
            console.print(f"  … and {summary.failed - 10} more (see `embedder info {out_store}`)")
    if summary.failed:
        raise typer.Exit(EXIT_SOME_FAILED)


@handle_errors
def backbones_command(
    as_json: Annotated[bool, typer.Option("--json")] = False,
    layers: Annotated[Optional[str], typer.Option(help="List the stage-level layers of this backbone.")] = None,
) -> None:
    """List registered backbones: dim, GFLOPs, ImageNet acc@1, weights present locally."""
    if layers:
        from embedder.backbones import get_backbone, suggested_layers

        entry = get_backbone(layers)
        for name in suggested_layers(entry.name):
            out.print(name)
        return
    rows = []
    for b in REGISTRY.values():
        meta = b.meta()
        rows.append({"name": b.name, "dim": b.dim, "gflops": meta["gflops"], "acc1": meta["acc1"],
                     "weights": meta["weights"], "file": meta["file"], "present": weights_present(b)})
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table("name", "dim", "GFLOPs", "acc@1", "weights", "present")
    for r in rows:
        table.add_row(r["name"], str(r["dim"]), "" if r["gflops"] is None else f"{r['gflops']:.2f}",
                      "" if r["acc1"] is None else f"{r['acc1']:.2f}", r["weights"],
                      "[green]yes[/green]" if r["present"] else "no")
    out.print(table)


@weights_app.command("import")
@handle_errors
def weights_import(file: Annotated[Path, typer.Argument(help="A torchvision weights file.")]) -> None:
    """Check FILE against the registry (SHA-256 prefix) and install it into torchvision's cache."""
    from embedder.weights import import_weights

    which, target = import_weights(file)
    out.print(f"installed {which} → {target}")


def register(app: typer.Typer) -> None:
    app.command("extract")(extract_command)
    app.command("backbones")(backbones_command)
    app.add_typer(weights_app, name="weights")

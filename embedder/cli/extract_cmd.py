"""`embedder extract`, `embedder backbones`, `embedder weights import`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.table import Table

from embedder import choices
from embedder.cli.common import console, handle_errors, image_progress, out, setup_logging, value
from embedder.embed.options import EmbedOptions, RayOptions, RunOptions
from embedder.errors import EmbedderError
from embedder.io.options import SourceOptions
from embedder.models.hub import present_files, weights_present
from embedder.models.registry import REGISTRY

if TYPE_CHECKING:  # torch loads when a command needs a model, not at start-up
    pass


EXIT_SOME_FAILED = 3
PERF = "Speed"
STORE = "Store"
SOURCES = "Tar shards and tables"
RAY = "Ray cluster (--engine ray)"

weights_app = typer.Typer(help="Manage pretrained weights in torchvision's cache.", no_args_is_help=True)


@handle_errors
def extract_command(
    sources: Annotated[list[str], typer.Argument(help="Folders, globs, image files, CSV/TSV/text lists, WebDataset tar shards (brace ranges: shards/{00000..00099}.tar), Parquet/Arrow/Feather tables of image bytes, datasets.save_to_disk folders; local or s3://. A Parquet file with an image-bytes column is read as images, one without as a list of paths.")],
    out_store: Annotated[str, typer.Option("--out", "-o", help="Store directory or s3://bucket/prefix (created or appended).")],
    backbone: Annotated[Optional[str], typer.Option(help="Registry name, optionally NAME:WEIGHTS_TAG (default: resnet50, or the --weights checkpoint's own). Appending to an existing --out store with none of --backbone, --weights, --layer, --pool, --image-size: the store's own model.")] = None,
    weights: Annotated[Optional[Path], typer.Option(help="Local state dict or finetune checkpoint.")] = None,
    layer: Annotated[Optional[str], typer.Option(help="Take features from this module (e.g. layer3), pooled.")] = None,
    pool: Annotated[Optional[choices.Pool], typer.Option(help="Pooling of a --layer's feature map (default: the model's own).")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Crop size; default: the weights' own.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Default: 4 on CPU, 128 on CUDA.")] = None,
    workers: Annotated[Optional[int], typer.Option(min=1, help="Decode workers (default: cores - 1). Not on Ray: there decode tasks take --decode-cpus, model actors are --actors.", rich_help_panel=PERF)] = None,
    decode_in: Annotated[choices.DecodeIn, typer.Option(help="threads, processes, lanes (each CPU model lane decodes its own batch), or auto (processes when the model is on a GPU, lanes on a CPU whose lanes have one thread each).", rich_help_panel=PERF)] = choices.DecodeIn(RunOptions.decode_in),
    decode_priority: Annotated[choices.DecodePriority, typer.Option(help="idle: decode workers only on cores nothing else wants.", rich_help_panel=PERF)] = choices.DecodePriority(RunOptions.decode_priority),
    model_lanes: Annotated[Optional[int], typer.Option(help="CPU: batches computed at once, each on its share of the threads (default: 2 with 2+ cores).", rich_help_panel=PERF)] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda[:N]")] = EmbedOptions.device,
    precision: Annotated[choices.Precision, typer.Option(help="Compute precision (auto: bf16 on CUDA, fp32 on CPU).")] = choices.Precision(EmbedOptions.precision),
    dtype: Annotated[choices.Dtype, typer.Option(help="Stored dtype.", rich_help_panel=STORE)] = choices.Dtype(EmbedOptions.dtype),
    normalize: Annotated[choices.Normalize, typer.Option(help="Stored vectors L2-normalised or as the model gives them.", rich_help_panel=STORE)] = choices.Normalize(EmbedOptions.normalize),
    shard_rows: Annotated[int, typer.Option(min=1, help="Rows per Parquet shard.", rich_help_panel=STORE)] = RunOptions.shard_rows,
    retry_failed: Annotated[bool, typer.Option(help="Try images that failed in earlier runs again.", rich_help_panel=STORE)] = RunOptions.retry_failed,
    image_column: Annotated[Optional[str], typer.Option(help="Tables: the column of image bytes (default: the first binary or {bytes, path} column, e.g. Hugging Face's image).", rich_help_panel=SOURCES)] = SourceOptions.image_column,
    label_column: Annotated[Optional[str], typer.Option(help="Tables: the label column (default: label; ClassLabel integers get their names from the schema).", rich_help_panel=SOURCES)] = SourceOptions.label_column,
    caption_column: Annotated[Optional[str], typer.Option(help="Tables: the caption column, stored as caption (default: caption, text or txt). Tar shards: a sample's .txt.", rich_help_panel=SOURCES)] = SourceOptions.caption_column,
    id_column: Annotated[Optional[str], typer.Option(help="Tables: a key column whose values make the ids, per table file (see --global-keys; default: ids from where the row lives; a repeated key is recorded, not merged).", rich_help_panel=SOURCES)] = SourceOptions.id_column,
    json_label_key: Annotated[str, typer.Option(help="Tar shards: the key of a sample's .json holding its label (a .cls member wins).", rich_help_panel=SOURCES)] = SourceOptions.json_label_key,
    global_keys: Annotated[bool, typer.Option(help="Tables: --id-column's keys name the same item in every table (default: a key is its table file's, so two tables with the same keys are different items); a key repeated across the tables is recorded as failed, not merged. A store keeps the id scheme it was filled with.", rich_help_panel=SOURCES)] = SourceOptions.global_keys,
    decoder: Annotated[choices.Decoder, typer.Option(help="pil: bit-identical to the weights' transforms; pil-draft: JPEG draft mode; pil-reduce: large JPEGs ~2x faster (DCT-domain downscale to 2x the target, then the exact resize); torchvision: JPEGs ~2x faster, pixels within 1 level; nvjpeg: JPEGs decoded on the GPU; auto: the fastest measured to match pil (torchvision).", rich_help_panel=PERF)] = choices.Decoder(EmbedOptions.decoder),
    fast_decode: Annotated[bool, typer.Option(help="Same as --decoder pil-draft (JPEG draft mode).", rich_help_panel=PERF)] = False,
    max_image_mb: Annotated[float, typer.Option(min=0.001, help="An image's encoded size limit (a file, an object, a tar member, a table row): a bigger one is a recorded failure, never read. The service's --max-upload-mb has the same default.", rich_help_panel=SOURCES)] = EmbedOptions.max_image_bytes / 2**20,
    compile_model: Annotated[bool, typer.Option("--compile", help="torch.compile the model (tens of seconds up front; faster on long runs).", rich_help_panel=PERF)] = EmbedOptions.compile,
    cpu_graph: Annotated[choices.CpuGraph, typer.Option(help="CPU, fp32: eager, onednn (TorchScript graph optimised for oneDNN), or auto (time both on runs of 1,000+ images at batch 4, keep the faster).", rich_help_panel=PERF)] = choices.CpuGraph(EmbedOptions.cpu_graph),
    runtime: Annotated[choices.Runtime, typer.Option(help="CPU, fp32: torch, onnx (ONNX Runtime on the model exported once, cached by weights digest), or auto (ONNX Runtime where a trial on this machine, on runs of 100+ images, measured it faster with vectors at cosine >= 0.9999 to torch's; the decision is cached per model and machine).", rich_help_panel=PERF)] = choices.Runtime(EmbedOptions.runtime),
    engine: Annotated[choices.Engine, typer.Option(help="ray: Ray Data, decode tasks + model actors (pip install 'embedder\\[ray]').", rich_help_panel=RAY)] = choices.Engine.local,
    address: Annotated[Optional[str], typer.Option(help="auto, HOST:PORT or ray://HOST:PORT (default: a local Ray instance).", rich_help_panel=RAY)] = None,
    actors: Annotated[Optional[int], typer.Option(min=1, help="Model actors (default 1).", rich_help_panel=RAY)] = None,
    gpus_per_worker: Annotated[float, typer.Option(min=0, help="GPUs per model actor.", rich_help_panel=RAY)] = RayOptions.gpus_per_worker,
    cpus_per_worker: Annotated[float, typer.Option(min=0.01, help="CPUs per model actor (fractional).", rich_help_panel=RAY)] = RayOptions.cpus_per_worker,
    decode_cpus: Annotated[float, typer.Option(min=0.01, help="CPUs per decode task.", rich_help_panel=RAY)] = RayOptions.decode_cpus,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Embed images with a frozen pretrained backbone into a resumable Parquet store."""
    from embedder.embed.run import run_extract
    from embedder.models.builder import spec_for

    setup_logging(verbose)
    spec = spec_for(backbone, weights, layer, value(pool), image_size)
    if backbone is None and weights is None and layer is None and pool is None and image_size is None:
        spec = _store_own_model(str(out_store)) or spec  # appending: the store's model, not the default
    if fast_decode and decoder not in ("pil", "pil-draft"):
        raise EmbedderError(f"--fast-decode is --decoder pil-draft; it cannot go with --decoder {decoder}: give one")
    if engine == "ray" and workers is not None:
        raise EmbedderError("--workers is the local engine's decode workers; on Ray give --actors (model actors) "
                            "and --decode-cpus (per decode task)")
    if engine != "ray" and actors is not None:
        raise EmbedderError("--actors is for --engine ray (model actors); locally --workers sets the decode workers")
    # the typed choices go on as the plain strings the library records
    embed = EmbedOptions(device=device, precision=str(precision), dtype=str(dtype), normalize=str(normalize),
                         decoder="pil-draft" if fast_decode else str(decoder), compile=compile_model,
                         cpu_graph=str(cpu_graph), runtime=str(runtime), max_image_bytes=int(max_image_mb * 2**20))
    run = RunOptions(batch_size=batch_size, workers=workers, decode_in=str(decode_in), shard_rows=shard_rows,
                     retry_failed=retry_failed, decode_priority=str(decode_priority), model_lanes=model_lanes,
                     sources=SourceOptions(image_column, label_column, caption_column, id_column, json_label_key,
                                           global_keys))
    with image_progress("embedding", enabled=not as_json) as progress:
        ray_opts = None
        if engine == "ray":
            ray_opts = RayOptions(address=address, workers=actors or 1, gpus_per_worker=gpus_per_worker,
                                  cpus_per_worker=cpus_per_worker, decode_cpus=decode_cpus, batch_size=batch_size)
        summary = run_extract(sources, str(out_store), spec, embed, run, ray_opts, progress)
    if as_json:
        out.print_json(json.dumps(summary.to_dict()))
    else:
        console.print(
            f"[green]done[/green] {summary.done}  skipped (already present) {summary.skipped_present}"
            f"  skipped (failed before) {summary.skipped_failed_before}  failed {summary.failed}"
            f"  {summary.images_per_second:.1f} img/s on {summary.device}  → {out_store}"
        )
        st = summary.stages
        if st and summary.done and st.get("stream_s"):
            # the rate above counts start-up: loading the model, discovery, settling the CPU graph and
            # runtime; the images' own rate is apart (short runs are decided by start-up)
            prepare = float(st.get("prepare_s", 0.0))
            start = summary.seconds - st["stream_s"] + prepare
            after = summary.done / max(st["stream_s"] - prepare, 1e-9)
            console.print(f"  start-up {start:.1f} s (loading the model, finding the images, {prepare:.1f} s settling "
                          f"the CPU graph and runtime), then {after:.1f} img/s")
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
def _store_own_model(store: str) -> Any:
    """An existing store's own model (backbone, weights — its remembered file where it was made from
    one —, layer, pooling, size), for an append that names none; None where there is no store yet."""
    from embedder.embed.query import spec_from_provenance
    from embedder.io import storage
    from embedder.store.shards import MANIFEST, Store

    if not storage.exists(storage.join(storage.resolve(store), MANIFEST)):
        return None
    prov = Store.open(store).provenance
    spec = spec_from_provenance(prov, None, store)
    console.print(f"appending to {store} with its own model: {prov.backbone}", markup=False)
    return spec


def backbones_command(
    as_json: Annotated[bool, typer.Option("--json")] = False,
    layers: Annotated[Optional[str], typer.Option(help="List the stage-level layers of this backbone.")] = None,
) -> None:
    """List backbones: torchvision's registry (dim, GFLOPs, ImageNet acc@1) and a curated handful of timm and
    OpenCLIP models (published figure, text tower); whether their weights are present locally."""
    if layers:
        from embedder.models.layers import suggested_layers
        from embedder.models.registry import get_backbone

        entry = get_backbone(layers)
        for name in suggested_layers(entry.name):
            out.print(name)
        return
    rows = []
    for b in REGISTRY.values():
        meta = b.meta()
        rows.append({"name": b.name, "dim": b.dim, "gflops": meta["gflops"], "acc1": meta["acc1"],
                     "weights": meta["weights"], "file": meta["file"], "present": weights_present(b),
                     "present_files": present_files(b)})
    from embedder.models.curated import CURATED, MEASURED
    from embedder.models.hf_cache import hub_cached

    family_rows = []
    for c in CURATED:
        m = MEASURED.get(c.name, {})
        family_rows.append({"name": c.name, "family": c.family, "dim": m.get("dim"), "gflops": m.get("gflops"),
                            "image_size": m.get("size"), "published": c.figure, "source": c.source,
                            "text_tower": c.text, "hub": m.get("hub"), "present": hub_cached(str(m.get("hub") or ""))})
    if as_json:
        out.print_json(json.dumps([{"family": "torchvision", **r} for r in rows] + family_rows))
        return
    table = Table("name", "dim", "GFLOPs", "acc@1", "weights", "present")
    for r in rows:
        table.add_row(r["name"], str(r["dim"]), "" if r["gflops"] is None else f"{r['gflops']:.2f}",
                      "" if r["acc1"] is None else f"{r['acc1']:.2f}", r["weights"],
                      "[green]yes[/green]" if r["present"] else
                      "another tag's"  # a file of another weights tag (the JSON names it)
                      if r["present_files"] else "no")
    out.print(table)
    from rich.table import Column

    fam = Table(Column("timm and OpenCLIP (a few of many)", no_wrap=True), "dim", "GFLOPs", "size",
                "published", "text", "present")
    for r in family_rows:
        figure = f"{r['published']} ({r['source']})" if r["published"] else ""
        fam.add_row(str(r["name"]), str(r["dim"] or ""), "" if r["gflops"] is None else f"{r['gflops']:.2f}",
                    str(r["image_size"] or ""), figure, "yes" if r["text_tower"] else "no",
                    "[green]yes[/green]" if r["present"] else "no")
    out.print(fam)
    out.print("and any other timm model as timm:MODEL[.TAG] (pip install 'embedder[timm]') or OpenCLIP model as "
              "open_clip:ARCH[:PRETRAINED] (pip install 'embedder[clip]'; open_clip.list_pretrained() names them); "
              "weights come from the Hugging Face hub cache (HF_HOME) or --weights FILE", markup=False)


@weights_app.command("import")
@handle_errors
def weights_import(
    file: Annotated[Path, typer.Argument(help="A weights file.")],
    backbone: Annotated[Optional[str], typer.Option(help="timm:MODEL.TAG or open_clip:ARCH:TAG: check FILE by loading it into that model and install it in the Hugging Face cache, where the name alone then finds it offline.")] = None,
) -> None:
    """Install a weights file where the default path finds it: a torchvision file into torchvision's cache
    (recognised by its SHA-256 prefix), a timm or OpenCLIP file into the Hugging Face cache (--backbone)."""
    from embedder.models.builder import import_family_weights
    from embedder.models.hub import import_weights

    which, target = import_family_weights(file, backbone) if backbone else import_weights(file)
    out.print(f"installed {which} → {target}")
    if backbone:  # a torchvision file is recognised by its published SHA-256; these only load without error
        out.print("checked by loading it into the architecture, not against the hub: stores made with it record "
                  "these weights as imported, not hub-verified", markup=False)


def register(app: typer.Typer) -> None:
    app.command("extract")(extract_command)
    app.command("backbones")(backbones_command)
    app.add_typer(weights_app, name="weights")

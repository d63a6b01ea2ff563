"""`embedder finetune`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from embedder import choices
from embedder.cli.common import console, handle_errors, out, setup_logging, value
from embedder.learn.finetune.options import LAYER_DECAY, FinetuneOptions
from embedder.models.registry import DEFAULT_BACKBONE


@handle_errors
def finetune_command(
    train_source: Annotated[list[str], typer.Argument(help="Labelled images (one subfolder per class).")],
    out_file: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint to write (.safetensors).")],
    val: Annotated[Optional[list[str]], typer.Option("--val", help="Validation images (default: split of train).")] = None,
    labels: Annotated[Optional[list[Path]], typer.Option("--labels", help="Repeatable (rounds of labelling: a later file wins for an id). " + "CSV or Parquet of id,label rows, keyed by the ids extraction gives these images (a store of them shows them; `embedder select` writes them): their labels put over the folders' (train and --val); images it does not name keep their folder's (none: not trained on), ids not among the images are ignored and counted.")] = None,
    val_fraction: Annotated[float, typer.Option()] = FinetuneOptions.val_fraction,
    backbone: Annotated[Optional[str], typer.Option(help=f"Registry name, optionally NAME:WEIGHTS_TAG (default: {DEFAULT_BACKBONE}, or the --weights checkpoint's own).")] = None,
    weights: Annotated[Optional[Path], typer.Option(help="Start from this state dict instead.")] = None,
    epochs: Annotated[Optional[int], typer.Option(min=1, help=f"Total epochs, head epochs included (default: {FinetuneOptions.epochs}).")] = None,
    budget: Annotated[Optional[float], typer.Option(help="Minutes: pick the crop size and epochs to fit (instead of --epochs/--image-size).")] = None,
    head_epochs: Annotated[Optional[int], typer.Option(min=0, help=f"Frozen-backbone epochs first (default: {FinetuneOptions.head_epochs}; 0: the head starts as the probe).")] = None,
    probe_init: Annotated[bool, typer.Option(help="Start the head from the frozen probe (LP-FT): never below the probe.")] = FinetuneOptions.probe_init,
    flip: Annotated[bool, typer.Option(help="Horizontal flips in training (--no-flip for text, digits, ...).")] = FinetuneOptions.flip,
    freeze_backbone: Annotated[bool, typer.Option(help="Train the head only.")] = FinetuneOptions.freeze_backbone,
    unfreeze_from: Annotated[Optional[str], typer.Option(help="Earliest stage to train (e.g. layer3).")] = None,
    lr_head: Annotated[Optional[float], typer.Option(help=f"(default: {FinetuneOptions.lr_head:g})")] = None,
    lr_backbone: Annotated[Optional[float], typer.Option(help=f"(default: {FinetuneOptions.lr_backbone:g})")] = None,
    lr_decay: Annotated[Optional[float], typer.Option(help=f"Per-stage factor going down (discriminative rates) (default: {FinetuneOptions.lr_decay:g}).")] = None,
    layer_decay: Annotated[Optional[float], typer.Option(help=f"Per-block factor going down, layer-wise decay (default: {LAYER_DECAY:g} for timm/OpenCLIP models without BatchNorm, off for BatchNorm networks; 1: off).")] = None,
    zero_shot_init: Annotated[bool, typer.Option(help="CLIP models: start from the zero-shot head (class-name prompts) where it beats the probe on validation.")] = FinetuneOptions.zero_shot_init,
    wise_ft: Annotated[bool, typer.Option(help="CLIP models: WiSE-FT, the weights mixed with the start's, the mix chosen on validation.")] = FinetuneOptions.wise_ft,
    grad_checkpointing: Annotated[bool, typer.Option(help="Recompute block activations in backward (timm, OpenCLIP): less memory, ~30% more time.")] = FinetuneOptions.grad_checkpointing,
    precision: Annotated[str, typer.Option(help="auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16.")] = FinetuneOptions.precision,
    memory_budget: Annotated[Optional[str], typer.Option(help="Refuse in one line a run whose training step needs more, naming what fits (e.g. 8GB; default: the free GPU or machine memory).")] = None,
    label_smoothing: Annotated[Optional[float], typer.Option(help=f"(default: {FinetuneOptions.label_smoothing:g})")] = None,
    crop_scale: Annotated[Optional[float], typer.Option(help=f"Smallest area fraction of a random resized crop; 1: no random crop, the evaluation geometry (default: {FinetuneOptions.crop_scale:g}).")] = None,
    bn: Annotated[Optional[choices.BatchNorm], typer.Option(help=f"BatchNorm statistics (default: {FinetuneOptions.bn}).")] = None,
    ema: Annotated[Optional[float], typer.Option(help=f"Weight EMA decay per step, e.g. 0.999; 0 is off (default: {FinetuneOptions.ema:g}).")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Crop size (default: the weights' own).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help=f"(default: {FinetuneOptions.batch_size})")] = None,
    patience: Annotated[Optional[int], typer.Option(min=1, help=f"(default: {FinetuneOptions.patience})")] = None,
    workers: Annotated[Optional[int], typer.Option(min=0, help=f"(default: {FinetuneOptions.workers})")] = None,
    seed: Annotated[int, typer.Option()] = FinetuneOptions.seed,
    device: Annotated[str, typer.Option()] = FinetuneOptions.device,
    resume: Annotated[bool, typer.Option(help="Continue a killed run from its last completed epoch.")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Fine-tune a pretrained backbone with a new head; reports what it bought over a frozen probe."""
    from embedder.learn.finetune.train import finetune
    from embedder.models.builder import spec_for

    setup_logging(verbose)
    spec = spec_for(backbone, weights)  # no --backbone: a checkpoint's own, else the default
    name, tag = spec.backbone, spec.weights_tag
    given: dict[str, Any] = {"layer_decay": layer_decay, "epochs": epochs, "budget_minutes": budget, "head_epochs": head_epochs, "lr_head": lr_head,
             "lr_backbone": lr_backbone, "lr_decay": lr_decay, "label_smoothing": label_smoothing,
             "crop_scale": crop_scale, "bn": value(bn), "ema": ema, "batch_size": batch_size, "patience": patience,
             "workers": workers}  # unset options keep FinetuneOptions' defaults (one place)
    opts = FinetuneOptions(backbone=name, weights_tag=tag, weights_file=weights, image_size=image_size,
                           probe_init=probe_init, flip=flip, freeze_backbone=freeze_backbone,
                           unfreeze_from=unfreeze_from, val_fraction=val_fraction, seed=seed, device=device,
                           zero_shot_init=zero_shot_init, wise_ft=wise_ft, grad_checkpointing=grad_checkpointing,
                           precision=precision, memory_budget=memory_budget,
                           **{k: v for k, v in given.items() if v is not None})
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console,
                        disable=as_json)
    tasks: dict[int, TaskID] = {}

    def on_step(epoch: int, step: int, steps: int, loss: float) -> None:
        if epoch not in tasks:
            tasks[epoch] = progress.add_task(f"epoch {epoch}", total=steps, info="")
        progress.update(tasks[epoch], completed=step, info=f"loss {loss:.3f}")

    def on_epoch(rec) -> None:  # type: ignore[no-untyped-def]
        if rec.epoch in tasks:
            progress.update(tasks[rec.epoch], info=f"loss {rec.train_loss:.3f}  val acc {rec.val_accuracy:.3f}  "
                                                   f"{rec.images_per_second:.1f} img/s  ({rec.phase})")

    from embedder.store.labels import LabelJoin, read_labels

    join = LabelJoin(read_labels(labels)) if labels else None
    with progress:
        result = finetune(train_source, out_file, opts, val, resume, on_step, on_epoch, join)
    if as_json:
        out.print_json(json.dumps(result.to_dict()))
        return
    if join is not None:
        out.print(join.result().summary("the images"), markup=False)
    if result.budget is not None:
        b = result.budget
        out.print(f"budget     {b.budget_s / 60:g} min → {b.image_size} px, {b.epochs} epochs ({b.reason})"
                  + ("; stopped early to stay within it" if result.stopped_by_budget else ""))
    table = Table("epoch", "phase", "train loss", "val acc", "img/s", "at", title="accuracy against time",
                  title_justify="left")
    mark0 = " ← best" if result.best_epoch == 0 else ""
    table.add_row("probe", "frozen", "", f"{result.frozen_val_accuracy:.4f}{mark0}", "",
                  f"{result.probe_seconds:.0f} s")
    for r in result.history:
        mark = " ← best" if r.epoch == result.best_epoch else ""
        table.add_row(str(r.epoch), r.phase, f"{r.train_loss:.4f}", f"{r.val_accuracy:.4f}{mark}",
                      f"{r.images_per_second:.1f}", f"{r.elapsed_s:.0f} s")
    out.print(table)
    gain = result.best_val_accuracy - result.frozen_val_accuracy
    out.print(f"tried: {result.recipe}", highlight=False)
    out.print(f"frozen probe (same split, before fine-tuning): {result.frozen_val_accuracy:.4f}")
    if result.zero_shot_val_accuracy is not None:
        after = result.zero_shot_val_accuracy_after
        out.print(f"zero-shot head (class-name prompts), before: {result.zero_shot_val_accuracy:.4f}, after "
                  f"fine-tuning: {'-' if after is None else f'{after:.4f}'} (text search keeps working)")
    if result.wise_ft is not None:
        accs = "  ".join(f"{a}: {v:.4f}" for a, v in result.wise_ft["val_accuracy"].items())
        out.print(f"WiSE-FT mix with the start, alpha {result.wise_ft['alpha']:g} chosen on validation ({accs})",
                  highlight=False)
    if result.best_epoch == 0:
        start = "the zero-shot head" if "head from the zero-shot head" in result.recipe else "the probe"
        out.print(f"[yellow]fine-tuning did not help at this budget: use {start}[/yellow] (the checkpoint holds "
                  f"{start}{'' if start.endswith('head') else chr(39) + 's head'} on the "
                  "unchanged pretrained backbone); what moved it past the probe in our "
                  "measurements: more --epochs first, then --lr-backbone 3e-4 (it helped some data sets, hurt others)")
    else:
        out.print(f"fine-tuned best (epoch {result.best_epoch}):             {result.best_val_accuracy:.4f}  "
                  f"({gain:+.4f})")
    out.print(f"{result.n_train} train / {result.n_val} val images, {len(result.classes)} classes, "
              f"{result.seconds:.0f} s → {result.checkpoint}")
    if result.skipped_images:
        console.print(f"[yellow]skipped {len(result.skipped_images)} images that failed to decode[/yellow]")
        for path, reason in result.skipped_images[:5]:
            console.print(f"  {path}: {reason}")


def register(app: typer.Typer) -> None:
    app.command("finetune")(finetune_command)

"""What a fine-tuning run is told and what it reports, every default in one place."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from embedder.decode.common import DEFAULT_MAX_PIXELS
from embedder.errors import FinetuneError
from embedder.models.registry import DEFAULT_BACKBONE

BN_POLICIES = {"frozen": "running statistics frozen (BN in eval mode); affine parameters train when unfrozen",
               "train": "running statistics updated from each training batch (BN in train mode)",
               "adapt": "running statistics re-estimated once on the training images before the probe (AdaBN), "
                        "then frozen"}


LAYER_DECAY = 0.65  # MAE and BEiT's ViT-B fine-tuning (0.65; FT-CLIP 0.6, ViT-L 0.75): see the reference
PRECISIONS = ("auto", "fp32", "bf16")
WISE_ALPHAS = (0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0)  # WiSE-FT's mixing weights tried on validation


@dataclass(frozen=True)
class FinetuneOptions:
    backbone: str | None = DEFAULT_BACKBONE  # None: the --weights checkpoint's own
    weights_tag: str | None = None
    weights_file: Path | None = None
    image_size: int | None = None  # crop size; None: the weights' own
    epochs: int = 10  # total, head phase included
    head_epochs: int = 0  # frozen-backbone epochs first (the LP-FT head already is the probe)
    probe_init: bool = True  # LP-FT: the head starts as the frozen probe; epoch 0 is the probe
    flip: bool = True  # horizontal flips in training (wrong for text, digits, some medical images)
    freeze_backbone: bool = False  # head only, all epochs
    unfreeze_from: str | None = None  # earliest stage to train; None: everything
    lr_head: float = 3e-3
    lr_backbone: float = 1e-4
    lr_decay: float = 1.0  # per stage going down from the top (e.g. 0.5): discriminative rates
    # per block going down (BEiT/MAE's layer-wise decay); None: LAYER_DECAY for timm and OpenCLIP models
    # without BatchNorm that name their blocks, off for the others (their stages take lr_decay)
    layer_decay: float | None = None
    zero_shot_init: bool = True  # CLIP models: the head may start as the zero-shot head (if better on val)
    wise_ft: bool = True  # CLIP models: weights interpolated with the start's, alpha chosen on validation
    grad_checkpointing: bool = False  # timm and OpenCLIP blocks recompute activations in backward
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    memory_budget: str | None = None  # e.g. "8GB": refuse a run whose step needs more; None: what is free
    weight_decay: float = 0.05
    label_smoothing: float = 0.0  # measured: 0.1 cost 1.3 points at 3 epochs (docs/benchmarks.md)
    # smallest area fraction of RandomResizedCrop; 1: no random crop (the evaluation geometry + flips):
    # +1.9 / +1.9 points on Fashion-MNIST (2 seeds), +2.0 on digits, +1.2 on photos, equal on faces and stripes over 0.6
    # at 96 px (docs/benchmarks.md, issue 36); 0.35 and 0.08 lost more (earlier session)
    crop_scale: float = 1.0
    bn: str = "frozen"  # frozen | train | adapt: see BN_POLICIES
    ema: float = 0.0  # weight EMA decay per step (e.g. 0.999; warmed up as min(ema, (1+t)/(10+t))); 0: off
    budget_minutes: float | None = None  # pick crop size and epochs to fit (then `epochs` is ignored)
    warmup_fraction: float = 0.1
    batch_size: int = 32
    patience: int = 3  # early stopping on validation accuracy
    val_fraction: float = 0.1
    seed: int = 0
    device: str = "auto"
    workers: int = 2
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.bn not in BN_POLICIES:
            raise FinetuneError(f"unknown BatchNorm policy {self.bn!r}; valid: {', '.join(BN_POLICIES)}")
        if not 0.0 < self.crop_scale <= 1.0:
            raise FinetuneError(f"--crop-scale must be in (0, 1], got {self.crop_scale}")
        if not 0.0 <= self.ema < 1.0:
            raise FinetuneError(f"--ema must be in [0, 1), got {self.ema}")
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            raise FinetuneError(f"--layer-decay must be in (0, 1], got {self.layer_decay}")
        if self.precision not in PRECISIONS:
            raise FinetuneError(f"unknown --precision {self.precision!r}; valid: {', '.join(PRECISIONS)}")
        if self.memory_budget is not None:
            from embedder.sizes import parse_size

            parse_size(self.memory_budget, FinetuneError)
        if self.budget_minutes is not None and self.budget_minutes <= 0:
            raise FinetuneError(f"--budget must be a positive number of minutes, got {self.budget_minutes}")


@dataclass(frozen=True)
class FamilyRecipe:
    """What the backbone's family makes of the options: decided once the model is built."""

    family: str  # torchvision | timm | open_clip | test
    has_bn: bool  # BatchNorm layers (the bn policy applies)
    layer_decay: float | None  # per-block decay in use; None: stage rates (lr_decay)
    blocks: int = 0  # blocks the layer-wise decay spans
    head_start: str = "probe"  # probe | zero-shot | new
    wise_ft: bool = False
    text_frozen: bool = False
    grad_checkpointing: bool = False
    precision: str = "fp32"


def recipe(options: FinetuneOptions, image_size: int, fam: FamilyRecipe | None = None) -> str:
    """What a run tries, in one line: which layers, the rates, BatchNorm, augmentation, batch, epochs."""
    fam = fam or FamilyRecipe("torchvision", True, None)
    if options.freeze_backbone:
        layers = "head only"
    else:
        layers = f"layers from {options.unfreeze_from}" if options.unfreeze_from else "all layers"
        if fam.text_frozen:
            layers = layers.replace("layers", "image-tower layers") + " (text tower frozen)"
        layers += {"probe": ", head from the probe", "zero-shot": ", head from the zero-shot head (class-name "
                   "prompts)", "new": ", new head"}[fam.head_start if options.probe_init else "new"]
        if options.head_epochs:
            layers += f" after {options.head_epochs} head epoch{'s' * (options.head_epochs > 1)}"
    if options.freeze_backbone:
        rates = f"lr head {options.lr_head:g}"
    elif fam.layer_decay is not None:
        rates = (f"lr head {options.lr_head:g} / top block {options.lr_backbone:g} x{fam.layer_decay:g} per block "
                 f"down ({fam.blocks} blocks, layer-wise decay), no weight decay on norms and biases")
    else:
        rates = (f"lr head {options.lr_head:g} / backbone {options.lr_backbone:g}"
                 + (f" x{options.lr_decay:g} per stage" if options.lr_decay != 1 else ""))
    extra = [f"label smoothing {options.label_smoothing:g}"] * bool(options.label_smoothing) + \
            [f"weight EMA {options.ema:g}"] * bool(options.ema) + \
            ["WiSE-FT (weights mixed with the start's, alpha on validation)"] * fam.wise_ft + \
            ["gradient checkpointing"] * fam.grad_checkpointing + \
            ["bf16 autocast"] * (fam.precision == "bf16")
    bn = f"BatchNorm {options.bn}" if fam.has_bn else "no BatchNorm"
    crops = (f"crops >= {options.crop_scale:.0%} of the image" if options.crop_scale < 1 else "no random crops")
    return (f"{fam.family}: {layers}; AdamW {rates}, warm-up + cosine; {bn}; "
            f"{crops}{', flips' if options.flip else ''}"
            f"{''.join('; ' + e for e in extra)}; batch {options.batch_size}, "
            f"{options.epochs} epoch{'s' * (options.epochs != 1)} at {image_size} px")


@dataclass
class EpochRecord:
    epoch: int
    phase: str
    train_loss: float
    val_accuracy: float
    images_per_second: float
    lr_head: float
    lr_backbone: float
    elapsed_s: float = 0.0  # since the run started (model loading and the probe included)


@dataclass(frozen=True)
class BudgetPlan:
    """What a time budget bought: the crop size and epochs chosen, from timed steps."""

    budget_s: float
    image_size: int
    epochs: int
    epoch_s: float  # estimated seconds per epoch (training + validation) at image_size
    probe_s: float  # estimated seconds for the frozen probe at image_size
    reason: str


@dataclass
class FinetuneResult:
    checkpoint: str
    classes: list[str]
    best_val_accuracy: float
    best_epoch: int
    frozen_val_accuracy: float
    epochs_run: int
    history: list[EpochRecord] = field(default_factory=list)
    skipped_images: list[tuple[str, str]] = field(default_factory=list)
    n_train: int = 0
    n_val: int = 0
    seconds: float = 0.0
    probe_seconds: float = 0.0  # elapsed when the frozen probe's accuracy was known
    budget: BudgetPlan | None = None
    stopped_by_budget: bool = False
    recipe: str = ""  # what was tried, in words (recipe())
    family: str = ""
    zero_shot_val_accuracy: float | None = None  # CLIP: the zero-shot head on validation, before fine-tuning
    zero_shot_val_accuracy_after: float | None = None  # … and with the fine-tuned image tower
    wise_ft: dict[str, Any] | None = None  # CLIP: {"alpha": chosen, "val_accuracy": {alpha: accuracy}}
    memory: dict[str, int] | None = None  # bytes a training step needs (budget.memory_need), by part
    labels: dict[str, Any] | None = None  # the labels file behind the labels (``Joined.to_dict()``), if one

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["skipped_images"] = [{"path": p, "reason": r} for p, r in self.skipped_images[:100]]
        d["skipped"] = len(self.skipped_images)
        return d

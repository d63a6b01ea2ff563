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
    weight_decay: float = 0.05
    label_smoothing: float = 0.0  # measured: 0.1 cost 1.3 points at 3 epochs (docs/benchmarks.md)
    crop_scale: float = 0.6  # smallest area fraction of RandomResizedCrop (0.35: -1.4 points, 0.08: -0.9)
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
        if self.budget_minutes is not None and self.budget_minutes <= 0:
            raise FinetuneError(f"--budget must be a positive number of minutes, got {self.budget_minutes}")


def recipe(options: FinetuneOptions, image_size: int) -> str:
    """What a run tries, in one line: which layers, the rates, BatchNorm, augmentation, batch, epochs."""
    if options.freeze_backbone:
        layers = "head only"
    else:
        layers = f"layers from {options.unfreeze_from}" if options.unfreeze_from else "all layers"
        layers += ", head from the probe" if options.probe_init else ", new head"
        if options.head_epochs:
            layers += f" after {options.head_epochs} head epoch{'s' * (options.head_epochs > 1)}"
    rates = f"lr head {options.lr_head:g}" + ("" if options.freeze_backbone else
                                               f" / backbone {options.lr_backbone:g}"
                                               + (f" x{options.lr_decay:g} per stage" if options.lr_decay != 1 else ""))
    extra = [f"label smoothing {options.label_smoothing:g}"] * bool(options.label_smoothing) + \
            [f"weight EMA {options.ema:g}"] * bool(options.ema)
    return (f"{layers}; AdamW {rates}, warm-up + cosine; BatchNorm {options.bn}; "
            f"crops >= {options.crop_scale:.0%} of the image{', flips' if options.flip else ''}"
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

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["skipped_images"] = [{"path": p, "reason": r} for p, r in self.skipped_images[:100]]
        d["skipped"] = len(self.skipped_images)
        return d

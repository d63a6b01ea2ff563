"""Fine-tuning: refresh a pretrained backbone on the user's labels, then re-embed with it.

The new head starts as the frozen probe (LP-FT); optional ``head_epochs`` (default 0: measured
below a direct start on real images) train it on the frozen backbone; then the backbone is unfrozen
(all of it, or from ``unfreeze_from``) with a smaller learning rate than the head, optionally decayed
stage by stage (discriminative rates). AdamW, linear warm-up then cosine decay per phase, optional
label smoothing, random resized crops of at least 60 % of the image, early stopping on validation
accuracy keeping the best epoch. Every default was chosen by a measurement in docs/benchmarks.md.

BatchNorm policy (``bn``): by default running statistics stay frozen at their pretrained values in
both phases (BN layers in eval mode, affine parameters trainable once unfrozen); ``bn="train"``
updates them from each batch, as a plain ``model.train()`` loop does. Optional weight EMA (``ema``):
the evaluated and saved weights are an exponential moving average of the trained ones.

A time budget (``budget_minutes``) picks the crop size and epoch count before training, from a few
timed steps on the real model: the largest size at which the probe and ``BUDGET_MIN_EPOCHS`` epochs
fit (costs scale with pixels); training stops after the epoch that reaches the budget.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

from embedder.decode.common import normalize_batch
from embedder.decode.cpu import load_rgb, preprocess
from embedder.errors import DecodeError, FinetuneError, ProbeError
from embedder.io.sources import ImageRef, discover
from embedder.learn.selection import stratified_split
from embedder.models import checkpoint
from embedder.models.builder import ModelSpec, load_network
from embedder.models.devices import resolve_device
from embedder.models.features import _set_module
from embedder.models.layers import suggested_layers
from embedder.models.preprocessing import Preprocessing
from embedder.models.registry import Backbone

log = logging.getLogger(__name__)

BN_POLICIES = {"frozen": "running statistics frozen (BN in eval mode); affine parameters train when unfrozen",
               "train": "running statistics updated from each training batch (BN in train mode)"}
BUDGET_MIN_EPOCHS = 3  # full-phase epochs a budget must leave room for before the size drops
BUDGET_MAX_EPOCHS = 30
BUDGET_SIZE_FACTORS = (1.0, 6 / 7, 5 / 7, 4 / 7, 3 / 7)  # 224 → 224, 192, 160, 128, 96


@dataclass(frozen=True)
class FinetuneOptions:
    backbone: str | None = "resnet50"  # None: the --weights checkpoint's own
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
    bn: str = "frozen"  # frozen | train: see BN_POLICIES
    ema: float = 0.0  # weight EMA decay per step (e.g. 0.999; warmed up as min(ema, (1+t)/(10+t))); 0: off
    budget_minutes: float | None = None  # pick crop size and epochs to fit (then `epochs` is ignored)
    warmup_fraction: float = 0.1
    batch_size: int = 32
    patience: int = 3  # early stopping on validation accuracy
    val_fraction: float = 0.1
    seed: int = 0
    device: str = "auto"
    workers: int = 2
    max_pixels: int = 89_478_485

    def __post_init__(self) -> None:
        if self.bn not in BN_POLICIES:
            raise FinetuneError(f"unknown BatchNorm policy {self.bn!r}; valid: {', '.join(BN_POLICIES)}")
        if not 0.0 < self.crop_scale <= 1.0:
            raise FinetuneError(f"--crop-scale must be in (0, 1], got {self.crop_scale}")
        if not 0.0 <= self.ema < 1.0:
            raise FinetuneError(f"--ema must be in [0, 1), got {self.ema}")
        if self.budget_minutes is not None and self.budget_minutes <= 0:
            raise FinetuneError(f"--budget must be a positive number of minutes, got {self.budget_minutes}")


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

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["skipped_images"] = [{"path": p, "reason": r} for p, r in self.skipped_images[:100]]
        d["skipped"] = len(self.skipped_images)
        return d


# ---- data --------------------------------------------------------------------------------------
class _Images(Dataset):  # type: ignore[type-arg]
    def __init__(self, refs: list[ImageRef], labels: list[int], transform: Callable[[Any], torch.Tensor],
                 max_pixels: int) -> None:
        self.refs, self.labels, self.transform, self.max_pixels = refs, labels, transform, max_pixels

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int, str, str]:
        ref = self.refs[i]
        try:
            with open(ref.path, "rb") as f:
                img = load_rgb(f.read(), self.max_pixels)
            return self.transform(img), self.labels[i], ref.path, ""
        except (DecodeError, OSError) as e:
            return None, self.labels[i], ref.path, str(e)


_Item = tuple[torch.Tensor | None, int, str, str]


def _collate(batch: list[_Item]) -> tuple[torch.Tensor | None, torch.Tensor, list[tuple[str, str]]]:
    good = [(x, y) for x, y, _, _ in batch if x is not None]
    failed = [(p, r) for x, _, p, r in batch if x is None]
    if not good:
        return None, torch.zeros(0, dtype=torch.long), failed
    return torch.stack([g[0] for g in good]), torch.tensor([g[1] for g in good]), failed


class train_transform:  # noqa: N801 - a picklable function object (DataLoader workers may spawn)
    """Augmentation for classification: random resized crop and flip, at the weights' resolution."""

    def __init__(self, pre: Preprocessing, flip: bool = True, crop_scale: float = 0.6) -> None:
        self.crop = T.RandomResizedCrop(pre.crop_size, scale=(crop_scale, 1.0),
                                        interpolation=pre.interpolation_mode, antialias=True)
        self.flip = T.RandomHorizontalFlip(p=0.5 if flip else 0.0)  # picklable either way

    def __call__(self, img: Any) -> torch.Tensor:
        return TF.pil_to_tensor(self.flip(self.crop(img)))


class eval_transform:  # noqa: N801
    """Exactly the extraction preprocessing (resize, centre crop)."""

    def __init__(self, pre: Preprocessing) -> None:
        self.pre = pre

    def __call__(self, img: Any) -> torch.Tensor:
        return preprocess(img, self.pre)


def _labelled(source: list[str], classes: list[str] | None = None) -> tuple[list[ImageRef], list[str]]:
    refs = discover(source)
    unlabelled = [r for r in refs if r.label is None]
    if len(unlabelled) == len(refs):
        raise FinetuneError(f"no labels in {', '.join(source)}: put images in one subfolder per class")
    refs = [r for r in refs if r.label is not None]
    return refs, sorted({r.label for r in refs if r.label is not None}) if classes is None else classes


# ---- model -------------------------------------------------------------------------------------
def build_model(options: FinetuneOptions, n_classes: int) -> tuple[nn.Module, Backbone, Preprocessing, dict[str, Any]]:
    net, backbone, loaded, pre = load_network(ModelSpec(options.backbone, options.weights_tag,
                                                        options.weights_file, image_size=options.image_size))
    old = net.get_submodule(backbone.head)
    if not isinstance(old, nn.Linear):
        raise FinetuneError(f"{backbone.name}'s head {backbone.head} is not a Linear layer")
    torch.manual_seed(options.seed)
    _set_module(net, backbone.head, nn.Linear(old.in_features, n_classes))
    origin = loaded.info.to_dict()
    return net, backbone, pre, origin


def param_groups(net: nn.Module, backbone: Backbone, options: FinetuneOptions) -> list[dict[str, Any]]:
    """Head at lr_head; backbone stages at lr_backbone × lr_decay^(stages below the top);
    stages before ``unfreeze_from`` get no group at all (they stay frozen)."""
    head_prefix = backbone.head + "."
    with_params = {n for n, _ in net.named_parameters()}
    stages = [s for s in suggested_layers(backbone.name) if not backbone.head.startswith(s)
              and any(p.startswith(s + ".") for p in with_params)]
    if options.unfreeze_from is not None and options.unfreeze_from not in stages:
        raise FinetuneError(f"--unfreeze-from {options.unfreeze_from!r} is not a stage of "
                            f"{backbone.name}; stages: {', '.join(stages)}")
    first = stages.index(options.unfreeze_from) if options.unfreeze_from else 0

    def stage_of(name: str) -> int:
        for i, s in enumerate(stages):
            if name == s or name.startswith(s + "."):
                return i
        return len(stages) - 1  # parameters outside named stages (final norms) train with the top

    groups: dict[int, list[nn.Parameter]] = {}
    head: list[nn.Parameter] = []
    for name, p in net.named_parameters():
        if name.startswith(head_prefix):
            head.append(p)
            continue
        s = stage_of(name)
        if s >= first:
            groups.setdefault(s, []).append(p)
    out: list[dict[str, Any]] = [{"params": head, "lr": options.lr_head, "name": "head",
                                  "base_lr": options.lr_head}]
    top = len(stages) - 1
    for s in sorted(groups, reverse=True):
        lr = options.lr_backbone * options.lr_decay ** (top - s)
        out.append({"params": groups[s], "lr": lr, "name": stages[s], "base_lr": lr})
    return out


def _set_trainable(net: nn.Module, groups: list[dict[str, Any]], backbone_on: bool) -> None:
    net.requires_grad_(False)
    for g in groups:
        if g["name"] == "head" or backbone_on:
            for p in g["params"]:
                p.requires_grad_(True)


def _bn_eval(net: nn.Module) -> None:
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def phase_scheduler(opt: torch.optim.Optimizer, total: int, warmup: int, done: int = 0) -> Any:
    """Linear warm-up over WARMUP steps, then cosine decay to 0 at TOTAL, per batch, from each
    group's base_lr (torch's SequentialLR of LinearLR and CosineAnnealingLR); fast-forwarded DONE
    steps when a run resumes mid-phase."""
    import warnings

    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    for g in opt.param_groups:
        g["lr"] = g["initial_lr"] = g["base_lr"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fast-forwarding steps before any optimizer step is the point
        sched = SequentialLR(opt, [LinearLR(opt, start_factor=1.0 / warmup, end_factor=1.0,
                                            total_iters=max(warmup - 1, 0)),
                                   CosineAnnealingLR(opt, T_max=max(1, total - warmup))], milestones=[warmup])
        for _ in range(done):
            sched.step()
    return sched


@torch.no_grad()
def evaluate(net: nn.Module, loader: DataLoader, pre: Preprocessing, device: torch.device,  # type: ignore[type-arg]
             amp: torch.dtype | None, skipped: dict[str, str] | None = None) -> float:
    net.eval()
    correct = total = 0
    for x, y, failed in loader:
        for p, r in failed:
            if skipped is not None:
                skipped.setdefault(p, r)
        if x is None:
            continue
        xb = normalize_batch(x.to(device, non_blocking=True), pre)
        if device.type == "cuda":
            xb = xb.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = net(xb)
        correct += int((logits.argmax(1).cpu() == y).sum())
        total += len(y)
    return correct / max(total, 1)


@torch.no_grad()
def _features(net: nn.Module, head: str, loader: DataLoader, pre: Preprocessing,  # type: ignore[type-arg]
              device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    net.eval()
    feats, labels = [], []
    captured: list[torch.Tensor] = []
    hook = net.get_submodule(head).register_forward_hook(lambda m, i, o: captured.append(i[0]))
    try:
        for x, y, _ in loader:
            if x is None:
                continue
            net(normalize_batch(x.to(device), pre))
            feats.append(captured.pop().float().cpu().numpy())
            labels.append(y.numpy())
    finally:
        hook.remove()
    return np.concatenate(feats), np.concatenate(labels)


def frozen_probe(net: nn.Module, backbone: Backbone, train_loader: DataLoader,  # type: ignore[type-arg]
                 val_loader: DataLoader, pre: Preprocessing, device: torch.device,  # type: ignore[type-arg]
                 classes: list[str], seed: int) -> tuple[float, np.ndarray, np.ndarray]:
    """The feature-extraction baseline on the same split: a logistic probe on pretrained features
    (the probe's protocol, raw features). Its validation accuracy, and its weights [classes, dim]
    and biases, which initialise the new head (LP-FT: fine-tuning starts from the probe)."""
    from embedder.learn.probe import Dataset as ProbeData
    from embedder.learn.probe import ProbeOptions, train_probe

    xtr, ytr = _features(net, backbone.head, train_loader, pre, device)
    xva, yva = _features(net, backbone.head, val_loader, pre, device)
    data = ProbeData(xtr, ytr, classes, [], [], {})
    try:
        result = train_probe(data, ProbeOptions(seed=seed, c_min_exp=-4, c_max_exp=4, standardize="no"))
        coef, icpt = result.head.coef, result.head.intercept
    except ProbeError:  # too few images per class to choose C on a split: scikit-learn's default C
        from sklearn.linear_model import LogisticRegression

        log.info("frozen probe: too few images to choose C, using C=1")
        lr = LogisticRegression(max_iter=1000).fit(xtr, ytr)
        coef, icpt = lr.coef_, lr.intercept_
        if coef.shape[0] == 1:  # binary: one row; as a softmax pair
            coef, icpt = np.vstack([-coef / 2, coef / 2]), np.array([-icpt[0] / 2, icpt[0] / 2])
        full_c = np.zeros((len(classes), xtr.shape[1]), np.float32)
        full_i = np.full(len(classes), -30.0, np.float32)
        full_c[lr.classes_], full_i[lr.classes_] = coef, icpt
        coef, icpt = full_c, full_i
    icpt = np.maximum(icpt, -30.0)  # a class absent from train: never wins, but a trainable bias
    pred = (xva @ coef.T + icpt).argmax(1)
    return float((pred == yva).mean()), np.asarray(coef, np.float32), np.asarray(icpt, np.float32)


# ---- the time budget -----------------------------------------------------------------------------
def budget_sizes(full: int) -> list[int]:
    """Candidate crop sizes, largest first: the weights' own and smaller, multiples of 8, ≥ 16."""
    return sorted({min(full, max(16, round(full * f / 8) * 8)) for f in BUDGET_SIZE_FACTORS}, reverse=True)


def plan_budget(budget_s: float, full: int, train_step_s: float, eval_step_s: float, train_steps: int,
                val_steps: int, probe_steps: int, head_epochs: int) -> BudgetPlan:
    """The largest crop size at which the probe and ``head_epochs + BUDGET_MIN_EPOCHS`` epochs fit in
    BUDGET_S, and as many epochs as fit there (at most BUDGET_MAX_EPOCHS). Step costs are measured
    at size FULL and scale with the pixel count."""
    sizes = budget_sizes(full)
    epoch_full = train_steps * train_step_s + val_steps * eval_step_s
    probe_full = probe_steps * eval_step_s
    for size in sizes:
        r = (size / full) ** 2
        epoch_s, probe_s = epoch_full * r, probe_full * r
        fits = int((budget_s - probe_s) // epoch_s) if epoch_s > 0 else BUDGET_MAX_EPOCHS
        wanted = head_epochs + BUDGET_MIN_EPOCHS
        if fits >= wanted or size == sizes[-1]:
            if fits < 1:
                raise FinetuneError(f"a {budget_s / 60:.1f}-minute budget does not fit one epoch even at "
                                    f"{size} px (≈ {probe_s + epoch_s:.0f} s with the probe): raise --budget")
            epochs = min(BUDGET_MAX_EPOCHS, fits)
            why = (f"{size} px: the largest size where the probe and {wanted} epochs fit" if fits >= wanted
                   else f"{size} px, the smallest size: only {fits} epoch(s) fit")
            return BudgetPlan(round(budget_s, 1), size, epochs, round(epoch_s, 2), round(probe_s, 2),
                              f"{why}; ≈ {epoch_s:.1f} s per epoch, probe ≈ {probe_s:.1f} s")
    raise AssertionError("unreachable: the last size always returns")  # pragma: no cover


def time_steps(net: nn.Module, size: int, batch: int, device: torch.device,
               amp: torch.dtype | None) -> tuple[float, float]:
    """Seconds per training step (forward, backward, AdamW) and per evaluation batch at SIZE, on a
    copy of the model (the real one is untouched): one warm-up step, then the mean of two."""
    import copy

    twin = copy.deepcopy(net).to(device)
    twin.requires_grad_(True)
    opt = torch.optim.AdamW(twin.parameters(), lr=0.0)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def train_step() -> None:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = nn.functional.cross_entropy(twin(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def eval_step() -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            twin(x)

    out = []
    for step, mode in ((train_step, True), (eval_step, False)):
        twin.train(mode)
        step()
        sync()
        t0 = time.perf_counter()
        for _ in range(2):
            step()
        sync()
        out.append((time.perf_counter() - t0) / 2)
    return out[0], out[1]


def _ema_avg(decay: float) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor | int], torch.Tensor]:
    def avg(averaged: torch.Tensor, current: torch.Tensor, n: torch.Tensor | int) -> torch.Tensor:
        if not averaged.is_floating_point():
            return current  # counters (BatchNorm's num_batches_tracked)
        d = min(decay, (1.0 + float(n)) / (10.0 + float(n)))  # short runs: the average warms up
        return averaged * d + current * (1.0 - d)

    return avg


# ---- the loop ------------------------------------------------------------------------------------
def finetune(train_source: list[str], out: Path, options: FinetuneOptions = FinetuneOptions(),
             val_source: list[str] | None = None, resume: bool = False,
             on_step: Callable[[int, int, int, float], None] | None = None,
             on_epoch: Callable[[EpochRecord], None] | None = None) -> FinetuneResult:
    t_start = time.perf_counter()
    device = resolve_device(options.device)
    amp = torch.bfloat16 if device.type == "cuda" else None
    refs, classes = _labelled(train_source)
    if len(classes) < 2:
        raise FinetuneError(f"need at least 2 classes to fine-tune, found {len(classes)} ({', '.join(classes)})")
    idx = {c: i for i, c in enumerate(classes)}
    y_all = np.array([idx[r.label] for r in refs if r.label is not None])
    if val_source:
        vrefs, _ = _labelled(val_source, classes)
        unseen = sorted({r.label for r in vrefs if r.label not in idx and r.label is not None})
        if unseen:
            log.warning("validation classes not in training are dropped: %s", ", ".join(unseen))
        vrefs = [r for r in vrefs if r.label in idx]
        if not vrefs:
            raise FinetuneError("no validation images left after dropping classes unseen in training")
        tr_refs = refs
    else:
        tr_i, va_i = stratified_split(y_all, options.val_fraction, options.seed)
        if len(va_i) == 0:
            raise FinetuneError("too few images for a validation split (need ≥ 2 per class); pass --val")
        tr_refs, vrefs = [refs[i] for i in tr_i], [refs[i] for i in va_i]
    ytr = [idx[r.label] for r in tr_refs if r.label is not None]
    yva = [idx[r.label] for r in vrefs if r.label is not None]

    net, backbone, pre, origin = build_model(options, len(classes))
    net.to(device)
    if device.type == "cuda":
        net.to(memory_format=torch.channels_last)
    resume_path = out.with_name(out.name + ".resume")
    plan: BudgetPlan | None = None
    if options.budget_minutes is not None:
        earlier = _peek_state(resume_path) if resume else None
        if earlier and earlier.get("budget"):
            plan = BudgetPlan(**earlier["budget"])  # a resumed run keeps its plan
        else:
            train_s, eval_s = time_steps(net, pre.crop_size, options.batch_size, device, amp)
            head_e = options.epochs if options.freeze_backbone else options.head_epochs
            plan = plan_budget(options.budget_minutes * 60 - (time.perf_counter() - t_start), pre.crop_size,
                               train_s, eval_s, math.ceil(len(tr_refs) / options.batch_size),
                               math.ceil(len(vrefs) / options.batch_size),
                               math.ceil((len(tr_refs) + len(vrefs)) / options.batch_size), min(head_e, 1))
            plan = dataclasses.replace(plan, budget_s=options.budget_minutes * 60)
        log.info("budget: %s, %d epochs", plan.reason, plan.epochs)
        options = dataclasses.replace(options, epochs=plan.epochs, image_size=plan.image_size)
        if plan.image_size != pre.crop_size:
            pre = pre.at_size(plan.image_size)
    groups = param_groups(net, backbone, options)
    g = torch.Generator().manual_seed(options.seed)
    loader_kw: dict[str, Any] = {"collate_fn": _collate, "num_workers": options.workers,
                                 "pin_memory": device.type == "cuda",
                                 "persistent_workers": options.workers > 0}
    train_loader = DataLoader(_Images(tr_refs, ytr, train_transform(pre, options.flip, options.crop_scale),
                                      options.max_pixels),
                              batch_size=options.batch_size, shuffle=True, generator=g, drop_last=False,
                              **loader_kw)
    val_loader = DataLoader(_Images(vrefs, yva, eval_transform(pre), options.max_pixels),
                            batch_size=options.batch_size, **loader_kw)
    skipped: dict[str, str] = {}

    state: dict[str, Any] = {"epoch": 0, "best": -1.0, "best_epoch": 0, "history": [], "bad_epochs": 0,
                             "frozen_val_accuracy": None, "probe_seconds": 0.0,
                             "budget": None if plan is None else dataclasses.asdict(plan)}
    opt = torch.optim.AdamW([{k: v for k, v in gr.items() if k != "name"} for gr in groups],
                            weight_decay=options.weight_decay)
    ema: Any = None  # torch.optim.swa_utils.AveragedModel once the backbone trains
    # what a resumed run must share with the run that wrote the resume file
    run_key = {"classes": classes, "train": len(tr_refs), "val": len(vrefs),
               "settings": {k: v for k, v in _settings(options).items() if k not in RESUMABLE_CHANGES}}
    state["run"] = run_key
    if resume and resume_path.exists():
        _check_resume(resume_path, run_key)
        state, ema_state = _load_resume(resume_path, net, opt)
        state["run"] = run_key
        if ema_state:
            ema = _new_ema(net, options.ema)
            ema.load_state_dict(ema_state)
        log.info("resuming after epoch %d", state["epoch"])
    elif resume:
        log.warning("--resume given but %s does not exist; starting from scratch", resume_path)

    settings = _settings(options)

    def save_best(epoch: int, val_acc: float, model: nn.Module) -> None:
        meta = {"backbone": backbone.name, "pretrained": origin, "classes": classes,
                "preprocessing": pre.to_dict(), "settings": settings, "bn_policy": BN_POLICIES[options.bn],
                "ema": options.ema or None, "budget": state["budget"],
                "best_epoch": epoch, "best_val_accuracy": val_acc,
                "frozen_val_accuracy": state["frozen_val_accuracy"], "history": state["history"]}
        checkpoint.save(out, model.state_dict(), meta)

    if state["frozen_val_accuracy"] is None:
        eval_train = DataLoader(_Images(tr_refs, ytr, eval_transform(pre), options.max_pixels),
                                batch_size=options.batch_size, **loader_kw)
        acc, coef, icpt = frozen_probe(net, backbone, eval_train, val_loader, pre, device, classes, options.seed)
        state["frozen_val_accuracy"] = acc
        state["probe_seconds"] = round(time.perf_counter() - t_start, 2)
        if options.probe_init:
            # LP-FT (Kumar et al., ICLR 2022): the new head starts as the probe, so epoch 0 is the
            # probe's accuracy and fine-tuning does not first wreck the features with a random head.
            head = net.get_submodule(backbone.head)
            with torch.no_grad():
                head.weight.copy_(torch.from_numpy(coef))  # type: ignore[operator]
                head.bias.copy_(torch.from_numpy(icpt))  # type: ignore[operator]
            state["best"] = evaluate(net, val_loader, pre, device, amp, skipped)
            state["best_epoch"] = 0
            save_best(0, state["best"], net)  # if no epoch beats it, the checkpoint is the probe

    head_epochs = options.epochs if options.freeze_backbone else min(options.head_epochs, options.epochs)
    steps_per_epoch = max(1, math.ceil(len(tr_refs) / options.batch_size))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=options.label_smoothing)

    sched: Any = None
    sched_phase: str | None = None
    stopped_by_budget = False
    for epoch in range(state["epoch"] + 1, options.epochs + 1):
        phase = "head" if epoch <= head_epochs else "full"
        phase_start = 1 if phase == "head" else head_epochs + 1
        phase_epochs = head_epochs if phase == "head" else options.epochs - head_epochs
        total_steps = phase_epochs * steps_per_epoch
        warmup = max(1, int(options.warmup_fraction * total_steps))
        if sched_phase != phase:
            sched = phase_scheduler(opt, total_steps, warmup, done=(epoch - phase_start) * steps_per_epoch)
            sched_phase = phase
        _set_trainable(net, groups, backbone_on=phase == "full")
        net.train()
        if phase == "head":
            net.eval()  # frozen backbone: dropout off, BN statistics untouched
        elif options.bn == "frozen":
            _bn_eval(net)
        if phase == "full" and options.ema > 0 and ema is None:
            ema = _new_ema(net, options.ema)  # averages from the probe-initialised weights on
        # The same shuffles and augmentations whether or not the run was resumed.
        g.manual_seed(options.seed + epoch)
        torch.manual_seed(options.seed * 1_000_003 + epoch)
        t0, seen, loss_sum = time.perf_counter(), 0, 0.0
        for step, (x, y, failed) in enumerate(train_loader):
            for p, r in failed:
                skipped.setdefault(p, r)
            if x is None:
                sched.step()  # a batch of undecodable images still counts as a step of the schedule
                continue
            xb = normalize_batch(x.to(device, non_blocking=True), pre)
            if device.type == "cuda":
                xb = xb.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = loss_fn(net(xb), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if ema is not None and phase == "full":
                ema.update_parameters(net)
            seen += len(y)
            loss_sum += loss.item() * len(y)
            if on_step:
                on_step(epoch, step + 1, steps_per_epoch, loss.item())
        evaluated = ema.module if ema is not None and phase == "full" else net
        val_acc = evaluate(evaluated, val_loader, pre, device, amp, skipped)
        rec = EpochRecord(epoch, phase, loss_sum / max(seen, 1), val_acc,
                          seen / max(time.perf_counter() - t0, 1e-9),
                          opt.param_groups[0]["base_lr"],
                          opt.param_groups[1]["base_lr"] if len(opt.param_groups) > 1 and phase == "full" else 0.0,
                          round(time.perf_counter() - t_start, 2))
        epoch_s = time.perf_counter() - t0
        state["history"].append(asdict(rec))
        state["epoch"] = epoch
        if on_epoch:
            on_epoch(rec)
        if val_acc > state["best"]:
            state["best"], state["best_epoch"], state["bad_epochs"] = val_acc, epoch, 0
            save_best(epoch, val_acc, evaluated)
        else:
            state["bad_epochs"] += 1
        _save_resume(resume_path, net, opt, state, ema)
        if phase == "full" and state["bad_epochs"] >= options.patience:
            log.info("early stop: no validation gain for %d epochs", options.patience)
            break
        if plan is not None and epoch < options.epochs and \
                time.perf_counter() - t_start + epoch_s > plan.budget_s:
            log.info("budget: another epoch would end after %.0f s; stopping after epoch %d", plan.budget_s, epoch)
            stopped_by_budget = True
            break
    if resume_path.exists():
        resume_path.unlink()
    return FinetuneResult(
        str(out), classes, float(state["best"]), int(state["best_epoch"]),
        float(state["frozen_val_accuracy"]), int(state["epoch"]),
        [EpochRecord(**h) for h in state["history"]], sorted(skipped.items()),
        len(tr_refs), len(vrefs), time.perf_counter() - t_start, float(state.get("probe_seconds") or 0.0),
        plan, stopped_by_budget)


def _new_ema(net: nn.Module, decay: float) -> Any:
    from torch.optim.swa_utils import AveragedModel

    return AveragedModel(net, avg_fn=_ema_avg(decay), use_buffers=True)


# settings a resumed run may change: where and how fast it runs, and how long it goes on
RESUMABLE_CHANGES = ("workers", "device", "epochs", "patience", "budget_minutes")


def _settings(options: FinetuneOptions) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()}


def _check_resume(path: Path, run_key: dict[str, Any]) -> None:
    """--resume continues the same run: the same classes, images and settings, or a one-line error
    (a resume file written before these were recorded is taken as it is)."""
    earlier = (_peek_state(path) or {}).get("run")
    if earlier is None:
        log.warning("%s records no run settings (an older file); resuming without checking them", path)
        return
    if earlier["classes"] != run_key["classes"]:
        raise FinetuneError(f"--resume: {path.name} was written for classes {', '.join(earlier['classes'])[:200]}, "
                            f"not {', '.join(run_key['classes'])[:200]}; rerun without --resume to start over")
    for what in ("train", "val"):
        if earlier[what] != run_key[what]:
            raise FinetuneError(f"--resume: {path.name} was written for {earlier[what]} {what} images, now "
                                f"{run_key[what]}; rerun without --resume to start over")
    diff = [k for k in sorted(set(earlier["settings"]) | set(run_key["settings"]))
            if earlier["settings"].get(k) != run_key["settings"].get(k)]
    if diff:
        k = diff[0]
        raise FinetuneError(f"--resume: {path.name} was written with {k}={earlier['settings'].get(k)!r}, now "
                            f"{run_key['settings'].get(k)!r}{f' (and {len(diff) - 1} more)' if len(diff) > 1 else ''}; "
                            "resume with the same settings or rerun without --resume")


def _peek_state(path: Path) -> dict[str, Any] | None:
    """The resume file's run state (no tensors read), or None."""
    if not path.exists():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        state: dict[str, Any] = json.loads((f.metadata() or {})["state"])
    return state


def _save_resume(path: Path, net: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any],
                 ema: Any = None) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.state_dict().items()})
    opt_state = opt.state_dict()
    for pid, st in opt_state["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt.{pid}.{k}"] = v.detach().cpu().contiguous().reshape(v.shape)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"state": json.dumps(state)})
    tmp.replace(path)


def _load_resume(path: Path, net: nn.Module,
                 opt: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        state = json.loads((f.metadata() or {})["state"])
    tensors = load_file(str(path))
    net.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    opt_state = opt.state_dict()
    per: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, name = k.split(".", 2)
            per.setdefault(int(pid), {})[name] = v
    opt_state["state"] = per
    opt.load_state_dict(opt_state)
    return state, {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}

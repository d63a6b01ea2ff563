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
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from embedder.decode.decoders import normalize_batch
from embedder.errors import FinetuneError, ProbeError, TextQueryError
from embedder.learn.finetune.budget import available_memory, check_memory, plan_budget, takes_size, time_steps
from embedder.learn.finetune.data import LabelledImages, collate, eval_transform, labelled_refs, train_transform
from embedder.learn.finetune.options import (
    BN_POLICIES,
    LAYER_DECAY,
    WISE_ALPHAS,
    BudgetPlan,
    EpochRecord,
    FamilyRecipe,
    FinetuneOptions,
    FinetuneResult,
    recipe,
)
from embedder.learn.finetune.resume import (
    RESUMABLE_CHANGES,
    check_resume,
    load_extra,
    load_resume,
    peek_state,
    run_settings,
    save_resume,
)
from embedder.learn.finetune.schedule import (
    adapt_bn,
    bn_eval,
    layer_map,
    new_ema,
    param_groups,
    phase_scheduler,
    set_trainable,
)
from embedder.learn.selection import stratified_split
from embedder.models import checkpoint
from embedder.models.backbone import Backbone
from embedder.models.builder import ModelSpec, load_network
from embedder.models.classifier import HeadSpec, with_head
from embedder.models.devices import resolve_device
from embedder.models.preprocessing import Preprocessing
from embedder.sizes import parse_size
from embedder.store.labels import LabelJoin

log = logging.getLogger(__name__)

ADAPT_BN_IMAGES = 2048  # enough for stable statistics; beyond it the pass only costs time


def _normalised(loader: DataLoader, pre: Preprocessing, device: torch.device,  # type: ignore[type-arg]
                limit: int) -> Any:
    """The loader's decoded batches as normalised input tensors, up to LIMIT images."""
    n = 0
    for x, _, _ in loader:
        if x is None:
            continue
        yield normalize_batch(x.to(device), pre)
        n += len(x)
        if n >= limit:
            return


# ---- model -------------------------------------------------------------------------------------
def build_model(options: FinetuneOptions, n_classes: int) -> tuple[nn.Module, Backbone, Preprocessing, dict[str, Any]]:
    """The pretrained backbone with a new Linear head of N_CLASSES (``models.classifier.with_head``: any
    family), its preprocessing and where its weights came from."""
    net, backbone, pre, origin, _ = build_classifier(options, n_classes)
    return net, backbone, pre, origin


def build_classifier(options: FinetuneOptions, n_classes: int
                     ) -> tuple[nn.Module, Backbone, Preprocessing, dict[str, Any], HeadSpec]:
    net, backbone, loaded, pre = load_network(ModelSpec(options.backbone, options.weights_tag,
                                                        options.weights_file, image_size=options.image_size))
    torch.manual_seed(options.seed)
    net, head = with_head(net, backbone, n_classes, pre.crop_size)
    origin = loaded.info.to_dict()
    return net, backbone, pre, origin, head


def family_recipe(net: nn.Module, backbone: Backbone, options: FinetuneOptions, device: torch.device,
                  head: str = "head") -> tuple[FamilyRecipe, str]:
    """What the family's anchors do, decided from the built model: BatchNorm networks as torchvision's
    (stage rates, the bn policy); networks without BatchNorm that name their blocks (ViTs, DINOv2,
    ConvNeXt, …) with layer-wise decay; CLIP models with their text tower frozen, the zero-shot head
    as a candidate start and WiSE-FT. Returns it and the prefix of the parameters that train."""
    clip = backbone.family == "open_clip"
    body = "clip.visual." if clip else ""
    tower = net.get_submodule("clip.visual") if clip else net
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in tower.modules())
    decay = options.layer_decay
    blocks = 0
    layers = layer_map(net) if backbone.family in ("timm", "open_clip") else None
    if decay is None and not has_bn and layers is not None and \
            len({v for k, v in layers.items() if not k.startswith(head + ".")}) > 2:
        decay = LAYER_DECAY
    if decay is not None and decay == 1.0:
        decay = None  # one rate: the stage groups
    if decay is not None:
        blocks = len({v for k, v in (layers or {}).items() if not k.startswith(head + ".")})
    if options.grad_checkpointing:
        switch = grad_checkpointing_switch(net, backbone, True)
        if switch is None:
            raise FinetuneError(f"--grad-checkpointing: {backbone.name} has no checkpointed blocks (most timm and "
                                "OpenCLIP models have them); lower --batch-size or --image-size instead")
    precision = "bf16" if options.precision == "bf16" or (options.precision == "auto" and device.type == "cuda") \
        else "fp32"
    return FamilyRecipe(backbone.family if backbone.family in ("timm", "open_clip", "test") else "torchvision",
                        has_bn, decay, blocks, "probe", clip and options.wise_ft and not options.freeze_backbone,
                        clip, options.grad_checkpointing, precision), body


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
    hook = net.get_submodule(head).register_forward_hook(lambda m, i, o: captured.append(i[0].flatten(1)))
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


def frozen_probe(net: nn.Module, head: str, train_loader: DataLoader,  # type: ignore[type-arg]
                 val_loader: DataLoader, pre: Preprocessing, device: torch.device,  # type: ignore[type-arg]
                 classes: list[str], seed: int) -> tuple[float, np.ndarray, np.ndarray]:
    """The feature-extraction baseline on the same split: a logistic probe on pretrained features
    (the probe's protocol, raw features). Its validation accuracy, and its weights [classes, dim]
    and biases, which initialise the new head (LP-FT: fine-tuning starts from the probe)."""
    from embedder.learn.options import ProbeOptions
    from embedder.learn.probe import Dataset as ProbeData
    from embedder.learn.probe import train_probe

    xtr, ytr = _features(net, head, train_loader, pre, device)
    xva, yva = _features(net, head, val_loader, pre, device)
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


# ---- the loop ------------------------------------------------------------------------------------
def finetune(train_source: list[str], out: Path, options: FinetuneOptions = FinetuneOptions(),
             val_source: list[str] | None = None, resume: bool = False,
             on_step: Callable[[int, int, int, float], None] | None = None,
             on_epoch: Callable[[EpochRecord], None] | None = None,
             labels: LabelJoin | None = None) -> FinetuneResult:
    """LABELS: a labels file's join, its labels put over the folders' by the images' ids (train and
    --val); recorded in the checkpoint and the result, part of what --resume must match."""
    t_start = time.perf_counter()
    device = resolve_device(options.device)
    refs, classes = labelled_refs(train_source, labels=labels)
    if len(classes) < 2:
        raise FinetuneError(f"need at least 2 classes to fine-tune, found {len(classes)} ({', '.join(classes)})")
    idx = {c: i for i, c in enumerate(classes)}
    y_all = np.array([idx[r.label] for r in refs if r.label is not None])
    if val_source:
        vrefs, _ = labelled_refs(val_source, classes, labels)
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
    joined = labels.require_some(", ".join(train_source + (val_source or []))) if labels is not None else None
    if joined is not None:
        (log.warning if joined.unknown else log.info)("%s", joined.summary("the images"))

    net, backbone, pre, origin, head_spec = build_classifier(options, len(classes))
    fam, body = family_recipe(net, backbone, options, device, head_spec.name)
    amp = torch.bfloat16 if fam.precision == "bf16" else None
    inference_form = backbone.impl.inference_form(net)  # the form the weights are trained (and saved) in
    net.to(device)
    if device.type == "cuda":
        net.to(memory_format=torch.channels_last)
    groups = param_groups(net, backbone, options, head_spec.name, fam.layer_decay, body)
    set_trainable(net, groups, backbone_on=not options.freeze_backbone)
    toggle = grad_checkpointing_switch(net, backbone, options.grad_checkpointing)
    if options.memory_budget:
        budget: tuple[int, str] | None = (parse_size(options.memory_budget, FinetuneError), "--memory-budget")
    else:  # what is free, plus the weights already there (the need counts them)
        free = available_memory(device)
        budget = None if free is None else (free[0] + sum(p.numel() * p.element_size() for p in net.parameters()),
                                            free[1] + " (and the loaded weights)")
    blocks = len(set((layer_map(net) or {}).values())) if toggle is not None else 1

    def memory_check(size: int) -> dict[str, int]:
        need = check_memory(net, backbone.name, size, options.batch_size, device, amp, budget,
                            options.grad_checkpointing, toggle, blocks)
        log.info("memory per step: %s", ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in need.items()))
        return need

    # without --budget, before anything else; with it, at the size its plan chooses
    memory = memory_check(pre.crop_size) if options.budget_minutes is None else None
    resume_path = out.with_name(out.name + ".resume")
    plan: BudgetPlan | None = None
    if options.budget_minutes is not None:
        earlier = peek_state(resume_path) if resume else None
        if earlier and earlier.get("budget"):
            plan = BudgetPlan(**earlier["budget"])  # a resumed run keeps its plan
        else:
            train_s, eval_s = time_steps(net, pre.crop_size, options.batch_size, device, amp)
            head_e = options.epochs if options.freeze_backbone else options.head_epochs
            plan = plan_budget(options.budget_minutes * 60 - (time.perf_counter() - t_start), pre.crop_size,
                               train_s, eval_s, math.ceil(len(tr_refs) / options.batch_size),
                               math.ceil(len(vrefs) / options.batch_size),
                               math.ceil((len(tr_refs) + len(vrefs)) / options.batch_size), min(head_e, 1),
                               lambda size: takes_size(net, size, device))
            plan = dataclasses.replace(plan, budget_s=options.budget_minutes * 60)
        log.info("budget: %s, %d epochs", plan.reason, plan.epochs)
        options = dataclasses.replace(options, epochs=plan.epochs, image_size=plan.image_size)
        if plan.image_size != pre.crop_size:
            pre = pre.at_size(plan.image_size)
        memory = memory_check(pre.crop_size)
    # WiSE-FT mixes the trained weights with the start's: the tower as loaded (before a resume overwrites
    # it) and, once chosen, the starting head
    start: dict[str, torch.Tensor] = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()
                                      if k.startswith(body)} if fam.wise_ft else {}
    g = torch.Generator().manual_seed(options.seed)
    loader_kw: dict[str, Any] = {"collate_fn": collate, "num_workers": options.workers,
                                 "pin_memory": device.type == "cuda",
                                 "persistent_workers": options.workers > 0}
    train_loader = DataLoader(LabelledImages(tr_refs, ytr, train_transform(pre, options.flip, options.crop_scale),
                                      options.max_pixels),
                              batch_size=options.batch_size, shuffle=True, generator=g, drop_last=False,
                              **loader_kw)
    val_loader = DataLoader(LabelledImages(vrefs, yva, eval_transform(pre), options.max_pixels),
                            batch_size=options.batch_size, **loader_kw)
    skipped: dict[str, str] = {}

    state: dict[str, Any] = {"epoch": 0, "best": -1.0, "best_epoch": 0, "history": [], "bad_epochs": 0,
                             "frozen_val_accuracy": None, "probe_seconds": 0.0, "head_start": None,
                             "start_accuracy": None, "zero_shot_val_accuracy": None,
                             "zero_shot_val_accuracy_after": None, "wise_ft": None,
                             "budget": None if plan is None else dataclasses.asdict(plan)}
    opt = torch.optim.AdamW([{k: v for k, v in gr.items() if k != "name"} for gr in groups],
                            weight_decay=options.weight_decay)
    ema: Any = None  # torch.optim.swa_utils.AveragedModel once the backbone trains
    # what a resumed run must share with the run that wrote the resume file
    run_settings_key = {k: v for k, v in run_settings(options).items() if k not in RESUMABLE_CHANGES}
    if joined is not None:  # another labels file is another run
        run_settings_key["labels_sha256"] = joined.sha256
    run_key = {"classes": classes, "train": len(tr_refs), "val": len(vrefs), "settings": run_settings_key}
    state["run"] = run_key
    if resume and resume_path.exists():
        check_resume(resume_path, run_key)
        state, ema_state = load_resume(resume_path, net, opt)
        if fam.wise_ft:
            start.update(load_extra(resume_path, "start."))
        state["run"] = run_key
        if ema_state:
            ema = new_ema(net, options.ema)
            ema.load_state_dict(ema_state)
        log.info("resuming after epoch %d", state["epoch"])
    elif resume:
        log.warning("--resume given but %s does not exist; starting from scratch", resume_path)

    settings = run_settings(options)
    zs_head: torch.Tensor | None = None  # CLIP: the zero-shot head's weights (logit scale × unit text vectors)
    if fam.text_frozen:
        try:
            zs_head = zero_shot_weights(net, backbone, classes, device)
        except (ProbeError, TextQueryError) as e:  # a folder name the text tower cannot read as a prompt
            log.warning("no zero-shot head: %s", e)

    def tried() -> str:
        return recipe(options, pre.crop_size, dataclasses.replace(fam, head_start=state["head_start"] or "probe"))

    def save_best(epoch: int, val_acc: float, model: nn.Module) -> None:
        meta = {"backbone": backbone.name, **describe(backbone, origin), "pretrained": origin, "classes": classes,
                "head": head_spec.to_dict(), "inference_form": inference_form,
                "family_recipe": dataclasses.asdict(fam), "head_start": state["head_start"],
                "zero_shot_val_accuracy": state["zero_shot_val_accuracy"],
                "zero_shot_val_accuracy_after": state["zero_shot_val_accuracy_after"], "wise_ft": state["wise_ft"],
                "preprocessing": pre.to_dict(), "settings": settings, "recipe": tried(),
                "bn_policy": BN_POLICIES[options.bn],
                "ema": options.ema or None, "budget": state["budget"],
                "best_epoch": epoch, "best_val_accuracy": val_acc,
                "frozen_val_accuracy": state["frozen_val_accuracy"], "history": state["history"],
                **({"labels": joined.to_dict()} if joined is not None else {})}
        checkpoint.save(out, model.state_dict(), meta)

    if state["frozen_val_accuracy"] is None:
        eval_train = DataLoader(LabelledImages(tr_refs, ytr, eval_transform(pre), options.max_pixels),
                                batch_size=options.batch_size, **loader_kw)
        if options.bn == "adapt":
            # shuffled: the average of batch variances is the images' variance only when each batch is a
            # random sample (class-sorted batches measured too low a variance)
            shuffled = DataLoader(LabelledImages(tr_refs, ytr, eval_transform(pre), options.max_pixels),
                                  batch_size=options.batch_size, shuffle=True,
                                  generator=torch.Generator().manual_seed(options.seed),
                                  **{**loader_kw, "persistent_workers": False})  # one pass: no idle workers after it
            seen = adapt_bn(net, _normalised(shuffled, pre, device, ADAPT_BN_IMAGES))
            log.info("BatchNorm statistics re-estimated on %d training images", seen)
        acc, coef, icpt = frozen_probe(net, head_spec.name, eval_train, val_loader, pre, device, classes,
                                       options.seed)
        state["frozen_val_accuracy"] = acc
        state["probe_seconds"] = round(time.perf_counter() - t_start, 2)
        head = net.get_submodule(head_spec.name)
        new_head = {k: v.detach().clone() for k, v in head.state_dict().items()}
        if zs_head is not None:  # CLIP: the zero-shot head's accuracy before fine-tuning, on the same split
            set_head(head, zs_head, None)
            state["zero_shot_val_accuracy"] = evaluate(net, val_loader, pre, device, amp, skipped)
            head.load_state_dict(new_head)
        state["head_start"] = "new"
        if options.probe_init:
            # LP-FT (Kumar et al., ICLR 2022): the new head starts as the probe, so epoch 0 is the
            # probe's accuracy and fine-tuning does not first wreck the features with a random head. A CLIP
            # model starts from its zero-shot head instead where that is better on validation (WiSE-FT's
            # and FLYP's start: the text tower's knowledge of the class names).
            set_head(head, torch.from_numpy(coef), torch.from_numpy(icpt))
            state["best"] = evaluate(net, val_loader, pre, device, amp, skipped)
            state["head_start"] = "probe"
            zs_acc = state["zero_shot_val_accuracy"]
            if zs_head is not None and options.zero_shot_init and zs_acc is not None and zs_acc >= state["best"]:
                set_head(head, zs_head, None)
                state["best"], state["head_start"] = zs_acc, "zero-shot"
            state["best_epoch"] = 0
            state["start_accuracy"] = state["best"]
            save_best(0, state["best"], net)  # if no epoch beats it, the checkpoint is the start
        else:
            state["start_accuracy"] = evaluate(net, val_loader, pre, device, amp, skipped) if fam.wise_ft else None
        if fam.wise_ft:
            start.update({k: v.detach().cpu().clone() for k, v in net.state_dict().items()
                          if k.startswith(head_spec.name + ".")})

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
        set_trainable(net, groups, backbone_on=phase == "full")
        net.train()
        if phase == "head":
            net.eval()  # frozen backbone: dropout off, BN statistics untouched
        elif options.bn != "train":
            bn_eval(net)  # frozen: ImageNet's statistics; adapt: the user's, estimated before the probe
        if phase == "full" and options.ema > 0 and ema is None:
            ema = new_ema(net, options.ema)  # averages from the probe-initialised weights on
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
            try:
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    loss = loss_fn(net(xb), y.to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
            except torch.OutOfMemoryError:
                raise FinetuneError(f"out of memory in a training step at batch {options.batch_size}, "
                                    f"{pre.crop_size} px: lower --batch-size or --image-size, or add "
                                    "--grad-checkpointing (timm, OpenCLIP)") from None
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
        save_resume(resume_path, net, opt, state, ema,
                    {f"start.{k}": v for k, v in start.items() if k.startswith(head_spec.name + ".")})
        if phase == "full" and state["bad_epochs"] >= options.patience:
            log.info("early stop: no validation gain for %d epochs", options.patience)
            break
        if plan is not None and epoch < options.epochs and \
                time.perf_counter() - t_start + epoch_s > plan.budget_s:
            log.info("budget: another epoch would end after %.0f s; stopping after epoch %d", plan.budget_s, epoch)
            stopped_by_budget = True
            break
    written = (checkpoint.read_meta(out) or {}) if zs_head is not None else {}
    if written.get("zero_shot_val_accuracy_after") is not None:  # killed after the last write: it is done
        for key in ("zero_shot_val_accuracy_after", "wise_ft", "best_val_accuracy"):
            state["best" if key == "best_val_accuracy" else key] = written[key]
    if state["best_epoch"] > 0 and zs_head is not None and state["zero_shot_val_accuracy_after"] is None:
        # the weights kept, mixed with the start's (WiSE-FT), then the zero-shot head on that image tower;
        # the checkpoint written once with all of it
        opt.state.clear()  # AdamW's moments and the last gradients are not needed any more
        net.zero_grad(set_to_none=True)
        ema = None
        net.load_state_dict(checkpoint.load(out)[0])
        if fam.wise_ft:
            wise_ft(net, start, val_loader, pre, device, amp, state)
        if zs_head is not None:
            head = net.get_submodule(head_spec.name)
            kept = {k: v.detach().clone() for k, v in head.state_dict().items()}
            set_head(head, zs_head, None)
            state["zero_shot_val_accuracy_after"] = evaluate(net, val_loader, pre, device, amp, skipped)
            head.load_state_dict(kept)
        save_best(int(state["best_epoch"]), float(state["best"]), net)
    elif zs_head is not None and state["zero_shot_val_accuracy_after"] is None:
        state["zero_shot_val_accuracy_after"] = state["zero_shot_val_accuracy"]  # the tower never changed
        checkpoint.update_meta(out, {"zero_shot_val_accuracy_after": state["zero_shot_val_accuracy_after"]})
    if resume_path.exists():
        resume_path.unlink()
    return FinetuneResult(
        str(out), classes, float(state["best"]), int(state["best_epoch"]),
        float(state["frozen_val_accuracy"]), int(state["epoch"]),
        [EpochRecord(**h) for h in state["history"]], sorted(skipped.items()),
        len(tr_refs), len(vrefs), time.perf_counter() - t_start, float(state.get("probe_seconds") or 0.0),
        plan, stopped_by_budget, tried(), fam.family, state["zero_shot_val_accuracy"],
        state["zero_shot_val_accuracy_after"], state["wise_ft"], memory,
        joined.to_dict() if joined is not None else None)


# ---- family helpers -----------------------------------------------------------------------------
def describe(backbone: Backbone, origin: dict[str, Any] | None = None) -> dict[str, Any]:
    """The family, architecture and weights tag a checkpoint records beside the backbone's name (the
    tag of the weights really loaded, from ORIGIN: None for a weights file)."""
    name = backbone.name
    if backbone.family == "timm":
        arch, _, tag = name.removeprefix("timm:").partition(".")
    elif backbone.family == "open_clip":
        arch, _, tag = name.removeprefix("open_clip:").partition(":")
    else:
        arch = name
        first = origin or {}
        while first.get("kind") == "finetune" and isinstance(first.get("origin"), dict):
            first = first["origin"]  # continued from a checkpoint: the weights it started from
        kind, full = first.get("kind"), str(first.get("name", ""))
        tag = full.rsplit(".", 1)[-1] if kind in ("registry", "seeded") else ""
    if (origin or {}).get("kind") == "file":
        tag = ""
    return {"family": backbone.family if backbone.family in ("timm", "open_clip", "test") else "torchvision",
            "architecture": arch, "tag": tag or None}


def grad_checkpointing_switch(net: nn.Module, backbone: Backbone,
                              enabled: bool = False) -> Callable[[bool], None] | None:
    """A function turning the model's gradient checkpointing on or off (timm's, OpenCLIP's
    ``set_grad_checkpointing``), None where the model has none (timm's VGG, DLA, … assert); left
    ENABLED or not."""
    if backbone.family not in ("timm", "open_clip"):
        return None
    target = net.get_submodule("clip") if backbone.family == "open_clip" else net
    switch = getattr(target, "set_grad_checkpointing", None)
    if switch is None:
        return None
    try:
        switch(True)  # raises where the model has no checkpointed blocks (timm's: assert not enable)
        switch(enabled)
    except (AssertionError, NotImplementedError, AttributeError):
        return None
    return switch  # type: ignore[no-any-return]


def set_head(head: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """HEAD's weights from a [classes, features] matrix (a 1x1 convolution's reshaped) and BIAS (None: 0)."""
    with torch.no_grad():
        head.weight.copy_(weight.reshape(head.weight.shape))  # type: ignore[operator, union-attr, arg-type]
        if bias is None:
            head.bias.zero_()  # type: ignore[operator]
        else:
            head.bias.copy_(bias)  # type: ignore[operator]


def zero_shot_weights(net: nn.Module, backbone: Backbone, classes: list[str], device: torch.device) -> torch.Tensor:
    """A CLIP model's zero-shot head for CLASSES as Linear weights on normalised image embeddings: the
    logit scale times the class names' unit text vectors (OpenCLIP's prompt ensemble), so that the
    head's logits are exactly ``zeroshot.ZeroShotHead``'s."""
    from embedder.learn.zeroshot import class_text, text_head

    text = backbone.impl.text_tower(net)
    if text is None:
        raise FinetuneError(f"{backbone.name} has no text tower for a zero-shot head")
    empty = [c for c in classes if not class_text(c)]
    if empty:
        raise ProbeError(f"class {empty[0]!r} has no words for a prompt")
    was = net.training
    net.eval()
    try:
        zs = text_head(text, classes, None, device)
    finally:
        net.train(was)
    return torch.from_numpy(zs.weights * zs.logit_scale)


def mix(start: dict[str, torch.Tensor], end: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """WiSE-FT's weight-space ensemble (Wortsman et al., CVPR 2022): (1 - alpha) * START + alpha * END for
    every floating tensor START holds, END's elsewhere; alpha 0 is START exactly, 1 END exactly."""
    out = dict(end)
    for k, v in start.items():
        e = end[k]
        if alpha == 0.0:
            out[k] = v.to(e.device, e.dtype)
        elif alpha != 1.0 and e.is_floating_point():  # START is kept on the CPU, END where the model is
            out[k] = ((1.0 - alpha) * v.to(e.device, torch.float32) + alpha * e.to(torch.float32)).to(e.dtype)
    return out


def wise_ft(net: nn.Module, start: dict[str, torch.Tensor], val_loader: DataLoader,  # type: ignore[type-arg]
            pre: Preprocessing, device: torch.device, amp: torch.dtype | None, state: dict[str, Any]) -> None:
    """WiSE-FT on NET (holding the best epoch's weights): the mixing weight alpha chosen on validation
    among WISE_ALPHAS (0: the start, its accuracy known; 1: the best epoch, known); ties go to the
    alpha nearest 0.5, the paper's default. NET is left holding the chosen mix; STATE records it."""
    ft = {k: v.detach().clone() for k, v in net.state_dict().items() if k in start}  # image tower and head only
    accs: dict[float, float] = {0.0: float(state["start_accuracy"]), 1.0: float(state["best"])}
    for a in WISE_ALPHAS:
        if a in accs:
            continue
        net.load_state_dict(mix(start, ft, a), strict=False)
        accs[a] = evaluate(net, val_loader, pre, device, amp)
    alpha = max(accs, key=lambda a: (accs[a], -abs(a - 0.5)))
    log.info("WiSE-FT: alpha %.1f (validation %s)", alpha,
             ", ".join(f"{a:g}: {v:.4f}" for a, v in sorted(accs.items())))
    state["wise_ft"] = {"alpha": alpha, "val_accuracy": {f"{a:g}": round(v, 4) for a, v in sorted(accs.items())}}
    state["best"] = accs[alpha]
    net.load_state_dict(mix(start, ft, alpha), strict=False)

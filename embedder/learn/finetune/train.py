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
from embedder.errors import FinetuneError, ProbeError
from embedder.learn.finetune.budget import plan_budget, time_steps
from embedder.learn.finetune.data import LabelledImages, collate, eval_transform, labelled_refs, train_transform
from embedder.learn.finetune.options import (
    BN_POLICIES,
    BudgetPlan,
    EpochRecord,
    FinetuneOptions,
    FinetuneResult,
    recipe,
)
from embedder.learn.finetune.resume import (
    RESUMABLE_CHANGES,
    check_resume,
    load_resume,
    peek_state,
    run_settings,
    save_resume,
)
from embedder.learn.finetune.schedule import adapt_bn, bn_eval, new_ema, param_groups, phase_scheduler, set_trainable
from embedder.learn.selection import stratified_split
from embedder.models import checkpoint
from embedder.models.backbone import Backbone
from embedder.models.builder import ModelSpec, load_network
from embedder.models.devices import resolve_device
from embedder.models.features import set_module
from embedder.models.preprocessing import Preprocessing

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
    net, backbone, loaded, pre = load_network(ModelSpec(options.backbone, options.weights_tag,
                                                        options.weights_file, image_size=options.image_size))
    if backbone.source is not None:
        raise FinetuneError(f"fine-tuning {backbone.name} is not supported yet (torchvision backbones are); "
                            "its frozen features work with extract, probe and index")
    old = net.get_submodule(backbone.head)
    if not isinstance(old, nn.Linear):
        raise FinetuneError(f"{backbone.name}'s head {backbone.head} is not a Linear layer")
    torch.manual_seed(options.seed)
    set_module(net, backbone.head, nn.Linear(old.in_features, n_classes))
    origin = loaded.info.to_dict()
    return net, backbone, pre, origin


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
    from embedder.learn.options import ProbeOptions
    from embedder.learn.probe import Dataset as ProbeData
    from embedder.learn.probe import train_probe

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


# ---- the loop ------------------------------------------------------------------------------------
def finetune(train_source: list[str], out: Path, options: FinetuneOptions = FinetuneOptions(),
             val_source: list[str] | None = None, resume: bool = False,
             on_step: Callable[[int, int, int, float], None] | None = None,
             on_epoch: Callable[[EpochRecord], None] | None = None) -> FinetuneResult:
    t_start = time.perf_counter()
    device = resolve_device(options.device)
    amp = torch.bfloat16 if device.type == "cuda" else None
    refs, classes = labelled_refs(train_source)
    if len(classes) < 2:
        raise FinetuneError(f"need at least 2 classes to fine-tune, found {len(classes)} ({', '.join(classes)})")
    idx = {c: i for i, c in enumerate(classes)}
    y_all = np.array([idx[r.label] for r in refs if r.label is not None])
    if val_source:
        vrefs, _ = labelled_refs(val_source, classes)
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
        earlier = peek_state(resume_path) if resume else None
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
                             "frozen_val_accuracy": None, "probe_seconds": 0.0,
                             "budget": None if plan is None else dataclasses.asdict(plan)}
    opt = torch.optim.AdamW([{k: v for k, v in gr.items() if k != "name"} for gr in groups],
                            weight_decay=options.weight_decay)
    ema: Any = None  # torch.optim.swa_utils.AveragedModel once the backbone trains
    # what a resumed run must share with the run that wrote the resume file
    run_key = {"classes": classes, "train": len(tr_refs), "val": len(vrefs),
               "settings": {k: v for k, v in run_settings(options).items() if k not in RESUMABLE_CHANGES}}
    state["run"] = run_key
    if resume and resume_path.exists():
        check_resume(resume_path, run_key)
        state, ema_state = load_resume(resume_path, net, opt)
        state["run"] = run_key
        if ema_state:
            ema = new_ema(net, options.ema)
            ema.load_state_dict(ema_state)
        log.info("resuming after epoch %d", state["epoch"])
    elif resume:
        log.warning("--resume given but %s does not exist; starting from scratch", resume_path)

    settings = run_settings(options)
    tried = recipe(options, pre.crop_size)

    def save_best(epoch: int, val_acc: float, model: nn.Module) -> None:
        meta = {"backbone": backbone.name, "pretrained": origin, "classes": classes,
                "preprocessing": pre.to_dict(), "settings": settings, "recipe": tried,
                "bn_policy": BN_POLICIES[options.bn],
                "ema": options.ema or None, "budget": state["budget"],
                "best_epoch": epoch, "best_val_accuracy": val_acc,
                "frozen_val_accuracy": state["frozen_val_accuracy"], "history": state["history"]}
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
        save_resume(resume_path, net, opt, state, ema)
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
        plan, stopped_by_budget, tried)

"""The optimisation schedule: parameter groups and their learning rates, which layers train in which
phase, BatchNorm policy, warm-up and cosine decay, the weight average."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from embedder.errors import FinetuneError
from embedder.learn.finetune.options import FinetuneOptions
from embedder.models.backbone import Backbone
from embedder.models.layers import suggested_layers


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


def set_trainable(net: nn.Module, groups: list[dict[str, Any]], backbone_on: bool) -> None:
    """Only the head's parameters train, or every group's when BACKBONE_ON."""
    net.requires_grad_(False)
    for g in groups:
        if g["name"] == "head" or backbone_on:
            for p in g["params"]:
                p.requires_grad_(True)


def bn_eval(net: nn.Module) -> None:
    """Every BatchNorm layer in eval mode: its running statistics stay as they are."""
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


@torch.no_grad()
def adapt_bn(net: nn.Module, batches: Any) -> int:
    """AdaBN (Li et al., 2016): every BatchNorm layer's running statistics re-estimated as the plain
    average over BATCHES (normalised input tensors) — the statistics of the user's images instead of
    ImageNet's — with torch's own ``update_bn``. Returns the number of images seen."""
    from torch.optim.swa_utils import update_bn

    seen = 0

    def counted() -> Any:
        nonlocal seen
        for x in batches:
            seen += len(x)
            yield x

    update_bn(counted(), net)
    net.eval()
    return seen


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


def ema_avg(decay: float) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor | int], torch.Tensor]:
    def avg(averaged: torch.Tensor, current: torch.Tensor, n: torch.Tensor | int) -> torch.Tensor:
        if not averaged.is_floating_point():
            return current  # counters (BatchNorm's num_batches_tracked)
        d = min(decay, (1.0 + float(n)) / (10.0 + float(n)))  # short runs: the average warms up
        return averaged * d + current * (1.0 - d)

    return avg


def new_ema(net: nn.Module, decay: float) -> Any:
    from torch.optim.swa_utils import AveragedModel

    return AveragedModel(net, avg_fn=ema_avg(decay), use_buffers=True)

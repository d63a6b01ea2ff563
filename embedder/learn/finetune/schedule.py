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


def param_groups(net: nn.Module, backbone: Backbone, options: FinetuneOptions, head: str | None = None,
                 layer_decay: float | None = None, body: str = "") -> list[dict[str, Any]]:
    """The head (module HEAD, default ``backbone.head``) at lr_head; the backbone's parameters under the
    prefix BODY (a CLIP model's image tower; "": all) either per block with layer-wise decay
    (LAYER_DECAY, ``layer_map``) or per stage at lr_backbone × lr_decay^(stages below the top);
    stages before ``unfreeze_from`` get no group at all (they stay frozen), nor do parameters outside BODY."""
    head_prefix = (head if head is not None else backbone.head) + "."
    if layer_decay is not None:
        if options.unfreeze_from is not None:
            raise FinetuneError(f"--unfreeze-from takes a stage of a BatchNorm network; {backbone.name} trains every "
                                "block with layer-wise decay (--layer-decay 1 for one rate)")
        layers = layer_map(net)
        if layers is None:
            raise FinetuneError(f"--layer-decay: {backbone.name} does not name its blocks (no layer-wise map)")
        return _decay_groups(net, head_prefix, options, layer_decay, layers, body)
    with_params = {n for n, _ in net.named_parameters()}
    stages = [s for s in suggested_layers(backbone.name) if not head_prefix.startswith(s + ".")
              and any(p.startswith(s + ".") for p in with_params)]
    if options.unfreeze_from is not None and options.unfreeze_from not in stages:
        raise FinetuneError(f"--unfreeze-from {options.unfreeze_from!r} is not a stage of "
                            f"{backbone.name}; stages: {', '.join(stages)}")
    first = stages.index(options.unfreeze_from) if options.unfreeze_from else 0

    def stage_of(name: str) -> int:
        for i, s in enumerate(stages):
            if name == s or name.startswith(s + "."):
                return i
        return max(len(stages) - 1, 0)  # parameters outside named stages (final norms) train with the top

    groups: dict[int, list[nn.Parameter]] = {}
    head_params: list[nn.Parameter] = []
    for name, p in net.named_parameters():
        if name.startswith(head_prefix):
            head_params.append(p)
            continue
        if not name.startswith(body):
            continue
        s = stage_of(name)
        if s >= first:
            groups.setdefault(s, []).append(p)
    out: list[dict[str, Any]] = [{"params": head_params, "lr": options.lr_head, "name": "head",
                                  "base_lr": options.lr_head}]
    top = max(len(stages) - 1, 0)
    for s in sorted(groups, reverse=True):
        lr = options.lr_backbone * options.lr_decay ** (top - s)
        out.append({"params": groups[s], "lr": lr, "name": stages[s] if stages else "backbone", "base_lr": lr})
    return out


def layer_map(net: nn.Module) -> dict[str, int] | None:
    """Each backbone parameter's block number, 0 (the stem) up to the last block, by the model's own
    block names: timm's ``group_matcher`` (ViT, DeiT, EVA, DINOv2, ConvNeXt, …; a CLIP model's timm
    trunk), OpenCLIP's ViT (``transformer.resblocks.N``) by the same rule written for it. None where
    the network names no blocks."""
    from timm.models import group_parameters

    def under(module: nn.Module, prefix: str, matcher: Any) -> dict[str, int]:
        return {prefix + k: v for k, v in group_parameters(module, matcher, reverse=True).items()}

    if hasattr(net, "group_matcher"):
        return under(net, "", net.group_matcher(coarse=False))  # type: ignore[operator]
    visual = getattr(getattr(net, "clip", None), "visual", None)
    if visual is None:
        return None
    trunk = getattr(visual, "trunk", None)
    if trunk is not None and hasattr(trunk, "group_matcher"):
        found = under(trunk, "clip.visual.trunk.", trunk.group_matcher(coarse=False))
    elif hasattr(visual, "transformer") and hasattr(visual.transformer, "resblocks"):
        found = under(visual, "clip.visual.", {
            "stem": r"^(?:conv1|class_embedding|positional_embedding|ln_pre|patch_dropout)",
            "blocks": [(r"^transformer\.resblocks\.(\d+)", None), (r"^(?:ln_post|proj|attn_pool)", (99999,))]})
    else:
        return None
    top = max(found.values(), default=0)
    for name, _ in visual.named_parameters(prefix="clip.visual"):
        found.setdefault(name, top)  # the tower's projection after the trunk: with the top block
    return found


def _decay_groups(net: nn.Module, head_prefix: str, options: FinetuneOptions, decay: float,
                  layers: dict[str, int], body: str) -> list[dict[str, Any]]:
    """BEiT's layer-wise decay as timm's ``param_groups_layer_decay`` makes it (one group per block and
    decay kind, lr × decay^(blocks above), no weight decay on 1-D tensors and position/class
    tokens), the head its own group at lr_head."""
    no_wd = set(getattr(net, "no_weight_decay", lambda: set())())
    top = max((v for k, v in layers.items() if not k.startswith(head_prefix)), default=0)
    head_params: list[nn.Parameter] = []
    groups: dict[tuple[int, bool], list[nn.Parameter]] = {}
    for name, p in net.named_parameters():
        if name.startswith(head_prefix):
            head_params.append(p)
            continue
        if not name.startswith(body):
            continue
        plain = p.ndim <= 1 or name in no_wd or name.split(".")[-1] in ("positional_embedding", "class_embedding")
        groups.setdefault((layers.get(name, top), plain), []).append(p)
    out: list[dict[str, Any]] = [{"params": head_params, "lr": options.lr_head, "name": "head",
                                  "base_lr": options.lr_head}]
    for (layer, plain) in sorted(groups, key=lambda k: (-k[0], k[1])):
        lr = options.lr_backbone * decay ** (top - layer)
        out.append({"params": groups[(layer, plain)], "lr": lr, "base_lr": lr, "name": f"block{layer}",
                    **({"weight_decay": 0.0} if plain else {})})
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

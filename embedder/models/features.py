"""A frozen backbone cut at the requested layer: float images in, [N, dim] features out."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from embedder import choices
from embedder.errors import DeviceError, UnknownLayer, WeightsMismatch
from embedder.models.registry import Backbone, Preprocessing, get_backbone, suggested_layers
from embedder.models.weights import (
    LoadedWeights,
    apply_weights,
    ensure_registry_file,
    load_weights_file,
    seeded_weights,
)

log = logging.getLogger(__name__)

POOLS = choices.POOLS
DEFAULT_BACKBONE = "resnet50"


@dataclass(frozen=True)
class ModelSpec:
    """Everything that determines what a vector means. Recorded in the store."""

    backbone: str | None = DEFAULT_BACKBONE  # None: the one a checkpoint in weights_file names
    weights_tag: str | None = None  # None: the registry's tag
    weights_file: Path | None = None  # local state dict or finetune checkpoint
    layer: str | None = None  # None: penultimate (the model's own pooled features)
    pool: str | None = None  # None: the model's own pooling; avg | max | gem on a feature map
    image_size: int | None = None  # None: the weights' own crop size


def _set_module(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def gem(x: torch.Tensor, p: float = 3.0, eps: float = 1e-6) -> torch.Tensor:
    return x.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


def pool_features(x: torch.Tensor, how: str) -> torch.Tensor:
    """[N,C,H,W] → [N,C]; token sequences [N,L,C] are averaged over tokens; [N,C] passes."""
    if x.ndim == 2:
        return x
    if x.ndim == 3:  # transformer tokens
        return x.amax(dim=1) if how == "max" else x.mean(dim=1)
    if how == "avg":
        return x.mean(dim=(-2, -1))
    if how == "max":
        return x.amax(dim=(-2, -1))
    return gem(x.float()).to(x.dtype)


def truncate_at(net: nn.Module, layer: str) -> nn.Module:
    """The network cut after LAYER, as a graph that computes nothing past it (torchvision's
    ``create_feature_extractor``: FX tracing, dead code removed), returning that layer's output."""
    from torchvision.models.feature_extraction import create_feature_extractor

    try:
        return _FirstOutput(create_feature_extractor(net, return_nodes={layer: "features"}))
    except Exception as e:  # noqa: BLE001 - FX tracing limits are not the user's problem
        log.info("%s is not traceable at %s (%s); tapping it with a forward hook", type(net).__name__, layer, e)
        return _HookTap(net, layer)


class _FirstOutput(nn.Module):
    def __init__(self, extractor: nn.Module) -> None:
        super().__init__()
        self.extractor = extractor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.extractor(x)["features"]
        return out[0] if isinstance(out, (tuple, list)) else out  # type: ignore[no-any-return]


class _Stop(Exception):
    pass


class _HookTap(nn.Module):
    """Fallback for graphs FX cannot trace: run forward, keep LAYER's output, stop there."""

    def __init__(self, net: nn.Module, layer: str) -> None:
        super().__init__()
        self.net = net
        self._captured: torch.Tensor | None = None
        net.get_submodule(layer).register_forward_hook(self._hook)

    def _hook(self, _m: nn.Module, _inp: object, out: torch.Tensor) -> None:
        self._captured = out
        raise _Stop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            self.net(x)
        except _Stop:
            pass
        feats, self._captured = self._captured, None
        if feats is None:
            raise RuntimeError("the tapped layer was not reached in forward")
        return feats[0] if isinstance(feats, (tuple, list)) else feats


class FeatureModel(nn.Module):
    """Backbone with its head replaced by Identity, optionally cut at an earlier layer and pooled."""

    def __init__(self, net: nn.Module, layer: str | None, pool: str) -> None:
        super().__init__()
        self.layer = layer
        self.pool = pool
        self.net = net if layer is None else _folded(truncate_at(net, layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        if self.layer is None:
            return out.flatten(1) if out.ndim > 2 else out
        return pool_features(out, self.pool)


@dataclass
class LoadedModel:
    model: FeatureModel
    backbone: Backbone
    weights: LoadedWeights
    preprocessing: Preprocessing
    layer: str  # "penultimate" or a module name
    pool: str
    dim: int


def drop_aux_head(net: nn.Module) -> None:
    """Inception's auxiliary classifier is a training device; features come from the main path."""
    if hasattr(net, "aux_logits"):
        setattr(net, "aux_logits", False)  # noqa: B010
        if getattr(net, "AuxLogits", None) is not None:
            setattr(net, "AuxLogits", None)  # noqa: B010


def fold_batchnorm(net: nn.Module, inplace: bool = False) -> nn.Module:
    """Fold eval-mode BatchNorm into the preceding conv (same function, fewer memory passes:
    2-3x faster on CPU for MobileNet-style nets). Falls back to the unfused model when the
    architecture cannot be traced symbolically."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules()):
        return net
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(net, inplace=inplace)
    except Exception as e:  # noqa: BLE001 - tracing limits are not the user's problem
        log.debug("BatchNorm folding skipped for this architecture: %s", e)
        return net


def _folded(tap: nn.Module) -> nn.Module:
    """BatchNorm folded inside a truncated graph (folding its wrapper fails to trace, which left
    layer taps unfused: measured 94 → 121 img/s for MobileNetV2 at features.17 on 2 cores)."""
    if isinstance(tap, _FirstOutput):
        # in place: a deep copy of torchvision's dual-graph module comes back in training mode
        tap.extractor = fold_batchnorm(tap.extractor.eval(), inplace=True)
        return tap
    return fold_batchnorm(tap.eval())


def resolve_device(device: str) -> torch.device:
    """'auto' means cuda when present; the choice is always explicit and recorded."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise DeviceError(f"unknown device {device!r}; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {device} requested but CUDA is not available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"{device}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif dev.type != "cpu":
        raise DeviceError(f"unsupported device {device!r}; use auto, cpu or cuda[:N]")
    return dev


def resolve_weights(spec: ModelSpec) -> tuple[Backbone, LoadedWeights | None]:
    """Which architecture and which weights file. A checkpoint names its own backbone: used when
    ``spec.backbone`` is None, refused when it names another. A plain state dict does not say what
    it is for, so it needs a backbone. Registry weights: None (torchvision's builder loads them)."""
    if spec.weights_file is None:
        return get_backbone(spec.backbone or DEFAULT_BACKBONE), None
    weights = load_weights_file(Path(spec.weights_file))
    if weights.backbone is not None:
        if spec.backbone is not None and spec.backbone != weights.backbone:
            raise WeightsMismatch(f"{spec.weights_file} is a {weights.backbone} checkpoint but --backbone "
                                  f"{spec.backbone} was given; drop --backbone (the checkpoint says its own)")
        return get_backbone(weights.backbone), weights
    if spec.backbone is None:
        raise WeightsMismatch(f"{spec.weights_file} is a plain state dict, which does not say its "
                              "architecture; pass --backbone NAME")
    return get_backbone(spec.backbone), weights


def load_network(spec: ModelSpec) -> tuple[nn.Module, Backbone, LoadedWeights, Preprocessing]:
    """The pretrained network with its weights applied (all but the classification head, which
    callers replace; auxiliary heads removed) and the preprocessing that matches them. Shared by
    extraction and fine-tuning. Registry weights load through torchvision's own builder, with its
    key remapping (DenseNet's legacy names, MNASNet's versions), from torchvision's cache."""
    backbone, weights = resolve_weights(spec)
    tag = spec.weights_tag if weights is None else None
    if weights is None and not backbone.is_torchvision:
        weights = seeded_weights(backbone)
    if weights is None:
        ref = ensure_registry_file(backbone, tag)
        net = backbone.build_pretrained(tag)
        weights = LoadedWeights(None, ref)
    else:
        net = backbone.build_architecture(tag)
        if weights.state_dict is not None:
            apply_weights(net, weights.state_dict, backbone)
    drop_aux_head(net)
    pre = weights.preprocessing or backbone.preprocessing(tag)
    if spec.image_size is not None and spec.image_size != pre.crop_size:
        pre = pre.at_size(spec.image_size)
    return net, backbone, weights, pre


def load_model(spec: ModelSpec) -> LoadedModel:
    net, backbone, weights, pre = load_network(spec)
    _set_module(net, backbone.head, nn.Identity())
    net.eval().requires_grad_(False)

    layer, pool = spec.layer, spec.pool
    if pool is not None and pool not in POOLS:
        raise UnknownLayer(f"unknown pooling {pool!r}; valid: {', '.join(POOLS)}")
    if layer is None and pool not in (None, "avg"):
        layer = backbone.feature_map  # --pool alone: the last feature map, pooled that way
    if layer is not None:
        names = {n for n, _ in net.named_modules() if n}
        if layer not in names:
            valid = suggested_layers(backbone.name)
            raise UnknownLayer(
                f"{backbone.name} has no layer {layer!r}; stage-level layers: {', '.join(valid)}"
            )
    if layer is None:
        net = fold_batchnorm(net)
    model = FeatureModel(net, layer, pool or "avg").eval()
    with torch.inference_mode():
        probe = torch.zeros(1, 3, pre.crop_size, pre.crop_size)
        dim = int(model(probe).shape[1])
    return LoadedModel(model, backbone, weights, pre, layer or "penultimate", pool or "avg", dim)

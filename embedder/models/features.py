"""A frozen backbone cut at the requested layer: float images in, [N, dim] features out."""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass

import torch
from torch import nn

from embedder import choices
from embedder.errors import UnknownBackbone, UnknownLayer
from embedder.models.backbone import Backbone
from embedder.models.builder import ModelSpec, load_network
from embedder.models.layers import suggested_layers
from embedder.models.preprocessing import Preprocessing
from embedder.models.text import TextTower
from embedder.models.weights import LoadedWeights, classifier_modules

log = logging.getLogger(__name__)

POOLS = choices.POOLS


def set_module(root: nn.Module, dotted: str, new: nn.Module) -> None:
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
    # the model's text tower: CLIP-family models cut at their own image embedding only (never at a --layer)
    text: TextTower | None = None


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


def load_model(spec: ModelSpec) -> LoadedModel:
    net, backbone, weights, pre = load_network(spec)
    for head in classifier_modules(net, backbone.classifiers):  # CLIP's image tower has none to drop
        if not isinstance(net.get_submodule(head), nn.Identity):
            set_module(net, head, nn.Identity())
    net.eval().requires_grad_(False)

    layer, pool = spec.layer, spec.pool
    if pool is not None and pool not in POOLS:
        raise UnknownLayer(f"unknown pooling {pool!r}; valid: {', '.join(POOLS)}")
    if layer is None and pool not in (None, "avg"):
        if not backbone.feature_map:
            raise UnknownLayer(f"--pool {pool} on {backbone.name} needs --layer (a module whose feature map "
                               f"to pool); stage-level layers: {', '.join(suggested_layers(backbone.name))}")
        layer = backbone.feature_map  # --pool alone: the last feature map, pooled that way
    if layer is not None:
        names = {n for n, _ in net.named_modules() if n}
        if layer not in names:
            valid = suggested_layers(backbone.name)
            raise UnknownLayer(
                f"{backbone.name} has no layer {layer!r}; stage-level layers: {', '.join(valid)}"
            )
    # the text tower shares the space of the model's own image embedding, not of an inner layer's output
    text = backbone.impl.text_tower(net) if layer is None else None
    if layer is None:
        net = fold_batchnorm(net)
    model = FeatureModel(net, layer, pool or "avg").eval()
    dim = _output_dim(model, backbone, spec, weights, pre)
    return LoadedModel(model, backbone, weights, pre, layer or "penultimate", pool or "avg", dim, text)


def _output_dim(model: FeatureModel, backbone: Backbone, spec: ModelSpec, weights: LoadedWeights,
                pre: Preprocessing) -> int:
    """The feature dim, from one blank image at the input size; a model that cannot take the size
    --image-size asked for (LeViT's attention biases, a ViT tower without dynamic position embeddings)
    is refused in one line."""
    probe = torch.zeros(1, 3, pre.crop_size, pre.crop_size)
    own = weights.preprocessing or backbone.preprocessing(spec.weights_tag if spec.weights_file is None else None)
    with torch.inference_mode():
        if spec.image_size is None or spec.image_size == own.crop_size:
            return int(model(probe).shape[1])
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # FX prints the failing graph line before re-raising
                return int(model(probe).shape[1])
        except (AssertionError, RuntimeError) as e:
            first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise UnknownBackbone(f"{backbone.name} does not take {pre.crop_size}x{pre.crop_size} images "
                                  f"({first[:160]}); drop --image-size to use its own {own.crop_size}") from None

"""Where a backbone can be cut: module names from the architecture built on the meta device (no memory,
no weights)."""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

from embedder.errors import UnknownLayer

if TYPE_CHECKING:  # torch and torchvision load only where a model is built (fast CLI start)
    from torch import nn
from embedder.models.backbone import Backbone
from embedder.models.registry import get_backbone


def build_on_meta(backbone: Backbone, tag: str | None = None) -> nn.Module:
    """The architecture with parameters on the meta device: shapes without memory or init cost."""
    import torch
    from torch import nn

    try:
        with torch.device("meta"):
            return backbone.build_architecture(tag)
    except (NotImplementedError, RuntimeError):
        pass  # some builders (regnet) compute widths with .tolist(); move parameters as created
    original = nn.Module.register_parameter

    def to_meta(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(self, name, param)

    nn.Module.register_parameter = to_meta  # type: ignore[method-assign]
    try:
        model = backbone.build_architecture(tag)
    except (NotImplementedError, RuntimeError):  # a builder that moves its model (OpenCLIP): built for real
        nn.Module.register_parameter = original  # type: ignore[method-assign]
        return backbone.build_architecture(tag)
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]
    return model.to("meta")


@cache
def _module_names(name: str) -> tuple[str, ...]:
    model = build_on_meta(get_backbone(name))
    return tuple(n for n, _ in model.named_modules() if n)


def suggested_layers(name: str) -> list[str]:
    """Stage-level module names worth cutting at (children, and children of `features`; for a CLIP
    model, the image tower's stages or blocks: its text tower is never on the image path)."""
    names = _module_names(name)
    if "clip.visual" in names:
        return _numbered_stages(names, "clip.visual.")
    top = [n for n in names if "." not in n]
    feats = [n for n in names if n.startswith("features.") and n.count(".") == 1]
    return feats or top


def _numbered_stages(names: tuple[str, ...], under: str) -> list[str]:
    """The shallowest list of numbered blocks under UNDER (a ViT's ``transformer.resblocks.N``, a
    hierarchical trunk's ``stages.N``); the most numerous at that depth."""
    import re

    groups: dict[str, list[str]] = {}
    for n in names:
        m = re.fullmatch(r"(.*)\.(\d+)", n)
        if m and n.startswith(under):
            groups.setdefault(m.group(1), []).append(n)
    groups = {k: v for k, v in groups.items() if len(v) >= 2}
    if not groups:
        return [n for n in names if n.startswith(under) and n.count(".") == under.count(".")]
    best = min(groups, key=lambda k: (k.count("."), -len(groups[k])))
    return groups[best]


def check_layer(name: str, layer: str) -> None:
    """Raise UnknownLayer (listing the stage-level layers) unless LAYER is a module of backbone NAME."""
    if layer not in _module_names(name):
        raise UnknownLayer(f"{name} has no layer {layer!r}; stage-level layers: {', '.join(suggested_layers(name))}")


def layer_depth(name: str, layer: str) -> float:
    """Where LAYER sits in the forward pass, 0..1 by module order (the penultimate features: 1)."""
    names = _module_names(name)
    if layer not in names:
        return 1.0
    return round((names.index(layer) + 1) / len(names), 3)

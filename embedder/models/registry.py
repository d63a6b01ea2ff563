"""The backbone registry: data, like torchvision's WeightsEnum.

Each entry names a torchvision classification model, the dotted path of its final Linear layer
(replaced by Identity to expose the penultimate, globally pooled features, never logits) and the
embedding dim that leaves. Weights and the preprocessing that matches them come from torchvision's
own weights enum (``weights.transforms()``, ``weights.meta``): callers never type a mean or a crop.
Adding a backbone is one line in ``_ENTRIES``.
"""

from __future__ import annotations

from embedder.errors import UnknownBackbone, closest
from embedder.models.backbone import Backbone
from embedder.models.tiny_family import TinyModel
from embedder.models.torchvision_family import TorchvisionModel


def _family(prefix: str, head: str, fmap: str, dims: dict[str, int]) -> list[Backbone]:
    return [_tv(n, head, d, prefix, fmap) for n, d in dims.items()]


def _tv(name: str, head: str, dim: int, family: str, fmap: str) -> Backbone:
    return Backbone(name, head, dim, family, fmap, TorchvisionModel(name, head, family))


_ENTRIES: list[Backbone] = [
    *_family("resnet", "fc", "layer4", {"resnet18": 512, "resnet34": 512, "resnet50": 2048,
                              "resnet101": 2048, "resnet152": 2048}),
    *_family("resnext", "fc", "layer4", {"resnext50_32x4d": 2048, "resnext101_32x8d": 2048,
                               "resnext101_64x4d": 2048}),
    *_family("wide_resnet", "fc", "layer4", {"wide_resnet50_2": 2048, "wide_resnet101_2": 2048}),
    *_family("vgg", "classifier.6", "features", {f"vgg{d}{bn}": 4096 for d in (11, 13, 16, 19)
                                     for bn in ("", "_bn")}),
    *_family("efficientnet", "classifier.1", "features", {
        "efficientnet_b0": 1280, "efficientnet_b1": 1280, "efficientnet_b2": 1408,
        "efficientnet_b3": 1536, "efficientnet_b4": 1792, "efficientnet_b5": 2048,
        "efficientnet_b6": 2304, "efficientnet_b7": 2560, "efficientnet_v2_s": 1280,
        "efficientnet_v2_m": 1280, "efficientnet_v2_l": 1280}),
    _tv("mobilenet_v2", "classifier.1", 1280, "mobilenet", "features"),
    _tv("mobilenet_v3_small", "classifier.3", 1024, "mobilenet", "features"),
    _tv("mobilenet_v3_large", "classifier.3", 1280, "mobilenet", "features"),
    *_family("mnasnet", "classifier.1", "layers", {"mnasnet0_5": 1280, "mnasnet0_75": 1280,
                                         "mnasnet1_0": 1280, "mnasnet1_3": 1280}),
    *_family("shufflenet", "fc", "conv5", {"shufflenet_v2_x0_5": 1024, "shufflenet_v2_x1_0": 1024,
                                  "shufflenet_v2_x1_5": 1024, "shufflenet_v2_x2_0": 2048}),
    *_family("convnext", "classifier.2", "features", {"convnext_tiny": 768, "convnext_small": 768,
                                          "convnext_base": 1024, "convnext_large": 1536}),
    *_family("regnet", "fc", "trunk_output", {
        "regnet_y_400mf": 440, "regnet_y_800mf": 784, "regnet_y_1_6gf": 888,
        "regnet_y_3_2gf": 1512, "regnet_y_8gf": 2016, "regnet_y_16gf": 3024,
        "regnet_y_32gf": 3712, "regnet_y_128gf": 7392, "regnet_x_400mf": 400,
        "regnet_x_800mf": 672, "regnet_x_1_6gf": 912, "regnet_x_3_2gf": 1008,
        "regnet_x_8gf": 1920, "regnet_x_16gf": 2048, "regnet_x_32gf": 2520}),
    *_family("densenet", "classifier", "features", {"densenet121": 1024, "densenet161": 2208,
                                        "densenet169": 1664, "densenet201": 1920}),
    _tv("inception_v3", "fc", 2048, "inception", "Mixed_7c"),
    _tv("googlenet", "fc", 1024, "inception", "inception5b"),
    *_family("vit", "heads.head", "encoder", {"vit_b_16": 768, "vit_b_32": 768, "vit_l_16": 1024,
                                   "vit_l_32": 1024, "vit_h_14": 1280}),
    *_family("swin", "head", "permute", {"swin_t": 768, "swin_s": 768, "swin_b": 1024,
                              "swin_v2_t": 768, "swin_v2_s": 768, "swin_v2_b": 1024}),
    _tv("maxvit_t", "classifier.5", 512, "maxvit", "blocks.3"),
    Backbone("tiny_test", "fc", 32, "test", "stage2", TinyModel(), weights="SEED0"),
]

REGISTRY: dict[str, Backbone] = {b.name: b for b in _ENTRIES}
DEFAULT_BACKBONE = "resnet50"  # what --backbone means when none is given (and no checkpoint names one)


FAMILY_PREFIXES = ("timm:", "open_clip:")  # families whose names carry their weights; their modules load lazily


def _family_entry(name: str) -> Backbone | None:
    """Another family's entry (``timm:MODEL[.TAG]``, ``open_clip:ARCH[:TAG]``), None for a registry name."""
    if name.startswith("timm:"):
        from embedder.models import timm_family

        return timm_family.entry(name)
    if name.startswith("open_clip:"):
        from embedder.models import openclip_family

        return openclip_family.entry(name)
    return None


def get_backbone(name: str) -> Backbone:
    """A registry entry by name: torchvision's (and the test model) by their names, another family's
    by its prefix (``timm:MODEL[.TAG]``); an unknown name lists close matches."""
    family = _family_entry(name)
    if family is not None:
        return family
    try:
        return REGISTRY[name]
    except KeyError:
        close = closest(name, REGISTRY)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownBackbone(
            f"unknown backbone {name!r}.{hint} Valid: {', '.join(sorted(REGISTRY))}, or timm:MODEL[.TAG], "
            "or open_clip:ARCH[:PRETRAINED]"
        ) from None


def parse_backbone_spec(spec: str) -> tuple[Backbone, str | None]:
    """'resnet50' or 'mobilenet_v2:IMAGENET1K_V1' → (entry, weights tag or None); a family's name
    (``timm:MODEL.TAG``) carries its weights in the name."""
    family = _family_entry(spec)
    if family is not None:
        return family, None
    name, _, tag = spec.partition(":")
    backbone = get_backbone(name)
    if tag and backbone.is_torchvision:
        backbone.torchvision_weights(tag)  # validates, lists valid tags
    elif tag and tag not in backbone.weights_tags():
        raise UnknownBackbone(f"{name} has no weights tag {tag!r}; valid tags: {', '.join(backbone.weights_tags())}")
    return backbone, tag or None

"""The backbone registry: data, like torchvision's WeightsEnum.

Each entry names a torchvision classification model, the dotted path of its final Linear layer
(replaced by Identity to expose the penultimate, globally pooled features, never logits) and the
embedding dim that leaves. Weights and the preprocessing that matches them come from torchvision's
own weights enum (``weights.transforms()``, ``weights.meta``): callers never type a mean or a crop.
Adding a backbone is one line in ``_ENTRIES``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from embedder.errors import UnknownBackbone
from embedder.models._registry_meta import REGISTRY_META

if TYPE_CHECKING:  # torch and torchvision load only where a model is built (fast CLI start)
    from torch import nn
    from torchvision.models import WeightsEnum
from embedder.models.preprocessing import Preprocessing


@dataclass(frozen=True)
class Backbone:
    """One registry entry."""

    name: str
    head: str  # dotted path of the final classification Linear; Identity replaces it
    dim: int  # embedding dim at the default (penultimate) cut
    family: str
    feature_map: str  # module whose output is the last spatial feature map (for --pool max|gem)
    weights: str = "DEFAULT"  # torchvision weights tag; DEFAULT resolves to the concrete one
    builder: Callable[[], nn.Module] | None = None  # only for non-torchvision (test) models (lazy import)
    test_preprocessing: Preprocessing | None = None  # only for non-torchvision (test) models

    @property
    def is_torchvision(self) -> bool:
        return self.builder is None

    def torchvision_weights(self, tag: str | None = None) -> WeightsEnum:
        from torchvision import models

        enum = models.get_model_weights(self.name)
        wanted = tag or self.weights
        try:
            return enum[wanted] if wanted != "DEFAULT" else enum.DEFAULT  # type: ignore[misc, no-any-return]
        except KeyError:
            valid = ", ".join(w.name for w in enum)
            raise UnknownBackbone(
                f"{self.name} has no weights tag {wanted!r}; valid tags: {valid}"
            ) from None

    def weights_tags(self) -> list[str]:
        if not self.is_torchvision:
            return ["SEED0"]
        from torchvision import models

        return [w.name for w in models.get_model_weights(self.name)]

    def preprocessing(self, tag: str | None = None) -> Preprocessing:
        if self.test_preprocessing is not None:
            return self.test_preprocessing
        return Preprocessing.from_transforms(self.torchvision_weights(tag).transforms())

    def meta(self) -> dict[str, Any]:
        """Default weights' tag, file name, GFLOPs, parameters and published ImageNet acc@1, from
        torchvision's weights meta, kept as data (``_registry_meta``, checked by a test) so that
        listing backbones never imports torch."""
        if not self.is_torchvision:
            return {"weights": self.weights, "gflops": None, "acc1": None, "file": None, "params": None}
        return dict(REGISTRY_META[self.name])

    def torchvision_meta(self, tag: str | None = None) -> dict[str, Any]:
        """The same facts computed from torchvision itself (what ``_registry_meta`` must equal)."""
        w = self.torchvision_weights(tag)
        m = w.meta
        metrics: dict[str, Any] = next(iter(m.get("_metrics", {}).values()), {})
        return {"weights": w.name, "gflops": m.get("_ops"), "acc1": metrics.get("acc@1"),
                "file": w.url.rsplit("/", 1)[-1], "params": m.get("num_params")}

    def build_pretrained(self, tag: str | None = None) -> nn.Module:
        """torchvision's builder with its weights, read from torchvision's cache (the caller made
        sure the file is there): every model-specific loading rule is torchvision's own."""
        from torchvision import models

        from embedder.errors import WeightsMismatch

        try:
            return models.get_model(self.name, weights=self.torchvision_weights(tag))
        except (RuntimeError, ValueError, OSError, EOFError) as e:
            first = next((line for line in str(e).splitlines() if line.strip()), "")
            raise WeightsMismatch(f"cannot load {self.name} weights from torchvision's cache "
                                  f"({type(e).__name__}: {first[:200]}); delete the file and import it again") from None

    def build_architecture(self, tag: str | None = None) -> nn.Module:
        """The full architecture, randomly initialised, head still attached."""
        if self.builder is not None:
            return self.builder()
        from torchvision import models

        weights = self.torchvision_weights(tag)
        kwargs: dict[str, Any] = {}
        if self.name == "inception_v3":
            # torchvision's pretrained inception expects transform_input=True and no aux head at eval.
            kwargs = {"aux_logits": True, "init_weights": False, "transform_input": True}
        elif self.name == "googlenet":
            kwargs = {"aux_logits": False, "init_weights": False, "transform_input": True}
        elif self.family == "vit":
            kwargs = {"image_size": weights.meta["min_size"][0]}
        num_classes = len(weights.meta["categories"])
        return models.get_model(self.name, weights=None, num_classes=num_classes, **kwargs)


def _tiny() -> nn.Module:
    from embedder.models.tiny import tiny

    return tiny()


_TINY_PRE = Preprocessing(
    resize_size=40,
    crop_size=32,
    interpolation="bilinear",
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
)


def _family(prefix: str, head: str, fmap: str, dims: dict[str, int]) -> list[Backbone]:
    return [Backbone(n, head, d, prefix, fmap) for n, d in dims.items()]


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
    Backbone("mobilenet_v2", "classifier.1", 1280, "mobilenet", "features"),
    Backbone("mobilenet_v3_small", "classifier.3", 1024, "mobilenet", "features"),
    Backbone("mobilenet_v3_large", "classifier.3", 1280, "mobilenet", "features"),
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
    Backbone("inception_v3", "fc", 2048, "inception", "Mixed_7c"),
    Backbone("googlenet", "fc", 1024, "inception", "inception5b"),
    *_family("vit", "heads.head", "encoder", {"vit_b_16": 768, "vit_b_32": 768, "vit_l_16": 1024,
                                   "vit_l_32": 1024, "vit_h_14": 1280}),
    *_family("swin", "head", "permute", {"swin_t": 768, "swin_s": 768, "swin_b": 1024,
                              "swin_v2_t": 768, "swin_v2_s": 768, "swin_v2_b": 1024}),
    Backbone("maxvit_t", "classifier.5", 512, "maxvit", "blocks.3"),
    Backbone("tiny_test", "fc", 32, "test", "stage2", weights="SEED0", builder=_tiny,
             test_preprocessing=_TINY_PRE),
]

REGISTRY: dict[str, Backbone] = {b.name: b for b in _ENTRIES}
DEFAULT_BACKBONE = "resnet50"  # what --backbone means when none is given (and no checkpoint names one)


def get_backbone(name: str) -> Backbone:
    try:
        return REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, REGISTRY, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownBackbone(
            f"unknown backbone {name!r}.{hint} Valid: {', '.join(sorted(REGISTRY))}"
        ) from None


def parse_backbone_spec(spec: str) -> tuple[Backbone, str | None]:
    """'resnet50' or 'mobilenet_v2:IMAGENET1K_V1' → (entry, weights tag or None)."""
    name, _, tag = spec.partition(":")
    backbone = get_backbone(name)
    if tag and backbone.is_torchvision:
        backbone.torchvision_weights(tag)  # validates, lists valid tags
    elif tag and tag not in backbone.weights_tags():
        raise UnknownBackbone(f"{name} has no weights tag {tag!r}; valid tags: {', '.join(backbone.weights_tags())}")
    return backbone, tag or None



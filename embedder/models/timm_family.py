"""timm's models as backbones: ``--backbone timm:MODEL[.TAG]`` (``timm:vit_small_patch14_dinov2.lvd142m``,
``timm:convnext_tiny.fb_in22k``, ``timm:tf_efficientnet_lite0``), any name timm knows.

Features are timm's own pre-logits (``num_classes=0``). Preprocessing comes from the model's
pretrained config, as timm's ``resolve_data_config`` + ``create_transform`` make it for evaluation
(shorter side to ``floor(size / crop_pct)``, centre crop, its interpolation, mean and std), kept as
the same typed record torchvision's presets become, so every decoder reproduces it. Weights: a
local state dict or safetensors file (``--weights FILE``: the classifier's tensors are left out, the
rest loaded strictly), or timm's own Hugging Face hub download when none is given
(``EMBEDDER_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``: the local hub cache only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

from embedder.errors import UnknownBackbone, WeightsUnavailable, closest
from embedder.models.backbone import Backbone
from embedder.models.origin import WeightsRef
from embedder.models.preprocessing import Preprocessing

if TYPE_CHECKING:
    from torch import nn

    from embedder.models.family import FileLoader
    from embedder.models.text import TextTower

PREFIX = "timm:"
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
# Where timm's config is not what the model's authors evaluate at. DINOv2: timm says 518 px, crop_pct
# 1.0 (1,370 tokens, ~5x the cost of 224); the DINOv2 authors' linear probes resize to 256 and crop
# 224 (their eval transform), so that is the default here, with positional embeddings interpolated to
# the input size (timm's dynamic_img_size); --image-size changes it, and the store records it.
AUTHORS_EVAL = {"_dinov2": (224, 224 / 256)}


def is_timm(name: str) -> bool:
    return name.startswith(PREFIX)


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        raise UnknownBackbone("timm backbones need timm: pip install 'embedder[timm]'") from None
    return timm


@dataclass(frozen=True)
class TimmModel:
    """The family's part of a registry entry: how to build, preprocess and fetch this model."""

    arch: str  # MODEL or MODEL.TAG, as timm names it

    def cfg(self) -> Any:
        timm = _timm()
        return timm.models.get_pretrained_cfg(self.arch) or timm.models.get_pretrained_cfg(self.arch.split(".")[0])

    def _eval_size(self) -> tuple[int, float] | None:
        base = self.arch.split(".", 1)[0]
        return next((v for k, v in AUTHORS_EVAL.items() if k in base), None)

    def _native_size(self) -> int | None:
        cfg = self.cfg()
        size = getattr(cfg, "input_size", None) if cfg is not None else None
        return int(size[-1]) if size else None

    def _kwargs(self, image_size: int | None) -> dict[str, Any]:
        """timm's own features (``num_classes=0``); position embeddings interpolated to the input size
        (``dynamic_img_size``, the same resampling timm's ``img_size=`` applies to a pretrained file once)
        where the input is not the size the model was made for: the DINOv2 authors' 224, or --image-size.
        The tensors keep their shapes, so every weights file still loads."""
        other = self._eval_size() is not None or (image_size is not None and image_size != self._native_size())
        return {"num_classes": 0, **({"dynamic_img_size": True} if other else {})}

    def _create(self, pretrained: bool, image_size: int | None) -> nn.Module:
        kwargs = self._kwargs(image_size)
        try:
            return _timm().create_model(self.arch, pretrained=pretrained, **kwargs)  # type: ignore[no-any-return]
        except TypeError:
            if "dynamic_img_size" not in kwargs:
                raise
        # an architecture without dynamic_img_size (CNNs take any size; a fixed-size one is refused where
        # it first runs at that size: features.load_model)
        return _timm().create_model(self.arch, pretrained=pretrained, num_classes=0)  # type: ignore[no-any-return]

    def build(self, tag: str | None = None, image_size: int | None = None) -> nn.Module:
        return self._create(False, image_size)

    def weights_tags(self) -> list[str]:
        return []  # timm names its weights in the model name (timm:MODEL.TAG)

    def classifiers(self) -> tuple[str, ...]:
        """timm's pretrained config names them (a distilled DeiT or LeViT: ``head`` and ``head_dist``);
        built with ``num_classes=0`` they are already Identity, and a file's classifier tensors are
        left out when it loads."""
        cfg = self.cfg()
        names = cfg.classifier if cfg is not None and cfg.classifier else "head"
        return (names,) if isinstance(names, str) else tuple(str(n) for n in names)

    def file_loader(self) -> FileLoader | None:
        return None

    def text_tower(self, net: nn.Module) -> TextTower | None:
        return None

    def inference_form(self, net: nn.Module) -> bool:
        return False

    def preprocessing(self, tag: str | None = None) -> Preprocessing:
        timm = _timm()
        cfg = timm.data.resolve_data_config({}, pretrained_cfg=self.cfg().to_dict())
        if self._eval_size() is not None:
            size, crop_pct = self._eval_size()  # type: ignore[misc]
            cfg = {**cfg, "input_size": (3, size, size), "crop_pct": crop_pct}
        _, h, w = cfg["input_size"]
        if h != w:
            raise UnknownBackbone(f"timm:{self.arch} takes {h}x{w} images; only square inputs are supported")
        if cfg.get("crop_mode", "center") != "center":
            raise UnknownBackbone(f"timm:{self.arch} evaluates with crop_mode={cfg['crop_mode']!r}; only the "
                                  "centre crop (resize the shorter side, crop the middle) is supported")
        interpolation = str(cfg["interpolation"])
        if interpolation not in INTERPOLATIONS:
            interpolation = "bicubic" if interpolation == "random" else "bilinear"
        return Preprocessing(resize_size=math.floor(h / float(cfg["crop_pct"])), crop_size=int(h),
                             interpolation=interpolation, mean=tuple(float(x) for x in cfg["mean"]),  # type: ignore[arg-type]
                             std=tuple(float(x) for x in cfg["std"]))  # type: ignore[arg-type]

    def hub_target(self, suffix: str) -> tuple[str, str]:
        """(hub repository, file name) where timm's download looks for this model's weights."""
        cfg = self.cfg()
        repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
        if not repo:
            raise WeightsUnavailable(f"timm:{self.arch} is not on the Hugging Face hub; use --weights FILE")
        return str(repo), "model.safetensors" if suffix == ".safetensors" else "pytorch_model.bin"

    def pretrained(self, tag: str | None = None, image_size: int | None = None) -> tuple[nn.Module, WeightsRef]:
        """The model with timm's pretrained weights, through the Hugging Face hub cache."""
        from embedder.models.hf_cache import honour_offline, offline_advice, require_hub
        from embedder.models.weights import state_dict_digest

        honour_offline()
        cfg = self.cfg()
        require_hub(f"timm:{self.arch}", str(getattr(cfg, "hf_hub_id", "") or "") if cfg is not None else "")
        try:
            net = self._create(True, image_size)
        except (OSError, RuntimeError, ValueError) as e:
            first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
            first = first if len(first) <= 240 else first[:first.rfind(" ", 0, 240)] + " …"
            raise WeightsUnavailable(f"cannot load timm:{self.arch}'s pretrained weights ({first}): "
                                     f"{offline_advice('timm:' + self.arch)}") from None
        digest = state_dict_digest(net.state_dict())  # of the tensors as loaded (the hub file is timm's)
        from embedder.models.hf_cache import imported_file

        repo = str(getattr(cfg, "hf_hub_id", "") or "") if cfg is not None else ""
        imported = bool(repo) and imported_file(repo) is not None
        said = " (imported by `embedder weights import`, not verified by the hub)" if imported else ""
        return net, WeightsRef("hub", f"timm:{self.arch}{said}", digest)


@cache
def _names() -> tuple[str, ...]:
    return tuple(_timm().list_models())


@cache
def entry(name: str) -> Backbone:
    """The registry entry of ``timm:MODEL[.TAG]``; an unknown model lists timm's close matches."""
    arch = name[len(PREFIX):]
    base = arch.split(".", 1)[0]
    timm = _timm()
    if not arch or not timm.is_model(base):
        close = closest(base, _names())
        hint = f" Did you mean {', '.join('timm:' + c for c in close)}?" if close else ""
        raise UnknownBackbone(f"timm has no model {base!r}.{hint} (timm.list_models() lists {len(_names())})")
    model = TimmModel(arch)
    return Backbone(name=name, head=model.classifiers()[0], dim=0, family="timm", feature_map="", impl=model,
                    weights="hub")

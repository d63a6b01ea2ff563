"""OpenCLIP's models as backbones: ``--backbone open_clip:ARCH[:PRETRAINED]``
(``open_clip:ViT-B-32:laion2b_s34b_b79k``, ``open_clip:ViT-B-16-SigLIP2:webli``,
``open_clip:MobileCLIP2-S0:dfndr2b``), any pair ``open_clip.list_pretrained()`` knows, or an
architecture alone with ``--weights FILE``.

The image vector is the model's ``encode_image`` (the projected embedding, the space its text tower
shares); the text tower stays loaded beside it for text queries and zero-shot heads
(``embedder.models.text``). Preprocessing is OpenCLIP's inference transform for that pretrained tag
(``image_transform_v2`` of the model's preprocess config with the tag's mean, std, interpolation and
resize mode merged in, as ``create_model_and_transforms`` makes it), kept as the typed record every
decoder reproduces; an architecture alone (``--weights FILE``) takes what all its published tags agree
on, and is refused where they disagree (``published_cfg``). Weights: a local state dict or safetensors
file (``--weights FILE``, loaded by OpenCLIP's own ``load_checkpoint``: its key conversions, strict), or
OpenCLIP's Hugging Face hub download when none is given (``EMBEDDER_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``:
the local hub cache only), recorded with the SHA-256 of the file's bytes. Models whose blocks train with
parallel branches (MobileCLIP's FastViT) are reparameterised for inference with timm's
``reparameterize_model`` (the same function, one branch).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedder.errors import UnknownBackbone, WeightsMismatch, WeightsUnavailable, closest
from embedder.models.backbone import Backbone
from embedder.models.origin import WeightsRef
from embedder.models.preprocessing import Preprocessing

if TYPE_CHECKING:
    from torch import nn

    from embedder.models.family import FileLoader
    from embedder.models.text import TextTower

PREFIX = "open_clip:"
_RESIZE_MODES = {"shortest": "shorter", "squash": "squash"}
_INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


def is_open_clip(name: str) -> bool:
    return name.startswith(PREFIX)


def _open_clip() -> Any:
    from embedder.models.hf_cache import honour_offline

    honour_offline()
    try:
        import open_clip
    except ImportError:
        raise UnknownBackbone("OpenCLIP backbones need open_clip: pip install 'embedder[clip]'") from None
    return open_clip


def _first_line(e: BaseException) -> str:
    return next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)[:200]


def _load_errors(e: BaseException) -> str:
    """torch's load_state_dict complaint, counted: N missing, N unexpected, N wrongly shaped (e.g. …)."""
    import re

    text = str(e)
    if "Error(s) in loading state_dict" not in text:
        return _first_line(e)
    parts = []
    for label, pattern in (("missing", r"Missing key\(s\) in state_dict: (.*?)\.\s*(?:\n|$)"),
                           ("unexpected", r"Unexpected key\(s\) in state_dict: (.*?)\.\s*(?:\n|$)")):
        m = re.search(pattern, text)
        if m:
            keys = re.findall(r'"([^"]+)"', m.group(1))
            parts.append(f"{len(keys)} {label} tensors (e.g. {', '.join(keys[:2])})")
    shapes = re.findall(r"size mismatch for ([^:]+):", text)
    if shapes:
        parts.append(f"{len(shapes)} wrongly shaped (e.g. {', '.join(shapes[:2])})")
    return "; ".join(parts) or _first_line(e)


@dataclass(frozen=True)
class OpenClipModel:
    """The family's part of a registry entry: how to build, preprocess, load and tokenise this model."""

    arch: str
    tag: str | None  # OpenCLIP's pretrained tag; None: an architecture for --weights FILE

    @property
    def name(self) -> str:
        return f"{PREFIX}{self.arch}" + (f":{self.tag}" if self.tag else "")

    def tag_cfg(self) -> dict[str, Any]:
        """The tag's pretrained config; for an architecture alone (``--weights FILE``), what every
        published tag of it agrees on (``published_cfg``: refused where they disagree)."""
        if not self.tag:
            return published_cfg(self.arch)
        return dict(_open_clip().get_pretrained_cfg(self.arch, self.tag) or {})

    def preprocess_cfg(self) -> dict[str, Any]:
        """OpenCLIP's final preprocess config for this model and tag, without building the model:
        its defaults, the tag's keys merged in, the size from the vision tower's config."""
        oc = _open_clip()
        from dataclasses import asdict

        from open_clip.transform import PreprocessCfg, merge_preprocess_dict

        cfg = merge_preprocess_dict(asdict(PreprocessCfg()), self.tag_cfg())
        size = (oc.get_model_config(self.arch) or {}).get("vision_cfg", {}).get("image_size")
        if size is not None:
            cfg["size"] = size
        return cfg  # type: ignore[no-any-return]

    def _create(self) -> Any:
        """The whole CLIP model, randomly initialised, with the tag's preprocess config attached."""
        oc = _open_clip()
        keys = ("mean", "std", "interpolation", "resize_mode", "fill_color")
        tag_cfg = self.tag_cfg()
        force = {k: v for k, v in tag_cfg.items() if k in keys}
        import logging

        quiet = logging.getLogger()  # OpenCLIP warns on the root logger that nothing was loaded yet
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            return oc.create_model(self.arch, pretrained=None, force_preprocess_cfg=force,
                                   force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)))
        finally:
            quiet.setLevel(level)

    def build(self, tag: str | None = None, image_size: int | None = None) -> nn.Module:
        """The image side (``ClipImage``) of the whole model, randomly initialised: at its own size (a
        ViT tower at another --image-size is refused where it first runs: features.load_model)."""
        return ClipImage(self._create())

    def weights_tags(self) -> list[str]:
        return []  # OpenCLIP's pretrained tag is part of the name (open_clip:ARCH:TAG)

    def classifiers(self) -> tuple[str, ...]:
        return ()  # encode_image is the projected embedding: no classifier to drop

    def file_loader(self) -> FileLoader | None:
        return self.load_file

    def preprocessing(self, tag: str | None = None) -> Preprocessing:
        cfg = self.preprocess_cfg()
        size = cfg["size"]
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        if h != w:
            raise UnknownBackbone(f"{self.name} takes {h}x{w} images; only square inputs are supported")
        mode = _RESIZE_MODES.get(str(cfg.get("resize_mode", "shortest")))
        if mode is None:
            raise UnknownBackbone(f"{self.name} preprocesses with resize_mode={cfg['resize_mode']!r} (fit the "
                                  "longest side and pad); only 'shortest' and 'squash' are supported")
        interpolation = str(cfg.get("interpolation", "bicubic"))
        if interpolation not in _INTERPOLATIONS:
            raise UnknownBackbone(f"{self.name} resizes with {interpolation!r}; supported: "
                                  f"{', '.join(_INTERPOLATIONS)}")
        return Preprocessing(resize_size=int(h), crop_size=int(h), interpolation=interpolation,
                             mean=tuple(float(x) for x in cfg["mean"]),  # type: ignore[arg-type]
                             std=tuple(float(x) for x in cfg["std"]),  # type: ignore[arg-type]
                             resize_mode=mode)

    def load_file(self, net: nn.Module, path: Path) -> None:
        """A local weights file into the model, by OpenCLIP's own loader (its conversions, strict)."""
        oc = _open_clip()
        clip = getattr(net, "clip", net)
        try:
            oc.load_checkpoint(clip, str(path), strict=True)
        except (RuntimeError, ValueError, KeyError, OSError) as e:
            raise WeightsMismatch(f"{path.name} does not fit {self.name}: {_load_errors(e)}; is it an OpenCLIP "
                                  f"{self.arch} state dict?") from None
        _reparameterize(clip)

    def pretrained(self, tag: str | None = None, image_size: int | None = None) -> tuple[nn.Module, WeightsRef]:
        """The model with the tag's weights, through OpenCLIP's Hugging Face hub download (the hub
        cache, ``HF_HOME``); the record names the file's SHA-256."""
        from embedder.models.origin import sha256_file

        if not self.tag:
            tags = _tags_for(self.arch)
            raise WeightsUnavailable(
                f"{self.name} names no pretrained weights: add a tag ({', '.join(tags[:6]) or 'OpenCLIP has none'}"
                f"{' …' if len(tags) > 6 else ''}) or give --weights FILE")
        from embedder.models.hf_cache import offline_advice, require_hub

        oc = _open_clip()
        hub = str(self.tag_cfg().get("hf_hub", "") or "")
        require_hub(self.name, self.hub_target(".bin")[0] if hub else "")
        try:
            path = oc.download_pretrained(self.tag_cfg())
        except (OSError, RuntimeError, ValueError) as e:
            raise WeightsUnavailable(
                f"cannot load {self.name}'s weights ({_first_line(e)}); the hub file is {hub or 'not on the hub'}: "
                f"{offline_advice(self.name)}") from None
        if not path:
            raise WeightsUnavailable(f"OpenCLIP names no file for {self.name}; give --weights FILE")
        net = self.build()
        self.load_file(net, Path(path))
        from embedder.models.hf_cache import imported_file

        imported = imported_file(self.hub_target(".bin")[0]) if hub else None
        said = f"{Path(path).name}, imported by `embedder weights import`, not verified by the hub" if imported else \
            Path(path).name
        return net, WeightsRef("hub", f"{self.name} ({said})", sha256_file(Path(path)))

    def hub_target(self, suffix: str) -> tuple[str, str]:
        """(hub repository, file name) where OpenCLIP's download looks for this tag's weights."""
        hub = str(self.tag_cfg().get("hf_hub", ""))
        if not hub:
            raise WeightsUnavailable(f"{self.name} is not on the Hugging Face hub; use --weights FILE")
        repo, filename = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub.rstrip("/"), "")
        if not filename:
            filename = "open_clip_model.safetensors" if suffix == ".safetensors" else "open_clip_pytorch_model.bin"
        elif suffix == ".safetensors" and filename.endswith(".bin"):
            filename = filename[:-4] + ".safetensors"  # OpenCLIP looks for the safetensors twin first
        return repo, filename

    def inference_form(self, net: nn.Module) -> bool:
        return _reparameterize(getattr(net, "clip", net))

    def text_spec(self) -> dict[str, Any]:
        """What the text tower reads, as data (recorded in the store): tokenizer and context length."""
        oc = _open_clip()
        text_cfg = (oc.get_model_config(self.arch) or {}).get("text_cfg", {})
        tok = text_cfg.get("hf_tokenizer_name") or "openai-clip-bpe"
        return {"tokenizer": str(tok), "context_length": int(text_cfg.get("context_length", 77))}

    def tokenizer(self) -> Any:
        oc = _open_clip()
        try:
            return oc.get_tokenizer(self.arch)
        except (OSError, RuntimeError, ValueError) as e:
            raise WeightsUnavailable(f"cannot load {self.name}'s tokenizer ({_first_line(e)}); it comes from the "
                                     "Hugging Face hub the first time (HF_HOME)") from None

    def text_tower(self, net: nn.Module) -> TextTower | None:
        from embedder.models.text import TextTower

        clip = getattr(net, "clip", net)
        spec = self.text_spec()
        return TextTower(clip, self.tokenizer, spec["context_length"], spec["tokenizer"])


def _reparameterize(clip: Any) -> bool:
    """MobileCLIP's training-time branches folded into one (timm's own function, idempotent); a no-op
    elsewhere. True where the tower has such branches."""
    branched = [m for m in clip.visual.modules() if hasattr(m, "reparameterize")]
    if not branched:
        return False
    if all(getattr(m, "reparam_conv", None) is not None for m in branched):
        return True  # folded already (FastViT's RepMixer cannot be folded twice)
    from timm.utils.model import reparameterize_model

    was = clip.visual.training
    clip.visual = reparameterize_model(clip.visual.eval(), inplace=True).train(was)
    return True


@cache
def _clip_image_class() -> type:
    from torch import nn

    class ClipImage(nn.Module):
        """The image side of a CLIP model: ``encode_image`` (unnormalised; the run's ``--normalize``
        and the index's metric decide), the whole model kept for its text tower."""

        def __init__(self, clip: Any) -> None:
            super().__init__()
            self.clip: Any = clip

        def forward(self, x: Any) -> Any:
            return self.clip.encode_image(x)

    return ClipImage


def ClipImage(clip: Any) -> nn.Module:  # noqa: N802 - a class made on first use (no torch at import)
    return _clip_image_class()(clip)  # type: ignore[no-any-return]


PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode", "fill_color")


def _shown(cfg: dict[str, Any]) -> str:
    mean = ", ".join(f"{float(v):.3g}" for v in cfg["mean"])
    std = ", ".join(f"{float(v):.3g}" for v in cfg["std"])
    return f"mean ({mean}), std ({std}), {cfg['interpolation']}, resize {cfg['resize_mode']}"


@cache
def published_cfg(arch: str) -> dict[str, Any]:
    """What ARCH's weights file is preprocessed with when no tag is named: the preprocessing every
    published tag of ARCH uses (MobileCLIP2-S0's mean 0 / std 1, bilinear; SigLIP's 0.5, squash —
    never OpenCLIP's architecture defaults, which no such tag uses), with ``quick_gelu`` where the tags
    agree on it too. Where the tags preprocess differently (ViT-L-14: ``openai`` vs ``laion2b_*``), an
    ``UnknownBackbone`` asks for ``ARCH:TAG``. An architecture with no published tag: OpenCLIP's
    defaults (``{}``)."""
    import logging
    from dataclasses import asdict

    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    oc = _open_clip()
    cfgs = {t: dict(oc.get_pretrained_cfg(arch, t) or {}) for t in _tags_for(arch)}
    if not cfgs:
        return {}
    merged = {t: merge_preprocess_dict(asdict(PreprocessCfg()), c) for t, c in cfgs.items()}
    groups: dict[tuple[str, ...], list[str]] = {}
    for t, c in merged.items():
        groups.setdefault(tuple(str(c.get(k)) for k in PREPROCESS_KEYS), []).append(t)
    if len(groups) > 1:
        ways = "; ".join(f"{', '.join(ts[:3])}{' …' if len(ts) > 3 else ''}: {_shown(merged[ts[0]])}"
                         for ts in groups.values())
        raise UnknownBackbone(f"{PREFIX}{arch}'s published weights are preprocessed differently ({ways}): name "
                              f"the tag the file was trained from, e.g. --backbone {PREFIX}{arch}:"
                              f"{next(iter(groups.values()))[0]} --weights FILE")
    first = next(iter(cfgs))
    out = {k: v for k, v in merged[first].items() if k in PREPROCESS_KEYS}
    gelu = {bool(c.get("quick_gelu", False)) for c in cfgs.values()}
    if len(gelu) == 1:
        out["quick_gelu"] = gelu.pop()
    else:
        with_gelu = [t for t, c in cfgs.items() if c.get("quick_gelu")]
        logging.getLogger(__name__).warning(
            "%s%s: built without QuickGELU, as OpenCLIP builds the architecture; weights from %s were trained "
            "with it: for such a file name the tag (%s%s:%s --weights FILE)", PREFIX, arch,
            ", ".join(with_gelu[:3]), PREFIX, arch, with_gelu[0])
    return out


@cache
def _pretrained() -> tuple[tuple[str, str], ...]:
    return tuple((str(a), str(t)) for a, t in _open_clip().list_pretrained())


def _tags_for(arch: str) -> list[str]:
    return [t for a, t in _pretrained() if a == arch]


@cache
def entry(name: str) -> Backbone:
    """The registry entry of ``open_clip:ARCH[:TAG]``; an unknown architecture or tag lists OpenCLIP's
    close matches (``list_pretrained``)."""
    oc = _open_clip()
    arch, _, tag = name[len(PREFIX):].partition(":")
    if not arch or oc.get_model_config(arch) is None:
        archs = sorted(set(oc.list_models()))
        close = closest(arch, archs)
        hint = f" Did you mean {', '.join(PREFIX + c for c in close)}?" if close else ""
        raise UnknownBackbone(f"OpenCLIP has no model {arch!r}.{hint} (open_clip.list_models() lists {len(archs)})")
    if tag and oc.get_pretrained_cfg(arch, tag) == {}:
        tags = _tags_for(arch)
        close = closest(tag, tags, cutoff=0.5)
        if close:
            said = f"did you mean {', '.join(f'{PREFIX}{arch}:{c}' for c in close)}?"
        else:
            said = (f"its tags (open_clip.list_pretrained()): {', '.join(tags[:8])}{' …' if len(tags) > 8 else ''}"
                    if tags else "it has none: use --weights FILE")
        raise UnknownBackbone(f"OpenCLIP has no pretrained tag {tag!r} for {arch}; {said}")
    model = OpenClipModel(arch, tag or None)
    dim = int((oc.get_model_config(arch) or {}).get("embed_dim", 0))
    return Backbone(name=name, head="", dim=dim, family="open_clip", feature_map="", impl=model,
                    weights="hub" if tag else "file")

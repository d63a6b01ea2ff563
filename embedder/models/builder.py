"""One pass from a backbone spec to a loaded network, as timm's builder does it: which architecture,
which weights (the registry's, a state dict or a fine-tuned checkpoint), the architecture built, the
weights applied and filtered, and the preprocessing that matches them. A new family of backbones
plugs in here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from embedder.errors import WeightsMismatch, WeightsUnavailable
from embedder.models.backbone import Backbone
from embedder.models.hub import sha256_file
from embedder.models.origin import WeightsRef
from embedder.models.preprocessing import Preprocessing
from embedder.models.registry import DEFAULT_BACKBONE, get_backbone, parse_backbone_spec
from embedder.models.weights import LoadedWeights, apply_weights, torch_load


@dataclass(frozen=True)
class ModelSpec:
    """Everything that determines what a vector means. Recorded in the store."""

    backbone: str | None = DEFAULT_BACKBONE  # None: the one a checkpoint in weights_file names
    weights_tag: str | None = None  # None: the registry's tag
    weights_file: Path | None = None  # local state dict or finetune checkpoint
    layer: str | None = None  # None: penultimate (the model's own pooled features)
    pool: str | None = None  # None: the model's own pooling; avg | max | gem on a feature map
    image_size: int | None = None  # None: the weights' own crop size


def spec_for(backbone: str | None, weights: str | Path | None = None, layer: str | None = None,
             pool: str | None = None, image_size: int | None = None) -> ModelSpec:
    """A ModelSpec from what a user types: ``NAME`` or ``NAME:WEIGHTS_TAG`` (checked against the
    registry, close matches listed). No backbone: a checkpoint's own, else the default; a conflict
    between the two is refused when loading."""
    wfile = Path(weights) if weights is not None else None
    if backbone is None:
        return ModelSpec(None if wfile is not None else DEFAULT_BACKBONE, None, wfile, layer, pool, image_size)
    entry, tag = parse_backbone_spec(backbone)
    return ModelSpec(entry.name, tag, wfile, layer, pool, image_size)


def drop_aux_head(net: nn.Module) -> None:
    """Inception's auxiliary classifier is a training device; features come from the main path."""
    if hasattr(net, "aux_logits"):
        setattr(net, "aux_logits", False)  # noqa: B010
        if getattr(net, "AuxLogits", None) is not None:
            setattr(net, "AuxLogits", None)  # noqa: B010


def resolve_weights(spec: ModelSpec) -> tuple[Backbone, LoadedWeights | None]:
    """Which architecture and which weights file. A checkpoint names its own backbone: used when
    ``spec.backbone`` is None, refused when it names another. A plain state dict does not say what
    it is for, so it needs a backbone. Registry weights: None (torchvision's builder loads them)."""
    if spec.weights_file is None:
        return get_backbone(spec.backbone or DEFAULT_BACKBONE), None
    family = get_backbone(spec.backbone) if spec.backbone is not None else None
    from embedder.models import checkpoint  # local: checkpoint imports this module

    if family is not None and family.impl.file_loader() is not None and \
            not checkpoint.is_checkpoint(Path(spec.weights_file)):
        # a family with its own loader reads the file itself: only its digest here (the tensors are
        # not held twice: measured for ViT-B-32, 2.5 GB peak RSS → see docs/benchmarks.md)
        path = Path(spec.weights_file)
        if not path.is_file():
            raise WeightsUnavailable(f"weights file {path} does not exist")
        return family, LoadedWeights(None, WeightsRef("file", path.name, sha256_file(path)))
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
    family = backbone.impl
    if weights is None:  # the registry's, a family's hub download, the test model's seed
        net, ref = family.pretrained(tag, spec.image_size)
        weights = LoadedWeights(None, ref)
    else:
        net = family.build(tag, spec.image_size)
        loader = family.file_loader()
        if weights.extra is not None and weights.state_dict is not None:  # an `embedder finetune` checkpoint
            if weights.extra.get("inference_form"):
                family.inference_form(net)  # trained in the folded form (MobileCLIP): built the same way
            apply_weights(net, weights.state_dict, backbone, skip=(checkpoint_head(net, backbone, weights.extra),))
        elif loader is not None and spec.weights_file is not None:  # the family's own (OpenCLIP's conversions)
            loader(net, Path(spec.weights_file))
        elif weights.state_dict is not None:
            apply_weights(net, weights.state_dict, backbone)
    drop_aux_head(net)
    pre = weights.preprocessing or backbone.preprocessing(tag)
    if spec.image_size is not None and spec.image_size != pre.crop_size:
        pre = pre.at_size(spec.image_size)
    return net, backbone, weights, pre


def checkpoint_head(net: nn.Module, backbone: Backbone, meta: dict[str, object]) -> str:
    """The head a checkpoint's metadata names, checked against the architecture: one of its classifiers
    (a CLIP model's: ``head``, on normalised features), never a module of the backbone whose tensors
    would then be left out."""
    from embedder.models.checkpoint import HeadSpec
    from embedder.models.weights import classifier_modules

    head = HeadSpec.from_meta(dict(meta), backbone)
    clip = backbone.family == "open_clip"
    allowed = {"head"} if clip else {backbone.head, *backbone.classifiers,
                                     *classifier_modules(net, backbone.classifiers)}
    if head.name not in allowed or head.normalized != clip:
        raise WeightsMismatch(f"the checkpoint's head {head.name!r} (normalised: {head.normalized}) is not "
                              f"{backbone.name}'s classifier ({', '.join(sorted(allowed))}); a damaged checkpoint?")
    return head.name


def load_weights_file(path: Path) -> LoadedWeights:
    """A local state dict (.pth/.pt/.safetensors) or an `embedder finetune` checkpoint."""
    if not path.exists():
        raise WeightsUnavailable(f"weights file {path} does not exist")
    from embedder.models import checkpoint  # local: checkpoint imports this module

    if checkpoint.is_checkpoint(path):
        return checkpoint.load_for_extraction(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise WeightsMismatch(f"cannot read weights file {path} ({e})") from None
    else:
        state = torch_load(path)
    return LoadedWeights(state, WeightsRef("file", path.name, sha256_file(path)))


def import_family_weights(path: Path, name: str) -> tuple[str, Path]:
    """A timm or OpenCLIP weights file, checked by loading it into NAME's architecture (strictly, by the
    family's own loader), installed in the Hugging Face hub cache where that library's download finds
    it: the model then loads by name alone, offline."""
    from embedder.models.hf_cache import install

    if not path.is_file():
        raise WeightsUnavailable(f"{path} is not a file")
    backbone = get_backbone(name)
    target = backbone.impl.hub_target(path.suffix)
    if target is None:
        raise WeightsMismatch(f"--backbone {name}: only timm:… and open_clip:… names install into the hub cache; "
                              "torchvision files are recognised by their SHA-256 without --backbone")
    repo, filename = target
    load_network(spec_for(name, path))  # a file that does not fit is refused before anything is written
    return f"{name} ({repo})", install(path, repo, filename, sha256_file(path))

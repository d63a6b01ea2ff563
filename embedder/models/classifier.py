"""A backbone with a classification head, for every family: what fine-tuning trains, what a checkpoint
holds and what export writes.

- torchvision and the test model: the model's own classifier (``backbone.head``) replaced by a new
  ``Linear`` on its penultimate features (as torchvision's tutorials do);
- timm: built with ``num_classes=0``, its classifier (``pretrained_cfg.classifier``: ``head``,
  ``classifier``, ``head.fc``) is an ``Identity`` that becomes the new ``Linear``, so the state dict keeps
  timm's own key names and a checkpoint loads into timm's model as its hub files do;
- OpenCLIP: ``ClipClassifier`` — the CLIP model under ``clip`` (keys as ``ClipImage``'s, the text
  tower included and unchanged, so text search keeps working) and ``head``, a ``Linear`` on the
  L2-normalised ``encode_image`` (where a zero-shot head of text vectors applies, scaled by the
  model's logit scale).

A checkpoint records the head's name and whether its input is normalised (``HeadSpec``); nothing else
about the head needs to be known to use it.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from embedder.errors import FinetuneError, WeightsMismatch
from embedder.models.backbone import Backbone
from embedder.models.checkpoint import HeadSpec, head_tensors
from embedder.models.weights import classifier_modules

__all__ = ["HeadSpec", "feature_dim", "from_checkpoint", "head_tensors", "is_clip_classifier", "with_head"]

if TYPE_CHECKING:
    from embedder.models.preprocessing import Preprocessing


@cache
def _clip_classifier_class() -> type:
    class ClipClassifier(nn.Module):
        """A CLIP model's image embedding, L2-normalised, through a linear head."""

        def __init__(self, clip: Any, head: nn.Linear) -> None:
            super().__init__()
            self.clip: Any = clip
            self.head = head

        def features(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.normalize(self.clip.encode_image(x), dim=-1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(x))  # type: ignore[no-any-return]

    return ClipClassifier


def is_clip_classifier(net: nn.Module) -> bool:
    return isinstance(net, _clip_classifier_class())


def feature_dim(net: nn.Module, image_size: int, name: str = "backbone") -> int:
    """The width of NET's output on one blank image (NET's head being Identity)."""
    return int(_probe(net, image_size, name, None)[-1])


def _probe(net: nn.Module, image_size: int, name: str, tap: str | None) -> tuple[int, ...]:
    """The shape of NET's output (TAP None) or of the input of its module TAP, on one blank image; a
    network that does not take IMAGE_SIZE (a ViT without interpolated position embeddings) is a
    one-line FinetuneError."""
    import contextlib
    import io

    seen: list[tuple[int, ...]] = []
    hook = None if tap is None else net.get_submodule(tap).register_forward_hook(
        lambda m, i, o: seen.append(tuple(i[0].shape)))
    was = net.training
    net.eval()
    try:
        with torch.inference_mode(), contextlib.redirect_stderr(io.StringIO()):
            out = net(torch.zeros(1, 3, image_size, image_size))
    except (AssertionError, RuntimeError) as e:
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise FinetuneError(f"{name} does not take {image_size}x{image_size} images ({first[:160]}); drop "
                            "--image-size to use its own size") from None
    finally:
        net.train(was)
        if hook is not None:
            hook.remove()
    return seen[0] if seen else tuple(out.shape)


def with_head(net: nn.Module, backbone: Backbone, n_classes: int, image_size: int) -> tuple[nn.Module, HeadSpec]:
    """NET (as ``builder.load_network`` gives it) with a new, randomly initialised head of N_CLASSES
    outputs: a Linear on the pooled features, or a 1x1 convolution where the model's own classifier
    is one (timm's ResNetV2/BiT, DLA, DPN: pooled features [N, C, 1, 1], flattened after the head);
    the logits network, and where its head is."""
    if backbone.family == "open_clip":
        clip = getattr(net, "clip", net)
        dim = feature_dim(net, image_size, backbone.name)
        return _clip_classifier_class()(clip, nn.Linear(dim, n_classes)), HeadSpec("head", normalized=True)
    heads = classifier_modules(net, backbone.classifiers)
    if not heads:
        raise FinetuneError(f"{backbone.name} has no classification head to replace")
    if len(backbone.classifiers) > 1:
        raise FinetuneError(f"{backbone.name} has {len(backbone.classifiers)} classification heads (a distilled "
                            f"model: {', '.join(backbone.classifiers)}); fine-tune its undistilled twin instead")
    name = heads[0]
    old = net.get_submodule(name)
    if isinstance(old, nn.Linear):
        net.set_submodule(name, nn.Linear(old.in_features, n_classes))
        return net, HeadSpec(name)
    if not (isinstance(old, nn.Identity) or not any(True for _ in old.parameters())):
        raise FinetuneError(f"{backbone.name}'s head {name} is a {type(old).__name__}, not a Linear layer")
    net.set_submodule(name, nn.Identity())
    shape = _probe(net, image_size, backbone.name, name)
    if len(shape) == 2:
        net.set_submodule(name, nn.Linear(shape[1], n_classes))
    elif len(shape) == 4 and shape[2:] == (1, 1):
        net.set_submodule(name, nn.Conv2d(shape[1], n_classes, 1))
    else:
        raise FinetuneError(f"{backbone.name}'s classifier {name} reads features shaped {list(shape[1:])}; only "
                            "pooled features (a vector, or a 1x1 map) take a new head")
    return net, HeadSpec(name)


def from_checkpoint(path: Path) -> tuple[nn.Module, Preprocessing, list[str], dict[str, Any]]:
    """An ``embedder finetune`` checkpoint as the network that made it: backbone and head, eval mode,
    the checkpoint's preprocessing, its classes and its metadata. Its logits are the fine-tuned model's."""
    from embedder.models.builder import ModelSpec, load_network

    net, backbone, loaded, pre = load_network(ModelSpec(None, weights_file=path))
    meta = loaded.extra or {}
    state = loaded.state_dict or {}
    head = HeadSpec.from_meta(meta, backbone)
    w, b = head_tensors(state, head)
    classes = list(meta.get("classes", []))
    if w.shape[0] != len(classes):
        raise WeightsMismatch(f"{path}: its head has {w.shape[0]} outputs for {len(classes)} classes")
    full, spec = with_head(net, backbone, len(classes), pre.crop_size)
    if spec.name != head.name:
        raise WeightsMismatch(f"{path}: its head is {head.name}, {backbone.name}'s is {spec.name}")
    lin = full.get_submodule(spec.name)
    if w.shape[1] != lin.weight[0].numel():  # type: ignore[index]
        raise WeightsMismatch(f"{path}: its head reads {w.shape[1]} features, {backbone.name} gives "
                              f"{lin.weight[0].numel()}")  # type: ignore[index]
    with torch.no_grad():
        lin.weight.copy_(w.float().reshape(lin.weight.shape))  # type: ignore[operator, union-attr, arg-type]
        lin.bias.copy_(b.float())  # type: ignore[operator]
    return full.eval(), pre, classes, meta

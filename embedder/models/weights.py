"""Pretrained weights through torchvision's own cache ($TORCH_HOME/hub/checkpoints).

torchvision names each file by the first 8 hex digits of its SHA-256; we check that on import and
record the full digest in every store, so a vector can always be traced to the exact bytes.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from embedder.errors import WeightsMismatch
from embedder.models.backbone import Backbone
from embedder.models.origin import WeightsRef
from embedder.models.preprocessing import Preprocessing

log = logging.getLogger(__name__)


def state_dict_digest(state: dict[str, torch.Tensor]) -> str:
    """A digest of tensor contents, for weights that never existed as a file (the test model)."""
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class LoadedWeights:
    state_dict: dict[str, torch.Tensor] | None  # None: torchvision's builder loaded them itself
    info: WeightsRef
    preprocessing: Preprocessing | None = None  # set when a checkpoint carries its own
    extra: dict[str, Any] | None = None  # a checkpoint's metadata
    backbone: str | None = None  # the architecture the file says it is for (checkpoints)


def torch_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        first = next((line for line in str(e).splitlines() if line.strip()), "")
        raise WeightsMismatch(f"cannot read weights file {path} as a state dict ({type(e).__name__}: "
                              f"{first[:200]})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsMismatch(f"{path} is not a state dict of tensors")
    metadata = getattr(obj, "_metadata", None)  # module versions (MNASNet's loader reads them)
    out: OrderedDict[str, torch.Tensor] = OrderedDict((k.removeprefix("module."), v) for k, v in obj.items())
    if metadata is not None:
        out._metadata = OrderedDict((k.removeprefix("module."), v)  # type: ignore[attr-defined]
                                    for k, v in metadata.items())
    return out


# torchvision's own renaming for DenseNet's official files, which predate today's module names
# ("denselayer1.norm.1" → "denselayer1.norm1"); torchvision applies it in densenet._load_state_dict.
_DENSENET_LEGACY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")

AUX_HEADS = ("AuxLogits.", "aux1.", "aux2.")  # Inception/GoogLeNet training-only classifiers


def torchvision_keys(backbone: Backbone, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The key renames torchvision's builders apply to official files, for files we load ourselves."""
    if backbone.family != "densenet":
        return state
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for k, v in state.items():
        m = _DENSENET_LEGACY.match(k)
        out[m.group(1) + m.group(2) if m else k] = v
    if hasattr(state, "_metadata"):
        out._metadata = state._metadata  # type: ignore[attr-defined]
    return out


def classifier_modules(net: nn.Module, names: tuple[str, ...]) -> tuple[str, ...]:
    """The modules of NET that hold the classifiers NAMES. A classifier the model was built without
    (timm's ``num_classes=0`` turns LeViT's ``head``, norm and linear, into one Identity) is the
    parameterless module left in its place; one with no trace in NET is not there at all."""
    have = dict(net.named_modules())
    out = []
    for name in names:
        parts = name.split(".")
        found = next((".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in have), None)
        if found is None:
            continue
        if found == name or not (any(True for _ in have[found].parameters())
                                 or any(True for _ in have[found].buffers())):
            out.append(found)
    return tuple(out)


def apply_weights(model: nn.Module, state: dict[str, torch.Tensor], backbone: Backbone,
                  skip: tuple[str, ...] = ()) -> None:
    """Load everything but the classification head (which we discard; a checkpoint's own is SKIP) and
    the auxiliary heads (which extraction never runs and fine-tuning drops), strictly: names and shapes."""
    name = backbone.name
    state = torchvision_keys(backbone, state)
    # the modules holding the classifiers, and the classifiers' own names: a head the model was built
    # without (VOLO's aux_head is None with num_classes=0) still has its tensors in a full file
    heads = dict.fromkeys((*classifier_modules(model, backbone.classifiers), *backbone.classifiers,
                           *(h for h in skip if h)))
    skip = (*(c + "." for c in heads), *AUX_HEADS)
    body: OrderedDict[str, torch.Tensor] = OrderedDict((k, v) for k, v in state.items() if not k.startswith(skip))
    body._metadata = getattr(state, "_metadata", None) or getattr(model.state_dict(), "_metadata", None)  # type: ignore[attr-defined]
    own = model.state_dict()
    # BatchNorm's step counters change nothing at inference; converted files often leave them out
    missing = [k for k in own if not k.startswith(skip) and k not in body and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in body if k not in own]
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in body.items()
             if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        sample = (missing or unexpected or wrong)[:3]
        raise WeightsMismatch(
            f"these weights do not fit {name}: {len(missing)} missing, {len(unexpected)} unexpected and "
            f"{len(wrong)} wrongly shaped tensors (e.g. {', '.join(sample)}); is this a {name} state dict?"
        )
    try:
        model.load_state_dict(body, strict=False)
    except (RuntimeError, ValueError) as e:
        first = next((line for line in str(e).splitlines() if line.strip()), "")
        raise WeightsMismatch(f"these weights do not fit {name}: {first[:200]}") from None

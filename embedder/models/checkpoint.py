"""Fine-tuned checkpoints: one safetensors file whose header metadata carries the JSON description
(backbone, pretrained origin, classes, preprocessing, training settings). Loading never unpickles."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from embedder.errors import ProbeError, WeightsMismatch, WeightsUnavailable
from embedder.models.heads import LinearHead
from embedder.models.hub import sha256_file
from embedder.models.origin import WeightsRef
from embedder.models.preprocessing import Preprocessing
from embedder.models.weights import LoadedWeights

if TYPE_CHECKING:
    from embedder.models.backbone import Backbone


@dataclass(frozen=True)
class HeadSpec:
    """Where a classifier's head sits and what it reads (recorded in the checkpoint)."""

    name: str  # dotted module name of the Linear head
    normalized: bool = False  # True: the head reads L2-normalised features (CLIP)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "normalized": self.normalized}

    @classmethod
    def from_meta(cls, meta: dict[str, Any], backbone: Backbone) -> HeadSpec:
        """A checkpoint's head; checkpoints written before the record are torchvision's (``backbone.head``)."""
        d = meta.get("head")
        if isinstance(d, dict) and isinstance(d.get("name"), str):
            return cls(d["name"], bool(d.get("normalized", False)))
        return cls(backbone.head, False)


def head_tensors(state: dict[str, torch.Tensor], head: HeadSpec, classes: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's weight as [classes, features] (a 1x1 convolution's too) and bias; with CLASSES,
    checked to have that many rows (a checkpoint's metadata is not trusted blindly)."""
    try:
        w, b = state[f"{head.name}.weight"], state[f"{head.name}.bias"]
    except KeyError:
        raise WeightsMismatch(f"the checkpoint holds no classification head ({head.name})") from None
    if not (w.ndim == 2 or (w.ndim == 4 and tuple(w.shape[2:]) == (1, 1))) or w.numel() == 0:
        raise WeightsMismatch(f"the checkpoint's head {head.name} is not a linear classifier (weight "
                              f"{tuple(w.shape)})")
    w = w.reshape(w.shape[0], -1)
    if b.shape != (w.shape[0],):
        raise WeightsMismatch(f"the checkpoint's head {head.name} is not a linear classifier "
                              f"(weight {tuple(w.shape)}, bias {tuple(b.shape)})")
    if classes is not None and w.shape[0] != classes:
        raise WeightsMismatch(f"the checkpoint's head has {w.shape[0]} outputs for {classes} classes")
    return w, b


META_KEY = "embedder_checkpoint"
FORMAT = "embedder-checkpoint/1"


def save(path: Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(tensors, str(tmp), metadata={META_KEY: json.dumps({"format": FORMAT, **meta})})
    tmp.replace(path)


def update_meta(path: Path, changes: dict[str, Any]) -> None:
    """Rewrite the checkpoint with CHANGES merged into its description (atomically; tensors unchanged)."""
    state, meta = load(path)
    meta.pop("format", None)
    save(path, state, {**meta, **changes})


def read_meta(path: Path) -> dict[str, Any] | None:
    """The checkpoint's description, or None for a file that is not an embedder checkpoint (another
    format, a plain safetensors file). A file that cannot be read is an error, not a "no"."""
    from safetensors import SafetensorError

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    except SafetensorError:  # not a safetensors file at all
        return None
    except OSError as e:
        raise WeightsUnavailable(f"cannot read {path}: {e.strerror or e}") from None
    if not raw:
        return None
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise WeightsMismatch(f"{path}: its embedder metadata is not valid JSON (a damaged checkpoint)") from None
    return meta if isinstance(meta, dict) else None


def is_checkpoint(path: Path) -> bool:
    """By content, not by name: users call their checkpoints anything."""
    return read_meta(path) is not None


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    meta = read_meta(path)
    if meta is None:
        raise WeightsMismatch(f"{path} is not an embedder checkpoint")
    return load_file(str(path)), meta


def load_for_extraction(path: Path) -> LoadedWeights:
    state, meta = load(path)
    info = WeightsRef("finetune", path.name, sha256_file(path), meta.get("pretrained"))
    pre = Preprocessing.from_dict(meta["preprocessing"]) if "preprocessing" in meta else None
    return LoadedWeights(state, info, pre, meta, backbone=meta.get("backbone"))


def head(path: Path) -> tuple[LinearHead, list[str]]:
    """The checkpoint's own classification head as a LinearHead on the features its backbone extracts
    (penultimate features; a CLIP model's image embedding, normalised first)."""
    from embedder.models.registry import get_backbone

    state, meta = load(path)
    spec = HeadSpec.from_meta(meta, get_backbone(meta["backbone"]))
    try:
        w_t, b_t = head_tensors(state, spec, len(meta["classes"]))
    except WeightsMismatch as e:
        raise ProbeError(f"{path}: {e}") from None
    w, b = w_t.float().numpy(), b_t.float().numpy()
    dim = w.shape[1]
    return (LinearHead(w, b, np.zeros(dim, np.float32), np.ones(dim, np.float32), normalize=spec.normalized),
            list(meta["classes"]))

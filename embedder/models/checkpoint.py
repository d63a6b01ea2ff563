"""Fine-tuned checkpoints: one safetensors file whose header metadata carries the JSON description
(backbone, pretrained origin, classes, preprocessing, training settings). Loading never unpickles."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
    from embedder.models.classifier import HeadSpec, head_tensors
    from embedder.models.registry import get_backbone

    state, meta = load(path)
    spec = HeadSpec.from_meta(meta, get_backbone(meta["backbone"]))
    try:
        w_t, b_t = head_tensors(state, spec)
    except WeightsMismatch:
        raise ProbeError(f"{path} holds no classification head ({spec.name})") from None
    w, b = w_t.float().numpy(), b_t.float().numpy()
    dim = w.shape[1]
    return (LinearHead(w, b, np.zeros(dim, np.float32), np.ones(dim, np.float32), normalize=spec.normalized),
            list(meta["classes"]))

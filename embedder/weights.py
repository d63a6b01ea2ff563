"""Pretrained weights through torchvision's own cache ($TORCH_HOME/hub/checkpoints).

torchvision names each file by the first 8 hex digits of its SHA-256; we check that on import and
record the full digest in every store, so a vector can always be traced to the exact bytes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from embedder.backbones import REGISTRY, Backbone, Preprocessing
from embedder.errors import WeightsMismatch, WeightsUnavailable

log = logging.getLogger(__name__)

OFFLINE_ENV = "EMBEDDER_OFFLINE"


def cache_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def state_dict_digest(state: dict[str, torch.Tensor]) -> str:
    """A digest of tensor contents, for weights that never existed as a file (the test model)."""
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class WeightsInfo:
    """Where a model's weights came from: recorded in store provenance."""

    tag: str  # e.g. "MobileNet_V2_Weights.IMAGENET1K_V1", or "file:<name>", or "finetune:<name>"
    sha256: str
    file: str | None
    origin: str | None = None  # for fine-tuned checkpoints: the pretrained weights they started from


@dataclass(frozen=True)
class LoadedWeights:
    state_dict: dict[str, torch.Tensor]
    info: WeightsInfo
    preprocessing: Preprocessing | None = None  # set when a checkpoint carries its own
    extra: dict[str, Any] | None = None


def registry_file(backbone: Backbone, tag: str | None) -> tuple[str, Path]:
    w = backbone.torchvision_weights(tag)
    filename = w.url.rsplit("/", 1)[-1]
    return f"{type(w).__name__}.{w.name}", cache_dir() / filename


def weights_present(backbone: Backbone, tag: str | None = None) -> bool:
    if not backbone.is_torchvision:
        return True
    return registry_file(backbone, tag)[1].exists()


def load_registry_weights(backbone: Backbone, tag: str | None) -> LoadedWeights:
    if not backbone.is_torchvision:
        state = backbone.build_architecture().state_dict()
        return LoadedWeights(state, WeightsInfo(f"{backbone.name}.SEED0", state_dict_digest(state), None))
    full_tag, path = registry_file(backbone, tag)
    if not path.exists():
        w = backbone.torchvision_weights(tag)
        how = (
            f"weights file {path.name} for {backbone.name} is not in {path.parent}; supply it with "
            f"`embedder weights import FILE` or `--weights FILE` (download URL: {w.url})"
        )
        if os.environ.get(OFFLINE_ENV):
            raise WeightsUnavailable(how + f" [{OFFLINE_ENV} is set, download not tried]")
        try:
            log.info("downloading %s", w.url)
            w.get_state_dict(progress=True, check_hash=True)
        except Exception as e:  # noqa: BLE001 - any download failure means the same to the user
            raise WeightsUnavailable(f"download failed ({type(e).__name__}); {how}") from None
    state = _torch_load(path)
    return LoadedWeights(state, WeightsInfo(full_tag, sha256_file(path), path.name))


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
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
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_weights_file(path: Path) -> LoadedWeights:
    """A local state dict (.pth/.pt/.safetensors) or an `embedder finetune` checkpoint."""
    if not path.exists():
        raise WeightsUnavailable(f"weights file {path} does not exist")
    from embedder import checkpoint  # local: checkpoint imports this module

    if checkpoint.is_checkpoint(path):
        return checkpoint.load_for_extraction(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = _torch_load(path)
    return LoadedWeights(state, WeightsInfo(f"file:{path.name}", sha256_file(path), path.name))


def apply_weights(model: nn.Module, state: dict[str, torch.Tensor], head: str, name: str) -> None:
    """Load everything but the classification head (which we discard) strictly."""
    body = {k: v for k, v in state.items() if not k.startswith(head + ".")}
    missing, unexpected = model.load_state_dict(body, strict=False)
    missing = [k for k in missing if not k.startswith(head + ".")]
    if missing or unexpected:
        sample = (missing or unexpected)[:3]
        raise WeightsMismatch(
            f"weights do not fit {name}: {len(missing)} missing and {len(unexpected)} unexpected "
            f"keys (e.g. {', '.join(sample)}); is this a {name} state dict?"
        )


def import_weights(path: Path) -> tuple[str, Path]:
    """Check a file against the registry by its SHA-256 prefix and install it in the cache."""
    if not path.is_file():
        raise WeightsUnavailable(f"{path} is not a file")
    digest = sha256_file(path)
    for backbone in REGISTRY.values():
        if not backbone.is_torchvision:
            continue
        for tag in backbone.weights_tags():
            full_tag, target = registry_file(backbone, tag)
            prefix = target.stem.rsplit("-", 1)[-1]
            if digest.startswith(prefix):
                target.parent.mkdir(parents=True, exist_ok=True)
                if not target.exists() or sha256_file(target) != digest:
                    tmp = target.with_suffix(".partial")
                    shutil.copyfile(path, tmp)
                    os.replace(tmp, target)
                return f"{backbone.name}:{tag} ({full_tag})", target
    raise WeightsMismatch(
        f"{path.name} (sha256 {digest[:8]}…) matches no weights in the registry; "
        "use it directly with `--weights FILE --backbone NAME` instead"
    )

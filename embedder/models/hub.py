"""torchvision's weights cache ($TORCH_HOME/hub/checkpoints): where registry weights live, how they get
there."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from embedder.errors import WeightsMismatch, WeightsUnavailable
from embedder.models._registry_meta import REGISTRY_META
from embedder.models.backbone import Backbone
from embedder.models.origin import WeightsRef, sha256_file
from embedder.models.registry import REGISTRY

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """torchvision's weights cache, ``torch.hub.get_dir()/checkpoints``, worked out the way torch.hub
    does it without importing torch ($TORCH_HOME, else $XDG_CACHE_HOME/torch, else ~/.cache/torch)."""
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torch")
    return Path(os.path.expanduser(torch_home)) / "hub" / "checkpoints"


def weights_present(backbone: Backbone) -> bool:
    """Whether the default weights' file is in torchvision's cache."""
    if not backbone.is_torchvision:
        return True
    return (cache_dir() / str(REGISTRY_META[backbone.name]["file"])).exists()


OFFLINE_ENV = "EMBEDDER_OFFLINE"


def registry_file(backbone: Backbone, tag: str | None) -> tuple[str, Path]:
    w = backbone.torchvision_weights(tag)
    filename = w.url.rsplit("/", 1)[-1]
    return f"{type(w).__name__}.{w.name}", cache_dir() / filename


def ensure_registry_file(backbone: Backbone, tag: str | None) -> WeightsRef:
    """The registry weights' file is in torchvision's cache (downloaded if allowed): its reference."""
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
    return WeightsRef("registry", full_tag, sha256_file(path))


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




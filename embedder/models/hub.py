"""torchvision's weights cache ($TORCH_HOME/hub/checkpoints): where registry weights live, how they get
there."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from embedder.errors import WeightsMismatch, WeightsUnavailable
from embedder.models._registry_meta import REGISTRY_META
from embedder.models.backbone import Backbone
from embedder.models.origin import WeightsRef, sha256_file
from embedder.models.registry import REGISTRY
from embedder.models.torchvision_family import OFFLINE_ENV, cache_dir

__all__ = ["OFFLINE_ENV", "cache_dir", "ensure_registry_file", "import_weights", "present_files", "registry_file",
           "sha256_file", "weights_present"]

def weights_present(backbone: Backbone) -> bool:
    """Whether the default weights' file is in torchvision's cache."""
    if not backbone.is_torchvision:
        return True
    return (cache_dir() / str(REGISTRY_META[backbone.name]["file"])).exists()


def present_files(backbone: Backbone) -> list[str]:
    """Weights files of BACKBONE in torchvision's cache other than its default tag's (``embedder weights
    import`` or the demo may install another tag: MobileNetV2's IMAGENET1K_V1, mobilenet_v2-b0353104.pth).
    By torchvision's file naming (NAME-HASH.pth), without importing torch: `backbones` stays light."""
    if not backbone.is_torchvision:
        return []
    default = str(REGISTRY_META[backbone.name]["file"])
    try:
        names = sorted(p.name for p in cache_dir().glob(f"{backbone.name}-*.pth"))
    except OSError:
        return []
    return [n for n in names if n != default]


def registry_file(backbone: Backbone, tag: str | None) -> tuple[str, Path]:
    """(full tag, path in torchvision's cache) of a registry entry's weights TAG."""
    return backbone.torchvision().registry_file(tag)


def ensure_registry_file(backbone: Backbone, tag: str | None) -> WeightsRef:
    """The registry weights' file is in torchvision's cache (downloaded if allowed): its reference."""
    return backbone.torchvision().ensure_file(tag)


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

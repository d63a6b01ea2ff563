"""torchvision's classification models as a family: architecture, weights and preprocessing from
torchvision's own weights enum (``weights.transforms()``, ``weights.meta``), the weights file in
torchvision's cache ($TORCH_HOME/hub/checkpoints), loaded by torchvision's own builder (its key
remapping: DenseNet's legacy names, MNASNet's versions)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedder.errors import UnknownBackbone, WeightsMismatch, WeightsUnavailable
from embedder.models.origin import WeightsRef, sha256_file
from embedder.models.preprocessing import Preprocessing

if TYPE_CHECKING:  # torch and torchvision load only where a model is built (fast CLI start)
    from torch import nn
    from torchvision.models import WeightsEnum

    from embedder.models.family import FileLoader
    from embedder.models.text import TextTower

log = logging.getLogger(__name__)

OFFLINE_ENV = "EMBEDDER_OFFLINE"


def cache_dir() -> Path:
    """torchvision's weights cache, ``torch.hub.get_dir()/checkpoints``, worked out the way torch.hub
    does it without importing torch ($TORCH_HOME, else $XDG_CACHE_HOME/torch, else ~/.cache/torch)."""
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torch")
    return Path(os.path.expanduser(torch_home)) / "hub" / "checkpoints"


@dataclass(frozen=True)
class TorchvisionModel:
    """The family's part of a registry entry: torchvision's builder and weights enum for NAME."""

    name: str
    head: str  # dotted path of the final classification Linear
    kind: str  # the registry's family label (resnet, vit, inception, …): builder arguments depend on it

    def weights_enum(self, tag: str | None = None) -> WeightsEnum:
        from torchvision import models

        enum = models.get_model_weights(self.name)
        wanted = tag or "DEFAULT"
        try:
            return enum[wanted] if wanted != "DEFAULT" else enum.DEFAULT  # type: ignore[misc, no-any-return]
        except KeyError:
            valid = ", ".join(w.name for w in enum)
            raise UnknownBackbone(f"{self.name} has no weights tag {wanted!r}; valid tags: {valid}") from None

    def weights_tags(self) -> list[str]:
        from torchvision import models

        return [w.name for w in models.get_model_weights(self.name)]

    def preprocessing(self, tag: str | None = None) -> Preprocessing:
        return Preprocessing.from_transforms(self.weights_enum(tag).transforms())

    def classifiers(self) -> tuple[str, ...]:
        return (self.head,)

    def file_loader(self) -> FileLoader | None:
        return None

    def text_tower(self, net: nn.Module) -> TextTower | None:
        return None

    def inference_form(self, net: nn.Module) -> bool:
        return False

    def hub_target(self, suffix: str) -> tuple[str, str] | None:
        return None  # torchvision's files are recognised by their SHA-256 (hub.import_weights)

    def build(self, tag: str | None = None, image_size: int | None = None) -> nn.Module:
        """The full architecture, randomly initialised, head still attached (at the weights' own size:
        a ViT at another size is refused where it first runs, see ``features.load_model``)."""
        from torchvision import models

        weights = self.weights_enum(tag)
        kwargs: dict[str, Any] = {}
        if self.name == "inception_v3":
            # torchvision's pretrained inception expects transform_input=True and no aux head at eval.
            kwargs = {"aux_logits": True, "init_weights": False, "transform_input": True}
        elif self.name == "googlenet":
            kwargs = {"aux_logits": False, "init_weights": False, "transform_input": True}
        elif self.kind == "vit":
            kwargs = {"image_size": weights.meta["min_size"][0]}
        num_classes = len(weights.meta["categories"])
        return models.get_model(self.name, weights=None, num_classes=num_classes, **kwargs)

    def registry_file(self, tag: str | None) -> tuple[str, Path]:
        """(full tag, where torchvision's cache keeps the file) of the weights TAG."""
        w = self.weights_enum(tag)
        return f"{type(w).__name__}.{w.name}", cache_dir() / w.url.rsplit("/", 1)[-1]

    def ensure_file(self, tag: str | None) -> WeightsRef:
        """The weights' file is in torchvision's cache (downloaded if allowed): its reference."""
        full_tag, path = self.registry_file(tag)
        if not path.exists():
            w = self.weights_enum(tag)
            how = (
                f"weights file {path.name} for {self.name} is not in {path.parent}; supply it with "
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

    def load_pretrained(self, tag: str | None = None) -> nn.Module:
        """torchvision's builder with its weights, read from torchvision's cache (the caller made sure
        the file is there): every model-specific loading rule is torchvision's own."""
        from torchvision import models

        try:
            return models.get_model(self.name, weights=self.weights_enum(tag))
        except (RuntimeError, ValueError, OSError, EOFError) as e:
            first = next((line for line in str(e).splitlines() if line.strip()), "")
            raise WeightsMismatch(f"cannot load {self.name} weights from torchvision's cache "
                                  f"({type(e).__name__}: {first[:200]}); delete the file and import it again") from None

    def pretrained(self, tag: str | None = None, image_size: int | None = None) -> tuple[nn.Module, WeightsRef]:
        ref = self.ensure_file(tag)
        return self.load_pretrained(tag), ref

"""What a family of backbones supplies, as a typed contract (the inputs of timm's ``build_model_with_cfg``:
the architecture, its pretrained weights and where they come from, the preprocessing that matches
them, which modules are the classifier, and, for CLIP-family models, the text tower).

torchvision's registry (``torchvision_family``), timm (``timm_family``), OpenCLIP (``openclip_family``)
and the test backbone (``tiny_family``) implement it; mypy checks that they do. A registry entry
(``backbone.Backbone``) holds one, and the builder (``builder.load_network``) and the feature model
(``features.load_model``) use nothing else of a family.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # torch loads only where a model is built (fast CLI start)
    from torch import nn

    from embedder.models.origin import WeightsRef
    from embedder.models.preprocessing import Preprocessing
    from embedder.models.text import TextTower

FileLoader = Callable[["nn.Module", Path], None]


class Family(Protocol):
    """One backbone's family: how it is built, weighted, preprocessed and cut."""

    def build(self, tag: str | None = None, image_size: int | None = None) -> nn.Module:
        """The architecture, randomly initialised (classifier attached or already dropped, see
        ``classifiers``), taking IMAGE_SIZE-pixel inputs where given (None: its own size)."""
        ...

    def pretrained(self, tag: str | None = None, image_size: int | None = None) -> tuple[nn.Module, WeightsRef]:
        """The architecture with its named weights (torchvision's registry, a family's hub download,
        the test model's seed), and which exact weights those are."""
        ...

    def preprocessing(self, tag: str | None = None) -> Preprocessing:
        """The evaluation transform that matches the named weights, as the typed record."""
        ...

    def weights_tags(self) -> list[str]:
        """The weights tags ``NAME:TAG`` may name; empty where the name itself carries them."""
        ...

    def classifiers(self) -> tuple[str, ...]:
        """Dotted names of the classification heads (a distilled model has two), whose output is never
        a feature: replaced by Identity, and their tensors left out of a weights file."""
        ...

    def file_loader(self) -> FileLoader | None:
        """The family's own loader of a weights file (its key conversions); None: the file is read as a
        state dict and loaded strictly, classifier tensors left out (``weights.apply_weights``)."""
        ...

    def text_tower(self, net: nn.Module) -> TextTower | None:
        """The text tower sharing the space of NET's own image embedding (CLIP-family models), else None."""
        ...

    def inference_form(self, net: nn.Module) -> bool:
        """Fold NET's training-time branches in place (MobileCLIP's reparameterisable blocks), as loading
        its weights does; True where there were any (a checkpoint of the folded form records it, and
        is loaded into the folded form), False where the architecture has none (a no-op)."""
        ...

    def hub_target(self, suffix: str) -> tuple[str, str] | None:
        """(Hugging Face hub repository, file name) where the family's download finds its weights, for
        ``embedder weights import``; None: the family does not download from the hub."""
        ...

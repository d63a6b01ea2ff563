"""One registry entry, as data: a model's name, family, classification head, feature map, and the
family that builds it, finds its weights and preprocessing (``family.Family``: torchvision's
registry, timm, OpenCLIP or the test model)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from embedder.errors import UnknownBackbone
from embedder.models._registry_meta import REGISTRY_META
from embedder.models.torchvision_family import TorchvisionModel

if TYPE_CHECKING:  # torch and torchvision load only where a model is built (fast CLI start)
    from torch import nn
    from torchvision.models import WeightsEnum

    from embedder.models.family import Family
from embedder.models.preprocessing import Preprocessing


@dataclass(frozen=True)
class Backbone:
    """One registry entry."""

    name: str
    head: str  # dotted path of the (first) classification Linear; "" where none is left to drop
    dim: int  # embedding dim at the default (penultimate) cut (0: known once built)
    family: str  # a label: resnet, vit, …, timm, open_clip, test
    feature_map: str  # module whose output is the last spatial feature map (for --pool max|gem)
    impl: Family  # how it is built, weighted and preprocessed
    weights: str = "DEFAULT"  # torchvision weights tag; DEFAULT resolves to the concrete one

    @property
    def is_torchvision(self) -> bool:
        return isinstance(self.impl, TorchvisionModel)

    @property
    def source(self) -> Family | None:
        """Another family's model (timm, OpenCLIP: what fine-tuning does not take yet); None for
        torchvision's registry and the test model."""
        return None if self.is_torchvision or self.family == "test" else self.impl

    @property
    def classifiers(self) -> tuple[str, ...]:
        """Every classification head (a distilled model has two): never part of a feature."""
        return self.impl.classifiers()

    def torchvision(self) -> TorchvisionModel:
        if not isinstance(self.impl, TorchvisionModel):
            raise UnknownBackbone(f"{self.name} is not one of torchvision's models")
        return self.impl

    def torchvision_weights(self, tag: str | None = None) -> WeightsEnum:
        return self.torchvision().weights_enum(tag or self.weights)

    def weights_tags(self) -> list[str]:
        return self.impl.weights_tags()

    def preprocessing(self, tag: str | None = None) -> Preprocessing:
        return self.impl.preprocessing(tag)

    def meta(self) -> dict[str, Any]:
        """Default weights' tag, file name, GFLOPs, parameters and published ImageNet acc@1, from
        torchvision's weights meta, kept as data (``_registry_meta``, checked by a test) so that
        listing backbones never imports torch."""
        if not self.is_torchvision:
            return {"weights": self.weights, "gflops": None, "acc1": None, "file": None, "params": None}
        return dict(REGISTRY_META[self.name])

    def torchvision_meta(self, tag: str | None = None) -> dict[str, Any]:
        """The same facts computed from torchvision itself (what ``_registry_meta`` must equal)."""
        w = self.torchvision_weights(tag)
        m = w.meta
        metrics: dict[str, Any] = next(iter(m.get("_metrics", {}).values()), {})
        return {"weights": w.name, "gflops": m.get("_ops"), "acc1": metrics.get("acc@1"),
                "file": w.url.rsplit("/", 1)[-1], "params": m.get("num_params")}

    def build_pretrained(self, tag: str | None = None) -> nn.Module:
        """The network with its named weights (torchvision's: read from torchvision's cache)."""
        if self.is_torchvision:
            return self.torchvision().load_pretrained(tag)
        return self.impl.pretrained(tag)[0]

    def build_architecture(self, tag: str | None = None, image_size: int | None = None) -> nn.Module:
        """The full architecture, randomly initialised."""
        return self.impl.build(tag, image_size)

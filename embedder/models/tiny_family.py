"""The test backbone as a family (``tiny_test``): a 3-stage CNN whose 'pretrained weights' are its seeded
initialisation, so the suite needs no downloaded weights except where loading real ones is the point."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from embedder.errors import UnknownBackbone
from embedder.models.origin import WeightsRef
from embedder.models.preprocessing import Preprocessing

if TYPE_CHECKING:  # torch loads only where a model is built (fast CLI start)
    from torch import nn

    from embedder.models.family import FileLoader
    from embedder.models.text import TextTower

TINY_PREPROCESSING = Preprocessing(
    resize_size=40,
    crop_size=32,
    interpolation="bilinear",
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
)


@dataclass(frozen=True)
class TinyModel:
    name: str = "tiny_test"
    tag: str = "SEED0"

    def build(self, tag: str | None = None, image_size: int | None = None) -> nn.Module:
        from embedder.models.tiny import tiny

        return tiny()

    def pretrained(self, tag: str | None = None, image_size: int | None = None) -> tuple[nn.Module, WeightsRef]:
        from embedder.models.weights import state_dict_digest

        if tag not in (None, self.tag):
            raise UnknownBackbone(f"{self.name} has no weights tag {tag!r}; valid tags: {self.tag}")
        net = self.build()
        return net, WeightsRef("seeded", f"{self.name}.{self.tag}", state_dict_digest(net.state_dict()))

    def preprocessing(self, tag: str | None = None) -> Preprocessing:
        return TINY_PREPROCESSING

    def weights_tags(self) -> list[str]:
        return [self.tag]

    def classifiers(self) -> tuple[str, ...]:
        return ("fc",)

    def file_loader(self) -> FileLoader | None:
        return None

    def text_tower(self, net: nn.Module) -> TextTower | None:
        return None

    def inference_form(self, net: nn.Module) -> bool:
        return False

    def hub_target(self, suffix: str) -> tuple[str, str] | None:
        return None

"""One registry entry, as data: a model's name, family, classification head, feature map, and how its
weights and preprocessing are found (torchvision's enums, a family module's source, or a test
builder)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from embedder.errors import UnknownBackbone
from embedder.models._registry_meta import REGISTRY_META

if TYPE_CHECKING:  # torch and torchvision load only where a model is built (fast CLI start)
    from torch import nn
    from torchvision.models import WeightsEnum
from embedder.models.preprocessing import Preprocessing


@dataclass(frozen=True)
class Backbone:
    """One registry entry."""

    name: str
    head: str  # dotted path of the final classification Linear; Identity replaces it
    dim: int  # embedding dim at the default (penultimate) cut
    family: str
    feature_map: str  # module whose output is the last spatial feature map (for --pool max|gem)
    weights: str = "DEFAULT"  # torchvision weights tag; DEFAULT resolves to the concrete one
    builder: Callable[[], nn.Module] | None = None  # only for non-torchvision (test) models (lazy import)
    test_preprocessing: Preprocessing | None = None  # only for non-torchvision (test) models
    # another family's model (e.g. timm_family.TimmModel): build(), preprocessing(), pretrained()
    source: Any = None

    @property
    def is_torchvision(self) -> bool:
        return self.builder is None and self.source is None

    def torchvision_weights(self, tag: str | None = None) -> WeightsEnum:
        from torchvision import models

        enum = models.get_model_weights(self.name)
        wanted = tag or self.weights
        try:
            return enum[wanted] if wanted != "DEFAULT" else enum.DEFAULT  # type: ignore[misc, no-any-return]
        except KeyError:
            valid = ", ".join(w.name for w in enum)
            raise UnknownBackbone(
                f"{self.name} has no weights tag {wanted!r}; valid tags: {valid}"
            ) from None

    def weights_tags(self) -> list[str]:
        if self.source is not None:
            return []  # a family names its weights in the model name (timm:MODEL.TAG)
        if not self.is_torchvision:
            return ["SEED0"]
        from torchvision import models

        return [w.name for w in models.get_model_weights(self.name)]

    def preprocessing(self, tag: str | None = None) -> Preprocessing:
        if self.source is not None:
            return self.source.preprocessing()  # type: ignore[no-any-return]
        if self.test_preprocessing is not None:
            return self.test_preprocessing
        return Preprocessing.from_transforms(self.torchvision_weights(tag).transforms())

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
        """torchvision's builder with its weights, read from torchvision's cache (the caller made
        sure the file is there): every model-specific loading rule is torchvision's own."""
        from torchvision import models

        from embedder.errors import WeightsMismatch

        try:
            return models.get_model(self.name, weights=self.torchvision_weights(tag))
        except (RuntimeError, ValueError, OSError, EOFError) as e:
            first = next((line for line in str(e).splitlines() if line.strip()), "")
            raise WeightsMismatch(f"cannot load {self.name} weights from torchvision's cache "
                                  f"({type(e).__name__}: {first[:200]}); delete the file and import it again") from None

    def build_architecture(self, tag: str | None = None) -> nn.Module:
        """The full architecture, randomly initialised, head still attached."""
        if self.source is not None:
            return self.source.build()  # type: ignore[no-any-return]
        if self.builder is not None:
            return self.builder()
        from torchvision import models

        weights = self.torchvision_weights(tag)
        kwargs: dict[str, Any] = {}
        if self.name == "inception_v3":
            # torchvision's pretrained inception expects transform_input=True and no aux head at eval.
            kwargs = {"aux_logits": True, "init_weights": False, "transform_input": True}
        elif self.name == "googlenet":
            kwargs = {"aux_logits": False, "init_weights": False, "transform_input": True}
        elif self.family == "vit":
            kwargs = {"image_size": weights.meta["min_size"][0]}
        num_classes = len(weights.meta["categories"])
        return models.get_model(self.name, weights=None, num_classes=num_classes, **kwargs)

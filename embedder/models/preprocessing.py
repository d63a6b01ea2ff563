"""What a backbone's weights expect of an image, as plain data (recorded in every store)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch and torchvision load only where a model is built (fast CLI start)
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms._presets import ImageClassification


@dataclass(frozen=True)
class Preprocessing:
    """What torchvision's ImageClassification preset does, as plain data (recorded in stores)."""

    resize_size: int  # shorter side after resize
    crop_size: int  # square centre crop
    interpolation: str  # "bilinear" | "bicubic" | "nearest"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    antialias: bool = True
    # "shorter": the shorter side to resize_size, then the centre crop (torchvision's presets, timm's
    # eval transform, OpenCLIP's "shortest"); "squash": both sides to crop_size, aspect ratio not kept
    # (OpenCLIP's SigLIP configs). OpenCLIP's "longest" (fit and pad) is refused where it is asked.
    resize_mode: str = "shorter"

    @classmethod
    def from_transforms(cls, t: ImageClassification) -> Preprocessing:
        return cls(
            resize_size=int(t.resize_size[0]),
            crop_size=int(t.crop_size[0]),
            interpolation=t.interpolation.value,
            mean=tuple(float(x) for x in t.mean),  # type: ignore[arg-type]
            std=tuple(float(x) for x in t.std),  # type: ignore[arg-type]
            antialias=bool(t.antialias),
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        return cls(
            resize_size=int(d["resize_size"]),
            crop_size=int(d["crop_size"]),
            interpolation=str(d["interpolation"]),
            mean=tuple(d["mean"]),  # type: ignore[arg-type]
            std=tuple(d["std"]),  # type: ignore[arg-type]
            antialias=bool(d.get("antialias", True)),
            resize_mode=str(d.get("resize_mode", "shorter")),
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    def at_size(self, crop_size: int) -> Preprocessing:
        """Same preset at another resolution, keeping the resize/crop ratio (low-res fine-tuning)."""
        ratio = self.resize_size / self.crop_size
        return dataclasses.replace(self, crop_size=crop_size, resize_size=round(crop_size * ratio))

    @property
    def resize_arg(self) -> list[int]:
        """The size argument of torchvision's resize that does this record's resize."""
        return [self.crop_size, self.crop_size] if self.resize_mode == "squash" else [self.resize_size]

    @property
    def interpolation_mode(self) -> InterpolationMode:
        from torchvision.transforms import InterpolationMode

        return InterpolationMode(self.interpolation)

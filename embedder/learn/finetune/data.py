"""Labelled images for training: the dataset, its collate, the training and evaluation transforms
(picklable, for spawned workers)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from torch.utils.data import Dataset

from embedder.decode.common import read_bytes
from embedder.decode.cpu import load_rgb, preprocess
from embedder.errors import DecodeError, FinetuneError
from embedder.io.sources import ImageRef, discover
from embedder.models.preprocessing import Preprocessing
from embedder.store.labels import LabelJoin

_Item = tuple[torch.Tensor | None, int, str, str]  # pixels (None: failed), label, path, reason


class LabelledImages(Dataset):  # type: ignore[type-arg]
    """Images and their class numbers; an image that fails to decode yields None and the reason."""

    def __init__(self, refs: list[ImageRef], labels: list[int], transform: Callable[[Any], torch.Tensor],
                 max_pixels: int) -> None:
        self.refs, self.labels, self.transform, self.max_pixels = refs, labels, transform, max_pixels

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int, str, str]:
        ref = self.refs[i]
        try:
            img = load_rgb(read_bytes(ref.path, None), self.max_pixels)  # a file, a shard member, a table row
            return self.transform(img), self.labels[i], ref.path, ""
        except (DecodeError, OSError) as e:
            return None, self.labels[i], ref.path, str(e)


def collate(batch: list[_Item]) -> tuple[torch.Tensor | None, torch.Tensor, list[tuple[str, str]]]:
    """A batch of the decoded images (None if none decoded), their labels, and the (path, reason) of
    the failed ones."""
    good = [(x, y) for x, y, _, _ in batch if x is not None]
    failed = [(p, r) for x, _, p, r in batch if x is None]
    if not good:
        return None, torch.zeros(0, dtype=torch.long), failed
    return torch.stack([g[0] for g in good]), torch.tensor([g[1] for g in good]), failed


class train_transform:  # noqa: N801 - a picklable function object (DataLoader workers may spawn)
    """Augmentation for classification at the weights' resolution: a random resized crop of at least
    CROP_SCALE of the image's area, then a horizontal flip (when FLIP).

    ``crop_scale >= 1.0`` means no random crop ("resize + flip only", the textbook loop's training
    transform): each training image goes through exactly the evaluation and extraction geometry — the
    shorter side resized to ``pre.resize_size`` (both sides to ``crop_size`` for a ``squash`` record),
    then the centre ``crop_size`` square — and is flipped at random. The textbook loop resizes the whole
    image to ``size x size`` for training and evaluation alike; embedder's evaluation keeps its own
    preprocessing (a centre crop of ``crop_size / resize_size`` of the shorter side, 224/256 for
    torchvision's weights), so training sees what evaluation sees: the same objects at the same scale
    and position, no random crop. (Whole images squashed to ``crop_size`` in training and centre crops
    at evaluation would show every object 256/224 = 1.14x larger at evaluation than in training.)
    """

    def __init__(self, pre: Preprocessing, flip: bool = True, crop_scale: float = 1.0) -> None:
        self.pre = pre
        self.crop = None if crop_scale >= 1.0 else T.RandomResizedCrop(
            pre.crop_size, scale=(crop_scale, 1.0), interpolation=pre.interpolation_mode, antialias=True)
        self.flip = T.RandomHorizontalFlip(p=0.5 if flip else 0.0)  # picklable either way

    def __call__(self, img: Any) -> torch.Tensor:
        if self.crop is None:
            return self.flip(preprocess(img, self.pre))  # uint8 [3, crop, crop]; the flip takes tensors
        return TF.pil_to_tensor(self.flip(self.crop(img)))


class eval_transform:  # noqa: N801
    """Exactly the extraction preprocessing (resize, centre crop)."""

    def __init__(self, pre: Preprocessing) -> None:
        self.pre = pre

    def __call__(self, img: Any) -> torch.Tensor:
        return preprocess(img, self.pre)


def labelled_refs(source: list[str], classes: list[str] | None = None,
                  labels: LabelJoin | None = None) -> tuple[list[ImageRef], list[str]]:
    """The labelled images under SOURCE and the sorted class names (or CLASSES, when given). LABELS:
    a labels file's join, its labels put over the folders' by the ids extraction gives the images."""
    refs = discover(source)
    if labels is not None and refs:
        import pyarrow as pa

        got = labels.apply(pa.array([r.id for r in refs], pa.string()),
                           pa.array([r.label for r in refs], pa.string())).to_pylist()
        refs = [replace(r, label=g or None) for r, g in zip(refs, got)]
    unlabelled = [r for r in refs if r.label is None]
    if len(unlabelled) == len(refs) and labels is not None:
        labels.require_some(", ".join(source))  # none of the file's ids is among the images: say that
    if len(unlabelled) == len(refs):
        more = f" or {labels.file.path}" if labels is not None else ""
        raise FinetuneError(f"no labels in {', '.join(source)}{more}: put images in one subfolder per class, "
                            "or give --labels FILE (id,label)")
    refs = [r for r in refs if r.label is not None]
    return refs, sorted({r.label for r in refs if r.label is not None}) if classes is None else classes

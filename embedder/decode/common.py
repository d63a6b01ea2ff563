"""What every decoder shares: the pixel limit, an image's metadata, the resize target and its
check, reading bytes from a path or URI."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # light: the CLI reads the pixel limit without loading torch
    import torch

from embedder.errors import DecodeError
from embedder.io.limits import MAX_IMAGE_BYTES

# PIL's own default; beyond it an image is treated as a decompression bomb and skipped.
DEFAULT_MAX_PIXELS = 89_478_485


@dataclass(frozen=True)
class ImageMeta:
    """What is stored beside a vector: the original image's size (after EXIF rotation, before any
    draft-mode reduction) and a hash of the file's bytes."""

    width: int
    height: int
    file_hash: str


@dataclass(frozen=True)
class Decoded:
    pixels: torch.Tensor  # uint8 [3, crop, crop]
    width: int  # of the (EXIF-rotated) original
    height: int
    file_hash: str


def resize_target(width: int, height: int, shorter: int) -> tuple[int, int]:
    """The size torchvision's resize to ``shorter`` (shorter side) produces: (width, height)."""
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def check_resize(width: int, height: int, shorter: int, max_pixels: int) -> None:
    """An extreme aspect ratio (say 100000x10) would be upscaled to billions of pixels before the
    centre crop; such an image is refused like a decompression bomb instead of exhausting memory."""
    tw, th = resize_target(width, height, shorter)
    if tw * th > max_pixels:
        raise DecodeError(f"extreme aspect ratio: {width}x{height} resized to {tw}x{th} would exceed "
                          f"{max_pixels} pixels")


def read_bytes(path: str, max_bytes: int | None = MAX_IMAGE_BYTES) -> bytes:
    """An image's bytes, from a local path, an object-storage URI (s3://…), a tar shard's member
    (``SHARD#MEMBER[#@OFFSET:SIZE]``) or a table's row (``FILE#COLUMN/GROUP/ROW``): one decode path
    for all; the location is parsed by ``embedder.io.location``. An image over MAX_BYTES is refused
    before more than MAX_BYTES + 1 of its bytes are read; None: no limit (an image a store already
    holds, read back by the user's own command: fine-tuning, inspect's thumbnails)."""
    limit = (1 << 62) if max_bytes is None else max_bytes
    from embedder.io import location
    from embedder.io.uri import is_uri  # pyarrow: only when a path is read

    loc = location.parse(path)
    if loc is not None:
        if loc.kind == location.FAILING:
            raise DecodeError(loc.reason or "not embedded")
        if loc.kind == location.MEMBER:
            from embedder.io.tars import read_member

            return read_member(loc, limit)
        from embedder.io.tables import read_row

        return read_row(path, limit)
    if is_uri(path):
        from embedder.errors import SourceError
        from embedder.io.uri import filesystem

        try:
            fs, key = filesystem(path)
            with fs.open_input_stream(key) as f:  # type: ignore[attr-defined]
                data = bytes(f.read() if max_bytes is None else f.read(max_bytes + 1))
        except (OSError, SourceError) as e:
            raise DecodeError(f"cannot read: {str(e).splitlines()[0][:200]}") from None
    else:
        try:
            with open(path, "rb") as f:
                data = f.read() if max_bytes is None else f.read(max_bytes + 1)
        except OSError as e:
            raise DecodeError(f"cannot read: {e.strerror or e}") from None
    if max_bytes is not None and len(data) > max_bytes:
        from embedder.io.limits import too_big

        raise DecodeError(too_big(path.rsplit("/", 1)[-1], None if is_uri(path) else _size_of(path), max_bytes))
    return data


def _size_of(path: str) -> int | None:
    import os

    try:
        return os.path.getsize(path)
    except OSError:
        return None

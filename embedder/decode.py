"""Bytes → RGB pixels → the exact tensor torchvision's ``weights.transforms()`` would produce.

Resize and crop run here on PIL images (in decode threads, off the model's critical path) with the
same torchvision functional calls the preset uses; the float conversion and mean/std normalisation
run in batch on the model's device (``normalize_batch``), which is the same arithmetic.
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps, UnidentifiedImageError

from embedder.backbones import Preprocessing
from embedder.errors import DecodeError

log = logging.getLogger(__name__)

# PIL's own default; beyond it an image is treated as a decompression bomb and skipped.
DEFAULT_MAX_PIXELS = 89_478_485

DECODE_POLICY = {
    "alpha": "composite on white",
    "exif": "transpose",
    "high_bit_depth": "scaled to 8 bit",
    "animated": "first frame",
}


@dataclass(frozen=True)
class Decoded:
    pixels: torch.Tensor  # uint8 [3, crop, crop]
    width: int  # of the (EXIF-rotated) original
    height: int
    file_hash: str


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img)
        if mode == "F":
            hi = float(np.nanmax(arr)) if arr.size else 1.0
            arr = np.clip(arr / (hi if hi > 1.0 else 1.0), 0.0, 1.0) * 255.0
        elif mode == "I" and arr.size and arr.max() <= 255 and arr.min() >= 0:
            pass  # 8-bit data stored as int32
        else:
            arr = np.clip(arr, 0, 65535) / 257.0
        return Image.fromarray(np.round(arr).astype(np.uint8), "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        if img.mode == "RGB":
            return img
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in ("1", "L", "CMYK", "YCbCr", "LAB", "HSV"):
        return img.convert("RGB")
    raise DecodeError(f"unsupported image mode {mode}")


def load_rgb(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None
) -> Image.Image:
    """Decode bytes to an RGB image, EXIF-rotated; raises DecodeError with a short reason."""
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        img: Image.Image = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > max_pixels:
            raise DecodeError(f"decompression bomb: {w}x{h} exceeds {max_pixels} pixels")
        if draft_size is not None and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        img.load()
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError("not an image (unidentified format)") from None
    except Image.DecompressionBombError as e:
        raise DecodeError(f"decompression bomb: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise DecodeError(f"cannot decode: {e}") from None
    try:
        img = ImageOps.exif_transpose(img) or img
    except Exception as e:  # noqa: BLE001 - a broken EXIF block must not cost the image
        log.debug("ignoring unreadable EXIF: %s", e)
    try:
        return _to_rgb(img)
    except (OSError, ValueError) as e:
        raise DecodeError(f"cannot convert mode {img.mode}: {e}") from None


def preprocess(img: Image.Image, pre: Preprocessing) -> torch.Tensor:
    """Resize (shorter side) and centre-crop exactly as torchvision's ImageClassification preset."""
    img = TF.resize(img, [pre.resize_size], interpolation=pre.interpolation_mode, antialias=pre.antialias)
    img = TF.center_crop(img, [pre.crop_size])
    return TF.pil_to_tensor(img)


def decode_file(
    path: str, pre: Preprocessing, max_pixels: int = DEFAULT_MAX_PIXELS, fast: bool = False
) -> Decoded:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DecodeError(f"cannot read: {e.strerror or e}") from None
    img = load_rgb(data, max_pixels, draft_size=pre.resize_size if fast else None)
    width, height = img.size
    pixels = preprocess(img, pre)
    return Decoded(pixels, width, height, hashlib.blake2b(data, digest_size=16).hexdigest())


def normalize_batch(x: torch.Tensor, pre: Preprocessing, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [N,3,H,W] → normalised float, on whatever device x lives."""
    mean = torch.tensor(pre.mean, device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x.float() / 255.0 - mean) / std).to(dtype)

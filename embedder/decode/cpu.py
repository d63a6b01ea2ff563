"""Bytes → RGB pixels → the exact tensor torchvision's ``weights.transforms()`` would produce.

Resize and crop run here on PIL images (in decode threads, off the model's critical path) with the
same torchvision functional calls the preset uses; the float conversion and mean/std normalisation
run in batch on the model's device (``normalize_batch``), which is the same arithmetic.
"""

from __future__ import annotations

import hashlib
import io
import logging

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps, UnidentifiedImageError

from embedder.decode.common import DEFAULT_MAX_PIXELS, ImageMeta, check_resize
from embedder.errors import DecodeError
from embedder.models.preprocessing import Preprocessing

log = logging.getLogger(__name__)


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
    return load_rgb_sized(data, max_pixels, draft_size)[0]


def load_rgb_sized(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """``load_rgb`` plus the original (EXIF-rotated) size, which a JPEG draft decode reduces."""
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
        loaded = img.size
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
    rotated = img.size != loaded and img.size == (loaded[1], loaded[0])
    original = (h, w) if rotated else (w, h)
    try:
        return _to_rgb(img), original
    except (OSError, ValueError) as e:
        raise DecodeError(f"cannot convert mode {img.mode}: {e}") from None


def preprocess(img: Image.Image, pre: Preprocessing, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Resize (shorter side) and centre-crop exactly as torchvision's ImageClassification preset."""
    check_resize(img.width, img.height, pre.resize_size, max_pixels)
    img = TF.resize(img, pre.resize_arg, interpolation=pre.interpolation_mode, antialias=pre.antialias)
    img = TF.center_crop(img, [pre.crop_size])
    return TF.pil_to_tensor(img)


def pil_pixels(img: Image.Image, pre: Preprocessing, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """An image already in memory (a PIL image) → uint8 [3, crop, crop], as the ``pil`` decoder
    treats a file's: EXIF orientation applied, converted to RGB, resized and cropped."""
    if img.width * img.height > max_pixels:
        raise DecodeError(f"decompression bomb: {img.width}x{img.height} exceeds {max_pixels} pixels")
    try:
        rgb = _to_rgb(ImageOps.exif_transpose(img))
        return preprocess(rgb, pre, max_pixels)
    except DecodeError:
        raise
    except (OSError, ValueError, MemoryError, RuntimeError) as e:
        raise DecodeError(f"cannot convert: {type(e).__name__}: {e}") from None


# ``pil-reduce``: the JPEG DCT-domain downscale stops at no less than this many times the resize
# target, and the preset's own antialiased resize does the rest (PIL's ``reducing_gap``). Large photos
# decode ~2x faster (a 12 MP JPEG at 1/4 scale); smaller ones are decoded exactly as by ``pil``.
REDUCING_GAP = 2


def _torchvision_jpeg_into(data: bytes, pre: Preprocessing, out: torch.Tensor, max_pixels: int) -> tuple[int, int]:
    """JPEG through torchvision.io (libjpeg-turbo, EXIF orientation applied) and an antialiased
    uint8 resize on the tensor: 1.9x faster than PIL per 500x375 JPEG on this CPU, pixels within
    one level of PIL's (docs/benchmarks.md, "Decoders")."""
    import torchvision.transforms.v2.functional as F2
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        with Image.open(io.BytesIO(data)) as probe:  # header only: the bomb check before decoding
            w, h = probe.size
    except Image.DecompressionBombError as e:  # PIL refuses the header itself past 2x its own limit
        raise DecodeError(f"decompression bomb: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise DecodeError(f"cannot decode: {e}") from None
    if w * h > max_pixels:
        raise DecodeError(f"decompression bomb: {w}x{h} exceeds {max_pixels} pixels")
    try:
        t = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                        apply_exif_orientation=True)
    except RuntimeError as e:
        raise DecodeError(f"cannot decode: {str(e).splitlines()[-1][:200]}") from None
    height, width = int(t.shape[-2]), int(t.shape[-1])
    check_resize(width, height, pre.resize_size, max_pixels)
    t = F2.resize(t, pre.resize_arg, interpolation=pre.interpolation_mode, antialias=pre.antialias)
    out.copy_(F2.center_crop(t, [pre.crop_size]))
    return width, height


def decode_cpu_into(data: bytes, pre: Preprocessing, out: torch.Tensor, max_pixels: int, decoder: str) -> ImageMeta:
    """One image on the CPU with a named CPU decoder (``pil``, ``pil-draft``, ``pil-reduce``,
    ``torchvision``; a non-JPEG through PIL whatever the name)."""
    if decoder == "torchvision" and data[:3] == b"\xff\xd8\xff":
        width, height = _torchvision_jpeg_into(data, pre, out, max_pixels)
        return ImageMeta(width, height, hashlib.blake2b(data, digest_size=16).hexdigest())
    draft = {"pil-draft": pre.resize_size, "pil-reduce": pre.resize_size * REDUCING_GAP}.get(decoder)
    img, (width, height) = load_rgb_sized(data, max_pixels, draft_size=draft)
    try:
        out.copy_(preprocess(img, pre, max_pixels))  # checks the resize target before resizing
    except DecodeError:
        raise
    except (OSError, ValueError, MemoryError, RuntimeError) as e:  # one bad image never ends a run
        raise DecodeError(f"cannot resize: {type(e).__name__}: {e}") from None
    return ImageMeta(width, height, hashlib.blake2b(data, digest_size=16).hexdigest())

"""JPEGs decoded on the GPU (nvJPEG, through ``torchvision.io.decode_jpeg(..., device="cuda")``),
resized and cropped there: the ``nvjpeg`` decoder.

Decode threads each take a chunk of a batch: read and hash the files, check their headers (size,
EXIF orientation, the bomb and aspect checks), decode the chunk's JPEGs in one nvJPEG call on the
thread's own CUDA stream, apply the EXIF orientation (torchvision applies it on CPU only), resize
with antialiasing and centre-crop straight into the batch on the device. nvJPEG's Huffman stage
runs on the calling CPU thread, which is why the decoding is spread over threads rather than done
in one call per batch (measured: one call per batch on the model's thread, 1,488 img/s on an H200,
against 3,363 for CPU decoding in processes). Files that are not RGB/greyscale JPEGs, and any JPEG
nvJPEG refuses, are decoded on the CPU instead (``pil``), so no image is lost to the GPU path.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, cast

import torch
from PIL import Image

from embedder.decode.common import DEFAULT_MAX_PIXELS, ImageMeta, check_resize, read_bytes
from embedder.decode.cpu import decode_cpu_into
from embedder.errors import DecodeError
from embedder.io.limits import MAX_IMAGE_BYTES
from embedder.models.preprocessing import Preprocessing

JPEG_MAGIC = b"\xff\xd8\xff"
_local = threading.local()
_ORIENTATION_TAG = 0x0112


@dataclass(frozen=True)
class Encoded:
    """A JPEG's bytes, ready for the GPU, with what its header said."""

    data: bytes
    orientation: int  # EXIF orientation, 1..8 (1: as stored)
    meta: ImageMeta


def encode_header(data: bytes, pre: Preprocessing, max_pixels: int) -> Encoded | None:
    """Header checks of a JPEG for the GPU path; None when the CPU should decode it instead."""
    if data[:3] != JPEG_MAGIC:
        return None
    try:
        with Image.open(io.BytesIO(data)) as probe:
            if probe.mode not in ("RGB", "L"):  # CMYK, YCCK: nvJPEG's RGB output is not defined there
                return None
            w, h = probe.size
            orientation = int(probe.getexif().get(_ORIENTATION_TAG, 1) or 1)
    except Exception:  # noqa: BLE001 - a header PIL cannot read: the CPU decoder names the reason
        return None
    if w * h > max_pixels:
        raise DecodeError(f"decompression bomb: {w}x{h} exceeds {max_pixels} pixels")
    if orientation not in range(1, 9):
        orientation = 1
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    check_resize(w, h, pre.resize_size, max_pixels)
    return Encoded(data, orientation, ImageMeta(w, h, hashlib.blake2b(data, digest_size=16).hexdigest()))


def orient(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply EXIF orientation to [C,H,W] exactly as PIL's ``ImageOps.exif_transpose``."""
    if orientation == 2:
        return img.flip(-1)
    if orientation == 3:
        return img.flip(-1).flip(-2)
    if orientation == 4:
        return img.flip(-2)
    if orientation == 5:
        return img.transpose(-1, -2)
    if orientation == 6:
        return torch.rot90(img, -1, (-2, -1))
    if orientation == 7:
        return torch.rot90(img.transpose(-1, -2), 2, (-2, -1))
    if orientation == 8:
        return torch.rot90(img, 1, (-2, -1))
    return img


def resize_crop(img: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    """uint8 [3,H,W] (any device) → [3, crop, crop]: the preset's resize and centre crop on tensors."""
    import torchvision.transforms.v2.functional as F2

    img = F2.resize(img, pre.resize_arg, interpolation=pre.interpolation_mode, antialias=pre.antialias)
    return F2.center_crop(img, [pre.crop_size])


def decode_one(data: bytes, pre: Preprocessing, out: torch.Tensor, max_pixels: int) -> ImageMeta | None:
    """One image through nvJPEG into ``out`` (host or device); None when it must go to the CPU."""
    encoded = encode_header(data, pre, max_pixels)
    if encoded is None:
        return None
    try:
        img = _nvjpeg([data], torch.device("cuda"))[0]
    except RuntimeError:
        return None
    out.copy_(resize_crop(orient(img, encoded.orientation), pre))
    return encoded.meta


def _nvjpeg(data: Sequence[bytes], device: torch.device) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
    out = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
    return list(out) if isinstance(out, list) else [out]


def _stream(device: torch.device) -> Any:
    """This thread's own CUDA stream (decode threads work side by side, not on the model's stream)."""
    stream = getattr(_local, "stream", None)
    if stream is None:
        stream = _local.stream = torch.cuda.Stream(device)
    return stream


def decode_chunk(paths: Sequence[str], start: int, host_rows: torch.Tensor, target: torch.Tensor,
                 ready: Any, pre: Preprocessing, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_bytes: int = MAX_IMAGE_BYTES) -> list[ImageMeta | str]:
    """In a decode thread: rows ``start..`` of ``target`` (a batch on the GPU) from PATHS.

    JPEGs go through one nvJPEG call for the chunk (its CPU stage runs in this thread, so threads
    decode side by side), then EXIF orientation, resize and crop on the GPU, grouped by size so
    that a chunk of equal-sized photos is one resize; anything else, and any JPEG nvJPEG refuses,
    is decoded on the CPU into ``host_rows`` and copied up. The work runs on this thread's stream
    after ``ready`` (recorded on the model's stream when ``target`` was allocated), and is complete
    when this returns.
    """
    device = target.device
    outcomes: list[ImageMeta | str] = ["not decoded"] * len(paths)
    on_cpu: list[int] = []  # chunk positions decoded into host_rows
    encoded: list[tuple[int, Encoded]] = []
    for i, path in enumerate(paths):
        try:
            data = read_bytes(path, max_bytes)
            enc = encode_header(data, pre, max_pixels)
            if enc is None:
                outcomes[i] = decode_cpu_into(data, pre, host_rows[start + i], max_pixels, "pil")
                on_cpu.append(i)
            else:
                encoded.append((i, enc))
        except DecodeError as err:
            outcomes[i] = str(err)
    cuda = device.type == "cuda"
    with torch.cuda.stream(_stream(device)) if cuda else nullcontext():
        if cuda and ready is not None:
            torch.cuda.current_stream(device).wait_event(ready)
        images = _decode_all([e.data for _, e in encoded], device)
        groups: dict[tuple[int, int, int], list[int]] = {}
        for k, ((i, e), img) in enumerate(zip(encoded, images)):
            if img is None:  # refused by nvJPEG: the CPU decoder decides
                try:
                    outcomes[i] = decode_cpu_into(e.data, pre, host_rows[start + i], max_pixels, "pil")
                    on_cpu.append(i)
                except DecodeError as err:
                    outcomes[i] = str(err)
                continue
            groups.setdefault((int(img.shape[-2]), int(img.shape[-1]), e.orientation), []).append(k)
            outcomes[i] = e.meta
        for (_, _, orientation), ks in groups.items():
            stacked = torch.stack([cast(torch.Tensor, images[k]) for k in ks])
            rows = torch.tensor([start + encoded[k][0] for k in ks], device=device)
            target[rows] = resize_crop(orient(stacked, orientation), pre)
        if on_cpu:
            rows_cpu = [start + i for i in on_cpu]
            target[torch.tensor(rows_cpu, device=device)] = host_rows[rows_cpu].to(device)
        if cuda:
            torch.cuda.current_stream(device).synchronize()
    return outcomes


def _decode_all(data: Sequence[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """One nvJPEG call for the chunk; a bad file fails the whole call, so then one by one."""
    if not data:
        return []
    try:
        return list(_nvjpeg(data, device))
    except RuntimeError:
        out: list[torch.Tensor | None] = []
        for d in data:
            try:
                out.append(_nvjpeg([d], device)[0])
            except RuntimeError:
                out.append(None)
        return out

"""The decoders by name, the device a parameter: ``pil`` (bit-identical to the weights' transforms),
``pil-draft``, ``pil-reduce`` and ``torchvision`` (libjpeg-turbo) on the CPU, ``nvjpeg`` on a GPU."""

from __future__ import annotations

import torch

from embedder.choices import DECODERS
from embedder.decode.common import DEFAULT_MAX_PIXELS, Decoded, ImageMeta, read_bytes
from embedder.decode.cpu import decode_cpu_into
from embedder.errors import DecodeError
from embedder.io.limits import MAX_IMAGE_BYTES
from embedder.models.preprocessing import Preprocessing

# ``--decoder auto``: the fastest decoder measured to give the default's vectors. torchvision:
# pixels within one level of PIL's, cosine to PIL's vectors >= 0.99999 on real photos, the same
# probe accuracy, 1.9x faster per JPEG on a CPU (docs/benchmarks.md, "Decoders"). Not nvjpeg: its
# vectors move further (worst cosine 0.9991, digits probe 0.963 against 0.974).
AUTO_DECODER = "torchvision"


def resolve_decoder(decoder: str) -> str:
    """The decoder ``auto`` stands for; any other name as it is (checked where it is used)."""
    return AUTO_DECODER if decoder == "auto" else decoder


def _check_decoder(decoder: str) -> None:
    if decoder not in DECODERS:
        raise DecodeError(f"unknown decoder {decoder!r}; valid: {', '.join(DECODERS)}")


def decode_into(
    path: str, pre: Preprocessing, out: torch.Tensor, max_pixels: int = DEFAULT_MAX_PIXELS, decoder: str = "pil",
    max_bytes: int = MAX_IMAGE_BYTES,
) -> ImageMeta:
    """Decode PATH and write its uint8 [3, crop, crop] pixels into ``out`` (a row of a reused
    batch buffer). Decoders: ``pil`` (bit-identical to ``weights.transforms()``, the default),
    ``pil-draft`` (JPEG DCT-domain downscale first, down to the resize target), ``pil-reduce`` (the
    same, stopping at twice the target: large photos only, pixels near ``pil``'s), ``torchvision``
    (JPEGs through torchvision.io; other formats through PIL), ``nvjpeg`` (JPEGs on the GPU: batched
    by the pipeline, see ``decode.nvjpeg``; one by one here)."""
    return decode_data_into(read_bytes(path, max_bytes), pre, out, max_pixels, decoder)


def decode_data_into(
    data: bytes, pre: Preprocessing, out: torch.Tensor, max_pixels: int = DEFAULT_MAX_PIXELS, decoder: str = "pil"
) -> ImageMeta:
    """``decode_into`` for bytes already in memory (uploads)."""
    _check_decoder(decoder)
    if decoder == "nvjpeg":
        # one image at a time (queries, uploads): on the GPU when there is one; without one, the
        # torchvision decoder (libjpeg-turbo, the same tensor resize) is the nearest CPU decoder
        if torch.cuda.is_available():
            from embedder.decode.nvjpeg import decode_one

            meta = decode_one(data, pre, out, max_pixels)
            if meta is not None:
                return meta
        decoder = "torchvision"
    return decode_cpu_into(data, pre, out, max_pixels, decoder)


def decode_bytes(data: bytes, pre: Preprocessing, max_pixels: int = DEFAULT_MAX_PIXELS,
                 decoder: str = "pil") -> torch.Tensor:
    """An uploaded image's bytes → uint8 [3, crop, crop], exactly as extraction decodes files."""
    pixels = torch.empty(3, pre.crop_size, pre.crop_size, dtype=torch.uint8)
    decode_data_into(data, pre, pixels, max_pixels, decoder)
    return pixels


def decode_file(
    path: str, pre: Preprocessing, max_pixels: int = DEFAULT_MAX_PIXELS, decoder: str = "pil",
    max_bytes: int = MAX_IMAGE_BYTES,
) -> Decoded:
    pixels = torch.empty(3, pre.crop_size, pre.crop_size, dtype=torch.uint8)
    meta = decode_into(path, pre, pixels, max_pixels, decoder, max_bytes)
    return Decoded(pixels, meta.width, meta.height, meta.file_hash)


def normalize_batch(x: torch.Tensor, pre: Preprocessing, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [N,3,H,W] → normalised float, on whatever device x lives."""
    mean = torch.tensor(pre.mean, device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x.float() / 255.0 - mean) / std).to(dtype)

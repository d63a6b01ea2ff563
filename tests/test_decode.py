"""The bad-input zoo and the conversions that must not reject valid images."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import models

from embedder.backbones import get_backbone
from embedder.decode import decode_file, load_rgb, normalize_batch, preprocess
from embedder.errors import DecodeError


def _bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _rgb(w: int = 64, h: int = 48) -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("data,reason", [
    (b"", "empty file"),
    (b"this is not an image at all", "not an image"),
    (_bytes(_rgb(), "JPEG")[:300], "cannot decode"),
    (_bytes(_rgb(), "PNG")[:120], "cannot decode"),
])
def test_broken_files_raise_decode_error(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        load_rgb(data)


def test_decompression_bomb_is_refused_before_decoding() -> None:
    with pytest.raises(DecodeError, match="decompression bomb"):
        load_rgb(_bytes(_rgb(200, 200), "PNG"), max_pixels=10_000)


def test_unreadable_path(tmp_path: Path) -> None:
    pre = get_backbone("tiny_test").preprocessing()
    with pytest.raises(DecodeError, match="cannot read"):
        decode_file(str(tmp_path / "missing.jpg"), pre)


def test_cmyk_grayscale_palette_become_rgb() -> None:
    for img in (_rgb().convert("CMYK"), _rgb().convert("L"), _rgb().convert("P"), _rgb().convert("1")):
        fmt = "JPEG" if img.mode in ("CMYK", "L") else "PNG"
        out = load_rgb(_bytes(img, fmt))
        assert out.mode == "RGB" and out.size == (64, 48)


def test_rgba_composites_on_white_not_black() -> None:
    img = Image.new("RGBA", (10, 10), (0, 0, 0, 0))  # fully transparent black
    out = np.asarray(load_rgb(_bytes(img, "PNG")))
    assert (out == 255).all()
    half = Image.new("RGBA", (10, 10), (0, 0, 0, 128))
    px = np.asarray(load_rgb(_bytes(half, "PNG")))[0, 0]
    assert 120 <= px[0] <= 135


def test_palette_with_transparency() -> None:
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 0] + [255, 0, 0] * 255)
    data = _bytes(img, "PNG", transparency=0)
    assert (np.asarray(load_rgb(data)) == 255).all()


def test_16bit_grayscale_is_scaled_not_clipped() -> None:
    arr = np.full((8, 8), 32768, dtype=np.uint16)  # mid-grey in 16 bit
    img = Image.fromarray(arr)
    out = np.asarray(load_rgb(_bytes(img, "PNG")))
    assert 125 <= out[0, 0, 0] <= 130, out[0, 0]


def test_animated_gif_takes_first_frame() -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    px = np.asarray(load_rgb(buf.getvalue()))[0, 0]
    assert px[0] > 200 and px[2] < 50


def test_exif_orientation_is_applied() -> None:
    img = Image.new("RGB", (60, 30), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° CW on display
    out = load_rgb(_bytes(img, "JPEG", exif=exif.tobytes()))
    assert out.size == (30, 60)


@pytest.mark.parametrize("name,tag", [("resnet50", None), ("efficientnet_b3", None),
                                      ("mobilenet_v2", "IMAGENET1K_V1"), ("vit_b_16", None)])
def test_preprocessing_is_bit_identical_to_weights_transforms(name: str, tag: str | None) -> None:
    backbone = get_backbone(name)
    pre = backbone.preprocessing(tag)
    img = _rgb(333, 250)
    ours = normalize_batch(preprocess(img, pre)[None], pre)
    theirs = backbone.torchvision_weights(tag).transforms()(img)[None]
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_preset_names_match_torchvision() -> None:
    assert get_backbone("resnet50").torchvision_weights() is models.ResNet50_Weights.IMAGENET1K_V2

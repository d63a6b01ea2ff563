"""The fine-tuning training transform: crop_scale 1.0 means no random crop (the evaluation geometry)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from embedder.learn.finetune.data import eval_transform, train_transform
from embedder.models.preprocessing import Preprocessing

PRE = Preprocessing(resize_size=40, crop_size=32, interpolation="bilinear",
                    mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def _image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))  # not square: a real crop


def test_crop_scale_one_is_deterministic_and_the_evaluation_geometry() -> None:
    img = _image()
    t = train_transform(PRE, flip=False, crop_scale=1.0)
    torch.manual_seed(0)
    a = t(img)
    torch.manual_seed(1)
    b = t(img)
    assert a.shape == (3, 32, 32) and a.dtype == torch.uint8
    assert torch.equal(a, b)
    assert torch.equal(a, eval_transform(PRE)(img))


def test_crop_scale_one_with_flip_is_the_evaluation_image_or_its_mirror() -> None:
    img = _image()
    ref = eval_transform(PRE)(img)
    t = train_transform(PRE, flip=True, crop_scale=1.0)
    seen = set()
    for seed in range(16):
        torch.manual_seed(seed)
        out = t(img)
        assert torch.equal(out, ref) or torch.equal(out, ref.flip(-1))
        seen.add(torch.equal(out, ref))
    assert seen == {True, False}


def test_smaller_crop_scale_stays_random() -> None:
    img = _image()
    t = train_transform(PRE, flip=False, crop_scale=0.3)
    outs = []
    for seed in range(4):
        torch.manual_seed(seed)
        outs.append(t(img))
    assert all(o.shape == (3, 32, 32) for o in outs)
    assert any(not torch.equal(outs[0], o) for o in outs[1:])

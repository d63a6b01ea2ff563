from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision import models

from embedder.backbones import REGISTRY, build_on_meta, get_backbone, parse_backbone_spec
from embedder.errors import UnknownBackbone
from embedder.model import _set_module, drop_aux_head

TORCHVISION = [b for b in REGISTRY.values() if b.is_torchvision]


@pytest.mark.parametrize("entry", REGISTRY.values(), ids=lambda b: b.name)
def test_every_entry_dim_matches_a_forward_pass(entry) -> None:
    net = build_on_meta(entry)
    head = net.get_submodule(entry.head)
    assert isinstance(head, nn.Linear), f"{entry.head} must be the classification Linear"
    assert head.in_features == entry.dim
    _set_module(net, entry.head, nn.Identity())
    net.eval()
    drop_aux_head(net)
    pre = entry.preprocessing()
    out = net(torch.zeros(2, 3, pre.crop_size, pre.crop_size, device="meta"))
    assert tuple(out.shape) == (2, entry.dim)
    assert entry.feature_map in dict(net.named_modules())


@pytest.mark.parametrize("entry", TORCHVISION, ids=lambda b: b.name)
def test_preprocessing_and_meta_come_from_torchvision_weights(entry) -> None:
    w = entry.torchvision_weights()
    t = w.transforms()
    pre = entry.preprocessing()
    assert pre.crop_size == t.crop_size[0] and pre.resize_size == t.resize_size[0]
    assert list(pre.mean) == list(t.mean) and list(pre.std) == list(t.std)
    assert pre.interpolation == t.interpolation.value
    meta = entry.meta()
    assert meta["acc1"] > 50 and meta["gflops"] > 0
    assert meta["file"].endswith(".pth")
    assert entry.name in models.list_models(module=models)


def test_registry_covers_the_families_users_ask_for() -> None:
    wanted = {"resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "vgg16", "vgg19_bn",
              "efficientnet_b0", "efficientnet_b7", "efficientnet_v2_s", "efficientnet_v2_l",
              "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "convnext_tiny",
              "convnext_large", "regnet_y_400mf", "densenet121", "inception_v3", "vit_b_16"}
    assert wanted <= set(REGISTRY)
    assert all(REGISTRY[n].name == n for n in REGISTRY)


def test_unknown_backbone_lists_valid_names() -> None:
    with pytest.raises(UnknownBackbone) as e:
        get_backbone("resnt50")
    assert "resnet50" in str(e.value) and "Valid:" in str(e.value)


def test_weights_tag_in_spec() -> None:
    b, tag = parse_backbone_spec("mobilenet_v2:IMAGENET1K_V1")
    assert b.name == "mobilenet_v2" and tag == "IMAGENET1K_V1"
    assert b.preprocessing(tag).resize_size == 256  # V1 preset differs from DEFAULT (V2: 232)
    with pytest.raises(UnknownBackbone, match="valid tags: IMAGENET1K_V1, IMAGENET1K_V2"):
        parse_backbone_spec("mobilenet_v2:NOPE")
    with pytest.raises(UnknownBackbone, match="valid tags: SEED0"):
        parse_backbone_spec("tiny_test:V9")

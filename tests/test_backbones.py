from __future__ import annotations

import pytest
import torch
from torch import nn

from embedder.errors import UnknownBackbone
from embedder.models.builder import drop_aux_head
from embedder.models.features import set_module
from embedder.models.layers import build_on_meta
from embedder.models.registry import REGISTRY, get_backbone, parse_backbone_spec

TORCHVISION = [b for b in REGISTRY.values() if b.is_torchvision]


@pytest.mark.parametrize("entry", REGISTRY.values(), ids=lambda b: b.name)
def test_every_entry_dim_matches_a_forward_pass(entry) -> None:
    net = build_on_meta(entry)
    head = net.get_submodule(entry.head)
    assert isinstance(head, nn.Linear), f"{entry.head} must be the classification Linear"
    assert head.in_features == entry.dim
    set_module(net, entry.head, nn.Identity())
    net.eval()
    drop_aux_head(net)
    pre = entry.preprocessing()
    out = net(torch.zeros(2, 3, pre.crop_size, pre.crop_size, device="meta"))
    assert tuple(out.shape) == (2, entry.dim)
    assert entry.feature_map in dict(net.named_modules())


# Published preprocessing of torchvision's weights (their model cards), independent of our parsing.
KNOWN_PRESETS = {
    ("resnet18", None): (256, 224, "bilinear"), ("resnet50", None): (232, 224, "bilinear"),
    ("mobilenet_v2", "IMAGENET1K_V1"): (256, 224, "bilinear"), ("efficientnet_b3", None): (320, 300, "bicubic"),
    ("efficientnet_v2_s", None): (384, 384, "bilinear"), ("inception_v3", None): (342, 299, "bilinear"),
    ("swin_t", None): (232, 224, "bicubic"), ("convnext_tiny", None): (236, 224, "bilinear"),
    ("vit_b_16", None): (256, 224, "bilinear"),
}


@pytest.mark.parametrize("key", KNOWN_PRESETS, ids=lambda k: k[0])
def test_preprocessing_matches_the_published_presets(key) -> None:
    name, tag = key
    pre = get_backbone(name).preprocessing(tag)
    assert (pre.resize_size, pre.crop_size, pre.interpolation) == KNOWN_PRESETS[key]
    assert pre.mean == (0.485, 0.456, 0.406) and pre.std == (0.229, 0.224, 0.225)


def _official_format(entry, state: dict) -> dict:
    """A state dict keyed the way the official file is: DenseNet's predate today's module names."""
    import re

    if entry.family != "densenet":
        return state
    legacy = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))([12])\.(weight|bias|running_mean|running_var)$")
    out = type(state)((legacy.sub(r"\1.\2.\3", k), v) for k, v in state.items())
    out._metadata = state._metadata
    return out


@pytest.mark.parametrize("entry", TORCHVISION, ids=lambda b: b.name)
def test_official_weights_fit_every_architecture(entry) -> None:
    """Without downloading: the architecture we build has exactly the parameter count of its
    official weights (torchvision's meta), and a state dict keyed like the official file (DenseNet's
    legacy names, Inception's auxiliary head, MNASNet's version metadata) loads through our loader."""
    from embedder.models.weights import apply_weights

    net = build_on_meta(entry)
    n_params = sum(p.numel() for p in net.parameters())
    assert n_params == entry.torchvision_weights().meta["num_params"] == entry.meta()["params"]
    state = _official_format(entry, net.state_dict())
    if entry.family == "densenet":
        assert any(".norm.1." in k for k in state)  # the legacy names are really exercised
    target = build_on_meta(entry)
    apply_weights(target, state, entry)  # raises WeightsMismatch on any missing/unexpected/mis-shaped key


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


@pytest.mark.parametrize("entry", REGISTRY.values(), ids=lambda b: b.name)
def test_layer_taps_are_truncated_graphs(entry) -> None:
    """Cutting at the last feature map is torchvision's feature extractor (nothing computed past
    it), not the forward-hook fallback, and gives what a hook on that module sees."""
    from embedder.models.features import _FirstOutput, _HookTap, truncate_at

    net = build_on_meta(entry).eval()
    drop_aux_head(net)
    pre = entry.preprocessing()
    x = torch.zeros(2, 3, pre.crop_size, pre.crop_size, device="meta")
    cut = truncate_at(net, entry.feature_map)
    assert isinstance(cut, _FirstOutput), f"{entry.name} fell back to the hook"
    assert tuple(cut(x).shape) == tuple(_HookTap(net, entry.feature_map)(x).shape)


def test_layer_taps_fold_batchnorm_and_keep_the_function() -> None:
    """A tapped layer runs with BatchNorm folded into its convolutions, as the full model does
    (the wrapper around torchvision's extractor once failed to fold: 30 % slower), and computes
    what the unfused network computes."""
    from torch import nn

    from embedder.models.builder import ModelSpec
    from embedder.models.features import _HookTap, load_model
    from embedder.models.tiny import tiny

    loaded = load_model(ModelSpec("tiny_test", None, None, "stage1"))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in loaded.model.modules())
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        ref = _HookTap(tiny().eval(), "stage1")(x).mean((2, 3))
        assert torch.allclose(loaded.model(x), ref, atol=1e-5)

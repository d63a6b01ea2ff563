"""Model families at their edges: timm models with two classifier heads (distilled DeiT, LeViT) give timm's
own features; --image-size on a fixed-size ViT gives timm's own vectors at that size (position
embeddings resampled), or a one-line refusal where the architecture cannot take it; a CLIP model cut
at --layer records no text tower and zero-shot on it is refused in one line. Random weights of real
architectures (no model hub here); the CLIP model is a one-block ViT registered as an OpenCLIP config."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from embedder.cli import app
from embedder.io.uri import image_id
from embedder.models.origin import WeightsRef
from embedder.models.preprocessing import Preprocessing
from embedder.store.provenance import Provenance
from embedder.store.shards import Store
from tests.conftest import make_images
from tests.test_timm import timms_own_features


def _cli(*args: str) -> str:
    r = CliRunner().invoke(app, list(args))
    assert r.exit_code == 0, r.output
    return r.output


def _fails(*args: str) -> str:
    r = CliRunner().invoke(app, list(args))
    assert r.exit_code == 2 and "Traceback" not in r.output, (r.exit_code, r.output)
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert len(lines) <= 3, r.output  # one message (rich may wrap it)
    return " ".join(r.output.split())


def _stored(out: Path) -> dict[str, np.ndarray]:
    t = Store.open(out).read(["id", "embedding"])
    return dict(zip(t.column("id").to_pylist(), np.stack(t.column("embedding").to_numpy(zero_copy_only=False))))


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))  # type: ignore[no-any-return]


# ---- timm ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["deit_tiny_distilled_patch16_224", "levit_128s"])
def test_two_classifier_heads_give_timms_own_features(arch: str, tmp_path: Path) -> None:
    """timm's config names two classifiers (``head``, ``head_dist``; LeViT's are a BatchNorm and a
    Linear each): the file's four or eight tensors are left out, the rest loaded strictly, and the
    vector is timm's own pre-logits (the mean of the class and distillation tokens)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False)  # random weights, both heads on, as a hub file is
    wfile = tmp_path / f"{arch}.pth"
    torch.save(model.state_dict(), wfile)
    files = sorted(make_images(tmp_path / "imgs", {"a": 2}, size=(96, 80), seed=1))
    out = tmp_path / "store"
    _cli("extract", str(tmp_path / "imgs"), "--out", str(out), "--backbone", f"timm:{arch}", "--weights",
         str(wfile), "--json")
    want = timms_own_features(model, files)
    stored = _stored(out)
    got = np.stack([stored[image_id(f)] for f in files])
    assert got.shape == want.shape and _cos(got, want).min() >= 0.9999


def test_a_classifiers_norm_outside_it_still_loads() -> None:
    """ConvNeXt's classifier is ``head.fc``: ``head.norm`` beside it is part of the features and loads
    from the file (only the classifier's tensors are left out, never its parent's)."""
    timm = pytest.importorskip("timm")
    from embedder.models.registry import get_backbone
    from embedder.models.weights import apply_weights, classifier_modules

    torch.manual_seed(4)
    state = timm.create_model("convnext_atto", pretrained=False).state_dict()
    entry = get_backbone("timm:convnext_atto")
    net = entry.build_architecture()
    assert classifier_modules(net, entry.classifiers) == ("head.fc",)
    apply_weights(net, state, entry)
    assert torch.equal(net.state_dict()["head.norm.weight"], state["head.norm.weight"])
    levit = get_backbone("timm:levit_128s")
    assert levit.classifiers == ("head.linear", "head_dist.linear")
    assert classifier_modules(levit.build_architecture(), levit.classifiers) == ("head", "head_dist")
    # a head the headless build has no trace of (VOLO's aux_head is None with num_classes=0): its
    # tensors in a full file are the classifier's, left out like the others, not "unexpected"
    volo = get_backbone("timm:volo_d1_224")
    full = timm.create_model("volo_d1_224", pretrained=False).state_dict()
    assert any(k.startswith("aux_head.") for k in full)
    apply_weights(volo.build_architecture(), full, volo)


def test_image_size_on_a_fixed_size_vit_is_timms_img_size(tmp_path: Path) -> None:
    """--image-size 160 on a 224-px ViT: the vectors are timm's own model made with ``img_size=160``,
    its position embeddings resampled from the file by timm's own checkpoint filter."""
    timm = pytest.importorskip("timm")
    from timm.models.vision_transformer import checkpoint_filter_fn

    torch.manual_seed(3)
    arch = "vit_tiny_patch16_224"
    model = timm.create_model(arch, pretrained=False)
    wfile = tmp_path / "vit.pth"
    torch.save(model.state_dict(), wfile)
    files = sorted(make_images(tmp_path / "imgs", {"a": 2}, size=(200, 180), seed=2))
    out = tmp_path / "store"
    _cli("extract", str(tmp_path / "imgs"), "--out", str(out), "--backbone", f"timm:{arch}", "--weights",
         str(wfile), "--image-size", "160", "--json")
    assert Store.open(out).provenance.preprocessing.crop_size == 160
    theirs = timm.create_model(arch, pretrained=False, img_size=160, num_classes=0)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    theirs.load_state_dict(checkpoint_filter_fn(state, theirs))
    theirs.eval()
    pre = Store.open(out).provenance.preprocessing
    cfg = {**timm.data.resolve_model_data_config(model), "input_size": (3, 160, 160),
           "crop_pct": 160 / pre.resize_size}
    transform = timm.data.create_transform(**cfg, is_training=False)
    with torch.inference_mode():
        want = theirs(torch.stack([transform(Image.open(f).convert("RGB")) for f in files])).numpy()
    stored = _stored(out)
    got = np.stack([stored[image_id(f)] for f in files])
    assert got.shape == (2, 192) and _cos(got, want).min() >= 0.9999


def test_image_size_a_model_cannot_take_is_a_one_line_refusal(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    wfile = tmp_path / "levit.pth"
    torch.save(timm.create_model("levit_128s", pretrained=False).state_dict(), wfile)
    make_images(tmp_path / "imgs", {"a": 1}, size=(64, 64))
    msg = _fails("extract", str(tmp_path / "imgs"), "--out", str(tmp_path / "s"), "--backbone", "timm:levit_128s",
                 "--weights", str(wfile), "--image-size", "160")
    assert "does not take 160x160 images" in msg and "drop --image-size" in msg


# ---- a CLIP model cut at --layer ------------------------------------------------------------------
TINY_CLIP = "embedder-test-tiny-clip"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-block ViT CLIP, registered as an OpenCLIP model config, its random weights in a file."""
    open_clip = pytest.importorskip("open_clip")
    root = tmp_path_factory.mktemp("tinyclip")
    cfg = {"embed_dim": 32,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (root / f"{TINY_CLIP}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(root / f"{TINY_CLIP}.json")
    torch.manual_seed(0)
    wfile = root / "tiny_clip.pth"
    torch.save(open_clip.create_model(TINY_CLIP, pretrained=None).state_dict(), wfile)
    return wfile


def test_zero_shot_on_a_layer_store_is_refused(tiny_clip: Path, tmp_path: Path) -> None:
    """The text tower shares the space of the model's image embedding only: a store cut at an inner
    block records none, and zero-shot on it is a one-line refusal (it was 0.5 on a 512-d stage, or a
    matmul error); the same model's own embedding still gets its zero-shot accuracy."""
    make_images(tmp_path / "imgs", {"cat": 2, "dog": 2}, size=(48, 40), seed=3)
    w = ["--backbone", f"open_clip:{TINY_CLIP}", "--weights", str(tiny_clip)]
    layer = "clip.visual.transformer.resblocks.0"
    _cli("extract", str(tmp_path / "imgs"), "--out", str(tmp_path / "layer"), "--layer", layer, "--json", *w)
    prov = Store.open(tmp_path / "layer").provenance
    assert prov.layer == layer and prov.text is None and not prov.has_text
    msg = _fails("probe", str(tmp_path / "layer"), "--zero-shot-only", "--weights", str(tiny_clip))
    assert "not the model's image embedding" in msg and layer in msg
    out = _cli("probe", str(tmp_path / "layer"), "--out", str(tmp_path / "p.json"), "--json")
    assert "zero_shot" not in json.loads(out)  # the probe itself is unchanged
    _cli("extract", str(tmp_path / "imgs"), "--out", str(tmp_path / "own"), "--json", *w)
    assert Store.open(tmp_path / "own").provenance.has_text
    zs = json.loads(_cli("probe", str(tmp_path / "own"), "--zero-shot-only", "--json", "--weights", str(tiny_clip)))
    assert zs["zero_shot"]["n"] == 4


def test_zero_shot_without_the_weights_file_or_with_numeric_classes_is_skipped_not_wrong(
        tiny_clip: Path, tmp_path: Path) -> None:
    """A store made with --weights FILE: `probe` runs without the file and says zero-shot was skipped
    (it refused to run at all); classes that are numbers (a WebDataset's .cls) get no zero-shot accuracy
    of "a photo of a 0." printed beside the probe — unless --class-names gives words; the Python API's
    zero_shot, Embedder.zero_shot, unit-length embed_text and Probe.load agree."""
    import shutil

    import embedder

    make_images(tmp_path / "imgs", {"0": 3, "1": 3}, size=(48, 40), seed=4)
    mine = tmp_path / "w.pth"
    shutil.copy(tiny_clip, mine)
    w = ["--backbone", f"open_clip:{TINY_CLIP}", "--weights", str(mine)]
    _cli("extract", str(tmp_path / "imgs"), "--out", str(tmp_path / "s"), "--json", *w)
    # the store remembers where its weights file is: no --weights needed while it is there, unchanged
    r = json.loads(_cli("probe", str(tmp_path / "s"), "--out", str(tmp_path / "p"), "--json"))
    assert "numbers" in r["zero_shot"]["skipped"] and "--class-names" in r["zero_shot"]["skipped"]
    index = embedder.build_index(tmp_path / "s", "n", home=tmp_path / "h", kind="flat", text_recall=False)
    query = sorted((tmp_path / "imgs" / "0").iterdir())[0]
    assert index.search(str(query), k=1)[0][0].path == str(query)
    moved = tmp_path / "moved.pth"
    mine.rename(moved)  # gone from where extract read it: never guessed, and the way out is named
    r = json.loads(_cli("probe", str(tmp_path / "s"), "--out", str(tmp_path / "p"), "--json"))
    assert "weights file" in r["zero_shot"]["skipped"] and r["n_train"] == 6
    assert "--weights FILE" in _fails("search", "n", str(query), "--home", str(tmp_path / "h"))
    from fastapi.testclient import TestClient

    from embedder.service.app import create_app
    from embedder.service.options import ServeOptions

    for files, served in (((), False), ((str(moved),), True)):  # `serve --weights FILE`: matched by SHA-256
        with TestClient(create_app(ServeOptions(home=str(tmp_path / "h"), weight_files=files, poll_seconds=0))) as c:
            for _ in range(600):
                if c.get("/readyz").status_code == 200:
                    break
                time.sleep(0.05)
            assert c.get("/indexes/n").json()["image_queries"] is served
    r = json.loads(_cli("probe", str(tmp_path / "s"), "--out", str(tmp_path / "p"), "--json", "--weights",
                        str(moved)))
    assert "numbers" in r["zero_shot"]["skipped"] and "--class-names" in r["zero_shot"]["skipped"]
    msg = _fails("probe", str(tmp_path / "s"), "--zero-shot-only", "--weights", str(moved))
    assert "class names as words" in msg
    (tmp_path / "names.txt").write_text("cat\ndog\n")
    zs = json.loads(_cli("probe", str(tmp_path / "s"), "--zero-shot-only", "--json", "--weights", str(moved),
                         "--class-names", str(tmp_path / "names.txt")))["zero_shot"]
    api_zs = embedder.zero_shot(tmp_path / "s", weights=moved, class_names={"0": "cat", "1": "dog"})
    assert zs["n"] == api_zs["n"] == 6 and zs["accuracy"] == api_zs["accuracy"]
    emb = embedder.Embedder(f"open_clip:{TINY_CLIP}", weights=tiny_clip)
    t = emb.embed_text(["a cat", "a dog"])
    assert np.allclose(np.linalg.norm(t, axis=1), 1, atol=1e-5)
    p = emb.zero_shot(sorted((tmp_path / "imgs").rglob("*.jpg"))[:2], ["cat", "dog"])
    assert p.shape == (2, 2) and np.allclose(p.sum(1), 1, atol=1e-5)
    probe = embedder.Probe.load(tmp_path / "p", weights=moved)
    assert probe.classes == ["0", "1"] and "2 classes" in repr(probe)
    assert probe.predict([tmp_path / "imgs" / "0" / sorted(os.listdir(tmp_path / "imgs" / "0"))[0]])[0] in ("0", "1")


def test_a_layer_store_written_with_a_text_tower_is_not_text_comparable() -> None:
    """Stores written before the rule recorded the text tower at any layer: it is not read as one."""
    pre = Preprocessing(224, 224, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    text = {"tokenizer": "openai-clip-bpe", "context_length": 77}
    prov = Provenance("open_clip:ViT-B-32:openai", WeightsRef("hub", "x", "0" * 64), "clip.visual.transformer",
                      "avg", pre, 768, text=text)
    assert not prov.has_text and "not the model's image embedding" in str(prov.text_refusal("index 'x'"))
    own = prov.replace(layer="penultimate", dim=512)
    assert own.has_text and own.text_refusal("index 'x'") is None

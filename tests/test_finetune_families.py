"""Fine-tuning every family `extract` takes (issue 36): timm (a ViT with layer-wise decay, a BatchNorm CNN
with the torchvision recipe) and OpenCLIP (text tower frozen, zero-shot head, WiSE-FT), checkpoints that
`extract`, `predict` and text search take. Random weights of real architectures (timm's test models, a
small OpenCLIP ViT config): mechanics and exactness, not accuracy (no such weights offline)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from embedder.cli import app
from embedder.decode.decoders import normalize_batch
from embedder.learn.finetune.data import eval_transform
from embedder.learn.finetune.options import LAYER_DECAY, FinetuneOptions
from embedder.learn.finetune.schedule import param_groups
from embedder.learn.finetune.train import build_classifier, family_recipe, finetune, mix, zero_shot_weights
from embedder.models import checkpoint
from embedder.models.classifier import from_checkpoint
from embedder.store.shards import Store
from tests.conftest import make_images

timm = pytest.importorskip("timm", reason="the timm extra is not installed")
open_clip = pytest.importorskip("open_clip", reason="the clip extra is not installed")

CLIP_ARCH = "embedder-test-ViT"  # a real OpenCLIP ViT (VisionTransformer + text transformer), small
CLIP_CFG = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "patch_size": 8,
                                            "head_width": 32},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
FAST = ["--batch-size", "8", "--workers", "0"]


def _cli(*args: str) -> str:
    r = CliRunner().invoke(app, list(args))
    assert r.exit_code == 0, r.output
    return r.output


def _save(model: torch.nn.Module, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from open_clip.factory import _MODEL_CONFIGS

    root = tmp_path_factory.mktemp("families")
    make_images(root / "train", {"red": 8, "green": 8, "blue": 8}, size=(48, 40), seed=0)
    make_images(root / "val", {"red": 3, "green": 3, "blue": 3}, size=(48, 40), seed=1)
    torch.manual_seed(0)
    _MODEL_CONFIGS[CLIP_ARCH] = CLIP_CFG
    out = {"root": root, "vit": _save(timm.create_model("test_vit"), root / "vit.safetensors"),
           "eff": _save(timm.create_model("test_efficientnet"), root / "eff.safetensors"),
           "clip": _save(open_clip.create_model(CLIP_ARCH), root / "clip.safetensors")}
    yield out
    _MODEL_CONFIGS.pop(CLIP_ARCH, None)


def _pixels(files: list[Path], pre: Any) -> torch.Tensor:
    from PIL import Image

    t = eval_transform(pre)
    return normalize_batch(torch.stack([t(Image.open(f).convert("RGB")) for f in files]), pre)


def _predicted(pred: Path) -> dict[str, np.ndarray]:
    t = pq.read_table(pred)
    return {p: np.asarray(v, np.float32)
            for p, v in zip(t.column("path").to_pylist(), t.column("top_k_probs").to_pylist())}


def _predict_is_the_network(ck: Path, images: Path, pred: Path) -> None:
    """`embedder predict CK` (extraction with the checkpoint + its head) gives the fine-tuned network's
    own probabilities (three classes: all of them in the top 3)."""
    _cli("predict", str(ck), str(images), "--out", str(pred), "--top-k", "3")
    net, pre, _, _ = from_checkpoint(ck)
    got = _predicted(pred)
    files = sorted(Path(p) for p in got)
    with torch.inference_mode():
        want = torch.softmax(net(_pixels(files, pre)), 1).numpy()
    for f, w in zip(files, want):
        assert np.allclose(np.sort(got[str(f)])[::-1], np.sort(w)[::-1], atol=1e-4)


def test_a_timm_vit_fine_tunes_with_layer_decay_and_its_checkpoint_is_what_predict_uses(data: Any) -> None:
    root = data["root"]
    ck = root / "vit_ck.safetensors"
    r = json.loads(_cli("finetune", str(root / "train"), "--val", str(root / "val"), "--out", str(ck),
                        "--backbone", "timm:test_vit", "--weights", str(data["vit"]), "--epochs", "2",
                        "--lr-backbone", "1e-3", "--grad-checkpointing", "--image-size", "64", *FAST, "--json"))
    assert {"best_val_accuracy", "frozen_val_accuracy"} <= set(r) and r["family"] == "timm"
    assert "layer-wise decay" in r["recipe"] and "no BatchNorm" in r["recipe"]
    assert "gradient checkpointing" in r["recipe"]
    meta = checkpoint.read_meta(ck)
    assert meta is not None
    assert (meta["family"], meta["architecture"], meta["head"]["name"]) == ("timm", "test_vit", "head")
    assert meta["preprocessing"]["crop_size"] == 64
    # predict (extraction with the checkpoint + its head) gives the fine-tuned network's own probabilities
    _predict_is_the_network(ck, root / "val", root / "vit_pred.parquet")


def test_layer_decay_groups_are_timms_rule(data: Any) -> None:
    """One rate per block, LAYER_DECAY per block going down from lr_backbone at the top; no weight decay
    on 1-D tensors and position/class tokens; the head at lr_head."""
    opts = FinetuneOptions(backbone="timm:test_vit", weights_file=data["vit"], lr_backbone=1e-3, lr_head=1e-2)
    net, backbone, _, _, head = build_classifier(opts, 3)
    fam, body = family_recipe(net, backbone, opts, torch.device("cpu"), head.name)
    assert fam.layer_decay == LAYER_DECAY and fam.blocks >= 3
    groups = param_groups(net, backbone, opts, head.name, fam.layer_decay, body)
    assert groups[0]["name"] == "head" and groups[0]["lr"] == 1e-2
    names = {id(p): n for n, p in net.named_parameters()}
    lr_of = {names[id(p)]: g["lr"] for g in groups[1:] for p in g["params"]}
    assert lr_of["blocks.1.attn.qkv.weight"] == pytest.approx(lr_of["blocks.0.attn.qkv.weight"] / LAYER_DECAY)
    assert max(lr_of.values()) == pytest.approx(1e-3)
    assert lr_of["cls_token"] == pytest.approx(1e-3 * LAYER_DECAY ** (fam.blocks - 1))
    no_wd = {names[id(p)] for g in groups[1:] if g.get("weight_decay") == 0.0 for p in g["params"]}
    assert {"cls_token", "pos_embed", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias"} <= no_wd
    assert "blocks.0.attn.qkv.weight" not in no_wd
    assert len(lr_of) + len(groups[0]["params"]) == sum(1 for _ in net.parameters())


def test_a_timm_batchnorm_cnn_keeps_the_torchvision_recipe_and_bad_options_are_one_line(data: Any) -> None:
    root = data["root"]
    ck = root / "eff_ck.safetensors"
    r = json.loads(_cli("finetune", str(root / "train"), "--out", str(ck), "--backbone", "timm:test_efficientnet",
                        "--weights", str(data["eff"]), "--epochs", "1", "--image-size", "64", *FAST, "--json"))
    assert "BatchNorm frozen" in r["recipe"] and "layer-wise" not in r["recipe"], r["recipe"]
    assert checkpoint.read_meta(ck)["head"]["name"] == "classifier"  # type: ignore[index]
    store = root / "eff_store"
    _cli("extract", str(root / "val"), "--out", str(store), "--weights", str(ck))
    assert Store.open(store).provenance.backbone == "timm:test_efficientnet"
    for args, msg in ((["--backbone", "tiny_test", "--grad-checkpointing"], "no checkpointed blocks"),
                      (["--backbone", "tiny_test", "--layer-decay", "0.7"], "does not name its blocks"),
                      (["--backbone", "tiny_test", "--precision", "fp8"], "unknown --precision")):
        out = CliRunner().invoke(app, ["finetune", str(root / "train"), "--out", str(root / "x.safetensors"),
                                       "--epochs", "1", *FAST, *args])
        assert out.exit_code == 2 and msg in out.output and len(out.output.strip().splitlines()) <= 2, out.output


def test_wise_ft_alpha_0_is_the_zero_shot_model_and_1_the_fine_tuned_one(data: Any) -> None:
    """The mix is exact at its ends: alpha 0 predicts what the zero-shot classifier (OpenCLIP's own
    ``build_zero_shot_classifier`` on the unchanged model) predicts, alpha 1 what the trained weights do."""
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    from embedder.learn.zeroshot import class_text, default_templates

    classes = ["red", "green", "blue"]
    opts = FinetuneOptions(backbone=f"open_clip:{CLIP_ARCH}", weights_file=data["clip"])
    net, backbone, pre, _, head = build_classifier(opts, 3)
    net.eval()
    zs = zero_shot_weights(net, backbone, classes, torch.device("cpu"))
    with torch.no_grad():
        net.get_submodule(head.name).weight.copy_(zs)  # type: ignore[operator]
        net.get_submodule(head.name).bias.zero_()  # type: ignore[operator]
    start = {k: v.clone() for k, v in net.state_dict().items() if k.startswith(("clip.visual.", "head."))}
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(("clip.visual.", "head.")):
                p.add_(0.05 * torch.randn_like(p))
    trained = {k: v.clone() for k, v in net.state_dict().items()}
    x = _pixels(sorted((data["root"] / "val").rglob("*.png")) or sorted((data["root"] / "val").rglob("*.jpg")), pre)
    with torch.inference_mode():
        trained_logits = net(x)
        net.load_state_dict(mix(start, trained, 0.0))
        at0 = net(x)
        ref = open_clip.create_model(CLIP_ARCH, pretrained=str(data["clip"])).eval()
        text = build_zero_shot_classifier(ref, open_clip.get_tokenizer(CLIP_ARCH), [class_text(c) for c in classes],
                                          default_templates(), device="cpu")
        img = torch.nn.functional.normalize(ref.encode_image(x), dim=-1)
        zs_logits = ref.logit_scale.exp() * img @ text
        net.load_state_dict(mix(start, trained, 1.0))
        at1 = net(x)
        net.load_state_dict(mix(start, trained, 0.5))
        mid = net(x)
    assert torch.equal(at0.argmax(1), zs_logits.argmax(1))
    torch.testing.assert_close(at0, zs_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(at1, trained_logits)
    assert not torch.equal(mid, at1) and not torch.equal(mid, at0)


def test_a_fine_tuned_clip_keeps_its_text_tower_resumes_and_searches_by_text(data: Any) -> None:
    import embedder

    root = data["root"]
    opts = FinetuneOptions(backbone=f"open_clip:{CLIP_ARCH}", weights_file=data["clip"], epochs=2, batch_size=8,
                           workers=0, lr_backbone=1e-2, lr_head=3e-2, probe_init=False, patience=5)
    straight = finetune([str(root / "train")], root / "clip_a.safetensors", opts, [str(root / "val")])
    assert straight.family == "open_clip" and straight.zero_shot_val_accuracy is not None
    assert "text tower frozen" in straight.recipe and "WiSE-FT" in straight.recipe
    assert straight.best_epoch > 0  # a new head on random features: training does better than the start
    assert straight.wise_ft is not None and set(straight.wise_ft["val_accuracy"]) == {"0", "0.2", "0.4", "0.5", "0.6",
                                                                                     "0.8", "1"}
    assert straight.wise_ft["alpha"] in (0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0)
    # killed after epoch 1 (the resume file holds the starting head WiSE-FT mixes with), resumed: the same run
    ck = root / "clip_b.safetensors"

    def kill(rec: Any) -> None:
        if rec.epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune([str(root / "train")], ck, opts, [str(root / "val")], on_epoch=kill)
    resumed = finetune([str(root / "train")], ck, opts, [str(root / "val")], resume=True)
    assert resumed.wise_ft == straight.wise_ft and resumed.best_val_accuracy == straight.best_val_accuracy
    a, meta = checkpoint.load(ck)
    b, _ = checkpoint.load(root / "clip_a.safetensors")
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    # the text tower is the pretrained one, byte for byte; the image tower changed
    ref = open_clip.create_model(CLIP_ARCH, pretrained=str(data["clip"])).state_dict()
    assert all(torch.equal(a[f"clip.{k}"], v) for k, v in ref.items() if not k.startswith("visual."))
    assert any(not torch.equal(a[f"clip.{k}"], v) for k, v in ref.items() if k.startswith("visual."))
    assert meta["head"] == {"name": "head", "normalized": True} and meta["zero_shot_val_accuracy_after"] is not None
    # re-embedded with the checkpoint, the store is searched by text through the unchanged text tower
    store = root / "clip_store"
    _cli("extract", str(root / "train"), "--out", str(store), "--weights", str(ck))
    embedder.build_index(store, "ft", home=root / "home")
    index = embedder.open_index("ft", home=root / "home", weights=ck)
    hits = index.search(text="a photo of something red", k=3)
    assert len(hits[0]) == 3
    emb = embedder.Embedder(None, weights=ck)
    tok = open_clip.get_tokenizer(CLIP_ARCH)
    orig = open_clip.create_model(CLIP_ARCH, pretrained=str(data["clip"])).eval()
    with torch.inference_mode():
        want = orig.encode_text(tok(["a photo of something red"])).numpy()
    assert np.allclose(emb.embed_text(["a photo of something red"], normalize=False), want, atol=1e-5)


def test_a_clip_checkpoint_predicts_with_its_normalised_head(data: Any) -> None:
    root = data["root"]
    ck = root / "clip_p.safetensors"
    opts = FinetuneOptions(backbone=f"open_clip:{CLIP_ARCH}", weights_file=data["clip"], epochs=1, batch_size=8,
                           workers=0)
    finetune([str(root / "train")], ck, opts, [str(root / "val")])
    _predict_is_the_network(ck, root / "val", root / "clip_pred.parquet")


def test_recipe_record_round_trips() -> None:
    from embedder.learn.finetune.options import FamilyRecipe, recipe

    fam = FamilyRecipe("open_clip", False, 0.65, 12, "zero-shot", True, True)
    text = recipe(FinetuneOptions(), 224, fam)
    assert "head from the zero-shot head" in text and "x0.65 per block" in text and "WiSE-FT" in text
    assert dataclasses.asdict(fam)["head_start"] == "zero-shot"


def test_a_run_over_the_memory_budget_is_one_line_naming_what_fits(data: Any) -> None:
    """The step's need is measured before training (weights, gradients + AdamW, what autograd keeps);
    over --memory-budget the error names the option that fits: gradient checkpointing, else a batch."""
    from embedder.learn.finetune.budget import memory_need
    from embedder.learn.finetune.schedule import set_trainable

    root = data["root"]
    opts = FinetuneOptions(backbone="timm:test_vit", weights_file=data["vit"], batch_size=64, image_size=64)
    net, backbone, pre, _, head = build_classifier(opts, 3)
    fam, body = family_recipe(net, backbone, opts, torch.device("cpu"), head.name)
    set_trainable(net, param_groups(net, backbone, opts, head.name, fam.layer_decay, body), True)
    plain = memory_need(net, 64, 64, torch.device("cpu"), None)
    net.set_grad_checkpointing(True)  # type: ignore[operator]
    ck = memory_need(net, 64, 64, torch.device("cpu"), None, True, net.set_grad_checkpointing, fam.blocks)
    net.set_grad_checkpointing(False)  # type: ignore[operator]
    assert ck["activations"] < plain["activations"] * 0.8 and ck["weights"] == plain["weights"]
    base = ["finetune", str(root / "train"), "--out", str(root / "m.safetensors"), "--backbone", "timm:test_vit",
            "--weights", str(data["vit"]), "--image-size", "64", "--batch-size", "64", "--workers", "0"]
    between = f"{(plain['total'] + ck['total']) // 2}"
    for budget, want in ((between, "--grad-checkpointing fits it"), ("1KB", "choose a smaller model")):
        r = CliRunner().invoke(app, [*base, "--memory-budget", budget])
        assert r.exit_code == 2 and want in r.output and "needs ≈" in r.output, r.output
        assert len(r.output.strip().splitlines()) <= 3, r.output  # one message (rich may wrap it)
    small = f"{plain['total'] - plain['activations'] * 3 // 4}"  # a quarter of the batch's activations fit
    r = CliRunner().invoke(app, [*base, "--grad-checkpointing", "--memory-budget", "1KB"])
    assert r.exit_code == 2 and "choose a smaller model" in r.output
    r = CliRunner().invoke(app, [*base, "--memory-budget", small])
    fits = re.search(r"--batch-size (\d+) fits it", r.output)
    assert r.exit_code == 2 and fits and 1 <= int(fits.group(1)) < 64, r.output


def test_a_budget_only_picks_sizes_the_model_takes(data: Any) -> None:
    """OpenCLIP's ViT has fixed position embeddings: a time budget keeps its own size (a smaller one
    would fail at the first step), where a CNN's plan goes down in size."""
    from embedder.learn.finetune.budget import plan_budget, takes_size

    opts = FinetuneOptions(backbone=f"open_clip:{CLIP_ARCH}", weights_file=data["clip"])
    net, _, pre, _, _ = build_classifier(opts, 3)
    assert takes_size(net, pre.crop_size, torch.device("cpu")) and not takes_size(net, 24, torch.device("cpu"))
    args = (30.0, 224, 1.0, 0.2, 20, 5, 25, 0)  # a 224-px epoch takes 21 s: 3 do not fit
    assert plan_budget(*args).image_size < 224
    plan = plan_budget(*args, accepts=lambda size: False)
    assert plan.image_size == 224 and plan.epochs == 1


def test_a_timm_classifier_that_is_a_1x1_convolution_and_other_careless_input(data: Any, tmp_path: Path) -> None:
    """DLA (as ResNetV2/BiT, DPN) classifies with a 1x1 convolution on [N, C, 1, 1] features: the new head is
    one too and predict reads it as a matrix; a model without checkpointed blocks, a size a fixed ViT does
    not take, a class name no prompt can hold: one line each, or a run without the zero-shot head."""
    root = data["root"]
    dla = _save(timm.create_model("dla46_c"), tmp_path / "dla.safetensors")
    ck = tmp_path / "dla_ck.safetensors"
    _cli("finetune", str(root / "train"), "--out", str(ck), "--backbone", "timm:dla46_c", "--weights", str(dla),
         "--epochs", "1", "--image-size", "64", *FAST)
    assert checkpoint.read_meta(ck)["head"]["name"] == "fc"  # type: ignore[index]
    _predict_is_the_network(ck, root / "val", tmp_path / "dla.parquet")
    for args, msg in ((["--backbone", "timm:dla46_c", "--weights", str(dla), "--grad-checkpointing"],
                       "no checkpointed blocks"),
                      (["--backbone", f"open_clip:{CLIP_ARCH}", "--weights", str(data["clip"]), "--image-size", "48"],
                       "does not take 48x48 images")):
        r = CliRunner().invoke(app, ["finetune", str(root / "train"), "--out", str(tmp_path / "x.safetensors"),
                                     "--epochs", "1", *FAST, *args])
        assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output, r.output
    # a folder name longer than the text tower's context: fine-tuning goes on without the zero-shot head
    odd = tmp_path / "odd"
    for name, src in (("_".join("q" * 120), "red"), ("green", "green")):  # 239 bytes, 120+ tokens
        (odd / name).mkdir(parents=True)
        for f in sorted((root / "train" / src).iterdir())[:6]:
            (odd / name / f.name).write_bytes(f.read_bytes())
    res = finetune([str(odd)], tmp_path / "odd.safetensors",
                 FinetuneOptions(backbone=f"open_clip:{CLIP_ARCH}", weights_file=data["clip"], epochs=1, batch_size=8,
                                 workers=0, val_fraction=0.34))
    assert res.zero_shot_val_accuracy is None and "head from the probe" in res.recipe


def test_a_checkpoint_whose_metadata_lies_is_refused_in_one_line(data: Any, tmp_path: Path) -> None:
    root = data["root"]
    ck = root / "vit_ck.safetensors"
    if not ck.exists():
        pytest.skip("needs the ViT checkpoint of the first test")
    state, meta = checkpoint.load(ck)
    meta.pop("format")
    for change, msg, command in (({"classes": ["a", "b"]}, "3 outputs for 2 classes", "predict"),
                                 ({"head": {"name": "blocks.0.mlp.fc1", "normalized": False}}, "is not", "extract"),
                                 ({"head": {"name": "head", "normalized": True}}, "is not", "extract")):
        bad = tmp_path / "bad.safetensors"
        checkpoint.save(bad, state, {**meta, **change})
        args = (["predict", str(bad), str(root / "val"), "--out", str(tmp_path / "p.parquet")] if command == "predict"
                else ["extract", str(root / "val"), "--out", str(tmp_path / "s"), "--weights", str(bad)])
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output, r.output
    # damaged head tensors: a wrong width, a 3x3 kernel, a scalar
    for weight in (torch.zeros(3, 16), torch.zeros(3, state["head.weight"].shape[1], 3, 3), torch.zeros(())):
        bad = tmp_path / "bad.safetensors"
        checkpoint.save(bad, {**state, "head.weight": weight}, meta)
        for args in (["predict", str(bad), str(root / "val"), "--out", str(tmp_path / "p.parquet")],
                     ["export", str(bad), "--out", str(tmp_path / "e"), "--force"]):
            r = CliRunner().invoke(app, args)
            assert r.exit_code == 2 and "Traceback" not in r.output, (tuple(weight.shape), args[0], r.output)


def test_the_api_continues_from_a_checkpoint_as_the_cli_does(data: Any, tmp_path: Path) -> None:
    import embedder

    root = data["root"]
    first = tmp_path / "first.safetensors"
    embedder.finetune(root / "train", first, backbone="tiny_test", epochs=1, batch_size=8, workers=0)
    again = embedder.finetune(root / "train", tmp_path / "again.safetensors", weights_file=first, epochs=1,
                              batch_size=8, workers=0)
    meta = checkpoint.read_meta(Path(again["checkpoint"]))
    assert meta is not None and meta["backbone"] == "tiny_test" and meta["tag"] == "SEED0"


def test_gradient_checkpointing_stays_as_asked(data: Any) -> None:
    """The memory check toggles checkpointing to measure both ways; the run trains as it was asked."""
    from embedder.learn.finetune.train import grad_checkpointing_switch

    for name, wfile, flag in (("timm:test_vit", data["vit"], lambda n: n.grad_checkpointing),
                              (f"open_clip:{CLIP_ARCH}", data["clip"],
                               lambda n: n.clip.visual.transformer.grad_checkpointing)):
        for asked in (True, False):
            opts = FinetuneOptions(backbone=name, weights_file=wfile, grad_checkpointing=asked)
            net, backbone, _, _, head = build_classifier(opts, 3)
            family_recipe(net, backbone, opts, torch.device("cpu"), head.name)
            assert grad_checkpointing_switch(net, backbone, asked) is not None
            assert flag(net) is asked, (name, asked)

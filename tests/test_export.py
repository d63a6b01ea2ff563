"""`embedder export`: a fine-tuned checkpoint, or a probe with the frozen backbone its store was made with,
as one ONNX model whose onnxruntime probabilities, on images preprocessed by the written JSON's own
recipe, are `embedder predict`'s; timm and OpenCLIP classifiers against PyTorch; refusals in one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import embedder.api as api
from embedder.cli import app
from embedder.errors import EmbedderError, ExportError
from embedder.learn.export import MODEL_FILE, Deployable, write_onnx
from embedder.models.origin import sha256_file
from tests.conftest import make_images

ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install 'embedder[onnx]'")
pytest.importorskip("onnx", reason="the onnx extra is not installed: pip install 'embedder[onnx]'")

runner = CliRunner()
TOL = 1e-4


def _cli(*args: str) -> str:
    r = runner.invoke(app, list(args))
    assert r.exit_code == 0, r.output
    return r.output


def _fails(*args: str) -> str:
    r = runner.invoke(app, list(args))
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert len(lines) <= 3 and "Traceback" not in r.output, r.output  # one message (rich may wrap it)
    return " ".join(r.output.split())


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Labelled training images, a checkpoint fine-tuned on them (through the Python API), and new
    images of other sizes to classify."""
    root = tmp_path_factory.mktemp("export")
    make_images(root / "train", {"red": 8, "green": 8, "blue": 8}, seed=0)
    make_images(root / "new", {"red": 3, "green": 3, "blue": 3}, size=(70, 52), seed=7)
    summary = api.finetune(root / "train", root / "ck.safetensors", backbone="tiny_test", epochs=1,
                           batch_size=8, workers=0, lr_head=0.05, lr_backbone=0.01)
    assert summary["classes"] == ["blue", "green", "red"] and summary["epochs_run"] == 1
    return {"root": root, "train": root / "train", "new": root / "new", "ck": root / "ck.safetensors"}


def _onnx_probabilities(out: Path, paths: list[str]) -> tuple[np.ndarray, dict[str, Any]]:
    """What a deployment does with the two files: the JSON's recipe, then the model."""
    from embedder.decode.decoders import decode_file
    from embedder.models.preprocessing import Preprocessing

    meta = json.loads((out / "embedder-export.json").read_text())
    pre = Preprocessing.from_dict(meta["preprocessing"])
    pixels = np.stack([decode_file(p, pre, decoder=meta["preprocessing"]["decoder"]).pixels.numpy() for p in paths])
    assert pixels.dtype == np.uint8 and pixels.shape[1:] == (3, pre.crop_size, pre.crop_size)
    session = ort.InferenceSession(str(out / meta["model"]), providers=["CPUExecutionProvider"])
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.type, outp.name) == (meta["input"]["name"], "tensor(uint8)", meta["output"]["name"])
    assert not isinstance(inp.shape[0], int)  # a dynamic batch axis
    return session.run(None, {inp.name: pixels})[0], meta


def _agrees_with_predict(source: Path, out: Path, images: Path, *extra: str) -> dict[str, Any]:
    rows = [json.loads(line) for line in
            _cli("predict", str(source), str(images), "--json", "--top-k", "3", *extra).strip().splitlines()]
    proba, meta = _onnx_probabilities(out, [row["path"] for row in rows])
    classes = meta["classes"]
    assert proba.shape == (len(rows), len(classes))
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-5)
    for row, p in zip(rows, proba):
        assert classes[int(p.argmax())] == row["predicted"], (row, p)
        got = [p[classes.index(label)] for label in row["top_k_labels"]]
        np.testing.assert_allclose(got, row["top_k_probs"], atol=TOL, rtol=0)
    return meta


def test_a_checkpoint_exported_predicts_as_embedder_predict(data: dict[str, Path]) -> None:
    out = data["root"] / "deploy-ck"
    result = json.loads(_cli("export", str(data["ck"]), "--out", str(out), "--json"))
    assert sorted(p.name for p in out.iterdir()) == ["embedder-export.json", "model.onnx"]
    meta = _agrees_with_predict(data["ck"], out, data["new"])
    assert meta["format"] == "embedder-export/1" and meta["classes"] == ["blue", "green", "red"]
    assert meta["input"] == {"name": "pixels", "dtype": "uint8", "layout": "NCHW", "channels": "RGB",
                             "shape": ["batch", 3, 32, 32], "range": [0, 255]}
    assert meta["output"]["kind"] == "probabilities" and meta["output"]["shape"] == ["batch", 3]
    pre = meta["preprocessing"]
    assert (pre["resize_size"], pre["crop_size"], pre["interpolation"], pre["resize_mode"]) == (40, 32, "bilinear",
                                                                                                "shorter")
    src = meta["source"]
    assert (src["kind"], src["backbone"], src["sha256"]) == ("checkpoint", "tiny_test", sha256_file(data["ck"]))
    v = meta["verification"]
    assert v["onnxruntime"] == ort.__version__ and 0 <= v["max_abs_diff"] <= v["tolerance"] == TOL
    assert meta["opset"] == result["opset"] and isinstance(meta["opset"], int)
    assert result["max_abs_diff"] == v["max_abs_diff"] and result["model"] == str(out / MODEL_FILE)


def test_a_probe_exported_predicts_as_embedder_predict(data: dict[str, Path]) -> None:
    """The probe's backbone, its L2-normalised features (the store's), its standardisation and head."""
    root = data["root"]
    store, probe = root / "store", root / "probe.safetensors"
    _cli("extract", str(data["train"]), "--out", str(store), "--backbone", "tiny_test", "--normalize", "l2", "--json")
    _cli("probe", str(store), "--out", str(probe), "--standardize", "yes", "--json")
    out = root / "deploy-probe"
    r = api.export(probe, out)
    assert r["source"]["kind"] == "probe" and r["max_abs_diff"] <= TOL
    meta = _agrees_with_predict(probe, out, data["new"])
    src = meta["source"]
    assert (src["backbone"], src["normalize"], src["sha256"]) == ("tiny_test", "l2", sha256_file(probe))


def _random_weights(make: Any, path: Path) -> Path:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in make().state_dict().items()}, str(path))
    return path


def _classifier_exported(name: str, wfile: Path, out: Path) -> None:
    """A family's network with a new 4-class head (as fine-tuning builds it) exported; onnxruntime on
    uint8 pixels against the PyTorch network on the same pixels normalised as extraction does."""
    from embedder.decode.decoders import normalize_batch
    from embedder.models.builder import ModelSpec, load_network
    from embedder.models.classifier import with_head

    net, backbone, _, pre = load_network(ModelSpec(name, weights_file=wfile))
    full, _ = with_head(net, backbone, 4, pre.crop_size)
    head = full.get_submodule("head")
    assert isinstance(head, torch.nn.Linear)
    torch.nn.init.normal_(head.weight, std=2.0)  # logits of some spread
    full.eval()
    result = write_onnx(Deployable(full, pre, ("a", "b", "c", "d"), {"kind": "test", "backbone": name}), out)
    assert result.max_abs_diff <= TOL
    pixels = torch.randint(0, 256, (2, 3, pre.crop_size, pre.crop_size), dtype=torch.uint8)
    with torch.no_grad():
        want = torch.softmax(full(normalize_batch(pixels, pre)), 1).numpy()
    session = ort.InferenceSession(str(out / MODEL_FILE), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"pixels": pixels.numpy()})[0], want, atol=TOL, rtol=0)


def test_a_timm_vit_checkpoint_exported_predicts_as_embedder_predict(data: dict[str, Path], tmp_path: Path) -> None:
    """timm's test ViT (random weights) fine-tuned one epoch: its checkpoint exported, then as test 1."""
    timm = pytest.importorskip("timm", reason="the timm extra is not installed")
    wfile = _random_weights(lambda: timm.create_model("test_vit", pretrained=False), tmp_path / "vit.safetensors")
    ck = tmp_path / "vit-ck.safetensors"
    # at a size not its own (160): position embeddings interpolated, fixed to the one size for the export
    api.finetune(data["train"], ck, backbone="timm:test_vit", weights_file=wfile, epochs=1, batch_size=8, workers=0,
                 image_size=64)
    out = tmp_path / "out"
    _cli("export", str(ck), "--out", str(out))
    meta = _agrees_with_predict(ck, out, data["new"])
    assert meta["source"]["backbone"] == "timm:test_vit" and meta["input"]["shape"] == ["batch", 3, 64, 64]


def test_an_open_clip_vit_checkpoint_exported_predicts_as_embedder_predict(data: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    """An OpenCLIP ViT (nn.MultiheadAttention: its fused inference kernel has no ONNX form) fine-tuned,
    exported, and as test 1: its normalised image embedding through its head."""
    open_clip = pytest.importorskip("open_clip", reason="the clip extra is not installed")
    from open_clip.factory import _MODEL_CONFIGS

    from tests.test_finetune_families import CLIP_ARCH, CLIP_CFG

    _MODEL_CONFIGS[CLIP_ARCH] = CLIP_CFG
    try:
        wfile = _random_weights(lambda: open_clip.create_model(CLIP_ARCH, pretrained=None),
                                tmp_path / "clip.safetensors")
        ck = tmp_path / "clip-ck.safetensors"
        api.finetune(data["train"], ck, backbone=f"open_clip:{CLIP_ARCH}", weights_file=wfile, epochs=1,
                     batch_size=8, workers=0)
        out = tmp_path / "out"
        _cli("export", str(ck), "--out", str(out))
        meta = _agrees_with_predict(ck, out, data["new"])
        assert meta["source"]["backbone"] == f"open_clip:{CLIP_ARCH}"
    finally:
        _MODEL_CONFIGS.pop(CLIP_ARCH, None)


@pytest.mark.slow  # as test_open_clip: building MobileCLIP2-S0 (both towers) takes seconds
def test_an_open_clip_classifier_exports(tmp_path: Path) -> None:
    """MobileCLIP2-S0 (FastViT image tower, reparameterised): its L2-normalised image embedding and head;
    the text tower stays out of the exported graph. The classifier as fine-tuning builds it."""
    open_clip = pytest.importorskip("open_clip", reason="the clip extra is not installed")
    wfile = _random_weights(lambda: open_clip.create_model("MobileCLIP2-S0", pretrained=None),
                            tmp_path / "clip.safetensors")
    _classifier_exported("open_clip:MobileCLIP2-S0:dfndr2b", wfile, tmp_path / "out")
    size = (tmp_path / "out" / MODEL_FILE).stat().st_size
    assert size < 0.7 * wfile.stat().st_size  # the image tower only


class _Spectral(torch.nn.Module):
    """A layer ONNX has no operator for: a 2-D FFT's magnitudes, through the TorchScript exporter."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.fft.fft2(x).abs().mean(dim=(-2, -1)))  # type: ignore[no-any-return]


def test_an_operator_onnx_cannot_express_is_refused_in_one_line(tmp_path: Path, capfd: pytest.CaptureFixture[str]
                                                                 ) -> None:
    from embedder.models.preprocessing import Preprocessing

    net = torch.nn.Sequential(torch.nn.Identity(), _Spectral()).eval()
    pre = Preprocessing(8, 8, "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    out = tmp_path / "out"
    with pytest.raises(ExportError) as e:
        write_onnx(Deployable(net, pre, ("x", "y"), {"kind": "test"}), out)
    msg = str(e.value)
    assert "\n" not in msg and "aten::fft_fft2" in msg and "in 1 (_Spectral)" in msg, msg
    assert not out.exists()  # nothing left behind
    captured = capfd.readouterr()
    assert "graph" not in captured.out and "graph" not in captured.err  # torch's IR dump kept off the terminal


class _FixedBatch(torch.nn.Module):
    """Exportable, but not what it computes: a Python int from the input's shape is a constant of the
    traced graph (the batch it was traced at)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(-2, -1))) + torch.zeros(int(x.shape[0]), 2)  # type: ignore[no-any-return]


def test_an_export_onnxruntime_does_not_run_as_pytorch_is_refused(tmp_path: Path,
                                                                  capfd: pytest.CaptureFixture[str]) -> None:
    from embedder.models.preprocessing import Preprocessing

    pre = Preprocessing(8, 8, "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    with pytest.raises(ExportError, match="cannot run the exported model at batch 3") as e:
        write_onnx(Deployable(_FixedBatch().eval(), pre, ("x", "y"), {"kind": "test"}), tmp_path / "out")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
    assert "onnxruntime" not in capfd.readouterr().err  # its own log kept quiet: the message says it once


def test_bad_input_is_refused_in_one_line(data: dict[str, Path], tmp_path: Path) -> None:
    ck = str(data["ck"])
    assert "does not exist" in _fails("export", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "a"))
    jpeg = next(data["new"].rglob("*.jpg"))
    msg = _fails("export", str(jpeg), "--out", str(tmp_path / "a"))
    assert "neither an `embedder finetune` checkpoint nor an `embedder probe` file" in msg
    assert "unknown export format 'tflite'; valid: onnx" in _fails("export", ck, "--out", str(tmp_path / "a"),
                                                                   "--format", "tflite")
    assert "--opset 99 is out of range" in _fails("export", ck, "--out", str(tmp_path / "a"), "--opset", "99")
    assert not (tmp_path / "a").exists()
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    assert "is not empty; pass --force" in _fails("export", ck, "--out", str(full))
    _cli("export", ck, "--out", str(full), "--force", "--opset", "17")
    assert sorted(p.name for p in full.iterdir()) == ["embedder-export.json", "keep.txt", "model.onnx"]
    assert json.loads((full / "embedder-export.json").read_text())["opset"] == 17
    assert "is a file, not a folder" in _fails("export", ck, "--out", str(full / "keep.txt"))
    with pytest.raises(EmbedderError, match="unknown option epoch; valid: .*epochs"):
        api.finetune(data["train"], tmp_path / "x.safetensors", epoch=1)

"""Regression tests for the defects found when the tool was tried and reviewed (one per item)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from embedder.cli import app
from embedder.embed.batch import BatchEmbedder
from embedder.embed.fill import extract
from embedder.embed.options import EmbedOptions
from embedder.embed.query import embedder_for
from embedder.errors import EmbedderError, ProvenanceMismatch, StoreError, WeightsMismatch
from embedder.index import build as idx
from embedder.index import plan as index_plan
from embedder.models import checkpoint
from embedder.models.builder import ModelSpec, load_network
from embedder.models.registry import get_backbone
from embedder.store.provenance import Provenance
from embedder.store.shards import META_KEY, Store
from tests.conftest import make_images

runner = CliRunner()
TINY = ModelSpec("tiny_test")
STORE_V1 = Path(__file__).parent / "data" / "store-v1"


def _tiny_checkpoint(path: Path) -> Path:
    net = get_backbone("tiny_test").build_architecture()
    net.fc = torch.nn.Linear(32, 2)
    checkpoint.save(path, net.state_dict(), {
        "backbone": "tiny_test", "pretrained": {"kind": "seeded", "name": "tiny_test.SEED0", "sha256": "x"},
        "classes": ["a", "b"], "preprocessing": get_backbone("tiny_test").preprocessing().to_dict()})
    return path


# ---- 3: store creation is locked before anything is checked or written ---------------------------
@pytest.mark.slow
def test_two_first_time_writers_never_both_create_the_store(image_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "store"
    procs = [subprocess.Popen([sys.executable, "-m", "embedder", "extract", str(image_tree), "--out", str(out),
                               "--backbone", "tiny_test", *extra], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for extra in ([], ["--layer", "stage1"])]
    results = []
    for p in procs:
        _, err = p.communicate(timeout=120)
        results.append((p.returncode, err))
    ok = [r for r in results if r[0] == 0]
    assert len(ok) >= 1
    for rc, err in results:
        if rc:
            assert rc == 2 and err.strip().startswith("error:") and len(err.strip().splitlines()) == 1, err
    prov = Store.open(out).provenance
    for shard in Store(out).shard_files():  # every shard was made the way the manifest says
        assert Provenance.from_json(pq.read_schema(shard).metadata[META_KEY]).same_store(prov)
    assert Store.open(out).count() == 11


# ---- 5: --weights CKPT without --backbone uses the checkpoint's -----------------------------------
def test_checkpoint_names_its_backbone(image_tree: Path, tmp_path: Path) -> None:
    ck = _tiny_checkpoint(tmp_path / "ck.safetensors")
    out = tmp_path / "s"
    r = runner.invoke(app, ["extract", str(image_tree), "--out", str(out), "--weights", str(ck), "--json"])
    assert r.exit_code == 0, r.output
    assert Store.open(out).provenance.backbone == "tiny_test"
    r = runner.invoke(app, ["extract", str(image_tree), "--out", str(tmp_path / "t"), "--weights", str(ck),
                            "--backbone", "resnet18"])
    assert r.exit_code == 2 and "tiny_test checkpoint" in r.output and len(r.output.strip().splitlines()) == 1
    plain = tmp_path / "plain.pth"
    torch.save(get_backbone("tiny_test").build_architecture().state_dict(), plain)
    r = runner.invoke(app, ["extract", str(image_tree), "--out", str(tmp_path / "u"), "--weights", str(plain)])
    assert r.exit_code == 2 and "pass --backbone" in r.output


# ---- 7: fine-tuned Inception checkpoints (no auxiliary head) reload; official files (with it) too -
def test_inception_checkpoint_without_aux_head_reloads(tmp_path: Path) -> None:
    entry = get_backbone("inception_v3")
    torch.manual_seed(0)
    official = entry.build_architecture()  # aux head present, like the official file
    assert any(k.startswith("AuxLogits.") for k in official.state_dict())
    f = tmp_path / "inception.pth"
    torch.save(official.state_dict(), f)
    net, _, _, _ = load_network(ModelSpec("inception_v3", weights_file=f))
    assert getattr(net, "AuxLogits", None) is None
    ck = tmp_path / "ft.safetensors"  # what `embedder finetune` saves: the aux head already dropped
    checkpoint.save(ck, net.state_dict(), {"backbone": "inception_v3", "classes": [str(i) for i in range(1000)],
                                           "preprocessing": entry.preprocessing().to_dict()})
    again, _, _, _ = load_network(ModelSpec(None, weights_file=ck))
    torch.testing.assert_close(again.state_dict()["Conv2d_1a_3x3.conv.weight"],
                               official.state_dict()["Conv2d_1a_3x3.conv.weight"])


# ---- 8: a store made from a weights file at another --image-size can be searched and predicted on -
def test_weights_file_with_image_size_can_be_queried(image_tree: Path, tmp_path: Path) -> None:
    f = tmp_path / "w.pth"
    torch.save(get_backbone("tiny_test").build_architecture().state_dict(), f)
    store = str(tmp_path / "s")
    extract([str(image_tree)], store, ModelSpec("tiny_test", weights_file=f, image_size=48))
    prov = Store.open(store).provenance
    assert prov.preprocessing.crop_size == 48 and prov.preprocessing.resize_size == 60
    home = str(tmp_path / "h")
    idx.build(store, "sized", index_plan.BuildOptions(kind="flat"), home)
    q = str(image_tree / "cat" / "cat_0001.jpg")
    r = runner.invoke(app, ["search", "sized", q, "--weights", str(f), "--home", home, "--json", "-k", "1"])
    assert r.exit_code == 0, r.output
    hit = json.loads(r.output.splitlines()[0])
    assert hit["path"] == q and hit["score"] == pytest.approx(1.0, abs=1e-5)


# ---- 10: weights for the wrong architecture are a one-line error, not a torch traceback ----------
def test_wrongly_shaped_weights_are_a_one_line_error(image_tree: Path, tmp_path: Path) -> None:
    state = get_backbone("tiny_test").build_architecture().state_dict()
    state["stem.0.weight"] = torch.zeros(8, 3, 5, 5)  # same names, wrong shape
    f = tmp_path / "wrong.pth"
    torch.save(state, f)
    with pytest.raises(WeightsMismatch, match="do not fit tiny_test.*wrongly shaped"):
        load_network(ModelSpec("tiny_test", weights_file=f))
    r = runner.invoke(app, ["extract", str(image_tree), "--out", str(tmp_path / "s"), "--backbone", "tiny_test",
                            "--weights", str(f)])
    assert r.exit_code == 2 and r.output.startswith("error:") and "Traceback" not in r.output


# ---- 13: every shard carries the provenance of the run that wrote it; precision is identity ------
def test_shards_are_stamped_by_the_run_that_wrote_them(image_tree: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from embedder.embed import batch as embed_batch

    out = str(tmp_path / "s")
    extract([str(image_tree / "cat")], out, TINY)
    real = embed_batch._versions()
    monkeypatch.setattr(embed_batch, "_versions", lambda: {**real, "embedder": "second-run"})
    extract([str(image_tree)], out, TINY)
    stamps = sorted(Provenance.from_json(pq.read_schema(s).metadata[META_KEY]).versions["embedder"]
                    for s in Store(out).shard_files())
    assert stamps == sorted([real["embedder"], "second-run"])
    assert Store.open(out).provenance.versions["embedder"] == real["embedder"]  # the store's first run


def test_precision_is_part_of_what_vectors_mean(image_tree: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "s")
    extract([str(image_tree / "cat")], out, TINY, EmbedOptions(precision="fp32"))
    with pytest.raises(ProvenanceMismatch, match="precision=fp32.*precision=bf16"):
        extract([str(image_tree)], out, TINY, EmbedOptions(precision="bf16"))
    bf16 = str(tmp_path / "b")
    extract([str(image_tree)], bf16, TINY, EmbedOptions(precision="bf16"))
    assert Store.open(bf16).provenance.precision == "bf16"
    # queries against bf16 vectors are embedded in bf16 (measured: fp32 ones are not the same vectors)
    prov = Store.open(bf16).provenance
    emb = embedder_for(prov, device="cpu")
    assert emb.precision == "bf16" and emb.provenance().comparable(prov)
    fp32 = BatchEmbedder(TINY, EmbedOptions(precision="fp32")).provenance()
    assert not fp32.comparable(prov) and fp32.differences(prov, Provenance.COMPARABLE) == ["precision"]


# ---- typed provenance: stores written before it still open and accept appends ---------------------
def test_version_1_store_opens_and_appends(tmp_path: Path) -> None:
    store = tmp_path / "v1"
    shutil.copytree(STORE_V1, store)
    prov = Store.open(store).provenance
    from embedder.store.provenance import VERSION

    assert (prov.version, prov.backbone, prov.weights.kind, prov.decoder, prov.precision) == (
        VERSION, "tiny_test", "seeded", "pil", "fp32")
    # read as the record's current version: no text tower, the shorter-side resize every old store used
    assert prov.text is None and prov.preprocessing.resize_mode == "shorter"
    assert prov.weights.tag == "SEED0" and Store.open(store).count() == 5
    make_images(tmp_path / "new", {"bird": 3}, seed=9)
    s = extract([str(tmp_path / "new")], str(store), TINY)  # same vectors: accepted
    assert s.done == 3 and Store.open(store).count() == 8
    with pytest.raises(ProvenanceMismatch, match="layer"):
        extract([str(tmp_path / "new")], str(store), ModelSpec("tiny_test", layer="stage1"))


def test_provenance_round_trip_and_unknown_version() -> None:
    prov = BatchEmbedder(TINY).provenance()
    assert Provenance.from_json(prov.to_json()) == prov
    newer = {**prov.to_dict(), "version": 99}
    with pytest.raises(StoreError, match="version 99 is newer"):
        Provenance.from_dict(newer)
    with pytest.raises(StoreError, match="unreadable provenance"):
        Provenance.from_dict({"version": 2, "backbone": "x"})


def test_decoder_is_recorded_and_never_mixed_in_a_store(image_tree: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "s")
    extract([str(image_tree / "cat")], out, TINY, EmbedOptions(decoder="torchvision"))
    assert Store.open(out).provenance.decoder == "torchvision"
    with pytest.raises(ProvenanceMismatch, match="decoder=torchvision.*decoder=pil"):
        extract([str(image_tree)], out, TINY)
    emb = embedder_for(Store.open(out).provenance, device="cpu")  # queries decode the same way
    assert emb.options.decoder == "torchvision"
    # auto is the torchvision decoder, and is recorded by that name: it extends the same store
    s = extract([str(image_tree)], out, TINY, EmbedOptions(decoder="auto"))
    assert s.done > 0 and Store.open(out).provenance.decoder == "torchvision"
    with pytest.raises(EmbedderError, match="valid: auto, pil, pil-draft, pil-reduce, torchvision, nvjpeg"):
        extract([str(image_tree)], out, TINY, EmbedOptions(decoder="turbo"))

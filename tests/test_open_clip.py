"""The OpenCLIP family: `--backbone open_clip:ARCH:TAG` gives OpenCLIP's own `encode_image` on OpenCLIP's
own inference transform for that tag, text queries give its own `encode_text` of its own tokenizer, and
zero-shot heads and text → image recall are what OpenCLIP's own functions make of them. Random weights
of a real architecture (MobileCLIP2-S0: FastViT image tower, reparameterised; CLIP text tower), since
no CLIP weights can be had offline; the default hub path through a Hugging Face cache laid out here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from embedder.cli import app
from embedder.io.uri import image_id
from embedder.store.shards import Store
from tests.conftest import chromium_page, make_images

open_clip = pytest.importorskip("open_clip", reason="the clip extra is not installed: pip install 'embedder[clip]'")
pytestmark = pytest.mark.slow

ARCH, TAG = "MobileCLIP2-S0", "dfndr2b"
NAME = f"open_clip:{ARCH}:{TAG}"
HUB_REPO = "timm/MobileCLIP2-S0-OpenCLIP"  # the tag's hf_hub, as OpenCLIP's pretrained table names it


def _cli(*args: str) -> str:
    r = CliRunner().invoke(app, list(args))
    assert r.exit_code == 0, r.output
    return r.output


def _fails(*args: str) -> str:
    r = CliRunner().invoke(app, list(args))
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert len(lines) <= 3 and "Traceback" not in r.output, r.output  # one message (rich may wrap it)
    return " ".join(r.output.split())


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> dict:  # type: ignore[type-arg]
    """A random MobileCLIP2-S0 saved as safetensors, OpenCLIP's own model loaded from it (by OpenCLIP's
    own loader), the tag's own transform, labelled images with captions, and the store embedder made."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    model = open_clip.create_model(ARCH, pretrained=None)
    wfile = root / "mobileclip2_s0.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(wfile))
    ref = open_clip.create_model(ARCH, pretrained=str(wfile)).eval()  # OpenCLIP's path, not reparameterised
    tag = open_clip.get_pretrained_cfg(ARCH, TAG)
    from open_clip.transform import PreprocessCfg, image_transform_v2

    transform = image_transform_v2(PreprocessCfg(size=ref.visual.image_size, **{
        k: tag[k] for k in ("mean", "std", "interpolation", "resize_mode")}), is_train=False)
    files = sorted(make_images(root / "imgs", {"cat": 4, "dog": 4}, size=(300, 220), seed=5))
    out = root / "store"
    _cli("extract", str(root / "imgs"), "--out", str(out), "--backbone", NAME, "--weights", str(wfile), "--json")
    return {"root": root, "wfile": wfile, "ref": ref, "transform": transform, "files": files, "store": out,
            "tokenizer": open_clip.get_tokenizer(ARCH)}


def _wait_ready(c: Any) -> None:
    for _ in range(400):
        if c.get("/readyz").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError("service never became ready")


def _stored(out: Path) -> dict[str, np.ndarray]:
    t = Store.open(out).read(["id", "embedding"])
    return dict(zip(t.column("id").to_pylist(), np.stack(t.column("embedding").to_numpy(zero_copy_only=False))))


def _ref_text(clip: dict, texts: list[str]) -> np.ndarray:  # type: ignore[type-arg]
    with torch.inference_mode():
        return clip["ref"].encode_text(clip["tokenizer"](texts)).numpy()  # type: ignore[no-any-return]


def test_extract_gives_open_clips_own_encode_image(clip: dict) -> None:  # type: ignore[type-arg]
    with torch.inference_mode():
        want = clip["ref"].encode_image(torch.stack([clip["transform"](Image.open(f)) for f in clip["files"]]))
    stored = _stored(clip["store"])
    got = np.stack([stored[image_id(f)] for f in clip["files"]])
    cos = _cos(got, want.numpy())
    assert got.shape == (8, 512) and cos.min() >= 0.9999, cos
    prov = Store.open(clip["store"]).provenance
    pre = prov.preprocessing
    # the tag's own preprocessing (MobileCLIP: mean 0, std 1, bilinear), not the architecture's defaults
    assert (pre.crop_size, pre.resize_size, pre.interpolation, pre.mean, pre.std, pre.resize_mode) == (
        256, 256, "bilinear", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "shorter")
    assert prov.text == {"tokenizer": "openai-clip-bpe", "context_length": 77}
    assert prov.weights.kind == "file" and len(prov.weights.sha256) == 64


def test_the_image_tower_is_reparameterised_for_inference(clip: dict) -> None:  # type: ignore[type-arg]
    """MobileCLIP's FastViT trains with parallel branches; inference folds them into one (timm's
    reparameterize_model). The reparameterised model is the same function (the test above)."""
    from embedder.models.builder import spec_for
    from embedder.models.features import load_model

    loaded = load_model(spec_for(NAME, clip["wfile"]))
    blocks = [m for m in loaded.text.clip.visual.modules() if type(m).__name__ == "MobileOneBlock"]
    assert blocks and all(getattr(b, "reparam_conv", None) is not None for b in blocks)
    assert not [m for m in clip["ref"].modules() if getattr(m, "reparam_conv", None) is not None]


def test_text_search_cli_service_and_embed_are_open_clips_encode_text(clip: dict, tmp_path: Path) -> None:  # type: ignore[type-arg]
    from fastapi.testclient import TestClient

    from embedder.service.app import create_app
    from embedder.service.options import ServeOptions

    home = tmp_path / "home"
    _cli("index", "build", str(clip["store"]), "--name", "c", "--home", str(home))
    texts = ["a photo of a cat", "a red square on a blue field"]
    stored = _stored(clip["store"])
    ids = list(stored)
    images = np.stack([stored[i] for i in ids])
    want_vec = _ref_text(clip, texts)
    # the ranking and the scores: cosine of OpenCLIP's own text vector with the stored image vectors
    want = [[(ids[j], float(_cos(images[j:j + 1], want_vec[i:i + 1])[0])) for j in np.argsort(-_cos(
        images, np.repeat(want_vec[i:i + 1], len(ids), 0)))[:3]] for i in range(len(texts))]
    out = _cli("search", "c", "--home", str(home), "--text", texts[0], "--text", texts[1], "-k", "3",
               "--weights", str(clip["wfile"]), "--json")
    rows = [json.loads(line) for line in out.splitlines() if line.strip()]
    def same(i: int, got: list[tuple[str, float]]) -> None:
        """Each hit's score is OpenCLIP's cosine for that image, and they are the top 3 (ties with
        random weights are close: the order among near-equal scores is not asserted)."""
        cos_of = {ids[j]: float(c) for j, c in enumerate(_cos(images, np.repeat(want_vec[i:i + 1], len(ids), 0)))}
        assert len(got) == 3 and all(abs(cos_of[g] - s) < 1e-4 for g, s in got), (got, cos_of)
        assert np.allclose(sorted(s for _, s in got), sorted(w[1] for w in want[i]), atol=1e-4)

    for i, t in enumerate(texts):
        same(i, [(r["id"], r["score"]) for r in rows if r["query"] == f"text:{t}"])
    with TestClient(create_app(ServeOptions(home=str(home), poll_seconds=0,
                                            weights={"c": str(clip["wfile"])}))) as c:
        _wait_ready(c)
        info = c.get("/indexes/c").json()
        assert info["text_queries"] is True
        r = c.post("/search", json={"queries": [{"text": t} for t in texts], "k": 3})
        assert r.status_code == 200, r.text
        for i, hits in enumerate(r.json()["results"]):
            same(i, [(h["id"], h["score"]) for h in hits])
        r = c.post("/embed", json={"text": texts})
        assert r.status_code == 200, r.text
        got = np.array(r.json()["vectors"], dtype=np.float32)
        assert _cos(got, want_vec).min() >= 0.9999
        # bad texts: a 400 with the JSON body, the message naming what is wrong
        for body, words in [({"text": ""}, "empty"), ({"text": "word " * 100}, "context length"),
                            ({"text": "a", "id": ids[0]}, "not several")]:
            r = c.post("/search", json=body)
            assert r.status_code == 400 and words in r.json()["error"], r.text
        r = c.post("/embed", json={"text": ["ok", "   "]})
        assert r.status_code == 400 and "empty" in r.json()["error"]
        r = c.post("/embed", json={"text": []})
        assert r.status_code == 400 and r.json() == {"error": "text is an empty list", "kind": "bad_query"}
        r = c.post("/embed", json={"txt": "a cat"})
        assert r.status_code == 400 and r.json()["error"].startswith("text:"), r.text


def test_text_queries_need_a_text_tower_and_sane_text(clip: dict, image_tree: Path, tmp_path: Path) -> None:  # type: ignore[type-arg]
    from fastapi.testclient import TestClient

    from embedder.service.app import create_app
    from embedder.service.options import ServeOptions

    home = tmp_path / "home"
    _cli("extract", str(image_tree), "--out", str(tmp_path / "tiny"), "--backbone", "tiny_test", "--json")
    _cli("index", "build", str(tmp_path / "tiny"), "--name", "cnn", "--home", str(home))
    msg = _fails("search", "cnn", "--home", str(home), "--text", "a cat")
    assert "no text tower" in msg and "open_clip" in msg
    with TestClient(create_app(ServeOptions(home=str(home), poll_seconds=0))) as c:
        _wait_ready(c)
        assert c.get("/indexes/cnn").json()["text_queries"] is False
        r = c.post("/search", json={"text": "a cat"})
        assert r.status_code == 400 and "no text tower" in r.json()["error"] and r.json()["kind"] == "bad_query"
    _cli("index", "build", str(clip["store"]), "--name", "c", "--home", str(home))
    w = ["--weights", str(clip["wfile"])]
    assert "empty" in _fails("search", "c", "--home", str(home), "--text", "  ", *w)
    msg = _fails("search", "c", "--home", str(home), "--text", "word " * 80, *w)
    assert "82 tokens" in msg and "at most 77" in msg
    # an L2 index over raw CLIP vectors would rank images by their norm: refused for text
    _cli("index", "build", str(clip["store"]), "--name", "l2", "--metric", "l2", "--home", str(home))
    assert "rank by cosine" in _fails("search", "l2", "--home", str(home), "--text", "a cat", *w)


def test_bad_names_and_files_are_one_line_errors(clip: dict, image_tree: Path, tmp_path: Path) -> None:  # type: ignore[type-arg]
    out = str(tmp_path / "s")
    msg = _fails("extract", str(image_tree), "--out", out, "--backbone", "open_clip:MobileCLIP2-S00:dfndr2b")
    assert "no model 'MobileCLIP2-S00'" in msg and "open_clip:MobileCLIP2-S0" in msg
    msg = _fails("extract", str(image_tree), "--out", out, "--backbone", "open_clip:ViT-B-32:laion2b")
    assert "no pretrained tag 'laion2b'" in msg and "did you mean open_clip:ViT-B-32:laion2b_" in msg
    assert "its tags" not in msg  # close matches are not "its tags"
    msg = _fails("extract", str(image_tree), "--out", out, "--backbone", "open_clip:vit-b-32:openai")
    assert "Did you mean open_clip:ViT-B-32," in msg  # the same name in other case comes first
    msg = _fails("extract", str(image_tree), "--out", out, "--backbone", "open_clip:ViT-B-32")
    assert "names no pretrained weights" in msg and "--weights" in msg
    torch.manual_seed(1)
    other = open_clip.create_model("RN50", pretrained=None)  # another architecture's file
    from safetensors.torch import save_file

    bad = tmp_path / "rn50.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(bad))
    msg = _fails("extract", str(image_tree), "--out", out, "--backbone", NAME, "--weights", str(bad))
    assert "does not fit open_clip:MobileCLIP2-S0:dfndr2b" in msg
    msg = _fails("weights", "import", str(bad), "--backbone", "tiny_test")
    assert "only timm:… and open_clip:… names install into the hub cache" in msg
    assert "is not a file" in _fails("weights", "import", str(tmp_path / "nope.safetensors"), "--backbone", NAME)
    # the image side works without the tokenizer; the squash resize of SigLIP's configs is recorded
    from embedder.models.registry import get_backbone

    pre = get_backbone("open_clip:ViT-B-16-SigLIP2:webli").preprocessing()
    assert (pre.resize_mode, pre.crop_size, pre.mean, pre.interpolation) == ("squash", 224, (0.5, 0.5, 0.5),
                                                                             "bicubic")


def test_architecture_alone_takes_its_published_preprocessing(image_tree: Path, tmp_path: Path) -> None:
    """`open_clip:ARCH --weights FILE` (no tag): the preprocessing every published tag of ARCH uses, never
    OpenCLIP's architecture defaults (OpenAI's mean/std, bicubic), which MobileCLIP2-S0's and SigLIP's
    weights were not trained with; where the tags disagree (ViT-L-14: openai vs laion2b) refused in one
    line naming a tag — before any model is built or file read."""
    from embedder.models.registry import get_backbone

    pre = get_backbone("open_clip:MobileCLIP2-S0").preprocessing()
    tagged = get_backbone("open_clip:MobileCLIP2-S0:dfndr2b").preprocessing()
    assert pre == tagged and (pre.mean, pre.std, pre.interpolation) == ((0.0,) * 3, (1.0,) * 3, "bilinear")
    siglip = get_backbone("open_clip:ViT-B-16-SigLIP").preprocessing()
    assert (siglip.mean, siglip.resize_mode) == ((0.5,) * 3, "squash")
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"not read: refused first")
    msg = _fails("extract", str(image_tree), "--out", str(tmp_path / "s"), "--backbone", "open_clip:ViT-L-14",
                 "--weights", str(f))
    assert "preprocessed differently" in msg and "open_clip:ViT-L-14:openai --weights FILE" in msg


def test_squash_resize_is_open_clips_pixels(tmp_path: Path) -> None:
    """SigLIP's resize_mode 'squash' (both sides to the size, aspect not kept), decoded by the pil
    decoder, gives OpenCLIP's own transform's pixels (before normalisation)."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from embedder.decode.decoders import decode_file
    from embedder.models.registry import get_backbone

    pre = get_backbone("open_clip:ViT-B-16-SigLIP2:webli").preprocessing()
    tf = image_transform_v2(PreprocessCfg(size=224, mean=(0.0,) * 3, std=(1.0,) * 3, interpolation="bicubic",
                                          resize_mode="squash"), is_train=False)
    for f in make_images(tmp_path, {"x": 3}, size=(400, 150), seed=2):
        ours = decode_file(str(f), pre, decoder="pil").pixels.float() / 255
        theirs = tf(Image.open(f))
        assert ours.shape == theirs.shape == (3, 224, 224)
        assert (ours - theirs).abs().max() <= 1 / 255 + 1e-6


def test_zero_shot_is_open_clips_classifier_on_the_stored_vectors(clip: dict, tmp_path: Path) -> None:  # type: ignore[type-arg]
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    w = ["--weights", str(clip["wfile"])]
    out = _cli("probe", str(clip["store"]), "--zero-shot-only", "--json", *w)
    zs = json.loads(out)["zero_shot"]
    t = Store.open(clip["store"]).read(["embedding", "label"])
    x = np.stack(t.column("embedding").to_numpy(zero_copy_only=False))
    classes = sorted(set(t.column("label").to_pylist()))
    y = np.array([classes.index(v) for v in t.column("label").to_pylist()])
    from open_clip.zero_shot_metadata import SIMPLE_IMAGENET_TEMPLATES

    with torch.inference_mode():
        head = build_zero_shot_classifier(clip["ref"], clip["tokenizer"], classes, SIMPLE_IMAGENET_TEMPLATES).numpy()
    want = float(((x @ head).argmax(1) == y).mean())
    assert zs["accuracy"] == pytest.approx(want) and zs["n"] == 8 and len(zs["templates"]) == 7
    assert zs["on"].startswith("train")
    # one template of the user's, beside the probe and kNN on a test store
    out = _cli("probe", str(clip["store"]), "--test", str(clip["store"]), "--out", str(tmp_path / "p.json"),
               "--prompt", "a photo of a {}.", "--json", *w)
    m = json.loads(out)
    with torch.inference_mode():
        head1 = build_zero_shot_classifier(clip["ref"], clip["tokenizer"], classes, ["a photo of a {}."]).numpy()
    assert m["zero_shot"]["accuracy"] == pytest.approx(float(((x @ head1).argmax(1) == y).mean()))
    assert m["zero_shot"]["templates"] == ["a photo of a {}."] and m["zero_shot"]["on"] == "test"
    assert m["test_accuracy"] is not None and m["knn_test_accuracy"] is not None
    assert "exactly once" in _fails("probe", str(clip["store"]), "--zero-shot-only", "--prompt", "no slot", *w)


def test_zero_shot_needs_a_text_tower(image_tree: Path, tmp_path: Path) -> None:
    _cli("extract", str(image_tree), "--out", str(tmp_path / "tiny"), "--backbone", "tiny_test", "--json")
    assert "no text tower" in " ".join(_fails("probe", str(tmp_path / "tiny"), "--zero-shot-only").split())
    out = _cli("probe", str(tmp_path / "tiny"), "--out", str(tmp_path / "p.json"), "--json")
    assert "zero_shot" not in json.loads(out)  # a CNN's probe is unchanged


def test_index_build_measures_text_to_image_recall_on_captions(clip: dict, tmp_path: Path) -> None:  # type: ignore[type-arg]
    """Measured by the build itself (`index build`, `build_index()`, in memory or streamed with lists on
    disk), saved in the index record, shown by `index info`, the Python API and `GET /indexes`."""
    from fastapi.testclient import TestClient

    import embedder
    from embedder.service.app import create_app
    from embedder.service.options import ServeOptions

    files = clip["files"]
    caps = [f"picture {i} of the collection" for i in range(len(files) - 1)] + ["word " * 90]  # one over 77
    table = tmp_path / "cap.parquet"
    pq.write_table(pa.table({"image": [f.read_bytes() for f in files], "caption": caps}), table)
    store = tmp_path / "capstore"
    home = tmp_path / "h"
    w = ["--weights", str(clip["wfile"])]
    _cli("extract", str(table), "--out", str(store), "--backbone", NAME, "--json", *w)
    # recall@k by hand: OpenCLIP's own text vectors of the captions that fit, against the stored
    # image vectors by cosine
    t = Store.open(store).read(["id", "embedding", "caption"])
    x = np.stack(t.column("embedding").to_numpy(zero_copy_only=False))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    kept = [i for i, c in enumerate(t.column("caption").to_pylist()) if len(c) < 300]
    q = _ref_text(clip, [t.column("caption")[i].as_py() for i in kept])
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    rank = np.argsort(-(q @ x.T), axis=1)
    want = {f"recall_at_{k}": float(np.mean([i in rank[r, :k] for r, i in enumerate(kept)])) for k in (1, 5, 10)}

    out = _cli("index", "build", str(store), "--name", "cli", "--home", str(home), *w)
    assert "text→image recall@1" in out and "1 left out" in out
    tr = json.loads(_cli("index", "info", "cli", "--home", str(home), "--json"))["text_recall"]
    assert (tr["captions"], tr["skipped"], tr["captioned_rows"], tr["rows"]) == (7, 1, 8, 8)
    assert {k: tr[k] for k in want} == pytest.approx(want)
    assert "text→image recall@1" in _cli("index", "info", "cli", "--home", str(home))
    # the Python API's build, streamed with lists on disk: the same row numbers, the same ranking
    streamed = embedder.build_index(store, "disk", home=home, kind="ivf", on_disk=True, weights=clip["wfile"])
    assert streamed.info["on_disk"] and {k: streamed.info["text_recall"][k] for k in want} == pytest.approx(want)
    with TestClient(create_app(ServeOptions(home=str(home), poll_seconds=0))) as c:
        _wait_ready(c)
        listed = {d["name"]: d for d in c.get("/indexes").json()}
        assert listed["cli"]["text_recall"] == tr and c.get("/indexes/disk").json()["text_recall"]["captions"] == 7
    # without the weights file the index is still built; the record says why recall was not measured (a
    # copy of the store whose manifest no longer says where its file was: it is never guessed)
    import shutil

    shutil.copytree(store, home / "forgot")
    manifest = json.loads((home / "forgot" / "_manifest.json").read_text())
    for run in manifest["runs"]:
        run.pop("weights_file", None)
    (home / "forgot" / "_manifest.json").write_text(json.dumps(manifest))
    bare = embedder.build_index(home / "forgot", "bare", home=home, kind="flat")
    assert "--weights" in bare.info["text_recall"]["not_measured"]
    assert "text → image recall not measured" in " ".join(_cli("index", "info", "bare", "--home", str(home)).split())
    # and not at all when asked not to
    assert "text_recall" not in embedder.build_index(store, "off", home=home, kind="flat", text_recall=False).info


def _hub_cache(root: Path, repo: str, filename: str, src: Path) -> Path:
    """A Hugging Face hub cache as huggingface_hub lays it out: refs/main names a snapshot holding the file."""
    base = root / "hub" / ("models--" + repo.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    os.link(src, snap / filename)
    return snap / filename


def test_the_default_hub_path_offline_loads_the_cached_file(clip: dict, tmp_path: Path) -> None:  # type: ignore[type-arg]
    """What a user's machine does after a first download: no --weights, the name alone, the file found
    in the Hugging Face cache with HF_HUB_OFFLINE=1. The vectors are the --weights file's, the record
    names the file's SHA-256; `embedder backbones` says the weights are present."""
    hf = tmp_path / "hf"
    _hub_cache(hf, HUB_REPO, "open_clip_model.safetensors", clip["wfile"])
    env = {**os.environ, "HF_HOME": str(hf), "HF_HUB_OFFLINE": "1", "EMBEDDER_OFFLINE": "1"}
    out = tmp_path / "hubstore"
    r = subprocess.run([sys.executable, "-m", "embedder", "extract", str(clip["root"] / "imgs"), "--out", str(out),
                        "--backbone", NAME, "--json"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = _stored(out), _stored(clip["store"])
    assert a.keys() == b.keys() and all(np.allclose(a[k], b[k], atol=1e-6) for k in a)
    prov = Store.open(out).provenance
    assert prov.weights.kind == "hub" and prov.weights.sha256 == Store.open(clip["store"]).provenance.weights.sha256
    r = subprocess.run([sys.executable, "-m", "embedder", "backbones", "--json"], env=env, capture_output=True,
                       text=True, timeout=120)
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert rows[NAME]["present"] is True and rows["open_clip:ViT-B-32:openai"]["present"] is False
    assert rows[NAME]["text_tower"] is True and rows[NAME]["dim"] == 512
    # an empty cache offline: one line naming the hub file and the fixes
    env["HF_HOME"] = str(tmp_path / "empty")
    r = subprocess.run([sys.executable, "-m", "embedder", "extract", str(clip["root"] / "imgs"), "--out",
                        str(tmp_path / "x"), "--backbone", NAME], env=env, capture_output=True, text=True, timeout=300)
    msg = " ".join(r.stderr.split()) + " ".join(r.stdout.split())
    assert r.returncode == 2 and HUB_REPO in msg and "--weights FILE" in msg, msg


def test_weights_import_installs_a_family_file_where_the_name_alone_finds_it(clip: dict, tmp_path: Path) -> None:  # type: ignore[type-arg]
    """`embedder weights import FILE --backbone NAME` for timm and OpenCLIP: checked by loading, put in
    the Hugging Face cache; then `--backbone NAME` alone, offline, gives the --weights FILE vectors."""
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "EMBEDDER_OFFLINE": "1"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "embedder", *args], env=env, capture_output=True, text=True,
                              timeout=300)

    torch.manual_seed(4)
    net = timm.create_model("resnet18", pretrained=False)
    tfile = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tfile))
    imgs = str(clip["root"] / "imgs")
    for name, wfile in [("timm:resnet18.a1_in1k", tfile), (NAME, clip["wfile"])]:
        r = run("weights", "import", str(wfile), "--backbone", name)
        assert r.returncode == 0 and "installed" in r.stdout and "not hub-verified" in r.stdout, r.stderr[-2000:]
        by_name, by_file = tmp_path / f"{name}-hub", tmp_path / f"{name}-file"
        assert run("extract", imgs, "--out", str(by_name), "--backbone", name, "--json").returncode == 0
        if name == NAME:
            by_file = clip["store"]  # the module's store: made with --weights FILE
        else:
            _cli("extract", imgs, "--out", str(by_file), "--backbone", name, "--weights", str(wfile), "--json")
        a, b = _stored(by_name), _stored(by_file)
        assert a.keys() == b.keys() and all(np.allclose(a[k], b[k], atol=1e-6) for k in a), name
        weights = Store.open(by_name).provenance.weights
        assert weights.kind == "hub" and "imported by `embedder weights import`, not verified" in weights.name
    r = run("weights", "import", str(tfile), "--backbone", NAME)  # a ResNet-18 file is no MobileCLIP
    assert r.returncode == 2 and "does not fit" in r.stderr + r.stdout


def test_text_search_on_the_page_and_through_the_cli_client(clip: dict, tmp_path: Path) -> None:  # type: ignore[type-arg]
    """A real `embedder serve` (uvicorn) on a CLIP index: `search --text --server` and the page's text
    box (Enter searches) give the service's own answer; an over-long text shows the error, no results."""
    from tests.test_service import _free_port, _wait_served

    home = tmp_path / "home"
    _cli("index", "build", str(clip["store"]), "--name", "c", "--home", str(home))
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "embedder", "serve", "--home", str(home), "--port", str(port),
                             "--weights", f"c={clip['wfile']}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_served(url, proc)
        import urllib.request

        req = urllib.request.Request(url + "/search", data=json.dumps({"text": "a small dog", "k": 5}).encode(),
                                     headers={"content-type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=60) as r:
            want = [h["id"] for h in json.loads(r.read())["results"][0]]
        r2 = subprocess.run([sys.executable, "-m", "embedder", "search", "c", "--text", "a small dog", "-k", "5",
                             "--server", url, "--json"], capture_output=True, text=True, timeout=60)
        assert r2.returncode == 0, r2.stderr
        hits = [json.loads(line) for line in r2.stdout.splitlines()]
        assert [h["id"] for h in hits] == want and hits[0]["query"] == "text:a small dog"
        with chromium_page() as (page, errors):
            page.goto(url + "/")
            page.wait_for_selector("#index option", state="attached")
            page.wait_for_function("() => !document.querySelector('#text').disabled")
            page.fill("#k", "5")
            page.fill("#text", "a small dog")
            page.press("#text", "Enter")
            page.wait_for_function("() => document.querySelectorAll('#results li').length === 5")
            assert page.eval_on_selector_all("#results button", "bs => bs.map(b => b.dataset.id)") == want
            page.fill("#text", "word " * 90)
            page.press("#text", "Enter")
            page.wait_for_selector("#error:not([hidden])")
            assert "context length" in page.inner_text("#error")
            assert page.eval_on_selector_all("#results li", "ls => ls.length") == 0
            assert errors == []
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def test_python_api_embeds_text_and_searches_by_it(clip: dict, tmp_path: Path) -> None:  # type: ignore[type-arg]
    import embedder

    emb = embedder.Embedder(NAME, weights=clip["wfile"])
    got = emb.embed_text(["a photo of a cat", "two dogs"])
    assert _cos(got, _ref_text(clip, ["a photo of a cat", "two dogs"])).min() >= 0.9999
    embedder.build_index(clip["store"], "api", home=tmp_path / "h")
    index = embedder.open_index("api", home=tmp_path / "h", weights=clip["wfile"])
    hits = index.search(text="a photo of a cat", k=3)
    vecs = _stored(clip["store"])
    want = _cos(np.stack([vecs[h.id] for h in hits[0]]), np.repeat(got[:1], 3, 0))
    assert np.allclose([h.score for h in hits[0]], want, atol=1e-4)
    from embedder.errors import TextQueryError

    with pytest.raises(TextQueryError, match="empty"):
        emb.embed_text("")


def test_a_stage_of_the_image_tower_as_layer(clip: dict, tmp_path: Path) -> None:  # type: ignore[type-arg]
    """`backbones --layers` lists the image tower's stages (never the text tower's blocks); `--layer`
    at one gives OpenCLIP's own activations there, average-pooled; text is refused on such vectors."""
    layers = _cli("backbones", "--layers", NAME).split()
    assert layers == [f"clip.visual.trunk.stages.{i}" for i in range(4)]
    out = tmp_path / "stage"
    _cli("extract", str(clip["root"] / "imgs"), "--out", str(out), "--backbone", NAME, "--weights",
         str(clip["wfile"]), "--layer", layers[2], "--json")
    seen: list[torch.Tensor] = []
    hook = clip["ref"].visual.trunk.stages[2].register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.inference_mode():
        clip["ref"].encode_image(torch.stack([clip["transform"](Image.open(f)) for f in clip["files"]]))
    hook.remove()
    want = seen[0].mean(dim=(-2, -1)).numpy()
    stored = _stored(out)
    got = np.stack([stored[image_id(f)] for f in clip["files"]])
    assert got.shape == want.shape and _cos(got, want).min() >= 0.9999
    assert Store.open(out).provenance.layer == layers[2]
    home = tmp_path / "h"
    _cli("index", "build", str(out), "--name", "s", "--home", str(home))
    msg = _fails("search", "s", "--home", str(home), "--text", "a cat", "--weights", str(clip["wfile"]))
    assert "not the model's image embedding" in msg

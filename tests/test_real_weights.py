"""Real ImageNet weights: loading and preprocessing are right iff the original head, applied to
the stored penultimate vectors, classifies known photos correctly."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import models
from typer.testing import CliRunner

from embedder.cli import app
from embedder.store.shards import Store, arrow_to_embeddings
from tests.conftest import mobilenet_weights_file, skimage_data

runner = CliRunner()
pytestmark = pytest.mark.slow


def test_mobilenet_v2_penultimate_plus_original_head_classifies(tmp_path: Path) -> None:
    r = runner.invoke(app, ["weights", "import", str(mobilenet_weights_file())])
    assert r.exit_code == 0, r.output
    assert "mobilenet_v2:IMAGENET1K_V1" in r.output
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for name in ("chelsea.png", "coffee.png", "camera.png"):
        shutil.copy(skimage_data(name), imgs / name)
    store = tmp_path / "store"
    r = runner.invoke(app, ["extract", str(imgs), "--out", str(store), "--backbone",
                            "mobilenet_v2:IMAGENET1K_V1", "--batch-size", "2"])
    assert r.exit_code == 0, r.output
    st = Store.open(store)
    prov = st.provenance
    assert prov.weights.name == "MobileNet_V2_Weights.IMAGENET1K_V1" and prov.weights.kind == "registry"
    assert prov.weights.sha256.startswith("b0353104")
    assert prov.preprocessing.resize_size == 256 and prov.dim == 1280

    t = st.read(["path", "embedding"])
    x = torch.from_numpy(arrow_to_embeddings(t.column("embedding")))
    state = torch.load(mobilenet_weights_file(), map_location="cpu", weights_only=True)
    logits = x @ state["classifier.1.weight"].T + state["classifier.1.bias"]
    cats = models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]
    top = {Path(p).name: cats[int(i)] for p, i in zip(t.column("path").to_pylist(), logits.argmax(1))}
    assert top["chelsea.png"] in {"Egyptian cat", "tabby", "tiger cat"}
    assert top["coffee.png"] == "espresso"
    assert top["camera.png"] == "tripod"

    # and the full torchvision model on torchvision's own preprocessing agrees to float tolerance
    from PIL import Image

    model = models.mobilenet_v2()
    model.load_state_dict(state)
    model.classifier = torch.nn.Identity()
    model.eval()
    tf = models.MobileNet_V2_Weights.IMAGENET1K_V1.transforms()
    with torch.no_grad():
        for i, p in enumerate(t.column("path").to_pylist()):
            ref = model(tf(Image.open(p).convert("RGB"))[None])[0].numpy()
            np.testing.assert_allclose(x[i].numpy(), ref, rtol=1e-4, atol=1e-4)

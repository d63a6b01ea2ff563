from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from embedder.cli import app

runner = CliRunner()


def _ok(args: list[str], code: int = 0) -> str:
    r = runner.invoke(app, args)
    assert r.exit_code == code, (r.exit_code, r.output, r.exception)
    return r.output


def test_extract_info_json(image_tree: Path, tmp_path: Path) -> None:
    store = str(tmp_path / "st")
    out = _ok(["extract", str(image_tree), "--out", store, "--backbone", "tiny_test", "--json"])
    summary = json.loads(out)
    assert summary["done"] == 11 and summary["failed"] == 0 and summary["device"] == "cpu"
    info = json.loads(_ok(["info", store, "--json"]))
    assert info["rows"] == 11 and info["dim"] == 32 and info["labels"] == {"cat": 6, "dog": 5}
    assert info["provenance"]["backbone"] == "tiny_test"
    text = _ok(["info", store])
    assert "11 rows" in text and "tiny_test" in text


def test_failed_images_set_exit_status(image_tree: Path, tmp_path: Path) -> None:
    (image_tree / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    out = _ok(["extract", str(image_tree), "--out", str(tmp_path / "st"), "--backbone", "tiny_test"], 3)
    assert "failed 1" in out and "broken.jpg" in out


def _one_line_error(args: list[str], needle: str) -> None:
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    assert r.output.startswith("error:") and needle in r.output, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception  # no traceback behind it


def test_bad_input_is_one_line(image_tree: Path, tmp_path: Path) -> None:
    _one_line_error(["extract", str(tmp_path / "nope"), "--out", str(tmp_path / "s")], "does not exist")
    _one_line_error(["extract", str(image_tree), "--out", str(tmp_path / "s"), "--backbone", "resnet5"],
                    "Valid:")
    (tmp_path / "f").write_text("x")
    _one_line_error(["extract", str(image_tree), "--out", str(tmp_path / "f" / "s"), "--backbone",
                     "tiny_test"], "cannot create store")
    _one_line_error(["extract", str(image_tree), "--out", str(tmp_path / "s"), "--backbone", "resnet18"],
                    "embedder weights import")
    _one_line_error(["extract", str(image_tree), "--out", str(tmp_path / "s"), "--backbone", "tiny_test",
                     "--device", "cuda:3"], "--device cpu")
    _one_line_error(["info", str(tmp_path)], "not an embedding store")
    _one_line_error(["weights", "import", str(tmp_path / "f")], "matches no weights")


def test_backbones_listing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    rows = json.loads(_ok(["backbones", "--json"]))
    by = {r["name"]: r for r in rows}
    assert by["resnet50"]["dim"] == 2048 and by["resnet50"]["acc1"] > 80 and by["resnet50"]["gflops"] > 4
    assert by["resnet50"]["weights"] == "IMAGENET1K_V2" and by["resnet50"]["present"] is False
    cache = tmp_path / "th" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / by["resnet50"]["file"]).write_bytes(b"")  # present means: the file is in torchvision's cache
    by = {r["name"]: r for r in json.loads(_ok(["backbones", "--json"]))}
    assert by["resnet50"]["present"] is True and by["resnet18"]["present"] is False
    # another tag than the default (the demo's MobileNetV2 IMAGENET1K_V1): said, not "no"
    from embedder.models.hub import registry_file
    from embedder.models.registry import REGISTRY

    (cache / registry_file(REGISTRY["mobilenet_v2"], "IMAGENET1K_V1")[1].name).write_bytes(b"")
    by = {r["name"]: r for r in json.loads(_ok(["backbones", "--json"]))}
    assert by["mobilenet_v2"]["present"] is False and by["mobilenet_v2"]["present_files"] == [
        "mobilenet_v2-b0353104.pth"]
    row = next(ln for ln in _ok(["backbones"]).splitlines() if "mobilenet_v2 " in ln)
    assert row.rstrip(" │").endswith("another tag's")  # not "no"
    assert "layer3" in _ok(["backbones", "--layers", "resnet50"])


def test_bracketed_help_text_survives_rich_markup() -> None:
    """Every option's help is rendered as written: brackets (pip extras, 'cuda[:N]', defaults) are
    never eaten as rich markup."""
    import re

    import typer.main

    def walk(cmd, path):  # type: ignore[no-untyped-def]
        sub = getattr(cmd, "commands", None)
        if sub:
            for name, c in sub.items():
                yield from walk(c, [*path, name])
        else:
            yield path, cmd

    checked = 0
    for path, cmd in walk(typer.main.get_command(app), []):
        r = runner.invoke(app, [*path, "--help"], terminal_width=400, env={"COLUMNS": "400"})
        assert r.exit_code == 0, (path, r.output)
        text = " ".join(r.output.split())
        for p in cmd.params:
            for bracketed in re.findall(r"\[[^\]]*\]", (p.help or "").replace("\\[", "[")):
                assert bracketed in text, (path, p.name, bracketed)
                checked += 1
    assert checked >= 2  # at least 'embedder[ray]', 'embedder[umap]' and 'cuda[:N]' are checked


def test_choices_are_checked_when_parsing(image_tree: Path, tmp_path: Path) -> None:
    r = runner.invoke(app, ["extract", str(image_tree), "--out", str(tmp_path / "s"), "--decoder", "pillow"])
    assert r.exit_code == 2 and "pil-reduce" in r.output and "torchvision" in r.output  # the valid ones listed
    assert not (tmp_path / "s").exists()
    r = runner.invoke(app, ["index", "build", str(tmp_path / "s"), "--name", "x", "--target-recall", "2"])
    assert r.exit_code == 2 and "target-recall" in r.output
    r = runner.invoke(app, ["index", "build", str(tmp_path / "s"), "--name", "x", "--metric", "cos"])
    assert r.exit_code == 2 and "cosine" in r.output
    _one_line_error(["extract", str(image_tree), "--out", str(tmp_path / "s"), "--backbone", "tiny_test",
                     "--fast-decode", "--decoder", "torchvision"], "--fast-decode is --decoder pil-draft")
    _one_line_error(["extract", str(image_tree), "--out", str(tmp_path / "s"), "--backbone", "tiny_test",
                     "--engine", "ray", "--workers", "2"], "--actors")
    _one_line_error(["extract", str(image_tree), "--out", str(tmp_path / "s"), "--backbone", "tiny_test",
                     "--actors", "2"], "--engine ray")
    assert "memory-budget-gb" not in runner.invoke(app, ["index", "build", "--help"]).output


def test_version_and_short_help_and_a_readable_help_at_80_columns() -> None:
    """`embedder --version` and `-h` work; at 80 columns an option's help gets most of the line (rich's
    boxed table left it ~16 characters) and a flag shows no <bool> type."""
    from embedder._version import __version__

    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"embedder {__version__}"
    r = runner.invoke(app, ["probe", "-h"], terminal_width=80, env={"COLUMNS": "80"})
    assert r.exit_code == 0 and "Usage: embedder probe" in r.output
    assert "<bool>" not in r.output and "│" not in r.output
    line = next(ln for ln in r.output.splitlines() if ln.lstrip().startswith("--val-fraction"))
    assert "Held out from train to choose C." in line  # the help beside its option, not folded to bits


def test_fit_paths_keeps_file_names_and_a_shards_own_name() -> None:
    from embedder.cli.common import fit_paths

    assert fit_paths(["/x/y/cat/1.jpg", "/x/y/dog/2.jpg"], 40) == ("/x/y", ["cat/1.jpg", "dog/2.jpg"])
    # rows of one table: the table's name stays (the common root is not cut inside it)
    assert fit_paths(["/x/t.parquet#image/0/12", "/x/t.parquet#image/0/3"], 40)[1] == [
        "t.parquet#image/0/12", "t.parquet#image/0/3"]
    long = "/a/" + "b" * 50 + "/IMG_2041.jpg"
    assert fit_paths([long, "/c/d.jpg"], 20)[1][0] == "…" + long[-19:]  # cut from the left


def test_appending_without_a_backbone_uses_the_stores_own_model(image_tree: Path, tmp_path: Path) -> None:
    """A second extract into a store, naming no model, tried the default resnet50 (refused, or a
    download) instead of the store's own."""
    out = tmp_path / "s"
    r = runner.invoke(app, ["extract", str(image_tree / "cat"), "--out", str(out), "--backbone", "tiny_test"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["extract", str(image_tree / "dog"), "--out", str(out), "--json"])
    assert r.exit_code == 0 and "with its own model: tiny_test" in r.output, r.output
    from embedder.store.shards import Store

    assert Store.open(out).count() == len(list(image_tree.rglob("*.jpg")))

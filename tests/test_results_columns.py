"""What a hit carries beyond id, path and label (issue 34, item 2): a captioned tar index returns each
hit's caption in `search --json`, the CLI table, `/search` and `/items`; the user's key (`--id-column`)
comes back as `key`, `search --id KEY` and `--where key=K` find its row; columns the user asks to keep
(`index build --keep-columns`) come back under `columns`, in memory and on disk, through `index add`
too; indexes built without them (and stores without captions) answer exactly as before."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from embedder.cli import app
from embedder.embed.fill import extract
from embedder.embed.options import RunOptions
from embedder.index import build as idx
from embedder.index import plan as index_plan
from embedder.index.search import LoadedIndex
from embedder.io.options import SourceOptions
from embedder.models.builder import ModelSpec
from embedder.store.shards import Store
from tests.conftest import make_images
from tests.test_shards_tables import write_shards

TINY = ModelSpec("tiny_test")
PLAIN = ("rank", "score", "id", "path", "label")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return sorted(make_images(tmp_path_factory.mktemp("photos"), {"red": 4, "blue": 4}, seed=4))


@pytest.fixture(scope="module")
def tar_store(files: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tar")
    shards = write_shards(root / "shards", files, 4)  # KEY.jpg + KEY.txt "a photo of something red|blue"
    extract([str(s) for s in shards], str(root / "store"), TINY)
    return root / "store"


def _table(path: Path, files: list[Path], keys: list[str], row_group_size: int = 3) -> None:
    pq.write_table(pa.table({
        "key": keys, "image": pa.array([f.read_bytes() for f in files], pa.binary()),
        "url": [f"https://example.com/{k}.jpg" for k in keys], "n": list(range(len(keys))),
        "tags": [[k, "x"] for k in keys]}), path, row_group_size=row_group_size)


@pytest.fixture(scope="module")
def table_store(files: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("table")
    _table(root / "t1.parquet", files[:6], [f"k{i}" for i in range(6)])
    extract([str(root / "t1.parquet")], str(root / "store"), TINY,
            run=RunOptions(sources=SourceOptions(id_column="key")))
    return root / "store"


def _cli(*args: str) -> str:
    r = CliRunner().invoke(app, list(args), env={"COLUMNS": "80"})
    assert r.exit_code == 0, r.output
    return r.output


def _json(*args: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in _cli(*args, "--json").splitlines() if line.startswith("{")]


def test_a_captioned_tar_index_returns_captions_in_json_the_table_the_service_and_items(
        tar_store: Path, files: list[Path], tmp_path: Path) -> None:
    home = str(tmp_path / "idx")
    _cli("index", "build", str(tar_store), "--name", "caps", "--home", home)
    hits = _json("search", "caps", str(files[0]), "-k", "3", "--home", home)
    assert len(hits) == 3 and all(h["caption"] == f"a photo of something {h['label']}" for h in hits), hits
    assert LoadedIndex("caps", home).meta["columns"] == ["caption"]  # no key: the store's ids are locations
    table = _cli("search", "caps", str(files[0]), "-k", "3", "--home", home)
    rows = [line for line in table.splitlines() if line[:1] in "┏┃┡│└"]
    assert table.count("a photo of something") == 3 and max(map(len, rows)) <= 80, table
    import embedder  # the Python API's Hit carries it too

    api_hits = embedder.open_index("caps", home=home).search(str(files[0]), k=3)[0]
    assert [h.caption for h in api_hits] == [h["caption"] for h in hits] and api_hits[0].key is None

    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from embedder.service.app import create_app
    from embedder.service.options import ServeOptions
    from tests.test_service import _wait_ready

    with TestClient(create_app(ServeOptions(home=home, poll_seconds=0))) as c:
        _wait_ready(c)
        r = c.post("/search", files={"file": ("q.jpg", files[0].read_bytes(), "image/jpeg")},
                   data={"index": "caps", "k": "2"})
        assert r.status_code == 200, r.text
        got = r.json()["results"][0]
        assert [h["caption"] for h in got] == [h["caption"] for h in hits[:2]] and "key" not in got[0], got
        r = c.post("/search", json={"index": "caps", "k": 2, "id": hits[0]["id"]})
        assert r.json()["results"][0][0]["caption"] == hits[0]["caption"]
        item = c.get(f"/items/caps/{hits[1]['id']}").json()
        assert item["caption"] == hits[1]["caption"] and item["path"] == hits[1]["path"], item


def test_the_users_key_and_kept_columns_come_back_and_find_rows(table_store: Path, files: list[Path],
                                                               tmp_path: Path) -> None:
    home = str(tmp_path / "idx")
    for name, more in (("mem", []), ("disk", ["--kind", "ivf", "--on-disk"])):
        _cli("index", "build", str(table_store), "--name", name, "--home", home,
             "--keep-columns", "key,url,n,tags", *more)
        by_key = _json("search", name, "--id", "k3", "-k", "2", "--home", home)
        first = by_key[0]
        assert first["key"] == "k3" and first["score"] == pytest.approx(1.0, abs=1e-4), by_key
        assert first["columns"] == {"url": "https://example.com/k3.jpg", "n": "3", "tags": '["k3", "x"]'}
        assert "caption" not in first  # not asked, and the table has none
        where = _json("search", name, str(files[0]), "--where", "key=k5", "-k", "3", "--home", home)
        assert [h["key"] for h in where] == ["k5"], where
        assert _json("search", name, str(files[0]), "--where", "url=https://example.com/k1.jpg", "-k", "3",
                     "--home", home)[0]["key"] == "k1"
        # embedder's own id still works, whole or as the table's 12-character prefix
        assert _json("search", name, "--id", first["id"][:12], "-k", "1", "--home", home)[0]["key"] == "k3"
        assert LoadedIndex(name, home).item(first["id"])["columns"]["n"] == "3"

    # a second table with the same keys (per-file keys: other items): index add brings its rows'
    # keys and columns; a key now names two items, and --id says so instead of picking one
    src = table_store.parent
    _table(src / "t2.parquet", files[6:], ["k0", "k9"])
    extract([str(src / "t2.parquet")], str(table_store), TINY, run=RunOptions(sources=SourceOptions(id_column="key")))
    for name in ("mem", "disk"):
        assert idx.add(name, str(table_store), home)["added"] == 2
        assert _json("search", name, "--id", "k9", "-k", "1", "--home", home)[0]["columns"]["n"] == "1"
        r = CliRunner().invoke(app, ["search", name, "--id", "k0", "--home", home], env={"COLUMNS": "80"})
        assert r.exit_code != 0 and "several items" in r.output and "t1.parquet" in r.output, r.output


def test_key_by_default_and_what_keep_columns_refuses(table_store: Path, tmp_path: Path) -> None:
    home = str(tmp_path / "idx")
    meta = idx.build(str(table_store), "plain", index_home=home)
    assert meta["columns"] == ["key"] and meta["key_column"] == "key"  # no caption in this store
    r = CliRunner().invoke(app, ["index", "build", str(table_store), "--name", "bad", "--home", home,
                                 "--keep-columns", "nope"])
    assert r.exit_code != 0 and "no source table of this store has column 'nope'" in r.output, r.output
    r = CliRunner().invoke(app, ["index", "build", str(table_store), "--name", "bad", "--home", home,
                                 "--keep-columns", "path"])
    assert r.exit_code != 0 and "in every index already" in r.output, r.output
    r = CliRunner().invoke(app, ["index", "build", str(table_store), "--name", "bad", "--home", home,
                                 "--keep-columns", "image"])
    assert r.exit_code != 0 and "image bytes" in r.output, r.output


def test_indexes_and_stores_without_them_answer_as_before(tar_store: Path, files: list[Path],
                                                         tmp_path: Path) -> None:
    """An index built with nothing kept (as every index was before), and a store whose shards predate
    the caption column: hits have exactly rank, score, id, path, label; index add keeps the id map's
    schema; the service sends no caption key."""
    home = str(tmp_path / "idx")
    meta = idx.build(str(tar_store), "lean", index_plan.BuildOptions(), home, keep_columns=("none",))
    assert "columns" not in meta
    assert pq.read_schema(Path(home) / "lean" / f"gen-{meta['generation']:06d}" / "ids.parquet").names == [
        "faiss_id", "id", "path", "label"]
    hits = _json("search", "lean", str(files[0]), "-k", "2", "--home", home)
    assert [tuple(h) for h in hits] == [("query", *PLAIN)] * 2

    old = tmp_path / "old"  # a store written before captions: its shards lack the column
    shutil.copytree(tar_store, old)
    for shard in Store.open(old).shard_files():
        t = pq.read_table(shard)
        pq.write_table(t.drop_columns(["caption"]).replace_schema_metadata(t.schema.metadata), shard)
    for name, opts in (("old-mem", index_plan.BuildOptions()),
                       ("old-disk", index_plan.BuildOptions(kind="ivf", on_disk=True))):
        meta = idx.build(str(old), name, opts, home)
        assert "columns" not in meta
        assert [tuple(h) for h in _json("search", name, str(files[0]), "-k", "2", "--home", home)] == [
            ("query", *PLAIN)] * 2
    extract([str(files[0].parent)], str(old), TINY)  # new rows, with captions' column (null)
    for name in ("lean", "old-mem", "old-disk"):
        idx.add(name, str(old), home)
        loaded = LoadedIndex(name, home)
        assert loaded.extras == [] and tuple(loaded.search(loaded.vector_of(hits[0]["id"]), 1)[0][0]) == PLAIN

    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from embedder.service.app import create_app
    from embedder.service.options import ServeOptions
    from tests.test_service import _wait_ready

    with TestClient(create_app(ServeOptions(home=home, poll_seconds=0))) as c:
        _wait_ready(c)
        r = c.post("/search", json={"index": "lean", "k": 1, "id": hits[0]["id"]})
        assert list(r.json()["results"][0][0]) == list(PLAIN), r.text
        assert set(c.get(f"/items/lean/{hits[0]['id']}").json()) == {"faiss_id", "id", "path", "label"}


def test_column_reader_reads_rows_at_their_locations_and_nulls_elsewhere(tmp_path: Path) -> None:
    """Rows of two tables (one without the column), in any order, among paths that are no table's row
    (a file, a tar member, a malformed or out-of-range location): each value read at its row."""
    from embedder.io.tables import ColumnReader

    a, b = tmp_path / "a.parquet", tmp_path / "b.arrow"
    pq.write_table(pa.table({"image": pa.array([b"x"] * 5, pa.binary()), "n": [10, 11, 12, 13, 14]}), a,
                   row_group_size=2)
    with pa.ipc.new_file(str(b), pa.schema([("image", pa.binary())])) as w:
        w.write_table(pa.table({"image": pa.array([b"y"], pa.binary())}))
    paths = [f"{a}#image/1/1", f"{a}#image/0/0", str(tmp_path / "x.jpg"), None, f"{tmp_path}/s.tar#k.jpg",
             f"{a}#image/2/0", f"{b}#image/0/0", f"{a}#image/0/9", f"{a}#image/x/0", f"{a}#image/1/0"]
    r = ColumnReader({"m": "n"})
    assert r.read(paths)["m"].to_pylist() == ["13", "10", None, None, None, "14", None, None, None, "12"]
    assert r.found == {"m"}

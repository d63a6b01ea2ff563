"""Tables of image bytes as sources: what decoding holds in memory (a window of rows, not a row
group), Arrow streams opened once per process, ids from keys (per table unless global; the scheme
recorded in the store), and Hugging Face's "no label"."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from embedder.cli import app
from embedder.decode.common import read_bytes
from embedder.embed.fill import extract
from embedder.embed.options import RunOptions
from embedder.io.options import SourceOptions
from embedder.io.sources import discover
from embedder.io.uri import image_id
from embedder.models.builder import ModelSpec
from embedder.store.shards import Store
from tests.conftest import make_images

TINY = ModelSpec("tiny_test")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    root = tmp_path_factory.mktemp("jpegs")
    return [p.read_bytes() for p in sorted(make_images(root, {"a": 4, "b": 4}, seed=3))]


def test_one_row_group_is_read_a_window_at_a_time_whatever_the_threads(tmp_path: Path) -> None:
    """A 32 MB table in one row group (pyarrow's default group is 1 Mi rows: most tables are one
    group), read back row by row by four threads as decode threads do: Arrow's memory never holds
    the group (it held one per thread: 4x the group), and every row comes back whole."""
    rows = [os.urandom(8_000) for _ in range(4_000)]
    path = tmp_path / "one_group.parquet"
    pq.write_table(pa.table({"image": pa.array(rows, pa.binary())}), path, row_group_size=len(rows),
                   write_batch_size=64)  # pages of 64 rows (pyarrow's 1,024 would make them 8 MB)
    child = textwrap.dedent(f"""
        import hashlib, json, sys
        from concurrent.futures import ThreadPoolExecutor
        import pyarrow as pa
        from embedder.io import tables
        tables.WINDOW_BYTES, tables.CACHE_BYTES = 256 << 10, 2 << 20
        locs = [r.locator for r in tables.iter_rows({str(path)!r})]
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(tables.read_row, locs))
        print(json.dumps({{"peak": pa.default_memory_pool().max_memory(),
                          "sha": hashlib.sha256(b"".join(got)).hexdigest()}}))
        """)
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["sha"] == hashlib.sha256(b"".join(rows)).hexdigest()
    group = sum(map(len, rows))
    # 7.7 MB when the threads keep pace (one place in the group read forward, windows of 256 KiB,
    # 2 MiB of them kept); a thread that falls behind the kept windows gets its own place; before,
    # 112 MB with one thread and 247 MB with four
    assert got["peak"] < 0.75 * group, f"Arrow's peak {got['peak'] / 1e6:.1f} MB for a {group / 1e6:.0f} MB group"


def test_rows_of_a_group_read_out_of_order_and_across_groups_are_right(tmp_path: Path) -> None:
    """Windows kept, windows read again after they were let go, several groups: the right bytes."""
    from embedder.io import tables

    rows = [os.urandom(100 + i) for i in range(300)]
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"image": pa.array(rows, pa.binary())}), path, row_group_size=120)
    locs = [r.locator for r in tables.iter_rows(str(path))]
    order = list(range(0, 300, 7)) + list(range(299, -1, -13)) + list(range(300))
    old = tables.WINDOW_BYTES, tables.CACHE_BYTES
    tables.WINDOW_BYTES, tables.CACHE_BYTES = 2_000, 5_000  # windows of ~15 rows, a few kept
    try:
        with ThreadPoolExecutor(3) as pool:
            got = list(pool.map(lambda i: tables.read_row(locs[i]), order))
    finally:
        tables.WINDOW_BYTES, tables.CACHE_BYTES = old
    assert got == [rows[i] for i in order]


def test_two_lanes_decoding_batches_far_apart_in_one_group_each_read_forward(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two CPU model lanes decode a batch each, 64 rows apart, in one group: each reads forward
    from where it is (one shared place in the group had each lane's windows let go before it
    came to them, and the group read again from its start, again and again)."""
    from embedder.io import tables

    rows = [os.urandom(1_000) for _ in range(1_280)]
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"image": pa.array(rows, pa.binary())}), path, row_group_size=len(rows),
                   write_batch_size=16)
    locs = [r.locator for r in tables.iter_rows(str(path))]
    monkeypatch.setattr(tables, "WINDOW_BYTES", 10_000)  # windows of 10 rows, 4 of them kept
    monkeypatch.setattr(tables, "CACHE_BYTES", 45_000)
    read: list[int] = []
    keep = tables._Cache.keep
    monkeypatch.setattr(tables._Cache, "keep", lambda self, key, w: read.append(key[3]) or keep(self, key, w))
    batch = 64

    def lane(first: int) -> list[bytes]:
        return [tables.read_row(locs[i]) for b in range(first, len(locs) // batch, 2)
                for i in range(b * batch, (b + 1) * batch)]

    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(lane, (0, 1))
    want = [[rows[i] for b in range(first, 20, 2) for i in range(b * batch, (b + 1) * batch)] for first in (0, 1)]
    assert [a, b] == want
    # about once per lane (it was read again from its start for most windows: thousands)
    assert len(read) <= 3 * len(rows) // 10, f"{len(read)} windows read for a group of {len(rows) // 10}"


def _stream(path: Path, images: list[bytes], batches: int) -> list[bytes]:
    """An Arrow stream file (what ``datasets.save_to_disk`` writes) of BATCHES two-row batches."""
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())]))])
    written = []
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as w:
        for b in range(batches):
            pair = [images[(2 * b + j) % len(images)] for j in range(2)]
            written += pair
            w.write_batch(pa.record_batch([pa.array([{"bytes": x, "path": None} for x in pair],
                                                    schema.field(0).type)], schema=schema))
    return written


def test_an_arrow_stream_is_opened_once_per_process_whatever_its_batches(
        jpegs: list[bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading every row of a stream file opened (and indexed: read through) the whole file again
    for each record batch, quadratic in the batches; now the opens do not grow with them."""
    opens: list[str] = []
    real = pa.memory_map
    monkeypatch.setattr(pa, "memory_map", lambda p, *a, **k: opens.append(str(p)) or real(p, *a, **k))
    counts = []
    for batches in (20, 60):
        path = tmp_path / f"data-{batches}.arrow"
        written = _stream(path, jpegs, batches)
        opens.clear()
        refs = discover([str(path)])
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(read_bytes, [r.path for r in refs]))
        assert got == written
        counts.append(opens.count(str(path)))
    assert counts[0] == counts[1] <= 4, counts  # discovery's reader and decoding's, not one per batch


def _keyed(path: Path, images: list[bytes], keys: list[int]) -> None:
    pq.write_table(pa.table({"key": keys, "image": pa.array(images, pa.binary())}), path)


def test_keys_are_per_table_unless_global_and_a_store_keeps_its_id_scheme(jpegs: list[bytes], tmp_path: Path) -> None:
    """Two tables with keys 0..3: eight items (they were silently four); with --global-keys four,
    and the other four are recorded repeats. A run that would make ids another way is refused (it
    would add every row again), in one line, exit 2."""
    t1, t2 = tmp_path / "t1.parquet", tmp_path / "t2.parquet"
    _keyed(t1, jpegs[:4], [0, 1, 2, 3])
    _keyed(t2, jpegs[4:], [0, 1, 2, 3])
    keyed = RunOptions(sources=SourceOptions(id_column="key"))
    store = tmp_path / "store"
    s = extract([str(t1), str(t2)], str(store), TINY, run=keyed)
    assert (s.done, s.failed) == (8, 0)
    assert Store.open(store).manifest()["id_scheme"] == "key:key"
    again = extract([str(tmp_path / "t*.parquet")], str(store), TINY, run=keyed)
    assert (again.done, again.skipped_present) == (0, 8)

    cli = ["extract", str(t1), "--out", str(store), "--backbone", "tiny_test"]
    for flags in ([], ["--id-column", "key", "--global-keys"]):
        r = CliRunner().invoke(app, cli + flags)
        assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
        assert "would add the same rows again" in r.output and "give --id-column key" in r.output
    assert Store.open(store).count() == 8
    folder = make_images(tmp_path / "loose", {"c": 2})
    assert extract([str(folder[0].parent)], str(store), TINY).done == 2  # no table: no id scheme involved

    glob = RunOptions(sources=SourceOptions(id_column="key", global_keys=True))
    s = extract([str(t1), str(t2), str(t1)], str(tmp_path / "global"), TINY, run=glob)
    assert (s.done, s.failed) == (4, 4)  # t2's keys repeat t1's; t1 given twice is read once
    assert all("duplicate key" in reason for _, reason in s.failures)
    assert Store.open(tmp_path / "global").errors().num_rows == 4
    # ids stay what they were: of the key alone when global, of the location without a key column
    ids = set(Store.open(tmp_path / "global").read(["id"]).column("id").to_pylist())
    assert ids == {hashlib.blake2b(f"key:{k}".encode(), digest_size=16).hexdigest() for k in range(4)}
    plain = discover([str(t1)])
    assert [r.id for r in plain] == [image_id(f"{t1}#image/0/{i}") for i in range(4)]
    r = CliRunner().invoke(app, cli[:-2] + ["--global-keys"])
    assert r.exit_code == 2 and "give --id-column too" in r.output


def test_a_class_label_of_minus_one_is_no_label(jpegs: list[bytes], tmp_path: Path) -> None:
    """``datasets`` stores "no label" as -1 in a ClassLabel column (test splits): no label, not a
    class named "-1"."""
    features = {"image": {"_type": "Image"}, "label": {"_type": "ClassLabel", "names": ["cat", "dog"]}}
    t = pa.table({"image": pa.array(jpegs[:4], pa.binary()), "label": pa.array([0, -1, 1, -1], pa.int64())})
    t = t.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    pq.write_table(t, tmp_path / "test.parquet")
    assert [r.label for r in discover([str(tmp_path / "test.parquet")])] == ["cat", None, "dog", None]


def test_a_store_keyed_before_ids_were_per_file_is_not_filled_again(jpegs: list[bytes], tmp_path: Path) -> None:
    """A store filled with --id-column before the id scheme was recorded has the key's own ids (today's
    --global-keys): the same command now (per-file ids) is refused in one line, not run to double it;
    --global-keys goes on with it, re-embedding nothing."""
    t1 = tmp_path / "t1.parquet"
    _keyed(t1, jpegs[:4], [0, 1, 2, 3])
    store = tmp_path / "store"
    extract([str(t1)], str(store), TINY, run=RunOptions(sources=SourceOptions(id_column="key", global_keys=True)))
    m = Store.open(store).manifest()
    del m["id_scheme"]  # as a store written before schemes were recorded
    (store / "_manifest.json").write_text(json.dumps(m))
    cli = ["extract", str(t1), "--out", str(store), "--backbone", "tiny_test", "--id-column", "key"]
    r = CliRunner().invoke(app, cli)
    assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
    assert "--id-column key --global-keys" in r.output
    r = CliRunner().invoke(app, [*cli, "--global-keys", "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["skipped_present"] == 4, r.output
    assert Store.open(store).count() == 4

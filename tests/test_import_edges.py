"""`embedder import` at its edges (review of issue 35, item 1): a file whose name holds glob
characters, vectors of no values, sources with no rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from typer.testing import CliRunner

from embedder.cli import app
from embedder.store.shards import Store

runner = CliRunner()


def _write(path: Path, emb: pa.Array) -> Path:
    pq.write_table(pa.table({"id": [f"i{k}" for k in range(len(emb))], "embedding": emb}), path)
    return path


def _cli(*args: str, code: int) -> str:
    r = runner.invoke(app, list(args))
    assert r.exit_code == code, (r.exit_code, r.output, r.exception)
    return r.output


def test_a_file_named_with_glob_characters_is_that_file(tmp_path: Path) -> None:
    v = np.arange(12, dtype=np.float32).reshape(3, 4)
    src = _write(tmp_path / "part[1].parquet", pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), 4))
    _cli("import", str(src), "--out", str(tmp_path / "s"), code=0)
    np.testing.assert_array_equal(Store.open(tmp_path / "s").vectors(), v)
    _cli("import", str(tmp_path / "p*.parquet"), "--out", str(tmp_path / "g"), code=0)  # a glob still globs
    assert len(Store.open(tmp_path / "g").vectors()) == 3


def test_vectors_of_no_values_and_empty_sources_are_one_line(tmp_path: Path) -> None:
    empty = _write(tmp_path / "zero.parquet", pa.array([[]] * 3, pa.list_(pa.float32())))
    o = _cli("import", str(empty), "--out", str(tmp_path / "a"), code=2)
    assert "no values" in o and len(o.strip().splitlines()) == 1 and "Traceback" not in o
    np.save(tmp_path / "img_emb_0.npy", np.zeros((3, 0), np.float32))
    pq.write_table(pa.table({"key": ["a", "b", "c"]}), tmp_path / "metadata_0.parquet")
    o = _cli("import", str(tmp_path / "img_emb_0.npy"), "--out", str(tmp_path / "b"), code=2)
    assert "no values" in o and len(o.strip().splitlines()) == 1
    none = _write(tmp_path / "none.parquet", pa.array([], pa.list_(pa.float32())))
    o = _cli("import", str(none), "--out", str(tmp_path / "c"), code=2)
    assert "no rows" in o and len(o.strip().splitlines()) == 1


def test_ids_that_are_their_own_digest_with_a_shared_prefix_import_in_linear_time(tmp_path: Path) -> None:
    """Ids of 32 hex characters are their own digest (no hash): zero-padded numbers all share its
    first 8 bytes. The duplicate check stays exact (within a batch, across batches and shards, and
    against the store on a rerun) and each row is not checked against every shard (it was
    quadratic: 100k such rows took 14 s, hashed ids 1 s)."""
    import time

    from embedder.store.importer import ImportOptions, import_vectors

    n = 100_000
    ids = [f"{i:032d}" for i in range(n)]
    ids[10] = ids[5]  # the same batch
    ids[n - 1] = ids[7]  # an earlier shard
    v = np.random.default_rng(0).standard_normal((n, 4)).astype(np.float32)
    first = tmp_path / "a.parquet"
    pq.write_table(pa.table({"id": ids, "embedding": pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), 4)}),
                   first)
    opts = ImportOptions(batch_rows=4096, shard_rows=16_384)
    t0 = time.perf_counter()
    s = import_vectors([str(first)], str(tmp_path / "s"), opts)
    took = time.perf_counter() - t0
    assert (s.imported, s.duplicates) == (n - 2, 2)
    assert took < 6.0, f"{n:,} rows took {took:.1f} s"
    again = tmp_path / "b.parquet"  # a rerun with another file: ids the store holds, and one new
    pq.write_table(pa.table({"id": [ids[3], ids[50_000], f"{n:032d}"],
                             "embedding": pa.FixedSizeListArray.from_arrays(pa.array(v[:3].ravel()), 4)}), again)
    s = import_vectors([str(again)], str(tmp_path / "s"), opts)
    assert (s.imported, s.duplicates) == (1, 2)
    assert len(Store.open(tmp_path / "s").vectors()) == n - 1

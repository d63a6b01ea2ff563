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

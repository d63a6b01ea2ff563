"""An image's bytes are bounded in every source, before they are read (a file, a tar member, a table
row: one limit, ``--max-image-mb``, the service's upload limit by default), and a table's label or
caption as a tar shard's metadata member is: a bigger one is that image's recorded failure, never a
crash, never a stored megabyte caption."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from typer.testing import CliRunner

from embedder.cli.app import app
from embedder.decode.common import read_bytes
from embedder.embed.fill import extract
from embedder.embed.options import EmbedOptions
from embedder.errors import DecodeError
from embedder.io.limits import MAX_IMAGE_BYTES, MAX_METADATA_BYTES
from embedder.models.builder import ModelSpec
from embedder.service.options import ServeOptions
from embedder.store.shards import Store
from tests.conftest import make_images

TINY = ModelSpec("tiny_test")


def test_a_file_over_the_limit_is_a_recorded_failure_and_the_flag_raises_it(tmp_path: Path) -> None:
    paths = make_images(tmp_path / "imgs", {"a": 3})
    big = paths[0]
    big.write_bytes(big.read_bytes() + bytes(4000))  # still a decodable JPEG, 4 KB bigger
    limit = big.stat().st_size - 1
    try:
        read_bytes(str(big), limit)
        raise AssertionError("read past the limit")
    except DecodeError as e:
        assert f"is {big.stat().st_size:,} bytes, over the {limit:,}-byte image limit" in str(e)
    s = extract([str(tmp_path / "imgs")], str(tmp_path / "s1"), TINY, EmbedOptions(max_image_bytes=limit))
    assert (s.done, s.failed) == (2, 1) and "--max-image-mb" in s.failures[0][1]
    # the CLI's flag is the same option: raised, the file is embedded on the rerun that retries it
    r = CliRunner().invoke(app, ["extract", str(tmp_path / "imgs"), "--out", str(tmp_path / "s1"),
                                 "--backbone", "tiny_test", "--retry-failed", "--max-image-mb", "1", "--json"])
    assert r.exit_code == 0, r.output
    assert Store.open(tmp_path / "s1").count() == 3
    assert ServeOptions().max_upload_bytes == EmbedOptions().max_image_bytes == MAX_IMAGE_BYTES


def test_a_table_rows_image_and_caption_are_bounded(tmp_path: Path) -> None:
    paths = make_images(tmp_path / "imgs", {"a": 4})
    data = [p.read_bytes() for p in paths]
    data[1] = data[1] + bytes(5000)
    caps = ["one", "two", "x" * (MAX_METADATA_BYTES + 1), "four"]
    pq.write_table(pa.table({"image": data, "caption": caps, "label": ["a", "b", "c", "d"]}),
                   tmp_path / "t.parquet")
    limit = max(len(d) for i, d in enumerate(data) if i != 1)
    s = extract([str(tmp_path / "t.parquet")], str(tmp_path / "store"), TINY, EmbedOptions(max_image_bytes=limit))
    assert (s.done, s.failed) == (2, 2), s.failures
    reasons = " | ".join(r for _, r in s.failures)
    assert f"over the {limit:,}-byte image limit" in reasons
    assert f"caption is {MAX_METADATA_BYTES + 1:,} characters" in reasons
    t = Store.open(tmp_path / "store").read(["caption", "label"])
    assert sorted(t.column("caption").to_pylist()) == ["four", "one"]
    assert Store.open(tmp_path / "store").errors().num_rows == 2

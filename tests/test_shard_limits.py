"""Tar shards read with bounded memory, exact reads and one parser of locations: members over their
limit fail their sample before they are read, a shard cut inside a sample gets that sample (with its
label) once it is complete, a ``#`` in a member's or a column's name is part of the name, and
decoding reads each image's exact byte range once, whatever the decode workers (counted by a real
S3-protocol server: moto's, wrapped to count what it serves)."""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedder.embed.fill import extract
from embedder.io import location, tars
from embedder.io.limits import MAX_IMAGE_BYTES, MAX_METADATA_BYTES
from embedder.io.sources import discover
from embedder.io.uri import image_id
from embedder.models.builder import ModelSpec
from embedder.store.shards import Store
from tests.conftest import make_images
from tests.test_shards_tables import add_member

TINY = ModelSpec("tiny_test")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return sorted(make_images(tmp_path_factory.mktemp("img"), {"a": 3, "b": 3}, size=(64, 48), seed=3))


def _tar(path: Path, members: list[tuple[str, bytes]], gz: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            add_member(tf, name, data)
    raw = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw, 1) if gz else raw)
    return raw


def _labelled(images: list[Path]) -> list[tuple[str, bytes]]:
    out = []
    for i, f in enumerate(images):
        out += [(f"{i:04d}.jpg", f.read_bytes()), (f"{i:04d}.cls", f.parent.name.encode()),
                (f"{i:04d}.txt", f"caption {i}".encode())]
    return out


# ---- 1: members bounded before they are read ------------------------------------------------------
def test_a_huge_caption_or_image_member_fails_its_sample_unread(images: list[Path], tmp_path: Path) -> None:
    big_caption = b"x" * (MAX_METADATA_BYTES + 1)
    big_image = images[1].read_bytes() + bytes(MAX_IMAGE_BYTES)  # a JPEG with trailing bytes: decodable
    members = [("0.jpg", images[0].read_bytes()), ("0.txt", big_caption),
               ("1.jpg", big_image), ("1.txt", b"fine"),
               ("2.jpg", images[2].read_bytes()), ("2.json", b"{" + b" " * MAX_METADATA_BYTES + b"}"),
               ("3.jpg", images[3].read_bytes()), ("3.txt", b"a caption that fits")]
    _tar(tmp_path / "bomb.tar.gz", members, gz=True)
    s = extract([str(tmp_path / "bomb.tar.gz")], str(tmp_path / "store"), TINY)
    assert (s.done, s.failed) == (1, 3), s.failures
    reasons = " | ".join(r for _, r in s.failures)
    assert "0.txt is 1,048,577 bytes, over the 1,048,576-byte limit" in reasons
    assert f"1.jpg is {len(big_image):,} bytes, over the {MAX_IMAGE_BYTES:,}-byte image limit" in reasons
    assert "2.json is" in reasons
    t = Store.open(tmp_path / "store").read(["caption"])
    assert t.column("caption").to_pylist() == ["a caption that fits"]
    assert Store.open(tmp_path / "store").errors().num_rows == 3


# ---- 4: a shard cut inside a sample ----------------------------------------------------------------
@pytest.mark.parametrize("where", ["inside the label", "between image and label", "gzip, inside the label"])
def test_a_shard_cut_inside_a_sample_gets_it_with_its_label_once_complete(
        images: list[Path], tmp_path: Path, where: str) -> None:
    gz = where.startswith("gzip")
    shard = tmp_path / ("s.tar.gz" if gz else "s.tar")
    raw = _tar(shard, _labelled(images[:3]))
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        m = {i.name: i for i in tf.getmembers()}
    # the third sample: its image complete, its label not (cut inside it, or right before its header)
    cut = m["0002.cls"].offset_data + 1 if "inside" in where else m["0002.cls"].offset
    shard.write_bytes(gzip.compress(raw[:cut], 1) if gz else raw[:cut])
    out = str(tmp_path / "store")
    first = extract([str(shard)], out, TINY)
    assert first.done == 2 and first.failed == 1, first.failures
    assert "sample 0002, in progress at the cut, is left out" in first.failures[0][1]
    shard.write_bytes(gzip.compress(raw, 1) if gz else raw)  # the download completes
    again = extract([str(shard)], out, TINY)
    assert again.done == 1 and again.skipped_present == 2
    t = Store.open(out).read(["path", "label", "caption"]).sort_by("path")
    assert t.column("label").to_pylist() == [f.parent.name for f in images[:3]]
    assert t.column("caption").to_pylist() == ["caption 0", "caption 1", "caption 2"]


# ---- 8: '#' in names, and the location's one parser ------------------------------------------------
def test_a_hash_in_a_member_or_column_name_is_part_of_the_name(images: list[Path], tmp_path: Path) -> None:
    """And a '!' (the failing location's marker) at the start of one: escaped, never read as a failure."""
    folder = tmp_path / "run #3"  # a '#' in a folder's name too
    _tar(folder / "s.tar", [("a#1.jpg", images[0].read_bytes()), ("a#1.cls", b"a"),
                            ("b#2/c.jpg", images[1].read_bytes()), ("b#2/c.cls", b"b"),
                            ("!c!d.jpg", images[2].read_bytes()), ("!c!d.cls", b"c")])
    pq.write_table(pa.table({"im#age": [f.read_bytes() for f in images[:2]], "label": ["x", "y"]}),
                   folder / "t#1.parquet")
    pq.write_table(pa.table({"!img!x": [images[3].read_bytes()], "label": ["z"]}), folder / "bang.parquet")
    s = extract([str(folder / "s.tar"), str(folder / "t#1.parquet"), str(folder / "bang.parquet")],
                str(tmp_path / "store"), TINY)
    assert (s.done, s.failed) == (6, 0), s.failures
    t = Store.open(tmp_path / "store").read(["path", "label"]).sort_by("label")
    locs = [location.parse(p) for p in t.column("path").to_pylist()]
    assert [(lc.container, lc.kind, lc.member) for lc in locs if lc is not None] == [
        (str(folder / "s.tar"), "member", "a#1.jpg"), (str(folder / "s.tar"), "member", "b#2/c.jpg"),
        (str(folder / "s.tar"), "member", "!c!d.jpg"), (str(folder / "t#1.parquet"), "row", "im#age/0/0"),
        (str(folder / "t#1.parquet"), "row", "im#age/0/1"), (str(folder / "bang.parquet"), "row", "!img!x/0/0")]
    assert t.column("label").to_pylist() == ["a", "b", "c", "x", "y", "z"]
    assert location.refusal("\\!c!d.jpg") is None and location.parse(f"{folder}/s.tar#!k!why").kind == "failing"  # type: ignore[union-attr]


def test_locations_round_trip_and_the_span_is_not_part_of_the_id() -> None:
    for s in ["/d/s.tar#k.jpg", "/d/s.TGZ#a#b.jpg", "s3://b/x/s.tar.gz#dir/k.jpg", "/d/t.parquet#img/3/7",
              "/d/s.tar#!k!no image", "/d/s.tar#k.jpg#@1536:20480"]:
        loc = location.parse(s)
        assert loc is not None and location.format(loc) == s
    assert location.parse("/d/photo#1.jpg") is None and location.parse("s3://b/x#y.png") is None
    loc = location.parse("/d/s.tar#a#b.jpg#@1536:20480")
    assert loc == location.Location("/d/s.tar", location.MEMBER, "a#b.jpg", 1536, 20480)
    assert image_id("/d/s.tar#a#b.jpg#@1536:20480") == image_id("/d/s.tar#a#b.jpg")  # stores written before
    assert location.failing("/d/s.tar", "k", "why") == "/d/s.tar#!k!why"


def test_a_span_that_no_longer_matches_the_shard_reads_the_member_by_its_headers(
        images: list[Path], tmp_path: Path) -> None:
    from embedder.decode.common import read_bytes

    shard = tmp_path / "s.tar"
    _tar(shard, _labelled(images[:2]))
    (ref0, ref1) = discover([str(shard)])
    members = _labelled(images[:2])
    _tar(shard, members[3:] + members[:3])  # rewritten, the samples swapped: other offsets
    tars._INDEX_CACHE.clear()
    assert read_bytes(ref0.path) == images[0].read_bytes() and read_bytes(ref1.path) == images[1].read_bytes()


# ---- 3: bytes fetched from object storage, across decode processes -----------------------------------
class Counting:
    """WSGI middleware: the body bytes and GET requests served per object key (scripts/bench_shard_reads.py
    counts with it too)."""

    def __init__(self, app: Any) -> None:
        self.app, self.lock = app, threading.Lock()
        self.bytes: dict[str, int] = {}
        self.gets: dict[str, int] = {}

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        key, get = environ.get("PATH_INFO", ""), environ.get("REQUEST_METHOD") == "GET"
        for chunk in self.app(environ, start_response):
            if get:
                with self.lock:
                    self.bytes[key] = self.bytes.get(key, 0) + len(chunk)
            yield chunk
        if get:
            with self.lock:
                self.gets[key] = self.gets.get(key, 0) + 1


@pytest.fixture(scope="module")
def counted_s3() -> Iterator[tuple[str, Counting]]:
    pytest.importorskip("moto.server")
    from moto.moto_server.threaded_moto_server import MotoRequestHandler
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    counting = Counting(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", 0, counting, True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", counting
    finally:
        server.shutdown()
        thread.join()


@pytest.mark.parametrize(("name", "decode_in"), [("s.tar", "threads"), ("s.tar.gz", "threads"),
                                               pytest.param("s.tar", "processes", marks=pytest.mark.slow)])
def test_decoding_fetches_each_image_once_across_decode_workers(
        counted_s3: tuple[str, Counting], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str,
        decode_in: str) -> None:
    """Three decode threads in this process, or two decode processes under the real CLI (slow: a
    fresh CLI, its fork server and model, ~10-30 s): a plain shard is read once by discovery, then
    each image's range (and its header) once: no header walk, no window read again per thread or
    process (before: the shard 5-7 times); a gzip'd one once by discovery and once by the threads of
    a process together (before: once per thread, and once more to walk its headers)."""
    import pyarrow.fs as pafs

    from embedder.embed.options import RunOptions
    from embedder.io import uri

    endpoint, counting = counted_s3
    files = sorted(make_images(tmp_path / "f", {"a": 20, "b": 20}, size=(160, 120), seed=9))
    gz = name.endswith(".gz")
    raw = _tar(tmp_path / name, _labelled(files), gz=gz)
    stored = (tmp_path / name).read_bytes()
    images = sum(f.stat().st_size for f in files)
    fs = pafs.S3FileSystem(allow_bucket_creation=True, endpoint_override=endpoint, region="us-east-1",
                           access_key="testing", secret_key="testing")
    bucket = f"counted-{decode_in}-{'gz' if gz else 'tar'}"
    fs.create_dir(bucket)
    key = f"/{bucket}/wds/{name}"
    with fs.open_output_stream(key[1:], compression=None) as out:
        out.write(stored)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}
    store = tmp_path / "store"
    if decode_in == "threads":
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setattr(uri, "_filesystems", {})
        s = extract([f"s3:/{key}"], str(store), TINY, run=RunOptions(decode_in="threads", workers=3, batch_size=8))
        assert (s.done, s.failed) == (len(files), 0), s.failures
    else:
        done = subprocess.run([sys.executable, "-m", "embedder", "extract", f"s3:/{key}", "--out", str(store),
                               "--backbone", "tiny_test", "--decode-in", "processes", "--workers", "2",
                               "--batch-size", "8"], env={**os.environ, **env, "EMBEDDER_OFFLINE": "1"},
                              capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-2000:]
    t = Store.open(store).read(["label", "caption"])
    assert t.num_rows == len(files) and None not in t.column("label").to_pylist()
    served, gets = counting.bytes.get(key, 0), counting.gets.get(key, 0)
    if gz:  # discovery's pass and one more, shared by the decode threads
        assert served <= 2 * len(stored), (served, len(stored))
        return
    # discovery reads the shard once (in windows); decoding each image's range and its header, once
    assert served <= len(raw) + images + 512 * len(files), (served, len(raw), images)
    assert gets <= -(-len(raw) // tars.WINDOW) + len(files), gets


def test_a_rewritten_shard_is_never_read_as_another_member(tmp_path: Path) -> None:
    """A span whose header now holds another member whose name is part of this one's (``1.bmp`` in
    ``11.bmp``), and a kept header index of the shard before it was rewritten: both give the member's
    own bytes, never a neighbour's."""
    shard = tmp_path / "rw.tar"
    _tar(shard, [("11.bmp", b"A" * 1000), ("1.bmp", b"B" * 1000)])
    located = {location.parse(s.locator).member: s.locator for s in tars.iter_samples(str(shard))}  # type: ignore[union-attr]
    _tar(shard, [("1.bmp", b"B" * 1000), ("11.bmp", b"A" * 1000)])
    assert tars.read_member(located["11.bmp"]) == b"A" * 1000
    assert tars.read_member(located["1.bmp"]) == b"B" * 1000
    # span-less locations (stores written before spans) through a kept index, then the shard rewritten
    tars._INDEX_CACHE.clear()
    assert tars.read_member(f"{shard}#11.bmp") == b"A" * 1000
    _tar(shard, [("0.bmp", b"C" * 700), ("1.bmp", b"B" * 1000), ("11.bmp", b"A" * 1000)])
    assert tars.read_member(f"{shard}#11.bmp") == b"A" * 1000
    assert tars.read_member(f"{shard}#1.bmp") == b"B" * 1000


def test_a_sample_of_many_members_without_an_image_has_a_short_reason(tmp_path: Path) -> None:
    shard = tmp_path / "many.tar"
    _tar(shard, [(f"k.e{i}", b"") for i in range(500)])
    (sample,) = list(tars.iter_samples(str(shard)))
    reason = location.parse(sample.locator).reason  # type: ignore[union-attr]
    assert reason is not None and len(reason) < 300 and "490 more" in reason

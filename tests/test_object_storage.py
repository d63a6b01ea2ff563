"""Object storage: a real S3-protocol server (moto's standalone server, started here on a free port)
and pyarrow's S3 client, no mocked calls. Sources at s3://bucket/prefix give the same store as the
same files on disk, and a store at s3://bucket/prefix is the same store as one on disk — written,
resumed after a SIGKILL, read, indexed, guarded by its writer lease — with the local engine and with
the Ray engine."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from embedder.cli import app
from embedder.embed.fill import extract
from embedder.embed.options import EmbedOptions, RunOptions
from embedder.errors import SourceError, StoreError
from embedder.io import uri
from embedder.io.sources import discover
from embedder.models.builder import ModelSpec
from embedder.store.shards import Store
from tests.conftest import make_images, slowed_cli

moto_server = pytest.importorskip("moto.server")
pafs = pytest.importorskip("pyarrow.fs")

TINY = ModelSpec("tiny_test")


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": s3_endpoint}
    for k, v in env.items():
        monkeypatch.setenv(k, v)

    monkeypatch.setattr(uri, "_filesystems", {})  # a filesystem per test: the endpoint differs
    return env


def _admin() -> Any:
    """The test's own client (bucket creation is off in embedder's)."""
    return pafs.S3FileSystem(allow_bucket_creation=True, endpoint_override=os.environ["AWS_ENDPOINT_URL"],
                             region="us-east-1")


def _upload(local_root: Path, bucket: str, prefix: str) -> None:
    fs = _admin()
    fs.create_dir(bucket)
    for p in sorted(local_root.rglob("*")):
        if p.is_file():
            with fs.open_output_stream(f"{bucket}/{prefix}/{p.relative_to(local_root).as_posix()}") as f:
                f.write(p.read_bytes())


def _keys(prefix: str) -> list[str]:
    """Every object under PREFIX (bucket/prefix), relative to it."""
    infos = _admin().get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
    return sorted(i.path[len(prefix) + 1:] for i in infos if i.type == pafs.FileType.File)


def _vectors(store: Path | str) -> tuple[list[str], list[str | None], np.ndarray]:
    t = Store.open(str(store)).read(["path", "label", "embedding"]).sort_by("path")
    names = [p.rsplit("/", 2)[-2] + "/" + p.rsplit("/", 1)[-1] for p in t.column("path").to_pylist()]
    return names, t.column("label").to_pylist(), np.stack(t.column("embedding").to_numpy(zero_copy_only=False))


def test_s3_sources_give_the_same_store_as_the_same_files_on_disk(tmp_path: Path, s3_env: dict[str, str]) -> None:
    local = tmp_path / "imgs"
    make_images(local, {"cat": 5, "dog": 4}, size=(64, 48))
    (local / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff truncated")
    (local / "notes.txt").write_text("not an image")
    _upload(local, "photos", "set1")
    refs = discover(["s3://photos/set1"])
    assert len(refs) == 10 and all(r.path.startswith("s3://photos/set1/") for r in refs)
    assert {r.label for r in refs} == {"cat", "dog"}
    s3 = extract(["s3://photos/set1"], str(tmp_path / "from_s3"), TINY, EmbedOptions(), RunOptions(batch_size=4))
    disk = extract([str(local)], str(tmp_path / "from_disk"), TINY, EmbedOptions(), RunOptions(batch_size=4))
    assert (s3.done, s3.failed) == (disk.done, disk.failed) == (9, 1)
    a, b = _vectors(tmp_path / "from_s3"), _vectors(tmp_path / "from_disk")
    assert a[0] == b[0] and a[1] == b[1]
    np.testing.assert_array_equal(a[2], b[2])
    again = extract(["s3://photos/set1"], str(tmp_path / "from_s3"), TINY, EmbedOptions(), RunOptions(batch_size=4))
    assert (again.done, again.skipped_present, again.skipped_failed_before) == (0, 9, 1)


def test_tar_shards_and_parquet_tables_in_s3(tmp_path: Path, s3_env: dict[str, str]) -> None:
    """Shards and tables read from object storage (ranged reads, nothing copied to disk) give the
    vectors the same files give from local disk."""
    from tests.test_shards_tables import write_hf_parquet, write_shards

    files = sorted(make_images(tmp_path / "f", {"red": 4, "blue": 3}, size=(64, 48)))
    write_shards(tmp_path / "up" / "shards", files, per_shard=4)
    write_hf_parquet(tmp_path / "up" / "t.parquet", files, row_group_size=3)
    _upload(tmp_path / "up", "wds", "v1")
    disk = extract([str(tmp_path / "f")], str(tmp_path / "disk"), TINY)
    want = sorted(np.asarray(v).tobytes() for v in Store.open(tmp_path / "disk").read(["embedding"])
                  .column("embedding").to_pylist())
    for src in (["s3://wds/v1/shards/00000.tar", "s3://wds/v1/shards/00001.tar"], ["s3://wds/v1/t.parquet"]):
        out = tmp_path / src[0].rsplit("/", 1)[1]
        s = extract(src, str(out), TINY)
        assert (s.done, s.failed) == (disk.done, 0) == (7, 0)
        got = Store.open(out).read(["path", "embedding"])
        assert all(p.startswith("s3://wds/v1/") and "#" in p for p in got.column("path").to_pylist())
        assert sorted(np.asarray(v).tobytes() for v in got.column("embedding").to_pylist()) == want


def test_missing_prefix_and_unreachable_endpoint_are_one_line_errors(s3_env: dict[str, str],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    _admin().create_dir("empty")
    with pytest.raises(SourceError, match="does not exist"):
        discover(["s3://empty/nothing/here"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there

    monkeypatch.setattr(uri, "_filesystems", {})
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(SourceError, match="cannot list s3://photos"):
        discover(["s3://photos/set1"])


@pytest.mark.slow
def test_a_ray_index_build_streams_an_s3_store(tmp_path: Path, s3_env: dict[str, str]) -> None:
    """`index build --engine ray` on an s3:// store: the tasks read the shards by their URIs (the
    build once turned them into local paths and failed with a traceback)."""
    local = tmp_path / "imgs"
    make_images(local, {"a": 30, "b": 30}, size=(40, 32))
    _admin().create_dir("raystore")
    uri = "s3://raystore/emb"
    extract([str(local)], uri, TINY, EmbedOptions(), RunOptions(batch_size=8, shard_rows=16))
    env = {**os.environ, **s3_env, "RAY_AUTH_MODE": "disabled"}
    home = tmp_path / "h"
    r = subprocess.run([sys.executable, "-m", "embedder", "index", "build", uri, "--name", "r", "--kind", "ivf",
                        "--engine", "ray", "--home", str(home), "--json"], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["count"] == 60
    from embedder.index import search as index_search

    loaded = index_search.LoadedIndex("r", str(home))
    some = loaded.ids.column("id")[7].as_py()
    assert loaded.search(loaded.vector_of(some), 1)[0][0]["id"] == some


@pytest.mark.slow
def test_the_ray_engine_reads_s3_sources_into_an_s3_store(tmp_path: Path, s3_env: dict[str, str]) -> None:
    """A local Ray instance started by the CLI: its workers inherit the S3 settings of the driver,
    stage their shards in the bucket, and the driver commits them there (copy, then delete)."""
    local = tmp_path / "imgs"
    make_images(local, {"a": 6, "b": 6}, size=(64, 48))
    _upload(local, "raybucket", "p")
    env = {**os.environ, **s3_env, "RAY_AUTH_MODE": "disabled"}
    r = subprocess.run([sys.executable, "-m", "embedder", "extract", "s3://raybucket/p", "--out", "s3://raybucket/store",
                        "--backbone", "tiny_test", "--engine", "ray", "--batch-size", "4", "--shard-rows", "5",
                        "--json"], capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    extract([str(local)], str(tmp_path / "disk"), TINY, EmbedOptions(), RunOptions(batch_size=4))
    a, b = _vectors("s3://raybucket/store"), _vectors(tmp_path / "disk")
    assert a[0] == b[0] and a[1] == b[1]
    np.testing.assert_allclose(a[2], b[2], atol=1e-5)
    keys = _keys("raybucket/store")
    shards = [k for k in keys if k.startswith("part-")]
    assert len(shards) >= 3 and sorted(k for k in keys if k.startswith("_ids/")) == sorted(
        f"_ids/{k.removesuffix('.parquet')}.npy" for k in shards)
    assert not [k for k in keys if k.startswith(".staging/")] and ".writer.lock" not in keys


def test_a_store_in_object_storage_is_written_resumed_read_and_indexed(tmp_path: Path,
                                                                      s3_env: dict[str, str]) -> None:
    local = tmp_path / "imgs"
    make_images(local, {"cat": 6, "dog": 5}, size=(64, 48))
    (local / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff truncated")
    _admin().create_dir("stores")
    uri = "s3://stores/emb"
    s3 = extract([str(local)], uri, TINY, EmbedOptions(), RunOptions(batch_size=4, shard_rows=4))
    disk = extract([str(local)], str(tmp_path / "disk"), TINY, EmbedOptions(), RunOptions(batch_size=4, shard_rows=4))
    assert (s3.done, s3.failed) == (disk.done, disk.failed) == (11, 1)
    a, b = _vectors(uri), _vectors(tmp_path / "disk")
    assert a[0] == b[0] and a[1] == b[1]
    np.testing.assert_array_equal(a[2], b[2])
    keys = _keys("stores/emb")
    shards = [k for k in keys if k.startswith("part-")]
    assert len(shards) == 3 and "_manifest.json" in keys and len([k for k in keys if k.startswith("_errors/")]) == 1
    assert [k for k in keys if k.startswith("_ids/")] == [f"_ids/{k.removesuffix('.parquet')}.npy" for k in shards]
    assert ".writer.lock" not in keys  # the lease is given back
    again = extract([str(local)], uri, TINY, EmbedOptions(), RunOptions(batch_size=4, shard_rows=4))
    assert (again.done, again.skipped_present, again.skipped_failed_before) == (0, 11, 1)
    runner = CliRunner()
    r = runner.invoke(app, ["info", uri, "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert (info["rows"], info["errors"], info["shards"], info["path"]) == (11, 1, 3, uri)
    r = runner.invoke(app, ["index", "build", uri, "--name", "froms3", "--kind", "flat", "--home", str(tmp_path / "h"),
                            "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["count"] == 11
    r = runner.invoke(app, ["index", "build", uri, "--name", "streamed", "--kind", "ivf", "--on-disk",
                            "--home", str(tmp_path / "h"), "--json"])  # shards streamed from the bucket
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["count"] == 11
    r = runner.invoke(app, ["probe", uri, "--out", str(tmp_path / "p.probe")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["inspect", uri, "--out", str(tmp_path / "report"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["images"] == 11
    for bad in ("s3://no-such-bucket/x", "s3://stores"):  # no bucket; a prefix that holds other things
        r = runner.invoke(app, ["extract", str(local), "--out", bad, "--backbone", "tiny_test"])
        assert r.exit_code == 2 and r.output.strip().startswith("error:"), r.output
        assert len(r.output.strip().splitlines()) == 1, r.output
        assert ("bucket 'no-such-bucket' does not exist" if "no-such" in bad else
                "is not empty and is not an embedding store") in r.output


def test_one_writer_at_a_time_in_object_storage(tmp_path: Path, s3_env: dict[str, str]) -> None:
    local = tmp_path / "imgs"
    make_images(local, {"a": 3}, size=(64, 48))
    admin = _admin()
    admin.create_dir("locked")

    def lease(pid: int, host: str = socket.gethostname(), left: float = 60) -> None:
        with admin.open_output_stream("locked/s/.writer.lock") as f:
            f.write(json.dumps({"token": "another", "host": host, "pid": pid, "expires": time.time() + left}).encode())

    lease(os.getpid())  # a live writer on this host
    with pytest.raises(StoreError, match=f"being written by pid {os.getpid()} on"):
        extract([str(local)], "s3://locked/s", TINY, EmbedOptions(), RunOptions(batch_size=4))
    lease(1234, host="another-host")  # a writer elsewhere whose lease has not ended
    with pytest.raises(StoreError, match="on another-host"):
        extract([str(local)], "s3://locked/s", TINY, EmbedOptions(), RunOptions(batch_size=4))
    assert _keys("locked/s") == [".writer.lock"]  # nothing written while refused
    lease(1234, host="another-host", left=-1)  # ... whose lease ran out: it is gone
    assert extract([str(local)], "s3://locked/s", TINY, EmbedOptions(), RunOptions(batch_size=4)).done == 3
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lease(gone.pid)  # a killed writer of this host: taken over at once
    make_images(local, {"b": 2}, size=(64, 48))
    assert extract([str(local)], "s3://locked/s", TINY, EmbedOptions(), RunOptions(batch_size=4)).done == 2
    assert ".writer.lock" not in _keys("locked/s")
    with admin.open_output_stream("locked/s/.writer.lock") as f:
        f.write(b"{not a lease")  # damaged by hand: not a lease, so not respected
    make_images(local, {"c": 1}, size=(64, 48))
    assert extract([str(local)], "s3://locked/s", TINY, EmbedOptions(), RunOptions(batch_size=4)).done == 1


@pytest.mark.slow
def test_a_writer_killed_mid_run_resumes_in_object_storage(tmp_path: Path, s3_env: dict[str, str]) -> None:
    local = tmp_path / "imgs"
    make_images(local, {"a": 30, "b": 30}, size=(64, 48))
    _admin().create_dir("killed")
    slow = slowed_cli("embedder.store.shards", "Store", "write_shard", 0.3)
    cmd = ["extract", str(local), "--out", "s3://killed/s", "--backbone", "tiny_test", "--batch-size", "4",
           "--shard-rows", "4"]
    proc = subprocess.Popen([*slow, *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and \
            sum(k.startswith("part-") for k in _keys("killed/s")) < 2:
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = Store.open("s3://killed/s").count()
    assert 0 < partial < 60 and ".writer.lock" in _keys("killed/s")  # its lease is left behind
    r = subprocess.run([sys.executable, "-m", "embedder", *cmd], capture_output=True, text=True, timeout=200)
    assert r.returncode == 0, r.stderr[-2000:]
    ids = Store.open("s3://killed/s").read(["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 60
    assert set(ids) == {ref.id for ref in discover([str(local)])}


def test_local_parquet_writes_never_follow_a_planted_link(tmp_path: Path) -> None:
    """The temporary file had a fixed name (.NAME.tmp): a link planted there made the write land where
    it pointed. Now a fresh, exclusively created name: the link's target is untouched."""
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    from embedder.io import storage

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out = tmp_path / "d" / "t.parquet"
    out.parent.mkdir()
    os.symlink(victim, out.parent / ".t.parquet.tmp")
    storage.write_parquet(str(out), pa.table({"a": [1, 2]}))
    assert victim.read_text() == "keep me" and pq.read_table(out).num_rows == 2 and not out.is_symlink()
    assert sorted(p.name for p in out.parent.iterdir()) == [".t.parquet.tmp", "t.parquet"]  # nothing left over

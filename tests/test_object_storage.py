"""Images in object storage: a real S3-protocol server (moto's standalone server, started here on a
free port) and pyarrow's S3 client, no mocked calls. Sources at s3://bucket/prefix give the same
store as the same files on disk, with the local engine and with the Ray engine."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embedder.errors import SourceError
from embedder.extract import EmbedOptions, RunOptions, extract
from embedder.model import ModelSpec
from embedder.sources import discover
from embedder.store import Store
from tests.conftest import make_images

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
    import embedder.sources as sources

    monkeypatch.setattr(sources, "_filesystems", {})  # a filesystem per test: the endpoint differs
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


def _vectors(store: Path) -> tuple[list[str], list[str | None], np.ndarray]:
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


def test_missing_prefix_and_unreachable_endpoint_are_one_line_errors(s3_env: dict[str, str],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    _admin().create_dir("empty")
    with pytest.raises(SourceError, match="does not exist"):
        discover(["s3://empty/nothing/here"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    import embedder.sources as sources

    monkeypatch.setattr(sources, "_filesystems", {})
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(SourceError, match="cannot list s3://photos"):
        discover(["s3://photos/set1"])


@pytest.mark.slow
def test_the_ray_engine_reads_s3_sources(tmp_path: Path, s3_env: dict[str, str]) -> None:
    """A local Ray instance started by the CLI: its workers inherit the S3 settings of the driver."""
    local = tmp_path / "imgs"
    make_images(local, {"a": 6, "b": 6}, size=(64, 48))
    _upload(local, "raybucket", "p")
    env = {**os.environ, **s3_env, "RAY_AUTH_MODE": "disabled"}
    r = subprocess.run([sys.executable, "-m", "embedder", "extract", "s3://raybucket/p", "--out", str(tmp_path / "s"),
                        "--backbone", "tiny_test", "--engine", "ray", "--batch-size", "4", "--json"],
                       capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    extract([str(local)], str(tmp_path / "disk"), TINY, EmbedOptions(), RunOptions(batch_size=4))
    a, b = _vectors(tmp_path / "s"), _vectors(tmp_path / "disk")
    assert a[0] == b[0] and a[1] == b[1]
    np.testing.assert_allclose(a[2], b[2], atol=1e-5)

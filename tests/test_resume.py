"""A real crash: kill -9 a running extraction, rerun the same command, every image exactly once."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from embedder.sources import discover
from embedder.store import Store
from tests.conftest import make_images


@pytest.mark.slow
def test_resume_after_sigkill(tmp_path: Path) -> None:
    src = tmp_path / "imgs"
    make_images(src, {"a": 150, "b": 150}, size=(96, 96))
    store = tmp_path / "store"
    # The real CLI in a real process, slowed a little per batch so the kill lands mid-run.
    slow = ("import sys, time, embedder.extract as e; orig = e.BatchEmbedder.launch; "
            "e.BatchEmbedder.launch = lambda self, *a: (time.sleep(0.02), orig(self, *a))[1]; "
            "from embedder.cli import main; main()")
    cmd = [sys.executable, "-c", slow, "extract", str(src), "--out", str(store),
           "--backbone", "tiny_test", "--batch-size", "2", "--shard-rows", "4", "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and len(list(store.glob("part-*.parquet"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = Store.open(store).count()
    assert 0 < partial < 300, partial
    # Wherever the kill landed, a temporary it left is removed once the next writer holds the lock.
    (store / ".part-99999-dead.parquet.tmp").write_bytes(b"half a shard")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    ids = Store.open(store).read(["id"]).column("id").to_pylist()
    assert len(ids) == 300 and len(set(ids)) == 300
    assert set(ids) == {r.id for r in discover([src])}
    assert not list(store.glob(".*tmp"))

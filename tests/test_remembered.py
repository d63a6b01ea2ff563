"""The remembered weights file (store/remembered.py): a manifest's path that is no longer a plain file,
or a manifest of the wrong shape, is 'not remembered', never a hang or a crash (review C, issue 34)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from embedder.store.remembered import file_digest, recorded_paths, remembered_weights
from embedder.store.shards import MANIFEST

SHA = "ab" * 32


def _store(tmp_path: Path, manifest: object) -> str:
    store = tmp_path / "store"
    store.mkdir()
    (store / MANIFEST).write_text(json.dumps(manifest))
    return str(store)


def _within(seconds: float, fn, *args):  # type: ignore[no-untyped-def]
    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(fn(*args)), daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{fn.__name__} still running after {seconds} s"
    return out[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_recorded_as_weights_file_does_not_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "weights.pt"
    os.mkfifo(fifo)
    store = _store(tmp_path, {"runs": [{"weights_file": str(fifo)}]})
    try:
        assert _within(5, remembered_weights, store, SHA) is None
        assert _within(5, file_digest, str(fifo)) is None
    finally:  # release a reader the old code left blocked in open()
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK) if _reader_waiting(fifo) else None
        if fd is not None:
            os.close(fd)


def _reader_waiting(fifo: Path) -> bool:
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        return True
    except OSError:
        return False


def test_directory_and_device_recorded_as_weights_file(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    paths = [str(tmp_path / "dir"), "/dev/zero", str(tmp_path / "gone")]
    store = _store(tmp_path, {"runs": [{"weights_file": p} for p in paths]})
    assert _within(5, remembered_weights, store, SHA) is None


@pytest.mark.parametrize("manifest", [[1, 2], "x", None, {"runs": "abc"}, {"runs": [None, 3, {"weights_file": 7}]}])
def test_manifest_of_another_shape_remembers_nothing(tmp_path: Path, manifest: object) -> None:
    store = _store(tmp_path, manifest)
    assert recorded_paths(store) == []
    assert remembered_weights(store, SHA) is None


def test_plain_file_still_matched_by_digest(tmp_path: Path) -> None:
    import hashlib

    w = tmp_path / "w.bin"
    w.write_bytes(b"weights")
    store = _store(tmp_path, {"runs": [{"weights_file": str(w)}]})
    assert remembered_weights(store, hashlib.sha256(b"weights").hexdigest()) == str(w)
    assert remembered_weights(store, SHA) is None

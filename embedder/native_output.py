"""Silence what native libraries print straight to the process's stdout and stderr.

FAISS prints from C++ during normal work: "resizing lists.ivfdata to N bytes" on every on-disk merge,
"IO_FLAG_ONDISK_SAME_DIR: updating ondisk filename …" on every load of an on-disk index, clustering
warnings during training. None of it is what a user asked for, and none of it can be turned off from
Python. ``quiet()`` points file descriptors 1 and 2 at /dev/null for the duration of such a call
(flushing C's and Python's buffers on both sides of it, one caller at a time). FAISS reports real
failures as exceptions, which pass through unchanged.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_LOCK = threading.RLock()
_depth = 0


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, ValueError, OSError):
            pass
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass


@contextmanager
def quiet() -> Iterator[None]:
    global _depth
    if os.environ.get("EMBEDDER_NATIVE_OUTPUT") == "1":  # debugging FAISS: let it talk
        yield
        return
    with _LOCK:
        _depth += 1
        if _depth > 1:  # nested: already quiet
            try:
                yield
            finally:
                _depth -= 1
            return
        _flush()
        saved = [os.dup(1), os.dup(2)]
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, 1)
            os.dup2(null, 2)
            yield
        finally:
            _flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in (*saved, null):
                os.close(fd)
            _depth -= 1

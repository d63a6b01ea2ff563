"""Keep what native libraries print about their normal work off the process's stdout and stderr,
and nothing else.

FAISS prints from C++ during normal work: "resizing lists.ivfdata to N bytes" on every on-disk merge,
"IO_FLAG_ONDISK_SAME_DIR: updating ondisk filename …" on every load of an on-disk index, clustering
warnings during training. None of it is what a user asked for, and none of it can be turned off from
Python. ``quiet()`` points file descriptors 1 and 2 at pipes for the duration of such a call; a
forwarding thread copies every line to the real stdout or stderr except those known lines
(``CHATTER``). File descriptors belong to the whole process: the lines other threads write meanwhile
(a server's logs, a progress bar) pass through, in order, and so does anything FAISS prints that is
not on the list. Calls from several threads share one redirection (the first in installs it, the
last out removes it); none waits for another. FAISS reports real failures as exceptions, which pass
through unchanged. ``EMBEDDER_NATIVE_OUTPUT=1`` turns the filter off (debugging FAISS).
"""

from __future__ import annotations

import ctypes
import os
import re
import select
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# FAISS's own lines about its normal work (printf / fprintf in its C++ sources), whole lines only
CHATTER = re.compile(
    rb"resizing .* to \d+ bytes"
    rb"|IO_FLAG_ONDISK_SAME_DIR: updating ondisk filename from .* to .*"
    rb"|WARNING:? clustering \d+ points to \d+ centroids: please provide at least \d+ training points")

JOIN_SECONDS = 2.0  # a child process started meanwhile may hold a pipe open: stop waiting for it

_LOCK = threading.Lock()
_users = 0
_active: _Redirect | None = None


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


def _write_all(fd: int, data: bytes) -> None:
    while data:
        try:
            data = data[os.write(fd, data):]
        except OSError:  # the real stream is gone (a closed pipe): nothing to keep it for
            return


class _Redirect:
    """fds 1 and 2 pointed at pipes, and the thread that forwards their lines to the saved fds."""

    def __init__(self) -> None:
        _flush()
        self.saved = {1: os.dup(1), 2: os.dup(2)}
        self.reads: dict[int, int] = {}  # pipe read end → saved fd it forwards to
        for fd in (1, 2):
            r, w = os.pipe()
            os.dup2(w, fd)
            os.close(w)
            self.reads[r] = self.saved[fd]
        self.thread = threading.Thread(target=self._forward, name="native-output", daemon=True)
        self.thread.start()

    def _forward(self) -> None:
        tails = {r: b"" for r in self.reads}
        open_ = set(self.reads)
        while open_:
            ready, _, _ = select.select(list(open_), [], [])
            for r in ready:
                chunk = os.read(r, 1 << 16)
                if not chunk:  # every write end closed
                    open_.discard(r)
                    if tails[r]:
                        _write_all(self.reads[r], tails[r])
                    continue
                *lines, tails[r] = (tails[r] + chunk).split(b"\n")
                kept = b"".join(line + b"\n" for line in lines if not CHATTER.fullmatch(line.rstrip(b"\r")))
                if kept:
                    _write_all(self.reads[r], kept)
        for r in self.reads:
            os.close(r)

    def close(self) -> None:
        _flush()
        for fd, saved in self.saved.items():
            os.dup2(saved, fd)  # closes the pipe's write end held as fd 1 / 2: the forwarder sees EOF
        self.thread.join(JOIN_SECONDS)
        if not self.thread.is_alive():
            for saved in self.saved.values():
                os.close(saved)
        # else a child process holds a write end: the forwarder goes on for it, with the saved fds


@contextmanager
def quiet() -> Iterator[None]:
    """FAISS's known lines about its normal work dropped from fds 1 and 2 while the block runs;
    everything else written there, by any thread, passes through."""
    global _users, _active
    if os.environ.get("EMBEDDER_NATIVE_OUTPUT") == "1":  # debugging FAISS: let it talk
        yield
        return
    with _LOCK:
        if _users == 0:
            _active = _Redirect()
        _users += 1
    try:
        yield
    finally:
        with _LOCK:
            _users -= 1
            if _users == 0 and _active is not None:
                _active.close()
                _active = None

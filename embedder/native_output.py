"""Keep what native libraries print about their normal work off the process's stdout and stderr,
and nothing else.

FAISS prints from C++ during normal work: "resizing lists.ivfdata to N bytes" on every on-disk merge,
"IO_FLAG_ONDISK_SAME_DIR: updating ondisk filename …" on every load of an on-disk index, clustering
warnings during training. None of it is what a user asked for, and none of it can be turned off from
Python. ``quiet()`` points file descriptors 1 and 2 (or 1 alone) at pipes for the duration of such
a call; a forwarding thread copies every line to the real stdout or stderr except those known lines
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
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# FAISS's own lines about its normal work (printf / fprintf in its C++ sources), at the end of a
# line: another thread's unfinished line (its newline written apart, as unbuffered Python writes it)
# may come before one in the pipe
CHATTER = re.compile(
    rb"(?:resizing .* to \d+ bytes"
    rb"|IO_FLAG_ONDISK_SAME_DIR: updating ondisk filename from .* to .*"
    rb"|WARNING:? clustering \d+ points to \d+ centroids: please provide at least \d+ training points)\r?$")

JOIN_SECONDS = 2.0  # a child process started meanwhile may hold a pipe open: stop waiting for it

_LOCK = threading.Lock()
_users = {1: 0, 2: 0}  # quiet() calls inside, per file descriptor
_active: dict[int, _Redirect] = {}


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


def _without_chatter(line: bytes) -> bytes:
    """LINE with its newline, or without the FAISS line it ends with (and then without a newline:
    what comes before it is another writer's unfinished line, which that writer ends)."""
    m = CHATTER.search(line)
    return line + b"\n" if m is None else line[:m.start()]


class _Redirect:
    """File descriptor FD pointed at a pipe, and the thread that forwards its lines to a copy of
    what FD was."""

    def __init__(self, fd: int) -> None:
        _flush()
        self.fd, self.saved = fd, os.dup(fd)
        self.read, w = os.pipe()
        os.dup2(w, fd)
        os.close(w)
        self.thread = threading.Thread(target=self._forward, name=f"native-output-{fd}", daemon=True)
        self.thread.start()

    def _forward(self) -> None:
        tail = b""
        while chunk := os.read(self.read, 1 << 16):  # b"": every write end closed
            *lines, tail = (tail + chunk).split(b"\n")
            kept = b"".join(_without_chatter(line) for line in lines)
            if kept:
                _write_all(self.saved, kept)
        if tail:
            _write_all(self.saved, tail)
        os.close(self.read)

    def close(self) -> None:
        _flush()
        os.dup2(self.saved, self.fd)  # closes the pipe's write end held as FD: the forwarder sees EOF
        self.thread.join(JOIN_SECONDS)
        if not self.thread.is_alive():
            os.close(self.saved)
        # else a child process holds a write end: the forwarder goes on for it, with the saved fd


@contextmanager
def quiet(stderr: bool = True) -> Iterator[None]:
    """FAISS's known lines about its normal work dropped from stdout (and STDERR, when true) while
    the block runs; everything else written there, by any thread, passes through. Where FAISS's
    lines go to stdout alone (its printf: "resizing …", "IO_FLAG_ONDISK_SAME_DIR …"), leave stderr
    as it is: a crash inside the block then reports there as it would anywhere."""
    if os.environ.get("EMBEDDER_NATIVE_OUTPUT") == "1":  # debugging FAISS: let it talk
        yield
        return
    fds = (1, 2) if stderr else (1,)
    with _LOCK:
        for fd in fds:
            if _users[fd] == 0:
                _active[fd] = _Redirect(fd)
            _users[fd] += 1
    try:
        yield
    finally:
        with _LOCK:
            for fd in fds:
                _users[fd] -= 1
                if _users[fd] == 0:
                    _active.pop(fd).close()

"""One writer at a time: an exclusive, non-blocking flock on a lock file (per open file, so it
also excludes a second writer in the same process), released when the block ends or the process dies."""

from __future__ import annotations

import fcntl
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def exclusive(lock_file: Path, busy: Callable[[], Exception]) -> Iterator[None]:
    """Hold LOCK_FILE for the block; raise ``busy()`` at once if another writer holds it."""
    f = open(lock_file, "a+")  # noqa: SIM115 - held for the duration of the block
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise busy() from None
        yield
    finally:
        f.close()

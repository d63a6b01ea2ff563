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


LEASE_S = 60.0  # a lease not renewed for this long belongs to a writer that is gone
SETTLE_S = 0.5  # between writing a lease and reading it back


@contextmanager
def lease(lock_object: str, busy: Callable[[str], Exception], ttl_s: float = LEASE_S) -> Iterator[None]:
    """One writer at a time where there is no flock: object storage. LOCK_OBJECT holds the writer's
    token, host, pid and expiry; it is renewed every third of TTL_S by a thread and deleted at the end.
    Another writer's lease is respected until it expires, or at once if it names a process of this
    host that no longer runs (a killed run resumes without waiting). Without conditional writes the
    store cannot arbitrate two writers started within SETTLE_S of each other: each writes its lease,
    waits, and reads it back; the one that reads another's token gives way, but two that both read
    their own (one wrote after the other checked) would both go on. ``busy(holder)`` is raised with
    a description of the holder."""
    import json
    import os
    import socket
    import threading
    import time
    import uuid

    from embedder.io import storage

    def read() -> dict[str, object] | None:
        """The lease held now; None when there is none, or it is not one (taken over like an expired one)."""
        try:
            held = json.loads(storage.read_bytes(lock_object))
        except (FileNotFoundError, ValueError):
            return None
        if not isinstance(held, dict) or not isinstance(held.get("expires"), (int, float)):
            return None
        return held

    def describe(held: dict[str, object]) -> str:
        left = max(0.0, float(held["expires"]) - time.time())  # type: ignore[arg-type]
        return f"pid {held.get('pid')} on {held.get('host')} (its lease ends in {left:.0f} s unless renewed)"

    def stale(held: dict[str, object]) -> bool:
        if float(held["expires"]) < time.time():  # type: ignore[arg-type]
            return True
        if held.get("host") == socket.gethostname() and isinstance(held.get("pid"), int):
            try:
                os.kill(int(held["pid"]), 0)  # type: ignore[call-overload]
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
        return False

    me = {"token": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()}

    def write() -> None:
        storage.write_bytes(lock_object, json.dumps({**me, "expires": time.time() + ttl_s}).encode())

    held = read()
    if held is not None and not stale(held):
        raise busy(describe(held))
    write()
    time.sleep(SETTLE_S)
    held = read()
    if held is None or held.get("token") != me["token"]:
        raise busy(describe(held) if held else "another writer")
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(ttl_s / 3):
            try:
                now = read()
                if now is None or now.get("token") != me["token"]:
                    return  # taken over (this writer was paused past its lease): leave it
                write()
            except Exception:  # noqa: BLE001 - a missed renewal is retried at the next tick
                continue

    renewer = threading.Thread(target=renew, name="embedder-lease", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        try:
            now = read()
            if now is not None and now.get("token") == me["token"]:
                storage.delete(lock_object)
        except Exception:  # noqa: BLE001 - an unreleased lease expires by itself
            pass

"""``native_output.quiet()``: FAISS's lines about its normal work are dropped, nothing else is, whatever
thread wrote it (file descriptors belong to the whole process)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import logging, os, sys, threading, time
    import numpy as np
    import faiss
    from embedder.native_output import quiet

    logging.basicConfig(stream=sys.stderr, format="%(message)s", level=logging.INFO)
    inside = threading.Event()
    done = threading.Event()

    def chatty():  # another thread's logs, written while quiet() is active in the main thread
        inside.wait()
        for i in range(20):
            logging.info("log line %d", i)
            print(f"print line {i}", flush=True)
        done.set()

    t = threading.Thread(target=chatty)
    t.start()
    with quiet():
        inside.set()
        lists = faiss.OnDiskInvertedLists(4, 8, sys.argv[1])  # prints "resizing ... to N bytes"
        lists.add_entries(0, 3, faiss.swig_ptr(np.arange(3, dtype=np.int64)),
                          faiss.swig_ptr(np.zeros(24, dtype=np.uint8)))
        os.write(2, b"not faiss chatter\\n")
        done.wait(10)
    t.join()
    print("after", flush=True)
""")


def test_other_threads_output_survives_while_faiss_chatter_is_dropped(tmp_path) -> None:  # type: ignore[no-untyped-def]
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "lists.ivfdata")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "resizing" not in r.stdout + r.stderr  # FAISS printed it (unfiltered below): dropped
    err_lines = r.stderr.splitlines()
    assert [x for x in err_lines if x.startswith("log line")] == [f"log line {i}" for i in range(20)]
    assert "not faiss chatter" in err_lines
    assert r.stdout.splitlines() == [f"print line {i}" for i in range(20)] + ["after"]


def test_faiss_really_prints_what_is_dropped(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The chatter the first test checks for is real: with the filter off, it is there."""
    import os

    env = {**os.environ, "EMBEDDER_NATIVE_OUTPUT": "1"}
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "lists.ivfdata")],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    assert "resizing" in r.stdout and "log line 19" in r.stderr


def test_stdout_only_leaves_stderr_as_it_is() -> None:
    """FAISS's printf lines go to stdout alone: there quiet(stderr=False) leaves fd 2 untouched, so a
    crash inside the block reports on stderr as it would anywhere."""
    import os

    from embedder.native_output import quiet

    before = (os.fstat(1).st_ino, os.fstat(2).st_ino)
    with quiet(stderr=False):
        assert os.fstat(2).st_ino == before[1] and os.fstat(1).st_ino != before[0]
        with quiet():  # nested, from anywhere: stderr too while this one runs
            assert os.fstat(2).st_ino != before[1]
        assert os.fstat(2).st_ino == before[1]
    assert (os.fstat(1).st_ino, os.fstat(2).st_ino) == before

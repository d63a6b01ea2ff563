"""A Ray worker set-up hook for the worker-kill test, loaded by Ray in every worker of that test's job
(``runtime_env={"worker_process_setup_hook": "tests.ray_hooks.slow_embedding"}``)."""

from __future__ import annotations

import os
import time
from typing import Any

BATCH_LOG = "EMBEDDER_TEST_BATCH_LOG"
PAUSE_S = 0.02


def slow_embedding() -> None:
    """Every batch through the model actor first sleeps PAUSE_S and appends one byte to the file named
    by $EMBEDDER_TEST_BATCH_LOG, so that the test can kill the actor after a known number of batches
    with seconds of work still left (the tiny model alone finishes a small run in about a second),
    and count afterwards how many batches were embedded again after the kill."""
    from embedder import ray_engine

    original = ray_engine._Embed.__call__

    def logged(self: Any, batch: Any) -> Any:
        time.sleep(PAUSE_S)
        with open(os.environ[BATCH_LOG], "ab") as f:
            f.write(b".")
        return original(self, batch)

    ray_engine._Embed.__call__ = logged  # type: ignore[method-assign]

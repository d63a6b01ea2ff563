"""A Ray worker set-up hook for the worker-kill test, loaded by Ray in every worker of that test's job
(``runtime_env={"worker_process_setup_hook": "tests.ray_hooks.slow_embedding"}``)."""

from __future__ import annotations

import os
import time
from typing import Any

BATCH_LOG = "EMBEDDER_TEST_BATCH_LOG"
PAUSE_S = 0.02
HOLD_AT = 150  # the batch at which the model actor stops and waits to be killed


def slow_embedding() -> None:
    """Every batch through the model actor appends one byte to the file named by
    $EMBEDDER_TEST_BATCH_LOG and sleeps PAUSE_S (the tiny model alone finishes a small run in about
    a second); the HOLD_AT-th batch then waits, so that the test kills the actor in the middle of a
    batch, never between two, and can count afterwards the batches embedded again after the kill.
    The restarted actor never waits: the log is past HOLD_AT for it."""
    from embedder.embed import ray as embed_ray

    original = embed_ray._Embed.__call__

    def logged(self: Any, batch: Any) -> Any:
        with open(os.environ[BATCH_LOG], "ab") as f:
            f.write(b".")
        if os.path.getsize(os.environ[BATCH_LOG]) == HOLD_AT:
            time.sleep(300)  # killed here
        time.sleep(PAUSE_S)
        return original(self, batch)

    embed_ray._Embed.__call__ = logged  # type: ignore[method-assign]

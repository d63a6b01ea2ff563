"""Micro-batching: requests that arrive within a short window are answered by one call.

Each request awaits its own future; one collector task takes the first waiting request plus
whatever else is already queued, and runs the batch function in a worker thread (never on the event
loop). It waits up to the window for more only while other requests are in flight (being received
or parsed): a lone client pays no window, and under load the next batch fills while one runs.
(Measured: a fixed 5 ms window cost a single client 40 % of its throughput on image queries and
78 % on vector queries; docs/benchmarks.md.) With batching off, each request runs alone in the same
worker pool (what one-request-at-a-time serving does).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class MicroBatcher(Generic[T, R]):
    def __init__(self, fn: Callable[[list[T]], list[R | Exception]], window_ms: float, max_batch: int,
                 executor: ThreadPoolExecutor, enabled: bool = True,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self.fn, self.window, self.max_batch = fn, window_ms / 1000.0, max(1, max_batch)
        self.executor, self.enabled, self.on_batch = executor, enabled, on_batch
        self._queue: asyncio.Queue[tuple[T, asyncio.Future[R]]] | None = None
        self._task: asyncio.Task[None] | None = None
        self.in_flight = 0  # requests between arrival and answer (the HTTP layer counts them)

    async def start(self) -> None:
        if self.enabled:
            self._queue = asyncio.Queue()
            self._task = asyncio.create_task(self._collect())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def submit(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        if self._queue is None:  # batching off: this request alone
            result = (await loop.run_in_executor(self.executor, self._run, [item]))[0]
            if isinstance(result, Exception):
                raise result
            return result
        fut: asyncio.Future[R] = loop.create_future()
        self._queue.put_nowait((item, fut))
        return await fut

    def _run(self, items: list[T]) -> list[R | Exception]:
        if self.on_batch:
            self.on_batch(len(items))
        try:
            return self.fn(items)
        except Exception as e:  # noqa: BLE001 - every waiter gets the error, the service lives on
            return [e] * len(items)

    async def _collect(self) -> None:
        queue = self._queue
        if queue is None:
            return
        loop = asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            while len(batch) < self.max_batch and not queue.empty():
                batch.append(queue.get_nowait())
            deadline = loop.time() + self.window
            while len(batch) < min(self.max_batch, self.in_flight):  # more are on their way
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), timeout))
                except TimeoutError:
                    break
            results = await loop.run_in_executor(self.executor, self._run, [item for item, _ in batch])
            for (_, fut), result in zip(batch, results):
                if fut.done():  # the client went away
                    continue
                if isinstance(result, Exception):
                    fut.set_exception(result)
                else:
                    fut.set_result(result)

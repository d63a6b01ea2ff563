"""Filling a store: batched inference of a frozen backbone, written as atomic shards.

``BatchEmbedder`` is the engine-agnostic unit: the model is loaded once in ``__init__``; decoded
uint8 pixels go in (``launch`` / ``embed_pixels``, the pixels-in entry point) and vectors come out;
``__call__`` is the paths-in entry point built on it (a ``pa.Table`` of paths in, rows out). The
local pipeline (``embed.lanes``: decode workers running ahead of the model into a ring of batch
buffers) and the Ray engine (``embed.ray``: decode tasks, model actors) both feed the pixels-in entry
point, and both write through ``fill_store`` here: atomic shards, resume and error bookkeeping.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import platform
import time
import uuid
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import torch

from embedder.decode.pool import (
    resolve_decode_in,
    start_server,
)
from embedder.embed import worklist
from embedder.embed.batch import BatchEmbedder, StageTimes
from embedder.embed.lanes import embed_stream, run_lanes
from embedder.embed.options import EmbedOptions, RunOptions
from embedder.io import storage
from embedder.io.sources import ImageRef, iter_discover
from embedder.models.builder import ModelSpec
from embedder.models.devices import resolve_device
from embedder.store.provenance import Provenance
from embedder.store.shards import ERRORS_SCHEMA, ShardBuffer, Store

log = logging.getLogger(__name__)


MAX_FAILURES_SHOWN = 100  # failures a summary lists (all of them are in the store's errors table)


@dataclass
class ExtractSummary:
    discovered: int = 0
    skipped_present: int = 0
    skipped_failed_before: int = 0
    done: int = 0
    failed: int = 0
    seconds: float = 0.0
    device: str = ""
    store: str = ""
    failures: list[tuple[str, str]] = field(default_factory=list)  # the first MAX_FAILURES_SHOWN only
    stages: dict[str, Any] = field(default_factory=dict)  # StageTimes.report: what bounded the run

    def note_failure(self, path: str, reason: str) -> None:
        """Every failure is in the store's errors table; the summary keeps the first few to show."""
        if len(self.failures) < MAX_FAILURES_SHOWN:
            self.failures.append((path, reason))

    @property
    def images_per_second(self) -> float:
        return (self.done + self.failed) / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "failures"}
        d["images_per_second"] = round(self.images_per_second, 2)
        d["failures"] = [{"path": p, "reason": r} for p, r in self.failures[:100]]
        return d


def extract(
    sources: Sequence[str],
    store_path: str,
    spec: ModelSpec,
    embed: EmbedOptions = EmbedOptions(),
    run: RunOptions = RunOptions(),
    progress: Callable[[int, int, int], None] | None = None,
    embedder: BatchEmbedder | None = None,
) -> ExtractSummary:
    """Embed every image under SOURCES not already in STORE; resumable, atomic, incremental.

    ``progress(total, advanced, failed)`` is called once with advanced=0 to announce the total,
    then after every batch.
    """
    t_start = time.perf_counter()
    if (embedder is None and run.decode_in != "threads" and embed.decoder != "nvjpeg"
            and resolve_device(embed.device).type == "cuda"):
        start_server()  # decode processes' imports overlap loading the model
    tables: list[str] = []  # table files read: their rows' ids follow run.sources.id_scheme
    with worklist.build(iter_discover(sources, run.sources, tables.append)) as work:
        embedder = embedder or BatchEmbedder(spec, embed)
        lanes = run_lanes(embedder, run)
        # a combination that cannot run is refused before the store is created
        resolve_decode_in(run.decode_in, embedder.device, 1, 0, embedder.options.decoder,
                          embedder.lane_threads(lanes) if lanes > 1 else None)
        summary = ExtractSummary(device=str(embedder.device), store=store_path)
        provenance = embedder.provenance()
        local = embedder

        def stream(todo: worklist.Refs, on_error: Callable[[ImageRef, str], None]
                   ) -> Generator[tuple[pa.Table, int], None, None]:
            return embed_stream(todo, local, run, on_error)

        with Store.writer(store_path, provenance) as store:
            still_to_do(store, work, run, summary, bool(tables))
            fill_store(store, work, embedder, provenance, run, summary, progress, t_start, stream)
    return summary


def still_to_do(store: Store, work: worklist.WorkList, run: RunOptions, summary: ExtractSummary,
                tables: bool = False) -> None:
    """Leave out of WORK what the store holds (resume: its id index, never its ids as a set) and
    earlier failures unless they are to be retried; the counts go to SUMMARY. TABLES: the run read
    tables, whose rows' ids must be made as the store's were (``Store.require_id_scheme``)."""
    if tables:
        store.require_id_scheme(run.sources.id_scheme)
    work.drop_held(store.shard_files(), None if run.retry_failed else store.errors().column("id"))
    summary.discovered = work.counts.discovered
    summary.skipped_present = work.counts.present
    summary.skipped_failed_before = work.counts.failed_before


def new_run_record(embedder: BatchEmbedder, engine: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the manifest says of one run (updated with its counts as it goes)."""
    return {
        "run_id": uuid.uuid4().hex[:12],
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": str(embedder.device), "precision": embedder.precision,
        "torch_threads": torch.get_num_threads(), "host": platform.node(),
        "decoder": embedder.options.decoder, "compiled": embedder.options.compile,
        **(engine or {"engine": "local"}),
        # where the weights file was: the steps after extract take it from here (store.remembered)
        **({"weights_file": os.path.abspath(embedder.spec.weights_file)} if embedder.spec.weights_file else {}),
    }


# Rows in, per batch: (the batch's embedded rows, how many of its images failed); failures are
# reported through the callback. The local pipeline and the Ray engine both produce one.
StreamFn = Callable[[worklist.Refs, Callable[[ImageRef, str], None]],
                    Generator[tuple[pa.Table, int], None, None]]


def fill_store(store: Store, todo: worklist.Refs, embedder: BatchEmbedder, provenance: Provenance,
               run: RunOptions, summary: ExtractSummary, progress: Callable[[int, int, int], None] | None,
               t_start: float, stream_fn: StreamFn, engine: dict[str, Any] | None = None) -> None:
    """Embed TODO (what the store lacks: ``still_to_do``), flushing whole shards as it goes (caller
    holds the lock). ``embedder`` gives the shapes and the run record; ``stream_fn`` computes the
    vectors."""
    if progress:
        progress(len(todo), 0, 0)
    run_record = new_run_record(embedder, engine)
    if not todo:
        summary.seconds = time.perf_counter() - t_start
        return

    # Two shard buffers: one fills while the other is written by one writer thread (Parquet
    # encoding, zstd and fsync release the GIL, so writing overlaps the model loop). At most one
    # write is in flight, so memory stays two shards, and shards land in order.
    buffers = [ShardBuffer(embedder.dim, embedder.options.dtype, run.shard_rows) for _ in range(2)]
    buffer = buffers[0]
    pending_errors: list[dict[str, Any]] = []
    last_flush = time.monotonic()
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")
    in_flight: Future[None] | None = None

    def write(table: pa.Table | None, errors: pa.Table | None, record: dict[str, Any]) -> None:
        added = []
        if table is not None:
            added.append((storage.name(store.write_shard(table, provenance)), table.num_rows))
        if errors is not None:
            store.write_errors(errors)
        store.update_manifest(record, added)

    def flush(wait: bool = False) -> None:
        nonlocal last_flush, buffer, in_flight
        if in_flight is not None:
            in_flight.result()  # the other buffer is free again (and a failed write surfaces here)
            in_flight = None
        table = buffer.take() if buffer.rows else None
        errors = pa.Table.from_pylist(pending_errors, schema=ERRORS_SCHEMA) if pending_errors else None
        pending_errors.clear()
        last_flush = time.monotonic()
        run_record.update(done=summary.done, failed=summary.failed,
                          seconds=round(time.perf_counter() - t_start, 2))
        if embedder.graph_choice is not None:  # what computed the vectors on a CPU
            run_record.update(embedder.graph_choice.record())
        in_flight = writer.submit(write, table, errors, dict(run_record))
        buffer = buffers[1] if buffer is buffers[0] else buffers[0]
        if wait:
            in_flight.result()
            in_flight = None

    def on_error(ref: ImageRef, reason: str) -> None:
        summary.failed += 1
        summary.note_failure(ref.path, reason)
        pending_errors.append({"id": ref.id, "path": ref.path, "reason": reason,
                               "time": dt.datetime.now(dt.UTC)})

    embedder.stages = StageTimes()
    t_stream = time.perf_counter()  # the stages share this span, not model loading or discovery
    try:
        with closing(stream_fn(todo, on_error)) as stream:
            for table, n_failed in stream:
                t_write = time.perf_counter()
                summary.done += table.num_rows
                rest = buffer.append(table)
                while rest.num_rows:  # a batch larger than what is left of the shard
                    flush()
                    rest = buffer.append(rest)
                if progress:
                    progress(len(todo), table.num_rows + n_failed, summary.failed)
                if buffer.full or time.monotonic() - last_flush >= run.flush_seconds:
                    flush()
                embedder.stages.write_s += time.perf_counter() - t_write
    finally:
        # Whatever finished is kept, even on Ctrl-C or an unexpected error.
        try:
            flush(wait=True)
        finally:
            writer.shutdown(wait=True)
        summary.seconds = time.perf_counter() - t_start
        summary.stages = embedder.stages.report(time.perf_counter() - t_stream)

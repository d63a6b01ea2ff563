"""Streaming lanes: decode, copy and model steps overlapped across lanes, results in order, every
failure kept."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Generator
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from typing import cast

import pyarrow as pa
import torch

from embedder.decode.common import ImageMeta
from embedder.decode.pool import (
    DecodeSpec,
    DecodeWorkers,
    Outcome,
    Ring,
    decode_rows,
    default_workers,
    resolve_decode_in,
)
from embedder.embed import worklist
from embedder.embed.batch import BatchEmbedder, LaneResult, Pending
from embedder.embed.options import RunOptions, default_batch, default_lanes
from embedder.io.sources import ImageRef

log = logging.getLogger(__name__)


@dataclass
class _Launched:
    """A batch on the model: which rows came through decoding, and the pending vectors."""

    slot: int
    refs: list[ImageRef]
    metas: list[ImageMeta]
    good: list[int]
    failed: int
    pending: Pending | None


def run_lanes(embedder: BatchEmbedder, run: RunOptions) -> int:
    """The CPU model lanes a run gets: ``--model-lanes`` or the default, as far as the model allows."""
    return embedder.usable_lanes(default_lanes() if run.model_lanes is None else run.model_lanes)


def embed_stream(
    refs: worklist.Refs,
    embedder: BatchEmbedder,
    run: RunOptions,
    on_error: Callable[[ImageRef, str], None],
) -> Generator[tuple[pa.Table, int], None, None]:
    """Decode in workers that run ahead of the model; yield (rows, failed in this batch) per batch.

    Decode workers (threads or processes, ``decode_pool``) write pixels straight into a fixed ring
    of ``prefetch_batches + 1`` reused batch buffers (shared and page-locked where that helps): no
    per-image tensors, no per-batch stacking, fixed memory. Batch k+1 is launched on the model
    before batch k's vectors are collected, so on a GPU the device works while the host turns
    vectors into rows, and on a CPU two lanes compute batches k and k+1 at once (see
    ``BatchEmbedder.cpu_lanes``); a slot is refilled as soon as its pixels are on the device (on a
    CPU lane: once its vectors are back). With ``decode_in="lanes"`` (what ``auto`` picks on a CPU
    whose lanes have one thread each) there are no decode workers: each lane decodes its own batch
    and then computes it (``_stream_in_lanes``). Shared by extract (which writes shards) and predict
    (which applies a head).
    """
    bs = run.batch_size or default_batch(embedder.device)
    crop = embedder.loaded.preprocessing.crop_size
    n_slots = max(2, run.prefetch_batches) + 1
    workers = run.workers or default_workers()
    lanes_wanted = run_lanes(embedder, run)
    kind = resolve_decode_in(run.decode_in, embedder.device, workers, n_slots * bs * 3 * crop * crop,
                             embedder.options.decoder,
                             # idle decode priority is for decode workers: auto keeps them then
                             embedder.lane_threads(lanes_wanted) if lanes_wanted > 1 and (
                                 run.decode_in == "lanes" or run.decode_priority == "normal") else None)
    if kind == "lanes":
        yield from _stream_in_lanes(refs, embedder, bs, lanes_wanted, on_error)
        return
    ring = Ring(n_slots, bs, crop, shared=kind == "processes", pin=embedder.device.type == "cuda")
    spec = DecodeSpec(embedder.loaded.preprocessing, embedder.options.max_pixels, embedder.options.decoder,
                      embedder.options.max_image_bytes)
    on_device = spec.decoder == "nvjpeg"  # decode threads write the batch on the GPU directly
    slot_device: list[torch.Tensor | None] = [None] * n_slots
    slot_refs: list[list[ImageRef]] = [[] for _ in range(n_slots)]
    slot_futures: list[list[Future[list[Outcome]]]] = [[] for _ in range(n_slots)]
    in_flight: deque[int] = deque()
    it = iter(refs)
    stages = embedder.stages

    def finish(b: _Launched) -> tuple[pa.Table, int]:
        if b.pending is None:
            return embedder.schema.empty_table(), b.failed
        vectors = b.pending.result()[:len(b.refs)]
        if b.failed:
            vectors = vectors[b.good]
        return embedder.rows_from([b.refs[i] for i in b.good], b.metas, vectors), b.failed

    try:
        with DecodeWorkers(ring, spec, kind, workers, run.decode_priority) as pool, \
                embedder.cpu_lanes(lanes_wanted) as lanes:
            embedder.prepare_graph(bs, -(-len(refs) // bs))
            # with CPU lanes a batch's slot is in use until its vectors are back: it is refilled
            # then, one batch later, while the next batch computes on the other lane
            deferred = lanes > 1

            def fill(slot: int) -> bool:
                slot_refs[slot] = [r for _, r in zip(range(bs), it)]
                target, ready = None, None
                if on_device and slot_refs[slot]:
                    # a fresh block from the caching allocator; written on the decode threads' streams
                    # only after the model's stream has passed this point (it may hold a batch that
                    # used the block before)
                    target = torch.empty((bs, 3, crop, crop), dtype=torch.uint8, device=embedder.device)
                    ready = torch.cuda.Event()
                    ready.record()
                slot_device[slot] = target
                slot_futures[slot] = pool.submit(slot, [r.path for r in slot_refs[slot]], target, ready)
                if slot_refs[slot]:
                    in_flight.append(slot)
                return bool(slot_refs[slot])

            for slot in range(n_slots):
                if not fill(slot):
                    break
            # batches launched and not yet collected: the newest computes while the oldest is
            # turned into rows (on CPU lanes, as many compute at once as there are lanes)
            launched: deque[_Launched] = deque()
            depth = max(lanes, 2)
            while in_flight or launched:
                if in_flight:
                    slot = in_flight.popleft()
                    t0 = time.perf_counter()
                    outcomes = [o for fut in slot_futures[slot] for o in fut.result()]
                    stages.decode_wait_s += time.perf_counter() - t0
                    batch = _Launched(slot, slot_refs[slot], [], [], 0, None)
                    n = bs if embedder.options.compile else len(batch.refs)
                    source = slot_device[slot] if on_device else ring.pixels[slot]
                    pixels = cast(torch.Tensor, source)[:n]
                    for i, (ref, outcome) in enumerate(zip(batch.refs, outcomes)):
                        if isinstance(outcome, str):
                            batch.failed += 1
                            on_error(ref, outcome)
                            log.info("skipped %s: %s", ref.path, outcome)
                        else:
                            batch.metas.append(outcome)
                            batch.good.append(i)
                    if batch.good:
                        # a compiled model sees one shape: the whole buffer (the last batch padded with
                        # stale rows, whose outputs are dropped)
                        batch.pending = embedder.launch(pixels)
                    slot_futures[slot] = []
                    if not deferred:
                        if batch.pending is not None:
                            batch.pending.wait_copied()
                        fill(slot)  # the buffer is free again: decode the batch after the queued ones
                    launched.append(batch)
                    if len(launched) < depth and in_flight:
                        continue
                oldest = launched.popleft()
                done = finish(oldest)  # while the newer batches run on the device (or the other lanes)
                if deferred:
                    fill(oldest.slot)
                yield done
    finally:
        for futures in slot_futures:
            for fut in futures:
                fut.cancel()
        ring.close()


def _stream_in_lanes(refs: worklist.Refs, embedder: BatchEmbedder, bs: int, lanes: int,
                     on_error: Callable[[ImageRef, str], None]) -> Generator[tuple[pa.Table, int], None, None]:
    """``embed_stream`` with ``--decode-in lanes``: every batch is one lane task that decodes its
    images into its slot of a fixed ring and then computes them (``BatchEmbedder.launch_decoding``).
    One task per lane is queued behind the running ones, so a lane that finishes starts its next
    batch at once; rows come out in order, and a slot is refilled as soon as its batch is back."""
    spec = DecodeSpec(embedder.loaded.preprocessing, embedder.options.max_pixels, embedder.options.decoder,
                      embedder.options.max_image_bytes)
    n_slots = 2 * lanes
    ring = Ring(n_slots, bs, spec.pre.crop_size, shared=False, pin=False)
    it = iter(refs)
    queued: deque[tuple[int, list[ImageRef], Future[LaneResult]]] = deque()
    stages = embedder.stages
    with embedder.cpu_lanes(lanes):
        embedder.prepare_graph(bs, -(-len(refs) // bs))
        try:
            def fill(slot: int) -> None:
                chunk = [r for _, r in zip(range(bs), it)]
                if chunk:
                    paths = [r.path for r in chunk]
                    decode = partial(decode_rows, ring.pixels, spec, slot, 0, paths)
                    queued.append((slot, chunk, embedder.launch_decoding(decode, ring.pixels[slot])))

            for slot in range(n_slots):
                fill(slot)
            while queued:
                slot, chunk, fut = queued.popleft()
                done = fut.result()  # waiting here is waiting for the lanes: decode_s and model_s say on what
                stages.decode_s += done.decode_s
                stages.model_s += done.model_s
                fill(slot)  # its pixels are no longer needed: the vectors are back
                good = [i for i, o in enumerate(done.outcomes) if isinstance(o, ImageMeta)]
                for ref, outcome in zip(chunk, done.outcomes):
                    if isinstance(outcome, str):
                        on_error(ref, outcome)
                        log.info("skipped %s: %s", ref.path, outcome)
                if done.vectors is None:
                    yield embedder.schema.empty_table(), len(chunk)
                    continue
                metas = [cast(ImageMeta, done.outcomes[i]) for i in good]
                yield embedder.rows_from([chunk[i] for i in good], metas, done.vectors[good]), len(chunk) - len(good)
        finally:
            for _, _, fut in queued:
                fut.cancel()
            ring.close()

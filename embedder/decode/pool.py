"""Decode workers writing pixels straight into a fixed ring of reused batch buffers.

Two kinds, one interface: ``threads`` (no start-up cost; on a CPU-only machine the model needs the
same cores, and threads measured level with processes there) and ``processes`` (decoding scales
with the cores of a GPU machine without contending for the GIL). Process workers write into the
same ring through shared memory, so no pixels are pickled; on CUDA the ring is also page-locked
(registered with the driver), so host-to-device copies start from it directly and asynchronously.
The memory of the pipeline is the ring: fixed, whatever the size of the collection.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.context import BaseContext
from typing import Any, cast

import torch

from embedder import choices
from embedder.decode.common import DEFAULT_MAX_PIXELS, ImageMeta
from embedder.decode.decoders import decode_into
from embedder.decode.nvjpeg import decode_chunk
from embedder.errors import DecodeError, EmbedderError
from embedder.io.limits import MAX_IMAGE_BYTES
from embedder.models.preprocessing import Preprocessing

log = logging.getLogger(__name__)

# ``lanes``: no decode workers; each CPU model lane (``BatchEmbedder.cpu_lanes``) decodes its own
# batch and then computes it, so the cores never hold more busy threads than there are lanes.
DECODE_IN = choices.DECODE_IN
# ``idle``: decode workers under SCHED_IDLE, taking only cores nothing else wants. On a CPU the
# model's threads and the decode workers share the cores, and a parallel region is as slow as its
# slowest thread (2 cores: MobileNetV2 at 120 img/s alone, 64 beside one busy decode thread, 46
# beside a busy zlib thread). Measured end to end it is not a reliable gain once the model runs in
# two lanes (``BatchEmbedder.cpu_lanes``): the starved decoders then make the lanes wait
# (docs/benchmarks.md), so it is opt-in.
DECODE_PRIORITIES = choices.DECODE_PRIORITIES

# What one decode task returns per image: its metadata (its pixels are in place), or the reason it
# was skipped.
Outcome = ImageMeta | str


@dataclass(frozen=True)
class DecodeSpec:
    """What every worker needs to decode like the model expects."""

    pre: Preprocessing
    max_pixels: int = DEFAULT_MAX_PIXELS
    decoder: str = "pil"
    max_image_bytes: int = MAX_IMAGE_BYTES  # an image's encoded bytes, checked before they are read


def resolve_decode_in(decode_in: str, device: torch.device, workers: int, ring_bytes: int,
                      decoder: str = "pil", lane_threads: int | None = None) -> str:
    """``auto``: processes when the model runs on a GPU and there are cores to decode on (measured on
    an H200 with 16 cores: processes 2,486 img/s against threads 770 for the pil decoder); on a CPU,
    decoding inside the model lanes when each lane has one thread (``lane_threads``: torch threads
    per CPU model lane, None without lanes; measured on 2 cores, medians of 5 rounds: 5 % (pil) and
    14 % (torchvision decoder) faster end to end than decode threads beside the lanes,
    docs/benchmarks.md "Decoding in the lanes"), else threads. Processes
    need the ring in shared memory: where /dev/shm is too small for it (a container's 64 MB default)
    they would die of SIGBUS, so threads are used instead, with a warning."""
    if decode_in not in DECODE_IN:
        raise EmbedderError(f"unknown --decode-in {decode_in!r}; valid: {', '.join(DECODE_IN)}")
    kind = decode_in
    if decoder == "nvjpeg":  # decode threads drive the GPU (a CUDA context per process would not pay)
        return "threads"
    if kind == "lanes" and lane_threads is None:
        raise EmbedderError("--decode-in lanes decodes inside the CPU model lanes: it needs a CPU device, "
                            "--model-lanes 2 or more and no --compile")
    if kind == "auto":
        if device.type == "cuda":
            kind = "processes" if workers >= 4 else "threads"
        else:
            kind = "lanes" if lane_threads == 1 else "threads"
    if kind == "processes":
        free = shm_free_bytes()
        if free is not None and free < ring_bytes * 1.25:
            log.warning("decoding in threads: /dev/shm has %d MiB free, the decode ring needs %d MiB "
                        "(give the container more, e.g. docker --shm-size 1g)", free >> 20, ring_bytes >> 20)
            kind = "threads"
    return kind


def lower_priority(priority: str) -> None:
    """Run the calling thread (or process) at PRIORITY: ``idle`` is ``SCHED_IDLE`` where the OS
    has it (Linux), else the lowest nice value; a thread never gets its priority back, so this is
    for threads that live and die with one decode pool."""
    if priority != "idle":
        return
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # type: ignore[attr-defined]
        return
    except (AttributeError, OSError):
        pass
    try:  # on Linux PRIO_PROCESS with a thread id applies to that thread only
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError) as e:
        log.info("cannot lower the decode workers' priority (%s)", e)


def shm_free_bytes() -> int | None:
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


class Ring:
    """``n_slots`` reused uint8 batch buffers [n_slots, batch, 3, crop, crop]."""

    def __init__(self, n_slots: int, batch: int, crop: int, shared: bool, pin: bool) -> None:
        shape = (n_slots, batch, 3, crop, crop)
        self.pinned = False
        self._registered = False
        if shared:
            self.pixels = torch.empty(shape, dtype=torch.uint8).share_memory_()
            if pin:
                self._registered = self.pinned = _register(self.pixels)
        else:
            self.pixels = torch.empty(shape, dtype=torch.uint8, pin_memory=pin)
            self.pinned = pin

    def close(self) -> None:
        if self._registered:
            torch.cuda.cudart().cudaHostUnregister(self.pixels.data_ptr())
            self._registered = False


def _register(t: torch.Tensor) -> bool:
    """Page-lock shared memory in place (``pin_memory()`` would copy it out of the shared segment)."""
    try:
        err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
    except Exception as e:  # noqa: BLE001 - without it the copies go through a staging buffer
        log.info("cannot page-lock the decode ring (%s); copies will be staged", e)
        return False
    ok = int(err) == 0 if not hasattr(err, "value") else int(err.value) == 0
    if not ok:
        log.info("cudaHostRegister failed (%s); copies will be staged", err)
    return ok


# --- process workers: module-level state set once per process by the initializer ---------------
_WORKER: dict[str, object] = {}


def _init_process(pixels: torch.Tensor, spec: DecodeSpec, priority: str) -> None:
    torch.set_num_threads(1)  # N decode processes × all-core torch pools would oversubscribe
    lower_priority(priority)
    _WORKER["pixels"] = pixels
    _WORKER["spec"] = spec


def decode_rows(pixels: torch.Tensor, spec: DecodeSpec, slot: int, start: int,
                 paths: Sequence[str]) -> list[Outcome]:
    """Decode PATHS into rows ``start..`` of ring slot SLOT; per image its metadata or why not."""
    out: list[Outcome] = []
    for i, path in enumerate(paths):
        try:
            out.append(decode_into(path, spec.pre, pixels[slot, start + i], spec.max_pixels, spec.decoder,
                                   spec.max_image_bytes))
        except DecodeError as e:
            out.append(str(e))
    return out


def _decode_in_process(slot: int, start: int, paths: Sequence[str]) -> list[Outcome]:
    return decode_rows(cast(torch.Tensor, _WORKER["pixels"]), cast(DecodeSpec, _WORKER["spec"]),
                        slot, start, paths)


def _context() -> BaseContext:
    import multiprocessing as mp

    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["embedder.decode.pool"])
    return ctx


def start_server() -> None:
    """Start the fork server now (it imports torch once, ~2 s) so that it overlaps whatever the
    caller does next, such as loading the model."""
    if _context().get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


class DecodeWorkers:
    """Decodes a slot's paths into that slot's rows; ``submit`` returns one future per chunk."""

    def __init__(self, ring: Ring, spec: DecodeSpec, kind: str, workers: int, priority: str = "normal") -> None:
        if kind not in ("threads", "processes"):
            raise EmbedderError(f"unknown decode worker kind {kind!r}; valid: threads, processes")
        if priority not in DECODE_PRIORITIES:
            raise EmbedderError(f"unknown decode priority {priority!r}; valid: {', '.join(DECODE_PRIORITIES)}")
        self.ring, self.spec, self.kind, self.workers = ring, spec, kind, workers
        self._pool: Executor
        if kind == "threads":
            self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode",
                                            initializer=lower_priority, initargs=(priority,))
            self.chunk = 1  # finest balance; a thread task costs microseconds
        else:
            # A fork of a process that holds CUDA state and threads is unsafe; a fork server that
            # has imported the decoders once starts each worker in milliseconds (spawn: ~2 s each).
            self._pool = ProcessPoolExecutor(max_workers=workers, mp_context=_context(),
                                             initializer=_init_process, initargs=(ring.pixels, spec, priority))
            self.chunk = max(1, min(16, ring.pixels.shape[1] // (2 * workers)))

    def submit(self, slot: int, paths: Sequence[str], target: torch.Tensor | None = None,
               ready: Any = None) -> list[Future[list[Outcome]]]:
        """Decode PATHS into the slot's rows of the ring; with the nvjpeg decoder into ``target``
        (the batch on the GPU) after the CUDA event ``ready``."""
        futures = []
        chunk = self.chunk
        if target is not None:  # nvJPEG: one call per chunk, one chunk per thread
            chunk = -(-len(paths) // self.workers) if paths else 1
        for start in range(0, len(paths), chunk):
            part = list(paths[start:start + chunk])
            if target is not None:
                futures.append(self._pool.submit(decode_chunk, part, start, self.ring.pixels[slot], target, ready,
                                                 self.spec.pre, self.spec.max_pixels, self.spec.max_image_bytes))
            elif self.kind == "threads":
                futures.append(self._pool.submit(decode_rows, self.ring.pixels, self.spec, slot, start, part))
            else:
                futures.append(self._pool.submit(_decode_in_process, slot, start, part))
        return futures

    def close(self, cancel: bool = False) -> None:
        self._pool.shutdown(wait=True, cancel_futures=cancel)

    def __enter__(self) -> DecodeWorkers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(cancel=exc[0] is not None)


def default_workers() -> int:
    cores = os.cpu_count() or 2
    return max(1, min(32, cores - 1))

"""`embedder extract --engine ray`: the same store, computed on a Ray cluster with Ray Data.

The driver discovers the images, drops the ones the store already has (resume), and runs one
streaming Ray Data pipeline over the rest:

    paths ─map_batches(decode: CPU tasks)─▶ uint8 pixels ─map_batches(_Embed: actor pool)─▶ rows
          ─map_batches(write: tasks, one shard each)─▶ staged shard names ─▶ the driver commits

Decoding runs as CPU tasks, so it scales with the cluster's cores independently of the model; the
model runs in a pool of actors that load it once (fractional CPUs, GPUs per actor when asked) and take
decoded uint8 batches through the pixels-in entry point (``BatchEmbedder.embed_pixels``), the one the
local pipeline uses; they return Arrow tables with the store's ``fixed_size_list<float32>[dim]``
column. Write tasks put each shard into the store's ``.staging`` directory under a name derived from
its ids (a retried task rewrites the same file); the driver, holding the store's lock, commits each
reported shard with one atomic rename, records failures in the errors table and keeps the manifest
current — no vector passes through the driver. A shard is in the store only once committed; what a
killed run staged but never committed is swept by the next writer. Bad images are recorded and never
fail a block; a worker killed mid-run is restarted by Ray and its batches retried.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import pyarrow as pa

from embedder.decode.common import DEFAULT_MAX_PIXELS
from embedder.decode.decoders import resolve_decoder
from embedder.decode.pool import DecodeSpec, decode_rows
from embedder.embed import worklist
from embedder.embed.batch import BatchEmbedder
from embedder.embed.fill import ExtractSummary, new_run_record, still_to_do
from embedder.embed.options import CPU_BATCH, CUDA_BATCH, EmbedOptions, RayOptions, RunOptions
from embedder.embed.worklist import WorkList
from embedder.errors import EmbedderError, RayError
from embedder.io import storage
from embedder.io.limits import MAX_IMAGE_BYTES
from embedder.io.sources import iter_discover
from embedder.models.builder import ModelSpec
from embedder.store.shards import Store

log = logging.getLogger(__name__)


DECODE_BLOCK = 64


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RayError("the Ray engine needs Ray on this machine and every node: "
                       "pip install 'embedder[ray]'") from None
    return ray


def connect(options: RayOptions) -> Any:
    """Join the cluster at ``options.address`` (or start a local one); a one-line error if not."""
    ray = _import_ray()
    if options.address not in (None, "auto", "local"):
        _check_reachable(options.address)
    if ray.is_initialized():  # inside a Ray job or a session that already connected: use it
        current = str(ray.get_runtime_context().gcs_address)
        wanted = options.address
        # hosts are compared loosely (Ray reports the node's own IP for 127.0.0.1), ports exactly
        if wanted not in (None, "auto", "local") and wanted.rpartition(":")[2] != current.rpartition(":")[2]:
            raise RayError(f"this process is already connected to the Ray cluster at {current}, not {wanted}")
        return ray
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                              "logging_level": logging.WARNING, "configure_logging": False}
    try:
        if options.address is None:
            ray.init(address="local", num_cpus=options.local_cpus or os.cpu_count() or 2, **kwargs)
        else:
            ray.init(address=options.address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = options.address or "a local instance"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RayError(f"cannot reach the Ray cluster at {where}: {first[:200]} "
                       "(start one with `ray start --head`, or drop --address for a local instance)") from None
    from ray.data import DataContext

    for name in ("ray", "ray.data"):  # the driver's own progress bar and errors say what matters
        logging.getLogger(name).setLevel(logging.ERROR)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver shows one progress bar of its own
    ctx.print_on_execution_start = False
    return ray


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Ray retries an unreachable head for minutes; a plain TCP connection says so in seconds."""
    import socket

    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise RayError(f"--address {address!r}: expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise RayError(f"cannot reach the Ray cluster at {address}: {e.strerror or e} "
                       "(is `ray start --head` running there, and the port open?)") from None


def _decode_batch(batch: dict[str, np.ndarray], pre: Any, max_pixels: int, decoder: str,
                  max_image_bytes: int = MAX_IMAGE_BYTES) -> dict[str, np.ndarray]:
    """A Ray CPU task: paths → uint8 pixels [N,3,crop,crop] plus metadata; failures keep their row
    with the reason in ``error`` (the batch never fails)."""
    import torch

    torch.set_num_threads(1)
    paths = batch["path"]
    n = len(paths)
    pixels = np.zeros((n, 3, pre.crop_size, pre.crop_size), dtype=np.uint8)
    width = np.zeros(n, dtype=np.int32)
    height = np.zeros(n, dtype=np.int32)
    file_hash = np.empty(n, dtype=object)
    error = np.empty(n, dtype=object)
    outcomes = decode_rows(torch.from_numpy(pixels)[None], DecodeSpec(pre, max_pixels, decoder, max_image_bytes), 0, 0,
                           [str(p) for p in paths])
    for i, meta in enumerate(outcomes):
        if isinstance(meta, str):
            file_hash[i], error[i] = "", meta
        else:
            width[i], height[i], file_hash[i], error[i] = meta.width, meta.height, meta.file_hash, ""
    return {"id": batch["id"], "path": paths, "label": batch["label"], "caption": batch["caption"], "pixels": pixels,
            "width": width, "height": height, "file_hash": file_hash, "error": error}


class _Embed:
    """A Ray actor: the model loaded once; decoded batches in, the store's rows out (+ ``error``)."""

    def __init__(self, spec: ModelSpec, embed: EmbedOptions, batch_size: int = CPU_BATCH, batches: int = 0) -> None:
        try:
            self.embedder = BatchEmbedder(spec, embed)
        except EmbedderError as e:  # surfaces on the driver as the actor's death reason
            raise RuntimeError(f"worker on {os.uname().nodename} cannot load the model: {e}") from None
        # a CPU actor settles its graph once (--cpu-graph; auto times both when its share of the
        # run, BATCHES batches, is long enough), on its own threads
        self.embedder.prepare_graph(batch_size, batches)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        import torch

        emb = self.embedder
        ok = np.array([not e for e in batch["error"]], dtype=bool)
        n = len(ok)
        vectors = np.zeros((n, emb.dim), dtype=np.float32)
        if ok.any():
            vectors[ok] = emb.embed_pixels(torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok])))
        from embedder.store.shards import embeddings_to_arrow

        flat = embeddings_to_arrow(vectors, emb.options.dtype)
        mask = pa.array(~ok)
        embedding = pa.FixedSizeListArray.from_arrays(flat.values, emb.dim, mask=mask)  # null where failed
        cols = {
            "id": pa.array(list(batch["id"]), pa.string()),
            "path": pa.array(list(batch["path"]), pa.string()),
            "label": pa.array([None if v is None else str(v) for v in batch["label"]], pa.string()),
            "embedding": embedding,
            "width": pa.array(batch["width"], pa.int32()),
            "height": pa.array(batch["height"], pa.int32()),
            "file_hash": pa.array(list(batch["file_hash"]), pa.string()),
            "caption": pa.array([None if v is None else str(v) for v in batch["caption"]], pa.string()),
            "error": pa.array([e or None for e in batch["error"]], pa.string()),
        }
        return pa.table(cols)


def _can_load(spec: ModelSpec, embed: EmbedOptions) -> str | None:
    """On one node: can a worker there build the model? None, or why not."""
    try:
        BatchEmbedder(spec, replace(embed, device="cpu", compile=False))
    except EmbedderError as e:
        return f"{os.uname().nodename}: {e}"
    return None


def preflight(ray: Any, spec: ModelSpec, embed: EmbedOptions) -> list[Any]:
    """Before the store is touched: every alive node loads the model once (weights present, spec
    valid there), so that a node without the weights is a one-line error, not a failed run. Returns
    the checks running; ``check_preflight`` waits for them (so that they overlap discovery)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    check = ray.remote(num_cpus=0)(_can_load)
    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    return [check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(spec, embed)
            for node in nodes]


def check_preflight(ray: Any, refs: list[Any], timeout_s: float = 600) -> None:
    try:
        problems = [p for p in ray.get(refs, timeout=timeout_s) if p]
    except ray.exceptions.RayError as e:
        raise RayError(f"checking the Ray workers failed: {_reason(e)}") from None
    if problems:
        more = f" (and {len(problems) - 1} more nodes)" if len(problems) > 1 else ""
        raise RayError(f"a Ray worker cannot load the model: {problems[0]}{more}; every node needs the same "
                       "weights (embedder weights import FILE on each, or a shared TORCH_HOME)")


def _write_block(batch: pa.Table, store_path: str, provenance_json: str, dim: int, dtype: str) -> pa.Table:
    """A Ray task: one shard's worth of rows → a staged Parquet file in the store's ``.staging``
    (named by the block's ids, so a retried task rewrites the same file). Returns what the driver
    needs: the staged name and row count, and one row per failed image."""
    import hashlib

    import pyarrow.compute as pc

    from embedder.store.shards import Store, row_schema

    schema = row_schema(dim, dtype)
    failed_mask = pc.is_valid(batch.column("error"))
    good = batch.filter(pc.invert(failed_mask)).select(schema.names).cast(schema)
    failed = batch.filter(failed_mask)
    out: dict[str, list[Any]] = {"kind": [], "name": [], "rows": [], "id": [], "path": [], "reason": []}
    if good.num_rows:
        ids = good.column("id").to_pylist()
        name = hashlib.blake2b("\n".join(ids).encode(), digest_size=16).hexdigest() + ".parquet"
        Store(store_path).stage_shard(good, provenance_json, name)
        for k, v in (("kind", "shard"), ("name", name), ("rows", good.num_rows), ("id", None), ("path", None),
                     ("reason", None)):
            out[k].append(v)
    for rid, path, reason in zip(failed.column("id").to_pylist(), failed.column("path").to_pylist(),
                                 failed.column("error").to_pylist()):
        for k, v in (("kind", "error"), ("name", None), ("rows", 0), ("id", rid), ("path", path), ("reason", reason)):
            out[k].append(v)
    return pa.table({"kind": pa.array(out["kind"], pa.string()), "name": pa.array(out["name"], pa.string()),
                     "rows": pa.array(out["rows"], pa.int64()), "id": pa.array(out["id"], pa.string()),
                     "path": pa.array(out["path"], pa.string()), "reason": pa.array(out["reason"], pa.string())})


def _pipeline(ray: Any, todo: WorkList, spec: ModelSpec, embed: EmbedOptions, options: RayOptions,
              batch_size: int, shard_rows: int, pre: Any, max_pixels: int, store: Store,
              provenance_json: str, dim: int) -> Any:
    """paths → decode tasks → model actors → shard-writing tasks (a Ray Dataset, not yet run)."""
    # Input blocks of one decode batch: each stage emits a block's rows when it has processed all of
    # them, so a block is the pipeline's grain (blocks of 256 instead: 0.51x/0.55x local with 1/2
    # actors at 1,024 images on 2 cores, against 0.54x/0.60x, and 0.4-0.9 GB more worker memory).
    block = max(batch_size, DECODE_BLOCK)
    if (options.address or "").startswith("ray://"):
        # a Ray Client driver's disk is no node's: its blocks go to the object store from here
        # (a reference per block held until the run ends)
        ds = ray.data.from_arrow_refs([ray.put(t) for t in todo.tables(block)])
    else:
        # read as the pipeline goes, by read tasks on this node from the work list's spill file:
        # the driver puts no block and holds no reference per block; Ray Data's backpressure
        # bounds what is in flight, whatever the number of images
        ds = ray.data.read_datasource(work_list_source(todo, block))
    # Decode tasks take blocks of at least 64 images (a Ray task costs milliseconds of scheduling;
    # the actors re-batch to the model's batch size). They state the memory a batch needs (its
    # pixels and a decoded photo per row, with headroom), so the scheduler can pack them; with the
    # actors' arguments differing, Ray Data also does not fuse the two stages (fused, decoding would
    # run inside the model's actors, serially with the model).
    decode_batch = max(batch_size, DECODE_BLOCK)
    decode_memory = decode_batch * 3 * pre.crop_size * pre.crop_size * 8 + (576 << 20)  # measured: 451 MiB idle
    ds = ds.map_batches(_decode_batch, fn_kwargs={"pre": pre, "max_pixels": max_pixels, "decoder": embed.decoder,
                                                      "max_image_bytes": embed.max_image_bytes},
                        batch_size=decode_batch, batch_format="numpy", num_cpus=options.decode_cpus,
                        memory=decode_memory)
    per_actor = -(-len(todo) // (batch_size * max(1, options.workers)))
    ds = ds.map_batches(_Embed, fn_constructor_kwargs={"spec": spec, "embed": embed, "batch_size": batch_size,
                                                       "batches": per_actor}, batch_size=batch_size,
                        batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=options.workers),
                        num_cpus=options.cpus_per_worker, num_gpus=options.gpus_per_worker or None)
    # Workers write the shards; the driver only commits them (no vectors pass through the driver).
    where = {"store_path": store.root, "provenance_json": provenance_json, "dim": dim,
             "dtype": embed.dtype}
    return ds.map_batches(_write_block, fn_kwargs=where,
                          batch_size=shard_rows, batch_format="pyarrow", num_cpus=options.decode_cpus)


def work_list_source(todo: WorkList, block: int) -> Any:
    """A Ray Data datasource over TODO's spill file: one read task per spilled record batch that
    holds rows to do (which rows: a bit each, travel with it), run on the driver's node
    (where the file is), yielding tables of BLOCK rows."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class WorkListSource(Datasource):  # type: ignore[misc]
        def estimate_inmemory_data_size(self) -> int:
            return len(todo) * 256

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: Any = None) -> list[Any]:
            def task(part: worklist.SpillSlice) -> ReadTask:
                return ReadTask(lambda: part.tables(block),
                                BlockMetadata(num_rows=len(part), size_bytes=len(part) * 256, exec_stats=None,
                                              input_files=None))

            return [task(part) for part in todo.slices()]

        @property
        def supports_distributed_reads(self) -> bool:
            return False  # the spill file is on this node's disk

    return WorkListSource()


def _reason(e: BaseException) -> str:
    text = str(e)
    for line in text.splitlines():
        if "cannot load the model" in line:
            return line.strip()[:300]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (lines[-1] if lines else type(e).__name__)[:300]


def extract_ray(sources: Sequence[str], store_path: str, spec: ModelSpec, embed: EmbedOptions = EmbedOptions(),
                run: RunOptions = RunOptions(), options: RayOptions = RayOptions(),
                progress: Callable[[int, int, int], None] | None = None) -> ExtractSummary:
    """``extract`` on Ray: same store, same resume; see the module's docstring."""
    import time

    t_start = time.perf_counter()
    embed = replace(embed, decoder=resolve_decoder(embed.decoder))  # tasks get the real decoder's name
    if embed.decoder == "nvjpeg":
        raise RayError("--decoder nvjpeg decodes in the model's process; the Ray engine decodes in CPU tasks: "
                       "use --decoder torchvision (the same resize, libjpeg-turbo) or pil")
    ray = connect(options)
    on_gpu = options.gpus_per_worker > 0
    precision = embed.precision if embed.precision != "auto" else ("bf16" if on_gpu else "fp32")
    worker_embed = replace(embed, device="cuda" if on_gpu else "cpu", precision=precision)
    # The driver loads the model once on CPU: it checks the spec and weights before anything is
    # scheduled or written, and states the provenance every worker's vectors will carry.
    driver = BatchEmbedder(spec, replace(worker_embed, device="cpu", compile=False))
    checks = preflight(ray, spec, worker_embed)
    tables: list[str] = []  # table files read: their rows' ids follow run.sources.id_scheme
    work = worklist.build(iter_discover(sources, run.sources, tables.append))  # while nodes load the model
    try:
        check_preflight(ray, checks)
        return _extract_ray(ray, work, store_path, spec, embed, worker_embed, run, options, driver, progress,
                            t_start, on_gpu, bool(tables))
    finally:
        work.close()


def _extract_ray(ray: Any, todo: WorkList, store_path: str, spec: ModelSpec, embed: EmbedOptions,
                 worker_embed: EmbedOptions, run: RunOptions, options: RayOptions, driver: BatchEmbedder,
                 progress: Callable[[int, int, int], None] | None, t_start: float, on_gpu: bool,
                 tables: bool = False) -> ExtractSummary:
    import time

    provenance = driver.provenance()
    summary = ExtractSummary(device=f"ray ({options.workers} workers, {options.gpus_per_worker:g} GPU each)",
                             store=store_path)
    # the local engine's defaults (CPU actors: 4 measured against 8 with bench_ray, 1 and 2 actors:
    # level or slightly ahead in all 4 pairs, docs/benchmarks.md)
    batch_size = options.batch_size or run.batch_size or (CUDA_BATCH if on_gpu else CPU_BATCH)
    pre = driver.loaded.preprocessing
    max_pixels = embed.max_pixels or DEFAULT_MAX_PIXELS

    with Store.writer(store_path, provenance) as store:  # also sweeps shards staged by a killed run
        still_to_do(store, todo, run, summary, tables)
        if progress:
            progress(len(todo), 0, 0)
        if todo:
            record = new_run_record(driver, {"engine": "ray", "device": worker_embed.device,
                                             "address": options.address or "local", "workers": options.workers,
                                             "gpus_per_worker": options.gpus_per_worker,
                                             # each CPU actor settles its own graph (auto: timed there)
                                             **({} if on_gpu else {"cpu_graph": worker_embed.cpu_graph})})
            ds = _pipeline(ray, todo, spec, worker_embed, options, batch_size, run.shard_rows, pre, max_pixels,
                           store, provenance.to_json(), driver.dim)
            _commit(ray, ds, store, todo, record, summary, progress, t_start)
    summary.seconds = time.perf_counter() - t_start
    return summary


def _commit(ray: Any, ds: Any, store: Store, todo: WorkList, record: dict[str, Any],
            summary: ExtractSummary, progress: Callable[[int, int, int], None] | None, t_start: float) -> None:
    """Run the pipeline; commit each staged shard as it is reported, record failures, keep the
    manifest current. A shard reported twice (a retried task) is committed once."""
    import datetime as dt
    import time

    from embedder.store.shards import ERRORS_SCHEMA

    committed: set[str] = set()  # staged shard names: one per shard of this run
    try:
        for res in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            advanced, errors, added = 0, [], []
            for row in res.to_pylist():
                if row["kind"] == "shard":
                    if row["name"] in committed:
                        continue
                    added.append((storage.name(store.commit_shard(row["name"])), row["rows"]))
                    committed.add(row["name"])
                    summary.done += row["rows"]
                    advanced += row["rows"]
                else:
                    summary.failed += 1
                    summary.note_failure(row["path"], row["reason"])
                    errors.append({"id": row["id"], "path": row["path"], "reason": row["reason"],
                                   "time": dt.datetime.now(dt.UTC)})
                    advanced += 1
            if errors:
                store.write_errors(pa.Table.from_pylist(errors, schema=ERRORS_SCHEMA))
            record.update(done=summary.done, failed=summary.failed, seconds=round(time.perf_counter() - t_start, 2))
            store.update_manifest(record, added)
            if progress:
                progress(len(todo), advanced, summary.failed)
    except ray.exceptions.RayError as e:
        raise RayError(f"the Ray pipeline failed: {_reason(e)}") from None

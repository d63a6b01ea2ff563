"""`embedder index build --engine ray`: the streamed on-disk IVF build with its adds on a Ray cluster.

The driver does what must be done once — the uniform training sample, training, the held-out
queries — and writes the trained empty index into the generation's staging folder. The store's shards
are then split into runs of consecutive shards (about one slice's worth of rows each), and one Ray
task per run adds its rows to clones of the trained index (``bigindex.add_part``, the same code the
local build runs), writing its slice indexes, its float16 copies and its id-map rows into the staging
folder under names derived from the run (a retried task rewrites the same files), and returns its
exact top-k of the held-out queries. The driver joins the parts in row order and merges the slices
into one ``lists.ivfdata`` exactly as the local build does, so the same vectors get the same codes in
the same lists. The staging folder (the index home) must be on a file system every node sees.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa

from embedder.embed.options import RayOptions
from embedder.embed.ray import connect
from embedder.errors import RayError
from embedder.index import faiss_util, ondisk
from embedder.index.stream import ID_SCHEMA, Parallel, Part, add_part, write_npy_header
from embedder.io import storage

COPY_CHUNK = 16 << 20


def runs(shards: list[str], start: int, per_run: int) -> tuple[list[tuple[list[str], int]], int]:
    """Consecutive shards grouped into runs of at least PER_RUN rows (a shard is never split),
    each with the global row number of its first row; and the row number after the last."""
    out: list[tuple[list[str], int]] = []
    group: list[str] = []
    first = row = start
    for f in shards:
        group.append(f)
        row += storage.open_parquet(f).metadata.num_rows
        if row - first >= per_run:
            out.append((group, first))
            group, first = [], row
    if group:
        out.append((group, first))
    return out, row


def _add_task(part: Part, queries: np.ndarray, staging: str, faiss_metric: int,
              threads: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    import faiss

    from embedder.index.faiss_util import prepare_rows

    faiss.omp_set_num_threads(threads)
    part = dataclasses.replace(part, queries=np.array(queries))  # writable, off the object store
    d = Path(staging)
    with faiss_util.no_precomputed_tables(), open(d / f"vectors-{part.tag}.f16", "wb") as vectors, \
            pa.OSFile(str(d / f"ids-{part.tag}.arrow"), "wb") as sink, pa.ipc.new_file(sink, ID_SCHEMA) as ids_out:
        return add_part(part, d, vectors, ids_out, lambda v: prepare_rows(v, part.metric), faiss_metric)


def parallel(options: RayOptions, faiss_metric: int, task_cpus: float = 1.0) -> Parallel:
    """A ``bigindex.Parallel`` that runs each run of shards as a Ray task."""

    def run(whole: Part, staging: Path) -> tuple[list[str], list[tuple[np.ndarray, np.ndarray]]]:
        ray = connect(options)
        staging = staging.resolve()  # workers run in their own directories: absolute paths only
        task = ray.remote(num_cpus=task_cpus, max_retries=3)(_add_task)
        queries = ray.put(whole.queries)
        # workers run in their own directories: local shards by absolute path, URIs as they are
        groups, end = runs([storage.resolve(f) for f in whole.shards], whole.start, whole.per_slice)
        parts = [dataclasses.replace(whole, shards=files, start=start, tag=f"{i:05d}",
                                     queries=np.zeros((0, 0), np.float32))  # the queries go by reference
                 for i, (files, start) in enumerate(groups)]
        refs = [task.remote(p, queries, str(staging), faiss_metric, max(1, int(task_cpus))) for p in parts]
        try:
            done = ray.get(refs)
        except ray.exceptions.RayError as e:  # a task that failed after its retries: one line, the generation unchanged
            raise RayError(f"a Ray index-build task failed: {str(e).strip().splitlines()[-1][:300]}") from None
        _join(parts, staging, end - whole.start, whole.queries.shape[1])
        slices = [f for files, _, _ in done for f in files]
        return slices, [(d, i) for _, d, i in done if d.size]

    return run


def _join(parts: list[Part], staging: Path, n: int, dim: int) -> None:
    """The parts' N float16 copies of DIM and id maps, concatenated in row order (streamed copies)."""
    with open(staging / "vectors.npy", "wb") as out:
        write_npy_header(out, n, dim)
        for p in parts:
            with open(staging / f"vectors-{p.tag}.f16", "rb") as f:
                shutil.copyfileobj(f, out, COPY_CHUNK)
    with pa.OSFile(str(staging / ondisk.IDS_ARROW), "wb") as sink, pa.ipc.new_file(sink, ID_SCHEMA) as ids_out:
        for p in parts:
            with pa.memory_map(str(staging / f"ids-{p.tag}.arrow")) as src:
                reader = pa.ipc.open_file(src)
                for i in range(reader.num_record_batches):
                    ids_out.write_batch(reader.get_batch(i))
    for p in parts:
        (staging / f"vectors-{p.tag}.f16").unlink(missing_ok=True)
        (staging / f"ids-{p.tag}.arrow").unlink(missing_ok=True)


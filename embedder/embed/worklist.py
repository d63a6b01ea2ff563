"""What an extraction run is to embed, held on disk rather than in memory.

Discovery streams: the refs found under the SOURCEs are written as they come, 65,536 at a time, to an
Arrow IPC file in a temporary folder (id, path, label), and only each ref's 16-byte id digest stays in
memory. The digests then decide, in bulk and without a Python string per image: repeats (the same
image reachable through two sources: its first occurrence is kept), what the store already holds
(its per-shard id index, ``id_index.contains_digests``) and what failed in an earlier run (the
errors table). What is left is a sorted array of row numbers into the spill file; iterating reads
the file one record batch at a time and yields ``ImageRef``s for those rows.

Memory per discovered image: its 16-byte digest while the list is built, about 40 bytes more for a
moment while repeats are found (one stable sort) and while the store is asked (``contains_digests``),
then 4 bytes per image still to do — against ~350 bytes per image for a list of ``ImageRef``s and
their strings (measured: docs/benchmarks.md, "Discovery"). The spill files are removed when the list
is closed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from embedder.io.sources import ImageRef
from embedder.store import id_index

CHUNK = 65_536  # refs per spilled record batch
SPILL_ENV = "EMBEDDER_TMPDIR"  # where work lists spill (default: the system's temporary folder)
SCHEMA = pa.schema([("id", pa.string()), ("path", pa.string()), ("label", pa.string()), ("caption", pa.string())])


class Refs(Protocol):
    """What the embedding loops take: refs they can count and walk (a list, or a ``WorkList``)."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[ImageRef]: ...


@dataclass
class Counts:
    discovered: int = 0  # distinct images
    repeats: int = 0  # the same image reached again through another source
    present: int = 0  # already in the store
    failed_before: int = 0  # failed in an earlier run (skipped unless retried)


class WorkList:
    """A sized, re-iterable sequence of the ``ImageRef``s still to embed (``len``, ``iter``,
    ``tables``), backed by a spill file. Use as a context manager, or ``close()`` it."""

    def __init__(self, folder: Path, file: Path, digests: np.ndarray, batch_rows: int) -> None:
        self._folder, self._file, self._batch_rows = folder, file, batch_rows
        n = len(digests)
        keep = np.ones(n, bool)
        if n > 1:  # repeats: equal digests side by side in sorted order; a stable sort keeps the first
            order = np.argsort(digests, kind="stable")
            ordered = digests[order]
            later = np.zeros(n, bool)
            later[1:] = ordered[1:] == ordered[:-1]
            del ordered
            keep[order[later]] = False
            del order, later
        self.counts = Counts(discovered=int(keep.sum()), repeats=int(n - keep.sum()))
        self.todo = np.flatnonzero(keep).astype(np.int32 if n < 2**31 else np.int64)  # 4 bytes a row
        self._digests: np.ndarray | None = digests  # until drop_held: 16 bytes per discovered image

    def drop_held(self, shards: list[str], failed_ids: Any = None) -> None:
        """Leave out what SHARDS (a store's shard files) hold and, unless FAILED_IDS is None, the ids
        in it (an Arrow array of a store's failed ids). Called once, under the store's writer lock;
        the digests are freed after it."""
        if self._digests is None:
            raise RuntimeError("drop_held is called once")  # a bug, not input
        asked = self._digests[self.todo]
        self._digests = None
        keep = np.ones(len(asked), bool)
        if shards:
            keep &= ~id_index.contains_digests(shards, asked)
            self.counts.present = int(len(keep) - keep.sum())
        if failed_ids is not None and len(failed_ids):
            failed = np.isin(asked, id_index.digests(failed_ids)) & keep
            self.counts.failed_before = int(failed.sum())
            keep &= ~failed
        self.todo = self.todo[keep]

    def __len__(self) -> int:
        return len(self.todo)

    def __bool__(self) -> bool:
        return len(self.todo) > 0

    def tables(self, rows: int = CHUNK) -> Iterator[pa.Table]:
        """The rows still to do as Arrow tables of at most ROWS rows (id, path, label), in order."""
        pending: list[pa.Table] = []
        held = 0
        for table in self._batches():
            pending.append(table)
            held += table.num_rows
            while held >= rows:
                whole = pa.concat_tables(pending)
                yield whole.slice(0, rows)
                rest = whole.slice(rows)
                pending, held = ([rest] if rest.num_rows else []), rest.num_rows
        if held:
            yield pa.concat_tables(pending)

    def __iter__(self) -> Iterator[ImageRef]:
        for table in self._batches():
            ids, paths, labels, caps = (table.column(c).to_pylist() for c in ("id", "path", "label", "caption"))
            yield from (ImageRef(i, p, lab, cap) for i, p, lab, cap in zip(ids, paths, labels, caps))

    def _batches(self) -> Iterator[pa.Table]:
        """Each spilled record batch's rows that are still to do (record batch b holds rows
        b*batch_rows … (b+1)*batch_rows - 1)."""
        if not len(self.todo):
            return
        with pa.OSFile(str(self._file), "rb") as f:
            reader = pa.ipc.open_file(f)
            n = reader.num_record_batches
            bounds = np.searchsorted(self.todo, np.arange(n + 1) * self._batch_rows)
            for b in range(n):
                lo, hi = int(bounds[b]), int(bounds[b + 1])
                if hi <= lo:
                    continue
                rows = self.todo[lo:hi] - b * self._batch_rows
                yield pa.Table.from_batches([reader.get_batch(b)]).take(pa.array(rows))

    def close(self) -> None:
        shutil.rmtree(self._folder, ignore_errors=True)

    def __enter__(self) -> WorkList:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def build(refs: Iterable[ImageRef], batch_rows: int = CHUNK, spill_dir: str | None = None) -> WorkList:
    """The work list of REFS (streamed once, spilled under SPILL_DIR, default $EMBEDDER_TMPDIR or the
    system's temporary folder), repeats dropped; ``drop_held`` then leaves out what a store holds."""
    folder = Path(tempfile.mkdtemp(prefix="embedder-worklist-", dir=spill_dir or os.environ.get(SPILL_ENV) or None))
    file = folder / "refs.arrow"
    digest_file = folder / "digests.bin"  # 16 bytes per ref, appended: read back in one piece
    try:
        with pa.OSFile(str(file), "wb") as sink, pa.ipc.new_file(sink, SCHEMA) as out, \
                open(digest_file, "wb") as digest_out:
            ids: list[str] = []
            paths: list[str] = []
            labels: list[str | None] = []
            captions: list[str | None] = []

            def spill() -> None:
                arr = pa.array(ids, pa.string())
                out.write_batch(pa.record_batch([arr, pa.array(paths, pa.string()), pa.array(labels, pa.string()),
                                                 pa.array(captions, pa.string())], schema=SCHEMA))
                digest_out.write(id_index.digests(arr).tobytes())
                ids.clear()
                paths.clear()
                labels.clear()
                captions.clear()

            for ref in refs:
                ids.append(ref.id)
                paths.append(ref.path)
                labels.append(ref.label)
                captions.append(ref.caption)
                if len(ids) == batch_rows:
                    spill()
            if ids:
                spill()
        digests = np.fromfile(digest_file, dtype=id_index.DIGEST)
        digest_file.unlink()
        return WorkList(folder, file, digests, batch_rows)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise

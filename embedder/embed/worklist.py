"""What an extraction run is to embed, held on disk rather than in memory.

Discovery streams: the refs found under the SOURCEs are written as they come, 65,536 at a time, to an
Arrow IPC file in a temporary folder (id, path, label, caption), and each ref's 16-byte id digest is
appended to a file beside it. Nothing per image stays in memory but one bit (is it still to do?).

The membership checks run in buckets, so that their memory does not grow with the listing: the
digests are partitioned by their leading bits into buckets of at most ``BUCKET_ROWS`` on disk (two
streamed passes: count, then write each chunk's pieces at their bucket's offset). One bucket at a
time is read, sorted, and decides repeats (the same image reachable through two sources: its first
occurrence is kept), what the store already holds (each shard's sorted id-index digests: the same
leading bits are a contiguous slice of every shard's index, read with one positioned read) and what
failed in an earlier run (the errors table). What is left is a bitmap over the spill file's rows;
iterating reads the file one record batch at a time and yields ``ImageRef``s for the rows still set.

Memory: one bit per listed image (12.5 MB at 10⁸) plus one bucket's work (~40 bytes per row of
``BUCKET_ROWS``), whatever the listing's size; disk: the spill file, 16 bytes per listed image of
digests and 24 of buckets. The spill files are removed when the list is closed.
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
BUCKET_ROWS = 1 << 19  # listed images per membership bucket (at most, for uniform digests)
READ_ROWS = 1 << 18  # digests partitioned at a time
SPILL_ENV = "EMBEDDER_TMPDIR"  # where work lists spill (default: the system's temporary folder)
SCHEMA = pa.schema([("id", pa.string()), ("path", pa.string()), ("label", pa.string()), ("caption", pa.string())])
# a bucket's entry: a digest as two native uint64s (its first and last 8 bytes), its spill row
RECORD = np.dtype([("hi", np.uint64), ("lo", np.uint64), ("row", np.int64)])


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

    def __init__(self, folder: Path, file: Path, digest_file: Path, n: int, batch_rows: int) -> None:
        self._folder, self._file, self._batch_rows, self.rows = folder, file, batch_rows, n
        self._bits = np.full((n + 7) // 8, 0xFF, np.uint8)  # bit r (little-endian bit order): row r to do
        if n % 8:
            self._bits[-1] = (1 << (n % 8)) - 1
        self._left = n
        self._held = True  # drop_held not yet called
        self._buckets = folder / "buckets.bin"
        self.bucket_bits = max(0, int(np.ceil(np.log2(max(1, -(-n // BUCKET_ROWS))))))
        self._starts, self._sizes = _partition(digest_file, n, self._buckets, self.bucket_bits)
        digest_file.unlink(missing_ok=True)
        repeats = 0
        for j in range(len(self._sizes)):  # repeats: equal digests side by side; a stable sort keeps the first
            rec = self._bucket(j)
            if len(rec) < 2:
                continue
            rec = rec[np.lexsort((rec["row"], rec["lo"], rec["hi"]))]
            later = np.zeros(len(rec), bool)
            later[1:] = (rec["hi"][1:] == rec["hi"][:-1]) & (rec["lo"][1:] == rec["lo"][:-1])
            if later.any():
                self._clear(rec["row"][later])
                repeats += int(later.sum())
            rec = rec[~later]
            self._write_bucket(j, rec)
        self.counts = Counts(discovered=n - repeats, repeats=repeats)

    def _bucket(self, j: int) -> np.ndarray:
        if not self._sizes[j]:
            return np.empty(0, RECORD)
        return np.fromfile(self._buckets, RECORD, int(self._sizes[j]), offset=int(self._starts[j]) * RECORD.itemsize)

    def _write_bucket(self, j: int, rec: np.ndarray) -> None:
        fd = os.open(self._buckets, os.O_WRONLY)
        try:
            os.pwrite(fd, rec.tobytes(), int(self._starts[j]) * RECORD.itemsize)
        finally:
            os.close(fd)
        self._sizes[j] = len(rec)

    def _clear(self, rows: np.ndarray) -> None:
        """Rows (distinct, still set) are done with: their bits cleared."""
        if not len(rows):
            return
        rows = np.sort(rows)
        byte = rows >> 3
        mask = np.left_shift(1, rows & 7).astype(np.uint8)
        first = np.flatnonzero(np.r_[True, byte[1:] != byte[:-1]])
        self._bits[byte[first]] &= ~np.bitwise_or.reduceat(mask, first).astype(np.uint8)
        self._left -= len(rows)

    def drop_held(self, shards: list[str], failed_ids: Any = None) -> None:
        """Leave out what SHARDS (a store's shard files) hold and, unless FAILED_IDS is None, the ids
        in it (an Arrow array of a store's failed ids). Called once, under the store's writer lock;
        bucket by bucket, each shard's index read a slice at a time."""
        if not self._held:
            raise RuntimeError("drop_held is called once")  # a bug, not input
        self._held = False
        k = self.bucket_bits
        indexed = [_ShardIndex(s, self._folder / "ids", i, k) for i, s in enumerate(shards)]
        failed = np.empty(0, id_index.DIGEST)
        failed_bounds = np.zeros(len(self._sizes) + 1, np.int64)
        if failed_ids is not None and len(failed_ids):
            failed = id_index.digests(failed_ids)
            failed = failed[np.argsort(_leading(failed), kind="stable")]  # the order buckets slice
            failed_bounds = _bounds(_leading(failed), k)
        present = failed_before = 0
        for j in range(len(self._sizes)):
            rec = self._bucket(j)
            if not len(rec):
                continue
            hi, lo = np.ascontiguousarray(rec["hi"]), np.ascontiguousarray(rec["lo"])  # sorted, distinct
            shared = np.unique(hi[1:][hi[1:] == hi[:-1]])  # distinct digests, one first half: rare
            hit = np.zeros(len(hi), bool)
            for ix in indexed:
                got = ix.slice(j)
                if len(got):
                    _mark(hit, hi, lo, got[:, 0], got[:, 1], shared)
            present += int(hit.sum())
            fail = failed[failed_bounds[j]:failed_bounds[j + 1]]
            if len(fail):
                halves = fail.view(np.uint64).reshape(-1, 2)
                was = np.zeros(len(hi), bool)
                _mark(was, hi, lo, halves[:, 0], halves[:, 1], shared)
                was &= ~hit
                failed_before += int(was.sum())
                hit |= was
            self._clear(rec["row"][hit])
        self.counts.present, self.counts.failed_before = present, failed_before
        shutil.rmtree(self._folder / "ids", ignore_errors=True)

    def __len__(self) -> int:
        return self._left

    def __bool__(self) -> bool:
        return self._left > 0

    def tables(self, rows: int = CHUNK, start: int = 0, stop: int | None = None) -> Iterator[pa.Table]:
        """The rows still to do as Arrow tables of at most ROWS rows (id, path, label, caption), in
        order; START/STOP: only those among spill rows START … STOP - 1."""
        pending: list[pa.Table] = []
        held = 0
        for table in self._batches(start, stop):
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

    def todo_rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """The spill rows still to do among START … STOP - 1 (sorted)."""
        stop = self.rows if stop is None else min(stop, self.rows)
        if stop <= start:
            return np.empty(0, np.int64)
        flags = np.unpackbits(self._bits[start >> 3:(stop + 7) >> 3], bitorder="little")
        return np.flatnonzero(flags[start & 7:(start & 7) + stop - start]) + start

    def slices(self) -> Iterator[SpillSlice]:
        """One ``SpillSlice`` per spilled record batch that holds rows still to do: what a reader in
        another process (a Ray read task on this node) needs to read them, and nothing more."""
        br = self._batch_rows
        for b in range(-(-self.rows // br)):
            lo, hi = b * br, min((b + 1) * br, self.rows)
            flags = np.unpackbits(self._bits[lo >> 3:(hi + 7) >> 3], bitorder="little")[lo & 7:(lo & 7) + hi - lo]
            count = int(flags.sum())
            if count:
                yield SpillSlice(str(self._file), b, np.packbits(flags, bitorder="little"), count)

    def _batches(self, start: int = 0, stop: int | None = None) -> Iterator[pa.Table]:
        """Each spilled record batch's rows that are still to do (record batch b holds rows
        b*batch_rows … (b+1)*batch_rows - 1), among spill rows START … STOP - 1."""
        stop = self.rows if stop is None else min(stop, self.rows)
        if not self._left or stop <= start:
            return
        br = self._batch_rows
        with pa.OSFile(str(self._file), "rb") as f:
            reader = pa.ipc.open_file(f)
            for b in range(start // br, -(-stop // br)):
                lo, hi = max(b * br, start), min((b + 1) * br, stop)
                rows = self.todo_rows(lo, hi) - b * br
                if not len(rows):
                    continue
                batch = pa.Table.from_batches([reader.get_batch(b)])
                yield batch if len(rows) == batch.num_rows else batch.take(pa.array(rows))

    def close(self) -> None:
        shutil.rmtree(self._folder, ignore_errors=True)

    def __enter__(self) -> WorkList:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@dataclass(frozen=True)
class SpillSlice:
    """The rows still to do of one record batch of a work list's spill file (picklable: a reader
    in another process on this machine reads them while the file exists)."""

    file: str
    batch: int  # record batch number in the spill file
    bits: np.ndarray  # bit r (little-endian bit order): row r of the record batch is to do
    count: int  # rows to do

    def __len__(self) -> int:
        return self.count

    def tables(self, rows: int) -> Iterator[pa.Table]:
        """These rows (id, path, label, caption), in tables of at most ROWS rows."""
        with pa.OSFile(self.file, "rb") as f:
            table = pa.Table.from_batches([pa.ipc.open_file(f).get_batch(self.batch)])
        if self.count != table.num_rows:
            todo = np.flatnonzero(np.unpackbits(self.bits, bitorder="little")[:table.num_rows])
            table = table.take(pa.array(todo))
        for s in range(0, table.num_rows, rows):
            yield table.slice(s, rows)


def _mark(hit: np.ndarray, hi: np.ndarray, lo: np.ndarray, ghi: np.ndarray, glo: np.ndarray,
          shared: np.ndarray) -> None:
    """Set HIT where the asked digest (HI, LO: sorted by both, distinct) is one of the given (GHI,
    GLO); SHARED: the first halves that more than one asked digest has."""
    pos = np.minimum(np.searchsorted(hi, ghi), len(hi) - 1)
    hit[pos[(hi[pos] == ghi) & (lo[pos] == glo)]] = True
    if len(shared):  # every asked digest of a shared first half is compared
        for g in np.flatnonzero(np.isin(ghi, shared)):
            span = slice(np.searchsorted(hi, ghi[g], "left"), np.searchsorted(hi, ghi[g], "right"))
            hit[span] |= lo[span] == glo[g]


def _leading(d: np.ndarray) -> np.ndarray:
    """A digest array's first 8 bytes as native uint64 (the order the id index sorts by)."""
    return np.ascontiguousarray(d).view(np.uint64).reshape(-1, 2)[:, 0]


def _bucket_of(lead: np.ndarray, k: int) -> np.ndarray:
    return (lead >> np.uint64(64 - k)).astype(np.int64) if k else np.zeros(len(lead), np.int64)


def _bounds(lead: np.ndarray, k: int) -> np.ndarray:
    """Where each of the 2**K buckets starts in LEAD (sorted ascending), and its end."""
    firsts = np.arange(1 << k, dtype=np.uint64) << np.uint64(64 - k) if k else np.zeros(1, np.uint64)
    return np.r_[np.searchsorted(lead, firsts), len(lead)].astype(np.int64)


def _partition(digest_file: Path, n: int, out: Path, k: int) -> tuple[np.ndarray, np.ndarray]:
    """DIGEST_FILE's n digests, with their row numbers, into 2**K buckets in OUT (rows in order within
    each): two streamed passes, a chunk in memory at a time. Returns each bucket's start and size."""
    sizes = np.zeros(1 << k, np.int64)
    for s in range(0, n, READ_ROWS):
        d = np.fromfile(digest_file, id_index.DIGEST, min(READ_ROWS, n - s), offset=s * 16)
        sizes += np.bincount(_bucket_of(_leading(d), k), minlength=1 << k)
    starts = np.r_[0, np.cumsum(sizes)[:-1]].astype(np.int64)
    filled = starts.copy()
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for s in range(0, n, READ_ROWS):
            d = np.fromfile(digest_file, id_index.DIGEST, min(READ_ROWS, n - s), offset=s * 16)
            b = _bucket_of(_leading(d), k)
            order = np.argsort(b, kind="stable")
            rec = np.empty(len(d), RECORD)
            halves = d.view(np.uint64).reshape(-1, 2)[order]
            rec["hi"], rec["lo"], rec["row"] = halves[:, 0], halves[:, 1], order + s
            edges = np.searchsorted(b[order], np.arange((1 << k) + 1))
            for j in np.flatnonzero(np.diff(edges)):
                os.pwrite(fd, rec[edges[j]:edges[j + 1]].tobytes(), int(filled[j]) * RECORD.itemsize)
                filled[j] += edges[j + 1] - edges[j]
    finally:
        os.close(fd)
    return starts, sizes


class _ShardIndex:
    """One shard's sorted id digests, read a bucket's slice at a time (a local ``.npy``: the store's own,
    or for an object-storage or read-only store a copy in the work list's folder)."""

    def __init__(self, shard: str, spill: Path, i: int, k: int) -> None:
        d = id_index.load(shard)
        if not len(d):
            self.path, self.offset, self.bounds = "", 0, np.zeros((1 << k) + 1, np.int64)
            return
        if not isinstance(d, np.memmap):  # read whole (object storage, or built in memory): keep a local copy
            spill.mkdir(exist_ok=True)
            p = spill / f"{i}.npy"
            np.save(p, np.asarray(d))
            del d
            d = np.load(p, mmap_mode="r")
        self.path, self.offset = str(d.filename), int(d.offset)
        self.bounds = _bounds(_leading_view(d), k)
        del d

    def slice(self, j: int) -> np.ndarray:
        """Bucket J's digests as [n, 2] native uint64 (first and last 8 bytes)."""
        lo, hi = int(self.bounds[j]), int(self.bounds[j + 1])
        if hi <= lo:
            return np.empty((0, 2), np.uint64)
        return np.fromfile(self.path, np.uint64, 2 * (hi - lo), offset=self.offset + lo * 16).reshape(-1, 2)


def _leading_view(d: np.ndarray) -> np.ndarray:
    """``_leading`` without a copy (a strided view: a binary search touches a few pages)."""
    return d.view(np.uint64).reshape(-1, 2)[:, 0] if len(d) else np.empty(0, np.uint64)


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
        return WorkList(folder, file, digest_file, digest_file.stat().st_size // 16, batch_rows)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise

"""Bookkeeping at 10⁸ (issue 35, item 5): discovery's membership check in bounded memory, the Ray
engine's work list read as it goes, and ``index add`` reading only the rows an index has not seen."""

from __future__ import annotations

import hashlib
import tracemalloc
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from embedder.embed import worklist
from embedder.io.sources import ImageRef
from embedder.store import id_index


def _id(i: int) -> str:
    return hashlib.blake2b(str(i).encode(), digest_size=16).hexdigest()


def _refs(order: Iterable[int]) -> Iterator[ImageRef]:
    for i in order:
        yield ImageRef(_id(i), f"/c/{i}.jpg", None)


def _shard(root: Path, name: str, items: list[int]) -> str:
    shard = str(root / f"{name}.parquet")  # only its id index is read
    id_index.write(shard, [_id(i) for i in items])
    return shard


def test_the_work_list_is_what_a_set_says_across_many_buckets(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worklist, "BUCKET_ROWS", 64, raising=False)  # ~32 buckets
    monkeypatch.setattr(worklist, "READ_ROWS", 100, raising=False)
    rng = np.random.default_rng(1)
    listed = [int(i) for i in rng.integers(0, 1500, 2000)]  # repeats among them
    stored = [set(int(i) for i in rng.integers(0, 1500, 300)) for _ in range(3)]
    failed = [int(i) for i in rng.integers(0, 1500, 100)]
    shards = [_shard(tmp_path, f"s{k}", sorted(s)) for k, s in enumerate(stored)]
    with worklist.build(_refs(listed), batch_rows=128, spill_dir=str(tmp_path)) as work:
        firsts = list(dict.fromkeys(listed))
        assert len(work) == len(firsts) and work.counts.repeats == len(listed) - len(firsts)
        work.drop_held(shards, pa.array([_id(i) for i in failed]))
        held = set().union(*stored)
        expect = [i for i in firsts if i not in held and i not in set(failed)]
        assert [r.id for r in work] == [_id(i) for i in expect]  # listing order, first occurrence
        assert len(work) == len(expect)
        assert work.counts.present == sum(i in held for i in firsts)
        assert work.counts.failed_before == sum(i not in held and i in set(failed) for i in firsts)
        assert sum(t.num_rows for t in work.tables(50)) == len(expect)


def test_discoverys_membership_check_holds_no_array_per_listed_image(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Peak traced memory of building a 150k-image work list and dropping what the store holds:
    a bit per image and one bucket, not the digests of the whole listing (≥ 16 bytes each plus
    sort temporaries: ~6 MB here, 18 GB at 10⁸)."""
    monkeypatch.setattr(worklist, "BUCKET_ROWS", 1 << 14, raising=False)
    monkeypatch.setattr(worklist, "READ_ROWS", 1 << 14, raising=False)
    n = 150_000
    shard = _shard(tmp_path, "s0", list(range(0, n, 3)))
    listed = range(n)
    tracemalloc.start()
    try:
        with worklist.build(_refs(listed), batch_rows=4096, spill_dir=str(tmp_path)) as work:
            work.drop_held([shard], pa.array([_id(1)]))
            peak = tracemalloc.get_traced_memory()[1]
            assert len(work) == n - len(range(0, n, 3)) - 1
    finally:
        tracemalloc.stop()
    assert peak < 3 << 20, f"peak {peak / 2**20:.1f} MiB"

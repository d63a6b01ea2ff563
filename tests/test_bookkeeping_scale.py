"""Bookkeeping at 10⁸ (issue 35, item 5): discovery's membership check in bounded memory, the Ray
engine's work list read as it goes, and ``index add`` reading only the rows an index has not seen."""

from __future__ import annotations

import hashlib
import tracemalloc
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from embedder.embed import worklist
from embedder.io.sources import ImageRef
from embedder.store import id_index

try:  # test_ray's fixtures: a throwaway local cluster (module-scoped), a time limit per test
    from tests.test_ray import cluster, time_limit  # noqa: F401
except pytest.skip.Exception:  # no Ray here: only the Ray test is skipped
    @pytest.fixture
    def cluster() -> str:
        pytest.skip("ray is not installed")


def _id(i: int) -> str:
    if i >= 10**7:  # ids whose digests share their first 8 bytes (the rare path of a lookup)
        return f"{'ab' * 8}{i:016x}"
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
    listed += [int(i) for i in rng.integers(10**7, 10**7 + 40, 60)]
    stored = [set(int(i) for i in rng.integers(0, 1500, 300)) | {10**7 + 3 * k for k in range(6)} for _ in range(3)]
    failed = [int(i) for i in rng.integers(0, 1500, 100)] + [10**7 + 1, 10**7 + 4, 10**7 + 6]
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
        parts = list(work.slices())  # what Ray read tasks read, in another process
        assert sum(len(p) for p in parts) == len(expect)
        assert [i for p in parts for t in p.tables(7) for i in t.column("id").to_pylist()] == \
            [_id(i) for i in expect]


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


# ---- index add reads only what the index has not read ----------------------------------------------

def _strip_record(home: Path) -> None:
    """Make HOME's index a legacy one: no record of the shards it read."""
    import json

    for meta_file in home.rglob("index.json"):
        meta = json.loads(meta_file.read_text())
        meta.pop("indexed_shards", None)  # stream.INDEXED
        meta_file.write_text(json.dumps(meta))


@pytest.mark.parametrize("on_disk", [False, True])
def test_index_add_reads_only_the_shards_the_index_has_not_read(tmp_path: Path, on_disk: bool) -> None:
    import shutil

    from embedder.index import build as idx
    from embedder.index import plan as index_plan
    from embedder.index import search as index_search
    from embedder.store.shards import Store
    from tests.test_index import _write_vectors, clustered, vector_store

    x = clustered(900, dim=16)
    store = vector_store(tmp_path / "s", x[:600])
    home, legacy = tmp_path / "h", tmp_path / "legacy"
    options = index_plan.BuildOptions(kind="ivf", on_disk=True, queries=50) if on_disk \
        else index_plan.BuildOptions(kind="flat")
    idx.build(store, "n", options, str(home))
    shutil.copytree(home, legacy)
    _strip_record(legacy)
    with Store.writer(store, Store.open(store).provenance) as st:  # a second extract: one new shard
        _write_vectors(st, x[600:], None, 600)
    first = Store.open(store).shard_files()[0]
    r_legacy = idx.add("n", store, str(legacy))  # no record: every shard read, as before
    kept = Path(first).read_bytes()
    Path(first).write_bytes(b"not parquet" * 100)  # the shard the index has read must not be opened
    try:
        r = idx.add("n", store, str(home))
    finally:
        Path(first).write_bytes(kept)
    assert r == r_legacy and (r["added"], r["skipped"], r["count"]) == (300, 600, 900)
    new, old = index_search.LoadedIndex("n", str(home)), index_search.LoadedIndex("n", str(legacy))
    assert new.ids.column("id").to_pylist() == old.ids.column("id").to_pylist()
    q = x[::97]
    assert [[h["id"] for h in hits] for hits in new.search(q, 5)] == \
        [[h["id"] for h in hits] for hits in old.search(q, 5)]
    Path(first).write_bytes(b"not parquet" * 100)  # nothing new: nothing read, nothing added
    try:
        assert idx.add("n", store, str(home))["added"] == 0
        assert idx.add("n", store, str(legacy))["added"] == 0  # the legacy index has its record now
    finally:
        Path(first).write_bytes(kept)


def test_a_shard_read_in_part_is_read_past_its_count(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from embedder.index.stream import record_batches

    f = tmp_path / "s.parquet"
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(350)], "v": list(range(350))}), f, row_group_size=100)
    for skip in (0, 99, 100, 230, 349, 350):
        got = [v for rb in record_batches(str(f), skip, ["v"]) for v in rb.column("v").to_pylist()]
        assert got == list(range(skip, 350))


@pytest.mark.slow
def test_the_ray_engine_reads_its_work_list_as_it_goes(tmp_path: Path, request: pytest.FixtureRequest,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver puts no block of its work list into the object store (before: one reference per
    block, all of them up front: 1.6 M at 10⁸); read tasks on its node read the spill file as the
    pipeline goes. The store is the local engine's."""
    import ray

    from embedder.embed import ray as ray_engine
    from embedder.embed.fill import extract
    from embedder.embed.options import EmbedOptions, RayOptions, RunOptions
    from embedder.models.builder import ModelSpec
    from tests.conftest import make_images
    from tests.test_ray import _store_vectors

    address = request.getfixturevalue("cluster")
    monkeypatch.setattr(ray_engine, "DECODE_BLOCK", 1)  # a block per image: a few images, many blocks
    put = ray.put
    blocks: list[int] = []

    def counting_put(value: object, *args: Any, **kwargs: Any) -> Any:
        if isinstance(value, pa.Table):
            blocks.append(value.num_rows)
        return put(value, *args, **kwargs)

    monkeypatch.setattr(ray, "put", counting_put)
    src = tmp_path / "imgs"
    make_images(src, {"a": 5, "b": 4}, size=(64, 48))
    tiny, run = ModelSpec("tiny_test"), RunOptions(batch_size=1)
    s = ray_engine.extract_ray([str(src)], str(tmp_path / "ray"), tiny, EmbedOptions(), run,
                               RayOptions(address=address, workers=1))
    assert (s.done, s.failed) == (9, 0)
    assert blocks == [], f"the driver put {len(blocks)} blocks of its work list"
    extract([str(src)], str(tmp_path / "local"), tiny, EmbedOptions(), run)
    ids_r, vec_r = _store_vectors(tmp_path / "ray")
    ids_l, vec_l = _store_vectors(tmp_path / "local")
    assert ids_r == ids_l and len(ids_r) == 9
    np.testing.assert_allclose(vec_r, vec_l, atol=1e-5)

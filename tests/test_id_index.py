"""The store's compact id index: resume asks "which of these ids are present" without listing ids."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa

from embedder.models.origin import WeightsRef
from embedder.models.registry import get_backbone
from embedder.store import id_index
from embedder.store.provenance import Provenance
from embedder.store.shards import Store, embeddings_to_arrow


def _store(path: Path, shards: list[list[str]]) -> Store:
    prov = Provenance("synthetic", WeightsRef("file", "none", "0"), "penultimate", "avg",
                      get_backbone("tiny_test").preprocessing(), 4)
    with Store.writer(path, prov) as st:
        schema = st.read().schema
        for ids in shards:
            n = len(ids)
            st.write_shard(pa.table({
                "id": ids, "path": ids, "label": [None] * n,
                "embedding": embeddings_to_arrow(np.zeros((n, 4), np.float32), "float32"),
                "width": pa.array([1] * n, pa.int32()), "height": pa.array([1] * n, pa.int32()),
                "file_hash": [None] * n, "caption": [None] * n}, schema=schema))
        st.update_manifest()
    return Store.open(path)


def test_present_answers_membership_per_id_with_duplicates_and_unicode(tmp_path: Path) -> None:
    st = _store(tmp_path / "s", [[f"a/{i}.jpg" for i in range(100)], ["b/ü.png", "b/x y.jpg", ""]])
    ask = ["a/5.jpg", "nope.jpg", "b/ü.png", "a/5.jpg", "", "a/100.jpg", "b/x y.jpg"]
    assert st.present(ask).tolist() == [True, False, True, True, True, False, True]
    assert st.present([]).tolist() == []
    shards = st.shard_files()
    assert all(Path(id_index.path_for(p)).is_file() for p in shards)  # written beside every shard
    d = np.load(id_index.path_for(shards[1]))
    assert d.dtype == np.dtype("S16") and len(d) == 3
    first = d.view(np.uint64).reshape(-1, 2)[:, 0]
    assert (np.diff(first.astype(np.float64)) >= 0).all()  # sorted by the first 8 bytes (uint64)


def test_a_missing_index_is_rebuilt_and_orphans_are_swept(tmp_path: Path) -> None:
    st = _store(tmp_path / "s", [[f"x{i}" for i in range(10)], [f"y{i}" for i in range(10)]])
    first, second = (Path(p) for p in st.shard_files())
    Path(id_index.path_for(str(first))).unlink()  # e.g. a store written before the index existed
    assert st.present(["x3", "y3", "z"]).tolist() == [True, True, False]
    assert Path(id_index.path_for(str(first))).is_file()  # rebuilt from the shard's id column, and kept
    second.rename(tmp_path / "moved-away.parquet")  # a shard moved out of the store by hand
    with Store.writer(tmp_path / "s", st.provenance):
        pass
    assert not Path(id_index.path_for(str(second))).exists()  # its index went with it at the next writer
    assert st.present(["y3"]).tolist() == [False]


def test_membership_memory_does_not_hold_the_stores_ids(tmp_path: Path) -> None:
    # 40 shards × 5,000 ids: a set of the store's ids costs ~20 MB of Python strings; the index
    # lookup for 1,000 asked ids holds their digests and one shard's at a time
    st = _store(tmp_path / "s", [[f"folder/sub/image_{s:03d}_{i:06d}.jpg" for i in range(5000)] for s in range(40)])
    ask = [f"folder/sub/image_{s:03d}_{i:06d}.jpg" for s in (0, 39) for i in range(0, 5000, 10)]
    st.present(ask[:1])  # indexes already exist; warm imports
    tracemalloc.start()
    found = st.present(ask)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert found.all() and not st.present(["folder/sub/image_040_000000.jpg"]).any()
    tracemalloc.start()
    everything = st.ids()
    _, peak_set = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(everything) == 200_000
    assert peak < 1_000_000 < peak_set / 10  # < 1 MB against > 10 MB for the set of all ids


def test_embedder_ids_are_their_own_digest_and_other_ids_are_hashed() -> None:
    import hashlib

    from embedder.io.uri import image_id

    ids = [image_id(f"/data/{i}.jpg") for i in range(5)]
    d = id_index.digests(ids)
    assert [bytes(x).ljust(16, b"\0") for x in d] == [bytes.fromhex(i) for i in ids]  # decoded in bulk
    mixed = [ids[0], "holiday/beach.jpg", ids[1].upper(), ""]
    got = [bytes(x).ljust(16, b"\0") for x in id_index.digests(mixed)]
    assert got[0] == bytes.fromhex(ids[0])
    assert got[1] == hashlib.blake2b(b"holiday/beach.jpg", digest_size=16).digest()
    assert got[2] == hashlib.blake2b(ids[1].upper().encode(), digest_size=16).digest()  # not lowercase hex
    assert got[3] == hashlib.blake2b(b"", digest_size=16).digest()
    chunked = pa.chunked_array([pa.array(ids[:2]), pa.array(ids[2:])])
    assert (id_index.digests(chunked) == d).all() and (id_index.digests(pa.array(ids).slice(1)) == d[1:]).all()

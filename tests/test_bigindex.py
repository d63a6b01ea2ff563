"""Indexes larger than the memory budget: streamed build, lists on disk, memory-mapped serving."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from embedder.cli import app
from embedder.errors import IndexError_
from embedder.index import build as idx
from embedder.index import faiss_util, ondisk
from embedder.index import generations as index_generations
from embedder.index import plan as index_plan
from embedder.index import search as index_search
from embedder.index import stream as index_stream
from embedder.models.origin import WeightsRef
from embedder.models.registry import get_backbone
from embedder.store.provenance import Provenance
from embedder.store.shards import Store, embeddings_to_arrow
from tests.test_index import clustered, recall_vs_numpy

runner = CliRunner()


def sharded_store(path: Path, parts: list[np.ndarray], prefix: str = "v") -> str:
    """One shard per part; ids numbered across parts."""
    prov = Provenance("synthetic", WeightsRef("file", "none", "0"), "penultimate", "avg",
                      get_backbone("tiny_test").preprocessing(), parts[0].shape[1])
    start = 0
    with Store.writer(path, prov) as st:
        schema = st.read().schema
        for x in parts:
            ids = [f"{prefix}{start + i:06d}" for i in range(len(x))]
            st.write_shard(pa.table({
                "id": ids, "path": [f"/data/{i}.jpg" for i in ids], "label": [f"c{i % 3}" for i in range(len(x))],
                "embedding": embeddings_to_arrow(x, "float32"), "width": pa.array([1] * len(x), pa.int32()),
                "height": pa.array([1] * len(x), pa.int32()), "file_hash": [None] * len(x),
                "caption": [None] * len(x)}, schema=schema))
            start += len(x)
        st.update_manifest()
    return str(path)


@pytest.fixture
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index_stream, "BATCH_ROWS", 1024)  # many record batches and slices on a small store


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_over_budget_build_streams_to_on_disk_lists(tmp_path: Path, kind: str, small_batches: None) -> None:
    both = clustered(30_200, dim=32)
    x, fresh = both[:30_000], both[30_000:]  # fresh: same distribution, never indexed
    store = sharded_store(tmp_path / "s", np.array_split(x, 4))
    raw = x.nbytes  # 3.8 MB; the budget is a third of it
    warm = sharded_store(tmp_path / "w", [x[:3000]])  # imports FAISS & co. before memory is traced
    idx.build(warm, "warm", index_plan.BuildOptions(kind=kind, on_disk=True, queries=50), str(tmp_path / "h"))
    tracemalloc.start()
    meta = idx.build(store, "big", index_plan.BuildOptions(kind=kind, memory_budget=raw // 3, queries=300),
                     str(tmp_path / "h"))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < raw  # numpy never held every vector at once (the in-memory path holds several copies)
    assert meta["on_disk"]["slices"] > 1 and "streamed" in meta["reason"]
    gen = Path(tmp_path / "h" / "big").resolve() / f"gen-{meta['generation']:06d}"
    files = sorted(p.name for p in gen.iterdir())
    assert files == sorted(["index.faiss", "lists.ivfdata", "trained.faiss", "ids.arrow", "vectors.npy",
                            "index.json"])  # no slice or tuning files left behind
    assert meta["quality"]["recall_at_10"] >= 0.95 and meta["count"] == 30_000
    loaded = index_search.LoadedIndex("big", str(tmp_path / "h"))
    assert loaded.rows_of(np.array([5, 29_999])).tolist() == [5, 29_999]  # FAISS id = id-map row
    assert loaded.ids.column("id")[29_999].as_py() == "v029999"
    assert recall_vs_numpy(loaded, x, fresh) >= 0.9
    hit = loaded.search(x[1234:1235], 1)[0][0]
    assert hit["id"] == "v001234" and hit["score"] == pytest.approx(1.0, abs=1e-3)
    # filters and lookups by id work on the mapped id map and float16 copies
    assert {h["label"] for h in loaded.search(x[:2], 5, where={"label": "c1"})[0]} == {"c1"}
    assert loaded.vector_of("v000007").shape == (1, 32)


def test_training_sample_is_drawn_across_all_shards(tmp_path: Path, small_batches: None) -> None:
    # four shards, each its own region of space: a first-rows sample would see one of them only
    parts = [clustered(3000, dim=16, clusters=4, seed=s) + 40.0 * s for s in range(4)]
    store = Store.open(sharded_store(tmp_path / "s", parts))
    staging = tmp_path / "stage"
    staging.mkdir()
    r = index_stream.build_streamed(store, staging, "IVF16,Flat", "l2", 800, 1 << 20, 100, 0, 1,
                           lambda v: np.ascontiguousarray(v, np.float32))
    assert r["train_rows"] == 800
    per_shard = np.bincount(r["sample"] // 3000, minlength=4)
    assert per_shard.min() > 150  # ~200 each, not 800 from the first shard
    assert not np.isin(r["sample"], r["held"]).any()  # held-out queries never train the index


def test_add_to_on_disk_index_merges_a_new_slice(tmp_path: Path, small_batches: None) -> None:
    x = clustered(9000, dim=32)
    home = str(tmp_path / "h")
    a = sharded_store(tmp_path / "a", np.array_split(x[:6000], 2))
    b = sharded_store(tmp_path / "b", np.array_split(x, 3))
    meta = idx.build(a, "n", index_plan.BuildOptions(kind="ivfpq", on_disk=True, queries=200), home)
    old_gen = Path(home, "n").resolve() / f"gen-{meta['generation']:06d}"
    r = idx.add("n", b, home)
    assert (r["added"], r["skipped"], r["count"]) == (3000, 6000, 9000)
    assert idx.add("n", b, home)["added"] == 0
    loaded = index_search.LoadedIndex("n", home)
    assert loaded.index.ntotal == 9000 and loaded.ids.num_rows == 9000 and loaded.generation == 2
    assert loaded.search(x[7777:7778], 1)[0][0]["id"] == "v007777"
    assert loaded.search(x[10:11], 1)[0][0]["id"] == "v000010"
    assert loaded.meta["search"] == meta["search"]  # the tuned nprobe carries over
    assert not old_gen.exists()  # superseded generation removed, the new one stands alone


def test_a_small_add_is_a_delta_that_searches_as_the_merged_lists(tmp_path: Path, small_batches: None) -> None:
    """1 % added to an on-disk IVF-PQ index: a delta beside hard links to the unchanged files (no
    byte of them rewritten); search, filters, re-ranking and id lookups see old and new rows, with
    exactly the answers of the merged index; more deltas merge by themselves past DELTA_FRACTION."""
    import os

    x = clustered(10_400, dim=32)
    home = str(tmp_path / "h")
    base = sharded_store(tmp_path / "a", np.array_split(x[:10_000], 2))
    idx.build(base, "n", index_plan.BuildOptions(kind="ivfpq", on_disk=True, queries=200), home)
    lists = next(Path(home, "n").glob("gen-*")) / ondisk.LISTS_FILE
    inode = os.stat(lists).st_ino
    one = sharded_store(tmp_path / "b", [x[:10_100]])
    r = idx.add("n", one, home)
    assert (r["added"], r["count"], r["deltas"]) == (100, 10_100, 1)
    loaded = index_search.LoadedIndex("n", home)
    assert os.stat(loaded.dir / ondisk.LISTS_FILE).st_ino == inode  # the same file: linked, not rewritten
    assert loaded.index.ntotal == 10_100 and loaded.ids.num_rows == 10_100 and loaded.lookup_vectors.shape[0] == 10_100
    q = np.concatenate([x[10_000:10_020], x[:20]])
    before = loaded.search(q, 5)
    assert [h[0]["id"] for h in before[:20]] == [f"v{i:06d}" for i in range(10_000, 10_020)]
    assert [h[0]["id"] for h in before[20:]] == [f"v{i:06d}" for i in range(20)]
    labelled = loaded.search(x[10_050:10_051], 3, where={"label": "c2"})[0]
    assert len(labelled) == 3 and all(h["label"] == "c2" for h in labelled)
    assert loaded.item("v010077")["faiss_id"] == 10_077
    np.testing.assert_allclose(loaded.vector_of("v010077")[0], faiss_util.prepare_rows(x[10_077:10_078], "cosine")[0],
                               atol=2e-3)
    r = idx.add("n", sharded_store(tmp_path / "c", [x[:10_200]]), home)
    assert r["deltas"] == 2
    before = index_search.LoadedIndex("n", home).search(q, 5)  # the lists and two deltas
    r = idx.add("n", one, home, merge=True)  # nothing new, the deltas merged on request
    assert (r["added"], r["count"], r["deltas"]) == (0, 10_200, 0)
    merged = index_search.LoadedIndex("n", home)
    assert not list(merged.dir.glob("delta-*")) and merged.meta["deltas"] == []
    after = merged.search(q, 5)
    assert [[h["id"] for h in hs] for hs in after] == [[h["id"] for h in hs] for hs in before]
    assert np.allclose([[h["score"] for h in hs] for hs in after], [[h["score"] for h in hs] for hs in before])
    r = idx.add("n", sharded_store(tmp_path / "d", [x]), home)  # 200 more on 10,200: still a delta
    assert r["deltas"] == 1
    many = clustered(12_000, dim=32)
    r = idx.add("n", sharded_store(tmp_path / "e", [np.concatenate([x, many[10_400:11_800]])]), home)
    assert r["deltas"] == 0 and r["count"] == 11_800  # 1,600 in deltas on 10,200: past 10 %, merged
    assert index_search.LoadedIndex("n", home).search(many[11_000:11_001], 1)[0][0]["id"] == "v011000"


def test_a_failed_add_leaves_the_current_generation_served(tmp_path: Path, small_batches: None,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    x = clustered(6000, dim=32)
    home = str(tmp_path / "h")
    a = sharded_store(tmp_path / "a", [x[:4000]])
    b = sharded_store(tmp_path / "b", [x])
    idx.build(a, "n", index_plan.BuildOptions(kind="ivf", on_disk=True, queries=200), home)

    def crash(*_a: object, **_k: object) -> None:
        raise KeyboardInterrupt  # killed mid-merge

    monkeypatch.setattr(index_stream, "_merge_generation", crash)  # 2,000 on 4,000: over DELTA_FRACTION, so merged
    with pytest.raises(KeyboardInterrupt):
        idx.add("n", b, home)
    loaded = index_search.LoadedIndex("n", home)
    assert loaded.generation == 1 and loaded.index.ntotal == 4000
    assert loaded.search(x[5:6], 1)[0][0]["id"] == "v000005"
    monkeypatch.undo()
    monkeypatch.setattr(index_stream, "BATCH_ROWS", 1024)
    assert idx.add("n", b, home)["added"] == 2000  # running it again works


def test_cli_memory_budget_and_on_disk_errors(tmp_path: Path) -> None:
    x = clustered(4000, dim=16)
    store = sharded_store(tmp_path / "s", [x])
    home = str(tmp_path / "h")
    r = runner.invoke(app, ["index", "build", store, "--name", "n", "--kind", "ivf", "--memory-budget", "100KB",
                            "--home", home, "--json"])
    assert r.exit_code == 0, r.output
    meta = json.loads(r.output)
    assert meta["on_disk"] and meta["memory_budget"] == 100 * 1024
    r = runner.invoke(app, ["index", "build", store, "--name", "m", "--kind", "hnsw", "--on-disk", "--home", home])
    assert r.exit_code == 2 and "--on-disk needs an IVF index" in r.output
    r = runner.invoke(app, ["index", "build", store, "--name", "m", "--memory-budget", "lots", "--home", home])
    assert r.exit_code == 2 and "cannot read the memory budget 'lots'" in r.output
    r = runner.invoke(app, ["search", "n", "--id", "v000003", "-k", "2", "--home", home, "--json"])
    assert r.exit_code == 0, r.output
    first = json.loads(r.output.splitlines()[0])  # JSON lines, one per hit
    assert first["id"] == "v000003" and first["rank"] == 1


def test_a_moved_index_home_still_finds_its_lists(tmp_path: Path, small_batches: None) -> None:
    import shutil

    x = clustered(4000, dim=16)
    store = sharded_store(tmp_path / "s", [x])
    idx.build(store, "n", index_plan.BuildOptions(kind="ivf", on_disk=True, queries=100), str(tmp_path / "a"))
    shutil.move(str(tmp_path / "a"), str(tmp_path / "b"))  # the lists' recorded path no longer exists
    loaded = index_search.LoadedIndex("n", str(tmp_path / "b"))
    assert loaded.search(x[42:43], 1)[0][0]["id"] == "v000042"


def test_service_answers_from_an_on_disk_index(tmp_path: Path, small_batches: None) -> None:
    pytest.importorskip("fastapi", reason="the service extra is not installed")
    from tests.test_service import _client, _wait_ready

    x = clustered(5000, dim=16)
    store = sharded_store(tmp_path / "s", np.array_split(x, 2))
    home = str(tmp_path / "h")
    idx.build(store, "big", index_plan.BuildOptions(kind="ivfpq", on_disk=True, queries=100), home)
    with _client(home) as c:
        _wait_ready(c)
        r = c.post("/search", json={"id": "v004321", "k": 3, "index": "big"})
        assert r.status_code == 200, r.text
        hits = r.json()["results"][0]
        assert hits[0]["id"] == "v004321" and len(hits) == 3
        r = c.post("/search", json={"vector": x[17].tolist(), "k": 1, "index": "big", "where": {"label": "c2"}})
        assert r.status_code == 200 and r.json()["results"][0][0]["label"] == "c2"
        assert c.get("/indexes/big").json()["count"] == 5000


def test_plan_uses_an_hnsw_coarse_quantizer_for_many_lists_and_opq_on_request() -> None:

    budget = 1 << 20  # everything here is over budget: IVF-PQ
    assert index_plan.plan(1_000_000, 256, "auto", budget).factory == "IVF4000,PQ64"  # flat quantizer below 16,384
    big_plan = index_plan.plan(20_000_000, 256, "auto", budget)
    assert big_plan.factory == "IVF17888_HNSW32,PQ64" and "HNSW32 coarse quantizer" in big_plan.reason
    assert index_plan.plan(20_000_000, 256, "ivf", budget, coarse="flat").factory == "IVF17888,Flat"
    assert index_plan.plan(1000, 32, "ivf", budget, coarse="hnsw").factory == "IVF25_HNSW32,Flat"  # ≥ 39 per list
    assert index_plan.plan(11, 32, "ivf", budget).factory == "IVF1,Flat"  # a tiny store still trains
    assert index_plan.plan(30_000, 32, "ivf", budget).factory == "IVF692,Flat"  # ≈4√n once that leaves 39 per list
    assert index_plan.plan(1_000_000, 256, "ivfpq", budget, opq=True).factory == "OPQ64_256,IVF4000,PQ64"
    with pytest.raises(IndexError_, match="--opq .* needs --kind ivfpq"):
        index_plan.plan(1000, 32, "ivf", budget, opq=True)
    with pytest.raises(IndexError_, match="unknown coarse quantizer 'tree'; valid: auto, flat, hnsw"):
        index_plan.plan(1000, 32, "ivf", budget, coarse="tree")


@pytest.mark.slow
def test_hnsw_coarse_quantizer_and_opq_in_a_streamed_build(tmp_path: Path, small_batches: None) -> None:
    import faiss

    x = clustered(12_000, dim=32)
    store = sharded_store(tmp_path / "s", np.array_split(x, 3))
    home = str(tmp_path / "h")
    meta = idx.build(store, "q", index_plan.BuildOptions(kind="ivfpq", coarse="hnsw", opq=True, on_disk=True,
                                                  memory_budget=x.nbytes // 3, queries=200), home)
    assert meta["factory"].startswith("OPQ8_32,IVF") and "_HNSW32,PQ8" in meta["factory"]
    assert meta["on_disk"]["slices"] > 1 and meta["quality"]["recall_at_10"] >= 0.95
    loaded = index_search.LoadedIndex("q", home)
    assert isinstance(loaded.index, faiss.IndexPreTransform)  # the OPQ rotation travels with the index
    quantizer = faiss.downcast_index(faiss.extract_index_ivf(loaded.index).quantizer)
    assert isinstance(quantizer, faiss.IndexHNSWFlat) and quantizer.hnsw.efSearch == faiss_util.QUANTIZER_EF
    trained = faiss.read_index(str(loaded.dir / ondisk.TRAINED_FILE))  # what slices are cloned from: adds
    assert faiss.downcast_index(faiss.extract_index_ivf(trained).quantizer).hnsw.efSearch == faiss_util.QUANTIZER_EF_ADD
    assert loaded.search(x[4321:4322], 1)[0][0]["id"] == "v004321"
    assert idx.add("q", sharded_store(tmp_path / "b", [x, clustered(500, dim=32, seed=3)]), home)["added"] == 500
    assert index_search.LoadedIndex("q", home).index.ntotal == 12_500


@pytest.mark.slow
def test_a_build_or_add_killed_with_sigkill_leaves_no_half_written_index(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    x = clustered(9000, dim=16)
    store = sharded_store(tmp_path / "s", [x[:6000]])
    more = sharded_store(tmp_path / "m", [x])
    home = tmp_path / "h"

    def killed(staged: str, *args: str) -> None:
        # the real CLI with the final merge slowed, so that the kill lands after STAGED files (the
        # build's slices, the add's delta) are in the staging folder
        code = ("import time, embedder.index.ondisk as b; orig = b.merge_into; "
                "b.merge_into = lambda *a: (time.sleep(60), orig(*a))[1]; "
                "from embedder.cli import main; main()")
        p = subprocess.Popen([sys.executable, "-c", code, "index", *args, "--home", str(home)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 120
            while not list(home.glob(f"n/.gen-*/{staged}")) and time.time() < deadline:
                time.sleep(0.1)
            assert list(home.glob(f"n/.gen-*/{staged}")), f"the command never staged {staged}"
        finally:  # killed in any case: a failed wait must not leave the process to the next test
            p.send_signal(signal.SIGKILL)
            p.wait(30)

    killed("slice-*.faiss", "build", store, "--name", "n", "--kind", "ivf", "--on-disk")
    with pytest.raises(IndexError_, match="no index named .n."):
        index_search.LoadedIndex("n", str(home))  # the half-built index is never current
    r = runner.invoke(app, ["index", "build", store, "--name", "n", "--kind", "ivf", "--on-disk", "--home", str(home)])
    assert r.exit_code == 0, r.output  # building again works
    killed("delta-*.faiss", "add", "n", more)  # 3,000 on 6,000: merged, and killed in the merge
    loaded = index_search.LoadedIndex("n", str(home))
    assert loaded.generation == 1 and loaded.index.ntotal == 6000  # the previous generation is served
    assert idx.add("n", more, str(home))["added"] == 3000  # adding again works
    assert not list(home.glob("n/.gen-*"))  # the killed writers' staging folders were swept


def test_cli_build_option_errors_are_one_line(tmp_path: Path) -> None:
    store = sharded_store(tmp_path / "s", [clustered(2000, dim=16)])
    home = str(tmp_path / "h")
    for args, message in ((["--engine", "spark"], "'spark' is not one of 'local', 'ray'"),
                          (["--coarse", "tree"], "'tree' is not one of 'auto', 'flat', 'hnsw'"),
                          (["--kind", "ivf", "--opq"], "--opq rotates vectors for product quantization")):
        r = runner.invoke(app, ["index", "build", store, "--name", "n", "--home", home, *args])
        assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "h" / "n").exists()  # nothing written


def test_a_copied_home_searches_its_own_lists_after_the_original_is_rebuilt(tmp_path: Path,
                                                                           small_batches: None) -> None:
    """Each generation is self-contained: the header names its lists file alone, so a copy reads the
    copy's lists even while the original's still exist (and after they are replaced by other data)."""
    import shutil

    x = clustered(4000, dim=16)
    store = sharded_store(tmp_path / "s", [x])
    idx.build(store, "n", index_plan.BuildOptions(kind="ivf", on_disk=True, queries=100), str(tmp_path / "a"))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    index_generations.drop("n", str(tmp_path / "a"))  # the original rebuilt from other vectors, at the same path
    other = sharded_store(tmp_path / "o", [clustered(4000, dim=16, seed=7)], prefix="o")
    idx.build(other, "n", index_plan.BuildOptions(kind="ivf", on_disk=True, queries=100), str(tmp_path / "a"))
    copy = index_search.LoadedIndex("n", str(tmp_path / "b"))
    assert copy.search(x[42:43], 1)[0][0]["id"] == "v000042"
    lists = next((tmp_path / "b" / "n").glob("gen-*/index.faiss")).read_bytes()
    assert str(tmp_path).encode() not in lists  # no absolute path inside the generation


def test_filtered_ivfpq_with_a_query_chunk_that_finds_no_candidate(tmp_path: Path, small_batches: None) -> None:
    """More than one re-rank chunk (32 queries) where a whole chunk passes no candidate of the filter
    through nprobe: the widened probes and the exact fallback answer, never an IndexError."""
    x = clustered(6000, dim=16)
    labels = ["rare" if i == 5 else "common" for i in range(len(x))]
    from tests.test_index import vector_store

    store = vector_store(tmp_path / "s", x, labels)
    home = str(tmp_path / "h")
    idx.build(store, "pq", index_plan.BuildOptions(kind="ivfpq", on_disk=True, queries=100), home)
    loaded = index_search.LoadedIndex("pq", home)
    far = x[np.argsort(-np.linalg.norm(x - x[5], axis=1))[:32]]  # the first chunk: far from the one match
    near = np.repeat(x[5:6], 8, axis=0)  # the second chunk finds it at once
    out = loaded.search(np.concatenate([far, near]), 1, where={"label": "rare"})
    assert len(out) == 40 and all(len(h) == 1 and h[0]["id"] == "v000005" for h in out)


def test_a_streamed_build_beside_a_writer_indexes_one_snapshot(tmp_path: Path, small_batches: None,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer appends a shard while a streamed build reads the store (here: right after the build
    counted the rows and before it gathers its sample and adds): the build lists the shards once and
    indexes that snapshot, so no FAISS id repeats and every id finds itself. Listing them again for
    each step (as the build once did) added the new shard's rows under ids already taken."""
    x = clustered(5000, dim=16)
    store = sharded_store(tmp_path / "s", np.array_split(x[:4000], 2))
    real_gather = index_stream.gather
    appended = []

    def gather_after_a_write(*args, **kwargs):  # type: ignore[no-untyped-def]
        if not appended:  # a real writer, through the store's own API, between two steps of the build
            with Store.writer(tmp_path / "s", Store.open(tmp_path / "s").provenance) as st:
                schema = st.read().schema
                ids = [f"w{i:06d}" for i in range(1000)]
                st.write_shard(pa.table({
                    "id": ids, "path": [f"/data/{i}.jpg" for i in ids], "label": ["c0"] * 1000,
                    "embedding": embeddings_to_arrow(x[4000:], "float32"), "width": pa.array([1] * 1000, pa.int32()),
                    "height": pa.array([1] * 1000, pa.int32()), "file_hash": [None] * 1000,
                    "caption": [None] * 1000}, schema=schema))
                st.update_manifest()
            appended.append(True)
        return real_gather(*args, **kwargs)

    monkeypatch.setattr(index_stream, "gather", gather_after_a_write)
    home = str(tmp_path / "h")
    meta = idx.build(store, "n", index_plan.BuildOptions(kind="ivf", on_disk=True, queries=100), home)
    assert appended and meta["count"] == 4000  # the snapshot the build started from
    loaded = index_search.LoadedIndex("n", home)
    fids = loaded.ids.column("faiss_id").to_numpy()
    assert len(np.unique(fids)) == len(fids) == loaded.index.ntotal == 4000
    assert len(set(loaded.ids.column("id").to_pylist())) == 4000
    for i in (0, 1999, 2000, 3999):
        assert loaded.search(x[i:i + 1], 1)[0][0]["id"] == f"v{i:06d}"
    assert idx.add("n", store, home)["added"] == 1000  # the writer's rows come with the next add

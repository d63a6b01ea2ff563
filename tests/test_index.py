from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from embedder.cli import app
from embedder.embed.fill import extract
from embedder.errors import IndexError_, ProvenanceMismatch
from embedder.index import build as idx
from embedder.index import faiss_util
from embedder.index import generations as index_generations
from embedder.index import plan as index_plan
from embedder.index import quality as index_quality
from embedder.index import search as index_search
from embedder.models.builder import ModelSpec
from embedder.models.origin import WeightsRef
from embedder.models.registry import get_backbone
from embedder.store.provenance import Provenance
from embedder.store.shards import Store, embeddings_to_arrow

runner = CliRunner()


def clustered(n: int, dim: int = 64, latent: int = 12, clusters: int = 40, seed: int = 0) -> np.ndarray:
    """Vectors with low intrinsic dimension: a Gaussian mixture in 12-d, linearly lifted, noised."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, (clusters, latent))
    z = centers[rng.integers(0, clusters, n)] + rng.normal(0, 1, (n, latent))
    lift = rng.normal(0, 1, (latent, dim))
    return (z @ lift + rng.normal(0, 0.1, (n, dim))).astype(np.float32)


def vector_store(path: Path, x: np.ndarray, labels: list[str] | None = None, start: int = 0) -> str:
    prov = Provenance("synthetic", WeightsRef("file", "none", "0"), "penultimate", "avg",
                      get_backbone("tiny_test").preprocessing(), x.shape[1])
    with Store.writer(path, prov) as st:
        _write_vectors(st, x, labels, start)
    return str(path)


def _write_vectors(st: Store, x: np.ndarray, labels: list[str] | None, start: int) -> None:
    n = len(x)
    ids = [f"v{start + i:06d}" for i in range(n)]
    st.write_shard(pa.table({
        "id": ids, "path": [f"/data/{i}.jpg" for i in ids],
        "label": labels or [f"c{i % 5}" for i in range(n)],
        "embedding": embeddings_to_arrow(x, "float32"),
        "width": pa.array([1] * n, pa.int32()), "height": pa.array([1] * n, pa.int32()),
        "file_hash": [None] * n, "caption": [None] * n,
    }, schema=st.read().schema))
    st.update_manifest()


def recall_vs_numpy(loaded: index_search.LoadedIndex, x: np.ndarray, q: np.ndarray, k: int = 10) -> float:
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    exact = np.sort(qn @ xn.T, axis=1)[:, ::-1][:, :k]
    hits = loaded.search(q, k)
    ids = np.array([[int(h["id"][1:]) for h in row] + [-1] * (k - len(row)) for row in hits])
    return index_quality.tie_aware_recall(exact, index_quality.true_scores(xn, qn, ids, "ip"), ids, True, k)


@pytest.mark.parametrize("kind,floor", [("flat", 1.0), ("hnsw", 0.95), ("ivf", 0.93), ("ivfpq", 0.93)])
def test_recall_floors_against_exact(tmp_path: Path, kind: str, floor: float) -> None:
    n = 3000 if kind == "ivfpq" else 6000  # PQ training is the slow part on 2 cores
    both = clustered(n + 200, dim=32 if kind == "ivfpq" else 64)
    x, fresh = both[:n], both[n:]  # fresh: same distribution, never indexed
    store = vector_store(tmp_path / "s", x)
    meta = idx.build(store, kind, index_plan.BuildOptions(kind=kind, queries=300), str(tmp_path / "h"))
    assert meta["kind"] == kind and meta["count"] == n
    assert meta["quality"]["recall_at_10"] >= 0.95  # PQ reaches it through exact re-ranking
    assert (meta["rerank"] is not None) == (kind == "ivfpq")
    loaded = index_search.LoadedIndex(kind, str(tmp_path / "h"))
    assert recall_vs_numpy(loaded, x, fresh) >= floor
    assert meta["trained_on"] == (None if kind in ("flat", "hnsw") else "cpu")  # no GPU on a CPU build


@pytest.mark.slow
@pytest.mark.parametrize("factory,metric", [("IVF24,Flat", "ip"), ("IVF24,Flat", "l2"),
                                            ("IVF24_HNSW32,Flat", "ip"), ("OPQ8_32,IVF24,PQ8x4", "l2")])
def test_training_through_the_gpu_hook_gives_faiss_own_centroids(factory: str, metric: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU machine the IVF k-means assigns with a flat index on the GPUs (FAISS's
    ``clustering_index``). Given a CPU flat index of the metric ``assigner_metric`` picks, the hook
    must reproduce FAISS's own training exactly: a wrong metric (IP against L2, or the HNSW
    quantizer's L2 clustering) moves the centroids."""
    import faiss

    from embedder.index import gpu as index_gpu

    x = clustered(3000, dim=32)
    m = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
    def make() -> object:
        index = faiss.index_factory(32, factory, m)
        if factory.startswith("OPQ"):  # the rotation is not the point: 5 of OPQ's 50 iterations (35 s -> 5 s)
            opq = faiss.downcast_VectorTransform(faiss.downcast_index(index).chain.at(0))
            opq.niter = 5
        return index

    reference = make()
    reference.train(x)
    hooked = make()
    ivf = faiss.extract_index_ivf(hooked)
    assert index_gpu.train(hooked, x, faiss.IndexFlat(ivf.d, index_gpu.assigner_metric(ivf))) == "cpu"
    assert ivf.clustering_index is None  # the hook is removed again

    def centroids(index: object) -> np.ndarray:
        q = faiss.extract_index_ivf(index).quantizer
        return q.reconstruct_n(0, q.ntotal)

    np.testing.assert_array_equal(centroids(reference), centroids(hooked))
    if "HNSW" in factory:  # a quantizer that trains alone is clustered with L2, whatever the metric
        assert index_gpu.assigner_metric(ivf) == faiss.METRIC_L2
    assert index_gpu.gpu_count() == 0  # faiss-cpu here; and EMBEDDER_FAISS_GPU=0 always means none
    monkeypatch.setenv(index_gpu.ENV, "0")
    assert index_gpu.gpu_count() == 0


def test_auto_plan_says_why() -> None:
    gb = 1 << 30
    assert index_plan.plan(10_000, 512, "auto", 8 * gb).kind == "flat"
    p = index_plan.plan(200_000, 512, "auto", 8 * gb)
    assert p.kind == "hnsw" and "budget" in p.reason
    p = index_plan.plan(200_000, 512, "auto", 100 << 20)
    assert p.kind == "ivfpq" and p.factory == "IVF1788,PQ128" and "exceeds" in p.reason
    assert index_plan.plan(200_000, 512, "ivf", gb).train_size < 200_000


@pytest.mark.parametrize("kind", ["hnsw", "ivf", "ivfpq"])
def test_add_keeps_id_map_and_skips_present(tmp_path: Path, kind: str) -> None:
    x = clustered(1200, dim=16)
    a = vector_store(tmp_path / "a", x[:800])
    b = vector_store(tmp_path / "b", x)
    home = str(tmp_path / "h")
    idx.build(a, "n", index_plan.BuildOptions(kind=kind), home)
    r = idx.add("n", b, home)
    assert (r["added"], r["skipped"], r["count"]) == (400, 800, 1200)
    assert idx.add("n", b, home)["added"] == 0
    loaded = index_search.LoadedIndex("n", home)
    ids = loaded.ids.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 1200
    for probe in ("v000003", "v000950"):
        row = int(probe[1:])
        hit = loaded.search(x[row:row + 1], 1)[0][0]
        assert hit["id"] == probe and hit["score"] == pytest.approx(1.0, abs=1e-4)
        assert loaded.search(loaded.vector_of(probe), 1)[0][0]["id"] == probe
    other = vector_store(tmp_path / "o", clustered(10, dim=8))
    with pytest.raises(ProvenanceMismatch):
        idx.add("n", other, home)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf", "ivfpq"])
def test_filters_return_k(tmp_path: Path, kind: str) -> None:
    both = clustered(4005, dim=16)
    x, q = both[:4000], both[4000:]
    labels = ["rare" if i % 250 == 0 else "common" for i in range(4000)]  # 16 rare rows
    store = vector_store(tmp_path / "s", x, labels)
    home = str(tmp_path / "h")
    idx.build(store, "f", index_plan.BuildOptions(kind=kind), home)
    loaded = index_search.LoadedIndex("f", home)
    for hits in loaded.search(q, 10, {"label": "rare"}):
        assert len(hits) == 10 and {h["label"] for h in hits} == {"rare"}
    for hits in loaded.search(q, 50, {"label": "rare"}):
        assert len(hits) == 16  # only 16 exist: all of them
    assert loaded.search(q, 10, {"label": "none"}) == [[]] * 5
    assert len(loaded.search(q[:1], 3, {"width": "1"})[0]) == 3  # a store column, not in the id map
    with pytest.raises(IndexError_, match="cannot filter on 'colour'; columns: id, path, label"):
        loaded.search(q, 3, {"colour": "red"})
    unit = x[7] / np.linalg.norm(x[7])
    np.testing.assert_allclose(loaded.vector_of("v000007")[0], unit, atol=2e-2 if kind == "ivfpq" else 1e-6)


def test_bad_inputs(tmp_path: Path) -> None:
    x = clustered(300)
    store = vector_store(tmp_path / "s", x)
    home = str(tmp_path / "h")
    idx.build(store, "ok", index_plan.BuildOptions(kind="flat"), home)
    with pytest.raises(IndexError_, match="available: ok"):
        index_search.LoadedIndex("nope", home)
    loaded = index_search.LoadedIndex("ok", home)
    with pytest.raises(IndexError_, match="dim 3"):
        loaded.search(np.zeros((1, 3)), 5)
    with pytest.raises(IndexError_, match="positive"):
        loaded.search(x[:1], 0)
    with pytest.raises(IndexError_, match="already exists"):
        idx.build(store, "ok", index_plan.BuildOptions(kind="flat"), home)
    with pytest.raises(IndexError_, match="FAISS cannot build"):
        idx.build(store, "bad", index_plan.BuildOptions(kind="NotAFactory"), home)
    (index_generations.locate("ok", home) / "index.faiss").write_bytes(b"garbage")
    with pytest.raises(IndexError_, match="corrupt"):
        index_search.LoadedIndex("ok", home)


def test_cli_round_trip_on_tiny_backbone(image_tree: Path, tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    extract([str(image_tree)], store, ModelSpec("tiny_test"))
    home = str(tmp_path / "h")
    r = runner.invoke(app, ["index", "build", store, "--name", "imgs", "--home", home])
    assert r.exit_code == 0, r.output
    # 11 images: a flat index, exact by construction (not "not measured: 50 queries are needed")
    assert "exact search (flat index): recall@10 1.000 by construction" in r.output
    assert "not measured" not in r.output
    q = str(image_tree / "cat" / "cat_0001.jpg")
    r = runner.invoke(app, ["search", "imgs", q, "-k", "3", "--home", home, "--json"])
    assert r.exit_code == 0, r.output
    lines = [json.loads(line) for line in r.output.strip().splitlines()]
    assert len(lines) == 3 and lines[0]["path"] == q and lines[0]["score"] == pytest.approx(1, abs=1e-4)
    r = runner.invoke(app, ["search", "imgs", q, "-k", "4", "--where", "label=dog", "--home", home, "--json"])
    assert [json.loads(line)["label"] for line in r.output.strip().splitlines()] == ["dog"] * 4
    first_id = lines[0]["id"]
    r = runner.invoke(app, ["search", "imgs", "--id", first_id, "-k", "2", "--home", home, "--json"])
    assert json.loads(r.output.splitlines()[0])["id"] == first_id
    # the table at 80 columns keeps every file name, and the 12 characters of id it shows work with --id
    r = runner.invoke(app, ["search", "imgs", q, "-k", "11", "--home", home], env={"COLUMNS": "80"})
    assert r.exit_code == 0 and all(f"{p.parent.name}/{p.name}" in r.output
                                    for p in image_tree.rglob("*.jpg")), r.output
    assert first_id[:12] in r.output and first_id not in r.output
    r = runner.invoke(app, ["search", "imgs", "--id", first_id[:12], "-k", "1", "--home", home, "--json"])
    assert r.exit_code == 0 and json.loads(r.output.splitlines()[0])["id"] == first_id
    r = runner.invoke(app, ["search", "imgs", "--id", first_id, "-k", "3", "--exclude-self", "--home", home, "--json"])
    hits = [json.loads(line) for line in r.output.strip().splitlines()]
    assert len(hits) == 3 and first_id not in {h["id"] for h in hits} and [h["rank"] for h in hits] == [1, 2, 3]
    r = runner.invoke(app, ["search", "imgs", q, "--where", "label=cow", "--home", home])
    assert r.exit_code == 0 and "no item of index 'imgs' matches label=cow (its values: cat, dog)" in r.output
    np.save(tmp_path / "q.npy", np.zeros(7, dtype=np.float32))
    r = runner.invoke(app, ["search", "imgs", str(tmp_path / "q.npy"), "--home", home])
    assert r.exit_code == 2 and r.output.startswith("error:") and "dim 7" in r.output
    (tmp_path / "broken.jpg").write_bytes(b"nope")
    r = runner.invoke(app, ["search", "imgs", str(tmp_path / "broken.jpg"), "--home", home])
    assert r.exit_code == 2 and "broken.jpg" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["search", "imgs", q, "-k", "0", "--home", home])
    assert r.exit_code == 2 and "positive" in r.output
    r = runner.invoke(app, ["search", "zzz", q, "--home", home])
    assert r.exit_code == 2 and "available: imgs" in r.output
    r = runner.invoke(app, ["index", "list", "--home", home])
    assert "imgs" in r.output and "1.000 (exact)" in r.output and "None" not in r.output
    r = runner.invoke(app, ["index", "build", store, "--name", "typo", "--kind", "flatt", "--home", home])
    assert r.exit_code == 2 and "did you mean --kind flat?" in r.output and ".cpp" not in r.output
    r = runner.invoke(app, ["index", "drop", "imgs", "--home", home])
    assert r.exit_code == 0 and index_generations.names(home) == []


def test_query_model_must_match_index_provenance(image_tree: Path, tmp_path: Path) -> None:
    import torch

    from embedder.models.registry import get_backbone

    f = tmp_path / "w.pth"
    state = get_backbone("tiny_test").build_architecture().state_dict()
    torch.save(state, f)
    store = str(tmp_path / "store")
    extract([str(image_tree)], store, ModelSpec("tiny_test", weights_file=f))
    home = str(tmp_path / "h")
    idx.build(store, "w", index_plan.BuildOptions(kind="flat"), home)
    q = str(image_tree / "cat" / "cat_0001.jpg")
    r = runner.invoke(app, ["search", "w", q, "--home", home, "--json"])
    assert r.exit_code == 0, r.output  # the store remembers its weights file, still there and unchanged
    f = f.rename(tmp_path / "moved.pth")  # gone from where it was: never guessed
    r = runner.invoke(app, ["search", "w", q, "--home", home])
    assert r.exit_code == 2 and "--weights" in r.output
    other = tmp_path / "other.pth"
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, other)
    r = runner.invoke(app, ["search", "w", q, "--home", home, "--weights", str(other)])
    assert r.exit_code == 2 and "weights=file w.pth" in r.output and "other.pth" in r.output
    r = runner.invoke(app, ["search", "w", q, "--home", home, "--weights", str(f)])
    assert r.exit_code == 0, r.output


def test_dedup_finds_copies(image_tree: Path, tmp_path: Path) -> None:
    shutil.copy(image_tree / "cat" / "cat_0000.jpg", image_tree / "cat" / "copy_a.jpg")
    shutil.copy(image_tree / "cat" / "cat_0000.jpg", image_tree / "dog" / "copy_b.jpg")
    store = str(tmp_path / "store")
    extract([str(image_tree)], store, ModelSpec("tiny_test"))
    out = tmp_path / "dups.parquet"
    r = runner.invoke(app, ["dedup", store, "--out", str(out), "--threshold", "0.99999"])
    assert r.exit_code == 0, r.output
    t = pq.read_table(out)
    groups = {}
    for g, p in zip(t.column("group").to_pylist(), t.column("path").to_pylist()):
        groups.setdefault(g, set()).add(Path(p).name)
    assert {"cat_0000.jpg", "copy_a.jpg", "copy_b.jpg"} in groups.values()
    # without --out: beside the store (not the current folder), and the groups are printed
    r = runner.invoke(app, ["dedup", store, "--threshold", "0.99999"])
    assert r.exit_code == 0 and (tmp_path / "store.duplicates.parquet").is_file(), r.output
    assert "group 0 (3 images):" in r.output and "copy_a.jpg" in r.output


def test_filter_falls_back_to_exact_search_when_selectors_fail(tmp_path: Path, monkeypatch) -> None:
    both = clustered(1005, dim=16)
    x, q = both[:1000], both[1000:]
    labels = ["rare" if i % 50 == 0 else "common" for i in range(1000)]  # 20 rare rows
    home = str(tmp_path / "h")
    idx.build(vector_store(tmp_path / "s", x, labels), "f", index_plan.BuildOptions(kind="hnsw"), home)
    loaded = index_search.LoadedIndex("f", home)
    original = loaded.searcher.search

    def no_selectors(qq, k, params=None):
        if params is not None:
            raise RuntimeError("selector not supported by this index type")
        return original(qq, k)

    monkeypatch.setattr(loaded.searcher, "search", no_selectors)
    hits = loaded.search(q, 5, {"label": "rare"})
    rare = np.flatnonzero(np.array(labels) == "rare")
    xn = x[rare] / np.linalg.norm(x[rare], axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    expected = rare[np.argsort(-(qn @ xn.T), axis=1)[:, :5]]
    assert [[int(h["id"][1:]) for h in row] for row in hits] == expected.tolist()
    assert all(h["label"] == "rare" for row in hits for h in row)


@pytest.mark.parametrize("bad", ["../victim", "/tmp/abs", ".hidden", "a/b", "", "..", "x" * 200])
def test_index_names_never_escape_the_home(tmp_path: Path, bad: str) -> None:
    """Every entry point validates names (issue: `index drop ../victim` deleted a folder)."""
    home = tmp_path / "h"
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "index.json").write_text("{}")  # looks like a legacy index, to tempt a lax check
    store = vector_store(tmp_path / "s", clustered(50, dim=8))
    idx.build(store, "ok", index_plan.BuildOptions(kind="flat"), str(home))
    for call in (lambda: idx.build(store, bad, index_plan.BuildOptions(kind="flat"), str(home)),
                 lambda: index_generations.locate(bad, str(home)), lambda: index_generations.info(bad, str(home)),
                 lambda: index_generations.drop(bad, str(home)), lambda: idx.add(bad, store, str(home)),
                 lambda: index_search.LoadedIndex(bad, str(home))):
        with pytest.raises(IndexError_, match="invalid index name"):
            call()
    for args in (["index", "drop", bad], ["index", "info", bad], ["search", bad, "--id", "v000001"]):
        r = runner.invoke(app, [*args, "--home", str(home)])
        assert r.exit_code == 2 and r.output.startswith("error:"), r.output
    assert (victim / "index.json").exists() and index_generations.names(str(home)) == ["ok"]


def test_symlinked_name_pointing_outside_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "h"
    home.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (home / "link").symlink_to(outside)
    with pytest.raises(IndexError_, match="outside the index home"):
        index_generations.drop("link", str(home))
    assert outside.exists()


def test_add_is_a_new_generation_and_readers_never_see_a_mix(tmp_path: Path) -> None:
    home = str(tmp_path / "h")
    x = clustered(400, dim=16)
    store_a = vector_store(tmp_path / "a", x[:300])
    store_b = vector_store(tmp_path / "b", x[300:], start=300)
    idx.build(store_a, "g", index_plan.BuildOptions(kind="flat"), home)
    first = index_generations.locate("g", home)
    assert first.name == "gen-000001" and index_generations.info("g", home)["generation"] == 1
    reader = index_search.LoadedIndex("g", home)  # opened before the add: keeps answering from gen 1
    r = idx.add("g", store_b, home)
    assert r["added"] == 100 and r["count"] == 400
    second = index_generations.locate("g", home)
    assert second.name == "gen-000002" and not first.exists()  # superseded generation removed
    assert reader.index.ntotal == 300 and len(reader.search(x[:2], 5)[0]) == 5
    assert index_search.LoadedIndex("g", home).index.ntotal == 400
    # A writer killed mid-generation leaves a staged folder that never becomes current ...
    from embedder.index import generations as gens

    d = gens.index_dir("g", home)
    with gens.writer(d):
        staged = gens.staging(d)
        (staged / "index.faiss").write_bytes(b"half-written")
    assert index_search.LoadedIndex("g", home).index.ntotal == 400  # ... and readers never see it
    assert idx.add("g", store_b, home)["added"] == 0  # the next writer cleans it up
    assert not staged.exists()


def test_second_index_writer_is_refused(tmp_path: Path) -> None:
    from embedder.index import generations as gens

    home = str(tmp_path / "h")
    x = clustered(120, dim=8)
    store = vector_store(tmp_path / "a", x[:100])
    more = vector_store(tmp_path / "b", x[100:], start=100)
    idx.build(store, "g", index_plan.BuildOptions(kind="flat"), home)
    with gens.writer(gens.index_dir("g", home)):  # another process's add, in flight
        with pytest.raises(IndexError_, match="being written by another"):
            idx.add("g", more, home)
        with pytest.raises(IndexError_, match="being written by another"):
            index_generations.drop("g", home)
    ids = index_search.LoadedIndex("g", home).ids.column("faiss_id").to_pylist()
    assert idx.add("g", more, home)["count"] == 120
    ids = index_search.LoadedIndex("g", home).ids.column("faiss_id").to_pylist()
    assert len(set(ids)) == len(ids) == 120  # no duplicate FAISS ids


def test_filtered_ivfpq_search_with_no_allowed_candidate_falls_back(tmp_path: Path) -> None:
    """One query, one matching row: the PQ candidates contain no allowed id (was an IndexError)."""
    x = clustered(3000, dim=32)
    labels = ["common"] * 3000
    labels[1234] = "rare"
    store = vector_store(tmp_path / "s", x, labels=labels)
    home = str(tmp_path / "h")
    idx.build(store, "pq", index_plan.BuildOptions(kind="ivfpq", queries=100), home)
    loaded = index_search.LoadedIndex("pq", home)
    far = x[1234] * -1.0  # a query nowhere near the one allowed row
    hits = loaded.search(far[None], 5, where={"label": "rare"})
    assert [h["id"] for h in hits[0]] == ["v001234"]


def test_dedup_groups_are_transitive_and_numbered_in_order(tmp_path: Path) -> None:
    """a~b and b~c put a, b, c in one group even though a and c are below the threshold."""
    from embedder.analysis.dedup import dedup

    angle = np.deg2rad([0.0, 10.0, 20.0, 90.0, 180.0, 181.0])  # 10° steps: cos 0.985; 20°: 0.94
    x = np.zeros((6, 4), np.float32)
    x[:, 0], x[:, 1] = np.cos(angle), np.sin(angle)
    store = vector_store(tmp_path / "s", x)
    s = dedup(store, str(tmp_path / "d.parquet"), threshold=0.97)
    t = pq.read_table(tmp_path / "d.parquet")
    assert (s.groups, s.duplicates) == (2, 3)
    assert t.column("group").to_pylist() == [0, 0, 0, 1, 1]
    assert t.column("id").to_pylist() == ["v000000", "v000001", "v000002", "v000004", "v000005"]


def test_legacy_index_folder_is_read_and_migrated_by_add(tmp_path: Path) -> None:
    """Indexes written before generations (files directly in NAME/) keep working."""
    home = tmp_path / "h"
    x = clustered(150, dim=8)
    store_a = vector_store(tmp_path / "a", x[:100])
    idx.build(store_a, "old", index_plan.BuildOptions(kind="flat"), str(home))
    gen = index_generations.locate("old", str(home))
    for f in gen.iterdir():  # lay it out the old way
        f.rename(home / "old" / f.name)
    gen.rmdir()
    (home / "old" / "CURRENT").unlink()
    assert index_generations.names(str(home)) == ["old"] and index_generations.locate("old", str(home)) == home / "old"
    assert index_search.LoadedIndex("old", str(home)).index.ntotal == 100
    idx.add("old", vector_store(tmp_path / "b", x[100:], start=100), str(home))
    assert index_generations.locate("old", str(home)).name == "gen-000001"
    assert sorted(p.name for p in (home / "old").iterdir()) == [".lock", "CURRENT", "gen-000001"]
    assert index_search.LoadedIndex("old", str(home)).index.ntotal == 150


def test_dedup_and_inspect_share_the_measured_near_duplicate_default(tmp_path: Path) -> None:
    """A pair at cosine 0.93 (a recompressed, downscaled copy measures 0.93-0.998) is a duplicate for
    `embedder dedup` without --threshold, as for inspect; --threshold 0.95 separates it."""
    from embedder.analysis.options import NEAR_DUPLICATE_COSINE, InspectOptions

    x = np.zeros((3, 4), np.float32)
    x[0, 0] = 1.0
    x[1, 0], x[1, 1] = 0.93, np.sqrt(1 - 0.93**2)
    x[2, 2] = 1.0
    store = vector_store(tmp_path / "s", x)
    runner = CliRunner()
    r = runner.invoke(app, ["dedup", store, "--out", str(tmp_path / "d.parquet")])
    assert r.exit_code == 0, r.output
    assert "1 near-duplicate groups, 1 images beyond" in r.output and "cosine ≥ 0.9)" in r.output
    r = runner.invoke(app, ["dedup", store, "--out", str(tmp_path / "e.parquet"), "--threshold", "0.95"])
    assert r.exit_code == 0 and "0 near-duplicate groups" in r.output, r.output
    assert InspectOptions().duplicate_threshold == NEAR_DUPLICATE_COSINE == 0.90


def test_id_lookups_find_every_id_and_refuse_others(tmp_path: Path) -> None:
    """row_of: binary search over the ids in sorted order, across the id map's chunks, with ids in
    any order (unicode included); the same answers as a scan."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 8)).astype(np.float32)
    store = vector_store(tmp_path / "s", x[:2000])
    home = str(tmp_path / "h")
    idx.build(store, "ids", index_plan.BuildOptions(kind="flat"), home)
    idx.add("ids", vector_store(tmp_path / "s2", x[2000:], start=2000), home)  # a second chunk, later ids
    loaded = index_search.LoadedIndex("ids", home)
    assert loaded.ids.column("id").num_chunks >= 1
    ids = loaded.ids.column("id").to_pylist()
    for i in [0, 1, 999, 1999, 2000, 2999, *rng.integers(0, 3000, 50).tolist()]:
        row = loaded.row_of(ids[i])
        assert row is not None and ids[row] == ids[i]
        assert loaded.item(ids[i])["id"] == ids[i]
    for missing in ["", "v", "v0000000", "v003000", "zzz", "é", "v000001 "]:
        assert loaded.row_of(missing) is None
    with pytest.raises(IndexError_, match="is not in index"):
        loaded.vector_of("nope")
    np.testing.assert_allclose(loaded.vector_of(ids[2500])[0], faiss_util.prepare_rows(x[2500:2501], "cosine")[0],
                               atol=1e-6)

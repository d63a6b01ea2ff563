"""Filtered and id queries that hold at 10⁸ rows: store-column filters never read the store whole
(selectors built once per generation by the service's loader, a pushdown scan otherwise), and the id
order comes from the ids' digests. Answers are the same as a join of the id map with the store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from embedder.errors import IndexError_
from embedder.index import build as idx
from embedder.index import generations as index_generations
from embedder.index import plan as index_plan
from embedder.index import search as index_search
from embedder.models.origin import WeightsRef
from embedder.models.registry import get_backbone
from embedder.store.provenance import Provenance
from embedder.store.shards import Store, embeddings_to_arrow
from tests.test_index import clustered

N = 3000


def store_of(path: Path, n: int = N, prefix: str = "v", shards: int = 2) -> str:
    """A store with a low-cardinality store column (width), a unique one (file_hash), a sparse one
    (caption) and ids of another tool's shape (not embedder's hex digests)."""
    x = clustered(n, dim=8)
    prov = Provenance("synthetic", WeightsRef("file", "none", "0"), "penultimate", "avg",
                      get_backbone("tiny_test").preprocessing(), 8)
    with Store.writer(path, prov) as st:
        schema = st.read().schema
        for part in np.array_split(np.arange(n), shards):
            ids = [f"{prefix}{i:06d}" for i in part]
            st.write_shard(pa.table({
                "id": ids, "path": [f"/data/{i}.jpg" for i in ids], "label": [f"c{i % 5}" for i in part],
                "embedding": embeddings_to_arrow(x[part], "float32"),
                "width": pa.array([int(i % 3) * 10 + 10 for i in part], pa.int32()),
                "height": pa.array([7] * len(part), pa.int32()),
                "file_hash": [f"h{i}" for i in part],
                "caption": [("a red bus" if i % 7 == 0 else None) for i in part]}, schema=schema))
        st.update_manifest()
    return str(path)


def joined(loaded: index_search.LoadedIndex, where: dict[str, str]) -> list[int]:
    """What a filter answered before: the id map joined with the whole store, each column cast to
    text and compared (the reference, not the code under test)."""
    table = loaded.ids.select(["faiss_id", "id", "path", "label"]).combine_chunks()
    store = Store.open(loaded.meta["store"]).read(["id", "width", "height", "file_hash", "caption"])
    table = table.join(store, "id", join_type="left outer")
    mask = None
    for col, value in where.items():
        cond = pc.equal(pc.cast(table.column(col), pa.string()), value)
        mask = cond if mask is None else pc.and_(mask, cond)
    return sorted(table.filter(mask).column("faiss_id").to_pylist())


CASES: list[dict[str, str]] = [
    {"label": "c1"}, {"width": "20"}, {"label": "c1", "width": "20"}, {"height": "7", "label": "c4"},
    {"path": "/data/v000042.jpg"}, {"id": "v000017"}, {"file_hash": "h1234"}, {"caption": "a red bus"},
    {"label": "nope"}, {"width": "020"}, {"width": "wide"}, {"file_hash": "none-such"}, {"id": "zzz"},
]


@pytest.fixture(scope="module")
def homes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """An in-memory index over one store, and an on-disk (streamed) one over part of it, grown by an
    add from the whole store, whose own store then lost a shard."""
    tmp = tmp_path_factory.mktemp("filters")
    store = store_of(tmp / "s")
    home = str(tmp / "h")
    idx.build(store, "mem", index_plan.BuildOptions(kind="flat"), home)
    first = store_of(tmp / "s1", n=2000)
    idx.build(first, "disk", index_plan.BuildOptions(kind="ivf", on_disk=True, queries=50), home)
    idx.add("disk", store, home)  # rows 2000-2999 of the store: FAISS ids past its own store's rows
    # a shard of its store moved away: the store's rows no longer line up with the FAISS ids
    Path(sorted(Store.open(first).shard_files())[0]).unlink()
    return {"home": home, "store": store}


@pytest.mark.parametrize("name", ["mem", "disk"])
@pytest.mark.parametrize("most", [None, 5, 0], ids=["selectors", "few-values", "per-query"])
def test_filters_answer_as_a_join_of_the_store_did(homes: dict[str, str], name: str, most: int | None,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = index_search.LoadedIndex(name, homes["home"])
    if most != 0:  # as the service's loader does; the CLI and the API match every condition per query
        if most is not None:
            monkeypatch.setattr(index_search, "MAX_DISTINCT", most)
        loaded.prepare_lookups()
        assert {"label", "width", "height", "caption"} <= set(loaded._selectors)
        # columns with more values than MAX_DISTINCT (a path, a hash) are matched by a scan per query
        assert ({"path", "file_hash"} <= set(loaded._selectors)) == (most is None)
    if name == "disk":  # its rows added from another store: filters on store columns read its own
        assert loaded.meta["on_disk"] and loaded.meta["count"] == N
    for where in CASES:
        got = loaded.allowed_faiss_ids(where).tolist()
        assert got == joined(loaded, where), where
    with pytest.raises(IndexError_, match="cannot filter on 'colour'; columns: id, path, label, width"):
        loaded.allowed_faiss_ids({"colour": "red"})
    q = clustered(N, dim=8)[5:7]
    hits = loaded.search(q, 4, where={"label": "c2", "width": "30"})
    allowed = set(joined(loaded, {"label": "c2", "width": "30"}))
    assert all(len(h) == 4 and {loaded.item(x["id"])["faiss_id"] for x in h} <= allowed for h in hits)


def test_a_large_match_goes_to_faiss_as_a_bitmap_with_the_same_answers(homes: dict[str, str]) -> None:
    loaded = index_search.LoadedIndex("mem", homes["home"])
    q = clustered(N, dim=8)[:3]
    few = loaded.search(q, 5, where={"id": "v000017"})  # one id: a hash set
    assert [[h["id"] for h in r] for r in few] == [["v000017"]] * 3
    many = loaded.search(q, 5, where={"label": "c3"})  # a fifth of the rows: a bitmap
    allowed = loaded.allowed_faiss_ids({"label": "c3"})
    exact = loaded._exact_among(loaded.prepare(q), allowed, 5)
    assert [[h["id"] for h in r] for r in many] == [[h["id"] for h in r] for r in exact]


def _spy_store_reads(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every whole-column read of a store (Store.read / Store.table), recorded."""
    calls: list[Any] = []
    original = Store.read

    def read(self: Store, columns: list[str] | None = None, filter: Any = None) -> pa.Table:
        calls.append(columns)
        return original(self, columns, filter)

    monkeypatch.setattr(Store, "read", read)
    return calls


def test_the_service_never_reads_the_store_whole_for_filters(homes: dict[str, str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a generation and answering store-column filters (the real service, through its test
    client) read the store's columns batch by batch, never as one table: ``Store.read`` is not called,
    and no filter table of the joined store is built."""
    pytest.importorskip("fastapi", reason="the service extra is not installed")
    from tests.test_service import _client, _wait_ready

    calls = _spy_store_reads(monkeypatch)
    v = clustered(N, dim=8)[11].tolist()
    with _client(homes["home"]) as c:
        _wait_ready(c)
        for name in ("mem", "disk"):
            any_label = {"c0", "c1", "c2", "c3", "c4"}
            for where, labels in (({"width": 20, "label": "c1"}, {"c1"}), ({"caption": "a red bus"}, any_label)):
                r = c.post("/search", json={"vector": v, "k": 3, "index": name, "where": where})
                assert r.status_code == 200, r.text
                hits = r.json()["results"][0]
                assert len(hits) == 3 and {h["label"] for h in hits} <= labels
            r = c.post("/search", json={"vector": v, "k": 3, "index": name, "where": {"width": 11}})
            assert r.status_code == 200 and r.json()["results"] == [[]]  # a value that matches nothing
            r = c.post("/search", json={"vector": v, "k": 3, "index": name, "where": {"colour": "red"}})
            assert r.status_code == 400 and r.json()["kind"] == "bad_query"
            assert "cannot filter on 'colour'" in r.json()["error"]
            loaded = c.app.state.engine.indexes[name]  # type: ignore[attr-defined]
            assert getattr(loaded, "_filter_table", None) is None
    assert calls == []


def test_ids_are_found_after_a_new_generation_is_loaded(tmp_path: Path) -> None:
    """The id order is made by the loader from the ids' digests, per generation: after a rebuild over
    other ids, the new ids are found and the old ones are not."""
    pytest.importorskip("fastapi", reason="the service extra is not installed")
    from tests.test_service import _client, _wait_ready

    home = str(tmp_path / "h")
    idx.build(store_of(tmp_path / "a", n=400, prefix="a"), "pets", index_plan.BuildOptions(kind="flat"), home)
    with _client(home) as c:
        _wait_ready(c)
        assert c.get("/items/pets/a000123").json()["id"] == "a000123"
        index_generations.drop("pets", home)
        hexes = store_of(tmp_path / "b", n=500, prefix="ab" * 13)  # 32 hex characters: embedder's own id shape
        idx.build(hexes, "pets", index_plan.BuildOptions(kind="flat"), home)
        assert c.post("/indexes/pets/reload").json()["reloaded"] is True
        loaded = c.app.state.engine.indexes["pets"]  # type: ignore[attr-defined]
        assert loaded._id_order is not None and loaded._id_digests is not None  # before any lookup
        new = "ab" * 13 + "000321"
        assert c.get(f"/items/pets/{new}").json()["id"] == new
        assert c.get("/items/pets/a000123").status_code == 404
        r = c.post("/search", json={"id": new, "k": 2, "index": "pets", "where": {"width": 10}})
        assert r.status_code == 200 and r.json()["results"][0][0]["id"] == new
    loaded = index_search.LoadedIndex("pets", home)  # the CLI and the API: made on the first lookup
    assert loaded.row_of(new) == 321 and loaded.row_of("ab" * 13 + "000500") is None


def test_the_cli_filters_on_a_store_column_and_names_a_missing_one_in_one_line(homes: dict[str, str]) -> None:
    """`embedder search --where` goes through the same LoadedIndex (per-query matching, no selectors)."""
    import json

    from typer.testing import CliRunner

    from embedder.cli import app

    runner = CliRunner()
    base = ["search", "disk", "--id", "v002500", "-k", "3", "--home", homes["home"], "--json"]
    r = runner.invoke(app, [*base, "--where", "width=30", "--where", "label=c0"])
    assert r.exit_code == 0, r.output
    hits = [json.loads(line) for line in r.output.splitlines() if line.startswith("{")]
    assert hits and all(h["label"] == "c0" for h in hits)
    r = runner.invoke(app, [*base, "--where", "colour=red"])
    assert r.exit_code == 2 and "cannot filter on 'colour'" in r.output and len(r.output.strip().splitlines()) == 1

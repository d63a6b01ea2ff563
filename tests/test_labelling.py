"""The labelling view of `embedder serve`: its routes over a real server (hostile names and files, ids
not in the selection, bad labels, concurrent changes, an atomic labels file), and the page in
headless Chromium, then the labels it wrote read as a labels file."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("fastapi", reason="the service extra is not installed: pip install 'embedder[serve]'")

from embedder.embed.fill import extract  # noqa: E402
from embedder.index import build as idx  # noqa: E402
from embedder.index import plan as index_plan  # noqa: E402
from embedder.io.uri import image_id  # noqa: E402
from embedder.models.builder import ModelSpec  # noqa: E402
from embedder.service import labelling as lab  # noqa: E402
from embedder.store.labels import read_labels  # noqa: E402
from tests.conftest import chromium_page, make_images  # noqa: E402


class Served:
    def __init__(self, url: str, home: Path, store: Path, images: list[Path]) -> None:
        self.url, self.home, self.store, self.images = url, home, store, images
        self.folder = home / "labelling"

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"content-type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def label(self, name: str, item_id: str, label: str | None) -> tuple[int, Any]:
        path = f"/labelling/{name}/labels/{urllib.parse.quote(item_id, safe='')}"
        return self.call("DELETE", path) if label is None else self.call("PUT", path, {"label": label})


def write_selection(path: Path, ids: list[str], paths: list[str] | None = None, why: list[str] | None = None) -> None:
    """A selection as `embedder select` writes it: id, path, rank (int32, 1 first), why, and its metadata."""
    n = len(ids)
    table = pa.table({"id": pa.array(ids, pa.string()), "path": pa.array(paths or [f"/x/{i}.jpg" for i in ids]),
                      "rank": pa.array(range(1, n + 1), pa.int32()),
                      "why": pa.array(why or [f"typical of a group of {n - r} images" for r in range(n)])})
    meta = {"store": "/stores/pets", "strategy": "typical", "budget": n, "seed": 0, "labelled": 0, "version": 1}
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.replace_schema_metadata({b"embedder.selection": json.dumps(meta).encode()}), path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One store, one index, one real `embedder serve` for the whole module."""
    root = tmp_path_factory.mktemp("labelling")
    images = []
    for p in make_images(root / "classes", {"cat": 6, "dog": 5}):  # one folder: a store without labels
        images.append(p.rename(root / p.name))
    store = root / "store"
    extract([str(root)], str(store), ModelSpec("tiny_test"))
    home = root / "home"
    idx.build(str(store), "pets", index_plan.BuildOptions(kind="flat"), str(home))
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "embedder", "serve", "--home", str(home), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=1) as r:
                if r.status == 200:
                    break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise AssertionError(proc.communicate()[1][-2000:]) from None
            time.sleep(0.1)
    try:
        yield Served(url, home, store, sorted(images))
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def test_routes_label_undo_and_progress(served: Served) -> None:
    ids = [image_id(p) for p in served.images]
    status, listing = served.call("GET", "/labelling")
    assert status == 200 and all(s["name"] != "round1" for s in listing)
    write_selection(served.folder / "round1.parquet", [*ids[:5], "not-in-the-index"],
                    [str(p) for p in served.images[:5]] + ["/gone.jpg"])
    status, page = served.call("GET", "/labelling/round1?index=pets")
    assert status == 200, page
    assert [i["id"] for i in page["items"]] == [*ids[:5], "not-in-the-index"]
    assert [i["rank"] for i in page["items"]] == [1, 2, 3, 4, 5, 6]
    assert [i["in_index"] for i in page["items"]] == [True] * 5 + [False] and page["not_in_index"] == 1
    assert page["progress"] == {"labelled": 0, "total": 6} and page["classes"] == []
    assert page["meta"]["strategy"] == "typical" and page["labels_file"].endswith("labelling/round1.labels.parquet")
    status, one = served.call("GET", "/labelling/round1?offset=4&limit=1")  # a page of it, no index
    assert status == 200 and [i["id"] for i in one["items"]] == [ids[4]] and one["items"][0]["in_index"] is None

    status, change = served.label("round1", ids[0], "  cat ")  # trimmed
    assert status == 200 and change["label"] == "cat" and change["previous"] is None
    assert change["progress"] == {"labelled": 1, "total": 6}
    status, change = served.label("round1", ids[0], "dog")
    assert (change["label"], change["previous"]) == ("dog", "cat")
    assert change["classes"] == [{"name": "dog", "count": 1}]
    served.label("round1", ids[1], "cat")
    served.label("round1", "not-in-the-index", "cat")
    status, change = served.label("round1", ids[1], None)  # undo of a first label
    assert status == 200 and change["label"] is None and change["previous"] == "cat"
    assert change["progress"] == {"labelled": 2, "total": 6}
    status, change = served.label("round1", ids[2], None)  # nothing to take away: nothing changes
    assert status == 200 and change["previous"] is None
    labels = read_labels(served.folder / "round1.labels.parquet")  # the project's reader takes the file
    assert dict(zip(labels.ids.to_pylist(), labels.labels.to_pylist())) == {ids[0]: "dog", "not-in-the-index": "cat"}
    written = pq.read_table(served.folder / "round1.labels.parquet")
    assert written.schema.names == ["id", "label", "labelled_at"]
    assert pa.types.is_timestamp(written.schema.field("labelled_at").type)
    status, listing = served.call("GET", "/labelling")
    assert {"name": "round1", "size": 6, "labelled": 2, "error": None} in listing
    status, page = served.call("GET", "/labelling/round1?index=pets")
    assert [i["label"] for i in page["items"]] == ["dog", None, None, None, None, "cat"]

    # not in the selection, bad labels, an unknown index: 4xx with the one error body
    status, err = served.label("round1", ids[7], "cat")
    assert status == 404 and "not in selection round1" in err["error"] and err["kind"] == "not_found"
    for bad in ("", "   ", "x" * 101, "a\nb", "tab\there", "rtl\u202eevil", "nul\x00"):
        status, err = served.label("round1", ids[3], bad)
        assert status == 422 and err["kind"] == "invalid", (bad, err)
    status, err = served.call("PUT", f"/labelling/round1/labels/{ids[3]}", {"label": 7})
    assert status == 422 and "label" in err["error"]
    status, err = served.call("PUT", f"/labelling/round1/labels/{ids[3]}", {})
    assert status == 422
    status, err = served.call("GET", "/labelling/round1?index=nope")
    assert status == 404 and "no index named 'nope'" in err["error"]
    status, err = served.call("GET", "/labelling/round1?limit=0")
    assert status == 422
    assert read_labels(served.folder / "round1.labels.parquet").ids.to_pylist() == [ids[0], "not-in-the-index"]


def test_hostile_names_and_files_are_4xx(served: Served, tmp_path: Path) -> None:
    folder = served.folder
    write_selection(folder / "ok.parquet", ["a/b", "c"])  # an id with a slash (a table's own ids)
    (folder / "junk.parquet").write_bytes(b"this is not parquet")
    pq.write_table(pa.table({"id": ["a"], "score": [1.0]}), folder / "norank.parquet")
    pq.write_table(pa.table({"id": ["a", "a"], "rank": [1, 2]}), folder / "twice.parquet")
    pq.write_table(pa.table({"id": ["a"], "rank": ["first"]}), folder / "textrank.parquet")
    n = lab.MAX_ROWS + 1
    pq.write_table(pa.table({"id": pa.array([str(i) for i in range(n)]), "rank": pa.array(range(n), pa.int32())}),
                   folder / "huge.parquet")
    outside = tmp_path / "elsewhere.parquet"
    write_selection(outside, ["a"])
    os.symlink(outside, folder / "escape.parquet")
    write_selection(folder / "broken.parquet", ["a"])
    (folder / "broken.labels.parquet").write_bytes(b"PAR1 half a file")

    status, listing = served.call("GET", "/labelling")
    by_name = {s["name"]: s for s in listing}
    assert status == 200 and by_name["ok"]["size"] == 2
    for name in ("junk", "norank", "twice", "textrank", "huge", "escape"):
        assert by_name[name]["size"] is None and by_name[name]["error"], name
    assert by_name["broken"]["size"] == 1 and by_name["broken"]["error"].startswith("labels file")
    assert "round1.labels" not in by_name and all(not n.startswith(".") for n in by_name)

    invalid = (422, "invalid selection name")
    expect = {"junk": (422, "not a Parquet file"), "norank": (422, "no rank column"),
              "twice": (422, "'a' is in it twice"), "textrank": (422, "not integers"),
              "huge": (413, "at most 100,000"), "escape": (422, "resolves outside"),
              "missing": (404, "no selection named 'missing'"), ".hidden": invalid, "ok.labels": invalid,
              "x" * 200: invalid, "caf%C3%A9": invalid, "..": invalid, "..%2F..%2Fetc%2Fpasswd": (404, ""),
              "%2Fetc%2Fpasswd": (404, "")}
    for name, (code, words) in expect.items():
        status, err = served.call("GET", f"/labelling/{name}")
        assert status == code and words in err["error"], (name, status, err)
        status, err = served.call("PUT", f"/labelling/{name}/labels/a", {"label": "cat"})
        assert status in (code, 405) and "error" in err, (name, status, err)  # '..' and friends: no such route
    assert not (tmp_path / "elsewhere.labels.parquet").exists() and not (folder / "escape.labels.parquet").exists()

    status, err = served.label("broken", "a", "cat")  # a labels file that cannot be read is never overwritten
    assert status == 409 and "left as it is" in err["error"]
    assert (folder / "broken.labels.parquet").read_bytes() == b"PAR1 half a file"
    status, change = served.label("ok", "a/b", "cat")
    assert status == 200 and change["id"] == "a/b"
    assert read_labels(folder / "ok.labels.parquet").ids.to_pylist() == ["a/b"]


def test_concurrent_changes_lose_nothing_and_the_file_is_never_partial(served: Served) -> None:
    """8 threads label 240 items at once (and relabel some); a reader reading the file throughout
    never meets a partial one, and never sees fewer labels than before."""
    ids = [f"item-{i:03d}" for i in range(240)]
    write_selection(served.folder / "busy.parquet", ids)
    labels_file = served.folder / "busy.labels.parquet"
    stop = threading.Event()
    seen: list[int] = []
    failures: list[str] = []

    def reader() -> None:  # as `probe --labels` reads it (pq.read_table(PATH) is no good reader here:
        while not stop.is_set():  # it takes the size of one file and the bytes of its replacement)
            if labels_file.exists():
                try:
                    seen.append(len(read_labels(labels_file)))
                except Exception as e:  # noqa: BLE001 - any failure to read is the defect
                    failures.append(repr(e))

    def work(chunk: list[str]) -> list[int]:
        codes = [served.label("busy", i, f"class-{int(i[-3:]) % 3}")[0] for i in chunk]
        codes += [served.label("busy", i, "relabelled")[0] for i in chunk[:3]]
        return codes

    t = threading.Thread(target=reader)
    t.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            codes = [c for cs in pool.map(work, [ids[k::8] for k in range(8)]) for c in cs]
    finally:
        stop.set()
        t.join()
    assert codes == [200] * len(codes)
    got = read_labels(labels_file)
    assert len(got) == 240 and sorted(got.ids.to_pylist()) == ids
    final = dict(zip(got.ids.to_pylist(), got.labels.to_pylist()))
    assert sum(v == "relabelled" for v in final.values()) == 24
    assert failures == [] and len(seen) > 5 and seen == sorted(seen), (failures, seen[:20])
    status, page = served.call("GET", "/labelling/busy?limit=1")
    assert page["progress"] == {"labelled": 240, "total": 240}
    assert {c["name"]: c["count"] for c in page["classes"]} == {"class-0": 72, "class-1": 72, "class-2": 72,
                                                                  "relabelled": 24}


def test_the_api_key_guards_labelling(served: Served) -> None:
    from fastapi.testclient import TestClient

    from embedder.service.app import create_app
    from embedder.service.options import ServeOptions

    client = TestClient(create_app(ServeOptions(home=str(served.home), poll_seconds=0), api_key="s3cret"))
    assert client.get("/labelling").status_code == 401  # no lifespan: no index loaded, no model
    assert client.put("/labelling/round1/labels/x", json={"label": "cat"}).status_code == 401
    assert client.get("/labelling", headers={"X-API-Key": "s3cret"}).status_code == 200
    spec = client.get("/openapi.json").json()  # at /docs, with the key required
    assert spec["paths"]["/labelling/{name}/labels/{item_id}"]["put"]["security"]
    assert client.get("/static/label.js").status_code == 200  # the page's assets need no key


def test_labelling_page_in_headless_chromium(served: Served, tmp_path: Path) -> None:
    """The user's loop on a store without labels: `embedder select` into the home, then in the page
    label by typed new classes and by key, undo one, skip one, reload (the labels and the progress are
    the server's); text from a selection is shown as text; then `embedder probe --labels` on the file."""
    from typer.testing import CliRunner

    from embedder.cli import app

    r = CliRunner().invoke(app, ["select", str(served.store), "--budget", "8", "--out",
                                 str(served.folder / "loop.parquet")])
    assert r.exit_code == 0, r.output
    picks = pq.read_table(served.folder / "loop.parquet").sort_by("rank").to_pylist()
    truth = [Path(p["path"]).name.split("_")[0] for p in picks]  # cat_0003.jpg: a cat
    hostile = "<img src=x onerror=window.__pwned=1>"
    write_selection(served.folder / "hostile.parquet", [f"<b>{hostile}</b>"], why=[hostile])
    write_selection(served.folder / "big.parquet", [f"elsewhere-{i}" for i in range(1200)])
    tiles = "#lab-grid .tile"
    with chromium_page() as (page, errors):
        page.goto(served.url + "/#label/loop")
        page.wait_for_function(f"() => document.querySelectorAll('{tiles}').length === 8")
        assert page.inner_text("#lab-count") == "0 / 8 labelled"
        assert page.get_attribute(f"{tiles}.current", "data-id") == picks[0]["id"]
        assert page.is_hidden("#search-view") and page.is_visible("#label-view")
        page.wait_for_function(f"() => [...document.querySelectorAll('{tiles} img')].every("
                               "i => i.complete && i.naturalWidth > 0)")  # the thumbnails, by id

        def labels_shown() -> list[str]:
            return page.eval_on_selector_all(f"{tiles} .label", "ls => ls.map(l => l.textContent)")

        def wait_count(n: int) -> None:
            page.wait_for_function(f"() => document.querySelector('#lab-count').textContent === '{n} / 8 labelled'")

        classes: list[str] = []

        def label_current(pos: int) -> None:  # as a person would: a new class typed, a known one by its key
            assert page.get_attribute(f"{tiles}.current", "data-id") == picks[pos]["id"]
            if truth[pos] in classes:
                page.keyboard.press(str(classes.index(truth[pos]) + 1))
            else:
                classes.append(truth[pos])
                page.fill("#lab-new-class", truth[pos])
                page.press("#lab-new-class", "Enter")

        for pos in range(6):
            label_current(pos)
        wait_count(6)
        assert len(classes) == 2 and page.eval_on_selector_all(
            "#lab-classes .class kbd", "ks => ks.map(k => k.textContent)") == ["1", "2"]
        page.keyboard.press("Control+z")  # undo the last: the sixth image unlabelled, and current again
        wait_count(5)
        page.wait_for_function(f"() => document.querySelector('{tiles}.current')?.dataset.id === '{picks[5]['id']}'")
        page.keyboard.press("ArrowRight")  # skip it
        label_current(6)
        wait_count(6)
        expected = [*truth[:5], "—", truth[6], "—"]
        assert labels_shown() == expected
        page.fill("#lab-new-class", "rtl\u202eevil")  # refused by the server: put back, and said why
        page.press("#lab-new-class", "Enter")
        page.wait_for_selector("#error:not([hidden])")
        assert "control character" in page.inner_text("#error") and labels_shown() == expected
        assert page.eval_on_selector_all("#lab-classes .class", "cs => cs.length") == 2
        assert page.get_attribute(f"{tiles}.current", "data-id") == picks[7]["id"]

        page.reload()  # the labels are the server's
        page.wait_for_function(f"() => document.querySelectorAll('{tiles}').length === 8")
        wait_count(6)
        assert labels_shown() == expected
        assert page.get_attribute(f"{tiles}.current", "data-id") == picks[5]["id"]  # the first without a label
        assert page.evaluate("() => document.querySelector('progress').value") == 6

        page.select_option("#lab-selection", "big")  # a page at a time; ids the index lacks are said
        page.wait_for_function(f"() => document.querySelectorAll('{tiles}').length === 1000")
        assert "1000 of these images are not in index pets" in page.inner_text("#lab-note")
        page.click("#lab-more")
        page.wait_for_function(f"() => document.querySelectorAll('{tiles}').length === 1200")
        assert page.is_hidden("#lab-more") and page.inner_text("#lab-count") == "0 / 1200 labelled"

        page.select_option("#lab-selection", "hostile")  # its id and why are shown as text, never as HTML
        page.wait_for_function(f"() => document.querySelectorAll('{tiles}').length === 1")
        assert page.eval_on_selector(f"{tiles} .why", "w => w.textContent") == hostile
        assert page.get_attribute(tiles, "data-id") == f"<b>{hostile}</b>"
        assert page.evaluate("() => window.__pwned === undefined && !document.querySelector('#lab-grid b')")
        assert errors == []

    labels_file = served.folder / "loop.labels.parquet"
    got = read_labels(labels_file)
    assert dict(zip(got.ids.to_pylist(), got.labels.to_pylist())) == {
        picks[i]["id"]: truth[i] for i in (0, 1, 2, 3, 4, 6)}
    # what was just labelled, into the probe: the store has no labels of its own
    r = CliRunner().invoke(app, ["probe", str(served.store), "--labels", str(labels_file), "--out",
                                 str(tmp_path / "pets.probe"), "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["labels"]["used"] == 6 and result["labels"]["unknown"] == 0


def test_hostile_labels_files_and_links_are_4xx_and_never_followed(served: Served, tmp_path: Path) -> None:
    """A labels file that is a folder (Parquet would read it as a dataset), a temporary file or a lock
    planted as a link to a file elsewhere, invisible labels: 4xx or refused, nothing written outside."""
    folder = served.folder
    write_selection(folder / "planted.parquet", ["a", "b", "c"])
    (folder / "planted.labels.parquet").mkdir()  # a folder holding a labels file
    pq.write_table(pa.table({"id": ["a"], "label": ["planted"]}), folder / "planted.labels.parquet" / "part.parquet")
    for method, body in (("GET", None), ("PUT", {"label": "cat"}), ("DELETE", None)):
        path = "/labelling/planted" if method == "GET" else "/labelling/planted/labels/b"
        status, err = served.call(method, path, body)
        assert status == 409 and "is not a file" in err["error"], (method, status, err)
    assert [p.name for p in (folder / "planted.labels.parquet").iterdir()] == ["part.parquet"]
    (folder / "planted.labels.parquet" / "part.parquet").unlink()
    (folder / "planted.labels.parquet").rmdir()

    write_selection(folder / "linked.parquet", ["a", "b"])
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.symlink(victim, folder / ".linked.labels.parquet.tmp")  # the temporary file's old, fixed name
    os.symlink(tmp_path / "made-by-the-lock", folder / ".linked.lock")
    status, change = served.label("linked", "b", "cat")
    assert status == 200 and change["label"] == "cat", change
    assert victim.read_text() == "precious" and not (tmp_path / "made-by-the-lock").exists()
    labels_file = folder / "linked.labels.parquet"
    assert labels_file.is_file() and not labels_file.is_symlink()
    assert read_labels(labels_file).ids.to_pylist() == ["b"] and oct(labels_file.stat().st_mode & 0o777) == "0o644"
    assert not [p for p in folder.iterdir() if p.name.startswith(".linked.labels.parquet.") and not p.is_symlink()]

    for bad in ("\u200b", "\ufeff", "cat\u200b", "cat\u200f", "\u2060dog", "\u00ad", "\u0301"):  # invisible
        status, err = served.label("linked", "a", bad)
        assert status == 422 and err["kind"] == "invalid", (bad, err)
    for good in ("\U0001f408\u200d\u2b1b cat", "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645", "caf\u0065\u0301"):
        status, change = served.label("linked", "a", good)  # an emoji sequence, a Persian word (ZWNJ), é
        assert status == 200 and change["label"] == good, (good, change)


def test_a_label_that_cannot_be_written_is_503_and_changes_nothing(served: Served) -> None:
    """A full disk (here: a file-size limit the labels file would pass) or a read-only home: 503 with
    the one error body, the labels as they were, and the server answers the next request."""
    resource = pytest.importorskip("resource")
    from fastapi.testclient import TestClient

    from embedder.service.app import create_app
    from embedder.service.options import ServeOptions

    write_selection(served.folder / "full.parquet", ["a", "b"])
    client = TestClient(create_app(ServeOptions(home=str(served.home), poll_seconds=0)))
    assert client.put("/labelling/full/labels/a", json={"label": "cat"}).status_code == 200
    before = (served.folder / "full.labels.parquet").read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200, hard))  # Python ignores SIGXFSZ: writes fail, EFBIG
    try:
        r = client.put("/labelling/full/labels/b", json={"label": "dog"})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert r.status_code == 503 and r.json()["kind"] == "cannot_write" and "not changed" in r.json()["error"], r.text
    assert (served.folder / "full.labels.parquet").read_bytes() == before
    assert not [p for p in served.folder.iterdir() if p.name.startswith(".full.labels.parquet")]
    page = client.get("/labelling/full").json()
    assert page["progress"] == {"labelled": 1, "total": 2} and [i["label"] for i in page["items"]] == ["cat", None]


def test_a_malformed_address_opens_the_first_selection(served: Served) -> None:
    """#label/%E0%A4 (a link cut short): the page opens a selection, no script error."""
    write_selection(served.folder / "aaa-first.parquet", ["x", "y"])
    with chromium_page() as (page, errors):
        page.goto(served.url + "/#label/%E0%A4%A")
        page.wait_for_function("() => document.querySelectorAll('#lab-grid .tile').length > 0")
        assert errors == [] and page.is_visible("#label-view")

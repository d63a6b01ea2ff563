"""`embedder serve`: every endpoint and bad input through FastAPI's TestClient, a real uvicorn
process over HTTP, hot reload under load, and the web page in headless Chromium."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the service extra is not installed: pip install 'embedder[serve]'")
from fastapi.testclient import TestClient  # noqa: E402

from embedder.embed.fill import extract  # noqa: E402
from embedder.index import build as idx  # noqa: E402
from embedder.index import generations as index_generations
from embedder.index import plan as index_plan
from embedder.io.uri import image_id  # noqa: E402
from embedder.models.builder import ModelSpec  # noqa: E402
from embedder.service.app import create_app  # noqa: E402
from embedder.service.options import ServeOptions  # noqa: E402
from tests.conftest import chromium_page, make_images  # noqa: E402


@pytest.fixture
def served(image_tree: Path, tmp_path: Path) -> tuple[str, Path]:
    store = str(tmp_path / "store")
    extract([str(image_tree)], store, ModelSpec("tiny_test"))
    home = str(tmp_path / "home")
    idx.build(store, "pets", index_plan.BuildOptions(kind="flat"), home)
    return home, image_tree


def _client(home: str, **kw) -> TestClient:
    api_key = kw.pop("api_key", None)
    app = create_app(ServeOptions(home=home, poll_seconds=kw.pop("poll_seconds", 0), **kw), api_key=api_key)
    return TestClient(app)


def _wait_ready(client: TestClient, headers: dict | None = None) -> None:
    for _ in range(200):
        if client.get("/readyz", headers=headers or {}).status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError("service never became ready")


def _jpeg(path: Path) -> bytes:
    return path.read_bytes()


def test_endpoints(served: tuple[str, Path]) -> None:
    home, images = served
    cat = images / "cat" / "cat_0001.jpg"
    with _client(home) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        _wait_ready(c)
        listing = c.get("/indexes").json()
        assert [i["name"] for i in listing] == ["pets"] and listing[0]["count"] == 11
        info = c.get("/indexes/pets").json()
        assert info["labels"] == ["cat", "dog"] and info["quality"]["recall_at_10"] == 1.0
        assert info["quality"]["exact"] is True and "not_measured" not in info["quality"]  # 11 images: flat
        assert info["provenance"]["backbone"] == "tiny_test" and info["image_queries"] is True
        # image upload: the image itself comes first
        r = c.post("/search", files={"file": ("q.jpg", _jpeg(cat), "image/jpeg")}, data={"index": "pets", "k": "3"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["index"] == "pets" and body["generation"] == 1
        first = body["results"][0][0]
        assert first["id"] == image_id(cat) and first["score"] == pytest.approx(1.0, abs=1e-4)
        assert len(body["results"][0]) == 3
        # filter: always k results when k rows match
        r = c.post("/search", files={"file": ("q.jpg", _jpeg(cat), "image/jpeg")},
                   data={"index": "pets", "k": "4", "where": json.dumps({"label": "dog"})})
        assert [h["label"] for h in r.json()["results"][0]] == ["dog"] * 4
        # JSON: by id, by vector, a batch of both (the index is the only one: may be omitted)
        r = c.post("/search", json={"id": first["id"], "k": 2})
        assert r.json()["results"][0][0]["id"] == first["id"]
        r = c.post("/search", json={"id": first["id"], "k": 3, "where": {"width": 48, "label": "dog"}})
        assert r.status_code == 200 and [h["label"] for h in r.json()["results"][0]] == ["dog"] * 3  # store column
        emb = c.post("/embed", files={"file": ("q.jpg", _jpeg(cat), "image/jpeg")}).json()
        assert emb["dim"] == 32 and len(emb["vector"]) == 32 and emb["provenance"]["backbone"] == "tiny_test"
        batch = [{"vector": emb["vector"]}, {"id": first["id"]}]
        r = c.post("/search", json={"index": "pets", "k": 1, "queries": batch})
        assert [res[0]["id"] for res in r.json()["results"]] == [first["id"]] * 2
        # items: metadata, the file itself, a bounded thumbnail
        item = c.get(f"/items/pets/{first['id']}").json()
        assert item["path"] == str(cat) and item["label"] == "cat"
        assert c.get(f"/items/pets/{first['id']}/image").content == cat.read_bytes()
        thumb = Image.open(io.BytesIO(c.get(f"/items/pets/{first['id']}/thumbnail").content))
        assert thumb.format == "JPEG" and max(thumb.size) <= 256
        metrics = c.get("/metrics").text
        assert 'embedder_requests_total{endpoint="/search",status="200"}' in metrics
        assert 'embedder_stage_seconds_count{stage="embed"}' in metrics and "embedder_batch_size" in metrics
        assert c.get("/docs").status_code == 200 and "SearchIn" in c.get("/openapi.json").text
        assert "<title>embedder" in c.get("/").text and c.get("/static/app.js").status_code == 200


def test_bad_input_is_4xx_json_and_the_server_keeps_serving(served: tuple[str, Path], tmp_path: Path) -> None:
    home, images = served
    cat = images / "cat" / "cat_0001.jpg"
    big = tmp_path / "big.png"
    Image.new("RGB", (400, 400), (1, 2, 3)).save(big)
    with _client(home, max_upload_bytes=64 * 1024, max_pixels=100_000) as c:
        _wait_ready(c)
        noise = os.urandom(200_000)
        cases = [
            (c.post("/search", files={"file": ("x.jpg", b"not an image", "image/jpeg")}), 422, "not_an_image"),
            (c.post("/search", files={"file": ("x.bin", noise, "image/jpeg")}), 413, "too_large"),
            (c.post("/search", files={"file": ("big.png", big.read_bytes(), "image/png")}), 422, "not_an_image"),
            (c.post("/search", content=b"{not json", headers={"content-type": "application/json"}), 400, "bad_query"),
            (c.post("/search", json={"vector": [0.1] * 7}), 400, "bad_query"),
            (c.post("/search", json={"vector": ["a"]}), 400, "bad_query"),
            (c.post("/search", json={"id": "x", "k": 0}), 400, "bad_query"),
            (c.post("/search", files={"file": ("q.jpg", _jpeg(cat), "image/jpeg")}, data={"k": "many"}), 400,
             "bad_query"),
            (c.post("/search", json={"index": "nope", "id": "x"}), 404, "not_found"),
            (c.post("/search", json={"id": "no-such-id"}), 404, "not_found"),
            (c.post("/search", json={"id": image_id(cat), "where": {"colour": "red"}}), 400, "bad_query"),
            (c.post("/search", json={"index": "../etc", "id": "x"}), 400, "bad_query"),
            (c.post("/search", json={}), 400, "bad_query"),
            (c.get("/indexes/nope"), 404, "not_found"),
            (c.get("/items/pets/no-such-id/image"), 404, "not_found"),
            (c.get("/items/pets/..%2F..%2Fetc%2Fpasswd/image"), 404, "not_found"),
            (c.get("/items/..%2Fhome/x"), 404, None),
        ]
        for r, status, kind in cases:
            assert r.status_code == status, (r.request.url, r.text)
            if kind:
                assert r.json()["kind"] == kind and r.json()["error"], r.text
        r = c.post("/search", files={"file": ("q.jpg", _jpeg(cat), "image/jpeg")})
        assert r.status_code == 200 and r.json()["results"][0][0]["id"] == image_id(cat)
        assert 'embedder_errors_total{kind="not_found"}' in c.get("/metrics").text


def test_api_key(served: tuple[str, Path]) -> None:
    home, _ = served
    with _client(home, api_key="s3cret") as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/indexes").status_code == 401 and c.get("/indexes").json()["kind"] == "unauthorised"
        assert c.get("/indexes", headers={"x-api-key": "wrong"}).status_code == 401
        _wait_ready(c, {"x-api-key": "s3cret"})
        assert c.get("/indexes", headers={"x-api-key": "s3cret"}).status_code == 200
        assert c.get("/indexes", headers={"authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/metrics").status_code == 401


def test_micro_batching_answers_like_one_at_a_time(served: tuple[str, Path]) -> None:
    """Concurrent image queries are batched (batch sizes > 1 observed) with the same answers."""
    home, images = served
    paths = sorted(images.rglob("*.jpg"))
    answers = {}
    for batching in (False, True):
        with _client(home, micro_batching=batching, batch_window_ms=50) as c:
            _wait_ready(c)

            def ask(p: Path) -> list[str]:
                r = c.post("/search", files={"file": ("q.jpg", p.read_bytes(), "image/jpeg")}, data={"k": "3"})
                assert r.status_code == 200, r.text
                return [h["id"] for h in r.json()["results"][0]]

            with ThreadPoolExecutor(8) as pool:
                answers[batching] = list(pool.map(ask, paths))
            sizes = c.get("/metrics").text
            batches = float(sizes.split("embedder_batch_size_count ")[1].split()[0])
            assert (batches < len(paths)) == batching  # fewer batches than queries only when batching
    assert answers[True] == answers[False]


def test_new_generation_is_picked_up_without_failing_a_request(served: tuple[str, Path], tmp_path: Path) -> None:
    home, images = served
    more = tmp_path / "more"
    make_images(more, {"bird": 6}, seed=3)
    store = str(tmp_path / "store")
    extract([str(more)], store, ModelSpec("tiny_test"))  # same store: 11 + 6 rows
    q = (images / "cat" / "cat_0001.jpg").read_bytes()
    with _client(home, poll_seconds=0.1) as c:
        _wait_ready(c)
        stop = threading.Event()
        statuses: list[int] = []
        generations: set[int] = set()

        def hammer() -> None:
            while not stop.is_set():
                r = c.post("/search", files={"file": ("q.jpg", q, "image/jpeg")}, data={"k": "2"})
                statuses.append(r.status_code)
                if r.status_code == 200:
                    generations.add(r.json()["generation"])

        t = threading.Thread(target=hammer)
        t.start()
        time.sleep(0.3)
        idx.add("pets", store, home)
        deadline = time.time() + 10
        while time.time() < deadline and c.get("/indexes/pets").json()["generation"] != 2:
            time.sleep(0.05)
        time.sleep(0.3)
        stop.set()
        t.join()
        assert c.get("/indexes/pets").json()["count"] == 17
        assert set(statuses) == {200} and generations == {1, 2}, (set(statuses), generations)
        r = c.post("/indexes/pets/reload")
        assert r.json() == {"name": "pets", "generation": 2, "reloaded": False}


def test_a_drop_and_rebuild_is_a_new_generation_for_the_service(served: tuple[str, Path], tmp_path: Path) -> None:
    """The rebuilt index restarts at gen-000001: the service must still see that it changed."""
    home, images = served
    more = tmp_path / "more"
    make_images(more, {"bird": 4}, seed=3)
    store2 = str(tmp_path / "store2")
    extract([str(more)], store2, ModelSpec("tiny_test"))
    with _client(home) as c:
        _wait_ready(c)
        assert c.get("/indexes/pets").json()["count"] == 11
        index_generations.drop("pets", home)
        idx.build(store2, "pets", index_plan.BuildOptions(kind="flat"), home)
        assert index_generations.info("pets", home)["generation"] == 1  # the same number as the served one
        r = c.post("/indexes/pets/reload")
        assert r.json() == {"name": "pets", "generation": 1, "reloaded": True}, r.text
        assert c.get("/indexes/pets").json()["count"] == 4


def test_a_broken_generation_is_read_once_not_at_every_poll(served: tuple[str, Path],
                                                           caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from embedder.service.engine import Engine

    home, _ = served
    engine = Engine(ServeOptions(home=home, poll_seconds=0))
    engine.load_all()
    gen = next((Path(home) / "pets").glob("gen-*"))
    (gen / "index.faiss").write_bytes(b"garbage")
    meta = json.loads((gen / "index.json").read_text())
    (gen / "index.json").write_text(json.dumps({**meta, "build_id": "broken-copy"}))  # a new identity
    with caplog.at_level(logging.WARNING, logger="embedder.service.engine"):
        for _ in range(5):
            assert engine.reload() == {}
    warnings = [r for r in caplog.records if "not loaded" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    assert engine.index("pets").ids.num_rows == 11  # the previous generation still answers
    engine.close()


def test_over_limit_bodies_are_413_with_or_without_a_content_length(served: tuple[str, Path]) -> None:
    """A chunked upload (no Content-Length) over --max-upload-mb is counted as it arrives: 413 with the
    JSON body, never a 500 from an exception a middleware wrapped."""
    home, images = served
    cat = (images / "cat" / "cat_0001.jpg").read_bytes()
    limit = 64 * 1024
    with _client(home, max_upload_bytes=limit) as c:
        _wait_ready(c)
        boundary = "x0x0x0"
        part = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"q.jpg\"\r\n"
                "Content-Type: image/jpeg\r\n\r\n").encode()

        def multipart():  # type: ignore[no-untyped-def]
            yield part
            for _ in range(40):
                yield os.urandom(4096)
            yield f"\r\n--{boundary}--\r\n".encode()

        def big_json():  # type: ignore[no-untyped-def]
            yield b'{"queries": ['
            for _ in range(3000):
                yield b'{"vector": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]},'
            yield b'{"id": "x"}]}'

        for body, ctype in ((multipart(), f"multipart/form-data; boundary={boundary}"),
                            (big_json(), "application/json")):
            r = c.post("/search", content=body, headers={"content-type": ctype})
            assert "content-length" not in {k.lower() for k in r.request.headers}
            assert r.status_code == 413, r.text
            assert r.json() == {"error": "request body over 0.0625 MiB", "kind": "too_large"}
        ok = c.post("/search", files={"file": ("q.jpg", cat, "image/jpeg")})  # and the server goes on
        assert ok.status_code == 200


def test_api_key_guards_the_api_not_the_page(served: tuple[str, Path]) -> None:
    home, _ = served
    key = {"x-api-key": "s3cret"}
    with _client(home, api_key="s3cret") as c:
        _wait_ready(c)
        for public in ("/", "/static/app.js", "/static/style.css", "/docs", "/openapi.json", "/healthz", "/readyz"):
            assert c.get(public).status_code == 200, public
        assert "indexes" not in c.get("/readyz").json()  # index names are the API's to tell
        for private in ("/indexes", "/indexes/pets", "/metrics", "/items/pets/x"):
            r = c.get(private)
            assert r.status_code == 401 and r.json()["kind"] == "unauthorised", private
        assert c.post("/search", json={"id": "x"}).status_code == 401
        assert c.get("/indexes", headers=key).status_code == 200
        assert c.get("/indexes", headers={"authorization": "Bearer s3cret"}).status_code == 200
        spec = c.get("/openapi.json").json()
        schemes = spec["components"]["securitySchemes"]
        assert {s["type"] for s in schemes.values()} == {"apiKey", "http"}
        assert spec["paths"]["/search"]["post"]["security"] and "security" not in spec["paths"]["/healthz"]["get"]
    with _client(home) as c:  # no key: no security in the OpenAPI either
        _wait_ready(c)
        assert "securitySchemes" not in c.get("/openapi.json").json().get("components", {})
        assert c.get("/readyz").json()["indexes"] == ["pets"]


def test_docs_page_works_offline(served: tuple[str, Path]) -> None:
    home, _ = served
    with _client(home) as c:
        html = c.get("/docs").text
        assert "cdn." not in html and "/docs-assets/swagger-ui-bundle.js" in html
        js = c.get("/docs-assets/swagger-ui-bundle.js")
        assert js.status_code == 200 and len(js.content) > 100_000
        assert c.get("/docs-assets/swagger-ui.css").status_code == 200


def test_query_caps_zero_vectors_and_clear_messages(served: tuple[str, Path]) -> None:
    home, images = served
    cat_id = image_id(images / "cat" / "cat_0001.jpg")
    with _client(home, max_queries=50, max_results=400) as c:
        _wait_ready(c)
        dim = c.get("/indexes/pets").json()["dim"]

        def err(body: dict) -> tuple[int, str]:  # type: ignore[type-arg]
            r = c.post("/search", json=body)
            return r.status_code, r.json()["error"]

        assert err({"queries": [{"id": cat_id}] * 51}) == (400, "at most 50 queries per request, got 51: send "
                                                           "them in several")
        status, msg = err({"queries": [{"id": cat_id}] * 41, "k": 10})
        assert status == 400 and "k × queries is 410" in msg
        assert c.post("/search", json={"queries": [{"id": cat_id}] * 40, "k": 10}).status_code == 200
        status, msg = err({"vector": [0.0] * dim})
        assert status == 400 and "all zeros" in msg
        status, msg = err({"id": cat_id, "vector": [0.1] * dim})
        assert status == 400 and "not several" in msg
        status, msg = err({"id": cat_id, "where": {"label": ["cat", "dog"]}})
        assert status == 400 and "must be a string, number or boolean, got list" in msg
        r = c.post("/search", files={"file": ("q.jpg", b"x", "image/jpeg")}, data={"where": '{"label": ["cat"]}'})
        assert r.status_code == 400 and "got list" in r.json()["error"]
        long_id = "x" * 100_000
        r = c.post("/search", json={"id": long_id})
        assert r.status_code == 404 and len(r.content) < 500, len(r.content)
        r = c.get(f"/indexes/{'y' * 5000}")
        assert r.status_code in (400, 404) and len(r.content) < 500


def test_search_by_id_can_leave_the_query_item_out(served: tuple[str, Path]) -> None:
    home, images = served
    cat_id = image_id(images / "cat" / "cat_0001.jpg")
    with _client(home) as c:
        _wait_ready(c)
        hits = c.post("/search", json={"id": cat_id, "k": 3}).json()["results"][0]
        assert hits[0]["id"] == cat_id
        out = c.post("/search", json={"id": cat_id, "k": 3, "exclude_self": True}).json()["results"][0]
        assert [h["id"] for h in out] == [h["id"] for h in c.post("/search", json={"id": cat_id, "k": 4}).json()
                                          ["results"][0][1:]]
        assert [h["rank"] for h in out] == [1, 2, 3]


def test_head_requests_and_index_gauges(served: tuple[str, Path]) -> None:
    home, _ = served
    with _client(home) as c:
        _wait_ready(c)
        for path in ("/", "/healthz", "/readyz"):
            assert c.head(path).status_code == 200, path
        metrics = c.get("/metrics").text
        assert 'embedder_index_generation{index="pets"} 1.0' in metrics
        assert 'embedder_index_vectors{index="pets"} 11.0' in metrics
        assert "embedder_in_flight_requests 1.0" in metrics  # the scrape itself


def test_indexes_that_differ_only_in_normalisation_get_their_own_query_model(image_tree: Path,
                                                                             tmp_path: Path) -> None:
    from embedder.embed.options import EmbedOptions

    home = str(tmp_path / "home")
    for norm in ("none", "l2"):
        store = str(tmp_path / f"store-{norm}")
        extract([str(image_tree)], store, ModelSpec("tiny_test"), EmbedOptions(normalize=norm))
        idx.build(store, norm, index_plan.BuildOptions(kind="flat", metric="l2"), home)
    cat = (image_tree / "cat" / "cat_0001.jpg").read_bytes()
    with _client(home) as c:
        _wait_ready(c)
        for norm in ("none", "l2"):
            e = c.post("/embed", files={"file": ("q.jpg", cat, "image/jpeg")}, data={"index": norm}).json()
            assert e["provenance"]["normalize"] == norm
            length = float(sum(v * v for v in e["vector"]) ** 0.5)
            assert (abs(length - 1.0) < 1e-4) == (norm == "l2"), (norm, length)
            r = c.post("/search", files={"file": ("q.jpg", cat, "image/jpeg")}, data={"index": norm, "k": "1"})
            assert r.json()["results"][0][0]["score"] == pytest.approx(0.0, abs=1e-4), (norm, r.json())


def test_id_queries_do_not_wait_behind_a_forward_pass(served: tuple[str, Path]) -> None:
    """Order, not speed: while an image query's forward pass is held for a second, an id query is
    answered (it has its own batcher and thread)."""
    home, images = served
    cat = (images / "cat" / "cat_0001.jpg").read_bytes()
    cat_id = image_id(images / "cat" / "cat_0001.jpg")
    with _client(home) as c:
        _wait_ready(c)
        engine = c.app.state.engine  # type: ignore[attr-defined]
        real = engine.embed_images
        started = threading.Event()

        def held(*a, **kw):  # type: ignore[no-untyped-def]
            started.set()
            time.sleep(1.5)
            return real(*a, **kw)

        engine.embed_images = held
        done: dict[str, float] = {}

        def image() -> None:
            c.post("/search", files={"file": ("q.jpg", cat, "image/jpeg")})
            done["image"] = time.monotonic()

        t = threading.Thread(target=image)
        t.start()
        assert started.wait(10)
        r = c.post("/search", json={"id": cat_id, "k": 2})
        done["id"] = time.monotonic()
        t.join()
        assert r.status_code == 200 and done["id"] < done["image"]


def _wait_served(url: str, proc: subprocess.Popen) -> None:  # type: ignore[type-arg]
    """Until a real `embedder serve` answers /readyz; its stderr if it never does."""
    import urllib.request

    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError(proc.communicate()[1][-2000:])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def server(served: tuple[str, Path]):  # type: ignore[no-untyped-def]
    home, images = served
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "embedder", "serve", "--home", home, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    _wait_served(url, proc)
    try:
        yield url, home, images
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


@pytest.mark.slow
def test_real_server_and_cli_client(server) -> None:  # type: ignore[no-untyped-def]
    url, home, images = server
    cat = images / "cat" / "cat_0001.jpg"
    r = subprocess.run([sys.executable, "-m", "embedder", "search", "pets", str(cat), "-k", "2", "--server", url,
                        "--json"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    hits = [json.loads(line) for line in r.stdout.splitlines()]
    assert hits[0]["id"] == image_id(cat) and hits[0]["query"] == str(cat) and len(hits) == 2
    r = subprocess.run([sys.executable, "-m", "embedder", "search", "nope", str(cat), "--server", url],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("error: server said 404")


def test_serve_logs_each_request_and_each_line_once(served: tuple[str, Path]) -> None:
    """A request log (uvicorn's access lines, which `--log-level warning` hid), and no line twice (a
    library's bare `logging.warning` used to install a second handler on the root logger)."""
    code = ("import logging; from embedder.cli.common import setup_logging; setup_logging(False); "
            "logging.warning('a library warns'); logging.getLogger('embedder.service').warning('said once')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stderr.count("said once") == 1, r.stderr
    home, _ = served
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "embedder", "serve", "--home", home, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_served(f"http://127.0.0.1:{port}", proc)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/indexes/pets", timeout=10) as resp:
        assert resp.status == 200
    proc.terminate()
    out, err = proc.communicate(timeout=30)
    assert '"GET /indexes/pets HTTP/1.1" 200' in out, (out, err)


@pytest.mark.slow
def test_web_page_in_headless_chromium(server) -> None:  # type: ignore[no-untyped-def]
    """Drop an image on the page, see the grid with the image itself first, click a result to
    search by it."""
    url, _, images = server
    cat = images / "cat" / "cat_0002.jpg"
    import base64

    with chromium_page() as (page, errors):
        page.goto(url + "/")
        page.wait_for_selector("#index option", state="attached")
        page.wait_for_function("() => document.querySelector('#info').textContent.includes('recall')")
        assert "exact search: recall@10 1.000 by construction" in page.inner_text("#info")  # 11 images: flat
        # a CNN's index: the text box says why it cannot be used, rather than failing on Enter
        assert page.is_disabled("#text") and "CLIP" in (page.get_attribute("#text", "placeholder") or "")
        data = base64.b64encode(cat.read_bytes()).decode()
        transfer = page.evaluate_handle(
            """(b64) => { const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
                 const dt = new DataTransfer();
                 dt.items.add(new File([bytes], "cat.jpg", {type: "image/jpeg"})); return dt; }""", data)
        page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
        page.wait_for_selector("#results li")
        ids = page.eval_on_selector_all("#results button", "bs => bs.map(b => b.dataset.id)")
        assert ids[0] == image_id(cat) and len(ids) == 11
        second = ids[1]
        page.click("#results li:nth-child(2) button")
        page.wait_for_function(
            "(id) => document.querySelector('#results button')?.dataset.id === id", arg=second)
        page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})  # the cat image again
        page.wait_for_function("(id) => document.querySelector('#results button')?.dataset.id === id",
                               arg=image_id(cat))
        page.select_option("#label", "dog")  # a new filter re-runs the same search, nothing dropped again
        page.wait_for_function(
            "() => [...document.querySelectorAll('#results .label')].every(l => l.textContent === 'dog')")
        page.evaluate("() => { window.__same_page = true; }")
        page.fill("#k", "2")
        page.press("#k", "Enter")  # re-runs with k=2, does not reload the page
        page.wait_for_function("() => document.querySelectorAll('#results li').length === 2")
        assert page.evaluate("() => window.__same_page === true")
        shown = page.inner_text("#results li .path").replace("\u200e", "")  # the path is on the card
        assert shown.endswith(".jpg") and shown.startswith("/")
        page.select_option("#label", "")
        page.fill("#k", "5")
        page.press("#k", "Enter")
        page.wait_for_function("() => document.querySelectorAll('#results li').length === 5")
        page.set_input_files("#file", str(cat))  # the file picker, twice with the same file
        page.wait_for_function("(id) => document.querySelector('#results button')?.dataset.id === id",
                               arg=image_id(cat))
        page.click("#results li:nth-child(2) button")  # now results of another image
        page.wait_for_function("(id) => document.querySelector('#results button')?.dataset.id === id", arg=second)
        page.set_input_files("#file", str(cat))
        page.wait_for_function("(id) => document.querySelector('#results button')?.dataset.id === id",
                               arg=image_id(cat))
        page.check("#exclude")  # searching by a result, without that result itself
        page.click("#results li:nth-child(2) button")
        # the cat's results on screen hold `second`; the new ones (all 5 of them) must not. Waiting for
        # "first card is not `second`" passed at once on the old list: a race CI lost.
        page.wait_for_function("(id) => { const bs = [...document.querySelectorAll('#results button')];"
                               " return bs.length === 5 && bs.every(b => b.dataset.id !== id); }", arg=second)
        page.set_input_files("#file", {"name": "bad.jpg", "mimeType": "image/jpeg", "buffer": b"not an image"})
        page.wait_for_selector("#error:not([hidden])")
        assert page.eval_on_selector_all("#results li", "ls => ls.length") == 0  # no stale results under it
        assert errors == []


@pytest.mark.slow
def test_web_page_asks_for_the_api_key_once(served: tuple[str, Path]) -> None:
    """With --api-key-env the page and its assets load without a key; the page asks for it once and
    then searches (thumbnails included) with it."""
    home, images = served
    port = _free_port()
    env = {**os.environ, "EMBEDDER_TEST_KEY": "s3cret"}
    proc = subprocess.Popen([sys.executable, "-m", "embedder", "serve", "--home", home, "--port", str(port),
                             "--api-key-env", "EMBEDDER_TEST_KEY"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_served(url, proc)
        with chromium_page() as (page, _):
            page.goto(url + "/")
            page.wait_for_selector("#key-form:not([hidden])")  # the page's own form, not prompt()
            page.fill("#key", "s3cret")
            page.press("#key", "Enter")
            page.wait_for_function("() => document.querySelector('#info').textContent.includes('recall')")
            page.set_input_files("#file", str(images / "cat" / "cat_0001.jpg"))
            page.wait_for_selector("#results li")
            page.wait_for_function("() => [...document.querySelectorAll('#results img')].every("
                                   "i => i.complete && i.naturalWidth > 0)")
            assert page.is_hidden("#key-form")
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def test_serve_on_a_busy_port_is_a_one_line_error(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from embedder.cli import app

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        r = CliRunner().invoke(app, ["serve", "--home", str(tmp_path), "--port", str(port)])
    assert r.exit_code == 2 and r.output.startswith("error: cannot listen on") and len(r.output.splitlines()) == 1


def test_serve_refuses_a_home_that_is_missing_or_a_store(tmp_path: Path) -> None:
    """`serve --home` naming nothing, or a store, used to start and serve nothing, silently."""
    from typer.testing import CliRunner

    from embedder.cli import app
    from embedder.store.shards import MANIFEST

    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    r = CliRunner().invoke(app, ["serve", "--home", str(tmp_path / "nope"), "--port", str(port)])
    assert r.exit_code == 2 and "does not exist: build an index into it first" in r.output
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / MANIFEST).write_text("{}")
    r = CliRunner().invoke(app, ["serve", "--home", str(tmp_path / "store"), "--port", str(port)])
    assert r.exit_code == 2 and "is an embedding store, not an index home" in r.output

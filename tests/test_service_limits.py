"""The service's limits bound the work, not only the answer, against a real uvicorn server on a free
port: a huge JSON body of tiny queries is refused while /healthz goes on answering, texts have their
own cap, a query model that cannot be made is tried once per generation, and the per-load work is
done by the loader, never by a request."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the service extra is not installed: pip install 'embedder[serve]'")
import uvicorn  # noqa: E402

from embedder.embed.fill import extract  # noqa: E402
from embedder.index import build as idx  # noqa: E402
from embedder.index import generations as index_generations  # noqa: E402
from embedder.index import plan as index_plan  # noqa: E402
from embedder.models.builder import ModelSpec  # noqa: E402
from embedder.service.app import create_app  # noqa: E402
from embedder.service.options import ServeOptions  # noqa: E402

OLD_UPLOAD_LIMIT = 20 * 2**20


@pytest.fixture
def home(image_tree: Path, tmp_path: Path) -> str:
    store = str(tmp_path / "store")
    extract([str(image_tree)], store, ModelSpec("tiny_test"))
    home = str(tmp_path / "home")
    idx.build(store, "pets", index_plan.BuildOptions(kind="flat"), home)
    return home


class Live:
    """``create_app`` served by uvicorn in a thread of this process, on a free port."""

    def __init__(self, options: ServeOptions) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.app = create_app(options)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Live:
        self.thread.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.server.started:
                try:
                    if self.get("/readyz")[0] == 200:
                        return self
                except OSError:
                    pass
            time.sleep(0.02)
        raise AssertionError("the server never became ready")

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict]:  # type: ignore[type-arg]
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return r.status, json.loads(r.read() or b"null")
        finally:
            conn.close()

    def get(self, path: str) -> tuple[int, dict]:  # type: ignore[type-arg]
        return self.request("GET", path)

    def post(self, path: str, payload: object) -> tuple[int, dict]:  # type: ignore[type-arg]
        return self.request("POST", path, json.dumps(payload).encode(), {"content-type": "application/json"})


def _send_raw(port: int, head: bytes, body: Iterator[bytes]) -> tuple[int, dict]:  # type: ignore[type-arg]
    """A request written on a socket as it comes, then the server's answer (it may answer, and stop
    reading, before the body is all sent)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(head)
        try:
            for chunk in body:
                s.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = b""
        try:
            while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < _length(data):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except ConnectionResetError:
            pass
    status_line, _, rest = data.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 "), data[:200]
    return int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2][:_length(data)])


def _length(response: bytes) -> int:
    for line in response.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 1 << 30


def _tiny_queries(target: int) -> bytes:
    """A JSON body of TARGET bytes or a little less: nothing but tiny id queries."""
    one = b'{"id": "x"},'
    n = (target - 40) // len(one)
    return b'{"index": "pets", "queries": [' + one * n + b'{"id": "x"}]}'


def test_healthz_answers_while_a_20_mib_body_of_tiny_queries_is_refused(home: str) -> None:
    """1.9 M tiny queries in just under 20 MiB (the old upload limit, which this body passed): refused
    with a JSON 413 before they are parsed, with or without a Content-Length, while /healthz answers
    within a second throughout."""
    body = _tiny_queries(OLD_UPLOAD_LIMIT - 1024)
    assert len(body) < OLD_UPLOAD_LIMIT and body.count(b'"id"') > 1_700_000
    with Live(ServeOptions(home=home, poll_seconds=0)) as live:
        for chunked in (False, True):
            if chunked:
                head = (b"POST /search HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                        b"transfer-encoding: chunked\r\n\r\n")
                step = 1 << 20
                chunks = (b"%x\r\n%s\r\n" % (len(body[i:i + step]), body[i:i + step])
                          for i in range(0, len(body), step))
                parts: Iterator[bytes] = iter([*chunks, b"0\r\n\r\n"])
            else:
                head = (b"POST /search HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                        b"content-length: %d\r\n\r\n" % len(body))
                parts = iter([body[i:i + (1 << 20)] for i in range(0, len(body), 1 << 20)])
            answer: list[tuple[int, dict]] = []  # type: ignore[type-arg]

            def send(head: bytes = head, parts: Iterator[bytes] = parts,
                     answer: list = answer) -> None:  # type: ignore[type-arg]
                answer.append(_send_raw(live.port, head, parts))

            sender = threading.Thread(target=send)
            sender.start()
            waits = []
            while sender.is_alive() or len(waits) < 5:
                t0 = time.perf_counter()
                status, _ = live.get("/healthz")
                waits.append(time.perf_counter() - t0)
                assert status == 200
                time.sleep(0.02)
            sender.join()
            assert max(waits) < 1.0, (chunked, max(waits))
            status, error = answer[0]
            assert status in (413, 422), (status, error)
            assert error["kind"] in ("too_large", "invalid") and "MiB" in error["error"], error
        cat_ok = live.post("/search", {"queries": [{"id": "nope"}]})  # and the server goes on
        assert cat_ok[0] == 404


def test_json_limit_far_below_the_upload_limit_and_a_clear_message(home: str) -> None:
    with Live(ServeOptions(home=home, poll_seconds=0, max_json_bytes=64 * 1024)) as live:
        vectors = {"queries": [{"vector": [0.5] * 32}] * 1000}  # about 180 KiB of JSON
        status, error = live.post("/search", vectors)
        assert status == 413 and error["kind"] == "too_large"
        assert error["error"] == "request body over 0.0625 MiB (a JSON body: send its queries in several requests)"
        status, _ = live.post("/search", {"queries": [{"vector": [0.5] * 32}] * 100})
        assert status == 200
    with Live(ServeOptions(home=home, poll_seconds=0)) as live:  # under the JSON limit: the query cap
        status, error = live.post("/search", {"queries": [{"id": "x"}] * 100_000})
        assert (status, error["error"]) == (400, "at most 1000 queries per request, got 100000: send them in several")


def test_texts_have_their_own_smaller_cap(home: str) -> None:
    """Each text is a forward pass of the text tower: a request may hold max_queries ids but only
    max_text_queries texts, in /search and in /embed (refused before any model is asked)."""
    with Live(ServeOptions(home=home, poll_seconds=0, max_text_queries=4)) as live:
        status, error = live.post("/search", {"queries": [{"text": "a cat"}] * 5})
        assert (status, error["error"]) == (400, "at most 4 texts per request, got 5: send them in several")
        status, error = live.post("/embed", {"text": ["a cat"] * 5})
        assert (status, error["error"]) == (400, "at most 4 texts per request, got 5: send them in several")
        status, error = live.post("/search", {"queries": [{"id": "nope"}] * 50})  # ids: the larger cap
        assert status == 404, error
        status, error = live.post("/embed", {"text": ["x" * 20_000]})
        assert status == 400 and error["error"] == "text.0: String should have at most 10000 characters", error


def test_a_query_model_that_cannot_be_made_is_tried_once_per_generation(home: str,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """A device that is not there: the query model fails to load. It is tried at load, not again by
    each GET /indexes/NAME (which asked twice) or each image query; a new generation tries again."""
    caplog.set_level(logging.WARNING, logger="embedder.service")

    def loads() -> int:
        return sum("no embedder for image queries" in r.getMessage() for r in caplog.records)

    with Live(ServeOptions(home=home, poll_seconds=0, device="cuda:99")) as live:
        assert loads() == 1
        for _ in range(3):
            status, info = live.get("/indexes/pets")
            assert status == 200 and info["image_queries"] is False
        status, _ = live.get("/indexes")
        assert status == 200
        assert loads() == 1
        store = live.app.state.engine.indexes["pets"].meta["store"]
        index_generations.drop("pets", home)
        idx.build(store, "pets", index_plan.BuildOptions(kind="flat"), home)  # a new generation
        status, body = live.request("POST", "/indexes/pets/reload")
        assert status == 200 and body["reloaded"] is True
        assert loads() == 2
        live.get("/indexes/pets")
        assert loads() == 2
        # asked for by name, the same generation's failed query model is tried again (a transient
        # failure is not remembered until the next build)
        status, body = live.request("POST", "/indexes/pets/reload")
        assert status == 200 and body["reloaded"] is False
        live.get("/indexes/pets")
        assert loads() == 3


def test_per_load_work_is_done_by_the_loader_not_by_a_request(home: str) -> None:
    """The labels GET /indexes/NAME lists and the id order lookups by id need are made when the
    generation is loaded (in the loading thread), so the first request finds them ready."""
    with Live(ServeOptions(home=home, poll_seconds=0)) as live:
        loaded = live.app.state.engine.indexes["pets"]
        assert loaded._id_order is not None  # made by the loader, before any lookup by id
        loop_thread = live.thread.ident
        seen: list[int | None] = []
        original = loaded.row_of

        def recording(store_id: str) -> int | None:
            seen.append(threading.get_ident())
            return original(store_id)  # type: ignore[no-any-return]

        loaded.row_of = recording
        first = loaded.ids.column("id")[0].as_py()
        status, item = live.get(f"/items/pets/{first}")
        assert status == 200 and item["id"] == first
        status, info = live.get("/indexes/pets")
        assert status == 200 and info["labels"] == ["cat", "dog"]
        assert seen and loop_thread not in seen  # the item route runs in a worker thread, off the loop


def test_the_json_limit_holds_whatever_the_case_of_the_content_type(home: str) -> None:
    """Media types are case-insensitive: a JSON body sent as ``Multipart/Form-Data`` (which the body
    limit treats as an upload) is not parsed as JSON under the upload's larger limit."""
    with Live(ServeOptions(home=home, poll_seconds=0, max_json_bytes=64 * 1024)) as live:
        body = json.dumps({"queries": [{"vector": [0.5] * 32}] * 1000}).encode()
        status, error = live.request("POST", "/search", body, {"content-type": "Multipart/Form-Data; boundary=x"})
        assert 400 <= status < 500 and status != 200, (status, error)
        assert "error" in error
        status, _ = live.request("POST", "/search", json.dumps({"queries": [{"vector": [0.5] * 32}]}).encode(),
                                 {"content-type": "Application/JSON"})
        assert status == 200

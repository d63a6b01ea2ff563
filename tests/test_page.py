"""The search page as a user meets it, in headless Chromium against one real `embedder serve` (with
an API key, so that every image the page shows is fetched with it): the search in the address (Back,
reload, bookmarks), paging past the first page, the full-size view and the arrow keys, a text query
on a model without a text tower, errors that clear old results and speak plainly, the key form."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the service extra is not installed: pip install 'embedder[serve]'")

from embedder.embed.fill import extract  # noqa: E402
from embedder.index import build as idx  # noqa: E402
from embedder.index import plan as index_plan  # noqa: E402
from embedder.io.uri import image_id  # noqa: E402
from embedder.models.builder import ModelSpec  # noqa: E402
from tests.conftest import chromium_page, make_images  # noqa: E402
from tests.test_service import _free_port, _wait_served  # noqa: E402

pytestmark = pytest.mark.slow
KEY = "s3cret-page"
MAX_PIXELS = 250_000  # so that a 600x600 upload is over the server's pixel limit


class Site:
    def __init__(self, url: str, images: Path, many: Path, browser: Any) -> None:
        self.url, self.images, self.many, self.browser = url, images, many, browser
        self.errors: list[str] = []

    def page(self, key: bool = True) -> Any:
        """A fresh tab (its own session storage); with KEY, the API key already kept for it."""
        page = self.browser.new_context(viewport={"width": 1100, "height": 700}).new_page()
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        if key:
            page.add_init_script(f"sessionStorage.setItem('embedder-key', '{KEY}')")
        return page


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("page")
    images, many = root / "images", root / "many"
    make_images(images, {"cat": 6, "dog": 5})
    make_images(many, {"a": 70, "b": 60}, size=(24, 20), seed=1)
    home = str(root / "home")
    for name, source in (("pets", images), ("many", many)):
        store = str(root / f"store-{name}")
        extract([str(source)], store, ModelSpec("tiny_test"))
        idx.build(store, name, index_plan.BuildOptions(kind="flat"), home)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "embedder", "serve", "--home", home, "--port", str(port),
                             "--api-key-env", "EMBEDDER_PAGE_KEY", "--poll-seconds", "0",
                             "--max-pixels", str(MAX_PIXELS)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "EMBEDDER_PAGE_KEY": KEY})
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_served(url, proc)
        with chromium_page() as (page, errors):
            s = Site(url, images, many, page.context.browser)
            yield s
            assert s.errors == [] and errors == []
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def ids(page: Any) -> list[str]:
    return page.eval_on_selector_all("#results button", "bs => bs.map(b => b.dataset.id)")


def first_is(page: Any, item: str) -> None:
    page.wait_for_function("(id) => document.querySelector('#results button')?.dataset.id === id", arg=item)


def shown(page: Any, n: int) -> None:
    page.wait_for_function("(n) => document.querySelectorAll('#results li').length === n", arg=n)


def test_the_search_is_in_the_address_back_forward_reload(site: Site) -> None:
    cat, dog = image_id(site.images / "cat" / "cat_0001.jpg"), image_id(site.images / "dog" / "dog_0002.jpg")
    page = site.page()
    page.goto(f"{site.url}/?index=pets&id={cat}&k=4&label=cat#search")  # a shared link
    shown(page, 4)
    first_is(page, cat)
    assert page.input_value("#k") == "4" and page.input_value("#label") == "cat"
    assert all(t == "cat" for t in page.eval_on_selector_all("#results .label", "ls => ls.map(l => l.textContent)"))
    page.select_option("#label", "")  # a new filter is a new entry
    page.wait_for_function("() => new URLSearchParams(location.search).get('label') === null")
    page.goto(f"{site.url}/?index=pets&id={dog}&k=4")  # another search, by its address
    first_is(page, dog)
    second = ids(page)[1]
    page.click("#results li:nth-child(2) button")  # search by a result: a new entry
    first_is(page, second)
    assert f"id={second}" in page.url and "k=4" in page.url
    page.go_back()  # the search before, without leaving the page
    first_is(page, dog)
    assert f"id={dog}" in page.url
    page.go_forward()
    first_is(page, second)
    page.reload()  # a reload runs it again
    first_is(page, second)
    assert page.input_value("#k") == "4"
    # an upload: the address says so, a reload cannot bring the image back and says why, keeps the rest
    page.set_input_files("#file", str(site.images / "cat" / "cat_0003.jpg"))
    first_is(page, image_id(site.images / "cat" / "cat_0003.jpg"))
    assert "upload=" in page.url and "k=4" in page.url
    page.go_back()
    first_is(page, second)
    page.go_forward()  # the same tab still holds the file: the upload's results again
    first_is(page, image_id(site.images / "cat" / "cat_0003.jpg"))
    page.reload()
    page.wait_for_function("() => document.querySelector('#status').textContent.includes('uploaded image')")
    assert ids(page) == [] and page.input_value("#k") == "4"
    # the views' #hash and the search share the address
    page.goto(f"{site.url}/?index=pets&id={dog}&k=3")
    shown(page, 3)
    page.click("#tab-label")
    page.wait_for_selector("#label-view:not([hidden])")
    page.go_back()
    page.wait_for_selector("#search-view:not([hidden])")
    assert ids(page)[0] == dog and len(ids(page)) == 3
    page.close()


def test_paging_past_a_hundred_to_the_end(site: Site) -> None:
    first = image_id(site.many / "a" / "a_0000.jpg")
    page = site.page()
    page.goto(site.url + "/")
    page.wait_for_selector("#index option[value=many]", state="attached")
    page.select_option("#index", "many")
    page.fill("#k", "100")
    page.set_input_files("#file", str(site.many / "a" / "a_0000.jpg"))
    shown(page, 100)
    assert page.is_visible("#more") and page.is_hidden("#end")
    page.dispatch_event("#more", "click")  # 130 images: the next page is the last 30
    shown(page, 130)
    page.wait_for_selector("#end:not([hidden])")
    assert "130 results" in page.inner_text("#end") and page.is_hidden("#more")
    assert len(set(ids(page))) == 130
    # infinite scroll: reaching the end of the list fetches the next page
    page.goto(f"{site.url}/?index=many&id={first}&k=60")
    shown(page, 60)
    page.evaluate("() => window.scrollTo(0, document.body.scrollHeight)")  # one jump: one more page
    shown(page, 120)
    # the keys move past the last card into the next page
    page.focus("#results li:nth-child(120) button")
    page.keyboard.press("ArrowRight")
    page.wait_for_function("() => document.activeElement?.dataset?.n === '120'")
    shown(page, 130)
    # after clicking a low result, the view is back at the query
    low = ids(page)[125]
    page.click("#results li:nth-child(126) button")
    first_is(page, low)
    assert page.evaluate("() => document.querySelector('#drop').getBoundingClientRect().top") >= 0
    assert page.evaluate("() => document.querySelector('#drop').getBoundingClientRect().bottom") <= 700
    page.close()


def test_full_size_view_and_arrow_keys(site: Site) -> None:
    cat = image_id(site.images / "cat" / "cat_0002.jpg")
    page = site.page()
    page.goto(site.url + "/")
    page.wait_for_selector("#index option[value=pets]", state="attached")
    page.select_option("#index", "pets")
    page.fill("#k", "6")
    page.set_input_files("#file", str(site.images / "cat" / "cat_0002.jpg"))
    shown(page, 6)
    order = ids(page)
    href = page.get_attribute("#results li:nth-child(1) a.view", "href")
    assert href == f"/items/pets/{cat}/image"
    page.focus("#results li:nth-child(1) button")
    page.keyboard.press("ArrowRight")
    page.wait_for_function("(id) => document.activeElement?.dataset?.id === id", arg=order[1])
    page.keyboard.press("ArrowLeft")
    page.wait_for_function("(id) => document.activeElement?.dataset?.id === id", arg=order[0])
    page.keyboard.press("v")  # the full-size view, fetched with the key
    page.wait_for_selector("#viewer[open]")
    page.wait_for_function("(id) => { const i = document.querySelector('#viewer-img');"
                           " return i.dataset.id === id && i.complete && i.naturalWidth === 48; }", arg=order[0])
    page.keyboard.press("ArrowRight")
    page.wait_for_function("(id) => { const i = document.querySelector('#viewer-img');"
                           " return i.dataset.id === id && i.complete && i.naturalWidth === 48; }", arg=order[1])
    assert page.inner_text("#viewer-pos").startswith("2 of 6")
    page.keyboard.press("Escape")
    page.wait_for_selector("#viewer:not([open])", state="attached")
    page.wait_for_function("(id) => document.activeElement?.dataset?.id === id", arg=order[1])
    page.click("#results li:nth-child(3) a.view")  # the corner opens it too; Enter there searches by it
    page.wait_for_selector("#viewer[open]")
    page.keyboard.press("Enter")
    first_is(page, order[2])
    assert not page.evaluate("() => document.querySelector('#viewer').open")
    page.close()


def test_a_text_query_never_goes_to_an_index_without_a_text_tower(site: Site) -> None:
    """A shared link with a text on a CNN's index says why nothing is searched; switching to such an
    index from a text search clears the results and says why, and switching back searches again. The
    one stand-in: no CLIP model is cheap enough here, so index 'many' is told to the page as having a
    text tower and its text queries reach the server as its first item's id."""
    stand_in = image_id(site.many / "a" / "a_0000.jpg")
    page = site.page()
    sent: list[str] = []

    def indexes(route: Any) -> None:
        body = route.fetch().json()
        for i in body:
            if i["name"] == "many":
                i["text_queries"] = True
        route.fulfill(json=body)

    def search(route: Any) -> None:
        data = route.request.post_data_json if "json" in (route.request.headers.get("content-type") or "") else None
        if data and "text" in data:
            sent.append(f"{data['index']}:{data['text']}")
            if data["index"] == "many":
                data = {**data, "id": stand_in}
                del data["text"]
                return route.continue_(post_data=json.dumps(data))
        return route.continue_()

    page.route("**/indexes", indexes)
    page.route("**/search", search)
    page.goto(site.url + "/")
    page.wait_for_selector("#index option[value=many]", state="attached")
    page.select_option("#index", "many")
    page.fill("#text", "a black cat")
    page.press("#text", "Enter")
    shown(page, 12)
    assert sent == ["many:a black cat"]
    page.select_option("#index", "pets")  # a CNN's index: the text is not sent, the page says why
    page.wait_for_function("() => document.querySelector('#status').textContent.includes('no text tower')")
    assert ids(page) == [] and page.is_hidden("#error") and sent == ["many:a black cat"]
    assert page.is_disabled("#text")
    page.go_back()  # the text search on 'many' again
    shown(page, 12)
    assert "text=a+black+cat" in page.url and len(sent) == 2
    page.goto(f"{site.url}/?index=pets&text=a%20red%20shoe")  # a shared link: nothing sent, the reason said
    page.wait_for_function("() => document.querySelector('#status').textContent.includes('no text tower')")
    assert len(sent) == 2 and ids(page) == [] and page.is_hidden("#error")
    page.close()


def test_a_new_error_clears_old_results_and_speaks_plainly(site: Site) -> None:
    cat = site.images / "cat" / "cat_0001.jpg"
    page = site.page()
    page.goto(site.url + "/")
    page.wait_for_selector("#index option[value=pets]", state="attached")
    page.select_option("#index", "pets")
    page.set_input_files("#file", str(cat))
    shown(page, 11)
    big = io.BytesIO()
    Image.new("RGB", (600, 600), "red").save(big, "PNG")
    page.set_input_files("#file", {"name": "big.png", "mimeType": "image/png", "buffer": big.getvalue()})
    page.wait_for_selector("#error:not([hidden])")
    message = page.inner_text("#error")
    assert ids(page) == [], "an old answer under a new error"
    assert "big.png is too large" in message and "600×600" in message and "0.3 million pixels" in message, message
    assert "bomb" not in message
    page.set_input_files("#file", str(cat))
    shown(page, 11)
    assert page.is_hidden("#error")
    page.set_input_files("#file", {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"hello"})
    page.wait_for_selector("#error:not([hidden])")
    assert ids(page) == [] and "notes.txt is not an image" in page.inner_text("#error")
    page.set_input_files("#file", {"name": "broken.jpg", "mimeType": "image/jpeg", "buffer": b"not a jpeg"})
    page.wait_for_function("() => document.querySelector('#error').textContent.includes('broken.jpg')")
    assert "is not an image the server can read" in page.inner_text("#error")
    page.goto(f"{site.url}/?index=pets&id=feedface")  # an id that is not (or no longer) in the index
    page.wait_for_selector("#error:not([hidden])")
    message = page.inner_text("#error")
    assert "feedface" in message and "query 0" not in message and message[0].isupper(), message
    # the service's text errors, as the page words them (no CLIP model is cheap enough to make them here)
    said = page.evaluate("""async () => { const { plainError } = await import('/static/app.js');
        return [plainError(400, {kind: 'bad_query', error: 'text query 0 is empty: give some words to search by'}),
                plainError(400, {kind: 'bad_query', error: 'text query 0 is 90 tokens; this model reads at most 77'}),
                plainError(422, {kind: 'not_an_image', error: 'upload is not a usable image: decompression '
                  + 'bomb: Image size (200000000 pixels) exceeds limit of 178956970 pixels, could be '
                  + 'decompression bomb'})]; }""")
    assert said == ["The text is empty: give some words to search by.",
                    "The text is 90 tokens; this model reads at most 77.",
                    "That image is too large to search by: 200 million pixels is more than this server decodes."]
    page.close()


def test_the_api_key_form_a_wrong_key_then_the_right_one(site: Site) -> None:
    page = site.page(key=False)
    asked: list[str] = []

    def dialog(d: Any) -> None:  # the old page's window.prompt: never again
        asked.append(d.message)
        d.dismiss()

    page.on("dialog", dialog)
    page.goto(f"{site.url}/?index=pets")
    page.wait_for_selector("#key-form:not([hidden])")
    page.fill("#key", "wrong")
    page.press("#key", "Enter")
    page.wait_for_function("() => document.querySelector('#key-why').textContent.includes('not accepted')")
    assert page.is_visible("#key-form")
    page.fill("#key", KEY)
    page.click("#key-form button")
    page.wait_for_function("() => document.querySelector('#info').textContent.includes('recall')")
    assert page.is_hidden("#key-form") and asked == []
    page.set_input_files("#file", str(site.images / "cat" / "cat_0001.jpg"))
    shown(page, 11)
    page.wait_for_function("() => [...document.querySelectorAll('#results img')].every("
                           "i => i.complete && i.naturalWidth > 0)")
    page.reload()  # kept for the tab
    page.wait_for_function("() => document.querySelector('#info').textContent.includes('recall')")
    assert page.is_hidden("#key-form")
    page.close()

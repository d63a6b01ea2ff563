"""Text → image recall is measured by the build itself (`build_index()`, `index build`, in memory or
streamed with lists on disk), saved in the index record, and shown by `index info`, the Python API and
`GET /indexes`. The random MobileCLIP2-S0 of tests/test_open_clip.py (no CLIP weights offline)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from embedder.cli import app
from embedder.store.shards import Store
from tests.test_open_clip import NAME, _cli, _ref_text
from tests.test_open_clip import clip as clip_fixture  # noqa: F401 (the fixture `clip`, built again here)

pytestmark = pytest.mark.slow


def _want(clip: dict, store: Path) -> dict[str, float]:  # type: ignore[type-arg]
    """recall@k by hand: OpenCLIP's own text vectors of the captions that fit, against the stored image
    vectors by cosine."""
    t = Store.open(store).read(["id", "embedding", "caption"])
    x = np.stack(t.column("embedding").to_numpy(zero_copy_only=False))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    caps = t.column("caption").to_pylist()
    kept = [i for i, c in enumerate(caps) if len(c) < 300]
    q = _ref_text(clip, [caps[i] for i in kept])
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    rank = np.argsort(-(q @ x.T), axis=1)
    return {f"recall_at_{k}": float(np.mean([i in rank[r, :k] for r, i in enumerate(kept)])) for k in (1, 5, 10)}


def test_build_index_measures_and_saves_text_recall(clip_fixture: dict, tmp_path: Path) -> None:  # type: ignore[type-arg]  # noqa: F811
    from fastapi.testclient import TestClient

    import embedder
    from embedder.service.app import create_app
    from embedder.service.options import ServeOptions

    clip = clip_fixture
    files = clip["files"]
    caps = [f"picture {i} of the collection" for i in range(len(files) - 1)] + ["word " * 90]  # one over 77
    table = tmp_path / "cap.parquet"
    pq.write_table(pa.table({"image": [f.read_bytes() for f in files], "caption": caps}), table)
    store = tmp_path / "capstore"
    _cli("extract", str(table), "--out", str(store), "--backbone", NAME, "--json", "--weights", str(clip["wfile"]))
    home = tmp_path / "h"
    want = _want(clip, store)
    index = embedder.build_index(store, "api", home=home, kind="flat", weights=clip["wfile"])
    tr = index.info["text_recall"]
    assert (tr["captions"], tr["skipped"], tr["captioned_rows"], tr["rows"]) == (7, 1, 8, 8)
    assert {k: tr[k] for k in want} == pytest.approx(want)
    # streamed, lists on disk: the same row numbers, the same (exhaustive, one list) ranking
    streamed = embedder.build_index(store, "disk", home=home, kind="ivf", on_disk=True, weights=clip["wfile"])
    assert streamed.info["on_disk"] and {k: streamed.info["text_recall"][k] for k in want} == pytest.approx(want)
    # saved in the record: `index info`, its JSON, and the service's GET /indexes show it
    assert json.loads(_cli("index", "info", "api", "--home", str(home), "--json"))["text_recall"] == tr
    assert "text→image recall@1" in _cli("index", "info", "api", "--home", str(home))
    with TestClient(create_app(ServeOptions(home=str(home), poll_seconds=0))) as c:
        for _ in range(400):
            if c.get("/readyz").status_code == 200:
                break
        listed = {d["name"]: d for d in c.get("/indexes").json()}
        assert listed["api"]["text_recall"] == tr and c.get("/indexes/disk").json()["text_recall"]["captions"] == 7
    # without the weights file: built all the same, the record says why recall was not measured
    bare = embedder.build_index(store, "bare", home=home, kind="flat")
    assert "--weights" in bare.info["text_recall"]["not_measured"]
    out = CliRunner().invoke(app, ["index", "info", "bare", "--home", str(home)]).output
    assert "text → image recall not measured" in " ".join(out.split())
    # and not at all when asked not to
    off = embedder.build_index(store, "off", home=home, kind="flat", text_recall=False)
    assert "text_recall" not in off.info

"""`embedder inspect`: planted duplicates, leaks, label errors and outliers are found; bad input
gets one line; the report opens in a browser."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from embedder.analysis.inspection import inspect_store, write_outputs
from embedder.analysis.knn import knn_graph
from embedder.analysis.labels import cross_validate, label_issues
from embedder.analysis.options import InspectOptions, LabelOptions
from embedder.cli import app
from embedder.errors import InspectError
from embedder.models.origin import WeightsRef
from embedder.models.registry import get_backbone
from embedder.store.provenance import Provenance
from embedder.store.shards import Store, embeddings_to_arrow
from tests.conftest import chromium_page, make_images, mobilenet_weights_file, skimage_data

runner = CliRunner()


def classes_data(k: int = 6, per_class: int = 100, dim: int = 32, sep: float = 1.5,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian classes, off the origin (cosine geometry), probe accuracy ≈ 0.99."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (k, dim)) * sep / np.sqrt(2)
    y = np.repeat(np.arange(k), per_class)
    x = centres[y] + rng.normal(0, 1, (len(y), dim)) + 3 / np.sqrt(dim)
    return x.astype(np.float32), y


def write_store(path: Path, x: np.ndarray, labels: list[str | None] | None, prefix: str = "v",
                paths: list[str] | None = None, weights_tag: str = "0") -> str:
    prov = Provenance("synthetic", WeightsRef("file", "none", weights_tag), "penultimate", "avg",
                      get_backbone("tiny_test").preprocessing(), x.shape[1])
    n = len(x)
    ids = [f"{prefix}{i:05d}" for i in range(n)]
    with Store.writer(path, prov) as st:
        if n:
            st.write_shard(pa.table({
                "id": ids, "path": paths or [f"/nonexistent/{i}.jpg" for i in ids],
                "label": labels if labels is not None else [None] * n,
                "embedding": embeddings_to_arrow(x, "float32"),
                "width": pa.array([1] * n, pa.int32()), "height": pa.array([1] * n, pa.int32()),
                "file_hash": [None] * n, "caption": [None] * n,
            }, schema=st.read().schema))
        st.update_manifest()
    return str(path)


def findings(report: Path) -> list[dict]:  # type: ignore[type-arg]
    return pq.ParquetFile(report / "findings.parquet").read().to_pylist()


def test_planted_duplicates_and_leaks_all_found_and_nothing_else(tmp_path: Path) -> None:
    x, y = classes_data()
    rng = np.random.default_rng(1)
    # groups of 2, 3 and 4 near-copies (a re-encode moves a real embedding by about this much)
    planted = [[5, 600], [40, 601, 602], [333, 603, 604, 605]]
    copies = []
    for group in planted:
        for _ in group[1:]:
            copies.append(x[group[0]] + rng.normal(0, 0.02, x.shape[1]).astype(np.float32))
    xs = np.vstack([x, np.array(copies)])
    ys = np.concatenate([y, [y[g[0]] for g in planted for _ in g[1:]]])
    labels = [f"c{c}" for c in ys]
    store = write_store(tmp_path / "train", xs, labels)
    leaked = [7, 250, 480]
    fresh_x, _ = classes_data(seed=9, per_class=5)
    test_x = np.vstack([xs[leaked] + rng.normal(0, 0.02, (3, x.shape[1])).astype(np.float32), fresh_x])
    test = write_store(tmp_path / "test", test_x, [f"c{c}" for c in ys[leaked]] + ["c0"] * len(fresh_x), "t")
    r = runner.invoke(app, ["inspect", store, "--test", test, "--out", str(tmp_path / "rep"), "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    assert s["duplicate_groups"] == 3 and s["duplicate_images"] == 6 and s["leaks"] == 3
    rows = findings(tmp_path / "rep")
    assert [f["kind"] for f in rows[:3]] == ["leak"] * 3  # leaks first: they inflate every test score
    assert {tuple(f["ids"]) for f in rows[:3]} == {(f"t{i:05d}", f"v{j:05d}") for i, j in enumerate(leaked)}
    groups = {frozenset(f["ids"]) for f in rows if f["kind"] == "duplicate"}
    assert groups == {frozenset(f"v{i:05d}" for i in g) for g in planted}
    assert all(f["score"] >= 0.95 for f in rows if f["kind"] in ("duplicate", "leak"))


def test_label_errors_found_with_stated_precision_and_recall() -> None:
    x, y = classes_data()
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    rng = np.random.default_rng(3)
    flip = rng.choice(len(y), 30, replace=False)  # 5 %
    noisy = y.copy()
    noisy[flip] = (y[flip] + rng.integers(1, 6, len(flip))) % 6
    cv = cross_validate(xn, noisy, np.arange(len(y)), [f"c{i}" for i in range(6)], LabelOptions())
    assert (cv.proba.argmax(1) == y).mean() >= 0.95  # the probe is good (against the true labels)
    issues = label_issues(cv)
    truth = set(flip.tolist())
    likely = set(issues.rows[issues.likely].tolist())
    everything = set(issues.rows.tolist())
    assert len(likely & truth) / len(likely) >= 0.9  # likely: precise
    assert len(likely & truth) / len(truth) >= 0.7
    assert len(everything & truth) / len(truth) >= 0.95  # with possible: recall ≥ 0.8 at precision ≥ 0.5
    assert len(everything & truth) / len(everything) >= 0.5
    # suggested labels are the true ones
    sugg = dict(zip(issues.rows.tolist(), issues.suggested.tolist()))
    assert np.mean([sugg[i] == y[i] for i in truth & everything]) >= 0.9
    # one ranking, by self-confidence (lowest first); the planted errors come first
    assert np.all(np.diff(issues.self_confidence) >= 0)
    top = issues.rows[:len(truth)]
    assert len(set(top.tolist()) & truth) / len(truth) >= 0.8


def test_planted_outliers_found(tmp_path: Path) -> None:
    x, y = classes_data()
    rng = np.random.default_rng(5)
    far = rng.normal(0, 1, (5, x.shape[1])).astype(np.float32) * 10  # off in random directions
    xs = np.vstack([x, far])
    store = write_store(tmp_path / "s", xs, [f"c{c}" for c in y] + ["c0"] * 5)
    insp = inspect_store(store, str(tmp_path / "rep"), options=InspectOptions(thumbnails="none"))
    flagged = {f.rows[0] for f in insp.findings if f.kind == "outlier"}
    assert set(range(len(x), len(x) + 5)) <= flagged
    assert len(flagged) <= 5 + len(x) // 100  # few false alarms


def test_class_overlap_names_the_confused_pair(tmp_path: Path) -> None:
    x, y = classes_data()
    x[y == 4] = x[y == 3] + np.random.default_rng(2).normal(0, 0.3, x[y == 3].shape).astype(np.float32)
    store = write_store(tmp_path / "s", x, [f"c{c}" for c in y])
    insp = inspect_store(store, str(tmp_path / "rep"), options=InspectOptions(thumbnails="none"))
    top = insp.summary.overlaps[0]
    assert {top["a"], top["b"]} == {"c3", "c4"} and top["rate"] > 0.2
    assert all({o["a"], o["b"]} != {"c3", "c4"} and o["rate"] < top["rate"] for o in insp.summary.overlaps[1:])


def test_ivf_graph_reports_measured_recall_and_matches_exact() -> None:
    x, _ = classes_data(k=20, per_class=150, dim=48)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    exact = knn_graph(x, 10)
    approx = knn_graph(x, 10, exact_limit=1000)
    assert exact.exact and exact.recall is None and not approx.exact
    assert approx.recall is not None and approx.recall >= 0.9
    agree = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact.nbrs, approx.nbrs)])
    assert abs(agree - approx.recall) < 0.05  # the sampled measure tells the truth about the graph
    assert not (exact.nbrs == np.arange(len(x))[:, None]).any()  # self never its own neighbour


def test_exact_duplicate_rows_exclude_only_self() -> None:
    x = np.eye(8, 16, dtype=np.float32)
    x = np.vstack([x, x[:2]])  # rows 8, 9 are exact copies of rows 0, 1
    g = knn_graph(x, 3)
    assert g.nbrs[0, 0] == 8 and g.nbrs[8, 0] == 0 and g.sims[0, 0] == pytest.approx(1.0)
    assert not (g.nbrs == np.arange(10)[:, None]).any()


def test_store_without_labels_runs_what_needs_none(tmp_path: Path) -> None:
    x, _ = classes_data()
    store = write_store(tmp_path / "s", x, None)
    r = runner.invoke(app, ["inspect", store, "--out", str(tmp_path / "rep"), "--thumbnails", "none"])
    assert r.exit_code == 0, r.output
    assert "skipped:" in r.output and "no 'label' labels" in r.output
    assert (tmp_path / "rep" / "index.html").exists()
    assert {f["kind"] for f in findings(tmp_path / "rep")} <= {"duplicate", "outlier"}


def test_one_class_is_said_and_skipped(tmp_path: Path) -> None:
    x, _ = classes_data()
    store = write_store(tmp_path / "s", x, ["only"] * len(x))
    r = runner.invoke(app, ["inspect", store, "--out", str(tmp_path / "rep"), "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    assert s["label_issues"] is None and any("one class only (only)" in m for m in s["skipped"])


def test_test_store_with_other_provenance_refused_in_one_line(tmp_path: Path) -> None:
    x, y = classes_data()
    store = write_store(tmp_path / "a", x, [f"c{c}" for c in y])
    other = write_store(tmp_path / "b", x[:10], ["c0"] * 10, weights_tag="1")
    r = runner.invoke(app, ["inspect", store, "--test", other, "--out", str(tmp_path / "rep")])
    assert r.exit_code == 2
    assert r.output.startswith("error: ") and "embedded differently" in r.output and r.output.count("\n") == 1
    small = write_store(tmp_path / "c", x[:, :16].copy(), ["c0"] * len(x))
    with pytest.raises(InspectError, match="dim 16"):
        inspect_store(store, str(tmp_path / "rep"), test=small)


def test_empty_store_and_bad_options_one_line(tmp_path: Path) -> None:
    store = write_store(tmp_path / "e", np.zeros((0, 8), np.float32), [])
    r = runner.invoke(app, ["inspect", store, "--out", str(tmp_path / "rep")])
    assert r.exit_code == 2 and "holds no vectors" in r.output and r.output.count("\n") == 1
    x, y = classes_data()
    full = write_store(tmp_path / "f", x, [f"c{c}" for c in y])
    for args, msg in ((["--projection", "tsne"], "'tsne' is not one of 'pca', 'umap'"),
                      (["--thumbnails", "some"], "valid: all"),
                      (["--duplicate-threshold", "1.5"], "(0, 1]")):
        r = runner.invoke(app, ["inspect", full, "--out", str(tmp_path / "rep"), *args])
        assert r.exit_code == 2 and msg in r.output, r.output


def test_end_to_end_on_images_with_thumbnails_and_moved_files(tmp_path: Path) -> None:
    imgs = tmp_path / "imgs"
    make_images(imgs, {"cat": 12, "dog": 12})
    store = tmp_path / "store"
    r = runner.invoke(app, ["extract", str(imgs), "--out", str(store), "--backbone", "tiny_test"])
    assert r.exit_code == 0, r.output
    moved = sorted((imgs / "dog").iterdir())[:3]
    for p in moved:
        p.unlink()  # images that moved since extraction
    rep = tmp_path / "rep"
    r = runner.invoke(app, ["inspect", str(store), "--out", str(rep)])
    assert r.exit_code == 0, r.output
    assert "3 images could not be read for thumbnails" in r.output
    thumbs = list((rep / "thumbs").glob("*.jpg"))
    assert len(thumbs) == 21
    with Image.open(thumbs[0]) as im:
        assert max(im.size) <= 128
    page = (rep / "index.html").read_text()
    assert '"output_backend":"svg"' not in page  # never one SVG element per point
    assert "<script" in page and "cdn.bokeh.org" not in page  # self-contained: Bokeh's JS inlined
    assert '"right":[{"type":"object","name":"Legend"' in page  # beside the map, not over its points
    assert pq.ParquetFile(rep / "findings.parquet").schema_arrow.names == [
        "kind", "rank", "ids", "paths", "score", "given", "suggested", "detail"]
    summary = json.loads(__import__("html").unescape(page.split('id="summary">')[1].split("</script>")[0]))
    assert summary["images"] == 24 and summary["thumbnails"] == {"made": 21, "missing": 3}
    # a second run reuses the thumbnails and rewrites the report
    r = runner.invoke(app, ["inspect", str(store), "--out", str(rep), "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["thumbnails"]["made"] == 21


@pytest.mark.slow
def test_report_opens_from_disk_in_headless_chromium(tmp_path: Path) -> None:
    imgs = tmp_path / "imgs"
    make_images(imgs, {"cat": 10, "dog": 10})
    store = tmp_path / "store"
    assert runner.invoke(app, ["extract", str(imgs), "--out", str(store), "--backbone", "tiny_test"]).exit_code == 0
    rep = tmp_path / "rep"
    assert runner.invoke(app, ["inspect", str(store), "--out", str(rep)]).exit_code == 0
    with chromium_page() as (page, errors):
        page.goto((rep / "index.html").as_uri())
        page.wait_for_selector(".bk-Canvas, canvas", state="attached", timeout=30_000)
        # the map's data made it into Bokeh's document: one point per image, with a thumbnail each
        n, thumbs = page.evaluate("""() => {
            const doc = Bokeh.documents[0];
            const src = [...doc._all_models.values()].find(m => m.data && m.data.thumb);
            return [src.data.x.length, src.data.thumb.filter(t => t).length]; }""")
        assert (n, thumbs) == (20, 20)
        # every thumbnail shown in the findings loads from disk
        page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
        page.wait_for_function("() => [...document.querySelectorAll('.thumb img')].every(i => i.complete)")
        widths = page.eval_on_selector_all(".thumb img", "imgs => imgs.map(i => i.naturalWidth)")
        assert widths and all(w > 0 for w in widths)
    assert errors == []


@pytest.mark.slow
def test_reencoded_resized_copies_leak_with_real_weights(tmp_path: Path) -> None:
    """MobileNetV2 (ImageNet): JPEG-recompressed, downscaled copies of train photos are found in the
    test set; distinct photos are not."""
    r = runner.invoke(app, ["weights", "import", str(mobilenet_weights_file())])
    assert r.exit_code == 0, r.output
    train, test = tmp_path / "train", tmp_path / "test"
    train.mkdir()
    test.mkdir()
    names = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "retina.jpg",
             "hubble_deep_field.jpg", "immunohistochemistry.png" if False else "ihc.png"]
    for name in names:
        shutil.copy(skimage_data(name), train / name)
    for name in ("chelsea.png", "rocket.jpg", "retina.jpg"):
        with Image.open(skimage_data(name)) as im:
            im = im.convert("RGB")
            im.resize((int(im.width * 0.7), int(im.height * 0.7))).save(test / f"copy_{name}.jpg", quality=60)
    for name in ("coins.png", "brick.png", "camera.png"):
        shutil.copy(skimage_data(name), test / name)
    spec = ["--backbone", "mobilenet_v2:IMAGENET1K_V1", "--batch-size", "4"]
    for src, out in ((train, tmp_path / "s_train"), (test, tmp_path / "s_test")):
        r = runner.invoke(app, ["extract", str(src), "--out", str(out), *spec])
        assert r.exit_code == 0, r.output
    rep = tmp_path / "rep"
    r = runner.invoke(app, ["inspect", str(tmp_path / "s_train"), "--test", str(tmp_path / "s_test"),
                            "--out", str(rep), "--json"])
    assert r.exit_code == 0, r.output
    leaks = [f for f in findings(rep) if f["kind"] == "leak"]
    found = {(Path(f["paths"][0]).name, Path(f["paths"][1]).name) for f in leaks}
    assert found == {("copy_chelsea.png.jpg", "chelsea.png"), ("copy_rocket.jpg.jpg", "rocket.jpg"),
                     ("copy_retina.jpg.jpg", "retina.jpg")}


@pytest.mark.slow
def test_umap_projection_separates_classes(tmp_path: Path) -> None:
    pytest.importorskip("umap", reason="umap-learn is not installed (pip install 'embedder[umap]')")
    x, y = classes_data(k=3, per_class=60)
    store = write_store(tmp_path / "s", x, [f"c{c}" for c in y])
    insp = inspect_store(store, str(tmp_path / "rep"), options=InspectOptions(projection="umap", thumbnails="none"))
    c = insp.coords
    assert c.shape == (180, 2) and np.isfinite(c).all()
    centres = np.array([c[y == k].mean(0) for k in range(3)])
    spread = max(np.linalg.norm(c[y == k] - centres[k], axis=1).mean() for k in range(3))
    assert min(np.linalg.norm(centres[a] - centres[b]) for a in range(3) for b in range(a + 1, 3)) > 2 * spread


def test_map_samples_beyond_its_point_budget(tmp_path: Path) -> None:
    x, y = classes_data()
    store = write_store(tmp_path / "s", x, [f"c{c}" for c in y])
    insp = inspect_store(store, str(tmp_path / "rep"), options=InspectOptions(thumbnails="none", map_points=100))
    assert len(insp.map_rows) == 100 and len(np.unique(insp.map_rows)) == 100
    write_outputs(insp, str(tmp_path / "rep"))
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "a uniform sample of 100 of 600 images" in page
    assert insp.summary.probe_accuracy is not None  # the analyses still use every row


@pytest.mark.parametrize("labels", [["a"], ["a", "b"], ["a", "a", "b"], [None, "a", "b", "a", "b"]])
def test_tiny_stores_build_a_report_and_say_what_they_skip(tmp_path: Path, labels: list[str | None]) -> None:
    x = np.random.default_rng(len(labels)).normal(size=(len(labels), 8)).astype(np.float32)
    store = write_store(tmp_path / "s", x, labels)
    r = runner.invoke(app, ["inspect", store, "--out", str(tmp_path / "rep"), "--thumbnails", "none"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "rep" / "index.html").exists()
    if len(labels) <= 3:
        assert "skipped:" in r.output  # one class, or too few images per class for the probe

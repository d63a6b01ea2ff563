"""The static HTML report: one file (Bokeh's JS inlined) plus the thumbs/ folder; opens from disk.

The embedding map is a Bokeh scatter drawn on a 2-D canvas (not one SVG element per point), with
the thumbnail and path on hover and a click opening the image; findings are plain HTML tables with
lazy thumbnails. Canvas rather than WebGL, measured (scripts/bench_inspect.py --browser): with
100k points in Chromium without a GPU (software WebGL), a wheel-zoom step took 150-160 ms on
canvas against 0.9-2.1 s on WebGL over two runs, the first frame 1.7 s against 2.8-4.1 s; with a
GPU WebGL may win, but the canvas is fast enough at 100k everywhere."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any, Literal

from embedder.analysis.inspection_types import Finding, Inspection
from embedder.analysis.thumbs import THUMBS_DIR, thumb_name
from embedder.store.labels import Joined

MAP_BACKEND: Literal["canvas", "svg", "webgl"] = "canvas"

TITLES = {
    "leak": ("Train/test leakage", "Test images with a near-duplicate in train: they inflate every test accuracy."),
    "duplicate": ("Near-duplicates", "Groups of images at cosine similarity ≥ the threshold (weakest link shown)."),
    "label_error": ("Likely label errors", "Out-of-sample probabilities from a cross-validated linear probe. "
                    "Lowest confidence in the given label first. <i>likely</i>: counted by confident learning (high "
                    "precision); <i>possible</i>: the probe disagrees with the given label, confident learning "
                    "did not count it."),
    "outlier": ("Outliers", "Images far from all others: mean cosine distance to their nearest neighbours "
                "beyond Q3 + fence · IQR."),
    "class_overlap": ("Class overlap", "Class pairs the cross-validated probe confuses most, with examples."),
}

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1280px;padding:0 16px;color:#222}
h1{font-size:22px} h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0} td,th{padding:4px 8px;border-bottom:1px solid #eee;
text-align:left;vertical-align:top} .num{text-align:right;font-variant-numeric:tabular-nums}
.thumbs{display:flex;flex-wrap:wrap;gap:4px} .thumb img{width:96px;height:96px;object-fit:cover;
border-radius:3px} .missing{width:96px;height:96px;display:flex;align-items:center;justify-content:center;
background:#f3f3f3;color:#999;font-size:12px;border-radius:3px} .note{color:#666} .skip{color:#a60}
.badge{display:inline-block;padding:1px 6px;border-radius:8px;background:#eef;font-size:12px}
"""


def _e(s: object) -> str:
    return html.escape(str(s), quote=True)


def _uri(path: str) -> str:
    try:
        return Path(path).as_uri()
    except ValueError:
        return ""


class _Cells:
    def __init__(self, insp: Inspection) -> None:
        self.insp = insp

    def thumb(self, store_id: str, path: str, caption: str = "") -> str:
        title = _e(path + (f" — {caption}" if caption else ""))
        if store_id in self.insp.thumbs:
            img = f'<img loading="lazy" src="{THUMBS_DIR}/{thumb_name(store_id)}" alt="" title="{title}">'
        else:
            img = f'<div class="missing" title="{title}">missing</div>'
        uri = _uri(path)
        return f'<a class="thumb" href="{_e(uri)}">{img}</a>' if uri else img

    def train(self, row: int, caption: str = "") -> str:
        v = self.insp.train
        return self.thumb(v.ids[row].as_py(), v.paths[row].as_py(), caption)

    def test(self, row: int, caption: str = "") -> str:
        v = self.insp.test
        if v is None:
            return ""
        return self.thumb(v.ids[row].as_py(), v.paths[row].as_py(), caption)


def _section(kind: str, items: list[Finding], cells: _Cells, listed: int) -> str:
    title, note = TITLES[kind]
    total = cells.insp.counts.get(kind, len(items))
    out = [f'<h2 id="{kind}">{title} <span class="badge">{total}</span></h2><p class="note">{note}</p>']
    if not items:
        out.append("<p>None found.</p>")
        return "\n".join(out)
    if total > listed:
        out.append(f'<p class="note">Showing {listed} of {total}; all are in findings.parquet.</p>')
    out.append("<table>")
    labels = cells.insp.train.classes
    y = cells.insp.train.y
    for f in items[:listed]:
        if kind == "leak":
            body = cells.test(f.test_rows[0], "test") + cells.train(f.rows[0], "train")
            head = f"similarity {f.score:.3f}"
        elif kind == "duplicate":
            body = "".join(cells.train(r) for r in f.rows[:12])
            more = f" (+{len(f.rows) - 12} more)" if len(f.rows) > 12 else ""
            head = f"{len(f.rows)} images{more}, similarity ≥ {f.score:.3f}"
        elif kind == "label_error":
            nb = "".join(cells.train(n, labels[y[n]] if y[n] >= 0 else "") for n in f.neighbours if n >= 0)
            gap = '<span style="width:16px"></span>'
            body = cells.train(f.rows[0], f"given {f.given}") + gap + nb
            head = (f'<span class="badge">{_e(f.detail)}</span> '
                    f"given <b>{_e(f.given)}</b>, suggested <b>{_e(f.suggested)}</b>; "
                    f"confidence in given label {1 - f.score:.2f}"
                    "<br><span class='note'>then its nearest neighbours</span>")
        elif kind == "outlier":
            gap = '<span style="width:16px"></span>'
            body = cells.train(f.rows[0]) + gap + "".join(cells.train(n) for n in f.neighbours if n >= 0)
            head = f"mean kNN distance {f.score:.3f}<br><span class='note'>then its nearest neighbours</span>"
        else:
            body = "".join(cells.train(r, labels[y[r]]) for r in f.rows)
            head = f"<b>{_e(f.given)}</b> ↔ <b>{_e(f.suggested)}</b>: {f.score:.1%} of their images confused"
        out.append(f'<tr><td style="width:260px">{head}</td><td><div class="thumbs">{body}</div></td></tr>')
    out.append("</table>")
    return "\n".join(out)


def _map(insp: Inspection) -> tuple[str, str]:
    from bokeh.embed import components
    from bokeh.models import ColumnDataSource, CustomJS, HoverTool, TapTool
    from bokeh.palettes import Category10, Category20, turbo
    from bokeh.plotting import figure
    from bokeh.transform import factor_cmap

    v = insp.train
    rows = insp.map_rows
    classes = list(v.classes)
    names = classes + ["(none)"]
    label = [names[i] for i in v.y[rows]]  # -1 → "(none)"
    ids = v.ids.take(rows).to_pylist()
    thumb = [f"{THUMBS_DIR}/{thumb_name(i)}" if i in insp.thumbs else "" for i in ids]
    n = len(names)
    base = list(Category10[10] if n <= 10 else Category20[20] if n <= 20 else turbo(min(n, 256)))
    palette = [base[i % len(base)] for i in range(n)]
    source = ColumnDataSource({"x": insp.coords[rows, 0], "y": insp.coords[rows, 1], "label": label,
                               "path": v.paths.take(rows).to_pylist(), "thumb": thumb})
    shown = f"{len(v)} images" if len(rows) == len(v) else f"a uniform sample of {len(rows)} of {len(v)} images"
    fig = figure(output_backend=MAP_BACKEND, tools="pan,wheel_zoom,box_zoom,reset,save", active_scroll="wheel_zoom",
                 sizing_mode="stretch_width", height=640, title=f"{shown} ({insp.options.projection.upper()})")
    size = 6 if len(rows) < 2000 else 4 if len(rows) < 20000 else 3
    legend: dict[str, Any] = {"legend_field": "label"} if len(classes) <= 30 else {}
    fig.scatter("x", "y", source=source, size=size, alpha=0.7, line_color=None,
                color=factor_cmap("label", palette, names), **legend)
    if len(classes) <= 30 and fig.legend:
        fig.legend.click_policy = "hide"
        fig.add_layout(fig.legend[0], "right")  # beside the map: inside, it covered the points under it
    fig.add_tools(HoverTool(tooltips="""
      <div style="width:150px"><img src="@thumb" style="max-width:128px;max-height:128px" alt="(thumbnail missing)">
      <div style="font-size:11px;word-break:break-all">@path</div><b>@label</b></div>"""))
    tap = TapTool()
    fig.add_tools(tap)
    source.selected.js_on_change("indices", CustomJS(args={"src": source}, code="""
      const i = src.selected.indices[0];
      if (i !== undefined) { window.open(encodeURI('file://' + src.data.path[i]), '_blank'); }"""))
    script, div = components(fig)
    return script, div


def _bucket_graph(g: dict[str, Any]) -> str:
    text = (f"exact within {g['buckets']:,} k-means buckets (and their nearest neighbours' guests), "
            f"recall@{g['k']} {g.get('recall', float('nan')):.3f}")
    if g.get("duplicate_pairs_checked"):
        lo, hi = g.get("duplicate_pair_recall_95") or (float("nan"), float("nan"))
        text += (f", duplicate-pair recall {g['duplicate_pair_recall']:.3f} "
                 f"({g['duplicate_pairs_found']} of {g['duplicate_pairs_checked']} pairs; 95 % interval "
                 f"{lo:.3f}-{hi:.3f})")
    return text + f", measured against exact search from {g.get('recall_queries', 0):,} sampled images"


def write_html(insp: Inspection, target: Path, labels: Joined | None = None) -> None:
    """index.html; LABELS: the labels file put over the store's labels (named, with its digest)."""
    from bokeh.resources import INLINE

    s = insp.summary
    cells = _Cells(insp)
    p = insp.train.provenance
    by_kind: dict[str, list[Finding]] = {k: [] for k in TITLES}
    for f in insp.findings:
        by_kind[f.kind].append(f)
    script, div = _map(insp) if len(insp.train) else ("", "<p>No vectors.</p>")
    acc = []
    if s.probe_accuracy is not None:
        acc.append(f"linear probe ({s.folds}-fold cross-validated, C={s.probe_C:g}): <b>{s.probe_accuracy:.1%}</b>")
    if s.knn_accuracy is not None:
        acc.append(f"kNN (leave-one-out, k={s.graph['k']}): <b>{s.knn_accuracy:.1%}</b>")
    graph = ("exact" if s.graph.get("exact") else
             f"IVF, recall@{s.graph['k']} {s.graph['recall']:.3f} measured against exact search on a sample"
             if s.graph.get("method") != "buckets" else _bucket_graph(s.graph))
    class_rows = "".join(f'<tr><td>{_e(c)}</td><td class="num">{n}</td></tr>' for c, n in s.classes.items())
    kinds = ["leak"] if insp.test is not None else []
    kinds += ["duplicate", "label_error", "outlier", "class_overlap"]
    sections = "\n".join(_section(k, by_kind[k], cells, insp.options.listed) for k in kinds
                         if not (k in ("label_error", "class_overlap") and s.label_issues is None))
    skipped = "".join(f'<li class="skip">{_e(m)}</li>' for m in s.skipped)
    summary = s.to_dict() | ({"labels": labels.to_dict()} if labels is not None else {})
    from_file = (f'<p>{_e(labels.summary())} (sha256 {_e(labels.sha256[:16])}…)</p>'
                 if labels is not None else "")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>embedder inspect: {_e(Path(s.store).name)}</title>
<style>{CSS}</style>{INLINE.render()}{script}</head><body>
<h1>What the embeddings say about <code>{_e(s.store)}</code></h1>
<p>{s.images} images{f", {s.test_images} test images" if s.test_images is not None else ""};
{_e(p.backbone)} layer {_e(p.layer)} ({_e(p.weights.describe())}), dim {p.dim}.
kNN graph: k={s.graph.get('k')}, {graph}.</p>
<p>{' · '.join(acc)}</p>
{from_file}
{f"<ul>{skipped}</ul>" if skipped else ""}
<script type="application/json" id="summary">{_e(json.dumps(summary))}</script>
<h2>Embedding map</h2><p class="note">Hover for the image and path, click to open it; wheel to zoom,
drag to pan; click a legend entry to hide a class.</p>
{div}
{f'<h2>Classes</h2><table><tr><th>label</th><th>images</th></tr>{class_rows}</table>' if class_rows else ""}
{sections}
</body></html>
"""
    target.write_text(page, encoding="utf-8")

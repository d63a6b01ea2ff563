"""`embedder inspect`: one pass over a store's vectors → duplicates, train/test leakage, likely
label errors, outliers, class overlap, accuracies → findings.parquet, a static HTML report."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedder.analysis.duplicates import duplicate_groups, leaks
from embedder.analysis.inspection_types import (
    FINDINGS_SCHEMA,
    KINDS,
    Finding,
    Inspection,
    InspectSummary,
    check_comparable,
)
from embedder.analysis.knn import knn_graph
from embedder.analysis.labels import class_overlap, cross_validate, knn_accuracy, label_issues
from embedder.analysis.options import InspectOptions
from embedder.analysis.outliers import outliers
from embedder.analysis.projection import project
from embedder.analysis.vectors import Vectors, load_vectors
from embedder.errors import ProbeError
from embedder.store.labels import Joined, LabelJoin
from embedder.store.shards import Store

log = logging.getLogger(__name__)


def _check_test(train: Vectors, test: Vectors) -> None:
    check_comparable(train.store, train.x.shape[1], train.provenance, test.store, test.x.shape[1], test.provenance)


def uses_buckets(store: str, options: InspectOptions) -> bool:
    """The bucketed, bounded-memory path (``analysis.streamed``): asked for, or, by default, above
    ``exact_limit`` rows (where the in-memory graph would be approximate anyway and its memory grows
    with the store: ~21 KB per 1,280-d vector measured)."""
    if options.graph != "auto":
        return options.graph == "buckets"
    return Store.open(store).count() > options.exact_limit


def inspect_store(store: str, out: str, test: str | None = None, options: InspectOptions = InspectOptions(),
                  progress: Callable[[str, int, int], None] | None = None,
                  labels: LabelJoin | None = None) -> Inspection:
    """LABELS: a labels file's join, put over STORE's labels by id (batch by batch on the bucketed
    path); a file none of whose ids is in STORE is refused before the analyses. The caller reads
    ``labels.result()`` after (``write_outputs`` shows it in the report)."""
    options.check()
    if uses_buckets(store, options):
        from embedder.analysis.streamed import inspect_streamed

        return inspect_streamed(store, out, test, options, progress or (lambda _s, _d, _t: None), labels)
    seconds: dict[str, float] = {}
    t = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal t
        now = time.perf_counter()
        seconds[stage] = round(now - t, 3)
        t = now

    def tick(stage: str, done: int, total: int) -> None:
        if progress:
            progress(stage, done, total)

    train = load_vectors(store, options.label_column, labels=labels)
    if labels is not None:
        labels.require_some(store)
    tv = load_vectors(test, options.label_column, classes=train.classes or None) if test else None
    if tv is not None:
        _check_test(train, tv)
    lap("load")
    counts = np.bincount(train.y[train.y >= 0], minlength=len(train.classes))
    summary = InspectSummary(store, str(Path(out) / "index.html"), str(Path(out) / "findings.parquet"),
                             len(train), int((train.y >= 0).sum()),
                             {c: int(n) for c, n in zip(train.classes, counts)},
                             test_images=len(tv) if tv is not None else None)
    tick("kNN graph", 0, 1)
    graph = knn_graph(train.x, options.k, options.exact_limit, options.seed)
    summary.graph = {"k": graph.k, "exact": graph.exact, "recall": graph.recall}
    lap("knn_graph")
    findings: list[Finding] = []

    if tv is not None:
        found = leaks(train.x, tv.x, options.duplicate_threshold)
        summary.leaks = len(found)
        findings += [Finding("leak", [lk.train_row], lk.similarity, test_rows=[lk.test_row]) for lk in found]
        lap("leakage")

    groups = duplicate_groups(graph, options.duplicate_threshold)
    summary.duplicate_groups = len(groups)
    summary.duplicate_images = int(sum(len(g.rows) - 1 for g in groups))
    findings += [Finding("duplicate", g.rows.tolist(), g.similarity) for g in groups]
    lap("duplicates")

    _labels(train, graph, options, summary, findings, tick)
    lap("labels")

    found_out = outliers(graph, options.outlier_fence)
    summary.outliers = len(found_out.rows)
    summary.outlier_fence = found_out.fence if np.isfinite(found_out.fence) else None
    findings += [Finding("outlier", [int(r)], float(found_out.score[r]), neighbours=graph.nbrs[r, :5].tolist())
                 for r in found_out.rows]
    lap("outliers")

    tick("projection", 0, 1)
    coords = project(train.x, options.projection, options.seed)
    map_rows = np.arange(len(train))
    if len(train) > options.map_points:
        rng = np.random.default_rng(options.seed)
        map_rows = np.sort(rng.choice(len(train), options.map_points, replace=False))
    lap("projection")
    summary.seconds = seconds
    return Inspection(train, tv, coords, map_rows, findings, summary, options)


def _labels(train: Vectors, graph: Any, options: InspectOptions, summary: InspectSummary,
            findings: list[Finding], tick: Callable[[str, int, int], None]) -> None:
    present = [c for c, n in summary.classes.items() if n > 0]
    if summary.labelled == 0:
        summary.skipped.append(f"label errors, class overlap and accuracies: the store has no "
                               f"{options.label_column!r} labels")
        return
    if len(present) < 2:
        summary.skipped.append(f"label errors, class overlap and accuracies: one class only ({present[0]})")
        return
    if summary.labelled < len(train):
        summary.skipped.append(f"{len(train) - summary.labelled} unlabelled images take no part in the label analyses")
    summary.knn_accuracy = knn_accuracy(graph, train.y, options.labels.knn_temperature)
    rows = train.labelled
    lab_options = replace(options.labels, folds=options.folds, seed=options.seed)
    try:
        x = train.x if len(rows) == len(train) else train.x[rows]  # no copy when every row is labelled
        cv = cross_validate(x, train.y[rows], rows, train.classes, lab_options,
                            lambda d, n, _s: tick("cross-validated probe", d, n))
    except ProbeError as e:
        summary.skipped.append(f"label errors and class overlap: {e}")
        return
    summary.probe_accuracy = cv.accuracy
    summary.probe_C = cv.C
    summary.folds = cv.folds
    issues = label_issues(cv)
    summary.label_issues = int(issues.likely.sum())
    summary.label_possible = int((~issues.likely).sum())
    for r, g, s, conf, lk in zip(issues.rows, issues.given, issues.suggested, issues.self_confidence, issues.likely):
        findings.append(Finding("label_error", [int(r)], float(1.0 - conf), train.classes[g], train.classes[s],
                                detail="likely" if lk else "possible", neighbours=graph.nbrs[r, :5].tolist()))
    for ov in class_overlap(cv):
        summary.overlaps.append({"a": train.classes[ov.a], "b": train.classes[ov.b], "rate": ov.rate,
                                 "confusions": ov.count})
        findings.append(Finding("class_overlap", ov.example_rows.tolist(), ov.rate, train.classes[ov.a],
                                train.classes[ov.b]))


def findings_table(insp: Inspection) -> pa.Table:
    train_ids, train_paths = insp.train.ids, insp.train.paths
    cols: dict[str, list[Any]] = {name: [] for name in FINDINGS_SCHEMA.names}
    rank = dict.fromkeys(KINDS, 0)
    for f in sorted(insp.findings, key=lambda f: KINDS.index(f.kind)):
        rank[f.kind] += 1
        ids = [train_ids[r].as_py() for r in f.rows]
        paths = [train_paths[r].as_py() for r in f.rows]
        if f.test_rows and insp.test is not None:  # leak: the test image first
            ids = [insp.test.ids[r].as_py() for r in f.test_rows] + ids
            paths = [insp.test.paths[r].as_py() for r in f.test_rows] + paths
        for name, value in (("kind", f.kind), ("rank", rank[f.kind]), ("ids", ids), ("paths", paths),
                            ("score", f.score), ("given", f.given), ("suggested", f.suggested),
                            ("detail", f.detail)):
            cols[name].append(value)
    return pa.table(cols, schema=FINDINGS_SCHEMA)


def write_outputs(insp: Inspection, out: str,
                  progress: Callable[[str, int, int], None] | None = None,
                  labels: Joined | None = None) -> InspectSummary:
    """findings.parquet, thumbnails and index.html under OUT; LABELS: the labels file behind the
    labels, named in the report."""
    from embedder.analysis.report import write_html
    from embedder.analysis.thumbs import make_thumbnails

    t = time.perf_counter()
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    if not insp.findings_written:
        pq.write_table(findings_table(insp), d / "findings.parquet")
    want: dict[str, str] = {}
    if insp.options.thumbnails != "none":
        shown: set[int] = set()
        per_kind: dict[str, int] = {}
        for f in insp.findings:
            per_kind[f.kind] = per_kind.get(f.kind, 0) + 1
            if per_kind[f.kind] <= insp.options.listed:
                shown.update(f.rows[:12])
                shown.update(n for n in f.neighbours if n >= 0)
        rows = sorted(shown | set(insp.map_rows.tolist())) if insp.options.thumbnails == "all" else sorted(shown)
        ids, paths = insp.train.ids, insp.train.paths
        want = {ids[r].as_py(): paths[r].as_py() for r in rows}
        if insp.test is not None:
            for f in insp.findings:
                for r in f.test_rows:
                    want[insp.test.ids[r].as_py()] = insp.test.paths[r].as_py()
    insp.thumbs = make_thumbnails(want.items(), d, progress=lambda a, b: progress("thumbnails", a, b)
                                  if progress else None)
    insp.summary.thumbnails = {"made": len(insp.thumbs), "missing": len(want) - len(insp.thumbs)}
    insp.summary.seconds["thumbnails"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    write_html(insp, d / "index.html", labels)
    insp.summary.seconds["report"] = round(time.perf_counter() - t, 3)
    return insp.summary

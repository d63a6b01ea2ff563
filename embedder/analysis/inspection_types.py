"""What `embedder inspect` finds and the report renders: the findings, the summary, the whole
inspection. A leaf of the analysis theme: the inspection builds these, the report reads them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from embedder.analysis.options import InspectOptions
from embedder.analysis.vectors import Vectors
from embedder.errors import InspectError
from embedder.store.provenance import Provenance


def check_comparable(train: str, train_dim: int, train_prov: Provenance, test: str, test_dim: int,
                     test_prov: Provenance) -> None:
    """A test store searched against a train store must hold comparable vectors: the same dim and
    the same backbone, layer and preprocessing (both the in-memory and the bucketed path)."""
    if train_dim != test_dim:
        raise InspectError(f"{test} has dim {test_dim}, {train} dim {train_dim}: "
                           "embed both with the same backbone and layer")
    diff = train_prov.differences(test_prov, Provenance.COMPARABLE)
    if diff:
        raise InspectError(f"{test} was embedded differently from {train} ({diff[0]} differs); "
                           "re-extract it with the same settings")


KINDS = ("leak", "duplicate", "label_error", "outlier", "class_overlap")

FINDINGS_SCHEMA = pa.schema([
    ("kind", pa.string()), ("rank", pa.int32()), ("ids", pa.list_(pa.string())),
    ("paths", pa.list_(pa.string())), ("score", pa.float64()),
    ("given", pa.string()), ("suggested", pa.string()), ("detail", pa.string()),
])


@dataclass
class InspectSummary:
    store: str
    report: str
    findings: str
    images: int
    labelled: int
    classes: dict[str, int]
    test_images: int | None = None
    probe_accuracy: float | None = None  # cross-validated, out of sample
    knn_accuracy: float | None = None  # leave-one-out
    probe_C: float | None = None
    folds: int | None = None
    duplicate_groups: int = 0
    duplicate_images: int = 0  # images beyond the first of each group
    leaks: int | None = None
    label_issues: int | None = None  # likely (confident learning)
    label_possible: int | None = None  # further disagreements between the probe and the given label
    outliers: int = 0
    outlier_fence: float | None = None
    overlaps: list[dict[str, Any]] = field(default_factory=list)
    graph: dict[str, Any] = field(default_factory=dict)
    thumbnails: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    scale: dict[str, Any] = field(default_factory=dict)  # the bucketed run: budget, bucket size, probe sample
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Finding:
    kind: str
    rows: list[int]  # rows of the train store (for leaks: test row first, in ``test_rows``)
    score: float
    given: str | None = None
    suggested: str | None = None
    test_rows: list[int] = field(default_factory=list)
    detail: str | None = None  # label errors: "likely" (confident learning) or "possible"
    neighbours: list[int] = field(default_factory=list)  # rows shown beside it in the report


@dataclass
class Catalog:
    """What the report shows of a store too large to hold: ids, paths and class codes of the rows the
    findings and the map name only (findings' rows are positions in it), and the store's size."""

    ids: pa.Array
    paths: pa.Array
    y: np.ndarray
    classes: list[str]
    provenance: Provenance
    store: str
    images: int
    dim: int

    def __len__(self) -> int:
        return self.images


@dataclass
class Inspection:
    """Everything the report renders."""

    train: Vectors | Catalog
    test: Vectors | Catalog | None
    coords: np.ndarray  # [n, 2]
    map_rows: np.ndarray  # the rows drawn on the map (all, or a uniform sample of map_points)
    findings: list[Finding]
    summary: InspectSummary
    options: InspectOptions
    thumbs: set[str] = field(default_factory=set)
    counts: dict[str, int] = field(default_factory=dict)  # findings per kind where ``findings`` lists the first only
    findings_written: bool = False  # findings.parquet already written (streamed, kind by kind)

"""What inspect and compare are told, every default in one place (light: the CLI reads it at
start-up)."""

from __future__ import annotations

from dataclasses import dataclass, field

from embedder.embed.options import RayOptions
from embedder.errors import InspectError
from embedder.learn.options import ProbeOptions

THUMBNAILS = ("all", "findings", "none")

PROJECTIONS = ("pca", "umap")

GRAPHS = ("auto", "memory", "buckets")

ENGINES = ("local", "ray")

# Cosine at which two images are near-duplicates, for `dedup` and `inspect` alike. Measured with
# MobileNetV2: JPEG-recompressed, 0.7x downscaled copies of photos at 0.93-0.998, distinct photos at
# most 0.63 (docs/benchmarks.md, "Inspect").
NEAR_DUPLICATE_COSINE = 0.90


FENCE = 1.7


@dataclass(frozen=True)
class LabelOptions:
    folds: int = 5
    seed: int = 0
    select_rows: int = 10_000  # C is chosen on at most this many rows
    knn_temperature: float = 0.07
    probe: ProbeOptions = field(default_factory=ProbeOptions)
    # the streamed probe (analysis/label_stream.py): its fold heads are fitted on a uniform sample of
    # at most this many labelled rows (held in memory: 200k x 128 float32 = 98 MiB, x 1,280 = 977 MiB);
    # every other row is predicted by the mean of the K heads
    sample_rows: int = 200_000
    # disagreement rows kept for the report (lowest self-confidence first): 24 bytes each, twice this
    # while a batch is trimmed; every disagreement is still counted
    max_listed: int = 1_000_000


@dataclass(frozen=True)
class InspectOptions:
    label_column: str = "label"
    k: int = 10  # neighbours in the shared kNN graph
    duplicate_threshold: float = NEAR_DUPLICATE_COSINE  # cosine; also the leakage threshold
    outlier_fence: float = FENCE
    folds: int = 5
    projection: str = "pca"
    thumbnails: str = "all"  # all | findings | none
    listed: int = 200  # findings shown per section in the HTML (all are in findings.parquet)
    map_points: int = 100_000  # the map shows a uniform sample beyond this (measured responsive at 100k)
    exact_limit: int = 20_000  # exact kNN graph up to this many vectors, IVF (recall measured) above
    seed: int = 0
    labels: LabelOptions = field(default_factory=LabelOptions)
    # stores above exact_limit: the bucketed graph in bounded memory (analysis.streamed)
    graph: str = "auto"  # auto (exact up to exact_limit, buckets above) | memory (today's in-memory IVF) | buckets
    memory_budget: int | None = None  # bytes; None: a quarter of RAM, at most 2 GiB
    engine: str = "local"  # local | ray (the per-bucket search as Ray tasks)
    bucket_rows: int | None = None  # owners per bucket; None: about 2·sqrt(n), within the budget
    bucket_margin: float = 0.05  # cosine: a vector is a guest of clusters this close to its nearest
    bucket_guests: int = 2  # at most this many guest buckets per vector
    recall_sample: int = 2000  # sampled rows whose exact neighbours measure the graph's recall
    work_dir: str | None = None  # bucket files (about 1.3x the store's vectors); None: beside the report
    ray_task_cpus: float = 0.5
    ray: RayOptions | None = None

    def check(self) -> None:
        if not 0 < self.duplicate_threshold <= 1:
            raise InspectError("--duplicate-threshold is a cosine similarity in (0, 1], "
                               f"got {self.duplicate_threshold}")
        if self.k < 1:
            raise InspectError(f"--k must be at least 1, got {self.k}")
        if self.folds < 2:
            raise InspectError(f"--folds must be at least 2, got {self.folds}")
        if self.projection not in PROJECTIONS:
            raise InspectError(f"unknown projection {self.projection!r}; valid: {', '.join(PROJECTIONS)}")
        if self.graph not in GRAPHS:
            raise InspectError(f"unknown --graph {self.graph!r}; valid: {', '.join(GRAPHS)}")
        if self.engine not in ENGINES:
            raise InspectError(f"unknown --engine {self.engine!r}; valid: {', '.join(ENGINES)}")
        if self.thumbnails not in THUMBNAILS:
            raise InspectError(f"unknown --thumbnails {self.thumbnails!r}; valid: {', '.join(THUMBNAILS)}")


PENULTIMATE = "penultimate"


@dataclass(frozen=True)
class CompareOptions:
    backbones: tuple[str, ...]
    layers: tuple[str, ...] = (PENULTIMATE,)  # or ("all",)
    probe_top: int = 3  # cells that get the full probe (all when ≥ the cell count)
    test_fraction: float = 0.2  # held out from train when no test source is given
    knn_k: int = 20
    seed: int = 0
    device: str = "auto"
    batch_size: int | None = None
    label_column: str = "label"

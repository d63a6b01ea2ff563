"""Prometheus metrics (prometheus-client): requests, latency, stage times, batch sizes, errors, and per
index its generation and vector count, read at scrape time."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from embedder.service.engine import Engine


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("embedder_requests", "HTTP requests", ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("embedder_request_seconds", "Request latency", ["endpoint"], registry=self.registry)
        self.stage = Histogram("embedder_stage_seconds", "Time per stage of a batch", ["stage"],
                               registry=self.registry)
        self.batch = Histogram("embedder_batch_size", "Queries per micro-batch", registry=self.registry,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.errors = Counter("embedder_errors", "Error responses by kind", ["kind"], registry=self.registry)
        self.in_flight = Gauge("embedder_in_flight_requests", "HTTP requests being handled", registry=self.registry)


class IndexGauges:
    """Per served index, read at scrape time: its generation and its vector count."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Any:
        gen = GaugeMetricFamily("embedder_index_generation", "Generation served", labels=["index"])
        count = GaugeMetricFamily("embedder_index_vectors", "Vectors in the served generation", labels=["index"])
        for name, loaded in sorted(self.engine.indexes.items()):
            gen.add_metric([name], loaded.generation)
            count.add_metric([name], int(loaded.index.ntotal))
        yield gen
        yield count

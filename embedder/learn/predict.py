"""Classify new images with a probe (or a fine-tuned checkpoint's own head)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedder.embed.batch import BatchEmbedder
from embedder.embed.lanes import embed_stream
from embedder.embed.options import EmbedOptions, RunOptions
from embedder.embed.query import embedder_for
from embedder.errors import ProbeError
from embedder.io.sources import ImageRef, discover
from embedder.learn.probe import load_probe
from embedder.models.builder import ModelSpec
from embedder.models.heads import LinearHead
from embedder.store.provenance import Provenance
from embedder.store.shards import arrow_to_embeddings


@dataclass
class Predictions:
    table: pa.Table
    failures: list[tuple[str, str]] = field(default_factory=list)


def load_classifier(path: Path, weights: str | None = None, device: str = "auto"
                    ) -> tuple[LinearHead, list[str], BatchEmbedder]:
    """A probe file (embedding as its training store was), or an `embedder finetune` checkpoint
    (whose own head classifies its own penultimate features)."""
    from embedder.models import checkpoint

    if not path.is_file():
        raise ProbeError(f"probe file {path} does not exist")
    if checkpoint.is_checkpoint(path):
        head, classes = checkpoint.head(path)
        return head, classes, BatchEmbedder(ModelSpec(None, weights_file=path), EmbedOptions(device=device))
    head, meta = load_probe(path)
    return head, meta["classes"], embedder_for(Provenance.from_dict(meta["provenance"]), weights, device,
                                               store=meta.get("store"))


def predict(probe_path: Path, sources: Sequence[str], top_k: int = 5, device: str = "auto",
            weights: str | None = None, run: RunOptions = RunOptions(),
            progress: Callable[[int, int, int], None] | None = None) -> Predictions:
    refs = discover(sources)
    head, classes, emb = load_classifier(probe_path, weights, device)
    failures: list[tuple[str, str]] = []

    def on_error(ref: ImageRef, reason: str) -> None:
        failures.append((ref.path, reason))

    k = max(1, min(top_k, len(classes)))
    parts = []
    if progress:
        progress(len(refs), 0, 0)
    with closing(embed_stream(refs, emb, run, on_error)) as stream:
        for table, n_failed in stream:
            if progress:
                progress(len(refs), table.num_rows + n_failed, len(failures))
            if not table.num_rows:
                continue
            feats = arrow_to_embeddings(table.column("embedding"))
            if feats.shape[1] != head.coef.shape[1]:
                raise ProbeError(f"{probe_path}: its head reads {head.coef.shape[1]} features, the model gives "
                                 f"{feats.shape[1]} (a damaged file?)")
            proba = head.proba(feats)
            top = np.argsort(-proba, axis=1)[:, :k]
            parts.append(pa.table({
                "id": table.column("id"), "path": table.column("path"),
                "predicted": pa.array([classes[i] for i in top[:, 0]], pa.string()),
                "probability": pa.array(proba[np.arange(len(top)), top[:, 0]].astype(np.float32)),
                "top_k_labels": pa.array([[classes[i] for i in row] for row in top], pa.list_(pa.string())),
                "top_k_probs": pa.array([proba[r, row].astype(np.float32).tolist() for r, row in enumerate(top)],
                                        pa.list_(pa.float32())),
                "label": table.column("label"),
            }))
    schema = pa.schema([("id", pa.string()), ("path", pa.string()), ("predicted", pa.string()),
                        ("probability", pa.float32()), ("top_k_labels", pa.list_(pa.string())),
                        ("top_k_probs", pa.list_(pa.float32())), ("label", pa.string())])
    table = pa.concat_tables(parts) if parts else schema.empty_table()
    return Predictions(table, failures)


def write(pred: Predictions, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    pq.write_table(pred.table, tmp)
    tmp.replace(out)

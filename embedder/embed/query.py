"""Query embedding: the model a store or index was made with, rebuilt from its provenance, applied to
new images."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from embedder.embed.batch import BatchEmbedder
from embedder.embed.options import EmbedOptions
from embedder.errors import DecodeError, ProvenanceMismatch
from embedder.models.builder import ModelSpec
from embedder.store.provenance import Provenance


def spec_from_provenance(prov: Provenance, weights_file: str | None = None) -> ModelSpec:
    """The ModelSpec that reproduces a store's vectors (for queries and predictions)."""
    path = None
    if prov.weights.needs_file:
        if weights_file is None:
            raise ProvenanceMismatch(f"these vectors were made with {prov.weights.kind} weights "
                                     f"{prov.weights.name}; pass that file with --weights FILE")
        path = Path(weights_file)
    layer = None if prov.layer == "penultimate" else prov.layer
    pool = prov.pool if layer is not None else None
    return ModelSpec(prov.backbone, prov.weights.tag, path, layer, pool, prov.preprocessing.crop_size)



def embedder_for(prov: Provenance, weights_file: str | None = None, device: str = "auto") -> BatchEmbedder:
    """A BatchEmbedder that provably makes vectors comparable with those ``prov`` describes."""
    emb = BatchEmbedder(spec_from_provenance(prov, weights_file),
                        EmbedOptions(device=device, normalize=prov.normalize, precision=prov.precision,
                                     decoder=prov.decoder))
    prov.require(emb.provenance(), store=False, what="the indexed or training vectors were",
                 fix="the query model must be the same backbone, weights, layer, preprocessing and precision")
    return emb



def embed_files(emb: BatchEmbedder, paths: Sequence[str]) -> np.ndarray:
    """Embed a few query images; a file that fails to decode is a one-line error naming it."""
    decoded = []
    for p in paths:
        try:
            decoded.append(emb.decode(p))
        except DecodeError as e:
            raise DecodeError(f"query image {p}: {e}") from None
    return emb.embed_pixels(torch.stack([d.pixels for d in decoded]))


def embed_texts(emb: BatchEmbedder, texts: Sequence[str], metric: str) -> np.ndarray:
    """Text queries against an index of this embedder's image vectors. A CLIP model's text and image
    vectors are compared by cosine: an index that ranks raw vectors by L2 or inner product (built on
    unnormalised vectors) would rank images by their norm as much as by their match, so it is refused."""
    from embedder.errors import TextQueryError

    if metric != "cosine" and emb.options.normalize != "l2":
        raise TextQueryError(f"text queries rank by cosine; this index ranks unnormalised vectors by {metric}: "
                             "build it with --metric cosine (or extract with --normalize l2)")
    return emb.embed_texts(list(texts))


def require_text_tower(prov: Provenance, what: str) -> None:
    """A one-line refusal of text queries on vectors whose model has no text tower (before loading it)."""
    from embedder.errors import TextQueryError

    if not prov.has_text:
        raise TextQueryError(f"{what} was made with {prov.backbone}, which has no text tower: text queries need "
                             "a CLIP-family backbone (open_clip:ARCH:PRETRAINED)")

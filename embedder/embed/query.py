"""Queries: the model a store or index was made with, rebuilt from its provenance, applied to new
images and texts; and the one query builder (``QueryBuilder``) that turns vectors, ids, texts and
images into checked query vectors for the CLI, the Python API and the service alike."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embedder.embed.batch import BatchEmbedder
from embedder.embed.options import EmbedOptions
from embedder.errors import DecodeError, IndexError_, ProvenanceMismatch
from embedder.models.builder import ModelSpec
from embedder.store.provenance import Provenance


def spec_from_provenance(prov: Provenance, weights_file: str | None = None, store: str | None = None) -> ModelSpec:
    """The ModelSpec that reproduces a store's vectors (for queries and predictions). A store made
    from a weights file: WEIGHTS_FILE, else the file STORE's manifest remembers where its SHA-256 still
    matches (``store.remembered``)."""
    if prov.weights.kind == "external":  # `embedder import`: no model embedder can run made them
        raise ProvenanceMismatch(f"these vectors were imported (made by {prov.backbone} outside embedder): no "
                                 "image can be embedded into their space; query by id or by vector")
    path = None
    if prov.weights.needs_file:
        if weights_file is None:
            from embedder.store.remembered import remembered_weights

            weights_file = remembered_weights(store, prov.weights.sha256)
        if weights_file is None:
            raise ProvenanceMismatch(f"these vectors were made with {prov.weights.kind} weights "
                                     f"{prov.weights.name}; pass that file with --weights FILE")
        path = Path(weights_file)
    layer = None if prov.layer == "penultimate" else prov.layer
    pool = prov.pool if layer is not None else None
    return ModelSpec(prov.backbone, prov.weights.tag, path, layer, pool, prov.preprocessing.crop_size)


def embedder_for(prov: Provenance, weights_file: str | None = None, device: str = "auto",
                 store: str | None = None) -> BatchEmbedder:
    """A BatchEmbedder that provably makes vectors comparable with those ``prov`` describes (STORE: where
    they are, for the weights file it remembers)."""
    emb = BatchEmbedder(spec_from_provenance(prov, weights_file, store),
                        EmbedOptions(device=device, normalize=prov.normalize, precision=prov.precision,
                                     decoder=prov.decoder))
    prov.require(emb.provenance(), store=False, what="the indexed or training vectors were",
                 fix="the query model must be the same backbone, weights, layer, preprocessing and precision")
    return emb


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
    """A one-line refusal of text queries on vectors no text tower shares a space with (a model without
    one, or a --layer's output rather than the image embedding), before loading the model."""
    from embedder.errors import TextQueryError

    refusal = prov.text_refusal(what)
    if refusal is not None:
        raise TextQueryError(refusal)


# ---- the one query builder ----------------------------------------------------------------------
# The CLI (`embedder search`), the Python API (`Index.search`) and the service (`Engine.run_batch`)
# turn what they were asked into query vectors here, so that the three accept and refuse the same
# things with the same messages: vectors are checked by the index itself (`LoadedIndex.prepare`:
# shape, finite, a direction where the metric needs one), ids are looked up in it, texts go through
# the text tower, images through the model the index's vectors were made with.

IMAGE_BATCH = 32  # query images embedded per forward pass


@dataclass(frozen=True)
class QueryRequest:
    """What a caller asks for: any mix of vectors ((dim,) or (n, dim)), images (paths, encoded bytes or
    PIL images), texts and stored ids. Answered in that order."""

    vectors: Any = None
    images: tuple[Any, ...] = ()
    texts: tuple[str, ...] = ()
    ids: tuple[str, ...] = ()


class QueryBuilder:
    """Validated query vectors ``(n, dim)`` for one loaded index, prepared for its metric. EMBEDDER
    gives the index's query model when an image or a text needs it (never loaded for vectors or
    ids); it raises a domain error when there is none. MAX_PIXELS: the largest image decoded (None:
    the embedder's own limit). Every refusal is an ``EmbedderError``."""

    def __init__(self, loaded: Any, embedder: Callable[[], BatchEmbedder], max_pixels: int | None = None) -> None:
        self.loaded = loaded
        self._make_embedder = embedder
        self._embedder: BatchEmbedder | None = None
        self.max_pixels = max_pixels

    @property
    def what(self) -> str:
        return f"index {self.loaded.name!r}"

    @property
    def embedder(self) -> BatchEmbedder:
        if self._embedder is None:
            self._embedder = self._make_embedder()
        return self._embedder

    def vectors(self, vectors: Any) -> np.ndarray:
        """A vector ``(dim,)`` or vectors ``(n, dim)``: finite, of the index's dim, with a direction
        where the metric ranks by one (cosine, ip)."""
        try:
            q = np.asarray(vectors, dtype=np.float32)
        except (TypeError, ValueError):
            raise IndexError_(f"query vectors must be numbers, got {type(vectors).__name__}") from None
        if q.ndim == 1:
            q = q[None, :]
        dim = self.loaded.dim
        if q.ndim != 2 or q.shape[1] != dim:
            raise IndexError_(f"query vectors must be (n, {dim}) for {self.what}, got shape {tuple(q.shape)} "
                              f"(dim {q.shape[-1] if q.ndim else 0})")
        if len(q) == 0:
            raise IndexError_(f"no query vectors (shape {tuple(q.shape)}): give at least one")
        return self.loaded.prepare(q)  # type: ignore[no-any-return]

    def vector(self, vector: Any) -> np.ndarray:
        """One query vector, as a flat list or array ``(dim,)``."""
        if np.ndim(vector) != 1:
            raise IndexError_("vector must be a flat list of finite numbers")
        return self.vectors(vector)

    def ids(self, ids: Sequence[str]) -> np.ndarray:
        """The stored vectors of IDS (an unknown id is an ``IndexError_`` naming it)."""
        if not ids:
            return np.empty((0, self.loaded.dim), np.float32)
        return self.loaded.prepare(np.concatenate([self.loaded.vector_of(i) for i in ids]))  # type: ignore[no-any-return]

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts by the text tower of the index's model (refused where it has none, or where the index
        ranks unnormalised vectors by L2 or inner product)."""
        require_text_tower(self.loaded.provenance, self.what)
        return self.loaded.prepare(embed_texts(self.embedder, list(texts), self.loaded.metric))  # type: ignore[no-any-return]

    def decode(self, images: Sequence[Any], map_fn: Callable[..., Any] = map) -> list[torch.Tensor]:
        """Images (paths, encoded bytes or PIL images) → pixels as the index's vectors were decoded;
        MAP_FN may run the decodes in a pool. A bad one is a ``DecodeError`` naming it."""
        from embedder.decode.cpu import pil_pixels
        from embedder.decode.decoders import decode_bytes, decode_file

        for item in images:  # a mistyped path is named before any model loads
            if isinstance(item, (str, Path)) and "://" not in str(item) and not Path(item).is_file():
                raise DecodeError(f"query image {item} is not a file")
        emb = self.embedder
        pre, decoder = emb.loaded.preprocessing, emb.options.decoder
        max_pixels = emb.options.max_pixels if self.max_pixels is None else self.max_pixels

        def one(n_item: tuple[int, Any]) -> torch.Tensor:
            n, item = n_item
            if isinstance(item, (str, Path)):
                try:
                    return decode_file(str(item), pre, max_pixels, decoder).pixels
                except DecodeError as e:
                    raise DecodeError(f"query image {item}: {e}") from None
            if isinstance(item, (bytes, bytearray, memoryview)):
                try:
                    return decode_bytes(bytes(item), pre, max_pixels, decoder)
                except DecodeError as e:
                    raise DecodeError(f"upload is not a usable image: {e}") from None
            if hasattr(item, "convert"):  # a PIL image
                try:
                    return pil_pixels(item, pre, max_pixels)
                except DecodeError as e:
                    raise DecodeError(f"image {n} (PIL image): {e}") from None
            raise DecodeError(f"image {n}: expected a path, bytes or a PIL image, got {type(item).__name__}")

        return list(map_fn(one, enumerate(images)))

    def embed(self, pixels: Sequence[torch.Tensor]) -> np.ndarray:
        """Decoded pixels → query vectors, IMAGE_BATCH at a time."""
        if not pixels:
            return np.empty((0, self.loaded.dim), np.float32)
        parts = [self.embedder.embed_pixels(torch.stack(list(pixels[s:s + IMAGE_BATCH])))
                 for s in range(0, len(pixels), IMAGE_BATCH)]
        return self.loaded.prepare(np.concatenate(parts))  # type: ignore[no-any-return]

    def images(self, images: Sequence[Any]) -> np.ndarray:
        return self.embed(self.decode(images))

    def build(self, request: QueryRequest) -> tuple[np.ndarray, list[str]]:
        """Every query of REQUEST as one ``(n, dim)`` batch, with a label per row (what it was)."""
        parts: list[np.ndarray] = []
        labels: list[str] = []
        if request.vectors is not None:
            parts.append(self.vectors(request.vectors))
            labels += ["vector"] * len(parts[-1])
        if request.images:
            parts.append(self.images(request.images))
            labels += [str(i) if isinstance(i, (str, Path)) else f"image {n}" for n, i in enumerate(request.images)]
        if request.texts:
            parts.append(self.texts(request.texts))
            labels += [f"text:{t}" for t in request.texts]
        if request.ids:
            parts.append(self.ids(request.ids))
            labels += [f"id:{i}" for i in request.ids]
        if not parts:
            raise IndexError_("no query: give vectors, ids, texts or images")
        return np.concatenate(parts), labels

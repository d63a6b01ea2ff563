"""Text → image recall of an index whose store has captions and whose model has a text tower: the
caption of image i, embedded by the text tower, should find image i (recall@1/5/10, the measure
CLIP-style papers report for retrieval). Captions are sampled uniformly (a reservoir over the store's
record batches: memory holds the sample, not the store); a caption the model cannot take whole
(empty, or longer than its context length) is left out and counted, never cut."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from embedder.errors import EmbedderError


@dataclass(frozen=True)
class TextRecallOptions:
    sample: int = 1000  # captions evaluated (a uniform sample of the store's captioned rows)
    ks: tuple[int, ...] = (1, 5, 10)
    batch: int = 64
    seed: int = 0
    weights: str | None = None  # the weights file, when the store was made from one
    device: str = "auto"


def sample_captions(store_path: str, n: int, seed: int) -> tuple[list[str], list[str], int]:
    """(ids, captions) of a uniform sample of N captioned rows, and how many rows have a caption."""
    import pyarrow.compute as pc

    from embedder.store.shards import Store

    store = Store.open(store_path)
    if not store.shard_files():
        return [], [], 0
    rng = np.random.default_rng(seed)
    ids: list[str] = []
    caps: list[str] = []
    seen = 0
    for batch in store.dataset().to_batches(columns=["id", "caption"], filter=pc.field("caption").is_valid()):
        bid, bcap = batch.column(0).to_pylist(), batch.column(1).to_pylist()
        for i, c in zip(bid, bcap):
            if len(ids) < n:
                ids.append(i)
                caps.append(c)
            else:  # reservoir sampling (Algorithm R)
                j = int(rng.integers(0, seen + 1))
                if j < n:
                    ids[j], caps[j] = i, c
            seen += 1
    return ids, caps, seen


def text_to_image_recall(name: str, home: Any = None, options: TextRecallOptions = TextRecallOptions()
                         ) -> dict[str, Any] | None:
    """recall@k for k in ``options.ks``, or None when the model has no text tower or no row has a caption."""
    from embedder.embed.query import embed_texts, embedder_for
    from embedder.index.search import LoadedIndex

    loaded = LoadedIndex(name, home)
    if not loaded.provenance.has_text:
        return None
    ids, caps, captioned = sample_captions(loaded.meta["store"], options.sample, options.seed)
    if not ids:
        return None
    emb = embedder_for(loaded.provenance, options.weights, options.device)
    text = emb.loaded.text
    keep = []
    for n, c in enumerate(caps):
        try:
            text.check([c])
            keep.append(n)
        except EmbedderError:
            pass
    if not keep:
        return {"captions": 0, "skipped": len(caps), "captioned_rows": captioned}
    k = max(options.ks)
    found = np.zeros((len(keep), k), dtype=bool)
    for start in range(0, len(keep), options.batch):
        part = keep[start:start + options.batch]
        vectors = embed_texts(emb, [caps[i] for i in part], loaded.metric)
        hits = loaded.search(vectors, k)
        for row, (i, h) in enumerate(zip(part, hits)):
            found[start + row, :len(h)] = [x["id"] == ids[i] for x in h]
    out: dict[str, Any] = {f"recall_at_{kk}": float(found[:, :kk].any(1).mean()) for kk in options.ks}
    out.update(captions=len(keep), skipped=len(caps) - len(keep), captioned_rows=captioned)
    return out

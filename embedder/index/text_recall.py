"""Text → image recall of an index whose store has captions and whose model has a text tower: the
caption of image i, embedded by the text tower, should find image i (recall@1/5/10, the measure
CLIP-style papers report for retrieval). Measured by the build itself (``embedder.index.build``) and
saved in the index record (``index.json``'s ``text_recall``).

The sample is drawn by row number first: the captioned rows of each Parquet row group are counted
from its footer (the caption column's null count; the column's validity where a writer left no
statistics), the sample's ranks among all captioned rows are drawn at once, and only the row groups
that hold one are read, column ``caption`` alone: no Python call per store row. A row's number is its
FAISS id (both builds number the store's rows in shard order). A caption the model cannot take whole
(empty, or longer than its context length) is left out and counted, never cut."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from embedder.errors import EmbedderError

CAPTION = "caption"


@dataclass(frozen=True)
class TextRecallOptions:
    sample: int = 1000  # captions evaluated (a uniform sample of the store's captioned rows)
    ks: tuple[int, ...] = (1, 5, 10)
    batch: int = 64
    seed: int = 0
    weights: str | None = None  # the weights file, when the store was made from one
    device: str = "auto"


@dataclass(frozen=True)
class CaptionSample:
    rows: np.ndarray  # int64 store row numbers (= FAISS ids), ascending
    captions: list[str]
    captioned_rows: int  # captioned rows among those considered


def _caption_leaf(metadata: Any) -> int | None:
    for i in range(metadata.num_columns):
        if metadata.schema.column(i).path == CAPTION:
            return i
    return None


def _valid_positions(pf: Any, group: int, rows: int) -> tuple[np.ndarray, Any]:
    """Positions of the non-null captions among the first ROWS of row group GROUP, and the column."""
    import pyarrow.compute as pc

    col = pf.read_row_group(group, columns=[CAPTION]).column(0).combine_chunks().slice(0, rows)
    valid = np.asarray(pc.is_valid(col).to_numpy(zero_copy_only=False), dtype=bool)
    return np.flatnonzero(valid), col


def sample_captions(store_path: str, n: int, seed: int, limit: int | None = None) -> CaptionSample:
    """A uniform sample (without replacement) of N captioned rows among the store's first LIMIT rows
    (all of them by default): their row numbers and captions."""
    import pyarrow as pa

    from embedder.io import storage
    from embedder.store.shards import Store

    store = Store.open(store_path)
    groups: list[tuple[Any, int, int, int, int]] = []  # (file, row group, first row, rows, captioned)
    start = 0
    for f in store.shard_files():
        if limit is not None and start >= limit:
            break
        pf = storage.open_parquet(f)
        md = pf.metadata
        leaf = _caption_leaf(md)
        for g in range(md.num_row_groups):
            total = md.row_group(g).num_rows
            rows = total if limit is None else max(0, min(total, limit - start))
            if rows and leaf is not None:
                stats = md.row_group(g).column(leaf).statistics
                if stats is not None and stats.has_null_count and rows == total:
                    captioned = total - int(stats.null_count)
                else:  # no statistics, or a row group cut by LIMIT: count from the column itself
                    captioned = len(_valid_positions(pf, g, rows)[0])
                if captioned:
                    groups.append((pf, g, start, rows, captioned))
            start += total
    counts = np.array([g[4] for g in groups], dtype=np.int64)
    captioned_rows = int(counts.sum())
    if captioned_rows == 0 or n <= 0:
        return CaptionSample(np.empty(0, np.int64), [], captioned_rows)
    rng = np.random.default_rng(seed)
    ranks = np.sort(rng.choice(captioned_rows, size=min(n, captioned_rows), replace=False))
    firsts = np.concatenate([[0], np.cumsum(counts)])
    out_rows, out_caps = [], []
    for gi in np.unique(np.searchsorted(firsts, ranks, side="right") - 1):  # only the groups drawn
        pf, g, first_row, rows, _ = groups[gi]
        mine = ranks[(ranks >= firsts[gi]) & (ranks < firsts[gi + 1])] - firsts[gi]
        valid, col = _valid_positions(pf, g, rows)
        picked = valid[mine]
        out_rows.append(first_row + picked)
        out_caps += col.take(pa.array(picked)).to_pylist()
    return CaptionSample(np.concatenate(out_rows).astype(np.int64), out_caps, captioned_rows)


def measure(store_path: str, provenance: Any, metric: str, search: Callable[[np.ndarray, int], np.ndarray],
            count: int, options: TextRecallOptions = TextRecallOptions()) -> dict[str, Any] | None:
    """recall@k for k in ``options.ks`` of the index SEARCH answers for (query vectors, k → FAISS ids,
    (n, k), -1 for none), over the first COUNT rows of the store at STORE_PATH; None when the model
    has no text tower or no row has a caption. Raises the domain error that keeps it from being
    measured (a missing weights file, an index that ranks unnormalised vectors)."""
    from embedder.embed.query import embed_texts, embedder_for

    if not provenance.has_text:
        return None
    sample = sample_captions(store_path, options.sample, options.seed, count)
    if not len(sample.rows):
        return None
    emb = embedder_for(provenance, options.weights, options.device, store=store_path)
    text = emb.loaded.text
    if text is None:
        return None
    keep = []
    for n, c in enumerate(sample.captions):  # a sample's worth of checks, never a store's
        try:
            text.check([c])
            keep.append(n)
        except EmbedderError:
            pass
    out: dict[str, Any] = {"captions": len(keep), "skipped": len(sample.captions) - len(keep),
                           "captioned_rows": sample.captioned_rows, "rows": count}
    if not keep:
        return out
    k = max(options.ks)
    found = np.zeros((len(keep), k), dtype=bool)
    for s in range(0, len(keep), options.batch):
        part = keep[s:s + options.batch]
        ids = search(embed_texts(emb, [sample.captions[i] for i in part], metric), k)
        found[s:s + len(part), :ids.shape[1]] = ids == sample.rows[part][:, None]
    out.update({f"recall_at_{kk}": float(found[:, :kk].any(1).mean()) for kk in options.ks})
    return out

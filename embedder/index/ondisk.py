"""Indexes larger than RAM: a streamed IVF build with on-disk inverted lists.

Used by ``index build`` for IVF kinds when the raw vectors exceed the memory budget (or with
``--on-disk``). Nothing holds all vectors: the store is read shard by shard and record batch by
record batch, twice —
1. a uniform random sample across all shards (global row numbers drawn up front, so every shard
   contributes in proportion to its size, never "the first rows") for training, and the held-out
   queries;
2. every row: normalised, its float16 copy written into a memory-mapped ``vectors.npy`` (exact
   re-ranking, lookups by id), its id-map row appended to an Arrow IPC file (``ids.arrow``: FAISS id
   = store row number = id-map row, memory-mapped when loaded), added to a slice index that is
   written to disk whenever it reaches its share of the budget, and streamed through the exact
   ground truth of the held-out queries (a running top-k, ``faiss.ResultHeap``).
The slices are merged into one ``lists.ivfdata`` (FAISS ``OnDiskInvertedLists``, as
``faiss.contrib.ondisk.merge_ondisk`` does) that search maps from disk, so the codes may exceed RAM.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from embedder.errors import IndexError_
from embedder.index.faiss_util import import_faiss, no_precomputed_tables, set_quantizer_ef
from embedder.native_output import quiet

log = logging.getLogger(__name__)

IDS_ARROW = "ids.arrow"
LISTS_FILE = "lists.ivfdata"
TRAINED_FILE = "trained.faiss"  # the empty trained index: `index add` merges new slices with it


def read_ondisk(path: str) -> Any:
    """Open an index whose lists lie beside its index file. A generation is self-contained: its
    header names the lists file alone, never an absolute path, so a copied or moved index home reads
    its own lists (FAISS's IO_FLAG_ONDISK_SAME_DIR), never the original's."""
    faiss = import_faiss()
    with no_precomputed_tables(), quiet(stderr=False):  # its printf: "IO_FLAG_ONDISK_SAME_DIR: …"
        return faiss.read_index(path, faiss.IO_FLAG_ONDISK_SAME_DIR)


def point_lists_at(index: Any, final: Path) -> None:
    """Record the lists file by its name alone (see ``read_ondisk``); FINAL is where it will live."""
    faiss = import_faiss()
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    lists.filename = final.name


def merge_lists(trained: Any, fnames: list[str], ivfdata: str) -> Any:
    """``faiss.contrib.ondisk.merge_ondisk``, with the slices read memory-mapped and the merged
    lists written to IVFDATA; returns the index (its lists on disk)."""
    faiss = import_faiss()
    if trained.ntotal != 0:
        raise IndexError_("internal: merging into a non-empty index")
    return merge_into(trained, [faiss.read_index(f, faiss.IO_FLAG_MMAP) for f in fnames], ivfdata)


def merge_into(out: Any, sources: list[Any], ivfdata: str) -> Any:
    """The inverted lists of SOURCES (kept alive by the caller's list meanwhile) merged into one
    on-disk file IVFDATA, which becomes OUT's lists."""
    faiss = import_faiss()
    out_ivf = faiss.extract_index_ivf(out)
    invlists = faiss.OnDiskInvertedLists(out_ivf.nlist, out_ivf.code_size, ivfdata)
    vec = faiss.InvertedListsPtrVector()
    for src in sources:
        vec.push_back(faiss.extract_index_ivf(src).invlists)
    with quiet(stderr=False):  # FAISS prints "resizing …" (stdout) as the file grows
        ntotal = invlists.merge_from_multiple(vec.data(), vec.size(), False)
    out.ntotal = out_ivf.ntotal = ntotal
    out_ivf.replace_invlists(invlists, True)
    invlists.this.disown()
    set_quantizer_ef(out)  # merged indexes are searched
    return out


# ---- delta slices: an add costs what it adds -----------------------------------------------
# An `index add` to an on-disk index writes the new rows as a delta beside the current lists (hard
# links to the unchanged files, so the new generation is still one self-contained folder); search
# reads the lists and the deltas as one (FAISS's HStackInvertedLists: each inverted list is the
# concatenation of the list in every part, so results are those of a single index). The deltas are
# merged into the lists when they hold more than DELTA_FRACTION of the rows or number DELTA_MAX.
DELTA_FRACTION = 0.10
DELTA_MAX = 16


class RowStack:
    """Several row-aligned arrays (the float16 re-rank copies of the lists and of each delta) read as
    one: rows (an index array, or a slice) by global row number."""

    def __init__(self, parts: list[np.ndarray]) -> None:
        self.parts = parts
        self.starts = np.cumsum([0, *(len(p) for p in parts)])
        self.shape = (int(self.starts[-1]), int(parts[0].shape[1]))
        self.dtype = parts[0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: Any) -> np.ndarray:
        if isinstance(rows, slice):
            rows = np.arange(*rows.indices(self.shape[0]))
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.shape[1]), self.dtype)
        part = np.searchsorted(self.starts, rows, side="right") - 1
        for i, arr in enumerate(self.parts):
            m = part == i
            if m.any():
                out[m] = arr[rows[m] - self.starts[i]]
        return out


def stack_deltas(index_file: str, trained_file: str, delta_files: list[str]) -> tuple[Any, list[Any]]:
    """An index that searches the lists of INDEX_FILE (on disk) and every delta as one set of inverted
    lists: a copy of the trained empty index whose lists are FAISS's HStackInvertedLists of theirs.
    Returns it and what must stay alive while it is used (it owns none of the lists: the indexes
    they came from do, each as FAISS made it, so nothing changes owner)."""
    faiss = import_faiss()
    with no_precomputed_tables():
        base = read_ondisk(index_file)
        deltas = [faiss.read_index(f) for f in delta_files]
        combined = faiss.read_index(trained_file)
    parts = faiss.InvertedListsPtrVector()
    for ix in (base, *deltas):
        parts.push_back(faiss.extract_index_ivf(ix).invlists)
    stacked = faiss.HStackInvertedLists(parts.size(), parts.data())
    ivf = faiss.extract_index_ivf(combined)
    ivf.replace_invlists(stacked, False)  # the trained copy's own (empty) lists are freed by FAISS
    ivf.ntotal = combined.ntotal = int(base.ntotal) + sum(int(d.ntotal) for d in deltas)
    set_quantizer_ef(combined)
    return combined, [base, deltas, stacked, parts]


def link_or_copy(src: Path, dst: Path) -> None:
    """DST the same file as SRC without copying (a hard link), or a copy where links are refused."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)

"""The id order's lookups (``id_index.order_of`` / ``find``, what filters and lookups by id use at
load) when many ids share their digest's first 8 bytes: ids of 32 hex characters are their own
digest, so zero-padded numbers ("0000…0042") all share them. Each lookup stays a binary search
(review of issue 35, item 4: it was a scan of the whole run per lookup, quadratic in the rows)."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from embedder.store import id_index

N = 150_000


def test_lookups_among_ids_sharing_their_first_8_bytes_stay_logarithmic() -> None:
    ids = pa.array([f"{i:032d}" for i in range(N)])  # hex-shaped: the digest is the text itself
    d = id_index.digests(ids)
    assert len(np.unique(np.ascontiguousarray(d).view(np.uint64).reshape(-1, 2)[:, 0])) == 1  # one run
    shuffled = np.random.default_rng(0).permutation(N)
    d = d[shuffled]  # rows in no particular order
    order = id_index.order_of(d)
    sorted_d = d[order]
    asked = np.concatenate([d, id_index.digests(pa.array([f"{N + i:032d}" for i in range(1000)] + ["x", ""]))])
    t0 = time.perf_counter()
    pos = id_index.find(sorted_d, asked)
    took = time.perf_counter() - t0
    assert (pos[N:] == -1).all()  # absent ids: not found
    np.testing.assert_array_equal(order[pos[:N]], np.arange(N))  # each id found at its own row
    assert took < 3.0, f"{N:,} lookups took {took:.1f} s"
    # a mix: most ids hashed (uniform), a few sharing a prefix, looked up together
    mixed = np.concatenate([id_index.digests(pa.array([f"id{i}" for i in range(5000)])), d[:50]])
    o = id_index.order_of(mixed)
    np.testing.assert_array_equal(o[id_index.find(mixed[o], mixed)], np.arange(len(mixed)))

"""The id order's lookups (``id_index.order_of`` / ``find``, what filters and lookups by id use at
load) when many ids share their digest's first 8 bytes: ids of 32 hex characters are their own
digest, so zero-padded numbers ("0000…0042") all share them. Each lookup stays a binary search
(review of issue 35, item 4: it was a scan of the whole run per lookup, quadratic in the rows)."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pytest

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


def test_find_and_contains_agree_with_a_set_when_digests_share_halves(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small random digests with few distinct halves (runs, repeats, absent ones sharing a first
    half) looked up by ``find`` and ``contains_digests``, against numpy's set membership."""
    rng = np.random.default_rng(7)

    def digests(k: int) -> np.ndarray:
        halves = np.stack([rng.integers(0, 3, k), rng.integers(0, 6, k)], 1).astype(np.uint64)
        return halves.copy().view(id_index.DIGEST).ravel()

    for _ in range(200):
        d, asked = digests(int(rng.integers(1, 60))), digests(int(rng.integers(1, 60)))
        order = id_index.order_of(d)
        pos = id_index.find(d[order], asked)
        assert ((pos >= 0) == np.isin(asked, d)).all()
        assert (d[order][pos[pos >= 0]] == asked[pos >= 0]).all()
        shards = {f"s{j}": digests(int(rng.integers(0, 40))) for j in range(int(rng.integers(0, 4)))}
        monkeypatch.setattr(id_index, "load", lambda s: np.sort(shards[s]))  # noqa: B023
        held = np.concatenate([*shards.values(), np.empty(0, id_index.DIGEST)])
        assert (id_index.contains_digests(list(shards), asked) == np.isin(asked, held)).all()

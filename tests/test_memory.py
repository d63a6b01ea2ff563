"""Extraction memory must not grow with the number of images."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_extraction_rss_does_not_grow_with_the_collection(tmp_path: Path) -> None:
    """Before the fix, RSS grew ~0.35 MiB per image on this run (947 → 1157 MiB from a quarter of
    the way to the end); a model with real activations (MobileNetV2) is needed to show it, the tiny
    test backbone's are too small. Measured in a fresh process so nothing else shares the heap."""
    script = Path(__file__).parent / "scripts" / "extract_rss.py"
    r = subprocess.run([sys.executable, str(script), str(tmp_path), "800"], capture_output=True, text=True,
                       timeout=300, cwd=Path(__file__).parent.parent)
    assert r.returncode == 0, r.stderr[-2000:]
    samples = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(samples) > 50
    quarter, end = samples[len(samples) // 4], max(samples[len(samples) // 4:])
    assert end - quarter < 40, f"RSS grew {end - quarter:.0f} MiB over 600 images: {samples[::10]}"


def _probe_rss(store: str, budget: int | None = None) -> dict[str, float]:
    script = Path(__file__).parent / "scripts" / "probe_rss.py"
    r = subprocess.run([sys.executable, str(script), store] + ([str(budget)] if budget else []),
                       capture_output=True, text=True, timeout=600, cwd=Path(__file__).parent.parent)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.slow
def test_probe_memory_is_one_float32_copy_and_streams_past_its_budget(tmp_path: Path) -> None:
    """What the probe's memory grows by when the store doubles (40,000 → 80,000 x 256 float32: +39
    MiB of vectors; fixed costs such as torch's first kernels cancel out). In memory the vectors are
    held once: no Arrow table beside the matrix, no float64 copy for the solver, no standardised or
    per-fold copies (measured before: +362 MiB, 9.3 times the vectors' growth; now 1.35-1.6
    times). Past --memory-budget they are read from the store on every pass, and the peak hardly
    moves."""
    import numpy as np

    from embedder.models.registry import get_backbone
    from embedder.store.provenance import Provenance, WeightsRef
    from embedder.store.shards import Store
    from tests.test_index import _write_vectors

    rng = np.random.default_rng(0)
    dim = 256
    stores = {}
    prov = Provenance("synthetic", WeightsRef("file", "none", "0"), "penultimate", "avg",
                      get_backbone("tiny_test").preprocessing(), dim)
    for n in (40_000, 80_000):
        y = rng.integers(0, 5, n)
        x = (np.maximum(rng.normal(0, 1, (n, dim)) + 1.2 * np.eye(5, dim)[y], 0)).astype(np.float32)
        with Store.writer(tmp_path / f"s{n}", prov) as st:
            for s in range(0, n, 4096):  # shards of 4,096 rows, as `extract` writes them
                _write_vectors(st, x[s:s + 4096], [f"c{v}" for v in y[s:s + 4096]], s)
        stores[n] = str(tmp_path / f"s{n}")
        del x
    step = 40_000 * dim * 4 / 2**20
    held = {n: _probe_rss(s) for n, s in stores.items()}
    assert not any(h["streamed"] for h in held.values())
    grow = {n: h["peak"] - h["before"] for n, h in held.items()}
    assert grow[80_000] - grow[40_000] <= 2.0 * step, (held, step)  # measured 1.35-1.6 (allocator noise)
    streamed = {n: _probe_rss(s, 4 << 20) for n, s in stores.items()}
    assert all(h["streamed"] for h in streamed.values())
    sgrow = {n: h["peak"] - h["before"] for n, h in streamed.items()}
    assert sgrow[80_000] - sgrow[40_000] <= 0.5 * step, (streamed, step)

"""The streamed cross-validated probe behind label errors (analysis/label_stream.py): the same answer
as the in-memory path when the sample is everything, the same answer whatever the batches, a
bounded list of disagreements, and the in-memory path's refusals."""

from __future__ import annotations

import numpy as np
import pytest

from embedder.analysis.label_stream import LabelStream, StreamedLabels, cross_validated_issues
from embedder.analysis.labels import class_overlap, cross_validate, label_issues
from embedder.analysis.options import LabelOptions
from embedder.errors import ProbeError
from embedder.learn.options import ProbeOptions
from tests.test_inspect import classes_data

# a narrow C grid keeps each probe well under a second; both paths get the same one
FAST = LabelOptions(probe=ProbeOptions(c_min_exp=-1, c_max_exp=2, refine=False, standardize="no"))
CLASSES = [f"c{i}" for i in range(6)]


def noisy_data(seed: int = 3, per_class: int = 100) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Unit vectors, 5 % of labels flipped: (x, true y, given y, flipped positions)."""
    x, y = classes_data(per_class=per_class)
    xn = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    rng = np.random.default_rng(seed)
    flip = rng.choice(len(y), len(y) // 20, replace=False)
    noisy = y.copy()
    noisy[flip] = (y[flip] + rng.integers(1, 6, len(flip))) % 6
    return xn, y, noisy, flip


def run(stream: LabelStream, rows: np.ndarray, x: np.ndarray, y: np.ndarray, sizes: list[int],
        seed: int | None) -> StreamedLabels:
    """Both passes, each over its own random order (SEED None: store order) cut into batches of SIZES."""
    for add in (stream.add_thresholds, stream.add):
        order = np.arange(len(y)) if seed is None else np.random.default_rng(seed + id(add) % 7).permutation(len(y))
        s, i = 0, 0
        while s < len(order):
            part = order[s:s + sizes[i % len(sizes)]]
            add(rows[part], x[part], y[part])
            s += len(part)
            i += 1
    return stream.result()


def test_whole_set_as_sample_matches_the_in_memory_probe() -> None:
    x, y, noisy, flip = noisy_data()
    rows = np.arange(len(y), dtype=np.int64) * 3 + 7  # store rows, not positions
    cv = cross_validate(x, noisy, rows, CLASSES, FAST)
    old = label_issues(cv)
    old_overlaps = class_overlap(cv)
    new = cross_validated_issues(x, noisy, rows, CLASSES, FAST)

    assert new.accuracy == cv.accuracy and (new.C, new.standardize, new.folds) == (cv.C, cv.standardize, cv.folds)
    assert new.trained_on == new.seen == len(y)
    # the possible tier (every disagreement), in the same order, with the same numbers
    assert new.disagreements == new.listed == len(old.rows)
    np.testing.assert_array_equal(new.issues.rows, old.rows)
    np.testing.assert_array_equal(new.issues.given, old.given)
    np.testing.assert_array_equal(new.issues.suggested, old.suggested)
    np.testing.assert_array_equal(new.issues.self_confidence, old.self_confidence)
    np.testing.assert_allclose(new.issues.thresholds, old.thresholds, atol=1e-6)
    assert [(o.a, o.b, o.rate, o.count, o.example_rows.tolist()) for o in new.overlaps] == \
        [(o.a, o.b, o.rate, o.count, o.example_rows.tolist()) for o in old_overlaps]
    # the likely tier: confident learning ranked within (given, suggested) cells, not over all rows
    truth = set((flip * 3 + 7).tolist())
    old_likely = set(old.rows[old.likely].tolist())
    new_likely = set(new.issues.rows[new.issues.likely].tolist())
    assert len(old_likely & new_likely) / len(old_likely | new_likely) >= 0.9
    for likely in (old_likely, new_likely):
        assert len(likely & truth) / len(likely) >= 0.9
        assert len(likely & truth) / len(truth) >= 0.55  # at FAST's C=1 (0.77 and 0.73 at the chosen C=0.1)


def test_any_batches_in_any_order_give_the_same_result() -> None:
    x, _y, noisy, _flip = noisy_data()
    rows = np.arange(len(noisy), dtype=np.int64)
    sample = np.sort(np.random.default_rng(0).choice(len(noisy), 240, replace=False))  # 40 %
    stream = LabelStream(6, rows[sample], x[sample], noisy[sample], FAST)
    assert stream.trained_on == 240
    one = run(stream, rows, x, noisy, [len(noisy)], None)
    for sizes, seed in (([1, 7, 64, 300], 1), ([33], 2)):
        again = LabelStream(6, rows[sample], x[sample], noisy[sample], FAST)
        other = run(again, rows, x, noisy, sizes, seed)
        assert (other.accuracy, other.seen, other.disagreements, other.listed) == \
            (one.accuracy, one.seen, one.disagreements, one.listed)
        np.testing.assert_array_equal(other.issues.rows, one.issues.rows)
        np.testing.assert_array_equal(other.issues.suggested, one.issues.suggested)
        np.testing.assert_array_equal(other.issues.likely, one.issues.likely)
        np.testing.assert_allclose(other.issues.self_confidence, one.issues.self_confidence, rtol=1e-6)
        # BLAS rounds a row's float32 probabilities a little differently in batches of other sizes
        np.testing.assert_allclose(other.issues.thresholds, one.issues.thresholds, rtol=1e-6)
        assert [(o.a, o.b, o.count, o.example_rows.tolist()) for o in other.overlaps] == \
            [(o.a, o.b, o.count, o.example_rows.tolist()) for o in one.overlaps]


def test_sample_rows_get_their_fold_head_and_the_rest_the_mean_of_all_heads() -> None:
    x, _y, noisy, _flip = noisy_data()
    rows = np.arange(len(noisy), dtype=np.int64)
    sample = np.arange(0, len(noisy), 2)
    stream = LabelStream(6, rows[sample], x[sample], noisy[sample], FAST)
    shuffled = np.random.default_rng(5).permutation(len(noisy))
    p = stream.proba(rows[shuffled], x[shuffled])
    assert p.dtype == np.float32 and p.shape == (len(noisy), 6)
    for i, r in enumerate(shuffled[:40]):
        if r % 2 == 0:
            want = stream.heads[stream.fold[r // 2]].proba(x[r:r + 1])[0]
        else:
            want = np.mean([h.proba(x[r:r + 1])[0] for h in stream.heads], 0)
        np.testing.assert_allclose(p[i], want, rtol=1e-5, atol=1e-7)


def test_bounded_list_keeps_the_lowest_self_confidence() -> None:
    x, _y, noisy, _flip = noisy_data()
    rows = np.arange(len(noisy), dtype=np.int64)
    full = cross_validated_issues(x, noisy, rows, CLASSES, FAST)
    assert full.listed > 12
    small = LabelStream(6, rows, x, noisy, LabelOptions(probe=FAST.probe, max_listed=5))
    got = run(small, rows, x, noisy, [17, 50], 4)  # trimmed many times on the way
    assert got.disagreements == full.disagreements and got.listed == 5
    np.testing.assert_array_equal(got.issues.rows, full.issues.rows[:5])
    assert got.accuracy == full.accuracy
    assert [(o.a, o.b, o.count) for o in got.overlaps] == [(o.a, o.b, o.count) for o in full.overlaps]


@pytest.mark.parametrize("y", [[0] * 8, [0, 0, 0, 0, 0, 1], [0, 1, 2]])
def test_one_class_or_too_few_labels_raise_probe_error(y: list[int]) -> None:
    x, _ = classes_data(per_class=2)
    xn = (x[:len(y)] / np.linalg.norm(x[:len(y)], axis=1, keepdims=True)).astype(np.float32)
    with pytest.raises(ProbeError):
        cross_validated_issues(xn, np.array(y), np.arange(len(y)), CLASSES, FAST)
    with pytest.raises(ProbeError):
        cross_validate(xn, np.array(y), np.arange(len(y)), CLASSES, FAST)  # the in-memory path agrees

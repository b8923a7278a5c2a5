"""find_issues(batched=True) flags exactly what the in-memory path flags, for every filter_by, without
ever holding pred_probs whole (issue #16, item 5)."""

from __future__ import annotations

import sys
import tracemalloc
import warnings
from unittest import mock

import numpy as np
import pandas as pd
import pytest
from cleanlab.count import compute_confident_joint
from cleanlab.filter import _keep_at_least_n_per_class
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cleanloop import cleaning
from cleanloop.cleaning import FILTER_BY, check_pred_probs, find_issues

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
from synth import make_oof  # noqa: E402

OPTIONS = ({}, {"frac_noise": 0.6, "min_examples_per_class": 5})


def uniform_rounded(n: int = 2_000, k: int = 7, seed: int = 0):
    """Uniform label noise (15%, to any other class of 0..5), probabilities rounded to 0.05 (many equal
    margins), class 6 with only 3 rows, and a few values just outside [0, 1] that check_pred_probs clips."""
    rng = np.random.default_rng(seed)
    true = rng.integers(0, k - 1, n)
    true[rng.choice(n, 3, replace=False)] = k - 1
    labels = true.copy()
    flip = (rng.random(n) < 0.15) & (true < k - 1)  # among classes 0..5: class 6 keeps its 3 rows
    labels[flip] = (true[flip] + rng.integers(1, k - 1, flip.sum())) % (k - 1)
    alpha = np.full((n, k), 0.3)
    alpha[np.arange(n), true] = 3.0
    scores = rng.gamma(alpha)
    probs = np.round(scores / scores.sum(axis=1, keepdims=True) * 20) / 20
    probs[5, 0], probs[9, 1] = 1 + 5e-7, -5e-7  # within PROB_TOLERANCE: clipped, not rejected
    return labels, probs


def sorted_by_class(n: int = 2_400, k: int = 5):
    """Class-conditional noise with the rows sorted by given label: every class spans many chunks."""
    labels, probs, _ = make_oof(n, k, seed=7)
    order = np.argsort(labels, kind="stable")
    return labels[order], probs[order]


def as_memmap(tmp_path, probs: np.ndarray) -> np.memmap:
    np.save(tmp_path / "pred_probs.npy", probs)
    return np.load(tmp_path / "pred_probs.npy", mmap_mode="r")


def run(labels, probs, **kwargs):
    """find_issues' frame and the messages of the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = find_issues(labels, probs, **kwargs)
    return found, sorted(str(w.message) for w in caught)


@pytest.mark.parametrize("filter_by", FILTER_BY)
@pytest.mark.parametrize("case", ["class_conditional_memmap", "uniform_rounded", "sorted_by_class"])
def test_batched_equals_in_memory(tmp_path, monkeypatch, case, filter_by):
    if case == "class_conditional_memmap":  # float32 on disk, as B2 reads it; 97-row chunks
        labels, probs, _ = make_oof(3_000, 12, seed=3)
        probs, rows = as_memmap(tmp_path, probs), 97
    elif case == "uniform_rounded":
        (labels, probs), rows = uniform_rounded(), 61
    else:  # 40-row chunks, classes of hundreds of rows
        (labels, probs), rows = sorted_by_class(), 40
    monkeypatch.setattr(cleaning, "BATCH_CELLS", rows * probs.shape[1])
    for options in OPTIONS:
        batched, batched_warnings = run(labels, probs, filter_by=filter_by, batched=True, **options)
        in_memory, in_memory_warnings = run(labels, np.asarray(probs), filter_by=filter_by, batched=False,
                                            **options)
        pd.testing.assert_frame_equal(batched, in_memory, check_exact=True)
        assert batched_warnings == in_memory_warnings  # cleanlab's own, e.g. a class below min_examples
        if case == "uniform_rounded" and options and filter_by in cleaning.PRUNE_FILTERS:
            assert any("class: 6, it has too few examples" in w for w in batched_warnings)
        assert 0 < batched["is_label_issue"].sum() < len(labels)


@st.composite
def small_cases(draw):
    """Classes of 0, 1, 2... rows, probabilities rounded coarsely or not, any chunk size and options."""
    k = draw(st.integers(2, 6))
    n = draw(st.integers(4, 120))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    labels = rng.integers(0, draw(st.integers(2, k)), n)
    labels[:2] = [0, 1]  # cleanlab in memory wants two classes at least
    probs = rng.dirichlet(np.full(k, draw(st.sampled_from([0.1, 0.5, 2.0]))), n)
    decimals = draw(st.sampled_from([None, 1, 2]))
    probs = probs if decimals is None else np.round(probs, decimals)
    return labels, probs, {"filter_by": draw(st.sampled_from(FILTER_BY)),
                           "frac_noise": draw(st.sampled_from([1.0, 0.5, 0.25])),
                           "min_examples_per_class": draw(st.integers(0, 6))}, draw(st.integers(1, n))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=small_cases())
def test_batched_equals_in_memory_on_any_small_case(case):
    labels, probs, options, rows = case
    with mock.patch.object(cleaning, "BATCH_CELLS", rows * probs.shape[1]):
        batched, batched_warnings = run(labels, probs, batched=True, **options)
    in_memory, in_memory_warnings = run(labels, probs, batched=False, **options)
    pd.testing.assert_frame_equal(batched, in_memory, check_exact=True)
    assert batched_warnings == in_memory_warnings


def test_ties_at_the_cut_are_broken_as_cleanlabs_unstable_sort_breaks_them(monkeypatch):
    labels, probs = uniform_rounded(seed=1)
    # The data has pairs whose cut falls among equal margins, where a stable sort picks other rows.
    p = check_pred_probs(probs, n_rows=len(labels), n_classes=probs.shape[1])
    prune = _keep_at_least_n_per_class(compute_confident_joint(labels, p).T, n=1)
    differ = 0
    for c, j in zip(*np.nonzero(prune.T), strict=True):
        mine = p[labels == c]
        margin = mine[:, j] - mine[:, c]
        if c != j and prune[j, c] < len(mine):
            cut = prune[j, c]
            differ += set(np.argsort(-margin)[:cut]) != set(np.argsort(-margin, kind="stable")[:cut])
    assert differ >= 3
    monkeypatch.setattr(cleaning, "BATCH_CELLS", 50 * probs.shape[1])
    for filter_by in ("prune_by_noise_rate", "both"):
        pd.testing.assert_frame_equal(find_issues(labels, probs, filter_by=filter_by, batched=True),
                                      find_issues(labels, probs, filter_by=filter_by, batched=False))


def test_one_chunk_and_one_row_chunks_agree(monkeypatch):
    labels, probs, _ = make_oof(400, 6, seed=11)
    want = find_issues(labels, probs, batched=False)
    for cells in (10**9, 6):  # everything in one chunk; one row per chunk
        monkeypatch.setattr(cleaning, "BATCH_CELLS", cells)
        pd.testing.assert_frame_equal(find_issues(labels, probs, batched=True), want)


def test_batched_never_holds_pred_probs_whole(tmp_path, monkeypatch):
    n, k = 20_000, 200
    labels, probs, _ = make_oof(n, k, seed=5)
    memmap = as_memmap(tmp_path, probs)
    del probs
    whole = n * k * 8  # pred_probs as the float64 array the in-memory path makes
    monkeypatch.setattr(cleaning, "BATCH_CELLS", 100 * k)
    tracemalloc.start()
    try:
        find_issues(labels, memmap, batched=True)  # prune_by_noise_rate: the most kept between passes
        _, batched_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        find_issues(labels, memmap, batched=False)
        _, in_memory_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # A few chunks (160 kB each), about 100 bytes per row (the outputs, self-confidences, class order)
    # and a few K x K count matrices: 12% of pred_probs as float64 here, nothing of N x K.
    assert batched_peak < whole / 6, batched_peak
    assert in_memory_peak > whole  # the measure sees a whole copy when there is one

"""Issue 12: the verdict (helped / hurt / inconclusive) from constructed intervals and bootstraps."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cleanloop.bootstrap import paired_bootstrap
from cleanloop.verdict import decide, describe, top_issue_classes, verdict


@pytest.mark.parametrize(("low", "high", "expected"), [
    (0.01, 0.05, "helped"),          # wholly above zero
    (-0.05, -0.002, "hurt"),         # wholly below zero
    (-0.01, 0.03, "inconclusive"),   # straddles zero
    (0.0, 0.04, "inconclusive"),     # touching zero is not a gain
    (-0.04, 0.0, "inconclusive"),    # nor a loss
    (float("nan"), 0.1, "inconclusive"),  # a class with no test rows
    (None, None, "inconclusive"),
])
def test_verdict_on_constructed_intervals(low, high, expected):
    assert verdict(low, high) == expected


def _table(rows):
    return pd.DataFrame(rows, columns=["class", "issue_rate", "recall_baseline", "recall_cleaned", "delta",
                                       "ci_low", "ci_high"])


def test_decide_names_the_most_flagged_classes_with_their_own_verdicts():
    table = _table([
        ["pih", 0.29, 0.50, 0.62, 0.12, 0.04, 0.20],        # helped
        ["vitiligo", 0.21, 0.70, 0.64, -0.06, -0.10, -0.01],  # hurt
        ["herpes", 0.18, 0.80, 0.81, 0.01, -0.03, 0.05],    # inconclusive
        ["acne", 0.02, 0.90, 0.95, 0.05, 0.01, 0.09],       # not among the top three
        ["nevus", np.nan, 0.9, 0.9, 0.0, 0.0, 0.0],         # no issue rate: never chosen
    ])
    d = decide({"delta": 0.03, "ci_low": 0.01, "ci_high": 0.05}, table, n_classes=3)
    assert d["verdict"] == "helped" and d["balanced_accuracy"]["verdict"] == "helped"
    assert [(c["class"], c["verdict"]) for c in d["top_issue_classes"]] == [
        ("pih", "helped"), ("vitiligo", "hurt"), ("herpes", "inconclusive")]
    assert d["top_issue_classes"][0]["recall_cleaned"] == pytest.approx(0.62)
    assert decide({"delta": -0.03, "ci_low": -0.05, "ci_high": -0.01}, table)["verdict"] == "hurt"
    assert decide({"delta": 0.01, "ci_low": -0.01, "ci_high": 0.03}, table)["verdict"] == "inconclusive"
    text = describe(d, confidence=0.95, n_seeds=3, n_test=450)
    assert text.startswith("HELPED: balanced accuracy +3.0 pts (95% CI +1.0 .. +5.0")
    assert "450 test rows and 3 seed pairs" in text and "pih helped (+12.0 [+4.0, +20.0])" in text
    assert list(top_issue_classes(table, n=10)["class"]) == ["pih", "vitiligo", "herpes", "acne"]


def test_verdict_follows_the_bootstrap_of_real_predictions():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 150)

    def preds(p_correct, seed):
        r = np.random.default_rng(seed)
        return np.where(r.random(labels.size) < p_correct, labels, (labels + 1) % 4)

    a = np.stack([preds(0.75, s) for s in range(3)])
    better = np.stack([preds(0.90, 10 + s) for s in range(3)])
    same = np.stack([preds(0.75, 20 + s) for s in range(3)])
    table = _table([["c0", 0.3, 0, 0, 0, 0, 0]])
    for b, expected in ((better, "helped"), (a, "inconclusive"), (same, "inconclusive")):
        boot = paired_bootstrap(labels, a, b, num_classes=4, n_bootstrap=300, seed=int(rng.integers(100)))
        assert decide(boot["balanced_accuracy"], table)["verdict"] == expected
    boot = paired_bootstrap(labels, better, a, num_classes=4, n_bootstrap=300, seed=1)
    assert decide(boot["balanced_accuracy"], table)["verdict"] == "hurt"

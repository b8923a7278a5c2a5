"""bootstrap: paired intervals on constructed predictions with a known difference, and the chart."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pandas as pd
import pytest

from cleanloop.bootstrap import paired_bootstrap, recall_deltas_chart
from cleanloop.errors import CleanloopError
from cleanloop.metrics import classification_metrics

SCALARS = ("top1", "balanced_accuracy", "f1_macro")


def noisy_preds(labels: np.ndarray, *, accuracy: float, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    wrong = (labels + rng.integers(1, k, size=labels.size)) % k
    return np.where(rng.random(labels.size) < accuracy, labels, wrong)


def recall_gain(n_class0: int, *, fixed: int, k: int = 3, base_correct: float = 0.7):
    """Labels and baseline/cleaned predictions where cleaned fixes ``fixed`` rows of class 0 and changes nothing else."""
    labels = np.repeat(np.arange(k), n_class0)
    a = noisy_preds(labels, accuracy=0.8, k=k, seed=1)
    rows0 = np.flatnonzero(labels == 0)
    a[rows0] = 1
    a[rows0[: int(base_correct * n_class0)]] = 0
    b = a.copy()
    b[rows0[int(base_correct * n_class0) : int(base_correct * n_class0) + fixed]] = 0
    return labels, a, b


def test_identical_predictions_give_exactly_zero():
    labels = np.random.default_rng(0).integers(0, 5, 200)
    preds = noisy_preds(labels, accuracy=0.6, k=5, seed=2)
    for a in (preds, np.stack([preds, noisy_preds(labels, accuracy=0.6, k=5, seed=3)])):
        res = paired_bootstrap(labels, a, a.copy(), num_classes=5, n_bootstrap=300)
        for name in SCALARS:
            assert res[name]["delta"] == 0.0
            assert res[name]["ci_low"] == res[name]["ci_high"] == 0.0
        assert (res["recall"][["delta", "ci_low", "ci_high"]].to_numpy() == 0.0).all()


def test_ten_point_recall_gain_is_found():
    labels, a, b = recall_gain(300, fixed=30)  # class 0: recall 0.70 -> 0.80 on 300 rows
    res = paired_bootstrap(labels, a, b, num_classes=3, n_bootstrap=2000, seed=0)
    row = res["recall"].loc[0]
    assert row["value_a"] == pytest.approx(0.70) and row["value_b"] == pytest.approx(0.80)
    assert row["delta"] == pytest.approx(0.10)
    assert 0 < row["ci_low"] < 0.10 < row["ci_high"] < 0.2
    # The other classes did not change at all.
    assert (res["recall"].loc[[1, 2], ["delta", "ci_low", "ci_high"]].to_numpy() == 0.0).all()
    # 30 of 900 rows fixed: top1 +1/30, balanced accuracy +0.1/3.
    assert res["top1"]["delta"] == pytest.approx(30 / 900)
    assert res["balanced_accuracy"]["delta"] == pytest.approx(0.1 / 3)
    assert res["top1"]["ci_low"] > 0 and res["f1_macro"]["delta"] > 0


def test_values_match_the_metrics_module():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 6, 300)
    labels[labels == 5] = 4  # class 5 has no test rows
    a = noisy_preds(labels, accuracy=0.7, k=5, seed=5)  # never predicts class 5 either
    b = noisy_preds(labels, accuracy=0.75, k=5, seed=6)
    res = paired_bootstrap(labels, a, b, num_classes=6, n_bootstrap=50)
    classes = [str(i) for i in range(6)]
    for preds, col in ((a, "value_a"), (b, "value_b")):
        m = classification_metrics(labels, preds, classes=classes)
        for name in SCALARS:
            assert res[name][col] == pytest.approx(m[name])
        recalls = [m["per_class"][c]["recall"] for c in classes[:5]]
        np.testing.assert_allclose(res["recall"][col].to_numpy()[:5], recalls)
    assert res["recall"].loc[5].isna().all()  # no test rows: no recall, no interval


def test_same_seed_same_result_and_other_seed_differs():
    labels, a, b = recall_gain(100, fixed=8)
    one = paired_bootstrap(labels, a, b, num_classes=3, n_bootstrap=500, seed=7)
    two = paired_bootstrap(labels, a, b, num_classes=3, n_bootstrap=500, seed=7)
    other = paired_bootstrap(labels, a, b, num_classes=3, n_bootstrap=500, seed=8)
    pd.testing.assert_frame_equal(one["recall"], two["recall"])
    assert {k: one[k] for k in SCALARS} == {k: two[k] for k in SCALARS}
    assert (
        one["top1"]["ci_low"] != other["top1"]["ci_low"] or one["top1"]["ci_high"] != other["top1"]["ci_high"]
    )


def test_multi_seed_interval_covers_seed_variation():
    # Three seed pairs: cleaning fixed 0, 30 and 60 class-0 rows (recall +0.0, +0.1, +0.2).
    labels, a, _ = recall_gain(300, fixed=0)
    bs = [recall_gain(300, fixed=f)[2] for f in (0, 30, 60)]
    multi = paired_bootstrap(labels, np.stack([a] * 3), np.stack(bs), num_classes=3, n_bootstrap=1000)
    single = paired_bootstrap(labels, a[None, :], bs[1][None, :], num_classes=3, n_bootstrap=1000)
    m, s = multi["recall"].loc[0], single["recall"].loc[0]
    assert m["delta"] == pytest.approx(0.10) == s["delta"]  # mean over seeds
    assert m["ci_high"] - m["ci_low"] >= s["ci_high"] - s["ci_low"]
    assert m["ci_low"] < 0.05 and m["ci_high"] > 0.15  # the seed spread shows in the interval
    # (N,) and (1, N) are the same single-seed input.
    flat = paired_bootstrap(labels, a, bs[1], num_classes=3, n_bootstrap=1000)
    pd.testing.assert_frame_equal(flat["recall"], single["recall"])


def test_fast_and_quiet_on_a_realistic_test_set():
    labels = np.random.default_rng(9).integers(0, 10, 450)
    labels[labels == 9] = 8  # an absent class: NaN recall, and no RuntimeWarning about it
    a = noisy_preds(labels, accuracy=0.7, k=10, seed=1)
    b = noisy_preds(labels, accuracy=0.72, k=10, seed=2)
    paired_bootstrap(labels, a, b, num_classes=10, n_bootstrap=10)  # warm-up
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        start = time.perf_counter()
        res = paired_bootstrap(labels, a, b, num_classes=10, n_bootstrap=1000)
        elapsed = time.perf_counter() - start
    assert elapsed < 2.0  # typically ~0.05 s; the slack is for a busy CI machine
    assert res["recall"].shape == (10, 5)
    assert list(res["recall"].columns) == ["value_a", "value_b", "delta", "ci_low", "ci_high"]
    assert np.isfinite(res["recall"].loc[:8].to_numpy()).all()


@pytest.mark.parametrize(
    ("labels", "a", "b", "match"),
    [
        (np.array([0, 1, 2]), np.array([0, 1]), np.array([0, 1]), "preds_a: shape"),
        (np.array([0, 1, 2]), np.array([0, 1, 2]), np.array([[0, 1, 2], [0, 1, 2]]), "preds_a has shape"),
        (np.array([0, 1, 2]), np.array([0, 1, 3]), np.array([0, 1, 2]), "class index 3 outside 0..2"),
        (np.array([0, 1, 5]), np.array([0, 1, 2]), np.array([0, 1, 2]), "labels"),
        (np.array([0, 1, 2]), np.array([0.0, 1.0, 2.0]), np.array([0, 1, 2]), "integer"),
    ],
)
def test_bad_inputs_raise(labels, a, b, match):
    with pytest.raises(CleanloopError, match=match):
        paired_bootstrap(labels, a, b, num_classes=3, n_bootstrap=10)


def test_chart_writes_a_png(tmp_path):
    table = pd.DataFrame(
        {
            "class": ["seven", "one", "four", "nine"],
            "delta": [0.10, -0.03, 0.0, np.nan],
            "ci_low": [0.06, -0.08, 0.0, np.nan],
            "ci_high": [0.14, 0.01, 0.0, np.nan],
            "issue_rate": [0.3, 0.2, 0.1, 0.0],
        }
    )
    out = recall_deltas_chart(
        table, tmp_path / "compare" / "recall_deltas.png", title="Recall change per class"
    )
    assert out == tmp_path / "compare" / "recall_deltas.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["recall_deltas.png"]  # no temporary file left

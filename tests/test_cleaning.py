"""cleanloop.cleaning on tiny data with known noise: the real cleanlab calls, no mocks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cleanloop.cleaning import (
    check_pred_probs,
    find_issues,
    flag_scores,
    issue_confusions,
    issues_per_class,
    mark_outliers,
    normalise_rows,
    outlier_scores,
    render_montage,
)
from cleanloop.errors import CleanloopError

CLASSES = ["cat", "dog", "fox", "owl"]
K = len(CLASSES)
N = 40
FLIPPED = [0, 7, 13, 22, 31]  # rows whose given label is wrong


@pytest.fixture
def noisy():
    """pred_probs that strongly favour the true class, and labels with FLIPPED rows moved to the next class."""
    rng = np.random.default_rng(0)
    true = np.arange(N) % K
    probs = rng.uniform(0.0, 0.05, size=(N, K))
    probs[np.arange(N), true] = rng.uniform(0.85, 0.95, size=N)
    probs = probs / probs.sum(axis=1, keepdims=True)
    labels = true.copy()
    labels[FLIPPED] = (true[FLIPPED] + 1) % K
    return labels, probs, true


# --- check_pred_probs / normalise_rows ---------------------------------------------------------


def test_check_pred_probs_accepts_and_returns_float64(noisy):
    _, probs, _ = noisy
    out = check_pred_probs(probs.astype(np.float32), n_rows=N, n_classes=K)
    assert out.dtype == np.float64 and out.shape == (N, K)
    # float rounding just past [0, 1] is tolerated and clipped
    edge = np.array([[1.0 + 1e-7, -1e-7], [0.5, 0.5]])
    np.testing.assert_array_equal(check_pred_probs(edge, n_rows=2, n_classes=2), [[1.0, 0.0], [0.5, 0.5]])


@pytest.mark.parametrize(
    ("value", "words"),
    [(np.nan, "NaN"), (np.inf, "infinite"), (-0.2, "negative"), (1.5, "above 1")],
)
def test_check_pred_probs_rejects_bad_values(noisy, value, words):
    _, probs, _ = noisy
    bad = probs.copy()
    bad[[3, 9], 1] = value
    uuids = [f"img-{i:03d}" for i in range(N)]
    with pytest.raises(CleanloopError) as err:
        check_pred_probs(bad, n_rows=N, n_classes=K, source="oof_probs.parquet", uuids=uuids)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("oof_probs.parquet: pred_probs")
    assert words in msg and "2 row(s)" in msg and "img-003" in msg and "cleanloop oof" in msg


@pytest.mark.parametrize("shape", [(N, K - 1), (N - 1, K), (N,)])
def test_check_pred_probs_rejects_wrong_shape(shape):
    with pytest.raises(CleanloopError, match=r"shape .*expected \(40, 4\)"):
        check_pred_probs(np.full(shape, 0.25), n_rows=N, n_classes=K)


def test_normalise_rows_sums_to_one_and_zero_rows_become_uniform():
    sigmoid = np.array([[0.9, 0.8, 0.1], [0.0, 0.0, 0.0], [0.2, 0.0, 0.0]])
    out = normalise_rows(sigmoid)
    np.testing.assert_allclose(out.sum(axis=1), 1.0)
    np.testing.assert_allclose(out[1], [1 / 3] * 3)
    np.testing.assert_allclose(out[2], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(out[0], sigmoid[0] / 1.8)


# --- find_issues -------------------------------------------------------------------------------


@pytest.mark.parametrize("filter_by", ["prune_by_noise_rate", "confident_learning", "both"])
def test_find_issues_flags_the_flipped_rows(noisy, filter_by):
    labels, probs, true = noisy
    issues = find_issues(labels, probs, filter_by=filter_by)
    assert list(issues.columns) == ["predicted", "label_quality", "is_label_issue"]
    assert len(issues) == N
    assert sorted(np.flatnonzero(issues["is_label_issue"])) == FLIPPED
    np.testing.assert_array_equal(issues["predicted"], true)
    # the flipped rows have the lowest label quality
    assert set(issues["label_quality"].nsmallest(len(FLIPPED)).index) == set(FLIPPED)


def test_find_issues_rank_by_changes_the_score(noisy):
    labels, probs, _ = noisy
    self_conf = find_issues(labels, probs)["label_quality"]
    margin = find_issues(labels, probs, rank_by="normalized_margin")["label_quality"]
    np.testing.assert_allclose(self_conf, probs[np.arange(N), labels])
    assert not np.allclose(self_conf, margin)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"filter_by": "prune_by_noise"}, "filter_by='prune_by_noise'"),
        ({"rank_by": "margin"}, "rank_by='margin'"),
        ({"frac_noise": 0.0}, "frac_noise"),
    ],
)
def test_find_issues_rejects_unknown_options(noisy, kwargs, words):
    labels, probs, _ = noisy
    with pytest.raises(CleanloopError) as err:
        find_issues(labels, probs, **kwargs)
    assert words in str(err.value)


def test_find_issues_rejects_labels_outside_the_classes(noisy):
    labels, probs, _ = noisy
    bad = labels.copy()
    bad[5] = K
    with pytest.raises(CleanloopError, match=r"outside 0\.\.3, first 4 at row 5"):
        find_issues(bad, probs)
    with pytest.raises(CleanloopError, match="class indices"):
        find_issues(np.array(CLASSES * 10), probs)


# --- summaries ---------------------------------------------------------------------------------


def test_issues_per_class_counts(noisy):
    labels, probs, _ = noisy
    flags = find_issues(labels, probs)["is_label_issue"].to_numpy()
    given = [CLASSES[i] for i in labels]
    table = issues_per_class(given, flags, CLASSES + ["yak"])
    assert list(table.columns) == ["class", "n_rows", "n_issues", "issue_rate"]
    assert set(table["class"]) == set(CLASSES) | {"yak"}
    assert table["n_issues"].sum() == flags.sum() == len(FLIPPED)
    assert table["n_rows"].sum() == N
    by_class = table.set_index("class")
    for k, name in enumerate(CLASSES):
        assert by_class.loc[name, "n_rows"] == (labels == k).sum()
        assert by_class.loc[name, "n_issues"] == flags[labels == k].sum()
    assert by_class.loc["yak", "n_rows"] == 0 and by_class.loc["yak", "issue_rate"] == 0.0
    # sorted by issue_rate desc, then class
    expected = table.sort_values(["issue_rate", "class"], ascending=[False, True])
    pd.testing.assert_frame_equal(table, expected.reset_index(drop=True))


def test_issues_per_class_ties_sort_by_class():
    table = issues_per_class(["b", "a", "c", "c"], [True, True, False, False], ["c", "b", "a"])
    assert table["class"].tolist() == ["a", "b", "c"]
    assert table["issue_rate"].tolist() == [1.0, 1.0, 0.0]


def test_issues_per_class_rejects_unknown_label():
    with pytest.raises(CleanloopError, match="'emu'"):
        issues_per_class(["cat", "emu"], [False, True], CLASSES)


def test_issue_confusions(noisy):
    labels, probs, _ = noisy
    issues = find_issues(labels, probs)
    given = [CLASSES[i] for i in labels]
    predicted = [CLASSES[i] for i in issues["predicted"]]
    conf = issue_confusions(given, predicted, issues["is_label_issue"])
    assert list(conf.columns) == ["given_label", "predicted_label", "count"]
    assert conf["count"].sum() == issues["is_label_issue"].sum()
    assert (conf["given_label"] != conf["predicted_label"]).all()

    conf = issue_confusions(
        ["a", "b", "a", "b", "a"], ["b", "a", "b", "a", "a"], [True, True, True, False, True]
    )
    assert conf.to_dict("records") == [
        {"given_label": "a", "predicted_label": "b", "count": 2},
        {"given_label": "a", "predicted_label": "a", "count": 1},
        {"given_label": "b", "predicted_label": "a", "count": 1},
    ]
    empty = issue_confusions(["a"], ["b"], [False])
    assert list(empty.columns) == ["given_label", "predicted_label", "count"] and empty.empty


def test_flag_scores():
    s = flag_scores([True, True, False, False], [True, False, True, False])
    assert s == {"precision": 0.5, "recall": 0.5, "n_flagged": 2, "n_bad": 2, "true_positives": 1}
    none = flag_scores([False, False], [True, False])
    assert none["precision"] == 0.0 and none["recall"] == 0.0 and none["n_bad"] == 1


# --- outliers ----------------------------------------------------------------------------------


def test_outlier_scores_rank_a_uniform_row_highest(noisy):
    labels, probs, _ = noisy
    probs = probs.copy()
    probs[17] = 1.0 / K
    for kwargs in ({}, {"labels": labels}):
        scores = outlier_scores(probs, **kwargs)
        assert scores.shape == (N,)
        assert int(np.argmax(scores)) == 17


def test_outlier_scores_use_features_when_given(noisy):
    _, probs, true = noisy
    rng = np.random.default_rng(1)
    # 8-d embeddings clustered by class; row 25 points elsewhere (cleanlab's metric is cosine here)
    centres = np.eye(K, 8)
    features = centres[true] + rng.normal(0, 0.05, size=(N, 8))
    features[25] = np.eye(8)[7]
    scores = outlier_scores(probs, features=features)
    assert scores.shape == (N,) and int(np.argmax(scores)) == 25
    with pytest.raises(CleanloopError, match="features has shape"):
        outlier_scores(probs, features=features[:-1])


def test_mark_outliers_counts_and_ties():
    scores = np.arange(30, dtype=float)
    assert mark_outliers(scores, top_fraction=0.1).sum() == 3  # 0.1 * 30 is 3.0000000000000004
    assert np.flatnonzero(mark_outliers(scores, top_fraction=0.1)).tolist() == [27, 28, 29]
    assert mark_outliers(scores, top_fraction=0.001).sum() == 1
    assert mark_outliers(scores, top_fraction=0.0).sum() == 0
    assert mark_outliers(scores, top_fraction=1.0).all()
    ties = np.array([0.5, 0.9, 0.9, 0.9, 0.1])
    assert np.flatnonzero(mark_outliers(ties, top_fraction=0.4)).tolist() == [1, 2]
    with pytest.raises(CleanloopError, match="top_fraction"):
        mark_outliers(scores, top_fraction=1.5)


# --- montage -----------------------------------------------------------------------------------


def _png(path, size, colour):
    Image.new("RGB", size, colour).save(path)
    return str(path)


def test_render_montage_without_rows(tmp_path):
    out = render_montage([], [], tmp_path / "m.png")
    with Image.open(out) as im:
        assert im.format == "PNG"
        w, h = im.size
        # mostly white, with some dark text ("no flagged rows")
        pixels = np.asarray(im.convert("L"))
        assert 200 <= w <= 600 and 40 <= h <= 200
        assert (pixels < 100).any() and np.median(pixels) == 255
    assert [p.name for p in tmp_path.iterdir()] == ["m.png"]  # no temporary file left


def test_render_montage_grid_with_an_unreadable_file(tmp_path):
    paths = [
        _png(tmp_path / "a.png", (8, 8), (255, 0, 0)),
        _png(tmp_path / "b.png", (200, 120), (0, 0, 255)),
        str(tmp_path / "missing.png"),
        str(tmp_path / "broken.png"),
        _png(tmp_path / "c.png", (30, 40), (0, 128, 0)),
    ]
    (tmp_path / "broken.png").write_bytes(b"not a png")
    captions = [f"cat -> dog\n0.{i:02d}" for i in range(5)]
    thumb = 48
    out = render_montage(paths, captions, tmp_path / "flag" / "m.png", columns=3, thumb=thumb)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        w, h = im.size
        rgb = np.asarray(im)
    # 3 columns by 2 rows of cells, each a thumbnail plus two caption lines
    assert 3 * thumb < w < 3 * 2 * thumb
    assert 2 * thumb < h < 2 * 3 * thumb
    cell_w, cell_h = w // 3, h // 2

    def pixel(col, row, dx, dy):  # colour at (dx, dy) inside a cell's thumbnail
        return tuple(int(v) for v in rgb[row * cell_h + 6 + dy, col * cell_w + (cell_w - thumb) // 2 + dx])

    middle = thumb // 2
    assert pixel(0, 0, middle, middle) == (255, 0, 0)  # 8x8 scaled up
    assert pixel(1, 0, middle, middle) == (0, 0, 255)  # 200x120 scaled down
    assert pixel(1, 1, middle, middle) == (0, 128, 0)
    # missing and broken files: grey placeholders, not a crash
    assert pixel(2, 0, 5, 5) == pixel(0, 1, 5, 5) == (190, 190, 190)
    # captions are drawn: dark pixels below the thumbnails
    assert (rgb[6 + thumb : cell_h, :].min(axis=2) < 100).any()


def test_render_montage_rejects_mismatched_captions(tmp_path):
    with pytest.raises(CleanloopError, match="1 path.*2 caption"):
        render_montage(["a.png"], ["x", "y"], tmp_path / "m.png")

"""pruning: the cap, reviewer decisions, and the rule that val/test rows are never touched."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cleanloop.errors import CleanloopError
from cleanloop.pruning import apply_pruning, read_decisions, select_pruned

CLASSES = ["cat", "dog", "fox"]


def issues_table(rows: list[tuple[str, str, float, bool, bool]]) -> pd.DataFrame:
    """A label_issues table from (image_uuid, given_label, label_quality, is_label_issue, is_outlier)."""
    df = pd.DataFrame(
        rows, columns=["image_uuid", "given_label", "label_quality", "is_label_issue", "is_outlier"]
    )
    df["path"] = df["image_uuid"] + ".png"
    df["predicted_label"] = df["given_label"]
    df["outlier_score"] = 0.0
    return df.sort_values("label_quality", kind="mergesort").reset_index(drop=True)


def manifest_for(issues: pd.DataFrame, *, n_holdout: int = 4) -> pd.DataFrame:
    """A manifest with the issues' rows as train plus val/test rows (with a flagged-looking extra column)."""
    train = pd.DataFrame(
        {
            "image_uuid": issues["image_uuid"],
            "path": issues["path"],
            "label": issues["given_label"],
            "split": "train",
        }
    )
    held = pd.DataFrame(
        {
            "image_uuid": [f"h{i}" for i in range(n_holdout)],
            "path": [f"h{i}.png" for i in range(n_holdout)],
            "label": [CLASSES[i % len(CLASSES)] for i in range(n_holdout)],
            "split": ["val" if i % 2 else "test" for i in range(n_holdout)],
        }
    )
    # Interleave so that row order preservation is actually tested.
    df = pd.concat([held.iloc[: n_holdout // 2], train, held.iloc[n_holdout // 2 :]], ignore_index=True)
    df["group"] = "g" + df.index.astype(str)
    return df[["group", "image_uuid", "label", "path", "split"]]


@pytest.fixture
def issues() -> pd.DataFrame:
    rows = [(f"c{i}", "cat", q, True, False) for i, q in enumerate([0.05, 0.10, 0.20, 0.30, 0.40])]
    rows += [(f"c{i}", "cat", 0.9, False, False) for i in range(5, 10)]
    rows += [
        ("d0", "dog", 0.15, True, True),
        ("d1", "dog", 0.25, False, True),
        ("d2", "dog", 0.95, False, False),
    ]
    rows += [("f0", "fox", 0.8, False, False), ("f1", "fox", 0.85, False, False)]
    return issues_table(rows)


N_TRAIN = {"cat": 10, "dog": 3, "fox": 2}


# --- select_pruned ----------------------------------------------------------------------------


def test_no_cap_drops_every_flagged_row_with_its_reason(issues):
    pruned = select_pruned(issues, n_train_per_class=N_TRAIN)
    assert list(pruned.columns) == ["image_uuid", "given_label", "reason", "new_label"]
    assert set(pruned["image_uuid"]) == {"c0", "c1", "c2", "c3", "c4", "d0", "d1"}
    reason = dict(zip(pruned["image_uuid"], pruned["reason"], strict=True))
    assert reason["d0"] == "label_issue"  # both a label issue and an outlier
    assert reason["d1"] == "outlier"
    assert pruned["new_label"].isna().all()
    # Sorted like label_issues.csv: worst label_quality first.
    assert list(pruned["image_uuid"]) == ["c0", "c1", "d0", "c2", "d1", "c3", "c4"]


def test_cap_keeps_the_lowest_quality_rows_per_class(issues):
    pruned = select_pruned(issues, max_fraction_per_class=0.3, n_train_per_class=N_TRAIN)
    by_class = pruned.groupby("given_label")["image_uuid"].apply(sorted).to_dict()
    assert by_class == {"cat": ["c0", "c1", "c2"]}  # floor(0.3 * 10) = 3, floor(0.3 * 3) = 0


def test_cap_fraction_is_not_cut_by_floating_point():
    # 0.29 * 100 == 28.999999999999996: the cap must still be 29.
    iss = issues_table([(f"u{i:03d}", "cat", i / 100, True, False) for i in range(100)])
    pruned = select_pruned(iss, max_fraction_per_class=0.29, n_train_per_class={"cat": 100})
    assert len(pruned) == 29


def test_cap_ties_are_broken_by_image_uuid():
    iss = issues_table([(u, "cat", 0.1, True, False) for u in ["b", "d", "a", "c"]])
    pruned = select_pruned(iss, max_fraction_per_class=0.5, n_train_per_class={"cat": 4})
    assert list(pruned["image_uuid"]) == ["a", "b"]
    again = select_pruned(
        iss.sample(frac=1, random_state=3), max_fraction_per_class=0.5, n_train_per_class={"cat": 4}
    )
    pd.testing.assert_frame_equal(pruned, again)


def test_flags_can_be_switched_off(issues):
    only_outliers = select_pruned(issues, drop_label_issues=False, n_train_per_class=N_TRAIN)
    assert set(only_outliers["image_uuid"]) == {"d0", "d1"}
    assert set(only_outliers["reason"]) == {"outlier"}
    only_issues = select_pruned(issues, drop_outliers=False, n_train_per_class=N_TRAIN)
    assert set(only_issues["image_uuid"]) == {"c0", "c1", "c2", "c3", "c4", "d0"}
    assert select_pruned(
        issues, drop_label_issues=False, drop_outliers=False, n_train_per_class=N_TRAIN
    ).empty


def test_flags_read_back_from_csv_text(issues):
    as_text = issues.astype(str)
    pd.testing.assert_frame_equal(
        select_pruned(as_text, n_train_per_class=N_TRAIN), select_pruned(issues, n_train_per_class=N_TRAIN)
    )


def test_reviewer_decisions_override_flags_and_cap(issues):
    raw = pd.DataFrame(
        {
            "image_uuid": ["c0", "c9", "f0", "d0", "c1"],
            "decision": ["keep", " DROP ", "relabel:dog", "Relabel : fox", "relabel:cat"],
            "reviewer_note": ["fine", "blurry", "it is a dog", "", "same label = keep"],
        }
    )
    decisions = read_decisions(raw, classes=CLASSES, known_uuids=issues["image_uuid"])
    pruned = select_pruned(issues, max_fraction_per_class=0.2, n_train_per_class=N_TRAIN, decisions=decisions)
    rows = pruned.set_index("image_uuid")
    # keep: c0 (flagged, lowest quality) stays; c1 was "relabelled" to its own label, also a keep;
    # the cap of floor(0.2 * 10) = 2 for cat goes to the next candidates c2, c3.
    assert "c0" not in rows.index and "c1" not in rows.index
    assert rows.loc["c2", "reason"] == rows.loc["c3", "reason"] == "label_issue"
    # drop: c9 was not flagged and the cat cap is full: reviewer drops are not capped.
    assert rows.loc["c9", "reason"] == "reviewer" and rows.loc["c9", "new_label"] is None
    # relabel: listed with reason reviewer and the new label, whatever the flags or cap said.
    assert rows.loc["f0", ["reason", "new_label"]].tolist() == ["reviewer", "dog"]
    assert rows.loc["d0", ["reason", "new_label"]].tolist() == ["reviewer", "fox"]
    assert len(pruned) == 5


def test_decision_not_in_issues_raises(issues):
    decisions = pd.DataFrame({"image_uuid": ["zz"], "action": ["drop"], "new_label": [None]})
    with pytest.raises(CleanloopError, match="'zz'"):
        select_pruned(issues, n_train_per_class=N_TRAIN, decisions=decisions)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda df: df.drop(columns="label_quality"), "missing column.*label_quality"),
        (lambda df: df.assign(label_quality="high"), "label_quality"),
        (lambda df: df.assign(is_outlier="maybe"), "is_outlier.*'maybe'"),
        (lambda df: df.assign(given_label="wolf"), "'wolf'.*not a train class"),
        (lambda df: pd.concat([df, df.iloc[:1]]), "duplicate image_uuid"),
    ],
)
def test_bad_issues_tables_raise_one_line(issues, change, match):
    with pytest.raises(CleanloopError, match=match) as err:
        select_pruned(change(issues), n_train_per_class=N_TRAIN)
    assert "\n" not in str(err.value)


def test_bad_max_fraction_raises(issues):
    with pytest.raises(CleanloopError, match="prune.max_fraction_per_class"):
        select_pruned(issues, max_fraction_per_class=1.5, n_train_per_class=N_TRAIN)


# --- read_decisions ---------------------------------------------------------------------------


def test_read_decisions_normalises():
    raw = pd.DataFrame(
        {"image_uuid": [" a", "b", "c", "a"], "decision": ["Keep", "drop ", " relabel:fox", "KEEP"]}
    )
    out = read_decisions(raw, classes=CLASSES, known_uuids=["a", "b", "c"])
    assert list(out.columns) == ["image_uuid", "action", "new_label"]
    assert out.to_dict("records") == [
        {"image_uuid": "a", "action": "keep", "new_label": None},
        {"image_uuid": "b", "action": "drop", "new_label": None},
        {"image_uuid": "c", "action": "relabel", "new_label": "fox"},
    ]


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (
            pd.DataFrame({"image_uuid": ["a"], "verdict": ["keep"]}),
            r"decisions\.csv: missing column.*decision",
        ),
        (
            pd.DataFrame({"image_uuid": ["a", "x1", "x2", "x3"], "decision": ["keep"] * 4}),
            r"3 image_uuid\(s\) not among the scored train rows, first: 'x1', 'x2', 'x3' at line 3, 4, 5",
        ),
        (
            pd.DataFrame({"image_uuid": ["a", "b"], "decision": ["keep", "remove"]}),
            r"unknown decision 'remove' at line 3",
        ),
        (pd.DataFrame({"image_uuid": ["a"], "decision": [np.nan]}), r"unknown decision '' at line 2"),
        (
            pd.DataFrame({"image_uuid": ["a"], "decision": ["relabel:wolf"]}),
            r"relabel to unknown class 'wolf'.*'cat'",
        ),
        (pd.DataFrame({"image_uuid": ["a"], "decision": ["relabel:"]}), r"relabel to unknown class ''"),
        (
            pd.DataFrame({"image_uuid": ["a", "b", "a"], "decision": ["keep", "drop", "drop"]}),
            r"image_uuid 'a' has conflicting decisions \(keep, drop\) at line 2, 4",
        ),
        (
            pd.DataFrame({"image_uuid": ["a", ""], "decision": ["keep", "drop"]}),
            r"empty image_uuid at line 3",
        ),
    ],
)
def test_bad_decisions_raise_one_line(raw, match):
    with pytest.raises(CleanloopError, match=match) as err:
        read_decisions(raw, classes=CLASSES, known_uuids=["a", "b", "c"])
    assert "\n" not in str(err.value)


# --- apply_pruning ----------------------------------------------------------------------------


def test_apply_pruning_drops_and_relabels_train_rows_only(issues):
    manifest = manifest_for(issues)
    pruned = pd.DataFrame(
        {
            "image_uuid": ["c0", "f0"],
            "given_label": ["cat", "fox"],
            "reason": ["label_issue", "reviewer"],
            "new_label": [None, "dog"],
        }
    )
    out = apply_pruning(manifest, pruned)
    assert list(out.columns) == list(manifest.columns)
    expected = manifest[manifest["image_uuid"] != "c0"].reset_index(drop=True)
    expected.loc[expected["image_uuid"] == "f0", "label"] = "dog"
    pd.testing.assert_frame_equal(out, expected)
    assert manifest.loc[manifest["image_uuid"] == "f0", "label"].item() == "fox"  # input untouched


def test_apply_pruning_reads_pruned_rows_csv_without_new_label(issues, tmp_path):
    manifest = manifest_for(issues)
    pruned = select_pruned(issues, n_train_per_class=N_TRAIN)
    path = tmp_path / "pruned_rows.csv"
    pruned.to_csv(path, index=False)
    back = pd.read_csv(path)
    out = apply_pruning(manifest, back)
    pd.testing.assert_frame_equal(out, apply_pruning(manifest, pruned))
    pd.testing.assert_frame_equal(out, apply_pruning(manifest, back.drop(columns="new_label")))
    assert len(out) == len(manifest) - len(pruned)


@pytest.mark.parametrize(
    ("uuid", "match"),
    [
        ("h0", "'h0' is a test row, not a train row"),
        ("h1", "'h1' is a val row, not a train row"),
        ("nope", "not in the manifest, first: 'nope'"),
    ],
)
def test_apply_pruning_refuses_val_test_and_unknown_rows(issues, uuid, match):
    manifest = manifest_for(issues)
    pruned = pd.DataFrame({"image_uuid": ["c0", uuid], "new_label": [None, "cat"]})
    with pytest.raises(CleanloopError, match=match):
        apply_pruning(manifest, pruned)


# --- properties -------------------------------------------------------------------------------


@st.composite
def issue_tables(draw):
    n = draw(st.integers(min_value=1, max_value=40))
    labels = draw(st.lists(st.sampled_from(CLASSES), min_size=n, max_size=n))
    quality = draw(st.lists(st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.9, 1.0]), min_size=n, max_size=n))
    issue = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    outlier = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    rows = [(f"u{i:02d}", labels[i], quality[i], issue[i], outlier[i]) for i in range(n)]
    return issues_table(rows)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    iss=issue_tables(),
    frac=st.floats(min_value=0.0, max_value=1.0),
    drop_label_issues=st.booleans(),
    drop_outliers=st.booleans(),
    n_decisions=st.integers(min_value=0, max_value=5),
    data=st.data(),
)
def test_cap_holds_and_holdout_rows_survive(iss, frac, drop_label_issues, drop_outliers, n_decisions, data):
    n_train = iss["given_label"].value_counts().to_dict()
    n_train = {c: n_train.get(c, 0) for c in CLASSES}
    uuids = data.draw(
        st.lists(
            st.sampled_from(list(iss["image_uuid"])),
            unique=True,
            min_size=min(n_decisions, len(iss)),
            max_size=min(n_decisions, len(iss)),
        )
    )
    words = data.draw(
        st.lists(
            st.sampled_from(["keep", "drop", "relabel:cat", "relabel:fox"]),
            min_size=len(uuids),
            max_size=len(uuids),
        )
    )
    decisions = (
        read_decisions(
            pd.DataFrame({"image_uuid": uuids, "decision": words}),
            classes=CLASSES,
            known_uuids=iss["image_uuid"],
        )
        if uuids
        else None
    )
    pruned = select_pruned(
        iss,
        drop_label_issues=drop_label_issues,
        drop_outliers=drop_outliers,
        max_fraction_per_class=frac,
        n_train_per_class=n_train,
        decisions=decisions,
    )

    assert pruned["image_uuid"].is_unique
    auto = pruned[pruned["reason"] != "reviewer"]
    for cls, count in auto["given_label"].value_counts().items():
        assert count <= np.floor(frac * n_train[cls] + 1e-9)
    # Only enabled flags pick rows automatically; a reviewed row is never picked automatically.
    flagged = iss.set_index("image_uuid")
    enabled = (flagged["is_label_issue"] & drop_label_issues) | (flagged["is_outlier"] & drop_outliers)
    assert enabled.loc[auto["image_uuid"]].all()
    assert not set(auto["image_uuid"]) & set(uuids)

    manifest = manifest_for(iss)
    out = apply_pruning(manifest, pruned)
    holdout = manifest[manifest["split"] != "train"].reset_index(drop=True)
    pd.testing.assert_frame_equal(out[out["split"] != "train"].reset_index(drop=True), holdout)
    dropped = set(pruned.loc[pruned["new_label"].isna(), "image_uuid"])
    assert len(out) == len(manifest) - len(dropped)
    assert not dropped & set(out["image_uuid"])

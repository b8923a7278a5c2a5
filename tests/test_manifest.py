"""Manifest reading and validation (CONTRACT §2, §6): every bad input is one clear line."""

from __future__ import annotations

import pandas as pd
import pytest

from cleanloop.errors import CleanloopError
from cleanloop.manifest import class_order, load_manifest, read_manifest, validate


def good() -> pd.DataFrame:
    return pd.DataFrame({
        "image_uuid": [f"u{i}" for i in range(8)],
        "path": [f"img/{i}.png" for i in range(8)],
        "label": ["cat", "dog", "cat", "dog", "cat", "dog", "cat", "dog"],
        "split": ["train"] * 6 + ["test"] * 2,
        "extra": range(8),
    })


def error_of(df: pd.DataFrame, **kw) -> str:
    with pytest.raises(CleanloopError) as e:
        validate(df, source="m.csv", **kw)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("m.csv: ")
    return msg


def test_good_manifest_passes_and_orders_classes():
    validate(good(), source="m.csv")
    assert class_order(good()) == ["cat", "dog"]
    assert class_order(good(), ["dog", "cat"]) == ["dog", "cat"]


def test_missing_column():
    msg = error_of(good().drop(columns=["label"]))
    assert "missing required column(s) label" in msg


def test_duplicate_uuid_names_lines():
    df = good()
    df.loc[3, "image_uuid"] = "u1"
    msg = error_of(df)
    assert "duplicate image_uuid 'u1'" in msg and "line 3, 5" in msg


def test_unknown_split():
    df = good()
    df.loc[2, "split"] = "training"
    msg = error_of(df)
    assert "unknown split 'training'" in msg and "line 4" in msg and "train, val, test" in msg


def test_empty_train_split():
    df = good()
    df["split"] = "test"
    assert "no rows with split == 'train'" in error_of(df)


def test_test_label_absent_from_train():
    df = good()
    df.loc[7, "label"] = "bird"
    assert "test label(s) 'bird' have no train rows" in error_of(df)


def test_too_few_rows_for_folds():
    msg = error_of(good(), min_train_per_class=5)
    assert "class 'cat' has 3 train row(s), fewer than oof.n_folds=5" in msg


def test_label_outside_configured_classes():
    assert "not in data.classes" in error_of(good(), classes=["cat"])


def test_empty_label_cell():
    df = good()
    df.loc[1, "label"] = ""
    assert "empty 'label' at line 3" in error_of(df)


def test_missing_images_listed_with_count(tmp_path):
    path = tmp_path / "m.csv"
    good().to_csv(path, index=False)
    with pytest.raises(CleanloopError, match=r"8 image file\(s\) not found, first: .*img/0.png"):
        load_manifest(path)


def test_csv_with_bom_and_crlf_is_read(tmp_path):
    path = tmp_path / "m.csv"
    text = good().to_csv(index=False, lineterminator="\r\n")
    path.write_bytes("\ufeff".encode() + text.encode())
    df = read_manifest(path)
    assert list(df.columns[:4]) == ["image_uuid", "path", "label", "split"]
    assert df["split"].iloc[-1] == "test"  # no trailing \r
    validate(df, source=str(path))


def test_parquet_round_trip_keeps_extra_columns(tmp_path):
    path = tmp_path / "m.parquet"
    good().to_parquet(path, index=False)
    df = read_manifest(path)
    assert "extra" in df.columns and len(df) == 8


def test_numeric_looking_labels_stay_strings(tmp_path):
    df = good()
    df["label"] = ["1", "2"] * 4
    path = tmp_path / "m.csv"
    df.to_csv(path, index=False)
    assert class_order(read_manifest(path)) == ["1", "2"]


def test_input_file_is_not_modified(tmp_path, tiny_manifest):
    before = tiny_manifest.read_bytes()
    m = load_manifest(tiny_manifest)
    assert m.classes == ["bright", "dark", "mid"]
    assert tiny_manifest.read_bytes() == before
    assert m.df["abs_path"].str.startswith(str(tiny_manifest.parent)).all()


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["u1", "u2", "u3", "u4", "u5", "u6"]),
                          st.sampled_from(["a", "b", "c"]),
                          st.sampled_from(["train", "val", "test", "dev", ""])), min_size=1, max_size=12))
def test_validator_accepts_exactly_the_valid_manifests(rows):
    df = pd.DataFrame(rows, columns=["image_uuid", "label", "split"])
    df.insert(1, "path", [f"{u}.png" for u in df["image_uuid"]])
    train_labels = set(df.loc[df["split"] == "train", "label"])
    valid = (
        not df["image_uuid"].duplicated().any()
        and df["split"].isin(["train", "val", "test"]).all()
        and (df["split"] == "train").any()
        and set(df.loc[df["split"].isin(["val", "test"]), "label"]) <= train_labels
    )
    try:
        validate(df, source="m.csv")
        accepted = True
    except CleanloopError as e:
        accepted = False
        assert "\n" not in str(e) and str(e).startswith("m.csv: ")
    assert accepted == valid

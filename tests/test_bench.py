"""bench/ cannot rot: its scripts run at tiny sizes; and the batched path of find_issues that B2 times."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest

from cleanloop import cleaning
from cleanloop.cleaning import find_issues
from cleanloop.errors import CleanloopError
from cleanloop.flagcore import ISSUE_COLUMNS, flag_tables

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import efficacy  # noqa: E402
import flagbench  # noqa: E402
from synth import make_oof, write_oof_memmap  # noqa: E402


@pytest.mark.slow  # ~15 s: importing torch, transformers and Lightning is most of it
def test_gpu_script_smoke_prints_its_table():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--smoke"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| part | batch | images/s"))
    rows = [line.split("|")[1].strip() for line in lines[header + 2:]]
    assert len(lines) == header + 2 + len(rows)  # the table is printed last
    assert rows[:4] == ["forward", "forward", "train", "train"]
    assert rows[4:] == ["loader (0 workers)", "predict (training.predict)", "image cache build (4 files)",
                        "loader (0 workers, image cache)", "predict (training.predict, image cache)", "verdict"]
    verdict = lines[-1].split("|")[-2]
    assert "decoding JPEGs:" in verdict and "with the image cache:" in verdict and "missing" not in verdict


def test_b1_flag_computation_at_a_tiny_size():
    result = flagbench.measure("flag", n=2_000, k=25)
    assert result["n"] == 2_000 and result["k"] == 25
    for key in ("wall_s", "peak_mib", "find_issues_s", "tables_s", "csv_s"):
        assert result[key] >= 0, key
    assert result["wall_s"] >= result["find_issues_s"] + result["tables_s"] + result["csv_s"] - 1e-6
    assert 0 < result["n_issues"] < 2_000 and result["precision"] > 0.5  # the synthetic noise is findable
    bare = flagbench.measure("bare", n=2_000, k=25)
    assert bare["n_issues"] == result["n_issues"]  # same cleanlab call underneath


def test_synthetic_noise_is_about_seven_percent_and_class_conditional():
    labels, probs, true = make_oof(20_000, 25)
    assert probs.dtype == np.float32 and np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    flipped = labels != true
    assert 0.05 < flipped.mean() < 0.09
    flips = np.bincount(true, weights=flipped, minlength=25)
    assert np.sort(flips)[-5:].sum() > 0.5 * flips.sum()  # a fifth of the classes carry most of the noise


# --- find_issues, batched (B2's path) ---------------------------------------------------------


@pytest.fixture
def memmapped(tmp_path):
    probs_path, labels_path, _ = write_oof_memmap(tmp_path, 3_000, 12, chunk_rows=700)
    return np.load(labels_path), np.load(probs_path, mmap_mode="r")


@pytest.mark.parametrize("filter_by", ["prune_by_noise_rate", "low_normalized_margin"])
def test_batched_equals_in_memory_on_a_memmap(memmapped, monkeypatch, filter_by):
    labels, probs = memmapped
    monkeypatch.setattr(cleaning, "BATCH_CELLS", 500 * 12)  # six chunks of 500 rows
    got = find_issues(labels, probs, filter_by=filter_by, batched=True)
    pd.testing.assert_frame_equal(got, find_issues(labels, np.asarray(probs), filter_by=filter_by, batched=False))
    assert 0 < got["is_label_issue"].sum() < len(labels)


def test_auto_switch_above_the_threshold_keeps_the_flags(memmapped, monkeypatch):
    labels, probs = memmapped
    small = find_issues(labels, probs)  # 36k cells: in memory, prune_by_noise_rate
    pd.testing.assert_frame_equal(small, find_issues(labels, probs, batched=False))
    monkeypatch.setattr(cleaning, "BATCHED_ABOVE_CELLS", 1_000)
    monkeypatch.setattr(cleaning, "BATCH_CELLS", 700 * 12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # batched does every filter_by itself: nothing replaced, no warning
        auto = find_issues(labels, probs)
    pd.testing.assert_frame_equal(auto, small)


def test_b2_times_the_batched_default_filter_at_a_tiny_size(tmp_path, monkeypatch):
    write_oof_memmap(tmp_path, 2_000, 40, chunk_rows=300)
    monkeypatch.setattr(cleaning, "BATCH_CELLS", 150 * 40)  # 14 chunks, as B2 streams 80
    batched = flagbench.measure("flag", n=0, k=0, data=str(tmp_path), batched=True)
    in_memory = flagbench.measure("find-issues", n=0, k=0, data=str(tmp_path), batched=False)
    assert (batched["n"], batched["k"]) == (2_000, 40) and batched["wall_s"] >= batched["find_issues_s"] > 0
    assert batched["peak_mib"] >= 0 and batched["issues_digest"] == in_memory["issues_digest"]
    assert batched["n_issues"] == in_memory["n_issues"] > 0 and batched["recall"] == in_memory["recall"]


def test_batched_names_the_first_bad_row_of_the_whole_array(monkeypatch):
    labels, probs, _ = make_oof(1_000, 5)
    probs[777, 2] = np.nan
    monkeypatch.setattr(cleaning, "BATCH_CELLS", 100 * 5)
    with pytest.raises(CleanloopError, match=r"NaN in 1 row\(s\), first row 777"):
        find_issues(labels, probs, batched=True)
    assert np.isnan(probs[777, 2])  # the caller's array is not touched


# --- flagcore ------------------------------------------------------------------------------------


def test_flag_tables_order_is_the_two_key_sort_with_ties():
    rng = np.random.default_rng(0)
    n, classes = 500, ["a", "b", "c"]
    found = pd.DataFrame({"predicted": rng.integers(0, 3, n),
                          "label_quality": rng.choice([0.0, 0.25, 0.5, 1.0], n),  # many ties
                          "is_label_issue": rng.random(n) < 0.2})
    uuids = pd.Series([f"u{i}" for i in rng.permutation(n)], dtype="str")
    given = pd.Series(np.array(classes)[rng.integers(0, 3, n)], dtype="str")
    tables = flag_tables(found, classes=classes, image_uuids=uuids, paths=uuids, given_labels=given)
    assert list(tables.issues.columns) == ISSUE_COLUMNS
    want = pd.DataFrame({"image_uuid": uuids, "label_quality": found["label_quality"]}).sort_values(
        ["label_quality", "image_uuid"], kind="mergesort")
    assert tables.issues["image_uuid"].tolist() == want["image_uuid"].tolist()
    assert tables.per_class["n_issues"].sum() == found["is_label_issue"].sum()
    assert tables.confusions["count"].sum() == found["is_label_issue"].sum()


# --- B7 (bench/efficacy.py) -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["uniform", "lookalike", "systematic"])
def test_efficacy_case_has_the_injected_noise_garbage_groups_and_clean_test(tmp_path, kind):
    info = efficacy.build_case(efficacy.parse_case(f"shiftblur-{kind}-10"), tmp_path, n_rows=300)
    rows = pd.read_csv(tmp_path / "manifest.csv", dtype=str, keep_default_na=False)
    truth = pd.read_csv(tmp_path / "ground_truth.csv", dtype={"image_uuid": str}, keep_default_na=False)
    assert list(rows.columns) == ["image_uuid", "path", "label", "split", "group"]
    assert (rows["image_uuid"] == truth["image_uuid"]).all() and all((tmp_path / p).is_file() for p in rows["path"])
    train = rows["split"] == "train"
    digits = ~truth["is_garbage"].to_numpy()
    noisy = rows["label"] != truth["true_label"]
    assert (noisy[digits] == truth["is_noisy"][digits]).all()
    assert not noisy[(~train).to_numpy() & digits].any()  # test labels are clean
    assert abs(info["noise_rate_actual"] - 0.10) < 0.02 and info["n_garbage"] == efficacy.N_GARBAGE
    assert (truth["is_garbage"] & ~train).sum() == 0
    sizes = rows[digits].groupby("group")["split"].agg(["size", "nunique"])
    assert sizes["size"].max() == 3 and sizes["nunique"].max() == 1  # groups of 3 within one split
    again = tmp_path / "again"
    efficacy.build_case(efficacy.parse_case(f"shiftblur-{kind}-10"), again, n_rows=300)  # seeded: same case
    assert pd.read_csv(again / "manifest.csv").equals(pd.read_csv(tmp_path / "manifest.csv"))


def test_efficacy_metrics():
    f = efficacy.flag_metrics([True, True, False, False], [True, False, True, False])
    assert (f["precision"], f["recall"], f["f1"]) == (0.5, 0.5, 0.5)
    assert efficacy.top_true([0.1, 0.9, 0.2, 0.3], [True, False, False, True], n=2) == 1
    g = efficacy.gain_interval([0.80, 0.81, 0.82], [0.84, 0.84, 0.86])
    assert g["ci_low"] < g["mean"] < g["ci_high"] and abs(g["mean"] - 0.0366667) < 1e-6
    with pytest.raises(SystemExit):
        efficacy.expand_cases("up24-nonsense-20")


@pytest.mark.slow  # ~1 minute: one tiny case through cleanloop's real steps and the peer
def test_efficacy_script_smoke_writes_json_and_the_b7_table(tmp_path):
    out = tmp_path / "b7.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "efficacy.py"), "--quick", "--cases",
                           "native8-uniform-20", "--n-rows", "300", "--seeds", "0,1", "--jobs", "1",
                           "--cleanloop", "recipe.epochs=1", "--out", str(out)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["machine"]["commit"] and r["wall_s"] > 0 and r["cleanloop_overrides"][-1] == "recipe.epochs=1"
    (case,) = r["cases"]
    for who in ("cleanloop", "peer"):
        assert len(case[who]["baseline_ba"]) == len(case[who]["cleaned_ba"]) == 2
        assert 0 <= case[who]["flags"]["f1"] <= 1 and 0 <= case[who]["top100_true"] <= 100
    assert case["cleanloop"]["config"]["epochs"] == 1 and case["cleanloop"]["config"]["n_folds"] == 3
    assert "| native8-uniform-20 | cleanloop |" in proc.stdout and "Misses" in proc.stdout


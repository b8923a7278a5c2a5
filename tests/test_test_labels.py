"""Issue 15 items 2b and 3: test-set label issues (flag.split=test), the reviewer-corrected test split
in compare (compare.test_decisions), and prune leaving test-row decisions to compare.

The inputs are cheap and real: 8 px PNGs, hand-made baseline test predictions written as `cleanloop
train` writes them (no model is trained), the real flag, compare and prune steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from cleanloop.errors import CleanloopError
from cleanloop.flagcore import ISSUE_COLUMNS
from cleanloop.steps import compare, flag, prune
from cleanloop.steps.locate import decisions_identity
from cleanloop.steps.train import probs_frame

from conftest import make_cfg, write_png

CLASSES = ["bright", "dark", "mid"]
# test rows whose given label is wrong: uuid -> the label the manifest gives (the image is its prefix's class)
FLIPPED = {"dark-5": "mid", "mid-7": "bright", "bright-9": "dark"}


def manifest_with_flipped_test_labels(root: Path) -> Path:
    """3 classes x (4 train + 10 test) flat PNGs; three test labels flipped (``FLIPPED``)."""
    rows = []
    for c, value in (("dark", 20), ("mid", 110), ("bright", 200)):
        for i in range(14):
            uuid = f"{c}-{i}"
            write_png(root / "img" / f"{uuid}.png", value + i, size=8)
            rows.append({"image_uuid": uuid, "path": f"img/{uuid}.png", "label": FLIPPED.get(uuid, c),
                         "split": "test" if i >= 4 else "train"})
    path = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def baseline_predictions(manifest: Path, dest: Path, seed: int) -> pd.DataFrame:
    """A baseline's test_predictions.parquet (train's own format): 0.9 on each image's true class."""
    test = pd.read_csv(manifest, dtype=str)
    test = test[test["split"] == "test"]
    rng = np.random.default_rng(seed)
    probs = np.full((len(test), len(CLASSES)), 0.05) + rng.uniform(0, 0.02, (len(test), len(CLASSES)))
    for i, u in enumerate(test["image_uuid"]):
        probs[i, CLASSES.index(u.split("-")[0])] = 0.9
    probs /= probs.sum(axis=1, keepdims=True)
    frame = probs_frame(test["image_uuid"].tolist(), test["label"].tolist(), probs, CLASSES)
    dest.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(dest / "test_predictions.parquet", index=False)
    return frame


def test_test_flags_find_the_flipped_test_labels(tmp_path):
    manifest = manifest_with_flipped_test_labels(tmp_path)
    base = ["data=manifest", f"data.manifest={manifest}", "compare.seeds=2"]
    out = tmp_path / "outputs" / "manifest"
    # where a cycle's two baseline seeds publish them: train/baseline/ and train/baseline/seed-1/
    a = baseline_predictions(manifest, out / "train" / "baseline", seed=0)
    b = baseline_predictions(manifest, out / "train" / "baseline" / "seed-1", seed=1)
    cfg = make_cfg(tmp_path, *base, "flag.split=test")
    info = flag.run(cfg)
    table = pd.read_csv(out / "flag" / "test_label_issues.csv", dtype={"image_uuid": str})
    assert list(table.columns) == ISSUE_COLUMNS and len(table) == 30  # every test row, columns of label_issues.csv
    assert table["label_quality"].is_monotonic_increasing
    assert set(table.loc[table["is_label_issue"], "image_uuid"]) == set(FLIPPED)
    assert table.set_index("image_uuid").loc["dark-5", "predicted_label"] == "dark"
    assert info["n_issues"] == 3 and info["n_models"] == 2
    probs = pd.read_parquet(out / "flag" / "test_pred_probs.parquet").set_index("image_uuid")
    mean = (a.set_index("image_uuid")[CLASSES] + b.set_index("image_uuid")[CLASSES]) / 2
    np.testing.assert_allclose(probs.loc[mean.index, CLASSES].to_numpy(), mean.to_numpy(), rtol=1e-5)
    run = mlflow.get_run(info["run_id"])
    assert run.data.metrics["flag/test_n_issues"] == 3 and run.data.tags["cleanloop.step"] == "flag-test"
    assert "test_label_issues.csv" in {f.path for f in mlflow.MlflowClient().list_artifacts(info["run_id"])}
    assert flag.run(cfg)["reused"]
    # the key follows the predictions' content: a retrained baseline is flagged afresh
    baseline_predictions(manifest, out / "train" / "baseline" / "seed-1", seed=2)
    assert not flag.run(cfg)["reused"]

    # predictions of another test split are refused in one line, as is an unknown split choice
    other = a[a["image_uuid"] != "dark-4"]
    other.to_parquet(tmp_path / "other.parquet", index=False)
    with pytest.raises(CleanloopError, match="are not the test rows of this manifest"):
        flag.run(make_cfg(tmp_path, *base, "flag.split=test", f"flag.test_predictions={tmp_path / 'other.parquet'}"))
    with pytest.raises(CleanloopError, match="flag.split='val'"):
        flag.run(make_cfg(tmp_path, *base, "flag.split=val"))


def _log_baseline(cfg, frame: pd.DataFrame, seed: int, role: str) -> str:
    """A finished train run as `cleanloop train` leaves it: pairing tags plus test_predictions.parquet."""
    from cleanloop.tracking import setup

    setup(cfg.tracking)
    tags = {"cleanloop.step": "train", "cleanloop.role": role, "cleanloop.recipe": "r", "cleanloop.test": "t",
            "cleanloop.source_data": "d", "cleanloop.seed": str(seed), "cleanloop.data": "d"}
    with mlflow.start_run(tags=tags) as run:
        folder = Path(cfg.paths.root_dir) / run.info.run_id
        folder.mkdir()
        frame.to_parquet(folder / "test_predictions.parquet", index=False)
        mlflow.log_artifact(str(folder / "test_predictions.parquet"))
    return run.info.run_id


def test_corrected_test_split_changes_only_the_reviewed_rows_beside_the_raw_numbers(tmp_path):
    manifest = manifest_with_flipped_test_labels(tmp_path)
    base = ["data=manifest", f"data.manifest={manifest}", "compare.n_bootstrap=100"]
    cfg = make_cfg(tmp_path, *base)
    a = _log_baseline(cfg, baseline_predictions(manifest, tmp_path / "a", seed=0), 0, "baseline")
    b = _log_baseline(cfg, baseline_predictions(manifest, tmp_path / "b", seed=1), 0, "cleaned")
    pair = [f"compare.baseline={a}", f"compare.cleaned={b}"]
    decisions = tmp_path / "decisions.csv"  # one export: a train row (prune's) and three test rows
    decisions.write_text("image_uuid,decision,reviewer_note\ndark-0,drop,\ndark-5,relabel:dark,looks dark\n"
                         "mid-7,drop,\nbright-9,keep,\n")

    # the pure part: only the reviewed test rows change
    test = pd.read_csv(manifest, dtype=str).query("split == 'test'")
    uuids = test["image_uuid"].tolist()
    labels = np.array([CLASSES.index(c) for c in test["label"]])
    rows = compare.read_test_decisions(decisions, test_uuids=uuids, classes=CLASSES,
                                       train_uuids={"dark-0", "dark-1"})
    assert rows["image_uuid"].tolist() == ["dark-5", "mid-7", "bright-9"] and rows.attrs["n_train_rows"] == 1
    fixed, keep = compare.correct_test_split(uuids, labels, rows, CLASSES)
    changed = {uuids[i] for i in np.flatnonzero(fixed != labels)}
    assert changed == {"dark-5"} and fixed[uuids.index("dark-5")] == CLASSES.index("dark")
    assert {uuids[i] for i in np.flatnonzero(~keep)} == {"mid-7"}

    raw = compare.run(make_cfg(tmp_path, *base, *pair))
    both = compare.run(make_cfg(tmp_path, *base, *pair, f"compare.test_decisions={decisions}"))
    folder = Path(both["dir"])
    pd.testing.assert_frame_equal(pd.read_csv(folder / "recall_deltas.csv"),
                                  pd.read_csv(Path(raw["dir"]) / "recall_deltas.csv"))  # raw numbers kept
    assert both["balanced_accuracy"] == raw["balanced_accuracy"] and both["n_test"] == raw["n_test"] == 30
    c = both["corrected"]
    assert (c["n_test"], c["n_removed"], c["n_relabelled"], c["n_train_decisions_ignored"]) == (29, 1, 1, 1)
    corrected = pd.read_csv(folder / "recall_deltas_corrected.csv", dtype={"class": str}).set_index("class")
    assert corrected["n_test"].sum() == 29 and corrected.loc["dark", "n_test"] == 11  # dark-5 now dark (and bright-9, kept)
    # both models predict the true class: the corrected split's recall is higher than the raw one's
    assert c["balanced_accuracy"]["value_a"] > raw["balanced_accuracy"]["value_a"]
    summary = json.loads((folder / "compare_summary.json").read_text())
    assert summary["corrected"]["n_relabelled"] == 1
    metrics = mlflow.get_run(both["run_id"]).data.metrics
    assert {"corrected/delta/balanced_accuracy", "corrected/delta/balanced_accuracy/ci_low",
            "corrected/n_removed", "delta/balanced_accuracy"} <= set(metrics)
    assert "corrected" not in raw and not (Path(raw["dir"]) / "recall_deltas_corrected.csv").exists()

    # a row that is no test row (nor a train row of this manifest), or an unknown class: one line each
    bad = tmp_path / "bad.csv"
    bad.write_text("image_uuid,decision\nnobody,drop\n")
    with pytest.raises(CleanloopError, match="not test rows of the compared runs"):
        compare.run(make_cfg(tmp_path, *base, *pair, f"compare.test_decisions={bad}"))
    bad.write_text("image_uuid,decision\ndark-5,relabel:purple\n")
    with pytest.raises(CleanloopError, match="relabel to unknown class 'purple'"):
        compare.run(make_cfg(tmp_path, *base, *pair, f"compare.test_decisions={bad}"))


def test_prune_leaves_test_row_decisions_to_compare(tmp_path):
    from cleanloop.steps.common import load_input

    manifest = manifest_with_flipped_test_labels(tmp_path)
    train = pd.read_csv(manifest, dtype=str).query("split == 'train'")
    issues = pd.DataFrame({"image_uuid": train["image_uuid"], "given_label": train["label"],
                           "label_quality": np.linspace(0.5, 0.9, len(train)), "is_label_issue": False,
                           "is_outlier": False})
    issues.to_csv(tmp_path / "issues.csv", index=False)
    only_train, with_test = tmp_path / "train_decisions.csv", tmp_path / "decisions.csv"
    only_train.write_text("image_uuid,decision\ndark-0,drop\n")
    with_test.write_text("image_uuid,decision\ndark-0,drop\ndark-5,relabel:dark\n")
    base = ["data=manifest", f"data.manifest={manifest}", f"prune.issues={tmp_path / 'issues.csv'}"]
    cfg = make_cfg(tmp_path, *base, f"prune.decisions={with_test}")
    info = prune.run(cfg)
    cleaned = pd.read_csv(info["path"], dtype=str).set_index("image_uuid")
    assert "dark-0" not in cleaned.index and cleaned.loc["dark-5", "label"] == "mid"  # the test row untouched
    # test-row decisions are compare's: they never make a new cleaned manifest (nor a retrain)
    m = load_input(cfg)
    assert decisions_identity(with_test, m) == decisions_identity(only_train, m)
    assert prune.run(make_cfg(tmp_path, *base, f"prune.decisions={only_train}"))["reused"]

"""Issue 4: compare (pairing, refusals, flag-set overlap) and the whole cycle on the demo."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from cleanloop.errors import CleanloopError
from cleanloop.steps import compare
from cleanloop.steps.train import probs_frame

from conftest import make_cfg

CLASSES = ["a", "b", "c"]


def log_train_run(cfg, role: str, *, recipe: str = "r1", seed: int = 0, correct: float = 0.8, rng_seed: int = 0,
                  data: str = "d1"):
    """A finished train run as `cleanloop train` leaves it: tags plus test_predictions.parquet."""
    from cleanloop.tracking import setup

    setup(cfg.tracking)
    rng = np.random.default_rng(rng_seed)
    labels = np.repeat(np.arange(3), 100)
    preds = np.where(rng.random(300) < correct, labels, (labels + 1) % 3)
    probs = np.eye(3)[preds]
    tags = {"cleanloop.step": "train", "cleanloop.role": role, "cleanloop.recipe": recipe,
            "cleanloop.test": "t1", "cleanloop.source_data": "d1", "cleanloop.seed": str(seed),
            "cleanloop.data": data if role == "cleaned" else "d1"}
    with mlflow.start_run(tags=tags) as run:
        folder = Path(cfg.paths.root_dir) / run.info.run_id
        folder.mkdir()
        df = probs_frame([f"u{i:03d}" for i in range(300)], [CLASSES[i] for i in labels], probs, CLASSES)
        df.to_parquet(folder / "test_predictions.parquet", index=False)
        mlflow.log_artifact(str(folder / "test_predictions.parquet"))
    return run.info.run_id


def test_compare_without_cleaned_run_says_what_to_run(tmp_path):
    cfg = make_cfg(tmp_path)
    log_train_run(cfg, "baseline")
    with pytest.raises(CleanloopError, match=r"run `cleanloop train role=cleaned` \(or `make train-cleaned`\)"):
        compare.run(cfg)


def test_compare_refuses_runs_of_different_recipes(tmp_path):
    cfg = make_cfg(tmp_path)
    a = log_train_run(cfg, "baseline", recipe="r1")
    b = log_train_run(cfg, "cleaned", recipe="r2")
    with pytest.raises(CleanloopError, match="the recipes differ"):
        compare.run(make_cfg(tmp_path, f"compare.baseline={a}", f"compare.cleaned={b}"))
    with pytest.raises(CleanloopError, match="has no baseline of the same recipe"):
        compare.run(cfg)  # automatic pairing finds no baseline with the cleaned run's recipe


def test_compare_pairs_by_the_cleaned_manifest_and_lists_candidates_when_it_cannot_tell(tmp_path):
    from cleanloop.config import file_hash

    cfg = make_cfg(tmp_path, "compare.n_bootstrap=50")
    mine = tmp_path / "mine.csv"
    mine.write_text("image_uuid,path,label,split\n")
    other = tmp_path / "other.csv"
    other.write_text("image_uuid,path,label,split\nx,x.png,a,train\n")
    base = log_train_run(cfg, "baseline")
    a = log_train_run(cfg, "cleaned", data=file_hash(mine), rng_seed=1)
    b = log_train_run(cfg, "cleaned", data=file_hash(other), rng_seed=2)  # the latest cleaned run
    # no cleaned manifest of this config's own (nothing pruned here): two candidates, refused and listed
    with pytest.raises(CleanloopError, match=rf"2 cleaned manifest\(s\).*{a}.*{b}|2 cleaned manifest\(s\).*{b}.*{a}"):
        compare.run(cfg)
    # this config's cleaned manifest names the cleaned run, though another one is newer
    summary = compare.run(make_cfg(tmp_path, "compare.n_bootstrap=50", f"cleaned_manifest={mine}"))
    assert summary["baseline_runs"] == [base] and summary["cleaned_runs"] == [a]
    # a cleaned manifest that no run trained on is refused, never paired with another manifest's run
    third = tmp_path / "third.csv"
    third.write_text("image_uuid,path,label,split\ny,y.png,b,train\n")
    with pytest.raises(CleanloopError, match=rf"this config's, {third}, has no cleaned run"):
        compare.run(make_cfg(tmp_path, f"cleaned_manifest={third}"))


def test_compare_pairs_seeds_and_writes_outputs(tmp_path):
    cfg = make_cfg(tmp_path, "compare.n_bootstrap=200")
    for seed in range(3):
        log_train_run(cfg, "baseline", seed=seed, correct=0.7, rng_seed=seed)
        log_train_run(cfg, "cleaned", seed=seed, correct=0.9, rng_seed=10 + seed)
    log_train_run(cfg, "baseline", recipe="other", seed=0, correct=0.1)  # never paired
    summary = compare.run(cfg)
    assert summary["n_seeds"] == 3 and len(summary["baseline_runs"]) == 3
    ba = summary["balanced_accuracy"]
    assert 0.15 < ba["delta"] < 0.25 and ba["ci_low"] > 0
    table = pd.read_csv(tmp_path / "outputs" / "demo" / "compare" / "recall_deltas.csv")
    assert list(table.columns) == ["class", "recall_baseline", "recall_cleaned", "delta", "ci_low", "ci_high",
                                   "issue_rate", "n_test"]
    assert table["n_test"].tolist() == [100, 100, 100]
    assert (table["ci_low"] <= table["delta"]).all() and (table["delta"] <= table["ci_high"]).all()
    run = mlflow.get_run(summary["run_id"])
    assert {"delta/top1", "delta/balanced_accuracy", "delta/recall/a", "delta/recall/a/ci_low",
            "delta/recall/a/ci_high"} <= set(run.data.metrics)
    note = run.data.tags["mlflow.note.content"]  # the description: the verdict, the per-class table
    assert note.startswith(f"**{summary['verdict']['text']}") and "| a | " in note and "| 100 |" in note
    assert "recall_deltas.png?workflowType=machine_learning" in note


def test_flag_sets_side_by_side(tmp_path):
    def issues(flagged):
        return pd.DataFrame({"image_uuid": [f"u{i}" for i in range(6)], "given_label": list("aabbcc"),
                             "is_label_issue": [i in flagged for i in range(6)]})

    per, only = compare.flag_overlap(issues({0, 1, 2}), issues({1, 2, 4}))
    per = per.set_index("class")
    assert per.loc["a", "both"] == 1 and per.loc["a", "a_only"] == 1 and per.loc["c", "b_only"] == 1
    assert set(only["image_uuid"]) == {"u0", "u4"}
    assert set(only.loc[only["image_uuid"] == "u0", "flagged_by"]) == {"a_only"}


@pytest.mark.slow
@pytest.mark.xdist_group("demo_cycle")
def test_cycle_on_demo_end_to_end(demo_cycle, demo_dir):
    # A second, fully cached cycle is tested on a tiny manifest (test_lineage, test_sweep): the demo runs
    # once (the `demo_cycle` fixture), and the MLflow browser test reads the same store.
    tmp_path, r, _ = demo_cycle
    assert r.returncode == 0, r.stderr[-3000:]
    assert "balanced accuracy" in r.stdout and "recall moved most" in r.stdout and "mislabel_candidates.png" in r.stdout
    # the audit ran first: at the B8 defaults the demo's digits hold one natural look-alike pair, no leak
    assert "  audit     1 duplicate pairs (0 exact), 0 train<->test/val leaks" in r.stdout
    # the test rows, scored by the three baselines: the demo's test labels are clean, so few flags
    test_line = next(line for line in r.stdout.splitlines() if line.startswith("  test      "))
    assert test_line.endswith("flag/test_label_issues.csv") and "test rows flagged (" in test_line
    summary = json.loads((tmp_path / "outputs" / "demo" / "summary.json").read_text())
    gt = summary["flag"]["ground_truth"]
    assert gt["precision"] >= 0.80 and gt["recall"] >= 0.70 and gt["garbage_found"] == gt["n_garbage"] == 12
    assert summary["cleaned"]["balanced_accuracy"] > summary["baseline"]["balanced_accuracy"]
    assert summary["baseline"]["top1"] >= 0.90
    # the verdict over three seed pairs: helped, and the three most-noised classes' recalls up
    assert summary["seeds"] == [0, 1, 2] and summary["verdict"]["verdict"] == "helped"
    tf = summary["test_flag"]
    assert tf["n_models"] == 3 and tf["n_rows"] == summary["n_test"] and tf["issue_rate"] <= 0.05
    assert "verdict   HELPED: balanced accuracy" in r.stdout
    truth = pd.read_csv(demo_dir / "ground_truth.csv")
    manifest = pd.read_csv(demo_dir / "manifest.csv").merge(truth, on="image_uuid")
    noised = manifest[manifest["split"] == "train"].groupby("true_label")["is_noisy"].mean().nlargest(3).index
    recall = {r["class"]: r for r in summary["recall"]}
    assert all(recall[c]["delta"] > 0 for c in noised), {c: recall[c]["delta"] for c in noised}
    for p in summary["paths"].values():
        assert os.path.exists(p if os.path.isabs(p) else tmp_path / p)

    # one parent run per cycle, every step nested under it, folds under the oof run
    mlflow.set_tracking_uri(summary["mlflow"]["tracking_uri"])
    runs = mlflow.search_runs(search_all_experiments=True)
    cycle = runs[runs["tags.cleanloop.step"] == "cycle"]
    assert len(cycle) == 1
    children = runs[runs["tags.mlflow.parentRunId"] == cycle.iloc[0]["run_id"]]
    assert sorted(children["tags.cleanloop.step"]) == ["audit", "compare", "flag", "flag-test", "oof", "prune", "review",
                                                          *["train"] * 6]
    oof_id = children[children["tags.cleanloop.step"] == "oof"].iloc[0]["run_id"]
    assert (runs["tags.mlflow.parentRunId"] == oof_id).sum() == 5
    trains = children[children["tags.cleanloop.step"] == "train"]
    assert sorted(trains["tags.cleanloop.role"]) == ["baseline"] * 3 + ["cleaned"] * 3
    assert sorted(trains["tags.cleanloop.seed"]) == ["0", "0", "1", "1", "2", "2"]
    assert set(trains["tags.cleanloop.budget"]) == {"steps"}
    assert trains["tags.cleanloop.recipe"].nunique() == 1 and trains["tags.cleanloop.test"].nunique() == 1

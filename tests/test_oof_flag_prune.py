"""Issue 3: k-fold OOF probabilities, cleanlab flags and pruning, end to end on real tiny data."""

from __future__ import annotations

import hashlib
import json
import signal
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from cleanloop.folds import assign_folds
from cleanloop.oof_file import oof_frame, read_meta, write_oof
from cleanloop.steps import flag, oof, prune, train

from conftest import ForkedCli, make_cfg, run_cli, run_main

FAST = ("recipe.epochs=3",)  # enough to exercise the loop; accuracy is the cycle test's job


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="session")  # kept by its xdist process across the group's tests
def demo_oof(tmp_path_factory, demo_dir):
    root = tmp_path_factory.mktemp("oofrun")
    cfg = make_cfg(root, f"data.manifest={demo_dir}/manifest.csv", *FAST)
    path = Path(oof.run(cfg)["path"])
    return cfg, path


# -- folds (pure) --------------------------------------------------------------------------------


def test_groups_never_straddle_folds_and_seed_fixes_folds():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(60), 3)  # 60 patients, 3 images each
    labels = rng.integers(0, 3, size=len(groups))
    folds = assign_folds(labels, n_folds=5, seed=7, groups=groups)
    assert set(folds) == set(range(5))
    per_group = pd.Series(folds).groupby(groups).nunique()
    assert (per_group == 1).all()
    assert np.array_equal(folds, assign_folds(labels, n_folds=5, seed=7, groups=groups))
    assert not np.array_equal(folds, assign_folds(labels, n_folds=5, seed=8, groups=groups))
    plain = assign_folds(labels, n_folds=5, seed=7)
    assert np.bincount(plain).min() >= len(labels) // 5 - 1  # stratified, balanced folds


# -- oof -----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.xdist_group("demo_oof")  # one process builds the demo OOF (module fixture) once
def test_oof_scores_every_train_row_exactly_once(demo_oof, demo_dir):
    cfg, path = demo_oof
    df = pd.read_parquet(path)
    manifest = pd.read_csv(demo_dir / "manifest.csv", dtype=str, keep_default_na=False)
    train_rows = manifest[manifest["split"] == "train"]
    assert sorted(df["image_uuid"]) == sorted(train_rows["image_uuid"])
    assert not df["image_uuid"].duplicated().any()
    meta = read_meta(path)
    classes = meta["classes"]
    assert classes == sorted(train_rows["label"].unique()) and list(df.columns) == ["image_uuid", "label", "fold", *classes]
    assert set(df["fold"]) == set(range(5))
    assert np.allclose(df[classes].sum(1), 1.0, atol=1e-5)
    # no patient (group) in two folds
    merged = df.merge(train_rows[["image_uuid", "group"]], on="image_uuid")
    assert merged.groupby("group")["fold"].nunique().max() == 1
    # each fold is a nested MLflow run with held-out metrics; the OOF run has the overall figures
    mlflow.set_tracking_uri(cfg.tracking.uri)
    runs = mlflow.search_runs(search_all_experiments=True)
    parent = runs[runs["tags.cleanloop.step"] == "oof"].iloc[0]
    folds = runs[runs["tags.cleanloop.step"] == "oof-fold"]
    assert len(folds) == 5 and (folds["tags.mlflow.parentRunId"] == parent["run_id"]).all()
    assert folds["metrics.heldout/top1"].notna().all() and 0 < parent["metrics.oof/top1"] <= 1
    assert 0 < parent["metrics.oof/balanced_accuracy"] <= 1


@pytest.mark.slow
def test_killed_oof_resumes_at_first_unfinished_fold(tiny_manifest, tmp_path):
    args = ["data=manifest", f"data.manifest={tiny_manifest}", "data.num_workers=0", "model=tiny",
            "model.image_size=16", "model.config.image_size=16", "recipe.batch_size=4", "recipe.epochs=3",
            "oof.n_folds=5"]
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    killed.mkdir()
    proc = ForkedCli("oof", *args, f"paths.root_dir={killed}", cwd=killed)
    steps = killed / ".cache" / "cleanloop" / "steps"

    def folds_done() -> set[int]:  # each finished fold is a cache entry of its own (steps/oof-fold/<key>/)
        return {json.loads(m.read_text())["fold"] + 1 for m in (steps / "oof-fold").glob("[!.]*/cleanloop-entry.json")}

    deadline = time.time() + 300
    while len(folds_done()) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # killed once two of 5 folds are done, mid-way through later ones
    proc.wait()
    done = folds_done()  # which ones: the folds train two at a time (trainer.jobs), in any order
    assert 2 <= len(done) < 5 and not list((steps / "oof").glob("*/oof_probs.parquet"))
    again = run_cli("oof", *args, f"paths.root_dir={killed}", cwd=killed)
    assert again.returncode == 0, again.stderr
    log = again.stdout + again.stderr
    for k in range(1, 6):  # the finished folds are taken, the others trained, none twice
        assert (f"fold {k}/5 reused" in log) == (k in done) and (f"fold {k}/5 trained" in log) == (k not in done), log
    whole.mkdir()
    assert run_cli("oof", *args, f"paths.root_dir={whole}", cwd=whole).returncode == 0
    resumed, one_go = (pd.read_parquet(r / "outputs" / "manifest" / "oof" / "oof_probs.parquet") for r in (killed, whole))
    pd.testing.assert_frame_equal(resumed, one_go, atol=1e-6, check_exact=False)


# -- flag and prune ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.xdist_group("demo_oof")  # one process builds the demo OOF (module fixture) once
def test_flag_outputs_agree_and_repeat(demo_oof):
    cfg, _ = demo_oof
    out = Path(flag.run(cfg)["out_dir"])
    issues = pd.read_csv(out / "label_issues.csv", dtype={"given_label": str, "predicted_label": str})
    assert list(issues.columns) == ["image_uuid", "path", "given_label", "predicted_label", "label_quality",
                                    "is_label_issue", "outlier_score", "is_outlier"]
    assert issues["label_quality"].is_monotonic_increasing and len(issues) == 1359
    per = pd.read_csv(out / "issues_per_class.csv", dtype={"class": str})
    assert list(per.columns[:4]) == ["class", "n_rows", "n_issues", "issue_rate"]
    assert per["issue_rate"].is_monotonic_decreasing
    flagged = issues[issues["is_label_issue"]]
    assert per["n_issues"].sum() == len(flagged) and per["n_rows"].sum() == len(issues)
    assert per.set_index("class")["n_issues"].to_dict() == {
        c: int((flagged["given_label"] == c).sum()) for c in per["class"]}
    conf = pd.read_csv(out / "issue_confusions.csv", dtype=str)
    assert list(conf.columns) == ["given_label", "predicted_label", "count"]
    assert conf["count"].astype(int).sum() == len(flagged)
    pairs = flagged.groupby(["given_label", "predicted_label"]).size()
    assert all(pairs[(g, p)] == int(n) for g, p, n in conf.itertuples(index=False))
    assert (out / "mislabel_candidates.png").stat().st_size > 1000
    summary = json.loads((out / "flag_summary.json").read_text())
    assert "ground_truth" in summary and 0 <= summary["ground_truth"]["precision"] <= 1
    before = sha(out / "label_issues.csv")
    again = flag.run(make_cfg(Path(cfg.paths.root_dir), f"data.manifest={cfg.data.manifest}", *FAST,
                              "paths.reuse_steps=false"))  # recompute, not reuse
    assert again["reused"] is False and sha(out / "label_issues.csv") == before  # same OOF and config: same flags
    assert flag.run(cfg)["reused"] is True

    cleaned_path = Path(prune.run(cfg)["path"])
    manifest = pd.read_csv(cfg.data.manifest, dtype=str, keep_default_na=False)
    cleaned = pd.read_csv(cleaned_path, dtype=str, keep_default_na=False)
    pruned = pd.read_csv(cleaned_path.with_name("pruned_rows.csv"), dtype=str, keep_default_na=False)
    assert list(cleaned.columns) == list(manifest.columns)
    assert set(pruned["reason"]) <= {"label_issue", "outlier", "reviewer"}
    assert len(cleaned) == len(manifest) - len(pruned)
    assert not set(pruned["image_uuid"]) & set(cleaned["image_uuid"])
    keep = manifest[manifest["split"] != "train"]
    pd.testing.assert_frame_equal(cleaned[cleaned["split"] != "train"].reset_index(drop=True),
                                  keep.reset_index(drop=True))
    n_train = manifest[manifest["split"] == "train"]["label"].value_counts()
    for c, n in pruned["given_label"].value_counts().items():
        assert n <= np.floor(cfg.prune.max_fraction_per_class * n_train[c])


@pytest.mark.slow
@pytest.mark.xdist_group("demo_oof")  # one process builds the demo OOF (module fixture) once
def test_insample_scoring_of_a_checkpoint(demo_oof):
    cfg, _ = demo_oof
    metrics = train.run(cfg)
    model_dir = Path(cfg.paths.out_dir) / "train" / "baseline" / "model"
    cfg_in = make_cfg(Path(cfg.paths.root_dir), f"data.manifest={cfg.data.manifest}", *FAST, "oof=insample",
                      f"oof.checkpoint={model_dir}", "paths.out_dir=" + str(Path(cfg.paths.root_dir) / "insample"))
    path = Path(oof.run(cfg_in)["path"])
    df = pd.read_parquet(path)
    assert (df["fold"] == -1).all() and len(df) == 1359
    assert read_meta(path)["method"] == "insample"
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`cleanloop.oof` = 'insample'")
    assert len(runs) == 1 and runs.iloc[0]["tags.cleanloop.in_sample"] == "true"
    assert metrics["run_id"]


# -- sigmoid heads and bad input (fast: tiny manifest, hand-made OOF files) ----------------------


def test_sigmoid_head_rows_normalised_before_cleanlab(tiny_manifest, tmp_path):
    cfg = make_cfg(tmp_path, "data=manifest", f"data.manifest={tiny_manifest}", "data.num_workers=0",
                   "recipe.head=sigmoid", "recipe.epochs=1", "oof.n_folds=2", "model.image_size=16",
                   "model=tiny", "model.config.image_size=16", "flag.outlier.top_fraction=0.1")
    path = Path(oof.run(cfg)["path"])
    df = pd.read_parquet(path)
    assert read_meta(path)["head"] == "sigmoid"
    assert not np.allclose(df[["bright", "dark", "mid"]].sum(1), 1.0)  # raw sigmoid scores stored
    out = Path(flag.run(cfg)["out_dir"])
    assert json.loads((out / "flag_summary.json").read_text())["normalised_rows"] is True
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`cleanloop.step` = 'flag'")
    assert runs.iloc[0]["tags.cleanloop.normalised_rows"] == "true"


def _hand_made_oof(tiny_manifest: Path, path: Path, *, drop=0, classes=None, value=None) -> Path:
    m = pd.read_csv(tiny_manifest, dtype=str)
    train_rows = m[m["split"] == "train"].iloc[drop:]
    classes = classes or ["bright", "dark", "mid"]
    probs = np.full((len(train_rows), 3), 1 / 3)
    if value is not None:
        probs[2, 0] = value
    write_oof(path, oof_frame(train_rows["image_uuid"], train_rows["label"], np.zeros(len(train_rows)), probs, classes),
              classes=classes)
    return path


@pytest.mark.parametrize("case,expected", [
    ("missing_rows", "rows do not match the manifest's train split (2 train row(s) missing"),
    ("class_order", "class order ['mid', 'dark', 'bright'] differs from the manifest's ['bright', 'dark', 'mid']"),
    ("nan", "pred_probs has NaN in 1 row(s), first image_uuid 'dark-2'"),
    ("negative", "negative"),
])
def test_flag_refuses_bad_oof_files(capsys, tiny_manifest, tmp_path, case, expected):
    kw = {"missing_rows": {"drop": 2}, "class_order": {"classes": ["mid", "dark", "bright"]},
          "nan": {"value": float("nan")}, "negative": {"value": -0.2}}[case]
    bad = _hand_made_oof(tiny_manifest, tmp_path / "bad.parquet", **kw)
    before = sha(bad), sha(tiny_manifest)
    code, err = run_main(capsys, "flag", "data=manifest", f"data.manifest={tiny_manifest}", f"flag.oof={bad}",
                         f"paths.root_dir={tmp_path}")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("cleanloop flag: error: ")
    assert expected in lines[0]
    assert (sha(bad), sha(tiny_manifest)) == before
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").rglob("label_issues.csv"))


def test_oof_refuses_class_with_fewer_rows_than_folds(capsys, tiny_manifest, tmp_path):
    code, err = run_main(capsys, "oof", "data=manifest", f"data.manifest={tiny_manifest}", "oof.n_folds=10",
                         f"paths.root_dir={tmp_path}")
    assert code == 1
    assert "class 'bright' has 6 train row(s), fewer than oof.n_folds=10" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("decision,expected", [
    ("nobody,drop", "1 image_uuid(s) not among the scored train rows, first: 'nobody' at line 2"),
    ("dark-1,relabel:purple", "purple"),
])
def test_prune_refuses_bad_decisions(capsys, tiny_manifest, tmp_path, decision, expected):
    issues = tmp_path / "label_issues.csv"
    m = pd.read_csv(tiny_manifest, dtype=str)
    t = m[m["split"] == "train"]
    pd.DataFrame({"image_uuid": t["image_uuid"], "path": t["path"], "given_label": t["label"],
                  "predicted_label": t["label"], "label_quality": 0.5, "is_label_issue": False,
                  "outlier_score": 0.1, "is_outlier": False}).to_csv(issues, index=False)
    decisions = tmp_path / "decisions.csv"
    decisions.write_text("image_uuid,decision\n" + decision + "\n")
    before = sha(decisions)
    code, err = run_main(capsys, "prune", "data=manifest", f"data.manifest={tiny_manifest}", f"prune.issues={issues}",
                         f"prune.decisions={decisions}", f"paths.root_dir={tmp_path}")
    assert code == 1 and expected in err and err.strip().startswith("cleanloop prune: error: ")
    assert len(err.strip().splitlines()) == 1 and sha(decisions) == before
    assert not list(tmp_path.rglob("cleaned_manifest.*"))


@pytest.mark.slow
@pytest.mark.xdist_group("demo_oof")  # one process builds the demo OOF (module fixture) once
def test_embed_mode_oof_same_folds_and_file(demo_oof, demo_dir, tmp_path):
    cfg, kfold_path = demo_oof
    cfg_e = make_cfg(tmp_path, f"data.manifest={demo_dir}/manifest.csv", *FAST, "oof=embed")
    t0 = time.time()
    info = oof.run(cfg_e)
    seconds = time.time() - t0
    embed, kfold = pd.read_parquet(info["path"]), pd.read_parquet(kfold_path)
    assert list(embed.columns) == list(kfold.columns) and len(embed) == len(kfold)
    assert embed["image_uuid"].is_unique and (embed["fold"].to_numpy() == kfold["fold"].to_numpy()).all()
    classes = read_meta(info["path"])["classes"]
    assert np.allclose(embed[classes].sum(1), 1.0, atol=1e-5) and read_meta(info["path"])["method"] == "embed"
    assert 0 < info["top1"] <= 1 and seconds < 120


def test_oof_repeats_average_two_kfold_runs(tiny_manifest, tmp_path):
    """oof.repeats=2: two k-fold runs (their own fold shuffles and seeds), averaged row by row."""
    common = ("data=manifest", f"data.manifest={tiny_manifest}", "data.num_workers=0", "model=tiny",
              "model.image_size=16", "model.config.image_size=16", "recipe.epochs=1", "oof.n_folds=2")
    info = oof.run(make_cfg(tmp_path, *common, "oof.repeats=2"))
    fold_dir = Path(info["dir"]).parent.parent / "oof-fold"  # each fold of each repeat: an entry of its own
    keys = info["fold_entries"]  # repeat by repeat, fold by fold
    runs = []
    for r in range(2):
        parts = [pd.read_parquet(fold_dir / key / "fold.parquet") for key in keys[2 * r:2 * r + 2]]
        runs.append(pd.concat(parts).set_index("image_uuid").sort_index())
    assert list(runs[0].index) == list(runs[1].index) and not np.allclose(runs[0].to_numpy(), runs[1].to_numpy())
    df = pd.read_parquet(info["path"]).set_index("image_uuid").sort_index()
    classes = [c for c in df.columns if c not in ("label", "fold")]
    expected = (runs[0].to_numpy() + runs[1].to_numpy()) / 2
    np.testing.assert_allclose(df[classes].to_numpy(), expected, rtol=1e-6)
    single = oof.run(make_cfg(tmp_path, *common))  # repeats=1 is another entry: the first run alone
    assert single["key"] != info["key"] and single["fold_entries"] == keys[:2]  # its folds, reused
    np.testing.assert_allclose(pd.read_parquet(single["path"]).set_index("image_uuid").sort_index()[classes].to_numpy(),
                               runs[0].to_numpy(), rtol=1e-6)

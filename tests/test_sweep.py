"""Issue 5: cached steps across a multirun, the joblib launcher, a shared MLflow server."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from cleanloop.oof_file import oof_frame, write_oof

from conftest import run_cli, tiny_rows

TINY = ["data=manifest", "data.num_workers=0", "model=tiny", "model.image_size=16", "model.config.image_size=16"]
CLASSES = ["bright", "dark", "mid"]


def hand_made_oof(manifest: Path, path: Path) -> Path:
    m = pd.read_csv(manifest, dtype=str)
    t = m[m["split"] == "train"]
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=len(t))
    write_oof(path, oof_frame(t["image_uuid"], t["label"], np.zeros(len(t)), probs, CLASSES), classes=CLASSES)
    return path


def runs_of(uri: str, step: str) -> pd.DataFrame:
    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.`cleanloop.step` = '{step}'")


@pytest.mark.slow
def test_cycle_multirun_trains_the_folds_once(tiny_manifest, tmp_path):
    fast = [*TINY, f"data.manifest={tiny_manifest}", "recipe.epochs=1", "oof.n_folds=2", "compare.n_bootstrap=50",
            "compare.seeds=1",
            f"paths.root_dir={tmp_path}"]
    r = run_cli("cycle", "-m", "flag.filter_by=prune_by_noise_rate,both,confident_learning", *fast, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert out.count("fold 1/2 trained") == 1 and out.count("fold 2/2 trained") == 1
    assert out.count("oof: reused cached outputs") == 2 and out.count("train-baseline: reused cached outputs") == 2
    sweep = next((tmp_path / "multirun").glob("*/*/sweep_summary.csv"))
    table = pd.read_csv(sweep)
    assert len(table) == 3 and {"delta_balanced_accuracy", "ci_low", "ci_high"} <= set(table.columns)
    assert any(c.startswith("delta_recall/") for c in table.columns)
    assert set(table["option"]) == {f"flag.filter_by={f}" for f in ("prune_by_noise_rate", "both", "confident_learning")}
    # each job's out_dir shows the contract layout, and every cycle nests under the sweep's parent run
    for job in (0, 1, 2):
        assert (sweep.parent / str(job) / "oof" / "oof_probs.parquet").is_file()
        assert (sweep.parent / str(job) / "summary.json").is_file()
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    parent = runs_of(uri, "sweep")
    cycles = runs_of(uri, "cycle")
    assert len(parent) == 1 and len(cycles) == 3
    assert (cycles["tags.mlflow.parentRunId"] == parent.iloc[0]["run_id"]).all()
    # the parent run's description is the table of the sweep's points, best first
    note = parent.iloc[0]["tags.mlflow.note.content"].splitlines()
    assert note[0].startswith("**Sweep: 3 point(s), best first**") and note[2].startswith("| option | verdict |")
    rows = [line for line in note[4:] if line.startswith("| flag.filter_by=")]
    assert [r.split(" | ")[0][2:] for r in rows] == table["option"].tolist()
    assert all(f"{d:+.4f}" in r for r, d in zip(rows, table["delta_balanced_accuracy"], strict=True))


def test_flag_multirun_from_the_cli_finds_the_cached_oof(tiny_manifest, tmp_path):
    args = [*TINY, f"data.manifest={tiny_manifest}", "recipe.epochs=1", "oof.n_folds=2", f"paths.root_dir={tmp_path}"]
    assert run_cli("oof", *args, cwd=tmp_path).returncode == 0
    r = run_cli("flag", "-m", "flag.filter_by=both,prune_by_noise_rate", *args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    sweep = next((tmp_path / "multirun").glob("*/*/sweep_summary.csv"))
    assert len(pd.read_csv(sweep)) == 2
    for job in (0, 1):
        assert (sweep.parent / str(job) / "flag" / "label_issues.csv").is_file()


def test_four_parallel_joblib_jobs_lose_no_run(tiny_manifest, tmp_path):
    oof = hand_made_oof(tiny_manifest, tmp_path / "oof.parquet")
    r = run_cli("flag", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=4",
                "flag.filter_by=prune_by_noise_rate,both,confident_learning,predicted_neq_given",
                *TINY, f"data.manifest={tiny_manifest}", f"flag.oof={oof}", f"paths.root_dir={tmp_path}",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Joblib.Parallel" in r.stdout + r.stderr or "joblib" in (r.stdout + r.stderr).lower()
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    flags = runs_of(uri, "flag")
    assert len(flags) == 4 and (flags["status"] == "FINISHED").all()
    wanted = ["metrics.flag/n_issues", "metrics.flag/issue_rate", *(f"metrics.flag/issue_rate/{c}" for c in CLASSES)]
    assert flags[wanted].notna().all().all()
    assert sorted(flags["params.flag.filter_by"]) == sorted(
        ["prune_by_noise_rate", "both", "confident_learning", "predicted_neq_given"])


@pytest.mark.slow
def test_two_submitit_local_jobs_log_under_one_sweep_parent(tiny_manifest, tmp_path):
    """hydra/launcher=submitit_local: real submitit jobs (pickled configs, one process each)."""
    oof = hand_made_oof(tiny_manifest, tmp_path / "oof.parquet")
    sweep = tmp_path / "sweep"
    r = run_cli("flag", "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                f"hydra.sweep.dir={sweep}", "flag.filter_by=prune_by_noise_rate,both", *TINY,
                f"data.manifest={tiny_manifest}", f"flag.oof={oof}", f"paths.root_dir={tmp_path}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    pickled = sorted(p.name for p in (sweep / ".submitit").rglob("*_submitted.pkl"))
    assert len(pickled) == 2, pickled  # two jobs went through submitit, each with its pickled call
    for job in ("0", "1"):
        assert (sweep / job / "flag" / "label_issues.csv").is_file()
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    flags = runs_of(uri, "flag")
    assert len(flags) == 2 and (flags["status"] == "FINISHED").all()
    assert sorted(flags["params.flag.filter_by"]) == ["both", "prune_by_noise_rate"]
    parents = set(flags["tags.mlflow.parentRunId"])
    assert len(parents) == 1 and None not in parents
    parent = mlflow.get_run(parents.pop())
    assert parent.info.status == "FINISHED" and parent.data.tags.get("cleanloop.step", "").startswith("sweep")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_tracking_server_fails_before_training(capsys, tiny_manifest, tmp_path):
    from cleanloop import cli

    port = _free_port()  # nothing listens there
    with pytest.raises(SystemExit) as e:
        cli.main(["train", *TINY, f"data.manifest={tiny_manifest}", f"tracking.uri=http://127.0.0.1:{port}",
                  f"paths.root_dir={tmp_path}"])
    out = capsys.readouterr()
    assert e.value.code == 1
    assert f"tracking.uri=http://127.0.0.1:{port}: no MLflow server answers" in out.err
    assert "epoch 1" not in out.out and not list(tmp_path.rglob("metrics.json"))


# Issue 12: a seed sweep with Hydra's default sweep folder (multirun/<date>/<time>, subdir ${hydra.job.num}).


def test_pooled_compare_config_has_no_hydra_node(tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from omegaconf.errors import InterpolationToMissingValueError

    from cleanloop.config import conf_dir
    from cleanloop.sweep import job_config

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        # the config a multirun's callbacks get: hydra.job.num is still ??? (sweep.subdir points at it)
        cfg = compose("config", overrides=[f"paths.root_dir={tmp_path}"], return_hydra_config=True)
    with pytest.raises(InterpolationToMissingValueError, match="hydra.job.num"):
        OmegaConf.to_container(cfg, resolve=True)
    job_cfg = job_config(cfg)
    assert "hydra" not in job_cfg and "hydra" in cfg  # the multirun config is left as it was
    OmegaConf.to_container(job_cfg, resolve=True)  # what step_run logs: nothing left that cannot resolve


@pytest.mark.filterwarnings("ignore:Callback SweepCallback")
def test_a_failing_sweep_summary_exits_1(tiny_manifest, tmp_path, monkeypatch, capsys):
    from cleanloop import cli

    sweep_dir = tmp_path / "sweep"
    (sweep_dir / "sweep_summary.csv").mkdir(parents=True)  # the summary cannot be written there
    monkeypatch.setattr(cli, "run_step", lambda step, cfg: None)  # the jobs themselves are not the point
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        cli.main(["flag", "-m", "flag.filter_by=both", *TINY, f"data.manifest={tiny_manifest}",
                  f"paths.root_dir={tmp_path}", f"hydra.sweep.dir={sweep_dir}"])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"cleanloop flag: error: sweep summary for {sweep_dir} failed (IsADirectoryError")
    parent = runs_of(f"sqlite:///{tmp_path}/mlruns/mlflow.db", "sweep")
    assert list(parent["status"]) == ["FAILED"]


@pytest.mark.slow
def test_seed_sweep_in_the_default_sweep_folder_finishes_every_run(tmp_path):
    """`cleanloop cycle -m recipe.seed=0,1` run from a scratch project root with Hydra's default sweep
    folder (multirun/<date>/<time>, subdir ${hydra.job.num}) and the default MLflow store, both under it."""
    (tmp_path / "data").mkdir()
    tiny_rows(tmp_path / "data").to_csv(tmp_path / "data" / "manifest.csv", index=False)
    # compare.seeds=1: one seed pair per job (the seeds come from the sweep)
    r = run_cli("cycle", "-m", "recipe.seed=0,1", *TINY, "data.manifest=data/manifest.csv", "recipe.epochs=1",
                "oof.n_folds=2", "compare.n_bootstrap=50", "compare.seeds=1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Callback SweepCallback" not in r.stderr, r.stderr[-3000:]
    (summary,) = (tmp_path / "multirun").glob("*/*/sweep_summary.csv")
    table = pd.read_csv(summary)
    assert len(table) == 1 and table.loc[0, "n_seeds"] >= 2 and pd.notna(table.loc[0, "delta_balanced_accuracy"])
    assert table.loc[0, "verdict"] in ("helped", "hurt", "inconclusive")  # a pooled verdict over the seeds
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert {r.info.status for r in runs} == {"FINISHED"}, [(r.info.run_name, r.info.status) for r in runs]
    (sweep,) = [r for r in runs if r.data.tags.get("cleanloop.step") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == sweep.info.run_id]
    assert sorted(r.data.tags["cleanloop.step"] for r in children) == ["compare", "cycle", "cycle"]
    (pooled,) = [r for r in children if r.data.tags["cleanloop.step"] == "compare"]
    assert len(pooled.data.tags["cleanloop.cleaned_runs"].split(",")) >= 2  # pooled over the seeds

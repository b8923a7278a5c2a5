"""Issue 16 item 1: folds as jobs. ``oof.folds=[i,...]`` computes those folds into their own cache entries
(steps/oof-fold/), from separate processes at once; a plain ``oof`` or ``oof.merge=true`` assembles the file
one process writes; missing folds are named; the fold entries are what a killed or failed OOF resumes from."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from cleanloop.cache import DONE

from conftest import ForkedCli, fail_nth_fit, make_cfg, run_cli, run_main

FAST = ["data=manifest", "model=tiny", "model.image_size=16", "model.config.image_size=16", "recipe.epochs=1",
        "data.num_workers=0", "review.screenshot=false"]


def fold_markers(root: Path) -> dict[int, dict]:
    """{fold: done-marker} of the finished fold entries under ``root``'s step cache."""
    step_dir = root / ".cache" / "cleanloop" / "steps" / "oof-fold"
    markers = [json.loads(m.read_text()) for m in step_dir.glob(f"[!.]*/{DONE}")] if step_dir.is_dir() else []
    return {m["fold"]: m for m in markers}


def start(*args: str, cwd: Path) -> ForkedCli:
    return ForkedCli(*args, cwd=cwd)


@pytest.mark.slow
def test_parallel_fold_jobs_and_a_merge_write_the_one_process_file(tiny_manifest, tmp_path):
    """Two processes at once on one cache: a fold multirun (`cleanloop oof -m 'oof.folds=[0],[1]'`, its sweep
    callback included) and, in this process, a fold job `oof.folds=[1,2]`: fold 1, wanted by both, trains once.
    Then `oof.merge=true` assembles, training nothing, the file a one-process `oof` writes in another root."""
    from cleanloop.steps import oof

    n3 = [f"data.manifest={tiny_manifest}", *FAST, "oof.n_folds=3"]
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    sweep = start("oof", "-m", *n3, f"paths.root_dir={jobs}", "tracking.experiment=test", "oof.folds=[0],[1]",
                  cwd=jobs)
    try:
        here = oof.run(make_cfg(jobs, *n3, "oof.folds=[2,1]"))
    finally:
        log = sweep.communicate(timeout=600)[0]
    assert sweep.returncode == 0, log[-3000:]
    assert "oof.folds=[0]: fold(s) 0 ready" in log and "oof.folds=[1]: fold(s) 1 ready" in log
    assert "sweep summary (2 options" in log  # the sweep callback copes with an oof-only multirun
    assert here["folds"] == [1, 2] and here["path"] is None
    before = fold_markers(jobs)
    assert sorted(before) == [0, 1, 2]
    assert not list(jobs.rglob("oof_probs.parquet"))  # fold jobs write no OOF file

    merged = oof.run(make_cfg(jobs, *n3, "oof.merge=true"))
    assert merged["reused"] is False and fold_markers(jobs) == before  # assembled from the folds as they were
    merged = pd.read_parquet(merged["path"])
    reference = pd.read_parquet(oof.run(make_cfg(tmp_path / "one", *n3))["path"])
    assert merged[["image_uuid", "label", "fold"]].equals(reference[["image_uuid", "label", "fold"]])
    classes = [c for c in reference.columns if c not in ("image_uuid", "label", "fold")]
    np.testing.assert_allclose(merged[classes].to_numpy(), reference[classes].to_numpy(), rtol=0, atol=1e-6)
    # one oof-fold run per fold (none trained twice), each nested under the oof run of the job that trained it
    mlflow.set_tracking_uri(f"sqlite:///{jobs / 'mlruns' / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True)
    folds = runs[runs["tags.cleanloop.step"] == "oof-fold"]
    assert sorted(folds["tags.cleanloop.fold"]) == ["0", "1", "2"]
    parents = runs.set_index("run_id").loc[folds["tags.mlflow.parentRunId"]]
    assert set(parents["tags.cleanloop.oof_folds"]) <= {"[0]", "[1]", "[1,2]"}
    # cache-steps list names each fold entry's fold
    from cleanloop.cache_admin import format_list, scan

    root = jobs / ".cache" / "cleanloop" / "steps"
    assert sorted(e.state for e in scan(root) if e.step == "oof-fold") == ["done, fold 0", "done, fold 1", "done, fold 2"]
    listed = [line for line in format_list(root, scan(root)) if line.startswith("oof-fold")]
    assert len(listed) == 3 and all(", fold " in line for line in listed)


@pytest.mark.slow
def test_an_oof_job_of_a_submitit_launcher_sends_its_folds_out_as_one_array_job(tiny_manifest, tmp_path):
    """`cleanloop oof -m hydra/launcher=submitit_local` (oof.fan_out=auto): the job submits its two folds as one
    batch of the same launcher (real submitit tasks: pickled calls, a process each; on SLURM the batch is an
    array job), waits, and writes the file a one-process run writes; each fold run is nested under the job's
    oof run."""
    from cleanloop.steps import oof

    args = [f"data.manifest={tiny_manifest}", *FAST, "oof.n_folds=2", "audit.enabled=false"]
    sweep = tmp_path / "sweep"
    r = run_cli("oof", "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                f"hydra.sweep.dir={sweep}", *args, f"paths.root_dir={tmp_path}", "tracking.experiment=test",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (folds_dir,) = (sweep / ".submitit").glob("oof-folds-*")
    tasks = sorted(p.name for p in folds_dir.rglob("*_submitted.pkl"))
    assert len(tasks) == 2, tasks  # one batch of two tasks (submitit's local executor: a process each)
    job_log = "".join(p.read_text() for p in (sweep / ".submitit").glob("*/*_log.*"))
    assert "oof: 2 fold(s) sent to this multirun's launcher as one batch" in job_log
    written = pd.read_parquet(sweep / "0" / "oof" / "oof_probs.parquet")
    reference = pd.read_parquet(oof.run(make_cfg(tmp_path / "one", *args))["path"])
    pd.testing.assert_frame_equal(written, reference, check_exact=False, atol=1e-6, rtol=0)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True)
    folds = runs[runs["tags.cleanloop.step"] == "oof-fold"]
    (oof_run,) = runs.loc[runs["tags.cleanloop.step"] == "oof", "run_id"]
    assert sorted(folds["tags.cleanloop.fold"]) == ["0", "1"] and set(folds["tags.mlflow.parentRunId"]) == {oof_run}
    assert set(runs["status"]) == {"FINISHED"}


def test_merge_names_missing_folds_and_a_failed_oof_resumes_from_its_fold_entries(tiny_manifest, tmp_path, capsys,
                                                                                   monkeypatch):
    """A fold that fails leaves the finished folds as entries of their own; `oof.merge=true` names the missing
    fold and the command that computes it; a plain `oof` then trains only that fold."""
    from cleanloop.steps import oof

    # trainer.jobs=1: the folds train in this process, where the patched fit_predict counts them
    args = [f"data.manifest={tiny_manifest}", *FAST, "oof.n_folds=2", f"paths.root_dir={tmp_path}",
            "tracking.experiment=test", "trainer.jobs=1"]
    calls = fail_nth_fit(monkeypatch, oof, 2, RuntimeError("CUDA error: out of memory"))
    with pytest.raises(RuntimeError, match="out of memory"):
        oof.run(make_cfg(tmp_path, *args))
    first = fold_markers(tmp_path)
    assert sorted(first) == [0]

    capsys.readouterr()  # the failed run's output
    code, err = run_main(capsys, "oof", *args, "oof.merge=true")
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "cleanloop oof: error: oof.merge=true: fold(s) 1 of 0-1 not computed yet" in err
    assert "`cleanloop oof oof.folds=[1]`" in err
    assert not (tmp_path / "outputs" / "manifest" / "oof" / "oof_probs.parquet").exists()

    code, err = run_main(capsys, "oof", *args)
    assert code == 0, err[-3000:]
    assert len(calls) == 3  # one more training: fold 1's
    done = fold_markers(tmp_path)
    assert sorted(done) == [0, 1] and done[0]["run_id"] == first[0]["run_id"]  # fold 0 reused, not retrained
    assert (tmp_path / "outputs" / "manifest" / "oof" / "oof_probs.parquet").is_file()


@pytest.mark.parametrize("overrides, message", [
    (["oof.folds=[2]"], "oof.folds=[2]: 2 not a fold; folds are numbered 0 to 1 (oof.n_folds=2)"),
    (["oof.folds=[0,-1]"], "oof.folds=[0,-1]: -1 not a fold"),
    (["oof.folds=[]"], "oof.folds=[]: name at least one fold (0 to 1)"),
    (["oof.folds=[0]", "oof.merge=true"], "oof.folds=[0] with oof.merge=true: choose one"),
    (["oof.merge=true", "paths.reuse_steps=false"], "oof.merge=true with paths.reuse_steps=false"),
    (["oof=embed", "oof.n_folds=2", "oof.folds=[0]"], "oof.folds=[0]: fold jobs and merging split oof=kfold's"),
    (["oof.fan_out=true"], "oof.fan_out=true: this run is not a job of a submitit launcher"),
    (["oof.fan_out=maybe"], "oof.fan_out='maybe': choose auto, true or false"),
    (["trainer.jobs=many"], "trainer.jobs='many': give a whole number >= 1, or auto"),
])
def test_bad_fold_choices_are_one_line(tiny_manifest, tmp_path, capsys, overrides, message):
    code, err = run_main(capsys, "oof", f"data.manifest={tiny_manifest}", *FAST, "oof.n_folds=2",
                         f"paths.root_dir={tmp_path}", *overrides)
    assert code == 1 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not fold_markers(tmp_path)


def test_fan_out_only_in_a_submitit_launchers_job_that_is_not_a_fold_job(tmp_path):
    """oof.fan_out=auto: a job of `-m hydra/launcher=submitit_local|slurm` sends its folds out; a plain run, a
    basic-launcher multirun and a fold job (`oof.folds`, already one task of a fan-out) train their own."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    from cleanloop import fanout
    from cleanloop.config import conf_dir

    def as_job(*overrides: str, mode: RunMode = RunMode.MULTIRUN):
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.mode = mode
        HydraConfig.instance().set_config(cfg)
        return cfg

    before = HydraConfig.instance().cfg
    try:
        assert fanout.wanted(as_job("hydra/launcher=submitit_local")) is True
        assert fanout.wanted(as_job("hydra/launcher=slurm")) is True
        assert fanout.wanted(as_job("hydra/launcher=submitit_local", "oof.folds=[0]")) is False
        assert fanout.wanted(as_job("hydra/launcher=submitit_local", "oof.fan_out=false")) is False
        assert fanout.wanted(as_job("hydra/launcher=submitit_local", mode=RunMode.RUN)) is False
        assert fanout.wanted(as_job()) is False  # the basic launcher
        assert fanout.executor("x", tmp_path) is None  # the basic launcher: no executor
        # the launcher's resources, mapped as hydra-submitit-launcher maps them (a SLURM executor needs srun)
        as_job("hydra/launcher=submitit_local", "hydra.launcher.timeout_min=7", "hydra.launcher.cpus_per_task=3")
        ex = fanout.executor("cleanloop-oof-folds", tmp_path)
        assert ex.cluster == "local"
        assert ex._executor.parameters["timeout_min"] == 7 and ex._executor.parameters["cpus_per_task"] == 3
    finally:
        HydraConfig.instance().cfg = before

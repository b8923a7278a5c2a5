"""trainer.jobs: independent trainings side by side in forked worker processes (cleanloop.parallel)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from cleanloop import parallel
from cleanloop.errors import CleanloopError

from conftest import REPO, make_cfg

FAST = ["data=manifest", "data.num_workers=0", "model=tiny", "model.image_size=16", "model.config.image_size=16",
        "recipe.batch_size=4", "recipe.epochs=2", "oof.n_folds=3", "audit.enabled=false"]


def _wait_for(path: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.02)


def _gone(pid: int) -> bool:
    """The process has ended (reaped, or a zombie nobody reaps yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def test_jobs_and_threads_come_from_the_config(cfg_factory):
    cores = parallel.cpu_count()
    cpu = cfg_factory()  # trainer=cpu, jobs: auto
    assert parallel.jobs(cpu) == cores and parallel.threads(cpu) == (None if cores == 1 else 1)
    two = cfg_factory("trainer.jobs=2")
    assert parallel.jobs(two) == 2 and parallel.threads(two) == max(1, cores // 2)
    assert parallel.jobs(cfg_factory("trainer.jobs=1")) == 1 and parallel.threads(cfg_factory("trainer.jobs=1")) is None
    assert parallel.jobs(cfg_factory("trainer=gpu")) == 1  # side by side is for CPU
    assert parallel.jobs(cfg_factory("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2")) == 1
    with pytest.raises(CleanloopError, match=r"trainer.jobs=2: trainings run side by side only on CPU"):
        parallel.jobs(cfg_factory("trainer=gpu", "trainer.jobs=2"))
    for bad in ("0", "-1", "two", "1.5"):
        with pytest.raises(CleanloopError, match=r"trainer.jobs=.*whole number >= 1, or auto"):
            parallel.jobs(cfg_factory(f"trainer.jobs={bad}"))
    import torch

    before = torch.get_num_threads()
    try:
        parallel.apply_threads(two)
        assert torch.get_num_threads() == max(1, cores // 2)
    finally:
        torch.set_num_threads(before)


def test_units_run_side_by_side_and_hand_back_their_results_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(None)  # no store chosen: a worker must not make MLflow's default ./mlflow.db
    # each unit waits for the other's file: run one after another, the first would time out
    def unit(me: str, other: str):
        (tmp_path / me).touch()
        _wait_for(tmp_path / other, timeout_s=30)
        return {"pid": os.getpid(), "values": np.arange(3) * (1 if me == "a" else 2)}

    out = parallel.run([("a", lambda: unit("a", "b")), ("b", lambda: unit("b", "a"))], 2)
    assert list(out) == ["a", "b"]
    (a, a_s), (b, b_s) = out["a"], out["b"]
    assert len({a["pid"], b["pid"], os.getpid()}) == 3  # two children, not this process
    np.testing.assert_array_equal(b["values"], [0, 2, 4])
    assert a_s >= 0 and b_s >= 0
    # at most n_jobs at once: with one, the units run in turn (the third sees the second's file)
    turns = parallel.run([(str(i), lambda i=i: (tmp_path / f"t{i}").touch() or sorted(
        p.name for p in tmp_path.glob("t*"))) for i in range(3)], 1)
    assert [v for v, _ in turns.values()] == [["t0"], ["t0", "t1"], ["t0", "t1", "t2"]]
    assert not (tmp_path / "mlflow.db").exists()


def test_a_failing_unit_stops_the_others_and_its_error_is_raised_here(tmp_path):
    def slow():
        (tmp_path / "slow.pid").write_text(str(os.getpid()))
        time.sleep(300)

    def bad():
        _wait_for(tmp_path / "slow.pid")
        raise CleanloopError("manifest.csv row 3: no such image")

    t0 = time.monotonic()
    with pytest.raises(CleanloopError, match=r"^manifest.csv row 3: no such image$"):
        parallel.run([("slow", slow), ("bad", bad)], 2)
    assert time.monotonic() - t0 < 60 and _gone(int((tmp_path / "slow.pid").read_text()))

    with pytest.raises(RuntimeError, match=r"(?s)bug failed in its worker process.*ZeroDivisionError"):
        parallel.run([("bug", lambda: 1 / 0)], 2)
    with pytest.raises(CleanloopError, match=r"killed: its worker process ended without a result \(killed by signal 9\)"):
        parallel.run([("killed", lambda: os.kill(os.getpid(), signal.SIGKILL))], 2)


def test_workers_end_with_their_parent(tmp_path):
    # a step killed outright (SIGKILL: no finally runs) leaves no worker training on
    script = textwrap.dedent(f"""
        import os, time
        from pathlib import Path
        from cleanloop import parallel
        def unit():
            Path({str(tmp_path / 'worker.pid')!r}).write_text(str(os.getpid()))
            time.sleep(300)
        parallel.run([("sleeper", unit)], 1)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    try:
        _wait_for(tmp_path / "worker.pid")
        worker = int((tmp_path / "worker.pid").read_text())
        assert not _gone(worker)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 20
        while not _gone(worker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(worker)
    finally:
        proc.kill()


@pytest.mark.slow
def test_folds_side_by_side_nest_their_runs_and_equal_folds_trained_one_at_a_time(tiny_manifest, tmp_path, caplog):
    from cleanloop.steps import oof

    args = [f"data.manifest={tiny_manifest}", *FAST, "trainer.jobs=2"]
    with caplog.at_level("INFO", logger="cleanloop.steps.oof"):
        side = oof.run(make_cfg(tmp_path / "side", *args))
    assert "oof: training 3 folds 2 at a time (trainer.jobs=2" in caplog.text
    # the same folds trained by fold jobs, one fold per call in this process, then merged
    for k in range(3):
        oof.run(make_cfg(tmp_path / "turns", *args, f"oof.folds=[{k}]"))
    turns = oof.run(make_cfg(tmp_path / "turns", *args, "oof.merge=true"))
    a, b = pd.read_parquet(side["path"]), pd.read_parquet(turns["path"])
    pd.testing.assert_frame_equal(a, b)  # bit for bit: the thread count comes from the config
    # each worker's fold run is nested under the oof run, as when trained in the step's own process
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'side' / 'mlruns' / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True)
    folds = runs[runs["tags.cleanloop.step"] == "oof-fold"]
    assert sorted(folds["tags.cleanloop.fold"]) == ["0", "1", "2"]
    assert set(folds["tags.mlflow.parentRunId"]) == {side["run_id"]}
    assert set(runs["status"]) == {"FINISHED"}


@pytest.mark.slow
def test_a_fold_failing_in_a_worker_fails_the_step_and_leaves_only_finished_folds(tiny_manifest, tmp_path,
                                                                                  monkeypatch):
    """The fold holding out dark-0 raises in its worker (as a CUDA error would). The step fails with that
    error; the other worker is stopped; no OOF is published, no half-built entry or temporary folder is
    left, the oof run is FAILED and no run is left RUNNING; a plain rerun trains what is missing."""
    from cleanloop.steps import oof

    real = oof.fit_predict

    def fails_for_dark0(cfg, classes, train, *, predict_frames, **kw):
        if "dark-0" in set(predict_frames["heldout"]["image_uuid"]):
            raise RuntimeError("CUDA error: out of memory")
        return real(cfg, classes, train, predict_frames=predict_frames, **kw)

    monkeypatch.setattr(oof, "fit_predict", fails_for_dark0)  # the workers are forked: they have it too
    cfg = make_cfg(tmp_path, f"data.manifest={tiny_manifest}", *FAST, "trainer.jobs=2")
    with pytest.raises(RuntimeError, match=r"(?s)failed in its worker process.*CUDA error: out of memory"):
        oof.run(cfg)
    assert not list((tmp_path / "outputs").rglob("oof_probs.parquet"))
    steps = tmp_path / ".cache" / "cleanloop" / "steps"
    for step_dir in (steps / "oof", steps / "oof-fold"):
        if step_dir.is_dir():
            assert not [p for p in step_dir.iterdir() if p.name.startswith(".")]  # no temporary folders
    assert not [p for p in (steps / "oof").iterdir() if p.is_dir()]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True)
    assert runs.loc[runs["tags.cleanloop.step"] == "oof", "status"].tolist() == ["FAILED"]
    assert "RUNNING" not in set(runs["status"])

    monkeypatch.setattr(oof, "fit_predict", real)
    done = oof.run(cfg)
    assert pd.read_parquet(done["path"])["fold"].nunique() == 3

"""Issue 5: cached steps across a multirun, the joblib launcher, DDP-safe OOF, a shared MLflow server."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from cleanloop.model import Classifier, backbone_from_config
from cleanloop.oof_file import oof_frame, write_oof

from conftest import make_cfg, run_cli, write_png

TINY = ["data=manifest", "data.num_workers=0", "model.image_size=16", "model.config.image_size=16"]
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_step_against_an_mlflow_server(tiny_manifest, tmp_path):
    port = _free_port()
    exe = str(Path(sys.executable).with_name("mlflow"))
    server = subprocess.Popen(
        [exe, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--artifacts-destination", str(tmp_path / "art")],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None, "mlflow server did not start"
                time.sleep(0.5)
        oof = hand_made_oof(tiny_manifest, tmp_path / "oof.parquet")
        r = run_cli("flag", *TINY, f"data.manifest={tiny_manifest}", f"flag.oof={oof}", f"tracking.uri={base}",
                    f"paths.root_dir={tmp_path}", cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        assert not (tmp_path / "mlruns" / "mlflow.db").exists()  # nothing went to the local store
        req = urllib.request.Request(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=cleanloop")
        exp = json.loads(urllib.request.urlopen(req, timeout=10).read())["experiment"]
        body = json.dumps({"experiment_ids": [exp["experiment_id"]],
                           "filter": "tags.`cleanloop.step` = 'flag'"}).encode()
        req = urllib.request.Request(f"{base}/api/2.0/mlflow/runs/search", data=body,
                                     headers={"Content-Type": "application/json"})
        runs = json.loads(urllib.request.urlopen(req, timeout=10).read())["runs"]
        assert len(runs) == 1
        metrics = {m["key"]: m["value"] for m in runs[0]["data"]["metrics"]}
        summary = json.loads((tmp_path / "outputs" / "manifest" / "flag" / "flag_summary.json").read_text())
        assert metrics["flag/n_issues"] == summary["n_issues"]
        assert {f"flag/issue_rate/{c}" for c in CLASSES} <= set(metrics)
    finally:
        server.terminate()
        server.wait(timeout=30)


def _uneven_manifest(root: Path) -> Path:
    rows = []
    for c, v in (("dark", 20), ("mid", 110), ("bright", 200)):
        for i in range(8):
            u = f"{c}-{i}"
            write_png(root / "img" / f"{u}.png", v + 3 * i)
            rows.append({"image_uuid": u, "path": f"img/{u}.png", "label": c, "split": "test" if i == 7 else "train"})
    path = root / "m.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path  # 21 train rows: not a multiple of 2 ranks x batch 4


@pytest.mark.slow
def test_ddp_oof_scores_every_row_once_like_one_process(tmp_path):
    manifest = _uneven_manifest(tmp_path)
    base = [*TINY, f"data.manifest={manifest}", "recipe.batch_size=4", "oof=insample"]
    cfg = make_cfg(tmp_path, *base, "oof.checkpoint=unused")
    model = Classifier(backbone_from_config(cfg.model, cache_dir=cfg.paths.cache_dir, seed=3), CLASSES)
    model.save(tmp_path / "model")
    outs = {}
    for name, extra in (("single", []), ("ddp", ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                                                 "trainer.precision=32-true"])):
        r = run_cli("oof", *base, f"oof.checkpoint={tmp_path / 'model'}", f"paths.root_dir={tmp_path / name}", *extra,
                    cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        outs[name] = pd.read_parquet(tmp_path / name / "outputs" / "manifest" / "oof" / "oof_probs.parquet")
    single, ddp = outs["single"], outs["ddp"]
    assert len(ddp) == 21 and ddp["image_uuid"].is_unique and list(ddp["image_uuid"]) == list(single["image_uuid"])
    np.testing.assert_allclose(ddp[CLASSES].to_numpy(), single[CLASSES].to_numpy(), atol=1e-5)


def test_unreachable_tracking_server_fails_before_training(capsys, tiny_manifest, tmp_path):
    from cleanloop import cli

    port = _free_port()  # nothing listens there
    with pytest.raises(SystemExit) as e:
        cli.main(["train", *TINY, f"data.manifest={tiny_manifest}", f"tracking.uri=http://127.0.0.1:{port}",
                  f"paths.root_dir={tmp_path}"])
    out = capsys.readouterr()
    assert e.value.code == 1
    assert f"tracking.uri=http://127.0.0.1:{port}: no MLflow server answers" in out.err
    assert "epoch 1/" not in out.out and not list(tmp_path.rglob("metrics.json"))

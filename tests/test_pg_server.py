"""Issue 16 (item 4): a team MLflow server on PostgreSQL, for real.

A throwaway PostgreSQL cluster (Debian's ``postgresql``: initdb / pg_ctl on a free loopback port)
behind a real ``mlflow server`` (cleanloop.pgserver, what ``make server`` runs); a cycle through the
real CLI, then a 4-job joblib sweep, both logging to it over HTTP. Every run either made must be on
the server, FINISHED, nested where the contract says (CONTRACT §4), and in PostgreSQL's tables.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cleanloop.errors import CleanloopError
from cleanloop.pgserver import find_pg_bin, free_port, team_server

from conftest import run_cli

TINY = ["data=manifest", "data.num_workers=0", "model=tiny", "model.image_size=16", "model.config.image_size=16"]
# none is the cycle's own (flag.filter_by=prune_by_noise_rate): that job would reuse its cached flag run (CONTRACT §8)
FILTERS = ["both", "confident_learning", "predicted_neq_given", "prune_by_class"]


@pytest.fixture
def pg_server_dir():
    try:
        find_pg_bin()
    except CleanloopError as e:
        pytest.skip(str(e))
    # As root, PostgreSQL runs as the 'postgres' (or 'nobody') user, who cannot enter pytest's 0700
    # temporary folders: the server's folder is a world-enterable one of its own.
    d = Path(tempfile.mkdtemp(prefix="cleanloop-pg-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.slow
def test_a_cycle_and_a_parallel_sweep_on_a_postgresql_server_lose_no_run(pg_server_dir, tiny_manifest, tmp_path):
    with team_server(pg_server_dir, free_port(), workers=1, log=tmp_path / "mlflow-server.log", durable=False) as s:
        assert s.cluster.url().startswith("postgresql+psycopg2://mlflow@127.0.0.1:")
        common = [*TINY, f"data.manifest={tiny_manifest}", "recipe.epochs=1", "oof.n_folds=2", "compare.seeds=1",
                  "compare.n_bootstrap=50", "review.screenshot=false", f"paths.root_dir={tmp_path}",
                  f"tracking.uri={s.tracking_uri}"]
        r = run_cli("cycle", *common, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        oof = tmp_path / "outputs" / "manifest" / "oof" / "oof_probs.parquet"
        r = run_cli("flag", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=4", f"flag.filter_by={','.join(FILTERS)}",
                    *common, f"flag.oof={oof}", cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]

        assert not (tmp_path / "mlruns").exists()  # nothing went to a local store
        client = MlflowClient(s.tracking_uri)
        exp = client.get_experiment_by_name("cleanloop")
        runs = client.search_runs([exp.experiment_id], max_results=500)
        assert {r.info.status for r in runs} == {"FINISHED"}
        by_id = {r.info.run_id: r for r in runs}
        step = {i: r.data.tags.get("cleanloop.step") for i, r in by_id.items()}
        parent = {i: r.data.tags.get("mlflow.parentRunId") for i, r in by_id.items()}

        # (a) the cycle: one parent, one run per step under it, one run per fold under the oof run
        summary = json.loads((tmp_path / "outputs" / "manifest" / "summary.json").read_text())
        (cycle,) = [i for i, t in step.items() if t == "cycle"]
        children = Counter(step[i] for i, p in parent.items() if p == cycle)
        wanted = Counter({"audit": 1, "oof": 1, "flag": 1, "review": 1, "prune": 1, "train": 2, "compare": 1})
        assert children & wanted == wanted, children  # (and any step a later cycle adds)
        folds = [i for i, t in step.items() if t == "oof-fold"]
        assert sorted(by_id[i].data.tags["cleanloop.fold"] for i in folds) == ["0", "1"]
        assert all(parent[i] in by_id for i in folds)  # nested under a run of the cycle, none orphaned
        assert summary["mlflow"]["tracking_uri"] == s.tracking_uri

        # (b) the sweep: one parent over four flag jobs, one per option, each with its metrics
        (sweep,) = [i for i, t in step.items() if t and t.startswith("sweep")]
        jobs = [by_id[i] for i, p in parent.items() if p == sweep]
        assert sorted(j.data.params["flag.filter_by"] for j in jobs) == sorted(FILTERS)
        assert all({"flag/n_issues", "flag/issue_rate"} <= set(j.data.metrics) for j in jobs)
        # nothing else: no run of a job lost, none logged twice, no orphan
        assert len(runs) == 1 + children.total() + 2 + 1 + len(FILTERS)

        # the rows are PostgreSQL's, and the artifacts went through the server to its artifact root
        assert s.cluster.psql("SELECT status, count(*) FROM runs GROUP BY status") == f"FINISHED|{len(runs)}"
        assert int(s.cluster.psql("SELECT count(DISTINCT run_uuid) FROM metrics")) >= 8
        assert len(list(s.artifacts.rglob("label_issues.csv"))) == 1 + len(FILTERS)

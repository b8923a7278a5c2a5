"""A cached step's MLflow run, in whatever store the user points at (CONTRACT §4, §8).

When a step builds its cache entry, :func:`run_record` logs the key's parts to the run
(``lineage.json``) and remembers the run's name, ``cleanloop.*`` tags, metrics, extra params and
artifact names in the entry. When the entry is reused in a store (or experiment) that lacks that
run (``mlruns/mlflow.db`` deleted, ``tracking.uri`` pointed at a team server),
:func:`ensure_run` logs a short run there instead, tagged ``cleanloop.reused_from`` =
``<entry key>:<source run id>``, with the same tags, metrics, params and the run's artifacts
re-logged from the entry, and returns its id: ``compare`` (which downloads
``test_predictions.parquet`` from train runs), ``cycle`` and the UI then work in any store.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import DictConfig

from cleanloop.lineage import LINEAGE_FILE

log = logging.getLogger(__name__)

RUN_ARTIFACTS = ".run-artifacts"  # small artifacts of the run that are not outputs of the step (recipe.yaml ...)
SMALL_BYTES = 1 << 20  # such artifacts are kept in the entry up to this size
RELOG_MAX_BYTES = 64 << 20  # outputs re-logged to a new store up to this size...
ALWAYS_RELOG = {"test_predictions.parquet", "metrics.json"}  # ...except these, always (compare downloads them)
REUSED_FROM = "cleanloop.reused_from"
_NOT_COPIED = {"config.yaml", LINEAGE_FILE, "skipped_images.csv"}  # step_run and ensure_run log these afresh


def _store(cfg: DictConfig, exp_id: str) -> str:
    return f"{cfg.tracking.uri}#{exp_id}"


def run_record(cfg: DictConfig, run_id: str | None, out_dir: Path, lineage: dict) -> dict:
    """After a build: log ``lineage.json`` to the run; what the entry remembers of the run."""
    if not run_id:
        return {}
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no progress bar per small copy
    client = mlflow.MlflowClient()
    client.log_dict(run_id, lineage, LINEAGE_FILE)
    run = client.get_run(run_id)
    artifacts = [f for f in client.list_artifacts(run_id) if not f.is_dir]
    for f in artifacts:  # keep the small ones that are not in the entry, so a new store gets them too
        if f.path in _NOT_COPIED or (out_dir / f.path).exists() or (f.file_size or 0) > SMALL_BYTES:
            continue
        try:
            mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f.path,
                                                dst_path=str(out_dir / RUN_ARTIFACTS))
        except Exception as e:  # best effort: the run's own outputs are in the entry anyway
            log.debug("cannot keep artifact %s of run %s: %s", f.path, run_id, e)
    return {
        "run": {"name": run.info.run_name, "experiment_id": run.info.experiment_id,
                "tags": {k: v for k, v in run.data.tags.items() if k.startswith("cleanloop.") and k != REUSED_FROM},
                "metrics": dict(run.data.metrics), "params": dict(run.data.params),
                "artifacts": sorted(f.path for f in artifacts)},
        "runs": {_store(cfg, run.info.experiment_id): run_id},
    }


def _present(client, run_id: str, exp_id: str) -> bool:
    import mlflow

    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return False
    return run.info.lifecycle_stage == "active" and run.info.experiment_id == exp_id


def ensure_run(cfg: DictConfig, entry, info: dict) -> dict:
    """``info`` of a reused entry, its ``run_id`` one that exists in this store and experiment."""
    source = info.get("run_id")
    if not source:
        return info
    import mlflow

    from cleanloop.tracking import setup, step_run

    exp_id = setup(cfg.tracking)
    client = mlflow.MlflowClient()
    store = _store(cfg, exp_id)
    runs = dict(info.get("runs") or {})
    for candidate in (source, runs.get(store)):
        if candidate and _present(client, candidate, exp_id):
            return {**info, "run_id": candidate}

    meta = info.get("run") or {}
    tags = dict(meta.get("tags") or {})
    step = tags.pop("cleanloop.step", None) or entry.step
    tags[REUSED_FROM] = f"{entry.key}:{source}"
    with step_run(cfg, step, run_name=meta.get("name") or step, tags=tags) as run:
        if meta.get("metrics"):
            mlflow.log_metrics({k: float(v) for k, v in meta["metrics"].items()})
        logged = client.get_run(run.info.run_id).data.params
        extra = {k: v for k, v in (meta.get("params") or {}).items() if k not in logged}
        if extra:
            mlflow.log_params(extra)
        names = list(meta.get("artifacts") or [])
        for name in ALWAYS_RELOG:  # an entry made before runs were remembered: still give compare its files
            if name not in names and (entry.dir / name).is_file():
                names.append(name)
        for name in names:
            if name in _NOT_COPIED:
                continue
            for path in (entry.dir / name, entry.dir / RUN_ARTIFACTS / name):
                if path.is_file() and (name in ALWAYS_RELOG or path.stat().st_size <= RELOG_MAX_BYTES):
                    mlflow.log_artifact(str(path), artifact_path=str(Path(name).parent) if "/" in name else None)
                    break
        if (entry.dir / LINEAGE_FILE).is_file():
            mlflow.log_artifact(str(entry.dir / LINEAGE_FILE))
    new = run.info.run_id
    entry.update(runs={**runs, store: new})
    log.info("%s: run %s is not in %s (experiment %s); logged run %s there, tagged %s", entry.step, source,
             cfg.tracking.uri, exp_id, new, REUSED_FROM)
    return {**info, "run_id": new}

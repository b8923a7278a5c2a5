"""MLflow plumbing (CONTRACT §4): the store, the experiment, one run per step, safe metric keys.

Steps open their run with :func:`step_run`; inside ``cleanloop cycle`` it nests under the
cycle's parent run automatically.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import mlflow
from omegaconf import DictConfig, OmegaConf

from cleanloop import store_template
from cleanloop.errors import CleanloopError
from cleanloop.manifest import class_key

log = logging.getLogger(__name__)


def quiet_mlflow() -> None:
    """Keep MLflow's first-use lines ("Creating initial MLflow database tables...") out of the terminal.

    Set after ``import mlflow``: its logging setup resets the levels of the ``mlflow.*`` loggers."""
    for name in ("mlflow.store.db.utils", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


quiet_mlflow()

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
SWEEP_PARENT_ENV = "CLEANLOOP_SWEEP_RUN_ID"  # set by the multirun callback: jobs nest under the sweep's run


def metric_key(name: str) -> str:
    """A class name made safe for an MLflow key: characters and path parts MLflow refuses become ``_``
    (:func:`cleanloop.manifest.class_key`; the manifest check refuses two classes with one key)."""
    return class_key(name)


def key_mapping(classes) -> dict[str, str]:
    """{class name: MLflow key} for the classes whose key differs from the name."""
    return {c: metric_key(c) for c in classes if metric_key(c) != c}


def parent_run_tags() -> dict:
    """Top-level runs of a multirun job nest under the sweep's parent run (cleanloop.sweep)."""
    parent = os.environ.get(SWEEP_PARENT_ENV)
    return {"mlflow.parentRunId": parent} if parent else {}


def store_uri(uri: str) -> str:
    """The URI MLflow is given: a local SQLite store waits up to 60 s for a lock instead of failing
    with "database is locked" when parallel jobs write at once (a server is better for big sweeps)."""
    if uri.startswith("sqlite:///") and "timeout=" not in uri:
        return uri + ("&" if "?" in uri else "?") + "timeout=60"
    return uri


def check_server(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, before any training, when an http(s) tracking server does not answer.

    MLflow's own client would retry for minutes before giving up.
    """
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise CleanloopError(
            f"tracking.uri={uri}: no MLflow server answers ({reason}); start it (`mlflow server --host ... "
            "--port ...`) or drop tracking.uri to use the local store mlruns/mlflow.db"
        ) from e


def setup(tracking_cfg) -> str:
    """Point MLflow at the configured store and return the experiment id (created with the UI tag)."""
    uri = str(tracking_cfg.uri)
    if uri.startswith(("http://", "https://")):
        check_server(uri)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///").split("?")[0]).parent.mkdir(parents=True, exist_ok=True)
        store_template.copy_into_place(uri)  # a new store: copied, not migrated again (store_template)
    mlflow.set_tracking_uri(store_uri(uri))
    name = tracking_cfg.experiment
    try:
        exp = mlflow.get_experiment_by_name(name)
        if exp is None:
            local = uri.startswith("sqlite:") or uri.startswith("file:")
            artifact_location = (
                Path(tracking_cfg.artifact_root).joinpath(name).as_uri()
                if local and tracking_cfg.get("artifact_root")
                else None
            )
            exp_id = mlflow.create_experiment(
                name,
                artifact_location=artifact_location,
                tags={EXPERIMENT_KIND_TAG: "custom_model_development", VIEW_TAG: runs_view_tag()},
            )
        else:  # an experiment made earlier (or by an older cleanloop): bring its tags up to date
            exp_id = exp.experiment_id
            wanted = {EXPERIMENT_KIND_TAG: "custom_model_development", VIEW_TAG: runs_view_tag()}
            for tag, value in wanted.items():
                if exp.tags.get(tag) != value:
                    mlflow.MlflowClient().set_experiment_tag(exp_id, tag, value)
    except mlflow.exceptions.MlflowException as e:
        raise CleanloopError(f"tracking.uri={uri}: cannot reach the MLflow store ({e.message.splitlines()[0]})") from e
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def _flat_params(cfg: DictConfig) -> dict[str, str]:
    # The knobs a reader compares runs by; the full resolved config is logged as an artifact.
    container = OmegaConf.to_container(cfg, resolve=True)
    out: dict[str, str] = {}

    def walk(prefix: str, node) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = str(node)[:500]

    for group in ("data", "model", "recipe", "audit", "oof", "flag", "prune", "compare"):
        if group in container:
            walk(group, container[group])
    out["trainer.precision"] = str(container.get("trainer", {}).get("precision"))
    return {k: v for k, v in out.items() if not k.startswith(("data.demo", "model.config"))}


@contextmanager
def step_run(cfg: DictConfig, step: str, *, run_name: str | None = None, tags: dict | None = None,
             log_params: bool = True) -> Iterator[mlflow.ActiveRun]:
    """Open the MLflow run of one step (nested when a parent run is active); log tags and config."""
    setup(cfg.tracking)
    nested = mlflow.active_run() is not None
    name = run_name or cfg.tracking.get("run_name") or step
    all_tags = {"cleanloop.step": step, **(tags or {}), **({} if nested else parent_run_tags())}
    with mlflow.start_run(run_name=name, nested=nested, tags=all_tags) as run:
        if log_params:
            mlflow.log_params(_flat_params(cfg))
        mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        skipped = Path(cfg.paths.out_dir) / "skipped_images.csv"  # data.on_bad_image=skip: never silent
        if skipped.is_file():
            mlflow.log_artifact(str(skipped))
        yield run


def log_artifact_files(paths, artifact_path: str | None = None) -> None:
    for p in paths:
        if p is not None and Path(p).is_file():
            mlflow.log_artifact(str(p), artifact_path=artifact_path)


def log_key_mapping(classes) -> None:
    mapping = key_mapping(classes)
    if mapping:
        mlflow.log_dict(mapping, "class_keys.json")


def log_classification(metrics: dict, prefix: str = "test") -> None:
    """Log top1 / balanced accuracy / macro F1 and per-class recall and F1 under ``prefix/``."""
    values = {f"{prefix}/{k}": metrics[k] for k in ("top1", "balanced_accuracy", "f1_macro")}
    for c, m in metrics["per_class"].items():
        values[f"{prefix}/recall/{metric_key(c)}"] = m["recall"]
        values[f"{prefix}/f1/{metric_key(c)}"] = m["f1"]
    mlflow.log_metrics(values)


UI_QUERY = "workflowType=machine_learning"  # MLflow 3 opens the GenAI layout without it
DEFAULT_UI_URL = "http://127.0.0.1:5000"


def ui_url(tracking_cfg) -> str:
    """The MLflow UI the printed links point at (``tracking.ui_url``; match ``make ui UI_PORT=...``)."""
    url = tracking_cfg.get("ui_url") if tracking_cfg is not None else None
    return str(url or DEFAULT_UI_URL).rstrip("/")


# The runs table as cleanloop's links open it: MLflow's shared view (an experiment tag
# `mlflow.sharedViewState.<key>` holding the view as JSON, opened by `?viewStateShareKey=<key>`, what
# the UI's own "share view" writes), with the answer's columns first. MLflow's default shows no metric.
VIEW_KEY = "cleanloop"
VIEW_COLUMNS = {  # metric -> column width (px): together they fit a 1920 px screen beside MLflow's side panel
    "delta/balanced_accuracy": 170, "delta/balanced_accuracy/ci_low": 140, "delta/balanced_accuracy/ci_high": 140,
    "delta/top1": 90, "flag/n_issues": 95, "prune/n_pruned": 105,
}


def runs_view_state() -> dict:
    """The runs table view cleanloop shares: headline metric columns, then Dataset and Models."""
    widths = {f"metrics.`{m}`": w for m, w in VIEW_COLUMNS.items()} | {"attributes.`Dataset`": 190,
                                                                       "attributes.`Models`": 75}
    cols = list(widths)
    return {"selectedColumns": cols, "columnOrder": cols, "columnWidths": widths}


VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"


def runs_view_tag() -> str:
    """The shared view as the experiment tag's value (JSON)."""
    return json.dumps(runs_view_state(), sort_keys=True)


def runs_page_url(host: str, experiment_id: str) -> str:
    """The MLflow UI's runs table (not the GenAI traces page MLflow 3 opens by default), in cleanloop's
    shared view: the headline metrics as the first columns."""
    return f"{host.rstrip('/')}/#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_KEY}&{UI_QUERY}"


def compare_runs_url(host: str, experiment_id: str, run_ids: list[str]) -> str:
    """MLflow's side-by-side compare view of ``run_ids``."""
    ids = ",".join(f"%22{r}%22" for r in run_ids)
    return f"{host.rstrip('/')}/#/compare-runs?runs=[{ids}]&experiments=[%22{experiment_id}%22]&{UI_QUERY}"


def run_url(host: str, experiment_id: str, run_id: str) -> str:
    """One run's page in the MLflow UI."""
    return f"{host.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?{UI_QUERY}"


def artifact_url(host: str, experiment_id: str, run_id: str, path: str) -> str:
    """A run's artifact, opened in the MLflow UI's artifact viewer."""
    return f"{host.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}/artifacts/{path.lstrip('/')}?{UI_QUERY}"


NOTE_TAG = "mlflow.note.content"  # the run's description in the MLflow UI (markdown)


def picture_links(host: str, experiment_id: str, *, compare_run: str | None = None, flag_run: str | None = None,
                  review_run: str | None = None) -> dict[str, str]:
    """{label: artifact deep link} for the chart (compare run), the montage (flag run) and the review page
    (``review/index.html`` on ``review_run``: the flag run it was logged to, else the review run)."""
    links = {}
    if compare_run:
        links["recall chart"] = artifact_url(host, experiment_id, compare_run, "recall_deltas.png")
    if flag_run:
        links["montage of flagged rows"] = artifact_url(host, experiment_id, flag_run, "mislabel_candidates.png")
    if review_run:
        links["review page"] = artifact_url(host, experiment_id, review_run, "review/index.html")
    return links


# ---- datasets and models (CONTRACT §4) ------------------------------------------------------------


def log_dataset(rows, source, *, name: str, context: str, digest: str | None = None) -> None:
    """``mlflow.log_input`` of manifest rows (as MLflow's pandas dataset) with its source path and digest,
    so the UI's Dataset column tells one training set from another."""
    import mlflow.data

    df = rows.drop(columns=[c for c in ("abs_path",) if c in rows.columns]).reset_index(drop=True)
    try:
        with warnings.catch_warnings():  # "the dataset source can be interpreted in multiple ways": a local path
            warnings.filterwarnings("ignore", message=".*dataset source can be interpreted.*")
            ds = mlflow.data.from_pandas(df, source=str(Path(source).resolve()), name=name,
                                         digest=(digest or None) and str(digest)[:36])
        mlflow.log_input(ds, context=context)
    except Exception as e:  # a dataset record is a convenience: never fail a step over it
        log.warning("mlflow: cannot log dataset %s (%s: %s)", name, type(e).__name__, str(e).splitlines()[0][:200])


def manifest_dataset_name(role: str, path) -> str:
    return f"{role}:{Path(str(path)).name}"


MODEL_AUTO_MAX_PARAMS = 50_000_000


def should_log_model(setting, n_params: int) -> bool:
    """``tracking.log_model``: ``true``/``false`` force it; ``auto`` logs models under ~50M parameters."""
    if isinstance(setting, bool):
        return setting
    text = str(setting).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off", "none", "null"):
        return False
    if text != "auto":
        raise CleanloopError(f"tracking.log_model={setting!r}: choose auto, true or false")
    return n_params < MODEL_AUTO_MAX_PARAMS


def _main() -> None:  # `python -m cleanloop.tracking`: print the UI link for `make ui`
    import argparse

    p = argparse.ArgumentParser(description="print the MLflow UI link to cleanloop's runs table")
    p.add_argument("--uri", required=True)
    p.add_argument("--experiment", default="cleanloop")
    p.add_argument("--port", type=int, default=5000)
    a = p.parse_args()
    mlflow.set_tracking_uri(a.uri)
    exp = mlflow.get_experiment_by_name(a.experiment)
    host = f"http://127.0.0.1:{a.port}"
    if exp is None:
        print(f"MLflow UI: {host} (no '{a.experiment}' experiment yet: run `make cycle` first)")
    else:
        print(f"MLflow UI, cleanloop runs: {runs_page_url(host, exp.experiment_id)}")


if __name__ == "__main__":
    _main()

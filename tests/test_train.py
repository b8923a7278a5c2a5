"""`cleanloop train` end to end on the demo data, on the CPU, into a throwaway MLflow store."""

from __future__ import annotations

import json

import mlflow
import pytest

from cleanloop.steps import train


@pytest.mark.slow
def test_train_baseline_on_demo_logs_everything(cfg_factory, demo_dir, tmp_path):
    cfg = cfg_factory(f"data.manifest={demo_dir}/manifest.csv")
    metrics = train.run(cfg)
    out = tmp_path / "outputs" / "demo" / "train" / "baseline"
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["top1"] == metrics["top1"] >= 0.90  # clean test labels, 15% noisy train labels
    assert set(on_disk) >= {"top1", "balanced_accuracy", "f1_macro", "per_class"}
    assert set(on_disk["per_class"]["seven"]) == {"recall", "precision", "f1", "support"}
    assert sum(c["support"] for c in on_disk["per_class"].values()) == 450
    assert (out / "test_predictions.parquet").is_file() and (out / "model" / "cleanloop.json").is_file()

    mlflow.set_tracking_uri(cfg.tracking.uri)
    run = mlflow.get_run(metrics["run_id"])
    assert run.data.metrics["test/top1"] == pytest.approx(metrics["top1"])
    assert {f"test/recall/{c}" for c in on_disk["per_class"]} <= set(run.data.metrics)
    assert {f"test/f1/{c}" for c in on_disk["per_class"]} <= set(run.data.metrics)
    assert run.data.tags["cleanloop.step"] == "train" and run.data.tags["cleanloop.role"] == "baseline"
    assert len(run.data.tags["cleanloop.recipe"]) == 12 and len(run.data.tags["cleanloop.data"]) == 12
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"metrics.json", "config.yaml", "test_predictions.parquet"} <= artifacts
    exp = mlflow.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def test_cleaned_role_without_prune_says_what_to_run(cfg_factory, demo_dir):
    from cleanloop.errors import CleanloopError

    cfg = cfg_factory(f"data.manifest={demo_dir}/manifest.csv", "role=cleaned")
    with pytest.raises(CleanloopError, match="run `cleanloop prune`"):
        train.run(cfg)

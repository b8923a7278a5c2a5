"""Issue 14: MLflow as the place where the decision is made (answer on the cycle run, datasets, models,
links that open the right layout), the pictures' labels, and quiet logs."""

from __future__ import annotations

import logging
import re

import numpy as np
import pandas as pd
import pytest

from cleanloop import data as cl_data
from cleanloop import tracking
from cleanloop.bootstrap import recall_deltas_chart
from cleanloop.steps import cycle
from cleanloop.verdict import markdown

from conftest import make_cfg

FAST = ["data=manifest", "model=tiny", "model.image_size=16", "model.config.image_size=16", "recipe.epochs=1",
        "oof.n_folds=2", "compare.seeds=1", "review.screenshot=false", "data.num_workers=0",
        "compare.n_bootstrap=200"]
URL = re.compile(r"https?://\S+")

RECALL = [
    {"class": "cat", "recall_baseline": 0.8, "recall_cleaned": 0.9, "delta": 0.1, "ci_low": 0.02, "ci_high": 0.2,
     "issue_rate": 0.12, "n_test": 40},
    {"class": "dog|x", "recall_baseline": 0.9, "recall_cleaned": 0.85, "delta": -0.05, "ci_low": -0.1,
     "ci_high": -0.01, "issue_rate": 0.05, "n_test": 30},
    {"class": "eel", "recall_baseline": 0.7, "recall_cleaned": 0.68, "delta": -0.02, "ci_low": -0.08,
     "ci_high": 0.04, "issue_rate": None, "n_test": 10},
]


# -- pure parts -------------------------------------------------------------------------------------


def test_every_link_opens_the_machine_learning_layout_on_the_configured_host():
    host = tracking.ui_url(make_cfg_tracking("http://127.0.0.1:5001/"))
    assert host == "http://127.0.0.1:5001"
    assert tracking.ui_url(None) == "http://127.0.0.1:5000"
    urls = [tracking.runs_page_url(host, "3"), tracking.compare_runs_url(host, "3", ["a", "b"]),
            tracking.run_url(host, "3", "r1"), tracking.artifact_url(host, "3", "r1", "review/index.html"),
            *tracking.picture_links(host, "3", compare_run="c", flag_run="f", review_run="f").values()]
    for url in urls:
        assert url.startswith("http://127.0.0.1:5001/#/") and "workflowType=machine_learning" in url, url
    assert tracking.artifact_url(host, "3", "r1", "a/b.png").endswith("/runs/r1/artifacts/a/b.png?workflowType="
                                                                      "machine_learning")


def make_cfg_tracking(ui):
    from omegaconf import OmegaConf

    return OmegaConf.create({"ui_url": ui})


def test_log_model_setting():
    assert tracking.should_log_model("auto", 79_000) and not tracking.should_log_model("auto", 400_000_000)
    assert tracking.should_log_model(True, 10**9) and not tracking.should_log_model("false", 1)
    with pytest.raises(Exception, match="choose auto, true or false"):
        tracking.should_log_model("maybe", 1)


def test_description_has_the_verdict_the_table_and_the_links():
    note = markdown("HELPED: balanced accuracy +3.0 pts", RECALL,
                    links={"recall chart": "http://h/#/x/artifacts/recall_deltas.png?workflowType=machine_learning"})
    lines = note.splitlines()
    assert lines[0] == "**HELPED: balanced accuracy +3.0 pts**"
    assert "| class | recall baseline → cleaned | delta [95% CI] (pts) | issue rate | test n |" in lines
    assert "| cat | 80.0% → 90.0% | +10.0 [+2.0, +20.0] | 12.0% | 40 |" in lines
    assert "| dog\\|x | 90.0% → 85.0% | -5.0 [-10.0, -1.0] | 5.0% | 30 |" in lines  # a | in a name is escaped
    assert "| eel | 70.0% → 68.0% | -2.0 [-8.0, +4.0] | n/a | 10 |" in lines
    assert "- recall chart: [recall_deltas.png](http://h/#/x/artifacts/recall_deltas.png?workflowType=" \
           "machine_learning)" in lines


def test_description_fits_an_mlflow_tag_with_many_classes():
    rows = [{**RECALL[0], "class": f"class-{i:03d}"} for i in range(400)]
    note = markdown("HELPED", rows, links={"chart": "http://h/c.png"})
    assert len(note) <= 8000 and "more classes: see recall_deltas.csv" in note and note.rstrip().endswith("(http://h/c.png)")


def test_summary_names_the_worst_regression_and_what_the_interval_covers():
    assert cycle.worst_regression(RECALL) == ("worst regression: dog|x recall -5.0 pts [-10.0, -1.0], n=30 test "
                                              "rows (interval below 0)")
    assert cycle.worst_regression(RECALL[:1]).startswith("worst regression: none")
    stat = {"value_a": 0.8, "value_b": 0.83, "delta": 0.03, "ci_low": 0.01, "ci_high": 0.05}
    s = {"data": {"n_train": 100, "classes": ["cat", "dog|x", "eel"]}, "seconds": {"total": 3},
         "flag": {"n_issues": 5, "issue_rate": 0.05, "n_outliers": 1}, "prune": {"n_train_before": 100,
                                                                                 "n_train_after": 95},
         "paths": {"cleaned_manifest": "c.csv", "montage": "m.png", "review_page": "r.html", "chart": "c.png"},
         "verdict": {"text": "HELPED"}, "delta": {"balanced_accuracy": stat, "top1": stat}, "recall": RECALL,
         "seeds": [0, 1, 2], "n_test": 80, "confidence": 0.95,
         "mlflow": {"runs_page": tracking.runs_page_url("http://127.0.0.1:5001", "1"),
                    "compare_view": tracking.compare_runs_url("http://127.0.0.1:5001", "1", ["a", "b"]),
                    "cycle_page": tracking.run_url("http://127.0.0.1:5001", "1", "p"),
                    "links": tracking.picture_links("http://127.0.0.1:5001", "1", compare_run="c", flag_run="f")}}
    text = cycle.format_summary(s)
    assert "worst regression: dog|x recall -5.0 pts" in text
    assert "95% paired bootstrap over 80 test rows and 3 seed pairs" in text
    urls = URL.findall(text)
    assert len(urls) == 5 and all("workflowType=machine_learning" in u and ":5001/" in u for u in urls)


def test_headline_metrics_carry_the_answer_and_the_counts():
    stat = {"delta": 0.03, "ci_low": 0.01, "ci_high": 0.05}
    s = {"delta": {"balanced_accuracy": stat, "top1": {**stat, "delta": 0.02}},
         "flag": {"n_issues": 7, "ground_truth": {"precision": 0.9, "recall": 0.8}}}
    m = cycle.headline_metrics(s, {"n_pruned": 6})
    assert m == {"delta/balanced_accuracy": 0.03, "delta/balanced_accuracy/ci_low": 0.01,
                 "delta/balanced_accuracy/ci_high": 0.05, "delta/top1": 0.02, "delta/top1/ci_low": 0.01,
                 "delta/top1/ci_high": 0.05, "flag/n_issues": 7.0, "prune/n_pruned": 6.0, "flag/precision": 0.9,
                 "flag/recall": 0.8}
    del s["flag"]["ground_truth"]
    assert "flag/precision" not in cycle.headline_metrics(s, {"n_pruned": 6})


def test_chart_labels_show_recalls_and_test_counts(tmp_path, monkeypatch):
    labels = []
    from matplotlib.axes import Axes

    real = Axes.set_yticks
    monkeypatch.setattr(Axes, "set_yticks", lambda self, ticks, names=None, **kw: (labels.extend(names or []),
                                                                                    real(self, ticks, names, **kw)))
    recall_deltas_chart(pd.DataFrame(RECALL), tmp_path / "c.png", title="t")
    assert labels[0] == "cat  80% \u2192 90%, n=40  (flagged 12%)"
    assert labels[2] == "eel  70% \u2192 68%, n=10"
    recall_deltas_chart(pd.DataFrame(RECALL).drop(columns=["recall_baseline", "n_test"]), tmp_path / "d.png", title="t")
    assert labels[3] == "cat  (flagged 12%)"  # the older table still draws


def test_dataloader_workers_follow_the_cores(monkeypatch, caplog):
    monkeypatch.setattr(cl_data, "usable_cores", lambda: 2)
    monkeypatch.setattr(cl_data, "_CLAMP_LOGGED", set())
    with caplog.at_level(logging.INFO, logger="cleanloop.data"):
        assert cl_data.clamp_workers(8) == 2 and cl_data.clamp_workers(8) == 2 and cl_data.clamp_workers(1) == 1
    assert sum("data.num_workers=8" in r.message for r in caplog.records) == 1
    dm = cl_data.ManifestDataModule(None, ["a"], image_size=16, batch_size=2, num_workers=8)
    assert dm.num_workers == 2


def test_mlflow_first_use_lines_are_quiet(tmp_path):
    """A new SQLite store, as `cleanloop` creates it: no "Creating initial MLflow database tables" line."""
    import subprocess
    import sys

    code = ("import logging; from omegaconf import OmegaConf; from cleanloop.cli import quiet_libraries; "
            "quiet_libraries(); logging.basicConfig(level=logging.INFO); from cleanloop import tracking; "
            f"tracking.setup(OmegaConf.create({{'uri': 'sqlite:///{tmp_path}/mlflow.db', 'experiment': 'x'}}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "mlflow.db").is_file()
    assert "Creating initial MLflow database tables" not in r.stdout + r.stderr, r.stderr


def test_logged_classifier_reloads_and_predicts_from_uint8_images(tmp_path):
    """The pyfunc wrapper, without training: a random tiny SigLIP classifier saved, logged, reloaded."""
    import mlflow
    import mlflow.pyfunc
    import torch
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from cleanloop.mlflow_model import log_classifier
    from cleanloop.model import Classifier

    torch.manual_seed(0)
    backbone = SiglipVisionModel(SiglipVisionConfig(image_size=16, patch_size=8, hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=1, num_attention_heads=2))
    classes = ["dark", "mid", "bright"]
    folder = Classifier(backbone, classes).eval().save(tmp_path / "model")
    tracking.setup(make_cfg(tmp_path).tracking)
    with mlflow.start_run():
        uri = log_classifier(folder, classes=classes, image_size=16)
        tracking.log_dataset(pd.DataFrame({"image_uuid": ["a", "b"], "label": ["dark", "mid"], "abs_path": ["x", "y"]}),
                             tmp_path / "manifest.csv", name="baseline:manifest.csv", context="train",
                             digest="0123456789abcdef")
        run_id = mlflow.active_run().info.run_id
    assert uri is not None
    model = mlflow.pyfunc.load_model(uri)
    spec = model.metadata.get_input_schema().inputs[0]
    assert spec.type == np.dtype("uint8") and spec.shape == (-1, 16, 16, 3)
    images = np.stack([np.full((16, 16, 3), v, dtype=np.uint8) for v in (20, 200)])
    probs = model.predict(images)
    assert list(probs.columns) == classes and probs.shape == (2, 3)
    assert np.allclose(probs.to_numpy().sum(1), 1, atol=1e-5)
    (ds,) = mlflow.MlflowClient().get_run(run_id).inputs.dataset_inputs
    assert (ds.dataset.name, ds.dataset.digest) == ("baseline:manifest.csv", "0123456789abcdef")
    assert str(tmp_path / "manifest.csv") in ds.dataset.source and "abs_path" not in ds.dataset.schema


# -- a tiny cycle, read back through MlflowClient ----------------------------------------------------


def test_tiny_cycle_logs_the_answer_datasets_and_model(tiny_manifest, tmp_path, capsys):
    import mlflow
    import mlflow.pyfunc

    cfg = make_cfg(tmp_path, f"data.manifest={tiny_manifest}", *FAST, "tracking.ui_url=http://127.0.0.1:5001")
    summary = cycle.run(cfg)
    out = capsys.readouterr().out
    urls = URL.findall(out)
    assert len(urls) >= 4 and all("workflowType=machine_learning" in u and u.startswith("http://127.0.0.1:5001/")
                                  for u in urls), urls
    assert {"recall chart", "montage of flagged rows", "review page"} <= set(summary["mlflow"]["links"])

    client = mlflow.MlflowClient(summary["mlflow"]["tracking_uri"])
    runs = summary["mlflow"]["runs"]
    parent = client.get_run(summary["mlflow"]["cycle_run"])
    assert {"delta/balanced_accuracy", "delta/balanced_accuracy/ci_low", "delta/balanced_accuracy/ci_high",
            "delta/top1", "delta/top1/ci_low", "delta/top1/ci_high", "flag/n_issues",
            "prune/n_pruned"} <= set(parent.data.metrics)
    note = parent.data.tags["mlflow.note.content"]
    assert note.startswith(f"**{summary['verdict']['text']}") and "| test n |" in note
    assert re.search(r"\| dark \| [\d.]+% → [\d.]+% \| .* \| 2 \|", note), note  # 2 test rows per class
    assert "recall_deltas.png" in note and "mislabel_candidates.png" in note and "review/index.html" in note
    assert client.get_run(runs["compare"]).data.tags["mlflow.note.content"] == note

    def inputs(run_id):
        return {(i.dataset.name, next(t.value for t in i.tags if t.key == "mlflow.data.context"))
                for i in client.get_run(run_id).inputs.dataset_inputs}

    name = tiny_manifest.name
    assert inputs(runs["train-baseline"]) == {(f"baseline:{name}", "train"), (f"test:{name}", "test")}
    cleaned = inputs(runs["train-cleaned"])
    assert cleaned == {("cleaned:cleaned_manifest.csv", "train"), (f"test:{name}", "test")}
    assert inputs(runs["oof"]) == {(f"input:{name}", "train")} == inputs(runs["flag"])

    models = mlflow.search_logged_models(experiment_ids=[summary["mlflow"]["experiment_id"]], output_format="list")
    by_run = {m.source_run_id: m for m in models}
    assert {runs["train-baseline"], runs["train-cleaned"]} <= set(by_run)
    model = mlflow.pyfunc.load_model(by_run[runs["train-cleaned"]].model_uri)
    images = np.stack([np.full((16, 16, 3), v, dtype=np.uint8) for v in (20, 200)])
    probs = model.predict(images)
    assert list(probs.columns) == summary["data"]["classes"] and probs.shape == (2, 3)
    assert np.allclose(probs.to_numpy().sum(1), 1, atol=1e-4)

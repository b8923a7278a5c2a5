"""``cleanloop train role=baseline|cleaned``: fit the recipe, evaluate on test, log to MLflow.

``baseline`` trains on the input manifest, ``cleaned`` on ``prune/cleaned_manifest.<ext>``;
the recipe, seed and test split are identical, and the run tags say so
(``cleanloop.recipe``, ``cleanloop.data``, ``cleanloop.test``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from cleanloop.config import file_hash, short_hash
from cleanloop.errors import CleanloopError
from cleanloop.io import write_atomic, write_json
from cleanloop.metrics import classification_metrics
from cleanloop.steps.common import cached, load_input, out_path
from cleanloop.steps.locate import cleaned_manifest_path, train_parts  # noqa: F401
from cleanloop.tracking import (
    log_artifact_files,
    log_classification,
    log_dataset,
    log_key_mapping,
    manifest_dataset_name,
    should_log_model,
    step_run,
)
from cleanloop.training import fit_predict, recipe_hash

log = logging.getLogger(__name__)

ROLES = ("baseline", "cleaned")


def split_hash(df: pd.DataFrame) -> str:
    rows = sorted(zip(df["image_uuid"], df["label"], strict=True))
    return short_hash(rows)


def probs_frame(uuids: list[str], labels: list[str], probs: np.ndarray, classes: list[str]) -> pd.DataFrame:
    df = pd.DataFrame({"image_uuid": uuids, "label": labels,
                       "predicted_label": np.asarray(classes)[probs.argmax(1)]})
    return pd.concat([df, pd.DataFrame(probs, columns=classes)], axis=1)


TRAIN_FILES = ["metrics.json", "test_predictions.parquet", "model"]


def run(cfg: DictConfig, *, publish_to: Path | None = None) -> dict:
    """Train one role (cached by key: recipe with seed, the manifest trained on, trainer); returns metrics.

    The outputs are published to ``train/<role>/`` in ``paths.out_dir``, or to ``publish_to``
    (``cycle`` puts its extra seed pairs under ``train/<role>/seed-<s>/``).
    """
    role = cfg.role
    if role not in ROLES:
        raise CleanloopError(f"role={role!r}: must be one of {', '.join(ROLES)}")
    source = load_input(cfg)
    if role == "baseline":
        path = source.source
    elif cfg.get("cleaned_manifest"):
        path = Path(str(cfg.cleaned_manifest))
        if not path.is_file():
            raise CleanloopError(f"cleaned_manifest={path}: not found; run `cleanloop prune` or point at its output")
    else:
        path = cleaned_manifest_path(cfg, source)
    m = source if role == "baseline" else load_input(cfg, path)
    test = m.split("test")
    if test.empty:
        raise CleanloopError(f"{path}: no rows with split == 'test'; train evaluates on the test split")
    key = short_hash(train_parts(cfg, role, path, source))  # locate: the test flags find the baseline by it
    info = cached(cfg, f"train-{role}", key, lambda d: _train(cfg, role, source, m, path, d),
                  publish_to=publish_to or out_path(cfg, "train", role), names=TRAIN_FILES)
    return info


def _train(cfg: DictConfig, role: str, source, m, path: Path, out_dir: Path) -> dict:
    classes = source.classes  # the cleaned run keeps the input's class order even if a class shrank
    test, val = m.split("test"), m.split("val")
    tags = {
        "cleanloop.role": role,
        "cleanloop.recipe": recipe_hash(cfg),
        "cleanloop.data": file_hash(path),
        "cleanloop.test": split_hash(test),
        "cleanloop.seed": str(cfg.recipe.seed),
        "cleanloop.source_data": file_hash(source.source),  # the input both roles derive from
    }
    with step_run(cfg, "train", run_name=f"train-{role}", tags=tags) as run:
        log.info("train %s: %d train rows, %d val, %d test, %d classes (%s)",
                 role, len(m.train), len(val), len(test), len(classes), path)
        # the Dataset column of the runs table: which rows this role trained on, and the shared test split
        log_dataset(m.train, path, name=manifest_dataset_name(role, path), context="train", digest=file_hash(path))
        log_dataset(test, source.source, name=f"test:{Path(str(source.source)).name}", context="test",
                    digest=split_hash(test))  # the one test split both roles share
        # The step budget is the baseline's: both roles train as long, whatever the cleaned set's size.
        module, preds = fit_predict(cfg, classes, m.train, predict_frames={"test": test}, val=val,
                                    log_prefix=f"[{role}] ", budget_rows=len(source.train))
        fit = module.fit_info
        mlflow.log_params({f"fit/{k}": v for k, v in fit.items()})
        mlflow.set_tags({"cleanloop.budget": fit["budget"], "cleanloop.checkpoint": fit["checkpoint"]})
        uuids, probs, _ = preds["test"]
        labels = test["label"].tolist()
        index = {c: i for i, c in enumerate(classes)}
        metrics = classification_metrics(np.array([index[c] for c in labels]), probs.argmax(1), classes=classes)
        metrics = {"role": role, "run_id": run.info.run_id, "seed": int(cfg.recipe.seed), "classes": classes,
                   "fit": fit, **metrics}
        write_json(out_dir / "metrics.json", metrics)
        write_atomic(out_dir / "test_predictions.parquet",
                     lambda p: probs_frame(uuids, labels, probs, classes).to_parquet(p, index=False))
        module.save(out_dir / "model")
        n_params = sum(p.numel() for p in module.parameters())
        if should_log_model(cfg.tracking.get("log_model", "auto"), n_params):
            from cleanloop.mlflow_model import log_classifier

            log_classifier(out_dir / "model", classes=classes, image_size=int(cfg.model.image_size),
                           register_as=cfg.tracking.get("register_as"))
        else:
            log.info("train %s: model not logged to MLflow (%.1fM parameters; tracking.log_model=%s); it is in %s",
                     role, n_params / 1e6, cfg.tracking.get("log_model", "auto"), out_path(cfg, "train", role, "model"))
        log_classification(metrics, "test")
        log_key_mapping(classes)
        log_artifact_files([out_dir / "metrics.json", out_dir / "test_predictions.parquet"])
        mlflow.log_text(OmegaConf.to_yaml(cfg.recipe, resolve=True), "recipe.yaml")
    log.info("train %s: test top1=%.4f balanced_accuracy=%.4f f1_macro=%.4f -> %s (run %s)",
             role, metrics["top1"], metrics["balanced_accuracy"], metrics["f1_macro"], out_path(cfg, "train", role),
             run.info.run_id)
    return metrics

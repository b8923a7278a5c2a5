"""``cleanloop flag``: cleanlab label issues, label quality, outliers, per-class rates, a montage.

Reads the OOF parquet (``flag.oof`` or ``oof/oof_probs.parquet``) and the manifest; writes the
``flag/`` files of CONTRACT §3 and logs ``flag/*`` metrics. When the dataset has a
``ground_truth.csv`` beside its manifest (the demo), it also scores its own flags.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from cleanloop.config import file_hash
from cleanloop.io import write_csv, write_json
from cleanloop.oof_file import load_embeddings, load_oof
from cleanloop.steps.common import cached, entry_key, load_input, out_path
from cleanloop.steps.locate import flag_parts, issues_output, oof_input  # noqa: F401

# cleanlab (cleanloop.cleaning, cleanloop.flagcore) and MLflow (cleanloop.tracking) load in _flag,
# once the OOF file has passed its checks: a wrong OOF file is refused in ~2 s, not ~7 s.

log = logging.getLogger(__name__)


def _baseline_test_metrics(data_hash: str) -> pd.Series | None:
    """Per-class test recall / F1 of the latest baseline run on this manifest (the team's table)."""
    import mlflow

    runs = mlflow.search_runs(
        filter_string=f"tags.`cleanloop.role` = 'baseline' and tags.`cleanloop.data` = '{data_hash}' "
                      "and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=1,
    )
    return None if runs.empty else runs.iloc[0]


def _ground_truth(manifest_path: Path, train: pd.DataFrame) -> pd.DataFrame | None:
    path = manifest_path.with_name("ground_truth.csv")
    if not path.is_file():
        return None
    truth = pd.read_csv(path, dtype={"image_uuid": str}, keep_default_na=False)
    truth = truth.set_index("image_uuid").reindex(train["image_uuid"])
    as_bool = lambda s: s.astype(str).str.lower().isin(["true", "1"]).to_numpy()  # noqa: E731
    return pd.DataFrame({"is_noisy": as_bool(truth["is_noisy"]), "is_garbage": as_bool(truth["is_garbage"])})


FLAG_FILES = ["label_issues.csv", "issues_per_class.csv", "issue_confusions.csv", "mislabel_candidates.png",
              "flag_summary.json"]


def flag_key(cfg: DictConfig, m, oof_path: Path) -> str:
    """The flag cache entry's key (:func:`flag_parts` plus the common parts)."""
    return entry_key(cfg, "flag", flag_parts(cfg, m, oof_path), m)[0]


def run(cfg: DictConfig) -> dict:
    """Flag label issues and outliers (cached by key); returns the flag summary with ``dir`` and ``run_id``."""
    m = load_input(cfg)
    oof_path = oof_input(cfg, m)
    key, lineage = entry_key(cfg, "flag", flag_parts(cfg, m, oof_path), m)
    info = cached(cfg, "flag", key, lambda out_dir: _flag(cfg, m, oof_path, out_dir, key),
                  publish_to=out_path(cfg, "flag"), names=FLAG_FILES, lineage=lineage)
    return {**info, "out_dir": str(out_path(cfg, "flag"))}


def _flag(cfg: DictConfig, m, oof_path: Path, out_dir: Path, key: str) -> dict:
    t0 = time.time()
    train, classes = m.train.reset_index(drop=True), m.classes
    labels = m.label_indices(train)
    oof = load_oof(oof_path, train=train, classes=classes, head=cfg.recipe.head)
    import mlflow

    from cleanloop.cleaning import (
        find_issues,
        flag_scores,
        mark_outliers,
        normalise_rows,
        outlier_scores,
        render_montage,
    )
    from cleanloop.flagcore import flag_tables
    from cleanloop.tracking import (
        log_artifact_files,
        log_dataset,
        log_key_mapping,
        manifest_dataset_name,
        metric_key,
        step_run,
    )

    data_hash = file_hash(m.source)
    sigmoid = oof.meta.get("head") == "sigmoid"
    pred_probs = normalise_rows(oof.pred_probs) if sigmoid else oof.pred_probs  # softmax rows: load_oof did
    normalised = sigmoid or oof.n_normalised > 0
    tags = {"cleanloop.data": data_hash, "cleanloop.oof_key": str(oof.meta.get("key", "external")),
            "cleanloop.in_sample": str(oof.meta.get("method") == "insample").lower(),
            "cleanloop.normalised_rows": str(normalised).lower(), "cleanloop.flag_key": key,
            "cleanloop.folds": str(oof.meta.get("folds", "unknown"))}
    fc = cfg.flag
    # matched to the train rows by image_uuid; refused before the run opens when they are other rows
    emb = load_embeddings(oof_path, train_uuids=train["image_uuid"], file_rows=oof.file_rows) \
        if fc.outlier.enabled else None
    tags["cleanloop.outliers"] = "off" if not fc.outlier.enabled else "embeddings" if emb is not None else "pred_probs"
    with step_run(cfg, "flag", tags=tags) as run:
        log_dataset(train, m.source, name=manifest_dataset_name("input", m.source), context="train", digest=data_hash)
        if sigmoid:
            log.info("flag: sigmoid head: each pred_probs row normalised to sum to one before cleanlab")
        found = find_issues(labels, pred_probs, filter_by=fc.filter_by, frac_noise=fc.frac_noise,
                            min_examples_per_class=fc.min_examples_per_class, n_jobs=fc.n_jobs, rank_by=fc.rank_by,
                            batched=fc.get("batched"))
        if not fc.outlier.enabled:
            scores = np.zeros(len(train))
        elif emb is not None:
            scores = outlier_scores(pred_probs, features=emb)
        else:
            scores = outlier_scores(pred_probs, labels=labels)
        is_outlier = mark_outliers(scores, top_fraction=fc.outlier.top_fraction) if fc.outlier.enabled \
            else np.zeros(len(train), dtype=bool)
        tables = flag_tables(found, classes=classes, image_uuids=train["image_uuid"], paths=train["abs_path"],
                             given_labels=train["label"], outlier_score=scores, is_outlier=is_outlier)
        table, per_class, confusions = tables.issues, tables.per_class, tables.confusions
        is_issue = table["is_label_issue"].to_numpy()
        baseline = _baseline_test_metrics(data_hash)
        if baseline is not None:
            per_class["test_recall"] = [baseline.get(f"metrics.test/recall/{metric_key(c)}") for c in per_class["class"]]
            per_class["test_f1"] = [baseline.get(f"metrics.test/f1/{metric_key(c)}") for c in per_class["class"]]
            mlflow.set_tag("cleanloop.baseline_run", baseline["run_id"])

        write_csv(out_dir / "label_issues.csv", table)
        write_csv(out_dir / "issues_per_class.csv", per_class)
        write_csv(out_dir / "issue_confusions.csv", confusions)
        flagged_all = table[table["is_label_issue"] | table["is_outlier"]]
        candidates = flagged_all.head(fc.montage.top_n)
        captions = [f"{g} -> {p}\nq={q:.3f}" + (" outlier" if o else "")
                    for g, p, q, o in zip(candidates["given_label"], candidates["predicted_label"],
                                          candidates["label_quality"], candidates["is_outlier"], strict=True)]
        # The picture explains itself: what a caption says, which rows these are, what the frame marks.
        n_marked = int(candidates["is_outlier"].sum())
        render_montage(
            candidates["path"].tolist(), captions, out_dir / "mislabel_candidates.png", columns=fc.montage.columns,
            marked=candidates["is_outlier"].astype(bool).tolist(),
            mark_label=(f"orange frame and 'outlier' in the caption: an outlier, one of the "
                        f"{100 * float(fc.outlier.top_fraction):g}% most unusual train rows by cleanlab's outlier "
                        f"score ({n_marked} shown)") if fc.outlier.enabled else "",
            legend=["Caption: given label -> label the model predicts (out of fold); q = cleanlab label quality, "
                    "0 to 1, lower = more likely mislabelled.",
                    f"The {len(candidates)} lowest q of {len(flagged_all)} flagged train rows, lowest first, "
                    f"left to right (all of them: flag/label_issues.csv)."],
        )

        n_issues = int(is_issue.sum())
        summary = {"n_rows": len(table), "n_issues": n_issues, "issue_rate": n_issues / len(table),
                   "n_outliers": int(is_outlier.sum()), "normalised_rows": normalised,
                   "n_rows_normalised": len(table) if sigmoid else oof.n_normalised,
                   "in_sample": oof.meta.get("method") == "insample", "run_id": run.info.run_id}
        metrics = {"flag/n_issues": n_issues, "flag/issue_rate": summary["issue_rate"],
                   "flag/n_outliers": summary["n_outliers"]}
        metrics.update({f"flag/issue_rate/{metric_key(c)}": r
                        for c, r in zip(per_class["class"], per_class["issue_rate"], strict=True)})
        truth = _ground_truth(m.source, train)
        if truth is not None:
            row_of = {u: i for i, u in enumerate(train["image_uuid"])}
            order = table["image_uuid"].map(row_of).to_numpy()
            flagged = (table["is_label_issue"] | table["is_outlier"]).to_numpy()
            bad = (truth["is_noisy"] | truth["is_garbage"]).to_numpy()[order]
            garbage = truth["is_garbage"].to_numpy()[order]
            scores_gt = flag_scores(flagged, bad)
            lowest20 = np.arange(len(table)) < 20
            top_outlier = table["is_outlier"].to_numpy()
            summary["ground_truth"] = {
                **scores_gt,
                "label_issues": flag_scores(is_issue, truth["is_noisy"].to_numpy()[order]),
                "n_garbage": int(garbage.sum()),
                "garbage_found": int((garbage & (lowest20 | top_outlier)).sum()),
            }
            metrics.update({"flag/precision": scores_gt["precision"], "flag/recall": scores_gt["recall"],
                            "flag/garbage_found": summary["ground_truth"]["garbage_found"]})
        mlflow.log_metrics(metrics)
        log_key_mapping(classes)
        write_json(out_dir / "flag_summary.json", summary)
        log_artifact_files([out_dir / n for n in ("label_issues.csv", "issues_per_class.csv", "issue_confusions.csv",
                                                  "mislabel_candidates.png", "flag_summary.json")])
    gt = summary.get("ground_truth")
    log.info("flag: %d of %d train rows flagged as label issues (%.1f%%), %d outliers%s in %.1fs -> %s",
             n_issues, len(table), 100 * summary["issue_rate"], summary["n_outliers"],
             f"; vs ground truth precision {gt['precision']:.3f} recall {gt['recall']:.3f}, "
             f"garbage found {gt['garbage_found']}/{gt['n_garbage']}" if gt else "",
             time.time() - t0, out_path(cfg, "flag"))
    return summary

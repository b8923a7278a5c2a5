"""``cleanloop flag``: cleanlab label issues, label quality, outliers, per-class rates, a montage.

Reads the OOF parquet (``flag.oof`` or ``oof/oof_probs.parquet``) and the manifest; writes the
``flag/`` files of CONTRACT §3 and logs ``flag/*`` metrics. When the dataset has a
``ground_truth.csv`` beside its manifest (the demo), it also scores its own flags. When the audit
of the manifest has run, train rows whose copies carry another label are marked
(``is_conflicting_copy``, ``copy_labels``): an issue kind of their own.

``flag.split=test`` (:func:`run_test`, run by ``cycle`` after the baseline trainings) scores the test
rows instead: the baseline model(s)' saved test probabilities, averaged over seeds (test rows are
out of sample for a model trained on train), through the same cleanlab calls, into
``flag/test_label_issues.csv``. No model is run.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from cleanloop.config import file_hash
from cleanloop.errors import CleanloopError
from cleanloop.io import write_atomic, write_csv, write_json
from cleanloop.oof_file import load_embeddings, load_oof
from cleanloop.steps.common import cached, entry_key, load_input, out_path
from cleanloop.steps.locate import (  # noqa: F401
    audit_conflicts,
    baseline_test_predictions,
    flag_parts,
    flag_test_parts,
    issues_output,
    oof_input,
)

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


FLAG_SPLITS = ("train", "test")


def run(cfg: DictConfig) -> dict:
    """Flag label issues and outliers (cached by key); returns the flag summary with ``dir`` and ``run_id``.

    ``flag.split=test`` flags the test rows instead (:func:`run_test`).
    """
    split = str(cfg.flag.get("split") or "train")
    if split not in FLAG_SPLITS:
        raise CleanloopError(f"flag.split={split!r}: choose train (the OOF train rows) or test (the test rows, "
                             "scored by the baseline model(s))")
    if split == "test":
        return run_test(cfg)
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
    from cleanloop.flagcore import flag_tables, mark_conflicting_copies
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
    conflicts_path = audit_conflicts(cfg, m)  # the same lookup as the key's (flag_parts)
    conflicts = pd.read_csv(conflicts_path, dtype=str, keep_default_na=False) if conflicts_path else None
    tags["cleanloop.conflicting_copies"] = "audit" if conflicts is not None else "no audit"
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
        if conflicts is not None:  # extra columns after the contract's, only when the audit has run
            table = mark_conflicting_copies(table, conflicts)
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
        if conflicts is not None:
            summary["n_conflicting_copies"] = int(table["is_conflicting_copy"].sum())
            metrics["flag/n_conflicting_copies"] = summary["n_conflicting_copies"]
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


# ---- flag.split=test: the test rows, scored by the baseline model(s) -------------------------------

TEST_FLAG_FILES = ["test_label_issues.csv", "test_pred_probs.parquet", "test_flag_summary.json"]
_PREDICTION_COLUMNS = ("image_uuid", "label", "predicted_label")  # train's test_predictions.parquet, then classes


def run_test(cfg: DictConfig, predictions: list[Path] | None = None) -> dict:
    """Flag the test rows with the baseline model(s)' saved test probabilities (cached by key).

    ``predictions``: the baselines' ``test_predictions.parquet`` files (``cycle`` passes the ones it
    trained); by default :func:`cleanloop.steps.locate.baseline_test_predictions`. Returns the test
    flag summary with ``dir``, ``run_id`` and ``path`` (the published test_label_issues.csv).
    """
    m = load_input(cfg)
    preds = [Path(p) for p in predictions] if predictions is not None else baseline_test_predictions(cfg, m)
    if not preds:
        raise CleanloopError(f"{out_path(cfg, 'train', 'baseline')}: no baseline test predictions of this config; "
                             "run `cleanloop train role=baseline` first (cycle does), or give "
                             "flag.test_predictions=PATH (a test_predictions.parquet, or a list of them)")
    key, lineage = entry_key(cfg, "flag-test", flag_test_parts(cfg, m, preds), m)
    info = cached(cfg, "flag-test", key, lambda out_dir: _flag_test(cfg, m, preds, out_dir, key),
                  publish_to=out_path(cfg, "flag"), names=TEST_FLAG_FILES, lineage=lineage)
    return {**info, "out_dir": str(out_path(cfg, "flag")), "path": str(out_path(cfg, "flag", "test_label_issues.csv"))}


def averaged_test_probs(paths: list[Path], test: pd.DataFrame, classes: list[str]) -> np.ndarray:
    """The mean of the baseline models' test probabilities, one row per ``test`` row in its order.

    Each file is a train run's ``test_predictions.parquet`` (``image_uuid, label, predicted_label``,
    then one column per class). Refused, in one line, when a file is missing or unreadable, has
    other classes, or other test rows or labels than the manifest's test split.
    """
    from cleanloop.cleaning import check_pred_probs

    fix = "retrain the baseline on this manifest (`cleanloop train role=baseline`) or fix flag.test_predictions"
    want = pd.Series(test["label"].to_numpy(), index=test["image_uuid"].to_numpy())
    total = np.zeros((len(test), len(classes)))
    for path in paths:
        try:
            df = pd.read_parquet(path)
        except Exception as e:
            raise CleanloopError(f"{path}: cannot read baseline test predictions ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''}); {fix}") from e
        cols = [c for c in df.columns if c not in _PREDICTION_COLUMNS]
        if "image_uuid" not in df.columns or "label" not in df.columns or cols != list(classes):
            raise CleanloopError(f"{path}: columns {list(df.columns)[:8]} are not image_uuid, label, predicted_label "
                                 f"and the classes {classes[:8]} in order; {fix}")
        df = df.assign(image_uuid=df["image_uuid"].astype(str)).set_index("image_uuid")
        missing = want.index.difference(df.index)
        extra = df.index.difference(want.index)
        if len(missing) or len(extra) or df.index.has_duplicates:
            first = (list(missing) or list(extra) or list(df.index[df.index.duplicated()]))[:3]
            raise CleanloopError(f"{path}: its rows are not the test rows of this manifest ({len(df)} rows for "
                                 f"{len(want)} test rows; first differing image_uuid(s): {first}); {fix}")
        df = df.reindex(want.index)
        other = df["label"].astype(str).to_numpy() != want.to_numpy()
        if other.any():
            raise CleanloopError(f"{path}: {int(other.sum())} test row(s) carry another label than in the manifest "
                                 f"(first: {want.index[other][0]!r}); {fix}")
        total += check_pred_probs(df[classes].to_numpy(), n_rows=len(want), n_classes=len(classes),
                                  source=str(path), uuids=want.index, fix=fix)
    return total / len(paths)


def _flag_test(cfg: DictConfig, m, preds: list[Path], out_dir: Path, key: str) -> dict:
    t0 = time.time()
    test, classes = m.split("test").reset_index(drop=True), m.classes
    if test.empty:
        raise CleanloopError(f"{m.source}: no rows with split == 'test'; there is nothing to flag with flag.split=test")
    unknown = sorted(set(test["label"]) - set(classes))
    if unknown:
        raise CleanloopError(f"{m.source}: test label(s) {unknown[:5]} have no train rows; "
                             "the baseline cannot score them")
    import mlflow

    from cleanloop.cleaning import find_issues, mark_outliers, normalise_rows, outlier_scores
    from cleanloop.flagcore import flag_tables
    from cleanloop.tracking import log_artifact_files, metric_key, step_run

    # averaged softmax rows sum to one already; a sigmoid head's scores are made a distribution, as flag does
    probs = normalise_rows(averaged_test_probs(preds, test, classes))
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[c] for c in test["label"]], dtype=np.int64)
    fc = cfg.flag
    tags = {"cleanloop.data": file_hash(m.source), "cleanloop.flag_key": key, "cleanloop.flag_split": "test",
            "cleanloop.test_models": str(len(preds))}
    with step_run(cfg, "flag-test", tags=tags) as run:
        found = find_issues(labels, probs, filter_by=fc.filter_by, frac_noise=fc.frac_noise,
                            min_examples_per_class=fc.min_examples_per_class, n_jobs=fc.n_jobs, rank_by=fc.rank_by,
                            batched=fc.get("batched"))
        # no embeddings of the test rows exist (oof embeds train rows): the pred_probs score, as flag's fallback
        scores = outlier_scores(probs, labels=labels) if fc.outlier.enabled else np.zeros(len(test))
        is_outlier = mark_outliers(scores, top_fraction=fc.outlier.top_fraction) if fc.outlier.enabled \
            else np.zeros(len(test), dtype=bool)
        tables = flag_tables(found, classes=classes, image_uuids=test["image_uuid"], paths=test["abs_path"],
                             given_labels=test["label"], outlier_score=scores, is_outlier=is_outlier)
        table = tables.issues
        write_csv(out_dir / "test_label_issues.csv", table)
        frame = pd.concat([pd.DataFrame({"image_uuid": test["image_uuid"].to_numpy(), "label": test["label"].to_numpy()}),
                           pd.DataFrame(probs.astype(np.float32), columns=classes)], axis=1)
        write_atomic(out_dir / "test_pred_probs.parquet", lambda p: frame.to_parquet(p, index=False))
        n_issues = int(table["is_label_issue"].sum())
        per_class = tables.per_class
        summary = {"n_rows": len(table), "n_issues": n_issues, "issue_rate": n_issues / len(table),
                   "n_outliers": int(is_outlier.sum()), "n_models": len(preds),
                   "predictions": [str(p) for p in preds], "run_id": run.info.run_id,
                   "issues_per_class": dict(zip(per_class["class"], per_class["n_issues"].astype(int).tolist(),
                                                strict=True))}
        mlflow.log_metrics({"flag/test_n_issues": n_issues, "flag/test_issue_rate": summary["issue_rate"],
                            "flag/test_n_outliers": summary["n_outliers"],
                            **{f"flag/test_n_issues/{metric_key(c)}": n
                               for c, n in summary["issues_per_class"].items()}})
        write_json(out_dir / "test_flag_summary.json", summary)
        log_artifact_files([out_dir / n for n in TEST_FLAG_FILES])
    log.info("flag: %d of %d test rows flagged as label issues (%.1f%%) by %d baseline model(s), %d outliers, "
             "in %.1fs -> %s", n_issues, len(table), 100 * summary["issue_rate"], len(preds), summary["n_outliers"],
             time.time() - t0, out_path(cfg, "flag", "test_label_issues.csv"))
    return summary

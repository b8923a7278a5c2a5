"""``cleanloop prune``: the cleaned manifest, less the flagged train rows (reviewers' word first).

Writes ``prune/cleaned_manifest.<ext>`` in the input's format with all its columns, and
``prune/pruned_rows.csv`` saying why each row went. Val and test rows are never touched.
"""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
import pandas as pd
from omegaconf import DictConfig

from cleanloop.config import file_hash
from cleanloop.errors import CleanloopError
from cleanloop.io import write_csv, write_table
from cleanloop.manifest import read_manifest
from cleanloop.pruning import apply_pruning, read_decisions, select_pruned
from cleanloop.steps.common import cached, entry_key, load_input, out_path, read_csv_strings
from cleanloop.steps.locate import cleaned_output, issues_input, prune_parts  # noqa: F401
from cleanloop.tracking import log_artifact_files, metric_key, step_run

log = logging.getLogger(__name__)


def prune_key(cfg: DictConfig, m, issues_path: Path) -> str:
    """The prune cache entry's key (:func:`prune_parts` plus the common parts)."""
    return entry_key(cfg, "prune", prune_parts(cfg, m, issues_path), m)[0]


def run(cfg: DictConfig) -> dict:
    """Write the cleaned manifest (cached by key); returns its path, counts and the run id."""
    m = load_input(cfg)
    issues_path = issues_input(cfg, m)
    key, lineage = entry_key(cfg, "prune", prune_parts(cfg, m, issues_path), m)
    ext = ".parquet" if m.fmt == "parquet" else ".csv"
    out = out_path(cfg, "prune")
    for stale in out.glob("cleaned_manifest.*"):
        if stale.name != f"cleaned_manifest{ext}":  # train role=cleaned must find exactly one
            stale.unlink()
    info = cached(cfg, "prune", key, lambda d: _prune(cfg, m, issues_path, d, ext),
                  publish_to=out, names=[f"cleaned_manifest{ext}", "pruned_rows.csv"], lineage=lineage)
    return {**info, "path": str(out / f"cleaned_manifest{ext}")}


def _prune(cfg: DictConfig, m, issues_path: Path, out_dir: Path, ext: str) -> dict:
    train = m.train
    pc = cfg.prune
    issues = read_csv_strings(issues_path, "label issues", "run `cleanloop flag` first or set prune.issues=PATH")
    unknown = sorted(set(issues["image_uuid"]) - set(train["image_uuid"]))
    if unknown:
        raise CleanloopError(f"{issues_path}: {len(unknown)} image_uuid(s) are not train rows of {m.source} "
                             f"(first: {unknown[:3]}); it was flagged on another manifest: re-run `cleanloop flag`")
    issues["label_quality"] = pd.to_numeric(issues["label_quality"], errors="coerce")
    decisions = None
    if pc.get("decisions"):
        path = Path(pc.decisions)
        raw = read_csv_strings(path, "decisions file", "export it from the review page or write image_uuid,decision")
        # the review page's export also holds its test tab's decisions: those are compare.test_decisions'
        held_out = raw["image_uuid"].str.strip().isin(set(m.df.loc[m.df["split"] != "train", "image_uuid"])) \
            if "image_uuid" in raw.columns else pd.Series(False, index=raw.index)
        if held_out.any():
            log.info("prune: %d decision(s) in %s concern test/val rows: left to compare.test_decisions",
                     int(held_out.sum()), path)
            raw = raw[~held_out.to_numpy()]
        decisions = read_decisions(raw, classes=m.classes, known_uuids=set(issues["image_uuid"]), source=str(path))
    pruned = select_pruned(
        issues, drop_label_issues=pc.drop_label_issues, drop_outliers=pc.drop_outliers,
        max_fraction_per_class=pc.max_fraction_per_class,
        n_train_per_class=train["label"].value_counts().to_dict(), decisions=decisions, source=str(issues_path),
    )
    cleaned = apply_pruning(read_manifest(m.source), pruned)

    manifest_out = out_dir / f"cleaned_manifest{ext}"
    tags = {"cleanloop.data": file_hash(m.source), "cleanloop.reviewed": str(decisions is not None).lower()}
    with step_run(cfg, "prune", tags=tags) as run:
        write_table(manifest_out, cleaned)
        write_csv(out_dir / "pruned_rows.csv", pruned)
        dropped = pruned[pruned["new_label"].isna()]
        counts = dropped["given_label"].value_counts()
        mlflow.log_metrics({
            "prune/n_pruned": len(dropped), "prune/n_relabelled": int(pruned["new_label"].notna().sum()),
            "prune/fraction": len(dropped) / len(train),
            **{f"prune/n_pruned/{metric_key(c)}": int(counts.get(c, 0)) for c in m.classes},
        })
        log_artifact_files([out_dir / "pruned_rows.csv", manifest_out])
    reasons = pruned["reason"].value_counts().to_dict()
    log.info("prune: removed %d of %d train rows (%s), relabelled %d -> %s", len(dropped), len(train),
             ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())) or "none",
             int(pruned["new_label"].notna().sum()), out_path(cfg, "prune"))
    return {"run_id": run.info.run_id, "n_pruned": int(len(dropped)),
            "n_relabelled": int(pruned["new_label"].notna().sum()), "n_train": int(len(train))}

"""``cleanloop audit``: exact and near duplicate images within and across splits, before any training.

A cleaned-vs-baseline comparison is only as honest as its test split: a copy of a train image in
test flatters both models, and copies under two patient ids straddle "grouped" folds, where the
OOF probability of a memorised twin hides its label error. This step finds the copies (content
hash; perceptual hash confirmed at pixel level; optionally embedding neighbours) with the pure
functions of :mod:`cleanloop.audit` and writes the ``audit/`` files of CONTRACT §3:

- ``duplicates.csv``: one row per linked pair (``image_uuid_a, image_uuid_b, kind, similarity,
  split_a, split_b, label_a, label_b, group_a, group_b, method``);
- ``leakage_per_class.csv``: per class, train<->test and train<->val copies, conflicting-label copies;
- ``conflicting_labels.csv``: train rows in a duplicate cluster whose labels disagree;
- ``fold_groups.csv``: the group each train row's folds keep together once copies are merged
  (``oof`` reads it when ``audit.merge_groups`` is on);
- ``duplicate_pairs.png``: the top cross-split pairs side by side; ``audit_summary.json``.

Its metrics go to an MLflow ``audit`` run (``audit/leaks/train_test`` and the others of
:func:`cleanloop.audit.summary_metrics`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from cleanloop.config import file_hash
from cleanloop.io import write_csv, write_json
from cleanloop.steps.common import cached, entry_key, find_entry, load_input, out_path
from cleanloop.steps.locate import audit_parts

log = logging.getLogger(__name__)

AUDIT_FILES = ["duplicates.csv", "leakage_per_class.csv", "conflicting_labels.csv", "fold_groups.csv",
               "duplicate_pairs.png", "audit_summary.json"]
MONTAGE_PAIRS = 20  # cross-split pairs drawn in duplicate_pairs.png (two cells each)


# Searches started by prefetch(), by what they search (_search_id): a search is only ever taken
# for the same rows and settings it was started with.
_prefetched: dict[str, Future] = {}


def _search_args(cfg: DictConfig) -> dict:
    ac = cfg.audit
    return {"phash_max_distance": int(ac.phash_max_distance), "min_pixel_ncc": float(ac.min_pixel_ncc),
            "workers": int(ac.workers)}


def _search_id(rows: pd.DataFrame, args: dict) -> str:
    digest = hashlib.blake2b(pd.util.hash_pandas_object(rows, index=True).to_numpy().tobytes(), digest_size=16)
    digest.update(json.dumps(args, sort_keys=True).encode())
    return digest.hexdigest()


def prefetch(cfg: DictConfig) -> bool:
    """Start this config's duplicate search in a background thread; True if one was started.

    ``cycle`` calls it before it loads torch, Lightning and transformers (about 12 s of imports on
    this project's 2-core machine, bench/RESULTS.md B5): the search (numpy, PIL and hashlib, which
    release the GIL for most of their work) runs beside the imports, and :func:`run` takes its
    result for the same rows and settings. Nothing is started when the audit is off or its cache
    entry is finished (it will be reused). The search's own lazy imports are done here first, on
    one image, so the thread imports nothing while the main thread imports the rest.
    """
    from cleanloop import audit

    if not cfg.audit.get("enabled", True):
        return False
    m = load_input(cfg)
    if bool(cfg.paths.get("reuse_steps", True)) and find_entry(cfg, "audit", audit_parts(cfg, m), m) is not None:
        return False
    rows, args = _rows(m), _search_args(cfg)
    first = rows.head(1)
    audit.find_duplicates(pd.concat([first, first.assign(image_uuid=first["image_uuid"] + "~")]), **args)
    future: Future = Future()

    def search() -> None:
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(audit.find_duplicates(rows, **args))
            except BaseException as e:  # noqa: BLE001 - raised again where the result is taken
                future.set_exception(e)

    _prefetched[_search_id(rows, args)] = future
    threading.Thread(target=search, name="cleanloop-audit-prefetch", daemon=True).start()
    return True


def run(cfg: DictConfig) -> dict:
    """Audit the input manifest for copies (cached by key); returns the audit summary with ``run_id``."""
    m = load_input(cfg)
    key, lineage = entry_key(cfg, "audit", audit_parts(cfg, m), m)
    info = cached(cfg, "audit", key, lambda out_dir: _audit(cfg, m, out_dir, key),
                  publish_to=out_path(cfg, "audit"), names=AUDIT_FILES, lineage=lineage)
    return {**info, "out_dir": str(out_path(cfg, "audit"))}


def _rows(m) -> pd.DataFrame:
    """The manifest as :func:`cleanloop.audit.find_duplicates` reads it: absolute paths, blank groups as ''."""
    rows = pd.DataFrame({"image_uuid": m.df["image_uuid"].to_numpy(), "path": m.df["abs_path"].to_numpy(),
                         "label": m.df["label"].to_numpy(), "split": m.df["split"].to_numpy()})
    if "group" in m.df.columns:
        rows["group"] = m.df["group"].fillna("").astype(str).str.strip().to_numpy()
    return rows


def _audit(cfg: DictConfig, m, out_dir: Path, key: str) -> dict:
    import mlflow

    from cleanloop import audit
    from cleanloop.cleaning import render_montage
    from cleanloop.tracking import log_artifact_files, log_dataset, manifest_dataset_name, step_run

    t0 = time.time()
    ac = cfg.audit
    rows = _rows(m)
    data_hash = file_hash(m.source)
    with step_run(cfg, "audit", tags={"cleanloop.data": data_hash, "cleanloop.audit_key": key}) as run:
        log_dataset(m.df, m.source, name=manifest_dataset_name("input", m.source), context="audit", digest=data_hash)
        args = _search_args(cfg)
        started = _prefetched.pop(_search_id(rows, args), None)
        pairs = started.result() if started is not None else audit.find_duplicates(rows, **args)
        leakage = audit.leakage_per_class(pairs, rows, classes=m.classes)
        conflicts = audit.conflicting_label_rows(pairs, rows)
        train = rows[rows["split"] == "train"].reset_index(drop=True)
        groups = audit.merge_groups(train, pairs)
        metrics = audit.summary_metrics(pairs, rows)

        write_csv(out_dir / "duplicates.csv", pairs)
        write_csv(out_dir / "leakage_per_class.csv", leakage)
        write_csv(out_dir / "conflicting_labels.csv", conflicts)
        write_csv(out_dir / "fold_groups.csv", pd.DataFrame({"image_uuid": train["image_uuid"],
                                                             "group": np.asarray(groups)}))
        _montage(pairs, rows, out_dir / "duplicate_pairs.png", render_montage)
        summary = {"n_rows": len(rows), "n_pairs": len(pairs), "metrics": metrics, "run_id": run.info.run_id,
                   "phash_max_distance": int(ac.phash_max_distance), "min_pixel_ncc": float(ac.min_pixel_ncc),
                   "seconds": round(time.time() - t0, 1)}
        write_json(out_dir / "audit_summary.json", summary)
        mlflow.log_metrics(metrics)
        log_artifact_files([out_dir / n for n in AUDIT_FILES])
    leaks = int(metrics.get("audit/leaks/train_test", 0)) + int(metrics.get("audit/leaks/train_val", 0))
    log.info("audit: %d duplicate pair(s) among %d rows (%d exact), %d train<->test/val leak(s), %d conflicting-label "
             "cluster(s) in %.1fs -> %s", len(pairs), len(rows), int(metrics.get("audit/pairs_exact", 0)), leaks,
             int(metrics.get("audit/conflicting_label_clusters", 0)), time.time() - t0, out_path(cfg, "audit"))
    if leaks:
        log.warning("audit: %d train image(s) have a copy in test or val; see audit/duplicates.csv "
                    "(audit.test_leaks=exclude makes compare report the test split without them too)", leaks)
    return {"run_id": run.info.run_id, "n_pairs": len(pairs), **{k.removeprefix("audit/"): v for k, v in metrics.items()}}


def _montage(pairs: pd.DataFrame, rows: pd.DataFrame, path: Path, render_montage) -> None:
    """The most similar cross-split pairs, each as two neighbouring cells (train copy first)."""
    cross = pairs[pairs["split_a"] != pairs["split_b"]].head(MONTAGE_PAIRS)
    where = dict(zip(rows["image_uuid"], rows["path"], strict=True))
    paths, captions = [], []
    for p in cross.itertuples(index=False):
        a_first = p.split_a == "train" or p.split_b != "train"
        for side in ("a", "b") if a_first else ("b", "a"):
            uuid, split, label = (getattr(p, f"{f}_{side}") for f in ("image_uuid", "split", "label"))
            paths.append(where[uuid])
            captions.append(f"{split}: {label}\n{p.kind} {p.similarity:.3f}")
    legend = [f"The {len(cross)} most similar pairs of {int((pairs['split_a'] != pairs['split_b']).sum())} "
              "cross-split pairs (all of them: audit/duplicates.csv), each pair side by side, train first.",
              "Caption: split: given label; exact = same bytes, near = confirmed look-alike, with its similarity."]
    render_montage(paths, captions, path, columns=10, legend=legend, empty="no cross-split copies")

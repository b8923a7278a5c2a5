"""``cleanloop oof``: out-of-sample probabilities for every train row.

``oof=kfold`` (default): grouped, stratified folds; each fold trains the recipe on the other
folds and predicts the held-out one. Each fold is a cache entry of its own (step ``oof-fold``,
keyed by the OOF's parts and the fold number), claimed and finished apart from the others:

- a killed or failed run leaves its finished folds, and the next run reuses them (a resume);
- ``oof.folds=[i,...]`` computes only those folds (one job of many: a SLURM array, a joblib
  sweep), logs which folds are done and which are missing, and writes no ``oof_probs.parquet``;
- a plain ``oof`` reuses every finished fold, trains the missing ones and assembles the file,
  the same as one process would (each fold's training is seeded by ``recipe.seed`` alone);
  ``oof.merge=true`` only assembles, and names the missing folds otherwise;
- ``paths.reuse_steps=false`` retrains every fold it touches.
``oof=embed``: frozen-backbone embeddings once, a logistic-regression head per fold: the same
folds and file for a fraction of the cost, when the backbone is pretrained.
``oof=insample``: score the train rows with an existing model, as the team's first pass did
(memorised errors look confident: the run is tagged in-sample).
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, ListConfig, open_dict

from cleanloop import fanout, parallel
from cleanloop import lineage as lineage_mod
from cleanloop.config import file_hash
from cleanloop.errors import CleanloopError
from cleanloop.folds import FoldGroups, assign_folds, fold_groups
from cleanloop.io import write_json
from cleanloop.metrics import classification_metrics
from cleanloop.model import Classifier, backbone_from_config
from cleanloop.oof_file import EMBEDDING_FILES, oof_frame, write_embeddings, write_oof
from cleanloop.steps.common import cached, entry_key, load_input, out_path, step_cache
from cleanloop.steps.locate import (  # noqa: F401
    audit_fold_groups,
    checkpoint_identity,
    merged_groups,
    missing_group,
    oof_entry_key,
    oof_key,
    oof_key_for,
    oof_parts,
)
from cleanloop.tracking import log_dataset, manifest_dataset_name, step_run
from cleanloop.training import fit_predict, predict, recipe_hash

log = logging.getLogger(__name__)


FOLD_STEP = "oof-fold"  # the fold entries' step folder: <paths.cache_dir>/steps/oof-fold/<key>/
FOLD_FILE = "fold.parquet"  # in a fold entry: image_uuid and one probability column per class, held-out rows


def _save_fold(path: Path, uuids: list[str], probs: np.ndarray, *, key: str, fold: int) -> None:
    df = pd.DataFrame(probs, columns=[f"p{i}" for i in range(probs.shape[1])])
    df.insert(0, "image_uuid", uuids)
    write_oof(path, df, classes=[], key=key, fold=fold)


def _load_fold(path: Path) -> tuple[list[str], np.ndarray]:
    df = pd.read_parquet(path)
    return df["image_uuid"].tolist(), df.drop(columns="image_uuid").to_numpy()


@dataclass(frozen=True)
class FoldJob:
    """One fold of one k-fold repeat: what trains it and the cache entry that keeps it."""

    repeat: int
    fold: int
    cfg: DictConfig  # the repeat's config (oof.seed + r, recipe.seed + r)
    key: str         # the fold entry's key
    lineage: dict    # its lineage record (lineage.json)

    @property
    def tag(self) -> str:  # "" in the first repeat, "r1-" in the second...
        return f"r{self.repeat}-" if self.repeat else ""

    @property
    def name(self) -> str:  # run names and fold_runs: "3", or "r1-3" in a later repeat
        return f"{self.tag}{self.fold}"


def _fold_jobs(cfg: DictConfig, record: dict, manifest_hash: str, classes: list[str], *, own_groups: bool,
               merged: Path | None) -> list[FoldJob]:
    """Every fold of every repeat, keyed by the OOF entry's env and images parts and a step part of its own.

    A fold's step part is the OOF's (data, classes, recipe with seed, n_folds, oof.seed, groups) as
    its repeat sets them, less ``repeats``, plus the fold number: what its training and its held-out
    rows depend on, and nothing else. So repeat 0 of ``oof.repeats=3`` reuses the folds of
    ``oof.repeats=1``, and the folds a job computed are the ones any other process would.
    """
    repeats = max(1, int(cfg.oof.get("repeats", 1)))
    jobs = []
    for r in range(repeats):
        rcfg = cfg
        if r:
            rcfg = cfg.copy()
            with open_dict(rcfg):
                rcfg.oof.seed = int(cfg.oof.seed) + r
                rcfg.recipe.seed = int(cfg.recipe.seed) + r
        parts = oof_parts(rcfg, manifest_hash, classes, own_groups=own_groups, merged_groups=merged)
        parts.pop("repeats", None)
        for k in range(int(cfg.oof.n_folds)):
            key, rec = lineage_mod.key(FOLD_STEP, {**record["parts"], "step": {**parts, "fold": k}},
                                       manifest=record.get("manifest"))
            jobs.append(FoldJob(r, k, rcfg, key, rec))
    return jobs


def _fold_selection(cfg: DictConfig) -> tuple[list[int] | None, bool]:
    """``oof.folds`` as sorted fold numbers (None: all) and ``oof.merge``; a bad choice is one clear line."""
    folds, merge = cfg.oof.get("folds"), bool(cfg.oof.get("merge", False))
    if folds is None and not merge:
        return None, False
    given = f"oof.folds={_as_override(folds)}" if folds is not None else "oof.merge=true"
    if cfg.oof.method != "kfold":
        raise CleanloopError(f"{given}: fold jobs and merging split oof=kfold's trainings; oof={cfg.oof.method} "
                             "makes no per-fold models (drop it, or use oof=kfold)")
    if folds is not None and merge:
        raise CleanloopError(f"{given} with oof.merge=true: choose one (fold jobs compute folds, the merge "
                             "assembles them)")
    if merge:
        if not bool(cfg.paths.get("reuse_steps", True)):
            raise CleanloopError("oof.merge=true with paths.reuse_steps=false: the merge only assembles finished "
                                 "folds and reuse_steps=false retrains them all; drop one of the two")
        return None, True
    n = int(cfg.oof.n_folds)
    items = list(folds) if isinstance(folds, ListConfig | list | tuple) else [folds]
    if not items:
        raise CleanloopError(f"{given}: name at least one fold (0 to {n - 1}), or drop oof.folds to compute them all")
    bad = [i for i in items if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n]
    if bad:
        raise CleanloopError(f"{given}: {', '.join(map(str, bad))} not a fold; folds are numbered 0 to {n - 1} "
                             f"(oof.n_folds={n}), as in the `fold` column of oof_probs.parquet")
    return sorted(set(items)), False


def _as_override(folds) -> str:
    items = list(folds) if isinstance(folds, ListConfig | list | tuple) else [folds]
    return "[" + ",".join(str(i) for i in items) + "]"


def _missing_folds(cfg: DictConfig, jobs: list[FoldJob]) -> list[int]:
    """Fold numbers with an unfinished entry in some repeat (a fold job computes a fold in every repeat)."""
    cache = step_cache(cfg)
    return sorted({j.fold for j in jobs if cache.find(FOLD_STEP, j.key) is None})


def _missing_error(cfg: DictConfig, missing: list[int], key: str) -> CleanloopError:
    return CleanloopError(
        f"oof.merge=true: fold(s) {', '.join(map(str, missing))} of 0-{int(cfg.oof.n_folds) - 1} not computed yet for "
        f"this config (oof key {key}); compute them with `cleanloop oof oof.folds={_as_override(missing)}` and the "
        "same overrides, or run `cleanloop oof` without oof.merge to train them here")


def _heldout_metrics(labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    m = classification_metrics(labels, probs.argmax(1), classes=classes)
    return {"top1": m["top1"], "balanced_accuracy": m["balanced_accuracy"]}


def _fold_groups(cfg: DictConfig, train: pd.DataFrame, merged: Path | None = None) -> FoldGroups:
    """What the folds group by (CONTRACT §2 ``group``); blank rows made their own groups are a warning.

    ``merged``: the audit's ``fold_groups.csv`` (:func:`cleanloop.steps.locate.merged_groups`), where
    copies of one image sit under different groups: the folds keep each such set together.
    """
    plan = fold_groups(train["group"] if "group" in train.columns else None, missing_group=missing_group(cfg))
    if merged is not None:
        by_uuid = pd.read_csv(merged, dtype=str, keep_default_na=False).set_index("image_uuid")["group"]
        groups = by_uuid.reindex(train["image_uuid"]).to_numpy(dtype=object)
        before = len(set(plan.groups)) if plan.groups is not None else len(train)
        plan = FoldGroups(groups, n_own=plan.n_own, n_joined=before - len(set(groups)))
        log.info("oof: audit.merge_groups: %d group(s) joined to others because their images are copies "
                 "(audit/duplicates.csv)", plan.n_joined)
    if plan.n_own:
        log.warning("oof: data.missing_group=own: %d of %d train rows have a blank group; each is its own group, so "
                    "those rows may share folds with other images of their patient", plan.n_own, len(train))
    return plan


def _folds(cfg: DictConfig, train: pd.DataFrame, labels: np.ndarray, plan: FoldGroups) -> np.ndarray:
    folds = assign_folds(labels, n_folds=cfg.oof.n_folds, seed=cfg.oof.seed, groups=plan.groups)
    log.info("oof: %d train rows in %d folds (%s)", len(train), cfg.oof.n_folds, plan.description)
    return folds


SMALL_FIT = 2_000_000  # embedding values under which oof=embed fits its heads on one BLAS thread


def _embed(cfg: DictConfig, train: pd.DataFrame, labels: np.ndarray, classes: list[str], plan: FoldGroups
           ) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    """oof=embed: frozen-backbone embeddings once, then a logistic-regression head per fold.

    The same grouped folds and output as oof=kfold at a fraction of the cost; its quality rests
    on the backbone being pretrained (a random-init backbone gives weak features).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    if cfg.oof.get("checkpoint"):
        pred = predict(cfg, _load_checkpoint(cfg, classes), {"train": train})["train"]
        emb_ids, emb = pred.uuids, pred.embeddings
    else:
        emb_ids, emb = _backbone_embeddings(cfg, train, classes)
    folds = _folds(cfg, train, labels, plan)
    probs = np.zeros((len(train), len(classes)), dtype=np.float32)
    for k in range(cfg.oof.n_folds):
        held = folds == k
        head = make_pipeline(StandardScaler(), LogisticRegression(C=cfg.oof.C, max_iter=cfg.oof.max_iter))
        # One BLAS thread for small problems: on the demo (1,359 x 64) threads spinning for a busy
        # core made each fit 10-30x slower (0.13 s against 1.5-4 s, measured on 2 cores).
        with threadpool_limits(1 if emb.size < SMALL_FIT else None):
            head.fit(emb[~held], labels[~held])
        # a class absent from the training folds gets probability 0 in its column
        probs[np.ix_(held, head.classes_)] = head.predict_proba(emb[held])
        metrics = _heldout_metrics(labels[held], probs[held], classes)
        with mlflow.start_run(run_name=f"oof-fold-{k}", nested=True,
                              tags={"cleanloop.step": "oof-fold", "cleanloop.fold": str(k)}):
            mlflow.log_metrics({f"heldout/{m}": v for m, v in metrics.items()})
        log.info("oof: fold %d/%d head fitted, held-out top1 (vs given labels) %.3f", k + 1, cfg.oof.n_folds,
                 metrics["top1"])
    return probs, folds, list(emb_ids), emb


def _kfold(cfg: DictConfig, train: pd.DataFrame, labels: np.ndarray, classes: list[str], jobs: list[FoldJob],
           plan: FoldGroups, *, forced: bool, may_train: bool = True, key: str = ""
           ) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """Every fold of ``jobs``: its finished entry, else trained into it (never reused with ``forced``, i.e.
    paths.reuse_steps=false); then the OOF probabilities, the first repeat's fold column and the fold
    run ids. ``may_train=False`` (oof.merge): a missing fold is an error naming it.

    oof.repeats: R k-fold runs, each with its own fold shuffle (oof.seed + r) and training seed
    (recipe.seed + r), averaged per row; the file's ``fold`` column is the first run's.
    """
    repeats = 1 + max(j.repeat for j in jobs)
    if forced:  # every fold's old marker goes first, as the OOF entry's does: a run killed half-way leaves
        cache = step_cache(cfg)  # its new folds and no old one, so the next run trains the rest anew
        for job in jobs:
            with cache.claim(FOLD_STEP, job.key) as entry:
                entry.unmark()
    runs, run_ids = [], {}
    fold_columns = []
    for r in range(repeats):
        rcfg = next(j for j in jobs if j.repeat == r).cfg
        if repeats > 1:
            log.info("oof: repeat %d/%d (oof.seed=%d, recipe.seed=%d)", r + 1, repeats, rcfg.oof.seed,
                     rcfg.recipe.seed)
        fold_columns.append(_folds(rcfg, train, labels, plan))
    found = _folds_side_by_side(cfg, jobs, fold_columns, train, labels, classes, forced=forced) if may_train else {}
    for r, folds in enumerate(fold_columns):
        probs = np.zeros((len(train), len(classes)), dtype=np.float32)
        for job in (j for j in jobs if j.repeat == r):
            held = folds == job.fold
            got = found.get(job.name) or _fold(job, train, labels, classes, held, forced=forced, may_train=may_train)
            if got is None:  # oof.merge, and the fold's entry went since the check (evicted meanwhile)
                raise _missing_error(cfg, [job.fold], key)
            probs[held], run_ids[job.name] = got
        runs.append((probs, folds))
    if repeats == 1:
        return runs[0][0], runs[0][1], run_ids
    return np.mean([p for p, _ in runs], axis=0).astype(np.float32), runs[0][1], run_ids


def _folds_side_by_side(cfg: DictConfig, jobs: list[FoldJob], fold_columns: list[np.ndarray], train: pd.DataFrame,
                        labels: np.ndarray, classes: list[str], *, forced: bool) -> dict[str, tuple[np.ndarray, str]]:
    """With ``trainer.jobs`` > 1: the folds still to train, trained in that many worker processes at once
    (:mod:`cleanloop.parallel`); their held-out probabilities and run ids by fold name. Empty otherwise,
    and the caller trains (or reuses) each fold in this process."""
    n_jobs = parallel.jobs(cfg)
    cache = step_cache(cfg)
    todo = [job for job in jobs if forced or cache.find(FOLD_STEP, job.key) is None]
    if todo and fanout.wanted(cfg):  # a job of -m hydra/launcher=slurm|submitit_local: one array job of folds
        from hydra.core.hydra_config import HydraConfig

        folder = Path(HydraConfig.get().sweep.dir) / ".submitit" / f"oof-folds-{todo[0].key[:12]}"
        ex = fanout.executor("cleanloop-oof-folds", folder)
        log.info("oof: %d fold(s) sent to this multirun's launcher as one batch (a SLURM array job under "
                 "hydra/launcher=slurm; oof.fan_out; logs in %s)", len(todo), folder)
        parent = mlflow.active_run().info.run_id
        units = [(job.name, functools.partial(_fold_in_job, job, train, labels, classes,
                                              fold_columns[job.repeat] == job.fold, forced=forced,
                                              parent_run_id=parent)) for job in todo]
        return fanout.run(units, ex)
    if n_jobs < 2 or len(todo) < 2:
        return {}
    log.info("oof: training %d folds %d at a time (trainer.jobs=%s, %d thread(s) each)", len(todo), n_jobs,
             cfg.trainer.get("jobs"), parallel.threads(cfg))
    units = [(job.name, functools.partial(_fold, job, train, labels, classes, fold_columns[job.repeat] == job.fold,
                                          forced=forced)) for job in todo]
    return {name: got for name, (got, _) in parallel.run(units, n_jobs).items()}


def _fold_in_job(job: FoldJob, train: pd.DataFrame, labels: np.ndarray, classes: list[str], held: np.ndarray, *,
                 forced: bool, parent_run_id: str) -> tuple[np.ndarray, str] | None:
    """:func:`_fold` as a task of an array job (oof.fan_out): a fresh process, pointed at the step's MLflow
    store, its fold run nested under the step's run by id."""
    from cleanloop.config import register_resolvers
    from cleanloop.tracking import setup

    register_resolvers()  # the pickled config's own interpolations (cl.*)
    setup(job.cfg.tracking)
    return _fold(job, train, labels, classes, held, forced=forced, parent_run_id=parent_run_id)


def _fold(job: FoldJob, train: pd.DataFrame, labels: np.ndarray, classes: list[str], held: np.ndarray, *,
          forced: bool, may_train: bool = True, parent_run_id: str | None = None) -> tuple[np.ndarray, str] | None:
    """One fold's held-out probabilities and run id from its entry, trained into it first when not finished
    (or ``forced``); None when it is not finished and ``may_train`` is off.

    The entry is claimed (its file lock held) meanwhile, so two processes never train one fold: the
    second waits, then reuses it.
    """
    cfg, k, n_folds = job.cfg, job.fold, int(job.cfg.oof.n_folds)
    cache = step_cache(cfg)
    with cache.claim(FOLD_STEP, job.key) as entry:
        if entry.done and not forced:
            info = entry.info
            log.info("oof: fold %d/%d reused (fold entry %s, run %s)", k + 1, n_folds, job.key, info.get("run_id"))
        elif not may_train:
            return None
        else:
            def build(out_dir: Path) -> dict:
                t0 = time.time()
                with mlflow.start_run(run_name=f"oof-fold-{job.name}", nested=True, parent_run_id=parent_run_id,
                                      tags={"cleanloop.step": "oof-fold", "cleanloop.fold": str(k),
                                            "cleanloop.fold_key": job.key}) as run:
                    _, preds = fit_predict(cfg, classes, train[~held], predict_frames={"heldout": train[held]},
                                           log_prefix=f"[fold {job.tag}{k + 1}/{n_folds}] ")
                    uuids, probs = preds["heldout"].uuids, preds["heldout"].probs
                    metrics = _heldout_metrics(labels[held], probs, classes)
                    mlflow.log_metrics({f"heldout/{m}": v for m, v in metrics.items()})
                    mlflow.log_metrics({"heldout/n_rows": int(held.sum()), "train/n_rows": int((~held).sum())})
                    mlflow.log_dict(job.lineage, lineage_mod.LINEAGE_FILE)
                _save_fold(out_dir / FOLD_FILE, uuids, probs, key=job.key, fold=k)
                write_json(out_dir / lineage_mod.LINEAGE_FILE, job.lineage)
                return {"run_id": run.info.run_id, "fold": k, "repeat": job.repeat, "n_folds": n_folds,
                        "seconds": round(time.time() - t0, 1), "heldout": metrics, "lineage": job.lineage}

            info = cache.rebuild(entry, build)  # marked done, then logged: a kill after the line keeps the fold
            log.info("oof: fold %d/%d trained in %.1fs, held-out top1 (vs given labels) %.3f", k + 1, n_folds,
                     info["seconds"], info["heldout"]["top1"])
        uuids, probs = _load_fold(entry.dir / FOLD_FILE)
    if list(uuids) != train["image_uuid"][held].tolist():
        raise CleanloopError(f"{entry.dir}: rows differ from fold {k} of this manifest; remove that folder and re-run")
    return probs, str(info.get("run_id") or "")


def _fold_status(cfg: DictConfig, jobs: list[FoldJob]) -> tuple[list[int], list[int]]:
    missing = _missing_folds(cfg, jobs)
    return [k for k in range(int(cfg.oof.n_folds)) if k not in missing], missing


def _backbone_embeddings(cfg: DictConfig, train: pd.DataFrame, classes: list[str]) -> tuple[list[str], np.ndarray]:
    """The train rows' image_uuids and pooled embeddings from the backbone as loaded, before any fine-tuning.

    One space for all rows (per-fold models each have their own) and never fitted to these
    labels: what cleanlab's kNN outlier score needs to put garbage images on top.
    """
    model = Classifier(backbone_from_config(cfg.model, cache_dir=cfg.paths.cache_dir, seed=cfg.recipe.seed),
                       classes, image_mean=list(cfg.model.image_mean), image_std=list(cfg.model.image_std))
    pred = predict(cfg, model.eval(), {"train": train})["train"]
    return list(pred.uuids), pred.embeddings


def _load_checkpoint(cfg: DictConfig, classes: list[str]) -> Classifier:
    path = Path(str(cfg.oof.checkpoint))
    if path.is_dir():
        model = Classifier.load(path, attn_implementation=cfg.model.get("attn_implementation"))
    elif path.suffix == ".ckpt" and path.is_file():
        # A Lightning checkpoint of cleanloop's module: tensors only (weights_only=True, no pickle).
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        model = Classifier(backbone_from_config(cfg.model, cache_dir=cfg.paths.cache_dir, seed=cfg.recipe.seed),
                           classes, head=cfg.recipe.head, image_mean=list(cfg.model.image_mean),
                           image_std=list(cfg.model.image_std))
        model.load_state_dict(state, strict=True)
    else:
        raise CleanloopError(f"oof.checkpoint={path}: not a cleanloop model folder (train/<role>/model) or a .ckpt file")
    if model.classes != classes:
        raise CleanloopError(f"oof.checkpoint={path}: its classes {model.classes[:5]}... differ from the manifest's "
                             f"{classes[:5]}...; score with a model trained on these classes")
    return model.eval()


def run(cfg: DictConfig) -> dict:
    """Write ``oof/oof_probs.parquet`` (cached by key); returns its path, the run id and the OOF figures.

    With ``oof.folds=[i,...]``: compute those folds only (:func:`_fold_job`); no file is written.
    """
    method = cfg.oof.method
    if method not in ("kfold", "embed", "insample"):
        raise CleanloopError(f"oof.method={method!r}: choose oof=kfold, oof=embed or oof=insample")
    selected, merge_only = _fold_selection(cfg)
    if selected is not None and cfg.get("step") == "cycle":
        raise CleanloopError(f"oof.folds={_as_override(selected)}: a cycle needs every fold; compute folds with "
                             "`cleanloop oof oof.folds=[...]`, then run `cleanloop cycle` without oof.folds")
    makes_folds = method != "insample"
    m = load_input(cfg, min_train_per_class=cfg.oof.n_folds if makes_folds else None, groups=makes_folds)
    train, classes = m.train.reset_index(drop=True), m.classes
    labels = m.label_indices(train)
    manifest_hash = file_hash(m.source)
    audited = audit_fold_groups(cfg, m) if makes_folds else None
    merged = merged_groups(cfg, m, audited) if audited else None
    if makes_folds and audited is None and cfg.audit.get("enabled") and cfg.audit.get("merge_groups"):
        log.warning("oof: audit.merge_groups is on but this manifest has no audit yet: folds keep the group column's "
                    "groups only; run `cleanloop audit` first (cycle does) or set audit.merge_groups=false")
    plan = _fold_groups(cfg, train, merged) if makes_folds else None
    folds_made = plan.description if plan is not None else "none (in-sample)"
    own = bool(plan and plan.n_own)
    parts = oof_parts(cfg, manifest_hash, classes, own_groups=own, merged_groups=merged)
    key, lineage = entry_key(cfg, "oof", parts, m)
    tags = {"cleanloop.oof": method, "cleanloop.data": manifest_hash, "cleanloop.recipe": recipe_hash(cfg),
            "cleanloop.oof_key": key, "cleanloop.in_sample": str(method == "insample").lower(),
            "cleanloop.folds": folds_made}
    forced = not bool(cfg.paths.get("reuse_steps", True))
    jobs = _fold_jobs(cfg, lineage, manifest_hash, classes, own_groups=own, merged=merged) if method == "kfold" else []
    if selected is not None:
        return _fold_job(cfg, train, labels, classes, [j for j in jobs if j.fold in selected], jobs, plan, key, tags,
                         forced=forced)
    if merge_only and step_cache(cfg).find("oof", key) is None:
        missing = _missing_folds(cfg, jobs)
        if missing:
            raise _missing_error(cfg, missing, key)

    def build(out_dir: Path) -> dict:
        t0 = time.time()
        head = cfg.recipe.head
        with step_run(cfg, "oof", run_name=f"oof-{method}", tags=tags) as run:
            log_dataset(train, m.source, name=manifest_dataset_name("input", m.source), context="train",
                        digest=manifest_hash)
            built = {}
            if method == "kfold":
                probs, folds, fold_runs = _kfold(cfg, train, labels, classes, jobs, plan, forced=forced,
                                                 may_train=not merge_only, key=key)
                mlflow.set_tag("cleanloop.fold_runs", ",".join(f"{n}:{r}" for n, r in fold_runs.items()))
                built["fold_entries"] = [j.key for j in jobs]
                emb_ids, emb = _backbone_embeddings(cfg, train, classes)
            elif method == "embed":
                if cfg.oof.get("checkpoint"):
                    log.warning("oof=embed: the backbone %s may be fine-tuned on these rows: its embeddings are "
                                "in-sample", cfg.oof.checkpoint)
                    mlflow.set_tag("cleanloop.in_sample_backbone", "true")
                probs, folds, emb_ids, emb = _embed(cfg, train, labels, classes, plan)
            else:
                model = _load_checkpoint(cfg, classes)
                head = model.head_kind
                log.warning("oof=insample: scoring %d train rows with %s, a model that saw them; memorised label "
                            "errors look confident, so flags are biased low", len(train), cfg.oof.checkpoint)
                pred = predict(cfg, model, {"train": train})["train"]
                probs, folds, emb_ids, emb = pred.probs, np.full(len(train), -1), pred.uuids, pred.embeddings
                mlflow.set_tag("cleanloop.note", "in-sample probabilities: scored by a model trained on these rows")
            df = oof_frame(train["image_uuid"], train["label"], folds, probs, classes)
            write_oof(out_dir / "oof_probs.parquet", df, classes=classes, head=head, method=method, key=key,
                      manifest=str(m.source.resolve()), manifest_hash=manifest_hash, n_folds=int(cfg.oof.n_folds),
                      folds=folds_made)
            write_embeddings(out_dir, emb, emb_ids)
            overall = _heldout_metrics(labels, probs, classes)
            mlflow.log_metrics({f"oof/{k}": v for k, v in overall.items()})
            mlflow.log_artifact(str(out_dir / "oof_probs.parquet"))
        log.info("oof: wrote %d rows x %d classes in %.1fs; OOF top1 %.3f, balanced accuracy %.3f (vs given "
                 "labels; run %s)", len(train), len(classes), time.time() - t0, overall["top1"],
                 overall["balanced_accuracy"], run.info.run_id)
        return {"run_id": run.info.run_id, **overall, **built}

    info = cached(cfg, "oof", key, build, publish_to=out_path(cfg, "oof"),
                  names=["oof_probs.parquet", *EMBEDDING_FILES], lineage=lineage)
    return {**info, "path": str(out_path(cfg, "oof", "oof_probs.parquet"))}


def _fold_job(cfg: DictConfig, train: pd.DataFrame, labels: np.ndarray, classes: list[str], mine: list[FoldJob],
              jobs: list[FoldJob], plan: FoldGroups, key: str, tags: dict, *, forced: bool) -> dict:
    """``oof.folds=[i,...]``: train (or find) those folds' entries, in every repeat, under one ``oof`` run; then
    say which folds of this config are done and which are missing. Writes no oof_probs.parquet."""
    selected = sorted({j.fold for j in mine})
    given = f"oof.folds={_as_override(selected)}"
    t0 = time.time()
    with step_run(cfg, "oof", run_name=f"oof-kfold-folds-{'-'.join(map(str, selected))}",
                  tags={**tags, "cleanloop.oof_folds": _as_override(selected)}) as run:
        _, _, fold_runs = _kfold(cfg, train, labels, classes, mine, plan, forced=forced)
        mlflow.set_tag("cleanloop.fold_runs", ",".join(f"{n}:{r}" for n, r in fold_runs.items()))
        done, missing = _fold_status(cfg, jobs)
        mlflow.log_metrics({"oof/folds_done": len(done), "oof/folds_missing": len(missing)})
    n = int(cfg.oof.n_folds)
    log.info("oof: %s: fold(s) %s ready in %.1fs (oof key %s); of folds 0-%d, done: %s; missing: %s",
             given, ", ".join(map(str, selected)), time.time() - t0, key, n - 1,
             ", ".join(map(str, done)) or "none", ", ".join(map(str, missing)) or "none")
    if missing:
        log.info("oof: %s writes no oof_probs.parquet; once fold(s) %s are computed (`cleanloop oof oof.folds=%s`, same "
                 "overrides), `cleanloop oof oof.merge=true` assembles it, or a plain `cleanloop oof` trains the "
                 "missing folds and assembles it", given, ", ".join(map(str, missing)), _as_override(missing))
    else:
        log.info("oof: %s writes no oof_probs.parquet; every fold is done: `cleanloop oof` (or oof.merge=true) now "
                 "only assembles it", given)
    return {"run_id": run.info.run_id, "key": key, "folds": selected, "done": done, "missing": missing,
            "reused": False, "path": None}

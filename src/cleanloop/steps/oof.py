"""``cleanloop oof``: out-of-sample probabilities for every train row.

``oof=kfold`` (default): grouped, stratified folds; each fold trains the recipe on the other
folds and predicts the held-out one. Finished folds are kept in the cache entry's ``folds/``
under its key, so a re-run of an unfinished entry resumes at the first unfinished fold
(``paths.reuse_steps=false`` retrains them all).
``oof=embed``: frozen-backbone embeddings once, a logistic-regression head per fold: the same
folds and file for a fraction of the cost, when the backbone is pretrained.
``oof=insample``: score the train rows with an existing model, as the team's first pass did
(memorised errors look confident: the run is tagged in-sample).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, open_dict

from cleanloop.config import file_hash
from cleanloop.errors import CleanloopError
from cleanloop.folds import FoldGroups, assign_folds, fold_groups
from cleanloop.metrics import classification_metrics
from cleanloop.model import Classifier, backbone_from_config
from cleanloop.oof_file import EMBEDDING_FILES, oof_frame, read_meta, write_embeddings, write_oof
from cleanloop.steps.common import cached, entry_key, load_input, out_path
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


def _save_fold(path: Path, uuids: list[str], probs: np.ndarray, *, key: str, fold: int) -> None:
    df = pd.DataFrame(probs, columns=[f"p{i}" for i in range(probs.shape[1])])
    df.insert(0, "image_uuid", uuids)
    write_oof(path, df, classes=[], key=key, fold=fold)


def _load_fold(path: Path, *, key: str) -> tuple[list[str], np.ndarray] | None:
    if not path.is_file() or read_meta(path).get("key") != key:
        return None  # absent, or made with other data / config: train it again
    df = pd.read_parquet(path)
    return df["image_uuid"].tolist(), df.drop(columns="image_uuid").to_numpy()


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


def _kfold(cfg: DictConfig, train: pd.DataFrame, labels: np.ndarray, classes: list[str], key: str,
           out_dir: Path, plan: FoldGroups, *, reuse_folds: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Train each fold, or take a finished one of this key from ``out_dir/folds`` (an earlier build of
    this entry that did not finish; never with ``reuse_folds=False``, i.e. paths.reuse_steps=false)."""
    repeats = max(1, int(cfg.oof.get("repeats", 1)))
    if repeats == 1:
        return _kfold_once(cfg, train, labels, classes, key, out_dir, plan, reuse_folds=reuse_folds)
    # oof.repeats: R k-fold runs, each with its own fold shuffle (oof.seed + r) and training seed
    # (recipe.seed + r), averaged per row; the file's `fold` column is the first run's.
    runs = []
    for r in range(repeats):
        rcfg = cfg.copy()
        with open_dict(rcfg):
            rcfg.oof.seed = int(cfg.oof.seed) + r
            rcfg.recipe.seed = int(cfg.recipe.seed) + r
        log.info("oof: repeat %d/%d (oof.seed=%d, recipe.seed=%d)", r + 1, repeats, rcfg.oof.seed, rcfg.recipe.seed)
        runs.append(_kfold_once(rcfg, train, labels, classes, key, out_dir, plan, reuse_folds=reuse_folds,
                                tag=f"r{r}-" if r else ""))
    return np.mean([p for p, _ in runs], axis=0).astype(np.float32), runs[0][1]


def _kfold_once(cfg: DictConfig, train: pd.DataFrame, labels: np.ndarray, classes: list[str], key: str,
                out_dir: Path, plan: FoldGroups, *, reuse_folds: bool = True, tag: str = ""
                ) -> tuple[np.ndarray, np.ndarray]:
    n_folds = cfg.oof.n_folds
    folds = _folds(cfg, train, labels, plan)
    probs = np.zeros((len(train), len(classes)), dtype=np.float32)
    for k in range(n_folds):
        held = folds == k
        fold_path = out_dir / "folds" / f"fold-{tag}{k}.parquet"
        saved = _load_fold(fold_path, key=key) if reuse_folds else None
        if saved is not None:
            log.info("oof: fold %d/%d reused from %s (key %s)", k + 1, n_folds, fold_path, key)
        else:
            t0 = time.time()
            with mlflow.start_run(run_name=f"oof-fold-{tag}{k}", nested=True,
                                  tags={"cleanloop.step": "oof-fold", "cleanloop.fold": str(k)}):
                _, preds = fit_predict(cfg, classes, train[~held], predict_frames={"heldout": train[held]},
                                       log_prefix=f"[fold {tag}{k + 1}/{n_folds}] ")
                saved = preds["heldout"].uuids, preds["heldout"].probs
                metrics = _heldout_metrics(labels[held], saved[1], classes)
                mlflow.log_metrics({f"heldout/{m}": v for m, v in metrics.items()})
                mlflow.log_metrics({"heldout/n_rows": int(held.sum()), "train/n_rows": int((~held).sum())})
            _save_fold(fold_path, *saved, key=key, fold=k)
            log.info("oof: fold %d/%d trained in %.1fs, held-out top1 (vs given labels) %.3f",
                     k + 1, n_folds, time.time() - t0, metrics["top1"])
        if list(saved[0]) != train["image_uuid"][held].tolist():
            raise CleanloopError(f"{fold_path}: rows differ from fold {k}; delete {out_dir / 'folds'} and re-run")
        probs[held] = saved[1]
    return probs, folds


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
    """Write ``oof/oof_probs.parquet`` (cached by key); returns its path, the run id and the OOF figures."""
    method = cfg.oof.method
    if method not in ("kfold", "embed", "insample"):
        raise CleanloopError(f"oof.method={method!r}: choose oof=kfold, oof=embed or oof=insample")
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
    parts = oof_parts(cfg, manifest_hash, classes, own_groups=bool(plan and plan.n_own), merged_groups=merged)
    key, lineage = entry_key(cfg, "oof", parts, m)
    tags = {"cleanloop.oof": method, "cleanloop.data": manifest_hash, "cleanloop.recipe": recipe_hash(cfg),
            "cleanloop.oof_key": key, "cleanloop.in_sample": str(method == "insample").lower(),
            "cleanloop.folds": folds_made}

    def build(out_dir: Path) -> dict:
        t0 = time.time()
        head = cfg.recipe.head
        with step_run(cfg, "oof", run_name=f"oof-{method}", tags=tags) as run:
            log_dataset(train, m.source, name=manifest_dataset_name("input", m.source), context="train",
                        digest=manifest_hash)
            if method == "kfold":
                probs, folds = _kfold(cfg, train, labels, classes, key, out_dir, plan,
                                      reuse_folds=bool(cfg.paths.get("reuse_steps", True)))
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
        return {"run_id": run.info.run_id, **overall}

    info = cached(cfg, "oof", key, build, publish_to=out_path(cfg, "oof"),
                  names=["oof_probs.parquet", *EMBEDDING_FILES], lineage=lineage, resume=("folds",))
    return {**info, "path": str(out_path(cfg, "oof", "oof_probs.parquet"))}

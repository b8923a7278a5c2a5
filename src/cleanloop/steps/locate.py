"""Where each step's inputs and outputs are: the step keys and the output locators, in one place.

``oof``, ``flag``, ``prune``, ``train`` and ``review`` find what an earlier step wrote through this
module (its cache entry for this config, else the contract layout in ``paths.out_dir``), so step
modules import this module and the core, never each other (``cycle`` aside). The common key parts
(versions, images) are added by :func:`cleanloop.steps.common.entry_key`.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from cleanloop.config import file_hash, recipe_hash, short_hash
from cleanloop.errors import CleanloopError
from cleanloop.folds import n_partly_blank
from cleanloop.oof_file import EMBEDDING_IDS, EMBEDDINGS
from cleanloop.steps.common import entry_key, find_entry, load_input, out_path, step_cache


def missing_group(cfg: DictConfig) -> str:
    return str(cfg.data.get("missing_group") or "error")


def own_groups(cfg: DictConfig, m) -> bool:
    return missing_group(cfg) == "own" and "group" in m.train.columns and n_partly_blank(m.train["group"]) > 0


def oof_entry_key(cfg: DictConfig, m) -> tuple[str, dict]:
    """The OOF cache entry's key for the input manifest ``m`` and its lineage record."""
    parts = oof_parts(cfg, file_hash(m.source), m.classes, own_groups=own_groups(cfg, m),
                      merged_groups=merged_groups(cfg, m))
    return entry_key(cfg, "oof", parts, m)


def audit_parts(cfg: DictConfig, m) -> dict:
    """The audit's part of the key: the manifest and the options that change its pairs; with
    ``audit.embeddings``, the embeddings files' content and ``audit.min_cosine`` (only then, so the
    keys of audits without embeddings stay as they were)."""
    parts = {"data": file_hash(m.source),
             "audit": {k: cfg.audit[k] for k in ("phash_max_distance", "min_pixel_ncc")}}
    files = audit_embedding_files(cfg)
    if files:
        parts["embeddings"] = {"files": [_content_hash(f) for f in files], "min_cosine": float(cfg.audit.min_cosine)}
    return parts


def audit_embedding_files(cfg: DictConfig) -> list[Path]:
    """The file(s) ``audit.embeddings`` names, as the audit reads them; empty when it is not set.

    A ``.parquet`` with an ``image_uuid`` column (other than ``embedding_ids.parquet``) is one file;
    otherwise the pair ``oof`` writes: ``embeddings.npy`` and ``embedding_ids.parquet`` beside it
    (the setting names either file or their folder).
    """
    given = cfg.audit.get("embeddings") if cfg.get("audit") is not None else None
    if not given:
        return []
    path = Path(str(given)).expanduser()
    if path.is_dir():
        files = [path / EMBEDDINGS, path / EMBEDDING_IDS]
    elif path.suffix == ".npy":
        files = [path, path.with_name(EMBEDDING_IDS)]
    elif path.name == EMBEDDING_IDS:
        files = [path.with_name(EMBEDDINGS), path]
    elif path.suffix == ".parquet":
        files = [path]
    else:
        raise CleanloopError(f"audit.embeddings={given}: give a .parquet with an image_uuid column, or an .npy "
                             f"with {EMBEDDING_IDS} beside it (the files `oof` writes), or their folder")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise CleanloopError(f"audit.embeddings={given}: {', '.join(missing)} not found")
    return files


_hashed: dict[tuple, str] = {}  # (path, size, mtime, ctime, inode) -> content hash, for this process


def _content_hash(path: Path) -> str:
    """:func:`file_hash`, remembered by the file's stat (embeddings of 121,514 rows are 280 MB; the
    audit's key is looked up by several steps of a cycle)."""
    st = path.stat()
    sig = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    if sig not in _hashed:
        _hashed[sig] = file_hash(path)
    return _hashed[sig]


def audit_output(cfg: DictConfig, m, name: str) -> Path:
    """An audit file of this config: its cache entry, else ``audit/`` in ``paths.out_dir``."""
    entry = find_entry(cfg, "audit", audit_parts(cfg, m), m)
    return entry.dir / name if entry else out_path(cfg, "audit", name)


def audit_conflicts(cfg: DictConfig, m) -> Path | None:
    """The audit's ``conflicting_labels.csv`` of this manifest, when the audit has run (``flag`` marks
    those train rows as an issue kind of their own); never a published file of other inputs."""
    if cfg.get("audit") is None or not cfg.audit.get("enabled", True):
        return None
    entry = find_entry(cfg, "audit", audit_parts(cfg, m), m)
    path = entry.dir / "conflicting_labels.csv" if entry else None
    return path if path is not None and path.is_file() else None


def audit_fold_groups(cfg: DictConfig, m) -> Path | None:
    """The audit's merged fold groups for ``oof`` (``audit.merge_groups``), when the audit has run."""
    if cfg.get("audit") is None or not cfg.audit.get("enabled", True) or not cfg.audit.get("merge_groups", False):
        return None
    entry = find_entry(cfg, "audit", audit_parts(cfg, m), m)  # never a published file of other inputs
    return entry.dir / "fold_groups.csv" if entry and (entry.dir / "fold_groups.csv").is_file() else None


def merged_groups(cfg: DictConfig, m, audited: Path | None = None) -> Path | None:
    """The audit's fold groups when ``oof`` makes folds with them: they join groups the manifest keeps apart.

    ``audited``: :func:`audit_fold_groups` when the caller has looked it up already.
    """
    if cfg.oof.method == "insample":
        return None
    path = audited or audit_fold_groups(cfg, m)
    if path is None:
        return None
    from cleanloop.folds import fold_groups, same_partition

    merged = pd.read_csv(path, dtype=str, keep_default_na=False).set_index("image_uuid")["group"]
    train = m.train
    plan = fold_groups(train["group"] if "group" in train.columns else None, missing_group=missing_group(cfg))
    own = plan.groups if plan.groups is not None else train["image_uuid"].to_numpy()
    return None if same_partition(own, merged.reindex(train["image_uuid"]).to_numpy()) else path


def oof_parts(cfg: DictConfig, manifest_hash: str, classes: list[str], *, own_groups: bool = False,
              merged_groups: Path | None = None) -> dict:
    """Everything of the step that changes the OOF probabilities: data, classes, model, recipe, folds.

    ``own_groups``: blank ``group`` cells were made their own groups (data.missing_group=own); only
    then is it a part. The entry key adds the versions and the images (:func:`cleanloop.lineage.inputs`).
    """
    insample = cfg.oof.method == "insample"
    embed = {"C": cfg.oof.C, "max_iter": cfg.oof.max_iter} if cfg.oof.method == "embed" else None
    parts = {"data": manifest_hash, "classes": classes, "recipe": recipe_hash(cfg, with_seed=True),
             "method": cfg.oof.method, "n_folds": None if insample else cfg.oof.n_folds,
             "seed": None if insample else cfg.oof.seed, "embed": embed,
             "checkpoint": checkpoint_identity(cfg.oof.get("checkpoint"))}
    if own_groups and not insample:
        parts["missing_group"] = "own"
    if merged_groups is not None and not insample:  # only then: keys of folds the audit left alone stay
        parts["merged_groups"] = file_hash(merged_groups)
    if cfg.oof.method == "kfold" and int(cfg.oof.get("repeats", 1)) > 1:  # only then: older keys stay valid
        parts["repeats"] = int(cfg.oof.repeats)
    return parts


def oof_key(cfg: DictConfig, manifest_hash: str, classes: list[str], *, own_groups: bool = False,
            merged_groups: Path | None = None) -> str:
    """A hash of :func:`oof_parts` (the step's own part of the entry key)."""
    return short_hash(oof_parts(cfg, manifest_hash, classes, own_groups=own_groups, merged_groups=merged_groups))


def checkpoint_identity(checkpoint) -> str | None:
    """A content hash of the checkpoint's weight files, so a retrained checkpoint is a new key."""
    if not checkpoint:
        return None
    path = Path(str(checkpoint))
    files = sorted(path.rglob("*.safetensors")) + sorted(path.glob("*.json")) if path.is_dir() else [path]
    return short_hash([file_hash(f) for f in files if f.is_file()])


def oof_key_for(cfg: DictConfig, m) -> str:
    return oof_entry_key(cfg, m)[0]


def oof_input(cfg: DictConfig, m) -> Path:
    """``flag.oof``; else the cached OOF of this config (so a flag sweep finds it from any job folder);
    else ``oof/oof_probs.parquet`` in ``paths.out_dir``."""
    if cfg.flag.get("oof"):
        return Path(cfg.flag.oof)
    entry = step_cache(cfg).find("oof", oof_key_for(cfg, m))
    return entry.dir / "oof_probs.parquet" if entry else out_path(cfg, "oof", "oof_probs.parquet")


# flag keys that choose inputs or the mode, not how rows are scored: never part of a key.
_FLAG_INPUT_KEYS = ("oof", "split", "test_predictions")


def flag_options(cfg: DictConfig) -> dict:
    """The flag options that change the flags (cleanlab's, outliers, montage): part of both flag keys."""
    return {k: v for k, v in OmegaConf.to_container(cfg.flag, resolve=True).items() if k not in _FLAG_INPUT_KEYS}


def flag_parts(cfg: DictConfig, m, oof_path: Path) -> dict:
    """The step's part of the key: the OOF file's content (and its embeddings), the manifest and the
    flag options; and the audit's conflicting-label copies when the audit of this manifest has run
    (they become an issue kind of label_issues.csv). The entry key adds the versions and the images
    (:func:`cleanloop.lineage.inputs`)."""
    emb, ids = oof_path.with_name(EMBEDDINGS), oof_path.with_name(EMBEDDING_IDS)
    parts = {"oof": file_hash(oof_path) if oof_path.is_file() else str(oof_path),
             "embeddings": file_hash(emb) if emb.is_file() else None, "data": file_hash(m.source),
             "classes": m.classes, "head": cfg.recipe.head, "flag": flag_options(cfg)}
    if ids.is_file():  # only when present, so the keys of OOF folders without ids stay as they were
        parts["embedding_ids"] = file_hash(ids)
    conflicts = audit_conflicts(cfg, m)
    if conflicts is not None:  # only then: keys of flags without an audit stay as they were
        parts["conflicting_copies"] = file_hash(conflicts)
    return parts


def train_parts(cfg: DictConfig, role: str, path: Path, source) -> dict:
    """The train step's part of the key: role, recipe with seed, the manifest trained on (``path``),
    the input manifest ``source``, its classes and the trainer."""
    return {"role": role, "recipe": recipe_hash(cfg, with_seed=True), "data": file_hash(path),
            "source": file_hash(source.source), "classes": source.classes,
            "trainer": OmegaConf.to_container(cfg.trainer, resolve=True)}


def baseline_seeds(cfg: DictConfig) -> list[int]:
    """The baseline seeds a cycle trains: ``recipe.seed`` and the next ``compare.seeds - 1``."""
    n = int(cfg.compare.get("seeds", 1)) if cfg.get("compare") is not None else 1
    return [int(cfg.recipe.seed) + i for i in range(max(1, n))]


def baseline_test_predictions(cfg: DictConfig, m) -> list[Path]:
    """The baseline model(s)' ``test_predictions.parquet`` for the test flags (``flag.split=test``).

    ``flag.test_predictions`` (a path or a list); else, per seed of :func:`baseline_seeds`, the
    train-baseline cache entry of this config; else ``train/baseline/`` (and ``seed-<s>/``) in
    ``paths.out_dir``. Empty when none exists.
    """
    given = cfg.flag.get("test_predictions")
    if given:
        items = list(given) if OmegaConf.is_list(given) or isinstance(given, list | tuple) else [given]
        return [Path(str(p)) for p in items]
    from cleanloop.config import short_hash

    found = []
    for i, seed in enumerate(baseline_seeds(cfg)):
        scfg = cfg.copy()
        OmegaConf.update(scfg, "recipe.seed", seed, merge=False)
        entry = find_entry(scfg, "train-baseline", short_hash(train_parts(scfg, "baseline", m.source, m)), m)
        published = out_path(cfg, "train", "baseline", *([] if i == 0 else [f"seed-{seed}"]),
                             "test_predictions.parquet")
        path = entry.dir / "test_predictions.parquet" if entry else published
        if path.is_file():
            found.append(path)
    return found


def flag_test_parts(cfg: DictConfig, m, predictions: list[Path]) -> dict:
    """The test flags' part of the key: the baseline test predictions' content, the manifest (its test
    rows and their resolved paths), classes, head and the flag options."""
    from cleanloop.config import short_hash

    test = m.split("test")
    return {"predictions": sorted(file_hash(p) if p.is_file() else str(p) for p in predictions),
            "data": file_hash(m.source), "paths": short_hash(test["abs_path"].tolist()), "classes": m.classes,
            "head": cfg.recipe.head, "flag": flag_options(cfg)}


def flag_test_issues(cfg: DictConfig, m) -> Path:
    """This config's test_label_issues.csv: ``review.test_issues``; the test-flag cache entry of its
    baseline predictions; else ``flag/`` in ``paths.out_dir`` (the file may not exist: no test tab)."""
    if cfg.get("review") is not None and cfg.review.get("test_issues"):
        return Path(str(cfg.review.test_issues))
    predictions = baseline_test_predictions(cfg, m)
    entry = find_entry(cfg, "flag-test", flag_test_parts(cfg, m, predictions), m) if predictions else None
    return entry.dir / "test_label_issues.csv" if entry else out_path(cfg, "flag", "test_label_issues.csv")


def issues_output(cfg: DictConfig, m) -> Path:
    """Where this config's label_issues.csv is: its cache entry, else ``flag/`` in ``paths.out_dir``."""
    entry = find_entry(cfg, "flag", flag_parts(cfg, m, oof_input(cfg, m)), m)
    return entry.dir / "label_issues.csv" if entry else out_path(cfg, "flag", "label_issues.csv")


def issues_input(cfg: DictConfig, m) -> Path:
    if cfg.prune.get("issues"):
        return Path(cfg.prune.issues)
    return issues_output(cfg, m)


def prune_parts(cfg: DictConfig, m, issues_path: Path) -> dict:
    """The step's part of the key: the issues file, the manifest, the prune options and decisions."""
    options = {k: v for k, v in OmegaConf.to_container(cfg.prune, resolve=True).items() if k not in ("issues", "decisions")}
    decisions = Path(cfg.prune.decisions) if cfg.prune.get("decisions") else None
    return {"issues": file_hash(issues_path) if issues_path.is_file() else str(issues_path),
            "data": file_hash(m.source), "prune": options,
            "decisions": decisions_identity(decisions, m) if decisions and decisions.is_file() else str(decisions)}


def decisions_identity(path: Path, m) -> str:
    """The content of a decisions file as prune reads it: its rows less those on test (or val) rows,
    which are compare's (``compare.test_decisions``), so changing them never makes a new prune entry.
    (Prune keys of older entries change once; their cleaned manifests, and so the train keys, do not.)"""
    from cleanloop.config import short_hash

    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
        uuids = raw["image_uuid"].str.strip()
    except Exception:  # unreadable or malformed: prune itself says what is wrong
        return file_hash(path)
    other = uuids.isin(set(m.df.loc[m.df["split"] != "train", "image_uuid"]))
    return short_hash([list(raw.columns), raw[~other.to_numpy()].astype(str).values.tolist()])


def cleaned_output(cfg: DictConfig, m) -> Path | None:
    """This config's cleaned manifest: its cache entry, else ``prune/`` in ``paths.out_dir``; None if neither."""
    entry = find_entry(cfg, "prune", prune_parts(cfg, m, issues_input(cfg, m)), m)
    folder = entry.dir if entry else out_path(cfg, "prune")
    found = sorted(folder.glob("cleaned_manifest.*"))
    return found[0] if found else None


def cleaned_manifest_path(cfg: DictConfig, source=None) -> Path:
    """The cleaned manifest of this config (its prune cache entry, else ``prune/`` in ``paths.out_dir``)."""
    found = cleaned_output(cfg, source if source is not None else load_input(cfg))
    if found is None:
        raise CleanloopError(
            f"{out_path(cfg, 'prune')}: no cleaned_manifest yet; run `cleanloop prune` (or `make prune`) first"
        )
    return found


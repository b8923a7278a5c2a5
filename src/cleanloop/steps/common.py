"""What several steps share: the input manifest, the output folder, and the step cache."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from cleanloop.cache import DONE, StepCache, publish
from cleanloop.config import file_hash, short_hash
from cleanloop.demo import ensure_demo
from cleanloop.errors import CleanloopError
from cleanloop.images import unreadable_images
from cleanloop.io import write_csv, write_json
from cleanloop.manifest import Manifest, load_manifest

log = logging.getLogger(__name__)


def input_manifest_path(cfg: DictConfig) -> Path:
    """The manifest the user gave (``data.manifest``); the demo is built on first use."""
    if cfg.data.get("demo") is not None:
        return ensure_demo(cfg.data)
    return Path(cfg.data.manifest)


def load_input(cfg: DictConfig, path: str | Path | None = None, *, min_train_per_class: int | None = None,
               min_train_hint: str = "oof.n_folds", groups: bool = False) -> Manifest:
    """The input manifest, or a derived one (``path``, e.g. the cleaned manifest).

    A derived manifest keeps the input's relative paths, so they resolve where the input's do:
    ``data.image_root`` or the input manifest's folder. ``groups``: the step makes folds, so a
    ``group`` column blank in some train rows only is refused unless ``data.missing_group=own``.
    """
    source = input_manifest_path(cfg)
    image_root = cfg.data.get("image_root") or source.parent
    classes = list(cfg.data.classes) if cfg.data.get("classes") else None
    missing_group = str(cfg.data.get("missing_group") or "error") if groups else None
    m = load_manifest(Path(path) if path is not None else source, image_root=image_root, classes=classes,
                      min_train_per_class=min_train_per_class, min_train_hint=min_train_hint,
                      missing_group=missing_group)
    source_m = m if path is None else load_manifest(source, image_root=image_root, classes=classes)
    return _apply_bad_image_policy(cfg, m, _bad_images(cfg, source_m))


_SCANNED: dict[tuple[str, str, str], pd.DataFrame] = {}  # per process: steps load the manifest several times


def _bad_images(cfg: DictConfig, source: Manifest) -> pd.DataFrame:
    """The input manifest's undecodable images, scanned once per manifest content and image files
    (their sizes and modification times: a repaired image is scanned again)."""
    paths_hash = short_hash(source.df["abs_path"].tolist())
    memo = (str(Path(cfg.paths.cache_dir).resolve()), file_hash(source.source), paths_hash)
    if memo in _SCANNED:
        return _SCANNED[memo]
    stats = [(st.st_size, st.st_mtime_ns) for st in map(os.stat, source.df["abs_path"])]
    key = short_hash({"data": memo[1], "paths": paths_hash, "stats": short_hash(stats)})
    cache = step_cache(cfg)
    with cache.claim("images", key) as entry:
        if not entry.done:
            def scan(out_dir: Path) -> dict:
                t0 = time.time()
                found = unreadable_images(source.df["abs_path"].tolist(), workers=int(cfg.data.get("scan_workers", 4)))
                rows = source.df.iloc[[i for i, _ in found]]
                bad = pd.DataFrame({"image_uuid": rows["image_uuid"].to_numpy(), "path": rows["abs_path"].to_numpy(),
                                    "split": rows["split"].to_numpy(), "reason": [r for _, r in found]})
                write_csv(out_dir / "bad_images.csv", bad)
                log.info("images: decoded all %d images in %.1fs, %d unreadable", len(source.df), time.time() - t0,
                         len(bad))
                return {"n_bad": len(bad), "n_images": len(source.df)}

            cache.rebuild(entry, scan)
        _SCANNED[memo] = pd.read_csv(entry.dir / "bad_images.csv", dtype=str, keep_default_na=False)
    return _SCANNED[memo]


_WARNED: set[tuple[str, int]] = set()


def _apply_bad_image_policy(cfg: DictConfig, m: Manifest, bad: pd.DataFrame) -> Manifest:
    """data.on_bad_image: ``fail`` (default) stops before any training with the list; ``skip`` drops
    the rows and writes ``skipped_images.csv`` to paths.out_dir. Never silent."""
    bad = bad[bad["image_uuid"].isin(set(m.df["image_uuid"]))]
    if bad.empty:
        return m
    policy = cfg.data.get("on_bad_image", "fail")
    if policy not in ("fail", "skip"):
        raise CleanloopError(f"data.on_bad_image={policy!r}: choose fail or skip")
    if policy == "fail":
        listed = ", ".join(f"'{p}' ({r})" for p, r in zip(bad["path"][:10], bad["reason"][:10], strict=True))
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise CleanloopError(f"{m.source}: {len(bad)} image(s) cannot be decoded, first: {listed}{more}; fix or "
                             "remove them, or set data.on_bad_image=skip to train without them")
    skipped = out_path(cfg, "skipped_images.csv")
    write_csv(skipped, bad)
    if (str(skipped), len(bad)) not in _WARNED:  # once per process, not at every load of the manifest
        _WARNED.add((str(skipped), len(bad)))
        log.warning("data.on_bad_image=skip: %d unreadable image(s) left out, listed in %s", len(bad), skipped)
    return replace(m, df=m.df[~m.df["image_uuid"].isin(set(bad["image_uuid"]))].reset_index(drop=True))


def read_csv_strings(path: Path, what: str, hint: str) -> pd.DataFrame:
    """A user's CSV (issues, decisions) as strings; missing or unreadable is one clear line."""
    if not path.is_file():
        raise CleanloopError(f"{path}: {what} not found; {hint}")
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except Exception as e:
        raise CleanloopError(f"{path}: cannot read {what} ({type(e).__name__}: {e})") from e


def out_path(cfg: DictConfig, *parts: str) -> Path:
    return Path(cfg.paths.out_dir).joinpath(*parts)


def step_cache(cfg: DictConfig) -> StepCache:
    return StepCache(Path(cfg.paths.cache_dir) / "steps")


def entry_key(cfg: DictConfig, step: str, step_parts, m: Manifest | None = None) -> tuple[str, dict]:
    """The cache key of ``step`` and its lineage record: the step's own parts (a dict, or a key built
    elsewhere) plus :func:`cleanloop.lineage.inputs`: the versions, and for steps that read images the
    input manifest's image fingerprint (``m``, loaded here when not given)."""
    from cleanloop import lineage

    images = lineage.reads_images(step)
    if images and m is None:
        m = load_input(cfg)
    return lineage.key(step, {"step": step_parts, **lineage.inputs(cfg, m, with_images=images)},
                       manifest=m.source if m is not None else None)


def find_entry(cfg: DictConfig, step: str, step_parts, m: Manifest | None = None):
    """The finished cache entry of ``step`` for these parts (as :func:`cached` keys it), or None."""
    key, _ = entry_key(cfg, step, step_parts, m)
    return step_cache(cfg).find(step, key)


def cached(cfg: DictConfig, step: str, key: str, build: Callable[[Path], dict], *, publish_to: Path,
           names: list[str], m: Manifest | None = None, lineage: dict | None = None) -> dict:
    """Build a step's outputs into its cache entry, or reuse the entry; then publish them to ``publish_to``.

    ``key``: the step's own key, to which the common parts are added (:func:`entry_key`); or, with
    ``lineage`` (from :func:`entry_key`), the entry key itself. ``build(entry_dir)`` writes the
    outputs and returns what to remember (the MLflow run id, headline figures); the returned dict
    adds ``key``, ``reused`` and ``dir``. The key's parts go to the entry and the run
    (``lineage.json``); a reused entry whose run is not in this MLflow store (experiment) is
    logged there as a new short run (:func:`cleanloop.runstore.ensure_run`), whose id is returned.
    """
    from cleanloop.lineage import LINEAGE_FILE, explain
    from cleanloop.runstore import ensure_run, run_record

    if lineage is None:
        key, lineage = entry_key(cfg, step, key, m)
    cache = step_cache(cfg)
    reuse = bool(cfg.paths.get("reuse_steps", True))
    with cache.claim(step, key) as entry:
        if entry.done and reuse:
            info = entry.info
            log.info("%s: reused cached outputs (key %s, from run %s) -> %s", step, key, info.get("run_id"), publish_to)
            info = ensure_run(cfg, entry, info)
            reused = True
        else:
            log.info("%s: %s", step, explain(cache.root / step, lineage, done=DONE, forced=not reuse))

            def build_and_record(out_dir: Path) -> dict:
                built = build(out_dir)
                write_json(out_dir / LINEAGE_FILE, lineage)
                return {**built, "lineage": lineage, **run_record(cfg, built.get("run_id"), out_dir, lineage)}

            info = cache.rebuild(entry, build_and_record)
            reused = False
        publish(entry.dir, publish_to, names)
    info = {k: v for k, v in info.items() if k not in ("run", "runs")}
    return {**info, "key": key, "reused": reused, "dir": str(entry.dir)}


# Steps that read the input manifest, and whether they make folds (oof.n_folds train rows per class,
# and a `group` column that is filled in everywhere or nowhere unless data.missing_group=own).
_READS_MANIFEST = {"cache": False, "audit": False, "oof": True, "cycle": True, "flag": False, "prune": False, "review": False, "train": False}


def preflight(step: str, cfg: DictConfig) -> None:
    """Check the input manifest and its images before the step's module (torch, Lightning, MLflow:
    ten seconds and more of imports) loads, so bad input fails in about two seconds. The step checks
    again with everything loaded; the image scan is cached, so the second check costs little."""
    if step not in _READS_MANIFEST:
        return
    folds = _READS_MANIFEST[step] and cfg.get("oof") is not None and cfg.oof.get("method") != "insample"
    load_input(cfg, min_train_per_class=int(cfg.oof.n_folds) if folds else None, groups=folds)

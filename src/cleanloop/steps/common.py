"""What several steps share: the input manifest, the output folder, and the step cache."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from cleanloop.cache import StepCache, publish
from cleanloop.demo import ensure_demo
from cleanloop.errors import CleanloopError
from cleanloop.manifest import Manifest, load_manifest

log = logging.getLogger(__name__)


def input_manifest_path(cfg: DictConfig) -> Path:
    """The manifest the user gave (``data.manifest``); the demo is built on first use."""
    if cfg.data.get("demo") is not None:
        return ensure_demo(cfg.data)
    return Path(cfg.data.manifest)


def load_input(cfg: DictConfig, path: str | Path | None = None, *, min_train_per_class: int | None = None,
               min_train_hint: str = "oof.n_folds") -> Manifest:
    """The input manifest, or a derived one (``path``, e.g. the cleaned manifest).

    A derived manifest keeps the input's relative paths, so they resolve where the input's do:
    ``data.image_root`` or the input manifest's folder.
    """
    source = input_manifest_path(cfg)
    image_root = cfg.data.get("image_root") or source.parent
    classes = list(cfg.data.classes) if cfg.data.get("classes") else None
    return load_manifest(Path(path) if path is not None else source, image_root=image_root, classes=classes,
                         min_train_per_class=min_train_per_class, min_train_hint=min_train_hint)


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


def cached(cfg: DictConfig, step: str, key: str, build: Callable[[Path], dict], *, publish_to: Path,
           names: list[str]) -> dict:
    """Build a step's outputs into its cache entry, or reuse the entry; then publish them to ``publish_to``.

    ``build(entry_dir)`` writes the outputs and returns what to remember (the MLflow run id,
    headline figures); the returned dict adds ``key``, ``reused`` and ``dir``.
    """
    cache = step_cache(cfg)
    with cache.claim(step, key) as entry:
        if entry.done and cfg.paths.get("reuse_steps", True):
            info = entry.info
            log.info("%s: reused cached outputs (key %s, from run %s) -> %s", step, key, info.get("run_id"), publish_to)
            reused = True
        else:
            info = build(entry.dir)
            entry.commit(**info)
            reused = False
        publish(entry.dir, publish_to, names)
    return {**info, "key": key, "reused": reused, "dir": str(entry.dir)}

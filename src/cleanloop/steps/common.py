"""What several steps share: locating the input manifest and the step's output folder."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from cleanloop.demo import ensure_demo
from cleanloop.manifest import Manifest, load_manifest


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


def out_path(cfg: DictConfig, *parts: str) -> Path:
    return Path(cfg.paths.out_dir).joinpath(*parts)

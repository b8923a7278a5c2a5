"""Where the config tree lives, and the OmegaConf resolvers it uses (``cl.abspath``, ``cl.out_dir``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


def conf_dir() -> Path:
    """The repository's ``conf/`` in a checkout (editable install), else the copy in the wheel."""
    repo_conf = Path(__file__).resolve().parents[2] / "conf"
    if (repo_conf / "config.yaml").is_file():
        return repo_conf
    return Path(__file__).resolve().parent / "conf"


def _out_dir(default: str) -> str:
    # In a multirun each job writes to its own sweep folder (CONTRACT §3); otherwise the default.
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ValueError, ImportError):
        return default
    if hc.mode == RunMode.MULTIRUN:
        return str(hc.runtime.output_dir)
    return default


def register_resolvers() -> None:
    """Idempotently register cleanloop's resolvers (Hydra apps and tests both call this)."""
    if not OmegaConf.has_resolver("cl.abspath"):
        OmegaConf.register_new_resolver("cl.abspath", lambda p: str(Path(p).expanduser().resolve()))
    if not OmegaConf.has_resolver("cl.out_dir"):
        OmegaConf.register_new_resolver("cl.out_dir", _out_dir)


def to_container(cfg: DictConfig | dict) -> Any:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def short_hash(obj: Any, n: int = 12) -> str:
    """A stable hash of a JSON-able object (sorted keys), e.g. the resolved recipe."""
    payload = json.dumps(to_container(obj), sort_keys=True, default=str).encode()
    return hashlib.sha256(payload).hexdigest()[:n]


def file_hash(path: str | Path, n: int = 12) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


def recipe_hash(cfg: DictConfig, *, with_seed: bool = False) -> str:
    """What makes two trainings the same recipe: model, recipe and numeric precision.

    The seed is not part of the recipe (``cleanloop.seed`` is its own tag) so runs of several
    seeds pair up by seed under one recipe; ``with_seed`` includes it, for caching.
    """
    recipe = OmegaConf.to_container(cfg.recipe, resolve=True)
    if not with_seed:
        recipe.pop("seed", None)
    model = OmegaConf.to_container(cfg.model, resolve=True)
    model.pop("compare_seeds", None)  # how many seed pairs compare pools, not how one model trains
    return short_hash({"model": model, "recipe": recipe, "precision": cfg.trainer.precision})

"""``cleanloop demo-data``: (re)build the embedded demo dataset of CONTRACT §5 under data/demo/."""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from cleanloop.demo import ensure_demo
from cleanloop.errors import CleanloopError

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> None:
    if cfg.data.get("demo") is None:
        raise CleanloopError("demo-data: data=demo is not selected (data.demo is missing); run `cleanloop demo-data data=demo`")
    path = ensure_demo(cfg.data, force=True)
    log.info("wrote %s and %s", path, path.parent / "ground_truth.csv")

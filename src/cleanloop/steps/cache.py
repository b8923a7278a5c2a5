"""``cleanloop cache``: decode, pad and resize every manifest image once into the on-disk image cache.

The training and prediction steps then read pixels from the cache with no decode per epoch
(``data.cache=true``; they also fill it on first use). Rows of the cleaned manifest are rows of
the input, so one build serves the baseline, the folds and the cleaned retrain.
"""

from __future__ import annotations

import logging
import time

from omegaconf import DictConfig

from cleanloop.imagecache import cache_from_config
from cleanloop.steps.common import load_input

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    m = load_input(cfg)
    cache = cache_from_config(cfg)
    t0 = time.time()
    reader = cache.ensure(m.df["abs_path"].tolist())
    seconds = time.time() - t0
    stored = sum(f.stat().st_size for f in cache.dir.rglob("*") if f.is_file())
    log.info("cache: %d images at %d px (%s) ready in %.1fs; %.2f GB in %s; train with data.cache=true",
             len(reader), cache.size, reader.fmt, seconds, stored / 1e9, cache.dir)
    return {"images": len(reader), "format": reader.fmt, "seconds": seconds, "bytes": stored, "dir": str(cache.dir)}

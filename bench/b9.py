"""B9: one demo training (fit + test prediction) under the CPU speed options of ``model=cnn``.

Variants: the default (``model.channels_last=true``; AdamW's multi-tensor ``foreach`` path, which
cleanloop asks for on CPU when the recipe leaves it unset), each option off, and both off. The
variants are interleaved and each repeat of a variant is a fresh process (imports, first-call
warm-up) that trains the demo's baseline ``--fits`` times; the first fit is a warm-up, the others
are timed. Prints one JSON line last.

    python bench/b8.py [--repeats 2] [--fits 3]
    python bench/b8.py --one "model.channels_last=false"   # one process, one variant (internal)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VARIANTS = {
    "default (channels_last, foreach)": [],
    "channels_last off": ["model.channels_last=false"],
    "foreach off": ["+recipe.optimizer.foreach=false"],
    "both off": ["model.channels_last=false", "+recipe.optimizer.foreach=false"],
}


def one(overrides: list[str], fits: int) -> dict:
    """Train the demo baseline ``fits`` times in this process; seconds per fit."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import logging

    from hydra import compose, initialize_config_dir

    from cleanloop.config import conf_dir, register_resolvers
    from cleanloop.steps.common import load_input
    from cleanloop.training import fit_predict

    logging.getLogger("lightning").setLevel(logging.ERROR)
    register_resolvers()
    with tempfile.TemporaryDirectory(prefix="cleanloop-b8-") as tmp:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose("config", overrides=[f"paths.root_dir={tmp}", *overrides])
        m = load_input(cfg)  # builds the demo under tmp
        walls, top1 = [], None
        for _ in range(fits):
            t0 = time.perf_counter()
            _, preds = fit_predict(cfg, m.classes, m.train, predict_frames={"test": m.split("test")})
            walls.append(time.perf_counter() - t0)
            test = preds["test"]
            top1 = float((test.probs.argmax(1) == m.label_indices(m.split("test"))).mean())
    return {"walls": walls, "test_top1": top1, "n_train": int(len(m.train))}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--fits", type=int, default=3)
    p.add_argument("--one", default=None, help="internal: run one variant (space-separated overrides) here")
    a = p.parse_args(argv)
    if a.one is not None:
        out = one(a.one.split(), a.fits)
        print(json.dumps(out))
        return out
    rows = {name: {"walls": [], "test_top1": None} for name in VARIANTS}
    for _ in range(a.repeats):
        for name, overrides in VARIANTS.items():  # interleaved: load from other work hits every variant alike
            proc = subprocess.run([sys.executable, __file__, "--fits", str(a.fits), "--one", " ".join(overrides)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"b8 {name} failed:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            rows[name]["walls"] += r["walls"][1:]  # the first fit of a process is its warm-up
            rows[name]["test_top1"], rows[name]["n_train"] = r["test_top1"], r["n_train"]
            print(f"  {name}: {' '.join(f'{w:.2f}' for w in r['walls'])} s", flush=True)
    for r in rows.values():
        r["min_s"], r["median_s"] = min(r["walls"]), statistics.median(r["walls"])
    out = {"repeats": a.repeats, "fits": a.fits, "rows": rows}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()

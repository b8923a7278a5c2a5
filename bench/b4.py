"""B4: ``oof=embed`` against ``oof=kfold`` on the demo: the OOF step's wall time and its flags' quality.

One process: compose the project's config for a temporary root, build the demo and the MLflow
store once (warm-up), then per repeat run ``steps.oof.run`` for kfold and for embed (each with a
fresh step cache, so nothing is reused), timing only that call, and ``steps.flag.run`` on each
result for precision / recall against the demo's ground truth (flagged = label issue or outlier).
Prints one JSON line last.

    python bench/b4.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args(argv)

    import logging
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # as the CLI does
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    from hydra import compose, initialize_config_dir

    from cleanloop.config import conf_dir, register_resolvers
    from cleanloop.steps import flag, oof
    from cleanloop.steps.common import load_input
    from cleanloop.tracking import setup

    logging.basicConfig(level=logging.WARNING)
    register_resolvers()
    runs: dict[str, list[dict]] = {"kfold": [], "embed": []}
    with tempfile.TemporaryDirectory(prefix="cleanloop-b4-") as tmp:
        def cfg(method: str, i: int):
            with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
                return compose("config", overrides=[f"paths.root_dir={tmp}", f"oof={method}", "model=tiny",
                                                     f"paths.cache_dir={tmp}/cache-{method}-{i}",
                                                     f"paths.out_dir={tmp}/out-{method}-{i}"])
        warm = cfg("kfold", -1)
        load_input(warm)  # builds the demo
        setup(warm.tracking)  # creates the MLflow store
        for i in range(a.repeats):
            for method in ("kfold", "embed"):
                c = cfg(method, i)
                t0 = time.perf_counter()
                info = oof.run(c)
                seconds = time.perf_counter() - t0
                gt = flag.run(c)["ground_truth"]
                runs[method].append({"oof_s": seconds, "oof_top1": info["top1"], "precision": gt["precision"],
                                     "recall": gt["recall"], "garbage_found": gt["garbage_found"],
                                     "n_garbage": gt["n_garbage"]})
                print(method, json.dumps(runs[method][-1]), flush=True)
    out = {}
    for method, rs in runs.items():
        s = [r["oof_s"] for r in rs]
        out[method] = {**rs[-1], "oof_s": (min(s), statistics.median(s)), "repeats": len(rs)}
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()

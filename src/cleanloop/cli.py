"""``cleanloop <step> [hydra overrides]``: every step is a Hydra app over conf/ (version_base 1.3)."""

from __future__ import annotations

import atexit
import gc
import importlib
import logging
import os
import sys

STEPS = {
    "demo-data": "cleanloop.steps.demo_data",
    "cache": "cleanloop.steps.cache",
    "audit": "cleanloop.steps.audit",
    "oof": "cleanloop.steps.oof",
    "flag": "cleanloop.steps.flag",
    "prune": "cleanloop.steps.prune",
    "review": "cleanloop.steps.review",
    "train": "cleanloop.steps.train",
    "compare": "cleanloop.steps.compare",
    "cycle": "cleanloop.steps.cycle",
}

USAGE = """usage: cleanloop <step> [hydra overrides] [-m for a multirun]
       cleanloop cache-steps list|prune [--older-than DAYS] [--max-gb GB] [--dry-run] [overrides]

steps: {steps}
examples:
  cleanloop train model=tiny trainer=cpu
  cleanloop train data=manifest data.manifest=/data/train.csv model=medsiglip trainer=gpu
  cleanloop flag -m flag.filter_by=prune_by_noise_rate,both
  cleanloop cache data=manifest data.manifest=/data/train.csv model=medsiglip   # then data.cache=true
  cleanloop train --cfg job          # print the composed config
  cleanloop cache-steps list         # the step cache's entries; prune --older-than 30 evicts
"""


def quiet_libraries() -> None:
    """Silence third-party chatter that says nothing about the user's run."""
    import warnings

    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*litlogger.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    # MLflow's first use of a SQLite store: "Creating initial MLflow database tables..." and alembic's
    # migration lines say nothing about the user's run. MLflow's logging setup resets mlflow.* levels
    # when it loads, so cleanloop.tracking sets them again after its `import mlflow` (quiet_mlflow).
    for name in ("mlflow.store.db.utils", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # transformers reads these when it loads (set here rather than by importing it: a second saved)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


# Hydra's own flags that take a value (argparse needs flags before the positional overrides).
_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                "--config-dir", "-cd", "--experimental-rerun"}
_INFO_CHOICES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}


def split_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(Hydra flags with their values, overrides), so `cleanloop flag a=1 -m b=2` parses like Hydra's own apps."""
    flags, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("-"):
            flags.append(arg)
            takes_value = arg in _VALUE_FLAGS or (arg in ("--info", "-i") and i + 1 < len(argv)
                                                   and argv[i + 1] in _INFO_CHOICES)
            if takes_value and i + 1 < len(argv):
                flags.append(argv[i + 1])
                i += 1
        else:
            overrides.append(arg)
        i += 1
    return flags, overrides


_settled = False


def settle_heap() -> None:
    """After the step's imports: the objects they made leave the garbage collector's view for good.

    :func:`main` switches the collector off while torch, Lightning, transformers and MLflow load
    (hundreds of thousands of objects, almost none of them garbage): its full passes over them cost
    seconds on a small machine, during the imports, during a cycle and again at interpreter exit.
    ``gc.freeze`` moves them to the permanent generation, which later passes skip; the collector then
    runs as usual on what the step makes. Done once per process: a multirun's later jobs collect
    normally. The cycle's wall time with it is bench/RESULTS.md B5.
    """
    global _settled
    if not _settled:
        _settled = True
        gc.freeze()
    gc.enable()


def run_step(step: str, cfg):
    """Run one step on a composed config; user-facing errors become one line and exit 1."""
    from cleanloop.errors import CleanloopError
    from cleanloop.steps.common import preflight

    try:
        preflight(step, cfg)
        if step == "cycle":  # the audit's duplicate search runs beside the imports of the steps after it
            from cleanloop.steps.audit import prefetch

            prefetch(cfg)
        module = importlib.import_module(STEPS[step])
        settle_heap()
        return module.run(cfg)
    except CleanloopError as e:
        logging.getLogger("cleanloop").debug("error", exc_info=True)
        print(f"cleanloop {step}: error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        if step == "cycle":  # a search the cycle never took (it failed first) ends with it
            from cleanloop.steps.audit import drop_prefetched

            drop_prefetched()


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE.format(steps=" | ".join(STEPS)))
        sys.exit(0 if argv else 2)
    step = argv.pop(0)
    # No collector passes over the imports' objects (settle_heap), nor over everything at exit.
    gc.disable()
    atexit.register(gc.freeze)
    try:
        _main(step, argv)
    finally:
        gc.enable()


def _main(step: str, argv: list[str]) -> None:
    if step == "cache-steps":  # housekeeping of the step cache, not a Hydra app (CONTRACT §8)
        from cleanloop.cache_admin import main as cache_steps

        sys.exit(cache_steps(argv))
    if step not in STEPS:
        print(f"cleanloop: unknown step {step!r}; choose one of {', '.join(STEPS)}", file=sys.stderr)
        sys.exit(2)

    if step not in ("demo-data", "cache"):  # steps that log to MLflow: a new SQLite store's schema,
        from cleanloop.store_template import start_background  # built beside this process's imports

        start_background()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    quiet_libraries()
    import hydra
    from omegaconf import DictConfig

    from cleanloop.config import conf_dir, register_resolvers

    register_resolvers()

    @hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
    def app(cfg: DictConfig):
        return run_step(step, cfg)

    # Hydra parses sys.argv; the step name becomes the job name (log file, run folder).
    flags, overrides = split_args(argv)
    sys.argv = [sys.argv[0], *flags, f"step={step}", f"hydra.job.name={step}", *overrides]
    app()
    # Hydra only warns when a callback raises; a multirun whose summary failed must not exit 0.
    from cleanloop.sweep import pop_errors

    errors = pop_errors()
    if errors:
        print(f"cleanloop {step}: error: {'; '.join(errors)}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()

"""Folds as one batch of the multirun's own submitit launcher, an array job on SLURM (``oof.fan_out``).

A step that runs as a job of ``-m hydra/launcher=slurm`` (or ``submitit_local``) can hand its
independent trainings to the same cluster: :func:`executor` builds a submitit executor with that
launcher's resources (partition, GPUs, time limit...), the way hydra-submitit-launcher builds its
own, and :func:`run` submits the trainings as one batch (``executor.batch()``: an array job on SLURM, a
process per training on the local executor), waits for them and hands back their
results, so the step continues where it would have after training them itself. Each array task is
a fresh process: it unpickles the training (submitit uses cloudpickle), points MLflow at the step's
store and nests its run under the step's run by id.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cleanloop.errors import CleanloopError

log = logging.getLogger(__name__)

_SUBMITIT = "hydra_plugins.hydra_submitit_launcher.submitit_launcher."


def wanted(cfg: DictConfig) -> bool:
    """``oof.fan_out``: ``auto`` = when this process is a job of a submitit launcher and not itself a fold job
    (``oof.folds``: one task of a fan-out already); true / false force."""
    value = cfg.oof.get("fan_out", "auto")
    if isinstance(value, bool):
        if value and launcher() is None:
            raise CleanloopError("oof.fan_out=true: this run is not a job of a submitit launcher; run it with "
                                 "-m hydra/launcher=slurm (or submitit_local), or set oof.fan_out=auto")
        return value
    if str(value) != "auto":
        raise CleanloopError(f"oof.fan_out={value!r}: choose auto, true or false")
    return launcher() is not None and cfg.oof.get("folds") is None


def launcher() -> DictConfig | None:
    """The launcher config of the multirun this process is a job of, when it is hydra-submitit-launcher's."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    conf = hc.get("launcher")
    if conf is None or not str(conf.get("_target_", "")).startswith(_SUBMITIT):
        return None
    from hydra.types import RunMode

    return conf if hc.mode == RunMode.MULTIRUN else None


def executor(name: str, folder: Path):
    """A submitit executor with the launcher's cluster and resources (as hydra-submitit-launcher maps them),
    its logs under ``folder``; None when this process is not a submitit launcher's job."""
    conf = launcher()
    if conf is None:
        return None
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    cluster = "slurm" if str(conf["_target_"]).endswith("SlurmLauncher") else "local"
    params = {k: v for k, v in OmegaConf.to_container(conf, resolve=True).items() if k != "_target_"}
    params.pop("submitit_folder", None)
    init = {f"{cluster}_max_num_timeout": params.pop("max_num_timeout")} if "max_num_timeout" in params else {}
    ex = submitit.AutoExecutor(folder=str(folder / "%j"), cluster=cluster, **init)
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    ex.update_parameters(**{k if k in base else f"{cluster}_{k}": v for k, v in params.items()})
    ex.update_parameters(name=name)
    return ex


def run(units: Sequence[tuple[str, Callable[[], Any]]], ex) -> dict[str, Any]:
    """Submit each ``(name, fn)`` as a task of one batch of ``ex``; wait; ``{name: fn's result}``.

    A task that fails cancels the others and is one line naming it, its job id and its log.
    """
    with ex.batch():
        jobs = [ex.submit(fn) for _, fn in units]
    log.info("submitted %d task(s): job(s) %s", len(jobs), ", ".join(str(j.job_id) for j in jobs))
    results = {}
    try:
        for (name, _), job in zip(units, jobs, strict=True):
            try:
                results[name] = job.result()
            except Exception as e:  # noqa: BLE001 - submitit's errors carry the task's traceback as text
                raised = [m.group(0).strip() for m in re.finditer(r"(?m)^[A-Za-z_][\w.]*(Error|Exception)\b[^\n]*", str(e))]
                why = raised[-1] if raised else type(e).__name__
                raise CleanloopError(f"{name}: its job {job.job_id} failed ({why}); log: {job.paths.stderr}") from None
    finally:
        for job in jobs:
            if not job.done():
                job.cancel(check=False)
    return results

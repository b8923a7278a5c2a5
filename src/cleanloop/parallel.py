"""Independent trainings at once on CPU: ``trainer.jobs`` forked worker processes, a few threads each.

A small model gains little from a second CPU thread, and a training step spends much of its time
outside the kernels (Python, Lightning, logging), which a second process overlaps. So where a step
has trainings that do not depend on each other (the OOF folds; a cycle's baseline and cleaned runs
of every seed), it runs them in ``trainer.jobs`` child processes forked from the step's own process,
which already has torch, Lightning and transformers loaded (a fork costs milliseconds, a fresh
interpreter ten seconds of imports). bench/RESULTS.md B5 has the demo cycle's time with
``trainer.jobs=auto`` and with ``trainer.jobs=1``.

What a training computes depends on its thread count (a convolution's gradient is summed in
another order), so the count comes from the config alone and never from the scheduling: with
``trainer.jobs`` above 1 every training of the process, in a worker or not, uses
``cores // jobs`` threads (:func:`apply_threads`). The same config and seed give the same numbers
whether its trainings ran side by side or one after another.

Each child writes what the parent would have written (its cache entry, its MLflow run, nested under
the parent's active run) and hands back its result, pickled, through a pipe. A child that fails
stops the others and its error is raised in the parent (a :class:`CleanloopError` stays one line).
Children die with the parent (``PR_SET_PDEATHSIG``): a killed step leaves no orphan writing on.
"""

from __future__ import annotations

import ctypes
import logging
import os
import pickle
import selectors
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from omegaconf import DictConfig

from cleanloop.errors import CleanloopError

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def cpu_count() -> int:
    """CPU cores this process may run on (its affinity mask: what `taskset` or SLURM's cgroup gives it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def jobs(cfg: DictConfig) -> int:
    """``trainer.jobs`` as a count: ``auto`` = one per CPU core on ``trainer.accelerator=cpu``, else 1.

    More than one is for CPU trainings of one device each; with a GPU or DDP it is one clear line.
    """
    trainer = cfg.get("trainer") or {}
    value = trainer.get("jobs", 1)
    accelerator = str(trainer.get("accelerator", "cpu"))
    on_cpu = accelerator == "cpu" and str(trainer.get("strategy", "auto")) in ("auto", "single_device")
    if value is None or str(value) == "auto":
        return cpu_count() if on_cpu and _devices(trainer) == 1 else 1
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or str(n) != str(value).strip():
        raise CleanloopError(f"trainer.jobs={value!r}: give a whole number >= 1, or auto (one per CPU core)")
    if n > 1 and not (on_cpu and _devices(trainer) == 1):
        raise CleanloopError(f"trainer.jobs={n}: trainings run side by side only on CPU, one device each "
                             f"(trainer.accelerator={accelerator}, trainer.devices={trainer.get('devices', 1)}, "
                             f"trainer.strategy={trainer.get('strategy', 'auto')}); set trainer.jobs=1")
    return n


def _devices(trainer) -> int:
    try:
        return int(trainer.get("devices", 1))
    except (TypeError, ValueError):  # "auto", a list of ids: not one device
        return 0


def threads(cfg: DictConfig) -> int | None:
    """Threads per training when ``trainer.jobs`` > 1 (``cores // jobs``, at least 1); None: torch's own."""
    n = jobs(cfg)
    return None if n == 1 else max(1, cpu_count() // n)


def apply_threads(cfg: DictConfig) -> None:
    """Give torch this config's thread count (:func:`threads`); nothing when ``trainer.jobs`` is 1."""
    n = threads(cfg)
    if n is not None:
        import torch

        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


def run(units: Sequence[tuple[str, Callable[[], Any]]], n_jobs: int) -> dict[str, tuple[Any, float]]:
    """Run each ``(name, fn)`` in a forked child, at most ``n_jobs`` at once.

    Returns ``{name: (fn's result, seconds)}``. The first unit that fails stops the others; its
    :class:`CleanloopError` is raised again here, anything else as a RuntimeError with the child's
    traceback. An interrupt of the parent stops the children too.
    """
    pending = list(units)
    running: dict[int, _Child] = {}  # by read end of its pipe
    results: dict[str, tuple[Any, float]] = {}
    sel = selectors.DefaultSelector()
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        while pending or running:
            while pending and len(running) < n_jobs:
                name, fn = pending.pop(0)
                child = _fork(name, fn)
                running[child.fd] = child
                sel.register(child.fd, selectors.EVENT_READ)
            for key, _ in sel.select():
                child = running[key.fd]
                chunk = os.read(key.fd, 1 << 20)
                if chunk:
                    child.data.extend(chunk)
                    continue
                sel.unregister(key.fd)
                os.close(key.fd)
                del running[key.fd]
                results[child.name] = child.finish()
    finally:
        for child in running.values():  # an error above, or an interrupt: no child goes on alone
            child.stop()
        sel.close()
    return {name: results[name] for name, _ in units}


def submit(name: str, fn: Callable[[], Any]) -> _Child:
    """Start ``fn`` in a forked child now; ``.result()`` waits for it and returns what it returned
    (or raises as :func:`run` does). Fork before torch loads (``cycle`` does, for the audit's search):
    the child then never shares a thread pool with the parent."""
    sys.stdout.flush()
    sys.stderr.flush()
    return _fork(name, fn)


class _Child:
    def __init__(self, name: str, pid: int, fd: int):
        self.name, self.pid, self.fd = name, pid, fd
        self.data = bytearray()

    def result(self) -> Any:
        """Read the child's result to its end, then as :meth:`finish` (without the seconds)."""
        while chunk := os.read(self.fd, 1 << 20):
            self.data.extend(chunk)
        os.close(self.fd)
        return self.finish()[0]

    def finish(self) -> tuple[Any, float]:
        _, status = os.waitpid(self.pid, 0)
        try:
            kind, value, seconds = pickle.loads(bytes(self.data))
        except Exception:  # noqa: BLE001 - nothing (or half) was written: the child died
            how = (f"killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
                   else f"exit status {os.WEXITSTATUS(status)}")
            raise CleanloopError(f"{self.name}: its worker process ended without a result ({how})") from None
        if kind == "ok":
            return value, seconds
        if kind == "user":
            raise CleanloopError(value)
        raise RuntimeError(f"{self.name} failed in its worker process:\n{value}")

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM (the child cleans up as after Ctrl-C: no half-built entry stays, its runs end KILLED),
        and SIGKILL after ``grace_s``."""
        try:
            os.kill(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while os.waitpid(self.pid, os.WNOHANG) == (0, 0):
                if time.monotonic() > deadline:
                    os.kill(self.pid, signal.SIGKILL)
                    os.waitpid(self.pid, 0)
                    break
                time.sleep(0.02)
        except (ProcessLookupError, ChildProcessError):
            pass
        try:
            os.close(self.fd)
        except OSError:
            pass


def _fork(name: str, fn: Callable[[], Any]) -> _Child:
    parent = os.getpid()
    run_id = None
    if "mlflow" in sys.modules:
        import mlflow

        active = mlflow.active_run()
        run_id = active.info.run_id if active is not None else None
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        return _Child(name, pid, r)
    # the child: never returns into the parent's code (os._exit), so no atexit handler of the
    # parent's (MLflow ends its active run at exit) runs here
    code = 1
    try:
        os.close(r)
        _become_worker(parent, run_id)
        t0 = time.perf_counter()
        payload = ("ok", fn(), round(time.perf_counter() - t0, 1))
        code = 0
    except CleanloopError as e:
        payload = ("user", str(e), 0.0)
    except BaseException as e:  # noqa: BLE001 - handed to the parent, which raises it
        payload = ("bug", "".join(traceback.format_exception(e)), 0.0)
    try:
        data = pickle.dumps(payload)
        view = memoryview(data)
        while view:
            view = view[os.write(w, view):]
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            logging.shutdown()
        finally:
            os._exit(code)


def _become_worker(parent: int, run_id: str | None) -> None:
    """A fresh child's setup: dies with its parent, opens its own database connections, and has the
    parent's active MLflow run (``run_id``) as its own, so the runs it starts nest under it as they
    would in the parent. (MLflow forgets the active run in a forked child.)"""
    signal.signal(signal.SIGINT, _interrupted)  # Ctrl-C reaches the whole process group
    signal.signal(signal.SIGTERM, _interrupted)  # the parent stopping it, or the parent's death (below)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (AttributeError, OSError):  # not Linux: the parent's finally still stops its children
        pass
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)
    _fresh_mlflow_connections()
    if run_id is not None:  # resumed, never ended here: the parent ends it (the child leaves by os._exit)
        import mlflow

        mlflow.start_run(run_id=run_id)


def _interrupted(signum, frame) -> None:
    """In a worker: the first SIGINT or SIGTERM unwinds like Ctrl-C (finally blocks remove half-built
    cache entries, MLflow marks the run KILLED); later ones are ignored while it does."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def _fresh_mlflow_connections() -> None:
    """Forget the connections the parent's MLflow store opened (a SQLite or PostgreSQL connection must not
    be shared across a fork): SQLAlchemy's ``Engine.dispose(close=False)``, its documented way for a
    forked child, leaves the parent's open and makes this process open its own."""
    if "mlflow" not in sys.modules:
        return
    import mlflow

    if not mlflow.is_tracking_uri_set():  # no store chosen: nothing opened (and none to create here, e.g.
        return  # MLflow's default ./mlflow.db)
    try:
        store = mlflow.MlflowClient()._tracking_client.store  # the parent's, cached by URI
    except Exception:  # noqa: BLE001 - a store that cannot be built here fails where it is used
        return
    engine = getattr(store, "engine", None)  # a SQL store; an HTTP server's client has none
    if engine is not None:
        engine.dispose(close=False)

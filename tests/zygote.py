"""A Python with cleanloop's libraries already imported that forks one child per CLI run (tests only).

Each `cleanloop` subprocess spends about 12 s importing torch, Lightning, transformers, MLflow and
scikit-learn before it does anything (bench/RESULTS.md B5), and the suite runs dozens of them. A
zygote imports them once; each run is a fork of it that sets the run's working directory,
environment and arguments, sends its stdout and stderr to files, and calls the same entry point
as the `cleanloop` console script (:func:`cleanloop.cli.main`). The zygote itself never runs torch
or opens a store, so the children start from the state a fresh interpreter has after its imports.

Protocol, over a Unix socket, one connection per run: the client sends one JSON line
``{"args", "cwd", "env", "stdout", "stderr"}``; a monitor process forked for the run answers
``{"pid": <the run's pid>}`` and, once the run ends, ``{"returncode": <code, or -signal>}``.
Tests that need a real process start (killed runs, the console script itself) use
``subprocess`` directly.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import sys
import traceback

PRELOAD = ("numpy", "pandas", "PIL.Image", "torch", "lightning", "transformers", "mlflow",
           "sklearn.metrics", "cleanlab.filter", "hydra", "cleanloop.cli", "cleanloop.steps.cycle",
           "cleanloop.steps.cache", "cleanloop.steps.demo_data", "cleanloop.audit", "cleanloop.cache_admin")


def _run(request: dict) -> int:
    """In the forked child: become the requested `cleanloop` run; return its exit code."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():  # read by torch when it loaded, in the zygote
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from cleanloop import cli

    sys.argv = ["cleanloop", *request["args"]]
    try:
        cli.main(list(request["args"]))
        return 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return int(e.code or 0)
        print(e.code, file=sys.stderr)
        return 1
    except BaseException:  # noqa: BLE001 - an uncaught error, as the interpreter would report it
        traceback.print_exc()
        return 1


def _monitor(conn: socket.socket, request: dict) -> None:
    """In the monitor process: fork the run, report its pid, wait, report its exit status."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    pid = os.fork()
    if pid == 0:
        conn.close()
        code = 1
        try:
            code = _run(request)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    conn.sendall((json.dumps({"pid": pid}) + "\n").encode())
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    conn.sendall((json.dumps({"returncode": code}) + "\n").encode())


def serve(path: str) -> None:
    for name in PRELOAD:
        importlib.import_module(name)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # monitors are reaped by the kernel
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(16)
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        request = json.loads(conn.makefile("r").readline())
        if request.get("stop"):
            conn.close()
            return
        if os.fork() == 0:
            server.close()
            try:
                _monitor(conn, request)
            finally:
                os._exit(0)
        conn.close()


if __name__ == "__main__":
    serve(sys.argv[1])

"""Shared fixtures: composed configs (lightning-hydra-template style), the demo data, tiny manifests."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from cleanloop.config import conf_dir, register_resolvers
from cleanloop.demo import build_demo

register_resolvers()
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub
REPO = Path(__file__).resolve().parents[1]


def make_cfg(root: Path, *overrides: str):
    """Compose conf/config.yaml with every path (outputs, MLflow store, caches) under ``root``."""
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(
            "config",
            overrides=[f"paths.root_dir={root}", "tracking.experiment=test", *overrides],
        )


@pytest.fixture(scope="session", autouse=True)
def user_cache(tmp_path_factory) -> Path:
    """The user-level cache (``$XDG_CACHE_HOME``: the empty MLflow store template) of this test session.

    One folder for all test processes (the parent of each xdist worker's base temp), so the
    template is migrated once per session, not once per store; never the developer's own ~/.cache.
    """
    shared = shared_temp(tmp_path_factory) / "xdg-cache"
    shared.mkdir(parents=True, exist_ok=True)
    os.environ["XDG_CACHE_HOME"] = str(shared)
    return shared


@pytest.fixture
def cfg_factory(tmp_path):
    return lambda *overrides: make_cfg(tmp_path, *overrides)


def shared_temp(tmp_path_factory) -> Path:
    """A folder all test processes of this session share: the parent of each xdist worker's base temp."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """The demo dataset, built once per test session for all test processes (read-only for tests):
    the same image paths everywhere, so a step cache shared by processes can reuse entries."""
    from cleanloop import locks

    shared = shared_temp(tmp_path_factory)
    out = shared / "demo" / "demo"
    with open(shared / "demo.lock", "a+") as f:
        locks.lock(f)
        if not (out / "manifest.csv").is_file():  # build_demo renames a whole folder into place
            build_demo(out)
    return out


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def demo_cycle(tmp_path_factory, demo_dir):
    """`cleanloop cycle` on the demo, run once per test process by the real CLI: (root, result, UI port).

    Its links point at a UI port chosen here (`tracking.ui_url`), where the browser test starts a real
    MLflow server. Tests that use it carry ``@pytest.mark.xdist_group("demo_cycle")`` so that
    pytest-xdist (`--dist loadgroup`) runs them in one process and the demo cycle runs once.
    """
    root = tmp_path_factory.mktemp("demo_cycle")
    port = free_port()
    args = ["cycle", f"data.manifest={demo_dir}/manifest.csv", f"paths.root_dir={root}",
            f"tracking.ui_url=http://127.0.0.1:{port}"]
    return root, run_cli(*args, cwd=root, timeout=900), port


def artifacts_dir(name: str) -> Path:
    """Where tests leave files for people to look at (screenshots): $CLEANLOOP_TEST_ARTIFACTS, else
    test-artifacts/ in the checkout (CI keeps it)."""
    out = Path(os.environ.get("CLEANLOOP_TEST_ARTIFACTS") or REPO / "test-artifacts") / name
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_png(path: Path, value: int, size: int = 16, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    arr = (rng.integers(0, 40, (size, size, 3)) + value).clip(0, 255).astype(np.uint8)
    Image.fromarray(arr).convert(mode).save(path)


def tiny_rows(data: Path) -> pd.DataFrame:
    """Three classes of flat-coloured 16 px PNGs (dark / mid / bright) under ``data/img``, 6 train +
    2 test each, with groups, as a manifest DataFrame."""
    rows = []
    for c, value in (("dark", 20), ("mid", 110), ("bright", 200)):
        for i in range(8):
            uuid = f"{c}-{i}"
            write_png(data / "img" / f"{uuid}.png", value + i)
            rows.append({"image_uuid": uuid, "path": f"img/{uuid}.png", "label": c,
                         "split": "test" if i >= 6 else "train", "group": f"{c}-g{i // 2}"})
    return pd.DataFrame(rows)


@pytest.fixture
def tiny_manifest(tmp_path) -> Path:
    """:func:`tiny_rows` written as ``manifest.csv``."""
    path = tmp_path / "manifest.csv"
    tiny_rows(tmp_path).to_csv(path, index=False)
    return path


class _Zygote:
    """This test process's zygote (tests/zygote.py): started on first use, stopped at exit."""

    proc: subprocess.Popen | None = None
    path = ""

    @classmethod
    def socket_path(cls) -> str:
        if cls.proc is None or cls.proc.poll() is not None:
            folder = tempfile.mkdtemp(prefix="cleanloop-zygote-")
            cls.path = os.path.join(folder, "socket")
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(
                [str(REPO / "tests"), *filter(None, [os.environ.get("PYTHONPATH")])])}
            cls.proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "zygote.py"), cls.path], env=env,
                                        stdout=subprocess.PIPE, text=True)
            if cls.proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"tests/zygote.py did not start (exit {cls.proc.wait()})")
            atexit.register(cls.proc.kill)
            atexit.register(shutil.rmtree, folder, True)
        return cls.path


class ForkedCli:
    """A `cleanloop` run in a process of its own, forked from this test process's zygote (tests/zygote.py),
    which has imported the libraries once: ~12 s less per run than starting the console script. It
    calls the console script's entry point, :func:`cleanloop.cli.main`. The methods are
    :class:`subprocess.Popen`'s that tests use; stdout (and stderr, unless ``err`` is given) go to a
    file, ``out`` or a temporary one, which :attr:`stdout` follows line by line while the run lasts.
    """

    def __init__(self, *args: str, cwd: Path, env: dict | None = None, out: Path | None = None,
                 err: Path | None = None):
        self.args = [str(Path(sys.executable).with_name("cleanloop")), *args]
        if out is None:  # removed when this test process exits
            folder = tempfile.mkdtemp(prefix="cleanloop-run-")
            atexit.register(shutil.rmtree, folder, True)
            out = Path(folder) / "stdout"
        self.out = Path(out)
        self.err = Path(err) if err else self.out
        self.returncode: int | None = None
        self._buf = b""
        self._conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._conn.connect(_Zygote.socket_path())
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        self._conn.sendall((json.dumps({"args": list(args), "cwd": str(cwd), "env": full_env,
                                        "stdout": str(self.out), "stderr": str(self.err)}) + "\n").encode())
        self.pid = self._message(None)["pid"]

    def _message(self, timeout: float | None) -> dict | None:
        """The zygote's next line; None when ``timeout`` (0: do not wait) passes first."""
        self._conn.settimeout(timeout)
        while b"\n" not in self._buf:
            try:
                chunk = self._conn.recv(4096)
            except (TimeoutError, BlockingIOError):
                return None
            if not chunk:
                raise RuntimeError(f"the zygote's monitor of {self.args} went away")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def poll(self) -> int | None:
        if self.returncode is None:
            message = self._message(0)
            if message is not None:
                self.returncode = message["returncode"]
                self._conn.close()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            message = self._message(timeout)
            if message is None:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self.returncode = message["returncode"]
            self._conn.close()
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[str, str | None]:
        self.wait(timeout)
        return self.out.read_text(), None if self.err == self.out else self.err.read_text()

    @property
    def stdout(self):
        """The lines of stdout as they are written, until the run has ended and all are read."""
        with open(self.out, "a+") as f:
            f.seek(0)
            pending = ""
            while True:
                ended = self.poll() is not None
                chunk = f.read()
                pending += chunk
                *lines, pending = pending.split("\n")
                yield from (line + "\n" for line in lines)
                if ended and not chunk:
                    if pending:
                        yield pending
                    return
                if not chunk:
                    time.sleep(0.05)


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the `cleanloop` command to its end (:class:`ForkedCli`): stdout, stderr and exit code as
    subprocess.run's. CLEANLOOP_TEST_FORK=0 starts the console script itself instead."""
    exe = Path(sys.executable).with_name("cleanloop")
    if os.environ.get("CLEANLOOP_TEST_FORK", "1") == "0":
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        return subprocess.run([str(exe), *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                              timeout=timeout)
    with tempfile.TemporaryDirectory(prefix="cleanloop-run-") as folder:
        out, err = Path(folder) / "stdout", Path(folder) / "stderr"
        proc = ForkedCli(*args, cwd=cwd, env=env, out=out, err=err)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise subprocess.TimeoutExpired(proc.args, timeout, out.read_text(), err.read_text()) from None
        return subprocess.CompletedProcess(proc.args, code, out.read_text(), err.read_text())


def fail_nth_fit(monkeypatch, module, n: int, error: BaseException) -> list:
    """Patch ``module.fit_predict`` so that its ``n``-th call raises ``error`` (as a CUDA error or a kill
    would, mid-build) and the others train; returns the list that counts the calls. The calls happen
    in this process only: give the step trainer.jobs=1 (forked workers count in copies of the list)."""
    real, calls = module.fit_predict, []

    def patched(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "fit_predict", patched)
    return calls


def run_main(capsys, *args: str) -> tuple[int, str]:
    """The real CLI entry point, in-process: (exit code, stderr)."""
    from cleanloop import cli

    try:
        cli.main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err

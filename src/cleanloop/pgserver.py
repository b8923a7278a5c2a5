"""A team MLflow server backed by PostgreSQL: ``make server`` (``python -m cleanloop.pgserver``).

MLflow's SQLite store serialises every write behind one file lock; PostgreSQL takes concurrent
writers (row locks, one connection per request), which is what a joblib sweep or a SLURM array
of cleanloop jobs logging to one server needs. This module runs both halves with Debian's
``postgresql`` package and nothing else:

- :class:`PgCluster`: a PostgreSQL cluster in a folder of its own (``initdb`` once, then
  ``pg_ctl start``/``stop``), listening on 127.0.0.1 only, with trust authentication for the
  role ``mlflow`` (so it must never listen beyond loopback: the MLflow server in front of it is
  what the team reaches). Running as root (CI, containers), PostgreSQL refuses to start, so the
  cluster's processes run as the ``postgres`` user (made by Debian's package), else ``nobody``.
- :func:`team_server`: starts the cluster, creates the database ``mlflow`` on first use and runs
  ``mlflow server --backend-store-uri postgresql+psycopg2://mlflow@127.0.0.1:<pg port>/mlflow
  --artifacts-destination <dir>/artifacts``; clients then log with ``tracking.uri=http://host:port``
  and upload artifacts through the server (``mlflow-artifacts:/``), so they need no access to the
  artifact folder. On exit it stops MLflow, then PostgreSQL.

The tests start a throwaway one in a temporary folder (tests/test_pg_server.py).
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cleanloop.errors import CleanloopError

DB_ROLE = "mlflow"  # the cluster's superuser role, and the database MLflow uses
DB_NAME = "mlflow"
# MLflow 3 also starts GenAI job workers (online scoring, ...) that cleanloop never uses: off.
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def find_pg_bin() -> Path:
    """The folder holding ``initdb``/``pg_ctl``/``psql``: ``$PG_BIN``, then ``PATH``, then Debian's
    ``/usr/lib/postgresql/<version>/bin`` (newest version), which Debian does not put on ``PATH``."""
    candidates = []
    if os.environ.get("PG_BIN"):
        candidates.append(Path(os.environ["PG_BIN"]))
    if shutil.which("initdb"):
        candidates.append(Path(shutil.which("initdb")).resolve().parent)
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                    key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    candidates += [p.parent for p in reversed(debian)]
    for d in candidates:
        if all((d / exe).is_file() for exe in ("initdb", "pg_ctl", "psql")):
            return d
    raise CleanloopError("PostgreSQL is not installed (no initdb, pg_ctl and psql in $PG_BIN, on PATH or in "
                         "/usr/lib/postgresql/*/bin): apt-get install postgresql, or set PG_BIN to their folder")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _db_user() -> pwd.struct_passwd | None:
    """The OS user PostgreSQL runs as: None (the current one) unless we are root, which initdb refuses."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise CleanloopError("running as root, PostgreSQL needs an unprivileged user to run as: "
                         "neither 'postgres' nor 'nobody' exists (useradd postgres)")


def _tail(text: str, n: int = 1500) -> str:
    return " ".join(text.strip().split())[-n:]


@dataclass
class PgCluster:
    """A PostgreSQL cluster in ``root`` (``root/data`` and ``root/postgresql.log``) on 127.0.0.1:``port``.

    ``durable=False`` (a throwaway test cluster): initdb and the server skip fsync, which initdb's
    files and MLflow's schema migrations on a new database otherwise wait on for seconds; a crash
    of the machine may then corrupt the cluster.
    """

    root: Path
    port: int
    durable: bool = True
    bin_dir: Path = field(default_factory=find_pg_bin)

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        self.user = _db_user()

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_file(self) -> Path:
        return self.root / "postgresql.log"

    def url(self, db: str = DB_NAME) -> str:
        """The SQLAlchemy URL, with its driver named: a bare ``postgresql://`` means psycopg2 under
        SQLAlchemy <= 2.0 but psycopg 3 under 2.1, and the server should not change driver with an
        upgrade. psycopg2 (``psycopg2-binary``, the ``server`` extra) is the one MLflow's docs and its
        job runner's lock manager name."""
        return f"postgresql+psycopg2://{DB_ROLE}@127.0.0.1:{self.port}/{db}"

    def _run(self, *cmd: str, as_db_user: bool = True, check: bool = True) -> subprocess.CompletedProcess:
        kw = {}
        if as_db_user and self.user is not None:
            kw = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}
        # cwd: the db user may not be allowed into ours (e.g. /root)
        r = subprocess.run([str(self.bin_dir / cmd[0]), *cmd[1:]], capture_output=True, text=True,
                           cwd=self.root, env={**os.environ, "PGCONNECT_TIMEOUT": "10"}, **kw)
        if check and r.returncode != 0:
            raise CleanloopError(f"{cmd[0]} failed (exit {r.returncode}): {_tail(r.stderr + r.stdout)}"
                                 + (f"; see {self.log_file}" if cmd[0] == "pg_ctl" else ""))
        return r

    def init(self) -> None:
        """Create the cluster unless ``root/data`` already holds one (a persistent server restarts on it)."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self.user is not None:
            os.chown(self.root, self.user.pw_uid, self.user.pw_gid)
            probe = subprocess.run(["test", "-w", str(self.root)], user=self.user.pw_uid,
                                   group=self.user.pw_gid, extra_groups=[], cwd="/")
            if probe.returncode != 0:
                raise CleanloopError(
                    f"PostgreSQL runs as '{self.user.pw_name}' (not root), which cannot reach {self.root}: "
                    "put the server folder (SERVER_DIR=...) where every parent folder is open to it, e.g. /srv/mlflow")
        if (self.data_dir / "PG_VERSION").is_file():
            return
        # trust: the server listens on 127.0.0.1 only and the one client is the MLflow server beside it
        self._run("initdb", "-D", str(self.data_dir), "-U", DB_ROLE, "--auth=trust", "--no-locale",
                  "--encoding=UTF8", "--no-instructions", *([] if self.durable else ["--no-sync"]))

    def start(self) -> None:
        # TCP on loopback only; no Unix socket (none needed, and its path could be too long)
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories=''"
        if not self.durable:
            opts += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run("pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_file), "-o", opts, "-w", "-t", "60",
                  "start")

    def stop(self) -> None:
        """Fast shutdown (open sessions are rolled back); an immediate one if that fails."""
        if self._run("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "-t", "30", "stop",
                     check=False).returncode != 0:
            self._run("pg_ctl", "-D", str(self.data_dir), "-m", "immediate", "stop", check=False)

    def psql(self, sql: str, db: str = DB_NAME) -> str:
        """Run one statement as ``mlflow`` over TCP; the unaligned, tuples-only output."""
        r = self._run("psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", DB_ROLE, "-d", db, "-X", "-tAc", sql,
                      as_db_user=False)
        return r.stdout.strip()

    def ensure_db(self, db: str = DB_NAME) -> None:
        if self.psql(f"SELECT 1 FROM pg_database WHERE datname = '{db}'", db="postgres") != "1":
            self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", DB_ROLE, db, as_db_user=False)


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 180.0) -> None:
    """Wait for ``url/health`` to answer (MLflow migrates a new database first: tens of seconds)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2).close()
            return
        except (urllib.error.URLError, OSError):
            if proc.poll() is not None:
                raise CleanloopError(f"mlflow server exited with status {proc.returncode} before answering at {url}") from None
            if time.monotonic() > deadline:
                raise CleanloopError(f"mlflow server did not answer at {url} within {timeout_s:.0f} s") from None
            time.sleep(0.5)


@dataclass
class TeamServer:
    """What :func:`team_server` started: the URI for ``tracking.uri``, the cluster, the MLflow process."""

    tracking_uri: str
    cluster: PgCluster
    proc: subprocess.Popen
    artifacts: Path


@contextmanager
def team_server(server_dir: str | os.PathLike, port: int, host: str = "127.0.0.1", pg_port: int = 0,
                workers: int = 4, extra_args: Sequence[str] = (), log: str | os.PathLike | None = None,
                durable: bool = True) -> Iterator[TeamServer]:
    """PostgreSQL in ``server_dir/postgres`` and ``mlflow server`` on ``host:port`` with artifacts in
    ``server_dir/artifacts``; both stopped on exit. ``pg_port=0`` picks a free loopback port (only
    the MLflow server connects to it, so it need not be stable). ``log``: the MLflow server's output
    (None: this process's stdout/stderr). ``durable=False``: see :class:`PgCluster` (tests only)."""
    server_dir = Path(server_dir).resolve()
    cluster = PgCluster(server_dir / "postgres", pg_port or free_port(), durable=durable)
    cluster.init()
    artifacts = server_dir / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    cluster.start()
    proc = None
    out = open(log, "ab") if log else None  # closed below, after the process
    try:
        cluster.ensure_db()
        exe = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
        proc = subprocess.Popen(
            [exe, "server", "--backend-store-uri", cluster.url(), "--artifacts-destination", str(artifacts),
             "--host", host, "--port", str(port), "--workers", str(workers), *extra_args],
            env={**os.environ, **SERVER_ENV}, stdout=out, stderr=subprocess.STDOUT if out else None,
            start_new_session=True)  # its uvicorn workers go with it (killpg below)
        local = f"http://127.0.0.1:{port}" if host in ("0.0.0.0", "::", "127.0.0.1") else f"http://{host}:{port}"
        wait_healthy(local, proc)
        shown = f"http://{socket.getfqdn()}:{port}" if host in ("0.0.0.0", "::") else local
        yield TeamServer(shown, cluster, proc, artifacts)
    finally:
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if out is not None:
            out.close()
        cluster.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m cleanloop.pgserver",
        description="A team MLflow server on PostgreSQL, in the foreground; Ctrl-C stops it and PostgreSQL. "
                    "Arguments after -- go to `mlflow server` (e.g. -- --allowed-hosts mlflow.lab:5000).")
    p.add_argument("--dir", default=".cache/server", help="PostgreSQL data and the artifact root (kept between runs)")
    p.add_argument("--host", default="127.0.0.1", help="interface MLflow listens on (0.0.0.0: every one)")
    p.add_argument("--port", type=int, default=5000, help="MLflow's port")
    p.add_argument("--pg-port", type=int, default=0, help="PostgreSQL's loopback port (0: a free one)")
    p.add_argument("--workers", type=int, default=4, help="MLflow server worker processes")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    a = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)

    def stop(signum, frame):  # SIGTERM (kill, make interrupted) stops like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        with team_server(a.dir, a.port, host=a.host, pg_port=a.pg_port, workers=a.workers, extra_args=extra) as s:
            print(f"MLflow server on PostgreSQL ({s.cluster.url()}), artifacts in {s.artifacts}", flush=True)
            print(f"log every step here with:  tracking.uri={s.tracking_uri}", flush=True)
            print(f"e.g.  make cycle ARGS=\"tracking.uri={s.tracking_uri}\"   (Ctrl-C stops the server)", flush=True)
            s.proc.wait()
            print(f"mlflow server exited with status {s.proc.returncode}", file=sys.stderr)
            return 1
    except CleanloopError as e:
        print(f"cleanloop server: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopped the MLflow server and PostgreSQL", flush=True)
        return 0


if __name__ == "__main__":
    sys.exit(main())

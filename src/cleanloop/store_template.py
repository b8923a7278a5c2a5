"""An empty MLflow SQLite store, made once per MLflow version and copied where a new store is needed.

MLflow builds a new SQLite store by running its ~50 alembic migrations, which takes several
seconds (bench/RESULTS.md, B5: 4.4 s of a demo cycle) every time a store is new: a fresh clone, a
test, a scratch experiment. The schema those migrations produce depends on the MLflow version only,
so cleanloop keeps one migrated, empty store per version in the user's cache
(``$XDG_CACHE_HOME/cleanloop/mlflow-sqlite/``) and copies it into place. The template holds no
experiment: MLflow adds its ``Default`` experiment when it first opens the copy, with that
store's own artifact location, exactly as it does for a store it made itself.

The first time (no template yet) the ``cleanloop`` command starts building it in a background
process while its own imports run, and ``tracking.setup`` waits for it; elsewhere ``setup`` builds
it in place of the migrations MLflow would have run. Nothing here may fail a step: when the
template cannot be made or copied, MLflow creates the store itself, as it always did.

This module imports nothing heavy: the CLI calls :func:`start_background` before Hydra loads.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# The background build, when this process started one (tracking.setup waits for it).
_building: subprocess.Popen | None = None
# Longest wait for the background build; past it MLflow creates the store itself.
WAIT_S = 120.0


def template_path() -> Path | None:
    """Where this MLflow version's template lives; None when MLflow's version cannot be read."""
    try:
        mlflow_version = version("mlflow")
    except PackageNotFoundError:
        return None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cleanloop" / "mlflow-sqlite" / f"mlflow-{mlflow_version}.db"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI (query string dropped), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?")[0]
    return None if path in ("", ":memory:") else Path(path)


def build(target: Path) -> None:
    """Migrate an empty store at a temporary name beside ``target``, drop its Default experiment, publish it."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    os.unlink(tmp)  # MLflow creates the file itself
    try:
        store = SqlAlchemyStore(f"sqlite:///{tmp}", tempfile.gettempdir())
        store.engine.dispose()
        with sqlite3.connect(tmp) as db:
            # MLflow re-creates the Default experiment (id 0) on first open, with the right location.
            db.execute("DELETE FROM experiments WHERE experiment_id = 0")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def start_background() -> None:
    """Start building the template in a background process, when there is none yet."""
    global _building
    target = template_path()
    if target is None or target.exists() or _building is not None:
        return
    try:
        _building = subprocess.Popen(
            [sys.executable, "-m", "cleanloop.store_template", str(target)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
    except OSError:
        _building = None


def copy_into_place(uri: str) -> bool:
    """Copy the template to the database file of ``uri`` when that file does not exist yet.

    Returns True when the store now comes from the template. The copy is written beside the
    database under a temporary name and linked into place, so a store another process created
    meanwhile is never overwritten, and a reader never sees a partial file.
    """
    db = sqlite_path(uri)
    target = template_path()
    if db is None or target is None or db.exists():
        return False
    global _building
    if _building is not None:
        try:
            _building.wait(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            return False
        finally:
            _building = None if _building.poll() is not None else _building
    if not target.exists():
        try:  # in this process: the migrations cost what MLflow would have spent on this store anyway
            build(target)
        except Exception:  # noqa: BLE001 - never a reason to fail a step: MLflow creates the store itself
            return False
    db.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{db.name}.", suffix=".tmp", dir=db.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # the mode MLflow's own new file would have
        with os.fdopen(fd, "wb") as out, open(target, "rb") as src:
            out.write(src.read())
        os.link(tmp, db)  # fails if the store appeared meanwhile: theirs is kept
        return True
    except OSError:
        return False
    finally:
        os.unlink(tmp)


def _main() -> None:  # `python -m cleanloop.store_template PATH`: the background build
    target = Path(sys.argv[1])
    if not target.exists():
        build(target)


if __name__ == "__main__":
    _main()

"""A new SQLite store copied from the per-version template is the store MLflow would have made."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import mlflow
import pytest
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

from cleanloop import store_template


def _schema(db: Path) -> tuple[set, list]:
    """Tables with their columns, indexes and triggers by name, and the migration head.

    Not the CREATE statements' text: MLflow's migrations write CHECK (... IN (...)) lists in set
    order, which differs between Python processes (hash seeds) for the same schema.
    """
    with sqlite3.connect(db) as con:
        objects = set(con.execute("SELECT type, name, tbl_name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"))
        columns = {(table, tuple(con.execute(f"PRAGMA table_info('{table}')")))
                   for kind, table, _ in objects if kind == "table"}
        head = con.execute("SELECT version_num FROM alembic_version").fetchall()
    return objects | columns, head


@pytest.fixture
def own_cache(tmp_path, monkeypatch) -> Path:
    """A template folder of this test's own (not the session's shared one)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(store_template, "_building", None)
    return tmp_path / "xdg"


def test_a_copied_store_has_mlflows_schema_and_its_own_default_experiment(tmp_path, own_cache, monkeypatch):
    made = tmp_path / "made" / "mlflow.db"
    made.parent.mkdir()
    SqlAlchemyStore(f"sqlite:///{made}", str(tmp_path / "made-artifacts")).engine.dispose()

    copied = tmp_path / "copied" / "mlflow.db"
    monkeypatch.chdir(tmp_path)
    assert store_template.copy_into_place(f"sqlite:///{copied}?timeout=60")
    assert store_template.template_path().is_relative_to(own_cache)
    assert _schema(copied) == _schema(made)

    store = SqlAlchemyStore(f"sqlite:///{copied}", str(tmp_path / "copied-artifacts"))
    default = store.get_experiment("0")  # added by MLflow on first open, with this store's location
    assert default.name == "Default"
    assert default.artifact_location.startswith(str(tmp_path / "copied-artifacts"))
    assert store.create_experiment("x") == "1"  # numbering as in a store MLflow made
    store.engine.dispose()


def test_an_existing_store_is_never_replaced(tmp_path, own_cache):
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"someone else's store")
    assert not store_template.copy_into_place(f"sqlite:///{db}")
    assert db.read_bytes() == b"someone else's store"
    assert not (own_cache / "cleanloop").exists()  # nothing built for a store that exists
    assert not store_template.copy_into_place("http://127.0.0.1:5000")
    assert not store_template.copy_into_place("sqlite:///:memory:")


def test_setup_works_when_no_template_can_be_written(tmp_path, monkeypatch, cfg_factory):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    monkeypatch.setattr(store_template, "_building", None)
    from cleanloop.tracking import setup

    cfg = cfg_factory()
    exp_id = setup(cfg.tracking)
    assert mlflow.get_experiment(exp_id).name == "test"
    assert not list(tmp_path.glob("**/.mlflow.db.*.tmp"))  # no temporary left behind


def test_the_background_build_publishes_a_whole_template(tmp_path, own_cache):
    store_template.start_background()
    building = store_template._building
    assert building is not None
    db = tmp_path / "store" / "mlflow.db"
    assert store_template.copy_into_place(f"sqlite:///{db}")  # waits for the build
    assert building.returncode == 0
    template = store_template.template_path()
    with sqlite3.connect(template) as con:
        assert con.execute("SELECT count(*) FROM experiments").fetchone() == (0,)
    assert [p.name for p in template.parent.iterdir()] == [template.name]  # no temporary left

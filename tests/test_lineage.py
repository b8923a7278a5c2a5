"""Issue 13 items 1-3: keys that mean what they say, reuse across MLflow stores, forced rebuilds that
recompute everything and publish whole entries."""

from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cleanloop import lineage
from cleanloop.cache import DONE
from cleanloop.lineage import LINEAGE_FILE

from conftest import ForkedCli, fail_nth_fit, make_cfg, run_cli, tiny_rows

FAST = ["model=tiny", "model.image_size=16", "model.config.image_size=16", "recipe.epochs=1", "oof.n_folds=2",
        "compare.seeds=1", "review.screenshot=false", "data.num_workers=0"]


def stored_png(path: Path, value: int) -> None:
    """A 16 px PNG stored without compression: other pixels, same file size."""
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 255, (16, 16, 3)).astype(np.uint8)).save(path, compress_level=0)


@pytest.fixture
def manifest(tmp_path) -> Path:
    """tiny_rows, its images re-saved uncompressed (so one can change bytes at the same size)."""
    rows = tiny_rows(tmp_path)
    for p in rows["path"]:
        img = np.asarray(Image.open(tmp_path / p).convert("RGB"))
        Image.fromarray(img).save(tmp_path / p, compress_level=0)
    path = tmp_path / "manifest.csv"
    rows.to_csv(path, index=False)
    return path


def cli_args(tmp_path: Path, manifest: Path, *more: str) -> list[str]:
    return ["data=manifest", f"data.manifest={manifest}", f"paths.root_dir={tmp_path}", *FAST, *more]


def cfg_for(tmp_path: Path, manifest: Path, *more: str):
    return make_cfg(tmp_path, "data=manifest", f"data.manifest={manifest}", *FAST, *more)


def oof_entries(tmp_path: Path) -> list[Path]:
    root = tmp_path / ".cache" / "cleanloop" / "steps" / "oof"
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def fold_markers(tmp_path: Path) -> dict[int, dict]:
    """{fold: done-marker} of the finished fold entries (``steps/oof-fold/<key>/``)."""
    root = tmp_path / ".cache" / "cleanloop" / "steps" / "oof-fold"
    markers = [json.loads(m.read_text()) for m in root.glob(f"[!.]*/{DONE}")] if root.is_dir() else []
    return {m["fold"]: m for m in markers}


def assert_whole(entry: Path) -> dict:
    """A finished entry's marker, lineage and OOF file belong to one build, and its fold entries hold its rows."""
    from cleanloop.oof_file import read_meta

    marker = json.loads((entry / DONE).read_text())
    assert marker["key"] == entry.name == marker["lineage"]["key"]
    assert json.loads((entry / LINEAGE_FILE).read_text()) == marker["lineage"]
    oof = pd.read_parquet(entry / "oof_probs.parquet")
    assert read_meta(entry / "oof_probs.parquet")["key"] == entry.name
    folds = [entry.parent.parent / "oof-fold" / k for k in marker["fold_entries"]]
    assert folds, "a kfold entry names its fold entries"
    classes = [c for c in oof.columns if c not in ("image_uuid", "label", "fold")]
    for f in folds:
        fold_marker = json.loads((f / DONE).read_text())
        assert read_meta(f / "fold.parquet")["key"] == fold_marker["key"] == f.name
        assert fold_marker["lineage"]["parts"]["images"] == marker["lineage"]["parts"]["images"]
        fold = pd.read_parquet(f / "fold.parquet")
        rows = oof.set_index("image_uuid").loc[fold["image_uuid"]]
        assert (rows["fold"] == fold_marker["fold"]).all()
        assert np.allclose(rows[classes].to_numpy(), fold.drop(columns="image_uuid").to_numpy(), atol=1e-6), \
            f"fold {fold_marker['fold']} is not in the OOF"
    return marker


# -- 1. keys -------------------------------------------------------------------------------------


def test_content_digests_catch_same_size_rewrite_with_mtime_put_back(tmp_path):
    img = tmp_path / "a.png"
    stored_png(img, 1)
    table = tmp_path / "table"
    first, changed = lineage.content_digests([str(img)], table)
    assert changed == 0 and lineage.content_digests([str(img)], table) == (first, 0)
    st = img.stat()
    stored_png(img, 2)
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert img.stat().st_size == st.st_size and img.stat().st_mtime_ns == st.st_mtime_ns
    second, changed = lineage.content_digests([str(img)], table)
    assert second != first and changed == 1
    os.utime(img)  # touched only: read again, same digest, nothing changed
    assert lineage.content_digests([str(img)], table) == (second, 0)


def test_version_bump_recomputes_and_says_why(manifest, tmp_path, monkeypatch, caplog):
    """(c) a new KEY_VERSION or library version is a new key: the step is computed again and says why."""
    from cleanloop.steps import oof
    from cleanloop.steps.common import entry_key, load_input

    cfg = cfg_for(tmp_path, manifest)
    caplog.set_level(logging.INFO, logger="cleanloop")
    first = oof.run(cfg)
    assert first["reused"] is False and "oof: computing: no earlier entry for this manifest" in caplog.text
    assert oof.run(cfg)["reused"] is True
    monkeypatch.setattr(lineage, "KEY_VERSION", lineage.KEY_VERSION + 1)
    bumped = oof.run(cfg)
    assert bumped["reused"] is False and bumped["key"] != first["key"]
    assert f"oof: recomputing: cleanloop key version {lineage.KEY_VERSION - 1} -> {lineage.KEY_VERSION}" in caplog.text
    marker = assert_whole(Path(bumped["dir"]))
    assert set(marker["lineage"]["parts"]) == {"step", "env", "images"}
    assert marker["lineage"]["parts"]["env"]["key_version"] == lineage.KEY_VERSION
    # a library upgrade: another key, and the reason in words (no need to train a third time)
    m = load_input(cfg)
    key, rec = entry_key(cfg, "oof", {"x": 1}, m)
    real = lineage._version
    monkeypatch.setattr(lineage, "_version", lambda d: "99.0" if d == "cleanlab" else real(d))
    key2, rec2 = entry_key(cfg, "oof", {"x": 1}, m)
    assert key2 != key and lineage.diff(rec, rec2) == [f"cleanlab {real('cleanlab')} -> 99.0"]
    # the run holds the key's parts too
    import mlflow

    logged = mlflow.artifacts.load_dict(f"runs:/{bumped['run_id']}/{LINEAGE_FILE}")
    assert logged == marker["lineage"]


def test_image_root_is_part_of_the_key(manifest, tmp_path):
    from cleanloop.steps.common import entry_key, load_input

    cfg = cfg_for(tmp_path, manifest)
    key, rec = entry_key(cfg, "oof", {"x": 1}, load_input(cfg))
    assert rec["parts"]["images"]["root"] == str(tmp_path.resolve()) and rec["parts"]["images"]["n"] == 24
    moved = tmp_path / "moved"
    (moved / "img").mkdir(parents=True)
    for p in (tmp_path / "img").iterdir():
        (moved / "img" / p.name).write_bytes(p.read_bytes())
    cfg2 = cfg_for(tmp_path, manifest, f"data.image_root={moved}")
    key2, rec2 = entry_key(cfg2, "oof", {"x": 1}, load_input(cfg2))
    assert key2 != key and rec2["parts"]["images"]["content"] == rec["parts"]["images"]["content"]
    assert lineage.diff(rec, rec2) == [f"image root changed ({tmp_path.resolve()} -> {moved})", "image paths changed"]
    assert entry_key(cfg, "compare", "k")[1]["parts"].keys() == {"step", "env"}  # no images read: none in its key


# -- 3. forced rebuilds --------------------------------------------------------------------------


def test_forced_rebuild_killed_at_any_point_leaves_a_whole_entry(manifest, tmp_path, monkeypatch, caplog):
    """(d) reuse_steps=false retrains every fold; (e, in process) a forced rebuild that dies while
    training, or between the two renames of its swap, leaves no mix: the old entry unmarked or the new
    one whole, and the next run finishes or promotes it."""
    from cleanloop import cache
    from cleanloop.steps import oof

    caplog.set_level(logging.INFO, logger="cleanloop")
    cfg = cfg_for(tmp_path, manifest, "trainer.jobs=1")  # folds in this process, where the patch below counts them
    first = oof.run(cfg)
    old = assert_whole(Path(first["dir"]))
    old_folds = fold_markers(tmp_path)
    forced = cfg_for(tmp_path, manifest, "paths.reuse_steps=false", "trainer.jobs=1")

    caplog.clear()
    real = oof.fit_predict
    fail_nth_fit(monkeypatch, oof, 2, KeyboardInterrupt())  # as a kill would, mid-build
    with pytest.raises(KeyboardInterrupt):
        oof.run(forced)
    monkeypatch.setattr(oof, "fit_predict", real)
    assert "oof: recomputing: paths.reuse_steps=false" in caplog.text
    assert "fold 1/2 trained" in caplog.text and "reused" not in caplog.text  # (d) the finished fold is retrained
    (entry,) = oof_entries(tmp_path)
    assert not (entry / DONE).exists()  # the old marker went first: nothing marked done beside a mix
    folds = fold_markers(tmp_path)
    assert list(folds) == [0] and folds[0]["run_id"] != old_folds[0]["run_id"]  # the new fold 0, for a resume
    for step_dir in (entry.parent, entry.parent.parent / "oof-fold"):
        assert not [p for p in step_dir.iterdir() if p.name.startswith(".")]  # no temporary folders left

    caplog.clear()
    resumed = oof.run(cfg)
    assert "fold 1/2 reused" in caplog.text and "fold 2/2 trained" in caplog.text
    new = assert_whole(Path(resumed["dir"]))
    assert new["run_id"] != old["run_id"]

    # killed between the swap's two renames of the OOF entry: the finished build is promoted by the next claim
    real_swap = cache.swap_into_place

    def dies_between_renames(new: Path, dest: Path) -> None:
        if dest.parent.name != "oof":
            return real_swap(new, dest)  # the fold entries, retrained first
        os.replace(dest, tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=cache.OLD_SUFFIX, dir=dest.parent))
        raise KeyboardInterrupt

    monkeypatch.setattr(cache, "swap_into_place", dies_between_renames)
    with pytest.raises(KeyboardInterrupt):
        oof.run(forced)
    monkeypatch.undo()
    assert not any(p.is_dir() and not p.name.startswith(".") for p in entry.parent.iterdir())  # moved aside
    caplog.clear()
    promoted = oof.run(cfg)
    assert promoted["reused"] is True and "killed before its swap" in caplog.text
    final = assert_whole(Path(promoted["dir"]))
    assert final["run_id"] not in (old["run_id"], new["run_id"])
    assert [p.name for p in entry.parent.iterdir() if p.is_dir()] == [entry.name]


# -- CLI acceptance (issue 13: 1a, 1b, 1d, 1e) -----------------------------------------------------


@pytest.mark.slow
def test_cycle_in_a_new_mlflow_store_reuses_and_relogs(manifest, tmp_path):
    """(a) cycle, delete the MLflow db, cycle again: exit 0, nothing retrained, the runs are in the new
    store (tagged cleanloop.reused_from), and compare pairs them there."""
    import mlflow

    args = cli_args(tmp_path, manifest)
    first = run_cli("cycle", *args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    db = tmp_path / "mlruns" / "mlflow.db"
    db.unlink()
    again = run_cli("cycle", *args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    out = again.stdout + again.stderr
    assert "fold 1/2 trained" not in out and "train baseline: " not in out
    assert "cycle: oof skipped" in out and "cycle: train-cleaned skipped" in out
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    runs = mlflow.search_runs(search_all_experiments=True)
    reused = runs[runs["tags.cleanloop.reused_from"].notna()]
    assert sorted(reused["tags.cleanloop.step"]) == ["audit", "flag", "flag-test", "oof", "prune", "train", "train"]
    trains = reused[reused["tags.cleanloop.step"] == "train"]
    assert sorted(trains["tags.cleanloop.role"]) == ["baseline", "cleaned"]
    assert trains["tags.cleanloop.recipe"].nunique() == 1 and trains["metrics.test/top1"].notna().all()
    for run_id in trains["run_id"]:
        names = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id)}
        assert {"test_predictions.parquet", "metrics.json", LINEAGE_FILE} <= names
    summary = json.loads((tmp_path / "outputs" / "manifest" / "summary.json").read_text())
    assert set(summary["mlflow"]["train_pairs"][0]) == set(trains["run_id"])
    assert mlflow.get_run(summary["mlflow"]["runs"]["compare"]).data.tags["cleanloop.step"] == "compare"
    cmp = run_cli("compare", *args, cwd=tmp_path)  # pairs the re-logged train runs by their tags
    assert cmp.returncode == 0, cmp.stderr[-3000:]
    compared = json.loads((tmp_path / "outputs" / "manifest" / "compare" / "compare_summary.json").read_text())
    assert set(compared["baseline_runs"] + compared["cleaned_runs"]) == set(trains["run_id"])


@pytest.mark.slow
def test_changed_image_bytes_recompute_oof_and_say_why(manifest, tmp_path):
    """(b) one image's bytes change, same path and size, its mtime put back: oof recomputes and says why."""
    args = cli_args(tmp_path, manifest)
    first = run_cli("oof", *args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    img = tmp_path / "img" / "mid-3.png"
    st = img.stat()
    stored_png(img, 7)
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (img.stat().st_size, img.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    again = run_cli("oof", *args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    out = again.stdout + again.stderr
    assert "oof: recomputing: image files changed (1 of 24)" in out
    assert "fold 1/2 trained" in out and "fold 2/2 trained" in out
    assert len(oof_entries(tmp_path)) == 2


@pytest.mark.slow
def test_forced_rebuild_retrains_every_fold_and_a_kill_leaves_no_mix(manifest, tmp_path):
    """(d) paths.reuse_steps=false retrains every fold; (e) SIGKILL once it has trained one: the entry
    is left unmarked (never marked beside a mix), and the next run finishes the new entry whole.
    trainer.jobs=1: folds one after another, so exactly one is finished when the kill lands (side by side,
    the second may finish too; tests/test_oof_flag_prune.py's kill test takes whatever finished)."""
    args = cli_args(tmp_path, manifest, "oof.n_folds=3", "trainer.jobs=1")
    first = run_cli("oof", *args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    (entry,) = oof_entries(tmp_path)
    old = assert_whole(entry)

    proc = ForkedCli("oof", *args, "paths.reuse_steps=false", cwd=tmp_path)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "fold 1/3 trained" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    log = "".join(seen)
    assert "oof: recomputing: paths.reuse_steps=false" in log and "fold 1/3 trained" in log
    assert "reused" not in log  # (d) the finished folds of the old entry are not taken
    assert proc.returncode == -signal.SIGKILL, "the rebuild finished before the kill"
    for d in [p for p in entry.parent.iterdir() if p.is_dir()]:
        if (d / DONE).exists():  # anything marked done is whole
            assert_whole(d)
    assert not (entry / DONE).exists()

    t0 = time.time()
    again = run_cli("oof", *args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    out = again.stdout + again.stderr
    assert "fold 1/3 reused" in out and "fold 2/3 trained" in out and "fold 3/3 trained" in out, time.time() - t0
    new = assert_whole(entry)
    assert new["run_id"] != old["run_id"]
    assert [p.name for p in entry.parent.iterdir() if p.is_dir()] == [entry.name]

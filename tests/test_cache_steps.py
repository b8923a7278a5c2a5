"""`cleanloop cache-steps list|prune`: the step cache's entries, evicted by age or size (issue #13, item 4)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from cleanloop import cache_admin, cli
from cleanloop.cache import DONE, StepCache

from conftest import run_cli

DAY = 86400
STORE = "sqlite:///mlruns/mlflow.db#1"


def steps_root(root: Path) -> Path:
    return root / ".cache" / "cleanloop" / "steps"  # paths.cache_dir's default, under paths.root_dir


def make_entry(root: Path, step: str, key: str, nbytes: int, *, days_ago: float, run: str | None = None) -> Path:
    """A finished entry with one ``nbytes`` data file, built and last claimed ``days_ago`` days ago."""
    cache = StepCache(steps_root(root))
    with cache.claim(step, key) as e:
        def build(out: Path) -> dict:
            (out / "data.bin").write_bytes(b"x" * nbytes)
            return {"run_id": run, "runs": {STORE: run}} if run else {}

        cache.rebuild(e, build)
    set_age(e.dir.parent, key, days_ago)
    return e.dir


def set_age(step_dir: Path, key: str, days_ago: float) -> None:
    t = time.time() - days_ago * DAY
    for p in [step_dir / key / DONE, step_dir / f"{key}.lock", *(step_dir / key).rglob("*"), step_dir / key]:
        if p.exists():
            os.utime(p, (t, t))


def cache_steps(capsys, *args: str) -> tuple[int, str, str]:
    """The real CLI in-process: (exit code, stdout, stderr)."""
    try:
        cli.main(["cache-steps", *args])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def found(root: Path, step: str, key: str) -> bool:
    return StepCache(steps_root(root)).find(step, key) is not None


@pytest.fixture
def three(tmp_path) -> Path:
    """oof/old (40 days, 1000 B), flag/mid (10 days, 2000 B), train/new (1 day, 3000 B)."""
    make_entry(tmp_path, "oof", "old", 1000, days_ago=40, run="a" * 32)
    make_entry(tmp_path, "flag", "mid", 2000, days_ago=10, run="b" * 32)
    make_entry(tmp_path, "train", "new", 3000, days_ago=1, run="c" * 32)
    return tmp_path


def test_list_shows_entries_with_size_age_state_and_runs(three, capsys):
    code, out, err = cache_steps(capsys, "list", f"paths.root_dir={three}")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["STEP", "KEY", "SIZE", "BUILT", "USED", "STATE", "RUNS"]
    rows = {line.split()[0]: line for line in lines[1:-1]}
    assert sorted(rows) == ["flag", "oof", "train"]
    sizes = {e.key: e.size for e in cache_admin.scan(steps_root(three))}
    assert 1000 < sizes["old"] < sizes["mid"] < sizes["new"] < 4000  # data file + done-marker
    assert f"{sizes['old'] / 1000:.1f} KB" in rows["oof"] and "40d ago" in rows["oof"] and "a" * 32 in rows["oof"]
    assert "done" in rows["flag"] and "b" * 32 in rows["flag"] and "10d ago" in rows["flag"]
    assert "1.0d ago" in rows["train"]
    assert lines[-1] == f"total: 3 entries, {sum(sizes.values()) / 1000:.1f} KB in {steps_root(three)}"


def test_a_claim_marks_the_entry_used(three):
    """`used` is the lock file's mtime, which every StepCache.claim sets (it opens the lock for writing)."""
    with StepCache(steps_root(three)).claim("oof", "old"):
        pass
    e = next(e for e in cache_admin.scan(steps_root(three)) if e.key == "old")
    assert time.time() - e.used < 60 and time.time() - e.built > 39 * DAY


def test_prune_older_than_removes_exactly_the_old_entries(three, capsys):
    code, out, err = cache_steps(capsys, "prune", "--older-than", "5", f"paths.root_dir={three}")
    assert code == 0, err
    assert "removed oof/old" in out and "removed flag/mid" in out and "train/new" not in out
    assert out.splitlines()[-1].startswith("freed ")
    assert not found(three, "oof", "old") and not found(three, "flag", "mid") and found(three, "train", "new")
    assert not (steps_root(three) / "oof" / "old").exists()
    assert [p.name for p in (steps_root(three) / "oof").iterdir()] == ["old.lock"]  # no .old trash left


def test_prune_max_gb_removes_least_recently_used_first(three, capsys):
    sizes = {e.key: e.size for e in cache_admin.scan(steps_root(three))}
    with StepCache(steps_root(three)).claim("oof", "old"):  # the oldest built is now the latest used
        pass
    cap_gb = (sizes["old"] + sizes["new"] + 0.5) / 1e9  # removing the least recently used (mid) is enough
    code, out, err = cache_steps(capsys, "prune", f"--max-gb={cap_gb}", f"paths.root_dir={three}")
    assert code == 0, err
    assert found(three, "oof", "old") and found(three, "train", "new") and not found(three, "flag", "mid")
    assert "removed flag/mid" in out and "least recently used" in out and "removed oof" not in out
    # a tiny cap (2000 B): `new` (1 day) goes before `old` (used just now), which then fits
    code, out, err = cache_steps(capsys, "prune", "--max-gb", "0.000002", f"paths.root_dir={three}")
    assert code == 0, err
    assert "removed train/new" in out and "oof/old" not in out
    assert found(three, "oof", "old") and not found(three, "train", "new")
    assert [e.key for e in cache_admin.scan(steps_root(three))] == ["old"]


def test_keys_give_the_defaults_and_flags_win(three, capsys):
    code, out, err = cache_steps(capsys, "prune", f"paths.root_dir={three}", "paths.cache_max_age_days=20")
    assert code == 0, err
    assert not found(three, "oof", "old") and found(three, "flag", "mid")
    code, out, err = cache_steps(capsys, "prune", "--older-than=5", f"paths.root_dir={three}",
                                 "paths.cache_max_age_days=20")
    assert code == 0, err
    assert not found(three, "flag", "mid") and found(three, "train", "new")
    code, out, err = cache_steps(capsys, "prune", f"paths.root_dir={three}", "paths.cache_max_gb=0")
    assert code == 0, err
    assert not found(three, "train", "new")


def test_dry_run_removes_nothing(three, capsys):
    before = sorted(p.relative_to(three) for p in three.rglob("*"))
    code, out, err = cache_steps(capsys, "prune", "--older-than", "0", "--dry-run", f"paths.root_dir={three}")
    assert code == 0, err
    assert out.count("would remove ") == 3 and out.splitlines()[-1].startswith("would free ")
    assert sorted(p.relative_to(three) for p in three.rglob("*")) == before
    assert found(three, "oof", "old") and found(three, "flag", "mid") and found(three, "train", "new")


def test_unfinished_entries_and_dead_leftovers_go(three, capsys):
    step_dir = steps_root(three) / "oof"
    # an unfinished entry (a killed build's resumable folds, no done-marker), 30 days old
    (step_dir / "killed" / "folds").mkdir(parents=True)
    (step_dir / "killed" / "folds" / "fold-0.parquet").write_bytes(b"f" * 500)
    set_age(step_dir, "killed", 30)  # its files' and folders' newest mtime
    # a killed first build (leftover only) of another key, fresh: kept by age
    (step_dir / ".first.abc123_x.build").mkdir()
    (step_dir / ".first.abc123_x.build" / "part").write_bytes(b"p" * 100)
    # dead leftovers of a finished entry (a killed rebuild and a killed swap): always removed
    (step_dir / ".old.zz9.build").mkdir()
    (step_dir / ".old.zz9.build" / "x").write_bytes(b"y" * 100)
    (step_dir / ".old.q1.old").mkdir()
    entries = {e.key: e for e in cache_admin.scan(steps_root(three))}
    assert entries["killed"].state == "unfinished" and entries["first"].state == "unfinished"
    assert entries["old"].leftovers and entries["old"].done
    code, out, err = cache_steps(capsys, "list", f"paths.root_dir={three}")
    assert "unfinished" in out and "done +2 temp" in out

    code, out, err = cache_steps(capsys, "prune", "--older-than", "35", f"paths.root_dir={three}")
    assert code == 0, err
    assert "removed oof/old temporary folders" in out
    left = sorted(p.name for p in step_dir.iterdir())
    assert left == [".first.abc123_x.build", "killed", "old.lock"]  # old (40 days) went by age too
    code, out, err = cache_steps(capsys, "prune", "--older-than", "20", f"paths.root_dir={three}")
    assert "removed oof/killed" in out
    assert not (step_dir / "killed").exists() and (step_dir / ".first.abc123_x.build").exists()
    assert found(three, "train", "new")


def test_an_entry_in_use_is_skipped_not_waited_for(three, capsys):
    with StepCache(steps_root(three)).claim("oof", "old"):
        entries = {e.key: e for e in cache_admin.scan(steps_root(three))}
        assert entries["old"].state == "done, in use"
        result = cache_admin.prune(steps_root(three), max_bytes=0)
    assert [(r.entry.key, r.skipped) for r in result.removals] == [("mid", None), ("new", None), ("old", "in use")]
    assert found(three, "oof", "old")


def test_image_scan_entries_are_entries_and_the_rest_of_cache_dir_stays(tmp_path, capsys):
    make_entry(tmp_path, "images", "k1", 10, days_ago=3)  # steps/images/<key>: the image scan's entries
    cache_dir = steps_root(tmp_path).parent
    (cache_dir / "lineage").mkdir()
    (cache_dir / "lineage" / "image_stats.parquet").write_bytes(b"z")
    (cache_dir / "models" / "tiny").mkdir(parents=True)
    code, out, err = cache_steps(capsys, "list", f"paths.cache_dir={cache_dir}")
    assert code == 0 and out.splitlines()[1].split()[:2] == ["images", "k1"]
    code, out, err = cache_steps(capsys, "prune", "--max-gb", "0", f"paths.cache_dir={cache_dir}")
    assert code == 0 and "removed images/k1" in out
    assert sorted(p.name for p in cache_dir.iterdir()) == ["lineage", "models", "steps"]
    assert (cache_dir / "lineage" / "image_stats.parquet").exists() and (cache_dir / "models" / "tiny").is_dir()
    code, out, err = cache_steps(capsys, "list", f"paths.root_dir={tmp_path}")
    assert out.splitlines() == [f"total: 0 entries, 0 B in {steps_root(tmp_path)}"]


@pytest.mark.parametrize("args, code, message", [
    (["frob"], 2, "unknown command 'frob'"),
    ([], 2, "give a command"),
    (["prune", "--older-than", "soon"], 2, "--older-than 'soon': give a number"),
    (["prune", "--max-gb", "-1"], 2, "give a number >= 0"),
    (["list", "--dry-run"], 2, "list takes no options"),
    (["prune", "--keep"], 2, "unknown option --keep"),
    (["prune", "--older-than", "1", "nokey=1"], 1, "Could not override 'nokey'"),
    (["prune", "paths.cache_max_gb=lots"], 1, "paths.cache_max_gb='lots'"),
])
def test_usage_errors_are_one_line(tmp_path, capsys, args, code, message):
    got, out, err = cache_steps(capsys, *args, f"paths.root_dir={tmp_path}") if args else cache_steps(capsys)
    assert got == code and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("cleanloop cache-steps: error: ") and message in err


def test_prune_without_a_limit_is_a_one_line_error(tmp_path):
    p = run_cli("cache-steps", "prune", f"paths.root_dir={tmp_path}", cwd=tmp_path, timeout=120)
    assert p.returncode == 1, p.stderr
    assert p.stdout == ""
    assert p.stderr.splitlines() == ["cleanloop cache-steps: error: prune needs a limit: --older-than DAYS or "
                                     "--max-gb GB (or set paths.cache_max_age_days / paths.cache_max_gb)"]


def test_files_still_linked_from_outputs_are_not_counted_as_freed(three, capsys):
    entry = steps_root(three) / "train" / "new"
    os.link(entry / "data.bin", three / "published.bin")  # publish hard-links big outputs
    code, out, err = cache_steps(capsys, "prune", "--max-gb", "0", f"paths.root_dir={three}")
    assert code == 0, err
    assert "(3.0 KB stays, hard-linked from outputs)" in out.splitlines()[-1]
    assert (three / "published.bin").read_bytes() == b"x" * 3000

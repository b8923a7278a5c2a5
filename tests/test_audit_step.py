"""Issue 15: the audit step on a tiny manifest with planted copies, and what it changes downstream."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cleanloop.folds import assign_folds
from cleanloop.steps import audit, compare, oof, train

from conftest import tiny_rows

TINY = ["data=manifest", "data.num_workers=0", "model=tiny", "model.image_size=16", "model.config.image_size=16",
        "recipe.batch_size=4", "recipe.epochs=1", "oof.n_folds=2"]


def _with_copies(root: Path) -> Path:
    """tiny_rows plus: a byte copy of train row dark-0 under another patient's group (train), and a
    byte copy of train row mid-1 in test."""
    rows = tiny_rows(root)
    shutil.copy(root / "img" / "dark-0.png", root / "img" / "dark-twin.png")
    shutil.copy(root / "img" / "mid-1.png", root / "img" / "mid-leak.png")
    extra = pd.DataFrame([
        {"image_uuid": "dark-twin", "path": "img/dark-twin.png", "label": "dark", "split": "train", "group": "patient-x"},
        {"image_uuid": "mid-leak", "path": "img/mid-leak.png", "label": "mid", "split": "test", "group": "patient-y"},
    ])
    path = root / "manifest.csv"
    pd.concat([rows, extra], ignore_index=True).to_csv(path, index=False)
    return path


def _straddling_seed(manifest: Path) -> int:
    """An oof.seed whose folds, by the manifest's own groups, put dark-0 and its twin apart."""
    train = pd.read_csv(manifest, dtype=str)
    train = train[train["split"] == "train"].reset_index(drop=True)
    a, b = (train.index[train["image_uuid"] == u][0] for u in ("dark-0", "dark-twin"))
    for seed in range(20):
        folds = assign_folds(train["label"].to_numpy(), n_folds=2, seed=seed, groups=train["group"].to_numpy())
        if folds[a] != folds[b]:
            return seed
    raise AssertionError("no seed separates the copies; the test data cannot show merging")


def test_audit_reports_the_copies_and_merged_groups_keep_them_in_one_fold(tmp_path, cfg_factory):
    manifest = _with_copies(tmp_path)
    seed = _straddling_seed(manifest)
    cfg = cfg_factory(*TINY, f"data.manifest={manifest}", f"oof.seed={seed}")
    info = audit.run(cfg)
    out = Path(info["out_dir"])
    pairs = pd.read_csv(out / "duplicates.csv", dtype=str, keep_default_na=False)
    linked = {frozenset((a, b)): (k, sa, sb) for a, b, k, sa, sb in
              pairs[["image_uuid_a", "image_uuid_b", "kind", "split_a", "split_b"]].itertuples(index=False)}
    assert linked[frozenset(("dark-0", "dark-twin"))] == ("exact", "train", "train")
    assert sorted(linked[frozenset(("mid-1", "mid-leak"))][1:]) == ["test", "train"]
    per_class = pd.read_csv(out / "leakage_per_class.csv", dtype={"class": str}).set_index("class")
    assert per_class.loc["mid", "train_test_pairs"] == 1 and per_class.loc["dark", "train_test_pairs"] == 0
    summary = json.loads((out / "audit_summary.json").read_text())
    assert summary["metrics"]["audit/leaks/train_test"] == 1

    oof.run(cfg)
    probs = pd.read_parquet(Path(cfg.paths.out_dir) / "oof" / "oof_probs.parquet").set_index("image_uuid")
    assert probs.loc["dark-0", "fold"] == probs.loc["dark-twin", "fold"]  # merged: one fold

    apart = cfg_factory(*TINY, f"data.manifest={manifest}", f"oof.seed={seed}", "audit.merge_groups=false")
    oof.run(apart)  # the manifest's groups only: the seed chosen above separates the copies
    probs = pd.read_parquet(Path(apart.paths.out_dir) / "oof" / "oof_probs.parquet").set_index("image_uuid")
    assert probs.loc["dark-0", "fold"] != probs.loc["dark-twin", "fold"]


def test_exclude_keeps_the_raw_numbers_and_adds_the_deleaked_ones(tmp_path, cfg_factory):
    manifest = _with_copies(tmp_path)
    base = [*TINY, f"data.manifest={manifest}"]
    audit.run(cfg_factory(*base))
    runs = [train.run(cfg_factory(*base, "role=baseline", f"recipe.seed={s}"))["run_id"] for s in (0, 1)]
    pair = [f"compare.baseline={runs[0]}", f"compare.cleaned={runs[1]}"]

    raw = compare.run(cfg_factory(*base, *pair))
    raw_table = pd.read_csv(Path(raw["dir"]) / "recall_deltas.csv")
    both = compare.run(cfg_factory(*base, *pair, "audit.test_leaks=exclude"))
    folder = Path(both["dir"])
    pd.testing.assert_frame_equal(pd.read_csv(folder / "recall_deltas.csv"), raw_table)  # raw numbers kept
    assert both["balanced_accuracy"] == raw["balanced_accuracy"] and both["n_test"] == raw["n_test"] == 7
    assert both["deleaked"]["n_excluded"] == 1 and both["deleaked"]["n_test"] == 6
    deleaked = pd.read_csv(folder / "recall_deltas_deleaked.csv", dtype={"class": str}).set_index("class")
    assert deleaked["n_test"].sum() == 6 and deleaked.loc["mid", "n_test"] == 2  # mid-leak left out
    assert "deleaked" not in raw and not (Path(raw["dir"]) / "recall_deltas_deleaked.csv").exists()


def test_exclude_without_an_audit_says_what_to_run(tmp_path, cfg_factory):
    from cleanloop.errors import CleanloopError

    manifest = _with_copies(tmp_path)
    cfg = cfg_factory(*TINY, f"data.manifest={manifest}", "audit.test_leaks=exclude")
    with pytest.raises(CleanloopError, match="run `cleanloop audit` first"):
        compare._leaked_test_rows(cfg)


def test_the_audit_key_follows_the_images(tmp_path, cfg_factory):
    manifest = _with_copies(tmp_path)
    cfg = cfg_factory(*TINY, f"data.manifest={manifest}")
    first = audit.run(cfg)
    assert audit.run(cfg)["reused"]
    arr = np.zeros((16, 16, 3), dtype=np.uint8)  # the twin is no longer a copy: same path, new bytes
    from PIL import Image

    Image.fromarray(arr).save(tmp_path / "img" / "dark-twin.png")
    again = audit.run(cfg)
    assert not again["reused"] and again["key"] != first["key"]
    pairs = pd.read_csv(Path(again["out_dir"]) / "duplicates.csv", dtype=str)
    assert not ((pairs["image_uuid_a"] == "dark-0") & (pairs["image_uuid_b"] == "dark-twin")).any()


def test_prefetched_search_is_taken_only_for_its_own_rows_and_settings(tmp_path, cfg_factory, monkeypatch):
    # cycle starts the duplicate search beside its imports (audit.prefetch); the step takes that
    # result for the same rows and settings only, and nothing is started for a finished entry.
    from cleanloop import audit as pure

    manifest = _with_copies(tmp_path)
    cfg = cfg_factory(*TINY, f"data.manifest={manifest}")
    assert audit.prefetch(cfg) is True
    assert len(audit._prefetched) == 1
    calls = []
    monkeypatch.setattr(pure, "find_duplicates", lambda *a, **k: calls.append(1) or pd.DataFrame())
    info = audit.run(cfg)
    assert calls == [] and audit._prefetched == {}  # the started search was taken, none run again
    pairs = pd.read_csv(Path(info["out_dir"]) / "duplicates.csv", dtype=str)
    assert {frozenset(p) for p in pairs[["image_uuid_a", "image_uuid_b"]].itertuples(index=False)} == {
        frozenset(("dark-0", "dark-twin")), frozenset(("mid-1", "mid-leak"))}
    assert audit.prefetch(cfg) is False  # finished entry: it will be reused, nothing to search

    # a search started for other settings is never taken by a step with these
    other = cfg_factory(*TINY, f"data.manifest={manifest}", "audit.phash_max_distance=4")
    third = cfg_factory(*TINY, f"data.manifest={manifest}", "audit.phash_max_distance=6")
    monkeypatch.undo()
    assert audit.prefetch(other) is True
    monkeypatch.setattr(pure, "find_duplicates", lambda *a, **k: calls.append(1) or pd.DataFrame(
        columns=list(pure.PAIR_COLUMNS)))
    audit.run(third)
    assert calls == [1] and len(audit._prefetched) == 1  # searched in the step; other's search untaken
    audit._prefetched.clear()

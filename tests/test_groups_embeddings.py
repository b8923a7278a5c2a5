"""Issue 13 items 5 and 7: a partly blank `group` column never silently ungroups the folds, and
the embeddings beside an OOF file are matched to it by image_uuid, never by row order alone."""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from cleanloop.errors import CleanloopError
from cleanloop.folds import assign_folds, fold_groups
from cleanloop.manifest import check_groups
from cleanloop.oof_file import (
    EMBEDDING_IDS,
    load_embeddings,
    oof_frame,
    read_meta,
    write_embeddings,
    write_oof,
)
from cleanloop.steps import oof

from conftest import make_cfg, run_main, tiny_rows

BLANKED = ["dark-1", "mid-2", "bright-5"]  # train rows whose group is blanked (each leaves its partner alone)
TINY = ("data=manifest", "data.num_workers=0", "model=tiny", "model.image_size=16", "model.config.image_size=16")


def blanked_manifest(folder: Path, blanked=BLANKED) -> Path:
    df = tiny_rows(folder)
    df.loc[df["image_uuid"].isin(blanked), "group"] = ""
    path = folder / "manifest.csv"
    df.to_csv(path, index=False)
    return path


def straddling_groups(folds: np.ndarray, groups: pd.Series) -> list[str]:
    per_group = pd.Series(folds).groupby(groups.to_numpy()).nunique()
    return sorted(per_group[per_group > 1].index)


# -- item 5: groups ------------------------------------------------------------------------------


def test_partly_blank_groups_are_one_line_error_before_training(capsys, tmp_path):
    m = blanked_manifest(tmp_path)
    code, err = run_main(capsys, "oof", *TINY, f"data.manifest={m}", f"paths.root_dir={tmp_path}")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1
    # tiny_rows: dark-0..7 on CSV lines 2-9, mid-0..7 on 10-17, bright-0..7 on 18-25
    assert lines[0] == (f"cleanloop oof: error: {m}: column 'group' is blank in 3 of 18 train rows but filled in the "
                        "others (first: 'dark-1' at line 3, 'mid-2' at line 12, 'bright-5' at line 23); fill in their "
                        "group, or set data.missing_group=own to make each blank row its own group")
    # refused by the manifest check, before any fold, output or MLflow run
    assert not (tmp_path / "outputs" / "manifest" / "oof").exists() and not (tmp_path / "mlruns").exists()
    assert not (tmp_path / ".cache" / "cleanloop" / "steps" / "oof").exists()


def test_group_column_blank_everywhere_or_only_outside_train_is_not_an_error():
    rows = pd.DataFrame({"image_uuid": [f"u{i}" for i in range(6)], "split": ["train"] * 4 + ["test"] * 2,
                         "group": [""] * 6})
    assert check_groups(rows) == 0 and fold_groups(rows["group"]).groups is None
    rows.loc[4:, "group"] = "g"  # test rows only: folds are made of train rows
    assert check_groups(rows) == 0
    rows.loc[:3, "group"] = ["a", "a", "b", ""]
    with pytest.raises(CleanloopError, match=r"blank in 1 of 4 train rows .*first: 'u3' at line 5"):
        check_groups(rows)
    assert check_groups(rows, missing_group="own") == 1
    with pytest.raises(CleanloopError, match="data.missing_group='maybe': choose error or own"):
        check_groups(rows, missing_group="maybe")


def test_own_groups_never_take_a_real_group_name():
    real = ["\0blank-1", "a", "", "a", ""]  # a (strange) real group spelt like the generated names
    plan = fold_groups(real, missing_group="own")
    assert plan.n_own == 2 and len(set(plan.groups[[2, 4]]) | set(real)) == len(set(real)) + 2
    assert plan.description == "StratifiedGroupKFold on group (2 blank rows as their own groups)"


def test_missing_group_own_keeps_groups_whole_and_warns(tmp_path, caplog):
    m = blanked_manifest(tmp_path)
    cfg = make_cfg(tmp_path, *TINY, f"data.manifest={m}", "data.missing_group=own", "oof=embed", "oof.n_folds=3")
    with caplog.at_level(logging.WARNING, logger="cleanloop"):
        path = Path(oof.run(cfg)["path"])
    assert "data.missing_group=own: 3 of 18 train rows have a blank group" in caplog.text

    df = pd.read_parquet(path)
    train = pd.read_csv(m, dtype=str, keep_default_na=False).query("split == 'train'").set_index("image_uuid")
    groups = train.loc[df["image_uuid"], "group"]
    filled = (groups != "").to_numpy()
    assert straddling_groups(df["fold"].to_numpy()[filled], groups[filled]) == []
    # the same rows through folds.py directly, and what the old fallback (ungrouped folds) would have done
    labels = train["label"].to_numpy()
    plan = fold_groups(train["group"], missing_group="own")
    folds = assign_folds(labels, n_folds=3, seed=cfg.oof.seed, groups=plan.groups)
    assert np.array_equal(folds, df.set_index("image_uuid").loc[train.index, "fold"].to_numpy())
    filled_train = (train["group"] != "").to_numpy()
    assert straddling_groups(folds[filled_train], train["group"][filled_train]) == []
    ungrouped = assign_folds(labels, n_folds=3, seed=cfg.oof.seed)
    assert straddling_groups(ungrouped, train["group"]), "the test would not notice ungrouped folds"

    described = "StratifiedGroupKFold on group (3 blank rows as their own groups)"
    assert read_meta(path)["folds"] == described
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`cleanloop.step` = 'oof'")
    assert runs.iloc[0]["tags.cleanloop.folds"] == described
    ids = pd.read_parquet(path.with_name(EMBEDDING_IDS))["image_uuid"]
    assert ids.tolist() == df["image_uuid"].tolist()  # embeddings carry their rows' image_uuid


# -- item 7: embeddings carry image_uuid ---------------------------------------------------------


def _oof_with_embeddings(folder: Path, tiny_manifest: Path, *, ids_order, emb_rows=None) -> Path:
    train = pd.read_csv(tiny_manifest, dtype=str).query("split == 'train'")
    classes = ["bright", "dark", "mid"]
    path = folder / "oof_probs.parquet"
    write_oof(path, oof_frame(train["image_uuid"], train["label"], np.zeros(len(train)),
                              np.full((len(train), 3), 1 / 3), classes), classes=classes)
    ids = list(ids_order(train["image_uuid"].tolist()))
    emb = np.array([[float(u.split("-")[1]), float(len(u))] for u in ids]) if emb_rows is None else emb_rows
    write_embeddings(folder, emb, ids)
    return path


def test_embeddings_in_another_order_are_matched_by_image_uuid(tmp_path, tiny_manifest):
    path = _oof_with_embeddings(tmp_path, tiny_manifest, ids_order=lambda u: reversed(u))
    train = pd.read_csv(tiny_manifest, dtype=str).query("split == 'train'")
    emb = load_embeddings(path, train_uuids=train["image_uuid"], file_rows=np.arange(len(train)))
    expected = np.array([[float(u.split("-")[1]), float(len(u))] for u in train["image_uuid"]])
    assert np.array_equal(emb, expected)


def test_flag_refuses_embeddings_of_other_rows(capsys, tmp_path, tiny_manifest):
    swap = lambda u: [*u[:-1], "elsewhere-9"]  # noqa: E731 (the last train row's embedding is another image's)
    path = _oof_with_embeddings(tmp_path, tiny_manifest, ids_order=swap)
    code, err = run_main(capsys, "flag", "data=manifest", f"data.manifest={tiny_manifest}", f"flag.oof={path}",
                         f"paths.root_dir={tmp_path}")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1
    assert lines[0] == (f"cleanloop flag: error: {tmp_path / 'embeddings.npy'}: its rows (embedding_ids.parquet) are "
                        "not the train rows of oof_probs.parquet: 1 missing (e.g. ['bright-5']), 1 unknown "
                        "(e.g. ['elsewhere-9']); they come from another run: re-run `cleanloop oof`, or set "
                        "flag.outlier.enabled=false")
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").rglob("label_issues.csv"))


def test_embeddings_without_ids_fall_back_to_row_order_with_a_warning(tmp_path, tiny_manifest, caplog):
    path = _oof_with_embeddings(tmp_path, tiny_manifest, ids_order=lambda u: u)
    (tmp_path / EMBEDDING_IDS).unlink()  # an OOF folder written before the ids were
    train = pd.read_csv(tiny_manifest, dtype=str).query("split == 'train'")
    with caplog.at_level(logging.WARNING, logger="cleanloop"):
        emb = load_embeddings(path, train_uuids=train["image_uuid"], file_rows=np.arange(len(train)))
    assert emb.shape == (len(train), 2) and "matched to oof_probs.parquet by row order" in caplog.text

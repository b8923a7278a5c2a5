"""Issue 16 item 2: DDP on CPU (gloo, two spawned ranks) through the real CLI, with row counts that do not
divide by the world size, so the samplers pad in training, in validation and in prediction.

A DDP run with ``recipe.batch_size=B`` on W ranks trains on the same global batches as one process
with ``B x W`` (cleanloop.training.ShardedTrainSampler), so the two give the same model: measured
max |p_ddp - p_one| = 1.5e-8 on these runs (float summation order in the gradient all-reduce).
That needs ``recipe.augment=null`` (augmentation draws per rank) and a model without BatchNorm
(the tiny SigLIP has LayerNorm only).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cleanloop.model import Classifier, backbone_from_config

from conftest import make_cfg, run_cli, tiny_rows, write_png

TINY = ["data=manifest", "data.num_workers=0", "model=tiny", "model.image_size=16", "model.config.image_size=16"]
CLASSES = ["bright", "dark", "mid"]
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]
SAME = 1e-5  # DDP against one process: measured 1.5e-8 (all-reduce summation order)


def _odd_manifest(root: Path) -> Path:
    """tiny_rows with 3 val rows (i = 0), 15 train rows and 5 test rows: none divides by 2 ranks."""
    rows = tiny_rows(root)
    i = rows["image_uuid"].str.split("-").str[1].astype(int)
    rows.loc[i == 0, "split"] = "val"
    rows = rows[rows["image_uuid"] != "bright-7"]
    path = root / "odd.csv"
    rows.to_csv(path, index=False)
    return path


def _epoch_lines(stdout: str) -> list[str]:
    return [line.split("] ", 1)[1] for line in stdout.splitlines() if "[baseline] epoch " in line]


@pytest.mark.slow
def test_ddp_train_pads_without_double_counting_and_matches_one_process(tmp_path):
    manifest = _odd_manifest(tmp_path)
    # 15 rows in global batches of 6: 6, 6, 3; the last one is all rank 0's, rank 1 steps on a row of weight 0
    base = [*TINY, f"data.manifest={manifest}", "recipe.epochs=2", "recipe.augment=null", "recipe.checkpoint=best_val"]
    runs = {}
    for name, extra in (("one", ["recipe.batch_size=6"]), ("ddp", ["recipe.batch_size=3", *DDP])):
        r = run_cli("train", *base, *extra, f"paths.root_dir={tmp_path / name}", cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        out = tmp_path / name / "outputs" / "manifest" / "train" / "baseline"
        runs[name] = (r.stdout, pd.read_parquet(out / "test_predictions.parquet"),
                      json.loads((out / "metrics.json").read_text()), out / "model")
    (one_log, one, one_metrics, _), (ddp_log, ddp, ddp_metrics, ddp_model) = runs["one"], runs["ddp"]
    # every test row once, in manifest order, with the one-process model's probabilities
    assert len(ddp) == 5 and ddp["image_uuid"].is_unique and list(ddp["image_uuid"]) == list(one["image_uuid"])
    np.testing.assert_allclose(ddp[CLASSES].to_numpy(), one[CLASSES].to_numpy(), atol=SAME)
    # the fit's record comes back from the ranks: same steps (ceil(15 / 6) x 2), same best epoch
    assert ddp_metrics["fit"] == one_metrics["fit"] and ddp_metrics["fit"]["steps"] == 6
    # per-epoch train/val loss and accuracy over the real rows only, as one process computes them
    lines = _epoch_lines(ddp_log)
    assert len(lines) == 2 and "val/loss=" in lines[0] and lines == _epoch_lines(one_log)
    # the saved model, predicted here in one process, gives what the DDP gather wrote
    from cleanloop.training import predict

    cfg = make_cfg(tmp_path / "check", *TINY, f"data.manifest={manifest}")
    test = pd.read_csv(manifest).query("split == 'test'").assign(abs_path=lambda d: [str(tmp_path / p) for p in d["path"]])
    here = predict(cfg, Classifier.load(ddp_model).eval(), {"test": test})["test"]
    assert here.uuids == list(ddp["image_uuid"])
    np.testing.assert_allclose(here.probs, ddp[CLASSES].to_numpy(), atol=SAME)


@pytest.mark.slow
def test_ddp_kfold_oof_scores_every_row_once_like_one_process(tiny_manifest, tmp_path):
    # 18 train rows in 2 grouped folds of 9: each fold trains on 9 rows (global batches 4, 4, 1) and pads
    # its 9 held-out rows in prediction
    base = [*TINY, f"data.manifest={tiny_manifest}", "recipe.epochs=1", "oof.n_folds=2", "recipe.augment=null"]
    outs = {}
    for name, extra in (("one", ["recipe.batch_size=4"]), ("ddp", ["recipe.batch_size=2", *DDP])):
        r = run_cli("oof", *base, *extra, f"paths.root_dir={tmp_path / name}", cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        outs[name] = pd.read_parquet(tmp_path / name / "outputs" / "manifest" / "oof" / "oof_probs.parquet")
    one, ddp = outs["one"], outs["ddp"]
    assert len(ddp) == 18 and ddp["image_uuid"].is_unique and list(ddp["image_uuid"]) == list(one["image_uuid"])
    assert list(ddp["fold"]) == list(one["fold"])
    np.testing.assert_allclose(ddp[CLASSES].to_numpy(), one[CLASSES].to_numpy(), atol=SAME)


def _uneven_manifest(root: Path) -> Path:
    rows = []
    for c, v in (("dark", 20), ("mid", 110), ("bright", 200)):
        for i in range(8):
            u = f"{c}-{i}"
            write_png(root / "img" / f"{u}.png", v + 3 * i)
            rows.append({"image_uuid": u, "path": f"img/{u}.png", "label": c, "split": "test" if i == 7 else "train"})
    path = root / "m.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path  # 21 train rows: not a multiple of 2 ranks x batch 4


@pytest.mark.slow
def test_ddp_oof_scores_every_row_once_like_one_process(tmp_path):
    manifest = _uneven_manifest(tmp_path)
    base = [*TINY, f"data.manifest={manifest}", "recipe.batch_size=4", "oof=insample"]
    cfg = make_cfg(tmp_path, *base, "oof.checkpoint=unused")
    model = Classifier(backbone_from_config(cfg.model, cache_dir=cfg.paths.cache_dir, seed=3), CLASSES)
    model.save(tmp_path / "model")
    outs = {}
    for name, extra in (("single", []), ("ddp", DDP)):
        r = run_cli("oof", *base, f"oof.checkpoint={tmp_path / 'model'}", f"paths.root_dir={tmp_path / name}", *extra,
                    cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        outs[name] = pd.read_parquet(tmp_path / name / "outputs" / "manifest" / "oof" / "oof_probs.parquet")
    single, ddp = outs["single"], outs["ddp"]
    assert len(ddp) == 21 and ddp["image_uuid"].is_unique and list(ddp["image_uuid"]) == list(single["image_uuid"])
    np.testing.assert_allclose(ddp[CLASSES].to_numpy(), single[CLASSES].to_numpy(), atol=SAME)


def test_sharded_train_sampler_splits_the_one_process_batches():
    """No spawn: the ranks' shares of each global batch are the one-process DataLoader's batch, once each."""
    import torch
    from torch.utils.data import DataLoader

    from cleanloop.training import ShardedTrainSampler

    class Echo(torch.utils.data.Dataset):  # hands back what the sampler gives: (row, weight)
        def __len__(self):
            return n

        def __getitem__(self, key):
            return key

    n, batch, world = 15, 3, 2
    torch.manual_seed(7)
    one = [b.tolist() for b in DataLoader(range(n), batch_size=batch * world, shuffle=True)]
    ranks = []
    for rank in range(world):
        torch.manual_seed(7)  # every rank starts from the one-process RNG state (training._RankRng)
        sampler = ShardedTrainSampler(n, batch_size=batch, rank=rank, world=world)
        rows = list(DataLoader(Echo(), batch_size=batch, sampler=sampler, collate_fn=list))
        assert len(sampler) == sum(len(b) for b in rows)
        ranks.append(rows)
    assert len(ranks[0]) == len(ranks[1]) == len(one) == 3  # equal step counts: DDP never waits on a rank
    for k, expected in enumerate(one):
        real = [(i, w) for r in ranks for i, w in r[k] if w > 0]
        assert [i for i, _ in real] == expected  # the same rows, each once
        assert sum(w for _, w in real) == pytest.approx(world)  # ranks' weighted sums average to the mean
    assert ranks[1][-1] and all(w == 0 for _, w in ranks[1][-1])  # rank 1's last step: padding of weight 0

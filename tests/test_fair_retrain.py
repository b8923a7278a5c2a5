"""Issue 12: a fair retrain. The step budget rule and the checkpoint choice, on real (tiny) trainings."""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch

from cleanloop.data import ImageDataset
from cleanloop.errors import CleanloopError
from cleanloop.manifest import load_manifest
from cleanloop.training import fit_predict, make_datamodule, step_budget, steps_per_epoch

from conftest import tiny_rows

TINY = ["data=manifest", "data.num_workers=0", "model=tiny", "model.image_size=16", "model.config.image_size=16",
        "recipe.batch_size=4"]


def test_step_budget_rule():
    assert steps_per_epoch(10, batch_size=4) == 3 and steps_per_epoch(10, batch_size=4, world_size=2) == 2
    # epochs: the epoch count stands, whatever the rows
    assert step_budget(budget="epochs", epochs=5, n_rows=8, budget_rows=12, batch_size=4) == -1
    # steps: the cleaned run (8 rows) trains the baseline's 5 x ceil(12 / 4) = 15 steps
    assert step_budget(budget="steps", epochs=5, n_rows=8, budget_rows=12, batch_size=4) == 15
    assert step_budget(budget="steps", epochs=5, n_rows=12, budget_rows=12, batch_size=4) == -1  # the baseline
    assert step_budget(budget="steps", epochs=2, n_rows=90, budget_rows=101, batch_size=8, world_size=2) == 14
    with pytest.raises(CleanloopError, match="recipe.budget='tokens'"):
        step_budget(budget="tokens", epochs=1, n_rows=1, budget_rows=1, batch_size=1)


@pytest.fixture
def frames(tmp_path):
    df = tiny_rows(tmp_path)
    df.loc[df["image_uuid"].str.endswith("-5"), "split"] = "val"  # one val row per class, by group
    path = tmp_path / "manifest.csv"
    df.to_csv(path, index=False)
    return path, load_manifest(path, image_root=tmp_path)


@pytest.mark.parametrize(("budget", "steps", "epochs"), [
    ("steps", 3 * 4, 4),   # the baseline's 3 x ceil(15 / 4) = 12 steps: 4 passes over the 10 cleaned rows
    ("epochs", 3 * 3, 3),  # 3 passes over 10 rows: 3 x ceil(10 / 4) = 9 steps
])
def test_cleaned_run_gets_the_stated_budget(cfg_factory, frames, budget, steps, epochs):
    path, m = frames
    assert len(m.train) == 15
    cfg = cfg_factory(*TINY, f"data.manifest={path}", "recipe.epochs=3", f"recipe.budget={budget}")
    cleaned = m.train.iloc[5:]  # five rows "pruned"
    module, _ = fit_predict(cfg, m.classes, cleaned, budget_rows=len(m.train))
    info = module.fit_info
    assert (info["budget"], info["steps"], info["epochs"], info["n_rows"], info["budget_rows"]) == (
        budget, steps, epochs, 10, 15)
    baseline, _ = fit_predict(cfg, m.classes, m.train, budget_rows=len(m.train))
    assert (baseline.fit_info["steps"], baseline.fit_info["epochs"]) == (12, 3)  # the baseline is the same either way


class SeenRows(L.Callback):
    """Records which rows each loop fed the model: the rows its dataset handed out while it ran (train
    and val batches carry no ids, so the dataset's reads are watched)."""

    def __init__(self, monkeypatch):
        self.val: set[str] = set()
        self.train: set[str] = set()
        self.loop: list[str] = ["train"]
        read = ImageDataset.__getitem__

        def watched(ds, i):
            if self.loop:
                getattr(self, self.loop[-1]).add(ds.uuids[i])
            return read(ds, i)

        monkeypatch.setattr(ImageDataset, "__getitem__", watched)

    def on_validation_start(self, trainer, module):
        self.loop.append("val")

    def on_validation_end(self, trainer, module):
        self.loop.pop()

    def on_fit_end(self, trainer, module):
        self.loop.clear()  # the predictions after fitting are not training


def test_best_val_checkpoint_reads_val_rows_only(cfg_factory, frames, monkeypatch):
    path, m = frames
    cfg = cfg_factory(*TINY, f"data.manifest={path}", "recipe.epochs=4", "recipe.checkpoint=best_val")
    seen = SeenRows(monkeypatch)
    module, preds = fit_predict(cfg, m.classes, m.train, val=m.split("val"), callbacks=[seen],
                                predict_frames={"test": m.split("test")})
    test_ids = set(m.split("test")["image_uuid"])
    assert seen.val == set(m.split("val")["image_uuid"]) and not seen.val & test_ids
    assert seen.train == set(m.train["image_uuid"])
    assert module.fit_info["checkpoint"] == "best_val" and 1 <= module.fit_info["best_epoch"] <= 4
    assert sorted(preds["test"].uuids) == sorted(test_ids)


def test_best_val_keeps_the_lowest_val_loss_weights(cfg_factory, frames):
    path, m = frames
    cfg = cfg_factory(*TINY, f"data.manifest={path}", "recipe.epochs=4", "recipe.checkpoint=best_val", "recipe.lr=0.5")
    losses = []

    class Losses(L.Callback):
        def on_validation_epoch_end(self, trainer, module):
            losses.append(float(trainer.callback_metrics["val/loss"]))

    module, _ = fit_predict(cfg, m.classes, m.train, val=m.split("val"), callbacks=[Losses()])
    best = min(range(len(losses)), key=losses.__getitem__)
    assert module.fit_info["best_epoch"] == best + 1
    # the weights evaluated are the best epoch's: their val loss (3 rows, one batch) is the best one seen
    dm = make_datamodule(cfg, m.classes, None, val=m.split("val"))
    batch = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        loss = float(module.loss(module(batch["pixel_values"]), batch["label"]))
    assert loss == pytest.approx(losses[best], rel=1e-4)


def test_best_val_without_val_rows_evaluates_the_last_epoch(cfg_factory, frames, caplog):
    path, m = frames
    cfg = cfg_factory(*TINY, f"data.manifest={path}", "recipe.epochs=1", "recipe.checkpoint=best_val")
    with caplog.at_level(logging.WARNING):
        module, _ = fit_predict(cfg, m.classes, m.train)
    assert module.fit_info["checkpoint"] == "last" and "no val rows" in caplog.text
    with pytest.raises(CleanloopError, match="recipe.checkpoint='best'"):
        fit_predict(cfg_factory(*TINY, f"data.manifest={path}", "recipe.checkpoint=best"), m.classes, m.train)


def test_same_seed_same_model_whether_the_backbone_was_built_or_found(cfg_factory, frames):
    """Building the random-init backbone must not shift the recipe's RNG stream: the first training
    (which builds it) and the second (which loads it from the cache) are the same training."""
    path, m = frames
    cfg = cfg_factory(*TINY, f"data.manifest={path}", "recipe.epochs=1")
    test = m.split("test")
    runs = [fit_predict(cfg, m.classes, m.train, predict_frames={"test": test})[1]["test"].probs for _ in range(2)]
    assert (runs[0] == runs[1]).all()

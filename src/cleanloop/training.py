"""The one training recipe every step uses: seed, build, fit, predict.

``fit_predict`` trains the configured recipe on some manifest rows and returns the model and
its probabilities on any number of named row sets. ``train`` (baseline / cleaned) and each
``oof`` fold call it, so they are the same recipe by construction.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import hydra
import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from cleanloop.config import recipe_hash, short_hash  # noqa: F401 (recipe_hash: re-exported)
from cleanloop.data import ManifestDataModule, set_memory_cache
from cleanloop.errors import CleanloopError
from cleanloop.imagecache import cache_from_config
from cleanloop.model import Classifier, backbone_from_config
from cleanloop.parallel import apply_threads

log = logging.getLogger(__name__)


class EpochLog(L.Callback):
    """One log line and one batch of MLflow metrics per epoch (the progress bar is off on CPU)."""

    def __init__(self, prefix: str = ""):
        self.prefix = prefix
        self.history: list[tuple[int, str, dict]] = []  # (epoch, "1/2", metrics), for a DDP fit's replay

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        values = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "val/"))}
        epoch = trainer.current_epoch
        # under a step budget (recipe.budget=steps) Lightning's max_epochs is -1: show the steps instead
        of = (f"{epoch + 1}/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0
              else f"{epoch + 1} (step {trainer.global_step}/{trainer.max_steps})")
        self.history.append((epoch, of, values))
        if trainer.world_size == 1:  # a spawned DDP rank has neither the log setup nor the MLflow run
            self.emit(epoch, of, values)

    def emit(self, epoch: int, of: str, values: dict) -> None:
        log.info("%sepoch %s %s", self.prefix, of, " ".join(f"{k}={v:.4f}" for k, v in sorted(values.items())))
        import mlflow  # here, not at the top: bench/gpu.py runs the predict path without MLflow

        if mlflow.active_run() is not None:
            mlflow.log_metrics(values, step=epoch)


class FitRecord(L.Callback):
    """Rank 0 writes what the fit did (steps, epochs, best epoch, the epoch log) to ``path`` at its end.

    ``ddp_spawn`` brings the trained weights back to cleanloop's process but not the trainer's
    counters nor the callbacks' state, which live in the spawned ranks; this file carries them.
    """

    def __init__(self, path: Path, epoch_log: EpochLog, best: BestValState | None):
        self.path, self.epoch_log, self.best = Path(path), epoch_log, best

    def on_fit_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            best_epoch = None if self.best is None else self.best.best_epoch
            self.path.write_text(json.dumps({"steps": int(trainer.global_step), "epochs": int(trainer.current_epoch),
                                             "best_epoch": best_epoch, "history": self.epoch_log.history}))


def build_module(cfg: DictConfig, classes: Sequence[str]) -> Classifier:
    recipe = cfg.recipe
    module = Classifier(
        backbone_from_config(cfg.model, cache_dir=cfg.paths.cache_dir, seed=recipe.seed),
        classes,
        head=recipe.head,
        image_mean=list(cfg.model.image_mean),
        image_std=list(cfg.model.image_std),
        optimizer=hydra.utils.instantiate(recipe.optimizer),
        scheduler=hydra.utils.instantiate(recipe.scheduler) if recipe.get("scheduler") else None,
        lr=recipe.lr,
        head_lr=recipe.get("head_lr"),
        warmup_fraction=recipe.get("warmup_fraction", 0.0),
        augment=OmegaConf.to_container(recipe.augment, resolve=True) if recipe.get("augment") else None,
        channels_last=bool(cfg.model.get("channels_last", False)),
    )
    if cfg.model.get("compile"):
        module.backbone.compile()  # in place: parameter names and save_pretrained stay as they were
    return module


class WeightedRows(Dataset):
    """A dataset addressed by ``(index, weight)`` pairs: each item gains a float ``weight`` (0 = a padding row).

    The DDP samplers below hand out such pairs, so a row repeated only to give every rank the same
    number of batches is carried through the step but counts for nothing.
    """

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, float]) -> dict:
        index, weight = key
        return {**self.base[index], "weight": torch.tensor(weight, dtype=torch.float32)}


class ShardedTrainSampler(DistributedSampler):
    """DDP training order that reproduces a one-process run with ``batch_size x world`` rows per step.

    Each epoch draws the permutation exactly as ``DataLoader(shuffle=True)`` does in one process
    (a seed from the global torch RNG, then ``randperm``), cuts it into global batches of
    ``batch_size * world`` rows and gives rank r the r-th slice of each. Nothing is repeated to pad:
    a rank whose slice of the last global batch is empty gets one row of weight 0, and every real row
    weighs ``world / rows in its global batch``, so the mean of the ranks' weighted sums (DDP averages
    gradients) is the one-process mean loss of that global batch. Lightning leaves a
    ``DistributedSampler`` in place, so this replaces the padded one it would inject.
    """

    def __init__(self, n_rows: int, *, batch_size: int, rank: int, world: int):
        super().__init__(range(n_rows), num_replicas=world, rank=rank, shuffle=True, drop_last=False)
        self.n_rows, self.batch_size = n_rows, batch_size
        global_batch = batch_size * world
        tail = n_rows % global_batch
        mine = min(batch_size, max(0, tail - rank * batch_size)) if tail else batch_size
        self.num_samples = (math.ceil(n_rows / global_batch) - 1) * batch_size + max(1, mine)

    def __iter__(self):
        # the same draws, in the same order, as torch's RandomSampler: one int64 from the global RNG
        # seeds a private generator; the global RNG state itself is the one-process run's (fit_predict
        # hands it to the ranks, see _RankRng)
        seed = int(torch.empty((), dtype=torch.int64).random_().item())
        generator = torch.Generator()
        generator.manual_seed(seed)
        order = torch.randperm(self.n_rows, generator=generator).tolist()
        step = self.batch_size * self.num_replicas
        for start in range(0, self.n_rows, step):
            rows = order[start:start + step]
            share = rows[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
            if share:
                yield from ((i, self.num_replicas / len(rows)) for i in share)
            else:
                yield order[0], 0.0

    def __len__(self) -> int:
        return self.num_samples


class ShardedEvalSampler(DistributedSampler):
    """In-order evaluation shards, as Lightning's own (rank r gets rows r, r + W, ...), padded to equal
    length with rows of weight 0 instead of repeated rows that would count twice in the metrics."""

    def __init__(self, n_rows: int, *, rank: int, world: int):
        super().__init__(range(n_rows), num_replicas=world, rank=rank, shuffle=False, drop_last=False)
        self.n_rows = n_rows

    def __iter__(self):
        for j in range(self.num_samples):
            p = self.rank + j * self.num_replicas
            yield (p, 1.0) if p < self.n_rows else (p % self.n_rows, 0.0)


class ShardedDataModule(ManifestDataModule):
    """:class:`ManifestDataModule` whose train and val loaders shard without double counting under DDP.

    On one process it is the plain data module (same loaders, same sample order as before). With
    ``world > 1`` the loaders are built on each rank (Lightning calls them there) with the samplers
    above. Prediction keeps Lightning's padded sampler: :func:`gather_predictions` de-duplicates by uuid.
    """

    def _sharded(self, df: pd.DataFrame, sampler: DistributedSampler) -> DataLoader:
        base = self._loader(df, shuffle=False)
        return DataLoader(WeightedRows(base.dataset), batch_size=self.batch_size, sampler=sampler,
                          num_workers=base.num_workers, pin_memory=base.pin_memory,
                          persistent_workers=base.persistent_workers)

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (1, 0) if trainer is None else (trainer.world_size, trainer.global_rank)

    def train_dataloader(self) -> DataLoader:
        world, rank = self._world()
        if world == 1:
            return super().train_dataloader()
        df = self.frames["train"]
        return self._sharded(df, ShardedTrainSampler(len(df), batch_size=self.batch_size, rank=rank, world=world))

    def val_dataloader(self):
        world, rank = self._world()
        df = self.frames["val"]
        if world == 1 or df is None or df.empty:
            return super().val_dataloader()
        return self._sharded(df, ShardedEvalSampler(len(df), rank=rank, world=world))


class _RankRng(L.Callback):
    """Under DDP, start every rank's fit from the global torch RNG state the one-process fit starts from.

    Lightning reseeds each spawned rank (``reset_seed`` when the process group starts), which would
    drop the draws the module's construction made; with this the ranks draw the same shuffling seeds
    as a one-process run (:class:`ShardedTrainSampler`). One process: nothing to do.
    """

    def __init__(self, state: torch.Tensor):
        self.state = state

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        if trainer.world_size > 1:
            torch.set_rng_state(self.state)


def make_datamodule(cfg: DictConfig, classes: Sequence[str], train: pd.DataFrame | None, *,
                    val: pd.DataFrame | None = None, predict: dict | None = None) -> ManifestDataModule:
    disk = cache_from_config(cfg) if cfg.data.get("cache", False) else None
    set_memory_cache(0 if disk is not None else cfg.data.get("memory_cache_mb", 0))
    return ShardedDataModule(
        train,
        classes,
        image_size=cfg.model.image_size,
        batch_size=cfg.recipe.batch_size,
        val=val,
        predict=predict,
        num_workers=cfg.data.num_workers,
        pin_memory=bool(cfg.data.pin_memory) and torch.cuda.is_available(),
        image_cache=disk,
    )


def make_trainer(cfg: DictConfig, *, callbacks: list | None = None, root_dir: str | None = None,
                 validate: bool = False, max_steps: int = -1) -> L.Trainer:
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    kwargs.pop("jobs", None)  # cleanloop's, not Lightning's: trainings side by side (cleanloop.parallel)
    if int(kwargs.get("num_nodes", 1)) > 1:
        # under ddp_spawn each node's cleanloop process would run the whole step: every node would write
        # the outputs and MLflow runs, and merge only its own ranks' predictions (a node-local folder)
        raise CleanloopError(f"trainer.num_nodes={kwargs['num_nodes']}: cleanloop trains on one node per job "
                             "(trainer=ddp on its GPUs); spread folds or sweep points over nodes as separate jobs")
    if not validate:
        kwargs["limit_val_batches"] = 0
    return L.Trainer(
        **kwargs,
        max_epochs=cfg.recipe.epochs if max_steps < 0 else -1,  # a step budget replaces the epoch count
        max_steps=max_steps,
        logger=False,  # cleanloop logs to MLflow itself, nested under the step's run
        enable_checkpointing=False,
        callbacks=callbacks or [],
        default_root_dir=root_dir,
        num_sanity_val_steps=0,
    )


BUDGETS = ("epochs", "steps")
CHECKPOINTS = ("last", "best_val")


def steps_per_epoch(n_rows: int, *, batch_size: int, world_size: int = 1) -> int:
    """Optimizer steps in one pass over ``n_rows``: ceil(N / (W x batch)), as many under DDP's sharding
    (each rank takes ``batch_size`` rows of every global batch) as in one process with W x batch rows
    per step; the last batch is kept, not dropped."""
    return math.ceil(math.ceil(n_rows / max(1, world_size)) / batch_size)


def step_budget(*, budget: str, epochs: int, n_rows: int, budget_rows: int | None, batch_size: int,
                world_size: int = 1) -> int:
    """``max_steps`` for the trainer: -1 (train ``epochs`` passes over ``n_rows``) or a fixed step count.

    ``budget="steps"`` holds the optimizer steps of ``epochs`` passes over ``budget_rows`` rows (the
    baseline's train set), so a cleaned run on fewer rows trains as many steps as its baseline, not
    fewer: the two runs differ only in their rows. ``budget="epochs"`` keeps the epoch count, so a
    smaller set gets fewer steps.
    """
    if budget not in BUDGETS:
        raise CleanloopError(f"recipe.budget={budget!r}: choose {' or '.join(BUDGETS)}")
    if budget == "epochs" or budget_rows is None or budget_rows == n_rows:
        return -1
    return epochs * steps_per_epoch(budget_rows, batch_size=batch_size, world_size=world_size)


class BestValState(L.Callback):
    """``recipe.checkpoint=best_val``: keep the weights of the epoch with the lowest ``val/loss`` and
    load them when training ends. It reads only the validation loader, i.e. the manifest's ``val``
    rows: the test split never chooses the model it judges."""

    monitor = "val/loss"

    def __init__(self):
        self.best: float = math.inf
        self.best_epoch: int | None = None
        self.state: dict | None = None

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        if value < self.best:
            self.best, self.best_epoch = value, trainer.current_epoch
            self.state = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.state is not None:
            module.load_state_dict(self.state)


class Predictions(NamedTuple):
    """One row set's predictions, in the row order given."""

    uuids: list[str]
    probs: np.ndarray  # (N, K)
    embeddings: np.ndarray  # (N, D) pooled backbone features


def collect(outputs: list[dict]) -> Predictions:
    """Concatenate predict_step outputs."""
    uuids = [u for batch in outputs for u in batch["image_uuid"]]
    probs = np.concatenate([batch["probs"].float().numpy() for batch in outputs], axis=0)
    emb = np.concatenate([batch["embedding"].float().numpy() for batch in outputs], axis=0)
    return Predictions(uuids, probs, emb)


class RankPredictionWriter(BasePredictionWriter):
    """Each rank writes its share of the predictions to ``out_dir`` (no pickle: JSON + .npy).

    Under DDP, DistributedSampler pads the last batch by repeating rows so every rank gets the
    same count; :func:`gather_predictions` puts the shares back together by ``image_uuid``.
    """

    def __init__(self, out_dir: Path):
        super().__init__(write_interval="epoch")
        self.out_dir = Path(out_dir)

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        if predictions and isinstance(predictions[0], dict):  # one dataloader: a flat list of batches
            predictions = [predictions]
        for i, outputs in enumerate(predictions):
            stem = self.out_dir / f"loader{i}-rank{trainer.global_rank}"
            if not outputs:
                continue
            pred = collect(outputs)
            stem.with_suffix(".json").write_text(json.dumps(pred.uuids))
            np.save(stem.with_suffix(".probs.npy"), pred.probs)
            np.save(stem.with_suffix(".emb.npy"), pred.embeddings)


def gather_predictions(folder: Path, loader: int, uuids: list[str]) -> Predictions:
    """Merge every rank's share for one dataloader and return it in ``uuids`` order, each row once."""
    parts = sorted(folder.glob(f"loader{loader}-rank*.json"))
    got_uuids: list[str] = []
    probs, emb = [], []
    for part in parts:
        stem = part.with_suffix("")
        got_uuids += json.loads(part.read_text())
        probs.append(np.load(stem.with_suffix(".probs.npy")))
        emb.append(np.load(stem.with_suffix(".emb.npy")))
    first: dict[str, int] = {}
    for i, u in enumerate(got_uuids):
        first.setdefault(u, i)  # DistributedSampler padding repeats rows: keep one copy
    missing = [u for u in uuids if u not in first]
    if missing:
        raise RuntimeError(f"prediction lost {len(missing)} row(s), e.g. {missing[:3]}")
    order = np.array([first[u] for u in uuids], dtype=np.int64)
    return Predictions(list(uuids), np.concatenate(probs)[order], np.concatenate(emb)[order])


def predict(cfg: DictConfig, module: Classifier, frames: dict[str, pd.DataFrame]) -> dict[str, Predictions]:
    """Probabilities and embeddings of ``module`` on each named frame (eval transform, no augmentation).

    Works the same on one process and under DDP: ranks write their shares, which are merged by
    ``image_uuid`` so padding never duplicates or drops a row.
    """
    if not frames:
        return {}
    apply_threads(cfg)
    dm = make_datamodule(cfg, module.classes, None, predict=frames)
    with tempfile.TemporaryDirectory() as tmp:
        writer = RankPredictionWriter(Path(tmp))
        make_trainer(cfg, callbacks=[writer], root_dir=tmp).predict(module, datamodule=dm, return_predictions=False)
        return {name: gather_predictions(Path(tmp), i, df["image_uuid"].tolist())
                for i, (name, df) in enumerate(frames.items())}


def fit_predict(
    cfg: DictConfig,
    classes: Sequence[str],
    train: pd.DataFrame,
    *,
    predict_frames: dict[str, pd.DataFrame] | None = None,
    val: pd.DataFrame | None = None,
    log_prefix: str = "",
    budget_rows: int | None = None,
    callbacks: list | None = None,
) -> tuple[Classifier, dict[str, Predictions]]:
    """Train the recipe on ``train`` rows, then predict each of ``predict_frames``.

    ``budget_rows``: the train-set size that sets the step budget under ``recipe.budget=steps``
    (the baseline's rows, for a cleaned run); None = ``len(train)``. ``val`` rows are the only ones
    ``recipe.checkpoint=best_val`` selects on. The module's ``fit_info`` records the budget, the steps
    trained and the checkpoint evaluated.
    """
    apply_threads(cfg)  # trainer.jobs: the same thread count wherever this training runs
    L.seed_everything(cfg.recipe.seed, workers=True, verbose=False)
    module = build_module(cfg, classes)
    module.train()  # from_pretrained hands back eval mode
    dm = make_datamodule(cfg, classes, train, val=val)
    has_val = val is not None and not val.empty
    choice = cfg.recipe.get("checkpoint", "last")
    if choice not in CHECKPOINTS:
        raise CleanloopError(f"recipe.checkpoint={choice!r}: choose {' or '.join(CHECKPOINTS)}")
    best = BestValState() if choice == "best_val" and has_val else None
    if choice == "best_val" and not has_val:
        log.warning("%srecipe.checkpoint=best_val but the manifest has no val rows: evaluating the last epoch",
                    log_prefix)
    budget = cfg.recipe.get("budget", "epochs")
    epoch_log = EpochLog(log_prefix)
    with tempfile.TemporaryDirectory() as tmp:
        record = Path(tmp) / "fit-record.json"
        # the RNG state the fit starts from, after the module drew its head: DDP ranks restart from it
        all_callbacks = [_RankRng(torch.get_rng_state()), epoch_log, *([best] if best else []),
                         FitRecord(record, epoch_log, best), *(callbacks or [])]
        trainer = make_trainer(cfg, callbacks=all_callbacks, root_dir=tmp, validate=has_val)
        max_steps = step_budget(budget=budget, epochs=int(cfg.recipe.epochs), n_rows=len(train),
                                budget_rows=budget_rows, batch_size=int(cfg.recipe.batch_size),
                                world_size=trainer.world_size)
        if max_steps > 0:
            trainer = make_trainer(cfg, callbacks=all_callbacks, root_dir=tmp, validate=has_val, max_steps=max_steps)
        trainer.fit(module, datamodule=dm)
        done = json.loads(record.read_text())  # from rank 0, wherever it ran
    if trainer.world_size > 1:  # the spawned ranks could not log: their epoch lines and metrics, now
        for epoch, of, values in done["history"]:
            epoch_log.emit(epoch, of, values)
    module.eval()
    module.fit_info = {
        "budget": budget, "n_rows": int(len(train)), "budget_rows": int(budget_rows or len(train)),
        "max_steps": max_steps, "steps": done["steps"], "epochs": done["epochs"],
        "checkpoint": "best_val" if best else "last",
        "best_epoch": None if done["best_epoch"] is None else int(done["best_epoch"]) + 1,
    }
    return module, predict(cfg, module, predict_frames or {})

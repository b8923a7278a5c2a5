"""The classifier: a transformers SigLIP vision tower plus a linear head, as a LightningModule.

``load_backbone`` is the one way weights enter cleanloop: ``from_pretrained`` on a hub id or
a local folder. The tiny CPU model is built from a config, saved with ``save_pretrained`` and
loaded back through the same call, so tests exercise the real path.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from cleanloop.config import short_hash, to_container
from cleanloop.data import augment_batch
from cleanloop.errors import CleanloopError

log = logging.getLogger(__name__)

HEADS = ("softmax", "sigmoid")


SIGLIP_TYPES = ("siglip", "siglip_vision_model")  # a full SigLIP checkpoint or its vision tower alone


def build_tiny(config: dict, out_dir: str | Path, *, seed: int = 0) -> Path:
    """A random-init vision backbone from ``config`` kwargs, saved with save_pretrained; returns its folder.

    ``config["model_type"]`` names the transformers architecture (default ``siglip_vision_model``;
    e.g. ``resnet`` or ``convnext``); the other keys are its config's keyword arguments.
    """
    import tempfile

    from transformers import AutoConfig, AutoModel

    config = dict(config)
    model_type = config.pop("model_type", "siglip_vision_model")
    ident = {"config": config, "seed": seed} if model_type == "siglip_vision_model" else \
        {"model_type": model_type, "config": config, "seed": seed}
    prefix = "siglip" if model_type == "siglip_vision_model" else model_type
    out_dir = Path(out_dir) / f"{prefix}-{short_hash(ident)}"
    if not (out_dir / "config.json").is_file():
        # fork_rng: building draws from a private RNG, so the caller's stream (the recipe's head init,
        # shuffling, augmentation) is the same whether this model was built now or found on disk
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModel.from_config(AutoConfig.for_model(model_type, **config))
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        # a unique temporary sibling, renamed into place: parallel jobs never write into one folder,
        # and a crash mid-save never leaves a folder that looks complete
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
        model.save_pretrained(tmp)
        try:
            tmp.rename(out_dir)
        except OSError:  # another job published the same model first: theirs is identical
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _model_type(name_or_path: str | Path) -> str | None:
    """The checkpoint's ``model_type`` from its config.json (local folder or hub), or None if unreadable."""
    local = Path(str(name_or_path)) / "config.json"
    if local.is_file():
        return json.loads(local.read_text()).get("model_type")
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(name_or_path)).model_type
    except (OSError, ValueError):
        return None


def load_backbone(name_or_path: str | Path, *, attn_implementation: str | None = "sdpa") -> nn.Module:
    """``from_pretrained`` on a hub id (e.g. google/medsiglip-448) or a local folder.

    A SigLIP checkpoint (vision + text, or the vision tower alone) loads its vision tower only,
    with ``attn_implementation``; any other transformers vision backbone (ResNet, ConvNeXt...)
    loads with ``AutoModel``. Without network or access the error says how to supply the weights.
    """
    from transformers import AutoModel, SiglipVisionModel

    model_type = _model_type(name_or_path)
    try:
        if model_type is None or model_type in SIGLIP_TYPES:
            kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
            return SiglipVisionModel.from_pretrained(str(name_or_path), **kwargs)
        return AutoModel.from_pretrained(str(name_or_path))
    except (OSError, ValueError) as e:
        if Path(str(name_or_path)).exists():
            raise CleanloopError(
                f"model.name_or_path={name_or_path}: not a loadable backbone folder ({e.__class__.__name__}); "
                "it needs config.json and model.safetensors from save_pretrained"
            ) from e
        raise CleanloopError(
            f"model.name_or_path={name_or_path}: weights not found locally and the Hugging Face hub is not "
            "reachable or access is not granted; run `huggingface-cli login` after accepting the model's "
            "licence on the hub, or download it once and set model.name_or_path=/path/to/local/folder"
        ) from e


def embedding_width(backbone: nn.Module) -> int:
    """The pooled embedding's width: ``hidden_size`` (ViT-style) or the last stage's (CNN-style)."""
    config = backbone.config
    return int(config.hidden_size if getattr(config, "hidden_sizes", None) is None else config.hidden_sizes[-1])


def backbone_from_config(model_cfg, *, cache_dir: str | Path, seed: int) -> nn.Module:
    """Resolve ``model.name_or_path`` (building the tiny model when it is null) and load it."""
    name_or_path = model_cfg.name_or_path
    if name_or_path is None:
        if model_cfg.config is None:
            raise CleanloopError("model: set model.name_or_path (hub id or folder) or model.config")
        name_or_path = build_tiny(to_container(model_cfg.config), Path(cache_dir) / "models", seed=seed)
    return load_backbone(name_or_path, attn_implementation=model_cfg.get("attn_implementation"))


def _takes(factory: Callable, name: str) -> bool:
    """Whether the optimizer accepts the keyword ``name`` and the recipe left it unset."""
    import inspect

    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    given = getattr(factory, "keywords", {}) or {}
    return name in params and name not in given


class Classifier(L.LightningModule):
    """Vision backbone (SigLIP, or a CNN such as ResNet) -> pooled embedding -> linear head over K classes.

    ``head="softmax"`` trains with cross-entropy; ``head="sigmoid"`` with one-vs-rest BCE (the
    team's deployed model). ``predict_step`` returns ``{"image_uuid": [...], "probs": (B, K)}``:
    softmax probabilities, or per-class sigmoid scores that need not sum to one.
    """

    def __init__(
        self,
        backbone: nn.Module,
        classes: Sequence[str],
        *,
        head: str = "softmax",
        image_mean: Sequence[float] = (0.5, 0.5, 0.5),
        image_std: Sequence[float] = (0.5, 0.5, 0.5),
        optimizer: Callable | None = None,
        scheduler: Callable | None = None,
        lr: float = 1e-3,
        head_lr: float | None = None,
        warmup_fraction: float = 0.0,
        augment: dict | None = None,
        channels_last: bool = False,
    ):
        super().__init__()
        if head not in HEADS:
            raise CleanloopError(f"recipe.head={head!r}: must be one of {', '.join(HEADS)}")
        self.backbone = backbone
        self.classes = list(classes)
        self.head_kind = head
        self.head = nn.Linear(embedding_width(backbone), len(self.classes))
        # uint8 pixels are scaled and normalised here, on the model's device.
        self.register_buffer("mean", torch.tensor(image_mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0,
                             persistent=False)
        self.register_buffer("std", torch.tensor(image_std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0,
                             persistent=False)
        self.optimizer_factory = optimizer or torch.optim.AdamW
        self.scheduler_factory = scheduler
        self.lr, self.head_lr, self.warmup_fraction = lr, head_lr, warmup_fraction
        self.augment = dict(augment or {})
        # NHWC activations and weights (``model.channels_last``): convolutions run faster that way on
        # CPU and on GPU tensor cores (bench B9); the arithmetic is the same up to summation order.
        self.channels_last = bool(channels_last)
        self._epoch_sums: torch.Tensor | None = None
        self._val_sums: torch.Tensor | None = None
        if self.channels_last:
            self.backbone.to(memory_format=torch.channels_last)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pooled backbone embedding of a uint8 (B, 3, S, S) batch (float input is taken as 0..255)."""
        x = (pixel_values.float() - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(pixel_values=x).pooler_output.flatten(1)  # CNNs pool to (B, C, 1, 1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(pixel_values))

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        return torch.sigmoid(logits) if self.head_kind == "sigmoid" else logits.softmax(-1)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The batch mean loss; with ``weight`` (one per row) the weighted sum of the rows' losses."""
        if self.head_kind == "sigmoid":
            target = F.one_hot(labels, len(self.classes)).to(logits.dtype)
            if weight is None:
                return F.binary_cross_entropy_with_logits(logits, target)
            rows = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(1)
        else:
            if weight is None:
                return F.cross_entropy(logits, labels)
            rows = F.cross_entropy(logits, labels, reduction="none")
        return (rows * weight.to(rows.dtype)).sum()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x = batch["pixel_values"]
        if self.augment:  # train-time augmentation on the whole batch, on the device
            x = augment_batch(x, **self.augment)
        logits = self(x)
        # under DDP the sampler weighs rows (cleanloop.training.ShardedTrainSampler): the ranks' weighted
        # sums average to the one-process mean over the global batch, and padding rows weigh 0
        weight = batch.get("weight")
        loss = self.loss(logits, batch["label"], weight)
        # The epoch's mean loss and accuracy, summed here and handed to Lightning once per epoch:
        # `self.log` on every step is a visible share of a small model's CPU step time.
        with torch.no_grad():
            step = self._row_sums(logits.detach(), batch["label"], None if weight is None else weight > 0)
            self._epoch_sums = step if self._epoch_sums is None else self._epoch_sums + step
        if self._epoch_ends():
            # every rank reaches its last batch at the same step (equal batch counts): sum over ranks
            loss_sum, correct, n = self.trainer.strategy.reduce(self._epoch_sums, reduce_op="sum")
            self.log("train/loss", loss_sum / n, on_step=False, on_epoch=True, batch_size=1)
            self.log("train/acc", correct / n, on_step=False, on_epoch=True, batch_size=1)
            self._epoch_sums = None
        return loss

    def on_train_epoch_start(self) -> None:
        self._epoch_sums = None

    def _epoch_ends(self) -> bool:
        """This batch is the epoch's last: the loader is done, or the step budget ends with this step."""
        trainer = self.trainer
        max_steps = trainer.max_steps
        return bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
                    or (max_steps is not None and max_steps > 0 and trainer.global_step + 1 >= max_steps))

    def _row_sums(self, logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """(sum of row losses, correct rows, rows) over the rows ``keep`` marks (None: all)."""
        if self.head_kind == "sigmoid":
            target = F.one_hot(labels, len(self.classes)).to(logits.dtype)
            rows = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(1)
        else:
            rows = F.cross_entropy(logits, labels, reduction="none")
        hit = logits.argmax(-1) == labels
        if keep is not None:
            rows, hit = rows[keep], hit[keep]
        return torch.stack([rows.float().sum(), hit.sum().float(), torch.tensor(float(len(rows)), device=logits.device)])

    def on_validation_epoch_start(self) -> None:
        self._val_sums = None

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # Sums over the real rows, all-reduced once at the last batch: under DDP the sampler pads the
        # ranks with rows of weight 0 (cleanloop.training.ShardedEvalSampler), which would otherwise
        # count twice, and a mean of the ranks' means would weigh a short rank like a full one.
        logits = self(batch["pixel_values"])
        weight = batch.get("weight")
        step = self._row_sums(logits, batch["label"], None if weight is None else weight > 0)
        self._val_sums = step if getattr(self, "_val_sums", None) is None else self._val_sums + step
        if batch_idx + 1 == self.trainer.num_val_batches[0]:  # ranks have equal batch counts
            loss_sum, correct, n = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum")
            self.log("val/loss", loss_sum / n, on_step=False, on_epoch=True, batch_size=1)
            self.log("val/acc", correct / n, on_step=False, on_epoch=True, batch_size=1)
            self._val_sums = None

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """Probabilities (B, K) and pooled embeddings (B, D), keyed by ``image_uuid``."""
        emb = self.embed(batch["pixel_values"])
        return {"image_uuid": list(batch["image_uuid"]), "probs": self.probs(self.head(emb)).cpu(),
                "embedding": emb.float().cpu()}

    def configure_optimizers(self):
        groups = [
            {"params": [p for p in self.backbone.parameters() if p.requires_grad], "lr": self.lr},
            {"params": list(self.head.parameters()), "lr": self.head_lr or self.lr},
        ]
        kwargs = {"lr": self.lr}
        if self.device.type == "cuda" and _takes(self.optimizer_factory, "fused"):
            kwargs["fused"] = True  # one kernel per step for all parameters (AdamW, Adam, SGD on CUDA)
        elif self.device.type == "cpu" and _takes(self.optimizer_factory, "foreach"):
            # PyTorch's CPU default is one loop per tensor; the multi-tensor path does the same arithmetic
            # in fewer calls (B9 times both: within its noise on the demo)
            kwargs["foreach"] = True
        optimizer = self.optimizer_factory(groups, **kwargs)
        if self.scheduler_factory is None:
            return optimizer
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler_factory(
            optimizer, num_warmup_steps=int(self.warmup_fraction * total), num_training_steps=total
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- saving: a plain folder (backbone via save_pretrained, head as safetensors), no pickle --

    def save(self, out_dir: str | Path) -> Path:
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        self.backbone.save_pretrained(out_dir / "backbone")
        save_file({k: v.contiguous() for k, v in self.head.state_dict().items()}, out_dir / "head.safetensors")
        meta = {"classes": self.classes, "head": self.head_kind, "channels_last": self.channels_last,
                "image_mean": (self.mean.flatten() / 255.0).tolist(), "image_std": (self.std.flatten() / 255.0).tolist()}
        (out_dir / "cleanloop.json").write_text(json.dumps(meta, indent=2))
        return out_dir

    @classmethod
    def load(cls, model_dir: str | Path, *, attn_implementation: str | None = "sdpa") -> Classifier:
        from safetensors.torch import load_file

        model_dir = Path(model_dir)
        meta_path = model_dir / "cleanloop.json"
        if not meta_path.is_file():
            raise CleanloopError(f"{model_dir}: not a cleanloop model folder (no cleanloop.json); use train/<role>/model")
        meta = json.loads(meta_path.read_text())
        model = cls(load_backbone(model_dir / "backbone", attn_implementation=attn_implementation),
                    meta["classes"], head=meta["head"], image_mean=meta["image_mean"], image_std=meta["image_std"],
                    channels_last=meta.get("channels_last", False))
        model.head.load_state_dict(load_file(model_dir / "head.safetensors"))
        return model

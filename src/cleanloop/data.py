"""Images from a manifest into batches: PIL decode, pad to square, resize; batched augmentation.

``ImageDataset`` yields ``{"pixel_values", "label", "image_uuid"}``; ``ManifestDataModule``
wraps the train / val / test / predict splits for Lightning.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import lightning as L
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from cleanloop.imagecache import CacheReader, DiskImageCache, square_pixels
from cleanloop.images import load_image

log = logging.getLogger(__name__)
_CLAMP_LOGGED: set[tuple[int, int]] = set()


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, else ``os.cpu_count``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def clamp_workers(requested: int) -> int:
    """``data.num_workers`` capped at the usable cores (PyTorch warns past that); logged once per pair."""
    requested = max(0, int(requested))
    cores = usable_cores()
    if requested <= cores:
        return requested
    if (requested, cores) not in _CLAMP_LOGGED:
        _CLAMP_LOGGED.add((requested, cores))
        log.info("data.num_workers=%d but this machine gives the process %d CPU core(s): using %d DataLoader "
                 "workers", requested, cores, cores)
    return cores


class ImageTransform:
    """PIL image -> uint8 tensor (3, S, S): pad to square, resize. Deterministic, so cacheable.

    Augmentation is not done here but on whole batches on the model's device
    (:func:`augment_batch`), and normalisation happens in the model: batches travel as uint8,
    a quarter of the bytes of float32, and the per-image CPU work stays small.
    """

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return to_chw(square_pixels(img, self.size).copy())


def to_chw(pixels: np.ndarray) -> torch.Tensor:
    """(S, S, 3) uint8 array -> (3, S, S) uint8 tensor (a view)."""
    return torch.from_numpy(pixels).permute(2, 0, 1)


def augment_batch(
    x: torch.Tensor, *, hflip: bool = False, max_rotation: float = 0.0, crop_scale: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random crop-and-resize, rotation and flip of a (B, C, S, S) batch in one affine resample.

    Each image gets its own draw: a zoom keeping a side fraction in [crop_scale, 1] at a
    random offset, a rotation in [-max_rotation, max_rotation] degrees, and a horizontal flip
    with probability 0.5 when ``hflip``. Returns float values on the input's scale.
    """
    b = x.shape[0]
    dev = x.device
    rand = lambda: torch.rand(b, generator=generator).to(dev)  # noqa: E731  (CPU generator, any device)
    x = x.float()
    scale = crop_scale + (1.0 - crop_scale) * rand()
    angle = torch.deg2rad((rand() * 2 - 1) * max_rotation)
    flip = torch.where(rand() < 0.5, -1.0, 1.0) if hflip else torch.ones(b, device=dev)
    shift = (1.0 - scale)
    tx, ty = (rand() * 2 - 1) * shift, (rand() * 2 - 1) * shift
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class MemoryCache:
    """Decoded, resized uint8 images kept in this process up to a byte budget (first come, first kept).

    Small datasets (the demo, tests) decode each image once per process instead of once per
    epoch and fold. With DataLoader workers each worker holds its own copy.
    """

    def __init__(self, budget_mb: float = 0.0):
        self.budget = int(budget_mb * 2**20)
        self.used = 0
        self.items: dict[tuple[str, int], torch.Tensor] = {}

    def get(self, path: str, transform: ImageTransform) -> torch.Tensor:
        key = (path, transform.size)
        x = self.items.get(key)
        if x is None:
            x = transform(load_image(path))
            if self.used + x.numel() <= self.budget:
                self.items[key] = x
                self.used += x.numel()
        return x


_MEMORY_CACHE = MemoryCache()


def set_memory_cache(budget_mb: float) -> MemoryCache:
    """Resize the process-wide image cache (``data.memory_cache_mb``); 0 turns it off."""
    _MEMORY_CACHE.budget = int(budget_mb * 2**20)
    return _MEMORY_CACHE


class ImageDataset(Dataset):
    """Rows of a manifest: ``abs_path``, ``image_uuid`` and a class index (-1 when unlabelled).

    With ``cached`` (the on-disk image cache's reader for these paths) images are read from the
    cache; otherwise each is decoded and resized here (kept in the memory cache if it has room).
    """

    def __init__(self, paths: Sequence[str], uuids: Sequence[str], labels: Sequence[int],
                 transform: ImageTransform, cached: CacheReader | None = None, *, with_ids: bool = True):
        self.paths, self.uuids = list(paths), list(uuids)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform, self.cached = transform, cached
        # Train and val batches leave the ids out: Lightning walks every element of a batch's
        # lists when it moves the batch to the device (thousands of calls per epoch).
        self.with_ids = with_ids

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        pixels = to_chw(self.cached[i]) if self.cached is not None else _MEMORY_CACHE.get(self.paths[i], self.transform)
        item = {"pixel_values": pixels, "label": int(self.labels[i])}
        if self.with_ids:
            item["image_uuid"] = self.uuids[i]
        return item


def make_dataset(df: pd.DataFrame, classes: Sequence[str], transform,
                 image_cache: DiskImageCache | None = None, *, with_ids: bool = True) -> ImageDataset:
    index = {c: i for i, c in enumerate(classes)}
    labels = df["label"].map(index).fillna(-1).astype(int).to_numpy()
    paths = df["abs_path"].tolist()
    cached = image_cache.ensure(paths) if image_cache is not None else None
    return ImageDataset(paths, df["image_uuid"].tolist(), labels, transform, cached, with_ids=with_ids)


class ManifestDataModule(L.LightningDataModule):
    """Train / val / predict loaders over manifest rows.

    ``predict`` holds any number of named frames (held-out fold, test split, ...); Lightning's
    ``trainer.predict`` runs them in order and returns one list per loader.
    """

    def __init__(
        self,
        train: pd.DataFrame | None,
        classes: Sequence[str],
        *,
        image_size: int,
        batch_size: int,
        val: pd.DataFrame | None = None,
        predict: dict[str, pd.DataFrame] | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        image_cache: DiskImageCache | None = None,
    ):
        super().__init__()
        self.classes = list(classes)
        self.frames = {"train": train, "val": val}
        self.predict_frames = dict(predict or {})
        self.batch_size, self.num_workers, self.pin_memory = batch_size, clamp_workers(num_workers), pin_memory
        self.transform = ImageTransform(image_size)
        if image_cache is not None and image_cache.size != image_size:
            raise ValueError(f"image cache size {image_cache.size} != image_size {image_size}")
        self.image_cache = image_cache

    def _loader(self, df: pd.DataFrame, *, shuffle: bool, with_ids: bool = False) -> DataLoader:
        return DataLoader(
            make_dataset(df, self.classes, self.transform, self.image_cache, with_ids=with_ids),
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.frames["train"], shuffle=True)

    def val_dataloader(self):
        if self.frames["val"] is None or self.frames["val"].empty:
            return []
        return self._loader(self.frames["val"], shuffle=False)

    def predict_dataloader(self) -> list[DataLoader]:
        return [self._loader(df, shuffle=False, with_ids=True) for df in self.predict_frames.values()]

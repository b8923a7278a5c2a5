"""The embedded demo dataset (CONTRACT §5), built from scikit-learn's bundled digits.

Digits are written as PNGs; the train labels get seeded class-conditional noise from a
seeded noise matrix; a few garbage images (rendered text pages and crops of
scikit-learn's sample photos) join the train split with random labels. ``ground_truth.csv``
records what was done to each row so ``flag`` can score itself.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

log = logging.getLogger(__name__)

CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_WORDS = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor".split()


def noise_matrix(k: int, noise_rate: float, *, seed: int, n_heavy: int = 3, heavy_rate: float = 0.35) -> np.ndarray:
    """A K x K column-stochastic matrix P(given=i | true=j) with systematic, class-conditional noise.

    ``n_heavy`` classes (chosen by ``seed``) lose ``heavy_rate`` of their labels, almost all to
    one look-alike class, like the team's systematic wrong labels (nail-fungus labels on
    armpit photos); the other classes share the rest so that the prior-free mean flip rate is
    ``noise_rate``, split two to one between two other classes.
    """
    rng = np.random.default_rng(seed)
    light_rate = (k * noise_rate - n_heavy * heavy_rate) / (k - n_heavy)
    if not 0.0 <= light_rate < 1.0:
        raise ValueError(f"noise_rate={noise_rate} cannot be met with {n_heavy} classes at {heavy_rate}")
    heavy = rng.permutation(k)[:n_heavy]
    rates = np.full(k, light_rate)
    rates[heavy] = heavy_rate
    nm = np.diag(1.0 - rates)
    for j in range(k):
        a, b = rng.choice([i for i in range(k) if i != j], size=2, replace=False)
        share = 0.9 if j in heavy else 2 / 3
        nm[a, j] += rates[j] * share
        nm[b, j] += rates[j] * (1 - share)
    return nm


def flip_labels(labels: np.ndarray, nm: np.ndarray, *, seed: int) -> np.ndarray:
    """Noisy labels with exactly round(n_j * (1 - nm[j, j])) flips in each true class j,
    split between the destinations in proportion to the column ``nm[:, j]``."""
    rng = np.random.default_rng(seed)
    noisy = labels.copy()
    for j in range(nm.shape[1]):
        rows = rng.permutation(np.flatnonzero(labels == j))
        off = nm[:, j].copy()
        off[j] = 0.0
        n_flip = int(round(len(rows) * off.sum()))
        counts = np.floor(off / max(off.sum(), 1e-12) * n_flip).astype(int)
        counts[np.argmax(off)] += n_flip - counts.sum()  # rounding remainder to the main destination
        start = 0
        for dest, c in enumerate(counts):
            noisy[rows[start : start + c]] = dest
            start += c
    return noisy


def _digit_image(pixels: np.ndarray, size: int) -> Image.Image:
    # Digits are 8x8 ink intensities in 0..16: white ink on black, upscaled smoothly.
    img = Image.fromarray((pixels * (255.0 / 16.0)).astype(np.uint8), mode="L")
    return img.resize((size, size), Image.Resampling.BICUBIC)


def _text_page(rng: np.random.Generator, size: int) -> Image.Image:
    # A scanned-page look: dark lines of words on white, rendered large then shrunk.
    big = 8 * size
    img = Image.new("L", (big, big), 245)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=big // 10)
    for row in range(8):
        words = " ".join(rng.choice(_WORDS, size=4))
        draw.text((big // 16, row * big // 8 + 2), words, fill=20, font=font)
    return img.resize((size, size), Image.Resampling.LANCZOS).convert("RGB")


def _photo_crop(rng: np.random.Generator, photos: list[np.ndarray], size: int) -> Image.Image:
    photo = photos[int(rng.integers(len(photos)))]
    h, w = photo.shape[:2]
    side = int(rng.integers(min(h, w) // 4, min(h, w) // 2))
    y, x = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
    crop = Image.fromarray(photo[y : y + side, x : x + side])
    return crop.resize((size, size), Image.Resampling.LANCZOS)


def build_demo(
    out_dir: str | Path,
    *,
    noise_rate: float = 0.15,
    n_garbage: int = 12,
    image_size: int = 32,
    test_fraction: float = 0.25,
    group_size: int = 3,
    seed: int = 0,
) -> Path:
    """Write ``manifest.csv``, ``ground_truth.csv`` and ``images/`` to ``out_dir``; return the manifest path.

    The folder is built in a temporary sibling and renamed into place, so a killed build
    leaves no half-written dataset.
    """
    from sklearn.datasets import load_digits, load_sample_images
    from sklearn.model_selection import train_test_split

    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    digits = load_digits()
    n = len(digits.target)
    true = np.array(CLASS_NAMES)[digits.target]
    uuids = np.array([f"digit-{i:05d}" for i in range(n)])
    train_idx, test_idx = train_test_split(
        np.arange(n), test_size=test_fraction, stratify=digits.target, random_state=seed
    )
    split = np.empty(n, dtype=object)
    split[train_idx], split[test_idx] = "train", "test"

    # Class-conditional noise on the train labels only: test labels stay clean.
    y_train = digits.target[train_idx]
    noisy = flip_labels(y_train, noise_matrix(len(CLASS_NAMES), noise_rate, seed=seed), seed=seed)
    given = true.copy()
    given[train_idx] = np.array(CLASS_NAMES)[noisy]

    # Synthetic patient-like groups within each split, so grouped folds are exercised.
    group = np.empty(n, dtype=object)
    for name, idx in (("tr", train_idx), ("te", test_idx)):
        order = rng.permutation(idx)
        for j, i in enumerate(order):
            group[i] = f"{name}-g{j // group_size:04d}"

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        (tmp / "images").mkdir()
        for i in range(n):
            _digit_image(digits.images[i], image_size).save(tmp / "images" / f"{uuids[i]}.png")
        rows = pd.DataFrame(
            {"image_uuid": uuids, "path": [f"images/{u}.png" for u in uuids], "label": given,
             "split": split, "group": group}
        )
        truth = pd.DataFrame(
            {"image_uuid": uuids, "true_label": true, "is_noisy": given != true, "is_garbage": False}
        )
        photos = list(load_sample_images().images)
        g_rows, g_truth = [], []
        for j in range(n_garbage):
            uuid = f"garbage-{j:03d}"
            img = _text_page(rng, image_size) if j % 2 == 0 else _photo_crop(rng, photos, image_size)
            img.save(tmp / "images" / f"{uuid}.png")
            g_rows.append({"image_uuid": uuid, "path": f"images/{uuid}.png",
                           "label": CLASS_NAMES[int(rng.integers(len(CLASS_NAMES)))],
                           "split": "train", "group": f"garbage-g{j:03d}"})
            g_truth.append({"image_uuid": uuid, "true_label": "", "is_noisy": False, "is_garbage": True})
        rows = pd.concat([rows, pd.DataFrame(g_rows)], ignore_index=True)
        truth = pd.concat([truth, pd.DataFrame(g_truth)], ignore_index=True)
        rows.to_csv(tmp / "manifest.csv", index=False)
        truth.to_csv(tmp / "ground_truth.csv", index=False)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    n_train = len(train_idx)
    log.info(
        "demo data: %d train (%d noisy labels, %.1f%%; %d garbage), %d test -> %s",
        n_train + n_garbage, int((given[train_idx] != true[train_idx]).sum()),
        100.0 * float((given[train_idx] != true[train_idx]).mean()), n_garbage, len(test_idx), out_dir,
    )
    return out_dir / "manifest.csv"


def ensure_demo(data_cfg, *, force: bool = False) -> Path:
    """Build the demo on first use (``data=demo``); return its manifest path."""
    manifest = Path(data_cfg.manifest)
    if force or not manifest.is_file():
        d = data_cfg.demo
        build_demo(
            manifest.parent, noise_rate=d.noise_rate, n_garbage=d.n_garbage, image_size=d.image_size,
            test_fraction=d.test_fraction, group_size=d.group_size, seed=d.seed,
        )
    return manifest

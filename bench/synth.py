"""Synthetic out-of-fold probabilities with class-conditional label noise, for the flag benchmarks.

Each row has a true class; the model's logits favour it by a per-row margin (some rows are
hard), with a share of that margin leaking to a fixed "look-alike" class, which is also where
most flipped labels go. About ``noise_rate`` of labels are flipped, most of them in a few
classes (``noisy_classes``), as in real data where a couple of classes get confused.
Generation is chunked, so ImageNet-sized arrays go straight to a ``.npy`` memmap.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class NoiseModel:
    """Per-class structure shared by every chunk of one synthetic dataset."""

    priors: np.ndarray  # (K,) class frequencies, mildly imbalanced
    lookalike: np.ndarray  # (K,) the class each class is most often confused with
    flip_rate: np.ndarray  # (K,) probability that a row of this true class gets a wrong label


def noise_model(k: int, *, noise_rate: float = 0.07, noisy_share: float = 0.7, seed: int = 0) -> NoiseModel:
    """``noisy_share`` of all flips fall in about 20% of the classes; the rest spread thinly."""
    rng = np.random.default_rng(seed)
    priors = 1.0 / np.arange(1, k + 1) ** 0.5  # Zipf-ish, e.g. 25 classes span 5:1
    priors = rng.permutation(priors / priors.sum())
    lookalike = (np.arange(k) + rng.integers(1, k, size=k)) % k  # never the class itself
    noisy = rng.choice(k, size=max(1, k // 5), replace=False)
    weight = np.full(k, (1 - noisy_share) / max(1, k - len(noisy)))
    weight[noisy] = noisy_share / len(noisy)
    flip_rate = np.clip(noise_rate * weight / priors, 0.0, 0.6)  # so that sum(priors * flip_rate) ~ noise_rate
    return NoiseModel(priors, lookalike, flip_rate)


def make_chunk(n: int, model: NoiseModel, rng: np.random.Generator):
    """``(labels int64 (n,), pred_probs float32 (n, K), true int64 (n,))`` for ``n`` rows."""
    k = len(model.priors)
    true = rng.choice(k, size=n, p=model.priors)
    flip = rng.random(n) < model.flip_rate[true]
    labels = true.copy()
    to_lookalike = rng.random(n) < 0.8  # most flips go to the look-alike class, the rest anywhere else
    labels[flip & to_lookalike] = model.lookalike[true[flip & to_lookalike]]
    other = flip & ~to_lookalike
    labels[other] = (true[other] + rng.integers(1, k, size=int(other.sum()))) % k

    logits = rng.standard_normal((n, k), dtype=np.float32)
    rows = np.arange(n)
    margin = rng.normal(1.0 + np.log(k), 2.0, size=n).astype(np.float32)  # grows with K: ~85-90% top-1
    logits[rows, true] += margin
    logits[rows, model.lookalike[true]] += 0.4 * margin  # look-alikes share some evidence
    # An OOF model partly learns systematic noise: a fifth of flipped rows lean to the given label.
    lean = flip & (rng.random(n) < 0.2)
    logits[rows[lean], labels[lean]] += margin[lean]
    logits -= logits.max(axis=1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=1, keepdims=True)
    return labels.astype(np.int64), logits, true.astype(np.int64)


def make_oof(n: int, k: int, *, seed: int = 0, **noise):
    """In memory: ``(labels (N,), pred_probs float32 (N, K), true (N,))``."""
    return make_chunk(n, noise_model(k, seed=seed, **noise), np.random.default_rng(seed + 1))


def write_oof_memmap(folder: str | Path, n: int, k: int, *, seed: int = 0, chunk_rows: int = 50_000,
                     **noise) -> tuple[Path, Path, Path]:
    """Write ``pred_probs.npy`` (float32 N x K), ``labels.npy`` and ``true.npy`` chunk by chunk.

    Memory stays at a few chunks whatever N x K is. Returns the three paths.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = noise_model(k, seed=seed, **noise)
    rng = np.random.default_rng(seed + 1)
    probs_path, labels_path, true_path = (folder / f for f in ("pred_probs.npy", "labels.npy", "true.npy"))
    probs = np.lib.format.open_memmap(probs_path, mode="w+", dtype=np.float32, shape=(n, k))
    labels = np.empty(n, dtype=np.int64)
    true = np.empty(n, dtype=np.int64)
    for start in range(0, n, chunk_rows):
        stop = min(n, start + chunk_rows)
        labels[start:stop], probs[start:stop], true[start:stop] = make_chunk(stop - start, model, rng)
    probs.flush()
    del probs
    np.save(labels_path, labels)
    np.save(true_path, true)
    return probs_path, labels_path, true_path

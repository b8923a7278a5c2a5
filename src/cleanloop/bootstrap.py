"""Did cleaning help? A paired bootstrap of baseline (A) vs cleaned (B) on the same test rows.

Both models are scored on the same test images, so each bootstrap draw resamples the test
rows once and scores both models on that one resample: the interval is on the difference,
and the variation the two share (an easy or hard draw of test images) cancels. When several
seed pairs were trained (pair ``s`` = baseline and cleaned trained with seed ``s``), each
draw also resamples the pairs, so the interval covers seed-to-seed variation as well.

``paired_bootstrap`` is a pure numpy function; ``recall_deltas_chart`` draws its per-class
table for a person (CONTRACT §3 ``compare/recall_deltas.png``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from cleanloop.errors import CleanloopError
from cleanloop.io import write_atomic

STATISTICS = ("top1", "balanced_accuracy", "f1_macro")
COLUMNS = ("value_a", "value_b", "delta", "ci_low", "ci_high")
# Bound the (draws x rows) weight matrix to ~40 MB whatever the test set size.
_MAX_WEIGHTS = 5_000_000


def _as_preds(preds, *, name: str, n: int, num_classes: int) -> np.ndarray:
    """Predictions as an (S, N) integer array, checked against the labels."""
    arr = np.asarray(preds)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != n or arr.shape[0] < 1:
        raise CleanloopError(
            f"{name}: shape {np.shape(preds)} does not match {n} test labels; "
            "pass (N,) or (S, N) predictions for the same test rows as the labels"
        )
    if not np.issubdtype(arr.dtype, np.integer):
        raise CleanloopError(f"{name}: predictions must be integer class indices, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
        raise CleanloopError(
            f"{name}: class index {int(arr.min() if arr.min() < 0 else arr.max())} outside 0..{num_classes - 1}; "
            "predictions and num_classes disagree"
        )
    return arr.astype(np.intp)


def _counts(weights: np.ndarray, features: np.ndarray, *, s: int, k: int):
    """Per-draw counts: support (D, K) and, per model and seed, TP and predicted (D, 2, S, K)."""
    c = weights @ features
    support = c[:, :k]
    rest = c[:, k:].reshape(len(weights), 2, 2, s, k)  # (D, model, [tp, predicted], seed, class)
    return support, rest[:, :, 0], rest[:, :, 1]


def _statistics(support: np.ndarray, tp: np.ndarray, predicted: np.ndarray) -> dict[str, np.ndarray]:
    """recall (D, 2, S, K) and top1 / balanced_accuracy / f1_macro (D, 2, S) from counts.

    A class absent from a draw has no recall (NaN) and is left out of the macro averages, as
    :func:`cleanloop.metrics.classification_metrics` does on the full test set.
    """
    sup = support[:, None, None, :]
    present = sup > 0
    n_present = present.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(present, tp / sup, np.nan)
        # F1 = 2TP / (support + predicted); support > 0 for every class averaged, so never 0/0.
        f1 = np.where(present, 2 * tp / (sup + predicted), 0.0)
    return {
        "recall": recall,
        "top1": tp.sum(axis=-1) / support.sum(axis=-1)[:, None, None],
        "balanced_accuracy": np.where(present, recall, 0.0).sum(axis=-1) / n_present,
        "f1_macro": f1.sum(axis=-1) / n_present,
    }


def _interval(deltas: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval over axis 0, ignoring NaN draws; NaN where every draw is NaN."""
    tail = 100 * (1 - confidence) / 2
    valid = ~np.isnan(deltas).all(axis=0)
    low = np.full(deltas.shape[1:], np.nan)
    high = np.full(deltas.shape[1:], np.nan)
    if valid.any():
        q = np.nanpercentile(deltas[:, valid], [tail, 100 - tail], axis=0)
        low[valid], high[valid] = q[0], q[1]
    return low, high


def paired_bootstrap(
    labels,
    preds_a,
    preds_b,
    *,
    num_classes: int,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """Paired bootstrap of B - A for per-class recall, top1, balanced accuracy and macro F1.

    Parameters
    ----------
    labels : (N,) int, the true test classes in ``0..K-1``.
    preds_a, preds_b : (N,) or (S, N) int, the predictions of model A (baseline) and model B
        (cleaned) on the same N rows; row ``s`` of each comes from the pair trained with seed ``s``.
    num_classes : K.
    n_bootstrap : number of draws. Each draw resamples the N rows with replacement (the same
        rows for A and B) and, when S > 1, the S seed pairs with replacement.
    confidence : coverage of the percentile interval, in (0, 1).
    seed : seeds the resampling; the same inputs and seed give the same result.

    Returns
    -------
    dict with
    ``"recall"``: DataFrame indexed by class index (0..K-1), columns ``value_a, value_b,
    delta, ci_low, ci_high``; a class with no test rows is all NaN.
    ``"top1"``, ``"balanced_accuracy"``, ``"f1_macro"``: dicts with the same five keys.
    ``value_a`` / ``value_b`` are means over seeds on the full test set, ``delta`` is
    ``value_b - value_a`` and ``ci_low`` / ``ci_high`` the percentile interval of the bootstrap
    deltas. Identical predictions give a delta and an interval of exactly 0.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise CleanloopError(f"labels: expected a non-empty (N,) array, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= num_classes:
        raise CleanloopError(f"labels: expected integer class indices in 0..{num_classes - 1}")
    n, k = labels.size, int(num_classes)
    a = _as_preds(preds_a, name="preds_a", n=n, num_classes=k)
    b = _as_preds(preds_b, name="preds_b", n=n, num_classes=k)
    if a.shape != b.shape:
        raise CleanloopError(
            f"preds_a has shape {a.shape} but preds_b {b.shape}; pass one prediction row per seed pair for both"
        )
    if int(n_bootstrap) < 1:
        raise CleanloopError(f"n_bootstrap must be at least 1, got {n_bootstrap}; set compare.n_bootstrap")
    if not 0 < float(confidence) < 1:
        raise CleanloopError(f"confidence must be between 0 and 1, got {confidence}; set compare.confidence")
    s = a.shape[0]

    # One feature matrix, so a draw's counts are one matmul of its row weights:
    # [label one-hot | A correct one-hot per seed | B ... | A predicted one-hot per seed | B ...].
    eye = np.eye(k)
    onehot = eye[labels]  # (N, K)
    preds = np.stack([a, b])  # (2, S, N)
    tp = (preds == labels)[..., None] * onehot  # (2, S, N, K)
    predicted = eye[preds]  # (2, S, N, K)
    features = np.concatenate(
        [onehot, np.stack([tp, predicted], axis=1).transpose(3, 0, 1, 2, 4).reshape(n, -1)], axis=1
    )

    full = _statistics(*_counts(np.ones((1, n)), features, s=s, k=k))
    # Mean over seeds; a class absent from the test set is NaN for every seed, and stays NaN.
    values = {name: v[0].mean(axis=1) for name, v in full.items()}  # name -> (2,) or (2, K)

    rng = np.random.default_rng(seed)
    n_draws = int(n_bootstrap)
    chunk = max(1, _MAX_WEIGHTS // n)
    deltas: dict[str, list[np.ndarray]] = {name: [] for name in full}
    for start in range(0, n_draws, chunk):
        d = min(chunk, n_draws - start)
        rows = rng.integers(0, n, size=(d, n))
        # Row multiplicities of each draw: one bincount over (draw, row) combined indices.
        weights = np.bincount((np.arange(d)[:, None] * n + rows).ravel(), minlength=d * n).reshape(d, n)
        stats = _statistics(*_counts(weights.astype(float), features, s=s, k=k))
        pairs = rng.integers(0, s, size=(d, s)) if s > 1 else np.zeros((d, 1), dtype=np.intp)
        for name, v in stats.items():
            diff = v[:, 1] - v[:, 0]  # (d, S) or (d, S, K): B - A within each seed pair
            idx = pairs if diff.ndim == 2 else pairs[..., None]
            deltas[name].append(np.take_along_axis(diff, idx, axis=1).mean(axis=1))

    out: dict = {}
    for name in full:
        low, high = _interval(np.concatenate(deltas[name]), float(confidence))
        value_a, value_b = values[name][0], values[name][1]
        cols = {
            "value_a": value_a,
            "value_b": value_b,
            "delta": value_b - value_a,
            "ci_low": low,
            "ci_high": high,
        }
        if name == "recall":
            table = pd.DataFrame(cols, index=pd.RangeIndex(k, name="class_index"))
            out[name] = table.loc[:, list(COLUMNS)]
        else:
            out[name] = {key: float(v) for key, v in cols.items()}
    return out


def _row_label(r) -> str:
    """``class  82% -> 91%, n=40  (flagged 12%)``: what moved, on how many test rows, how much was flagged."""
    def finite(key):
        v = r.get(key)
        try:
            return v is not None and np.isfinite(float(v))
        except (TypeError, ValueError):
            return False

    label = str(r["class"])
    parts = []
    if finite("recall_baseline") and finite("recall_cleaned"):
        parts.append(f"{float(r['recall_baseline']):.0%} \u2192 {float(r['recall_cleaned']):.0%}")
    if finite("n_test"):
        parts.append(f"n={int(r['n_test'])}")
    if parts:
        label += "  " + ", ".join(parts)
    if finite("issue_rate"):
        label += f"  (flagged {float(r['issue_rate']):.0%})"
    return label


def recall_deltas_chart(table: pd.DataFrame, out_path: str | os.PathLike, *, title: str) -> Path:
    """Draw per-class recall deltas with their intervals as a PNG, written atomically.

    Parameters
    ----------
    table : one row per class, in the order to show top to bottom, with columns ``class``,
        ``delta``, ``ci_low``, ``ci_high`` (fractions, B - A) and ``issue_rate`` (fraction of
        the class's train rows flagged); optional ``recall_baseline``, ``recall_cleaned`` (shown as
        ``baseline -> cleaned`` in the label) and ``n_test`` (the class's test rows, ``n=``).
        Rows with a NaN delta are shown without a bar.
    out_path : where the PNG goes.
    title : the chart title.

    Returns
    -------
    ``out_path`` as a Path.
    """
    missing = [c for c in ("class", "delta", "ci_low", "ci_high", "issue_rate") if c not in table.columns]
    if missing:
        raise CleanloopError(f"recall deltas table: missing column(s) {', '.join(missing)}")
    pts = 100.0  # plotted in percentage points: "+3.1" reads faster than "+0.031"
    delta = table["delta"].to_numpy(float) * pts
    low = table["ci_low"].to_numpy(float) * pts
    high = table["ci_high"].to_numpy(float) * pts
    n = len(table)
    y = np.arange(n)

    # A bar's colour says which way it moved; a faded bar's interval includes zero.
    up, down, flat = "#1a9850", "#d73027", "#969696"
    colours = np.where(delta > 0, up, np.where(delta < 0, down, flat))
    sure = (low > 0) | (high < 0)

    fig = Figure(figsize=(8.0, 1.2 + 0.42 * max(n, 1)), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    shown = np.nan_to_num(delta)
    ax.barh(y, shown, color=colours, alpha=0.35, height=0.6)
    ax.barh(y[sure], shown[sure], color=colours[sure], height=0.6)
    has_ci = ~(np.isnan(low) | np.isnan(high) | np.isnan(delta))
    err = np.clip(np.vstack([delta - low, high - delta])[:, has_ci], 0, None)
    ax.errorbar(delta[has_ci], y[has_ci], xerr=err, fmt="none", ecolor="#252525", elinewidth=1.2, capsize=3)
    ax.axvline(0, color="#252525", linewidth=1)

    names = [_row_label(r) for _, r in table.iterrows()]
    ax.set_yticks(y, names)
    ax.invert_yaxis()  # first row of the table on top
    finite = np.concatenate([delta, low, high])
    finite = finite[np.isfinite(finite)]
    span = max(1.0, float(np.abs(finite).max())) if finite.size else 1.0
    ax.set_xlim(-1.25 * span, 1.25 * span)
    for yi, d, hi, lo in zip(y, delta, high, low, strict=True):
        if np.isnan(d):
            ax.text(0, yi, " no test rows", va="center", ha="left", fontsize=8, color=flat)
            continue
        end = hi if d >= 0 and np.isfinite(hi) else (lo if np.isfinite(lo) else d)
        ax.text(
            end,
            yi,
            f" {d:+.1f} ".replace("-", "\u2212"),
            va="center",
            ha="left" if d >= 0 else "right",
            fontsize=8,
        )

    ax.set_xlabel("recall change, cleaned \u2212 baseline (percentage points)")
    ax.set_title(title, pad=14)
    ax.grid(axis="x", color="#e0e0e0", linewidth=0.8)
    ax.set_axisbelow(True)
    ax.spines[["top", "right"]].set_visible(False)
    ax.annotate(
        "bar: change   line: bootstrap interval   faded: interval includes 0   label: recall baseline \u2192 cleaned, "
        "test rows n",
        xy=(0.5, 1),
        xycoords="axes fraction",
        xytext=(0, 2),
        textcoords="offset points",
        ha="center",
        va="bottom",
        fontsize=7,
        color="#636363",
    )
    return write_atomic(out_path, lambda p: fig.savefig(p, format="png"))

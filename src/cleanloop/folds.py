"""Fold assignment for out-of-fold scoring: stratified by label, grouped by patient when known."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold


def assign_folds(labels: Sequence, *, n_folds: int, seed: int, groups: Sequence | None = None) -> np.ndarray:
    """The held-out fold (0..n_folds-1) of each of N rows.

    With ``groups`` (e.g. patient ids) scikit-learn's ``StratifiedGroupKFold`` keeps every group
    in one fold, so no patient straddles train and held-out; otherwise ``StratifiedKFold``.
    The same labels, groups, n_folds and seed always give the same folds.
    """
    labels = np.asarray(labels)
    fold = np.full(len(labels), -1, dtype=np.int64)
    x = np.zeros(len(labels))
    if groups is not None:
        splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        splits = splitter.split(x, labels, groups=np.asarray(groups))
    else:
        splits = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed).split(x, labels)
    for k, (_, held_out) in enumerate(splits):
        fold[held_out] = k
    return fold

"""Fold assignment for out-of-fold scoring: stratified by label, grouped by patient when known."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cleanloop.errors import CleanloopError
from cleanloop.manifest import MISSING_GROUP, blank


@dataclass(frozen=True)
class FoldGroups:
    """What :func:`assign_folds` groups by, and how it came about."""

    groups: np.ndarray | None  # (N,) group of each row, or None for ungrouped folds
    n_own: int = 0  # rows with a blank group made their own group (data.missing_group=own)
    n_joined: int = 0  # groups the audit joined to others because their images are copies (audit.merge_groups)

    @property
    def description(self) -> str:
        """How the folds are made, as the oof run records it (tag ``cleanloop.folds``)."""
        if self.groups is None:
            return "StratifiedKFold"
        if self.n_joined:
            return f"StratifiedGroupKFold on group, with {self.n_joined} groups joined by the audit's duplicates"
        if self.n_own:
            return f"StratifiedGroupKFold on group ({self.n_own} blank rows as their own groups)"
        return "StratifiedGroupKFold on group"


def same_partition(a: Sequence, b: Sequence) -> bool:
    """Whether two labellings of the same rows split them into the same sets (names aside)."""
    pairs = pd.DataFrame({"a": pd.Series(list(a), dtype=object), "b": pd.Series(list(b), dtype=object)})
    if pairs["b"].isna().any():
        return False
    return bool((pairs.groupby("a", dropna=False)["b"].nunique() == 1).all()
                and (pairs.groupby("b")["a"].nunique(dropna=False) == 1).all())


def n_partly_blank(groups: Sequence | None) -> int:
    """How many of the rows have a blank group while others have one (0: none or all blank)."""
    if groups is None:
        return 0
    empty = blank(pd.Series(list(groups), dtype=object))
    return int(empty.sum()) if 0 < empty.sum() < len(empty) else 0


def fold_groups(groups: Sequence | None, *, missing_group: str = "error") -> FoldGroups:
    """The groups the folds keep together, from the train rows' ``group`` column (or None).

    Absent or blank in every row: ungrouped folds. Blank in some rows only: with
    ``missing_group="own"`` each such row becomes its own group (a name no real group can have);
    with ``"error"`` a CleanloopError (the manifest check names the rows first, before any training).
    """
    if missing_group not in MISSING_GROUP:
        raise CleanloopError(f"data.missing_group={missing_group!r}: choose {' or '.join(MISSING_GROUP)}")
    if groups is None:
        return FoldGroups(None)
    values = np.asarray(groups, dtype=object)
    empty = blank(pd.Series(values, dtype=object)).to_numpy()
    if empty.all():
        return FoldGroups(None)
    if not empty.any():
        return FoldGroups(values)
    if missing_group != "own":
        raise CleanloopError(f"column 'group' is blank in {int(empty.sum())} of {len(values)} train rows; fill it in "
                             "or set data.missing_group=own to make each blank row its own group")
    prefix = "\0blank-"  # a real group is a stripped string: make sure none starts with the prefix
    while any(str(v).startswith(prefix) for v in values[~empty]):
        prefix = "\0" + prefix
    values = values.copy()
    values[empty] = [f"{prefix}{i}" for i in np.flatnonzero(empty)]
    return FoldGroups(values, n_own=int(empty.sum()))


def assign_folds(labels: Sequence, *, n_folds: int, seed: int, groups: Sequence | None = None) -> np.ndarray:
    """The held-out fold (0..n_folds-1) of each of N rows.

    With ``groups`` (e.g. patient ids) scikit-learn's ``StratifiedGroupKFold`` keeps every group
    in one fold, so no patient straddles train and held-out; otherwise ``StratifiedKFold``.
    The same labels, groups, n_folds and seed always give the same folds.
    """
    # here, not at the top: steps that only read folds (flag, prune, compare) skip sklearn's import
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

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

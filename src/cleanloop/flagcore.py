"""The pure part of the ``flag`` step: cleanlab's per-row results in, the three ``flag/`` tables out.

``steps/flag.py`` reads the inputs, computes outlier scores, writes these tables and logs them;
``bench/`` times exactly this function, so the benchmark measures the step's own code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd

from cleanloop.cleaning import issue_confusions, issues_per_class

# Columns of flag/label_issues.csv (CONTRACT §3).
ISSUE_COLUMNS = ["image_uuid", "path", "given_label", "predicted_label", "label_quality",
                 "is_label_issue", "outlier_score", "is_outlier"]
# Added after them when the audit of the manifest has run: the row is a copy of another train row
# that carries another label (audit/conflicting_labels.csv), and the labels its copies carry.
COPY_COLUMNS = ["is_conflicting_copy", "copy_labels"]


class FlagTables(NamedTuple):
    """The step's tables, in CONTRACT §3 order and column names."""

    issues: pd.DataFrame  # label_issues.csv: every row, sorted by label_quality ascending
    per_class: pd.DataFrame  # issues_per_class.csv
    confusions: pd.DataFrame  # issue_confusions.csv


def flag_tables(
    found: pd.DataFrame,
    *,
    classes: Sequence[str],
    image_uuids: Sequence[str],
    paths: Sequence[str],
    given_labels: Sequence[str],
    outlier_score=None,
    is_outlier=None,
) -> FlagTables:
    """Join cleanlab's per-row results to the manifest rows and summarise them per class.

    Parameters
    ----------
    found : pd.DataFrame, N rows
        :func:`cleanloop.cleaning.find_issues` output (``predicted``, ``label_quality``,
        ``is_label_issue``), in the same row order as the sequences below.
    classes : sequence of str, shape (K,)
        Class names in pred_probs column order.
    image_uuids, paths, given_labels : sequence of str, shape (N,)
    outlier_score : array_like of float, shape (N,), optional
        Zeros when not given (outliers disabled).
    is_outlier : array_like of bool, shape (N,), optional
        All False when not given.

    Returns
    -------
    FlagTables
        ``issues`` sorted by ``label_quality`` then ``image_uuid`` (a stable, repeatable order).
    """
    n = len(found)
    predicted = np.asarray(classes)[found["predicted"].to_numpy()]
    table = pd.DataFrame({
        "image_uuid": image_uuids, "path": paths, "given_label": given_labels,
        "predicted_label": predicted, "label_quality": found["label_quality"].to_numpy(),
        "is_label_issue": found["is_label_issue"].to_numpy(),
        "outlier_score": np.zeros(n) if outlier_score is None else outlier_score,
        "is_outlier": np.zeros(n, dtype=bool) if is_outlier is None else is_outlier,
    })[ISSUE_COLUMNS]
    # By label_quality, ties by image_uuid: the order of a stable two-key sort_values, at a third
    # of its cost (it would factorise every uuid).
    order = np.lexsort((table["image_uuid"].to_numpy(dtype=object), table["label_quality"].to_numpy()))
    table = table.take(order).reset_index(drop=True)
    is_issue = table["is_label_issue"].to_numpy()
    per_class = issues_per_class(table["given_label"], is_issue, classes)
    confusions = issue_confusions(table["given_label"], table["predicted_label"], is_issue)
    return FlagTables(table, per_class, confusions)


def mark_conflicting_copies(table: pd.DataFrame, conflicts: pd.DataFrame) -> pd.DataFrame:
    """``table`` (label_issues rows) with ``COPY_COLUMNS`` added from the audit's conflicting-label rows.

    Parameters
    ----------
    table : pd.DataFrame
        :func:`flag_tables` ``issues`` (or any table with ``image_uuid``); its order is kept.
    conflicts : pd.DataFrame
        ``audit/conflicting_labels.csv``: ``image_uuid`` and ``cluster_labels`` (``a|b``).

    Returns
    -------
    pd.DataFrame
        A copy with ``is_conflicting_copy`` (bool) and ``copy_labels`` (the cluster's labels, ``""``
        for other rows). Rows of ``conflicts`` that are not in ``table`` are ignored.
    """
    labels = dict(zip(conflicts["image_uuid"].astype(str), conflicts["cluster_labels"].astype(str), strict=True))
    uuids = table["image_uuid"].astype(str)
    out = table.copy()
    out["is_conflicting_copy"] = uuids.isin(labels.keys()).to_numpy()
    out["copy_labels"] = uuids.map(labels).fillna("").to_numpy(dtype=object)
    return out

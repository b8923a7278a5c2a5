"""Which train rows leave the training set (CONTRACT §3 ``prune/``), as pure pandas functions.

``read_decisions`` validates a reviewer's decisions table, ``select_pruned`` turns the flag
step's ``label_issues`` table (plus any decisions) into the rows to drop or relabel, and
``apply_pruning`` applies them to a manifest. Val and test rows are never touched: a model
compared on a test set it was allowed to edit proves nothing. No function here reads or
writes a file; every problem a user can fix raises :class:`~cleanloop.errors.CleanloopError`
with one line naming the file, the row and what to do.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping, Sequence

import numpy as np
import pandas as pd

from cleanloop.errors import CleanloopError
from cleanloop.manifest import _listed, _rows

DECISION_COLUMNS = ("image_uuid", "decision")
ISSUE_COLUMNS = ("image_uuid", "given_label", "label_quality", "is_label_issue", "is_outlier")
ACTIONS = ("keep", "drop", "relabel")
REASONS = ("label_issue", "outlier", "reviewer")
PRUNED_COLUMNS = ("image_uuid", "given_label", "reason", "new_label")

_RELABEL = re.compile(r"^relabel\s*:\s*(.*)$", re.IGNORECASE)
# 0.29 * 100 is 28.999999999999996 in floating point: without this slack the cap would be 28.
_CAP_EPS = 1e-9
_TRUE = {"true", "1", "yes", "t", "y"}
_FALSE = {"false", "0", "no", "f", "n", ""}


def _text(col: pd.Series) -> pd.Series:
    """A column as stripped strings, missing values as ``""`` (CSV cells may arrive as NaN)."""
    return col.astype(object).where(col.notna(), "").astype(str).str.strip()


def _parse_decision(value: str) -> tuple[str | None, str | None]:
    """``(action, new_label)`` for one decision cell; ``(None, None)`` when it is not a decision."""
    low = value.lower()
    if low in ("keep", "drop"):
        return low, None
    m = _RELABEL.match(value)
    if m:
        return "relabel", m.group(1).strip()
    return None, None


def read_decisions(
    df: pd.DataFrame,
    *,
    classes: Sequence[str],
    known_uuids: Collection[str],
    source: str = "decisions.csv",
) -> pd.DataFrame:
    """Validate a reviewer decisions table and normalise it.

    Parameters
    ----------
    df : the table as read from disk (a default RangeIndex, so messages give CSV line numbers):
        ``image_uuid``, ``decision`` and optionally ``reviewer_note`` (ignored). A decision is
        ``keep``, ``drop`` (any case) or ``relabel:<class>`` with ``<class>`` one of ``classes``
        (class names are case-sensitive); surrounding whitespace is ignored.
    classes : the class names a row may be relabelled to.
    known_uuids : the image_uuids a decision may name (normally the scored train rows).
    source : the file name used in messages.

    Returns
    -------
    DataFrame with one row per image_uuid, in first-seen order: ``image_uuid``, ``action``
    (``keep`` | ``drop`` | ``relabel``) and ``new_label`` (the class for a relabel, else None).
    The same decision repeated for one image is accepted once; conflicting ones are an error.
    """
    missing = [c for c in DECISION_COLUMNS if c not in df.columns]
    if missing:
        raise CleanloopError(
            f"{source}: missing column(s) {', '.join(missing)}; a decisions file needs "
            f"{', '.join(DECISION_COLUMNS)} (found: {', '.join(map(str, df.columns)) or 'none'})"
        )
    df = df.reset_index(drop=True)
    uuids = _text(df["image_uuid"])
    raw = _text(df["decision"])

    empty_uuid = uuids == ""
    if empty_uuid.any():
        raise CleanloopError(
            f"{source}: empty image_uuid at {_rows(df, empty_uuid, 'csv')} ({int(empty_uuid.sum())} rows); "
            "fill it in or delete the rows"
        )
    known = {str(u) for u in known_uuids}
    unknown = ~uuids.isin(known)
    if unknown.any():
        values = list(dict.fromkeys(uuids[unknown]))
        raise CleanloopError(
            f"{source}: {len(values)} image_uuid(s) not among the scored train rows, first: {_listed(values)} "
            f"at {_rows(df, unknown, 'csv')}; fix the ids or delete those rows"
        )

    parsed = [_parse_decision(v) for v in raw]
    actions = pd.Series([a for a, _ in parsed], index=df.index, dtype=object)
    new_labels = pd.Series([n for _, n in parsed], index=df.index, dtype=object)
    bad = actions.isna()
    if bad.any():
        values = list(dict.fromkeys(raw[bad]))
        raise CleanloopError(
            f"{source}: unknown decision {_listed(values)} at {_rows(df, bad, 'csv')} ({int(bad.sum())} rows); "
            "write keep, drop or relabel:<class>"
        )
    class_set = {str(c) for c in classes}
    bad_class = (actions == "relabel") & ~new_labels.isin(class_set)
    if bad_class.any():
        values = list(dict.fromkeys(new_labels[bad_class]))
        raise CleanloopError(
            f"{source}: relabel to unknown class {_listed(values)} at {_rows(df, bad_class, 'csv')}; "
            f"classes are {_listed(list(classes))}"
        )

    out = pd.DataFrame({"image_uuid": uuids.astype(object), "action": actions, "new_label": new_labels})
    key = out["action"] + ":" + out["new_label"].fillna("")
    distinct = pd.DataFrame({"image_uuid": out["image_uuid"], "key": key}).drop_duplicates()
    conflict = distinct["image_uuid"].duplicated(keep=False)
    if conflict.any():
        first = distinct.loc[conflict, "image_uuid"].iloc[0]
        n = int(distinct.loc[conflict, "image_uuid"].nunique())
        shown = ", ".join(raw[uuids == first])
        raise CleanloopError(
            f"{source}: image_uuid {first!r} has conflicting decisions ({shown}) at "
            f"{_rows(df, uuids == first, 'csv')} ({n} such image(s)); keep one decision per image"
        )
    out = out.drop_duplicates(subset="image_uuid", keep="first").reset_index(drop=True)
    out["new_label"] = out["new_label"].astype(object).where(out["new_label"].notna(), None)
    return out


def _flag(col: pd.Series, *, name: str, source: str) -> pd.Series:
    """A boolean flag column; tolerates the ``"True"``/``"False"`` strings a CSV read as text gives."""
    if pd.api.types.is_bool_dtype(col):
        return col.astype(bool)
    if pd.api.types.is_numeric_dtype(col) and not col.isna().any() and col.isin([0, 1]).all():
        return col.astype(bool)
    text = _text(col).str.lower()
    bad = ~text.isin(_TRUE | _FALSE)
    if bad.any():
        raise CleanloopError(
            f"{source}: column {name!r} has non-boolean value(s) {_listed(list(dict.fromkeys(text[bad])))}; "
            "use True or False"
        )
    return text.isin(_TRUE)


def _cap(max_fraction_per_class: float, n_train: int) -> int:
    """How many rows of a class with ``n_train`` train rows may be dropped automatically."""
    return int(math.floor(max_fraction_per_class * n_train + _CAP_EPS))


def select_pruned(
    issues: pd.DataFrame,
    *,
    drop_label_issues: bool = True,
    drop_outliers: bool = True,
    max_fraction_per_class: float = 1.0,
    n_train_per_class: Mapping[str, int],
    decisions: pd.DataFrame | None = None,
    source: str = "label_issues.csv",
) -> pd.DataFrame:
    """The train rows to drop or relabel.

    Parameters
    ----------
    issues : the flag step's table (CONTRACT §3 ``flag/label_issues.csv``), one row per scored
        train image: at least ``image_uuid``, ``given_label``, ``label_quality``,
        ``is_label_issue``, ``is_outlier``.
    drop_label_issues, drop_outliers : which flags make a row a candidate.
    max_fraction_per_class : in [0, 1]; at most ``floor(max_fraction_per_class * n_train)``
        candidates of a class are dropped, lowest ``label_quality`` first (ties by image_uuid),
        so a class the model finds hard is not emptied.
    n_train_per_class : class -> its number of train rows in the manifest (the cap's base).
    decisions : the output of :func:`read_decisions`, or None. A reviewer's word beats the
        flags and the cap: ``keep`` takes a row out of the drop set (the next candidate of its
        class may take its place under the cap), ``drop`` drops it, ``relabel`` keeps it under
        its new label. A relabel to the row's own label is a keep.
    source : the issues file name used in messages.

    Returns
    -------
    DataFrame ``image_uuid, given_label, reason, new_label`` sorted by label_quality then
    image_uuid. ``reason`` is ``label_issue`` (also for a row that is an outlier too),
    ``outlier`` or ``reviewer`` (every row a reviewer dropped or relabelled); ``new_label`` is
    the new class for a relabel and None for a drop.
    """
    missing = [c for c in ISSUE_COLUMNS if c not in issues.columns]
    if missing:
        raise CleanloopError(
            f"{source}: missing column(s) {', '.join(missing)}; an issues table needs "
            f"{', '.join(ISSUE_COLUMNS)} (the output of `cleanloop flag`)"
        )
    if not 0.0 <= float(max_fraction_per_class) <= 1.0:
        raise CleanloopError(
            f"max_fraction_per_class must be between 0 and 1, got {max_fraction_per_class}; "
            "set prune.max_fraction_per_class"
        )
    issues = issues.reset_index(drop=True)
    uuids = _text(issues["image_uuid"])
    dup = uuids.duplicated(keep=False)
    if dup.any():
        raise CleanloopError(
            f"{source}: duplicate image_uuid {uuids[dup].iloc[0]!r} at {_rows(issues, dup, 'csv')}; "
            "each scored row must appear once"
        )
    labels = _text(issues["given_label"])
    quality = pd.to_numeric(issues["label_quality"], errors="coerce")
    if quality.isna().any():
        bad = quality.isna()
        raise CleanloopError(
            f"{source}: label_quality missing or not a number at {_rows(issues, bad, 'csv')}; "
            "rerun `cleanloop flag` or fix the file"
        )
    unknown = sorted(set(labels) - {str(c) for c in n_train_per_class})
    if unknown:
        raise CleanloopError(
            f"{source}: given_label {_listed(unknown)} is not a train class of the manifest; "
            "the issues file belongs to another manifest: rerun `cleanloop flag`"
        )
    is_issue = _flag(issues["is_label_issue"], name="is_label_issue", source=source) & bool(drop_label_issues)
    is_outlier = _flag(issues["is_outlier"], name="is_outlier", source=source) & bool(drop_outliers)

    table = pd.DataFrame(
        {
            "image_uuid": uuids.astype(object),
            "given_label": labels.astype(object),
            "label_quality": quality.astype(float),
            "reason": np.where(is_issue, "label_issue", "outlier"),
            "new_label": pd.Series([None] * len(issues), dtype=object),
        }
    )

    reviewed = pd.Series(False, index=table.index)
    by_reviewer = pd.Series(False, index=table.index)
    if decisions is not None and len(decisions):
        where = dict(zip(table["image_uuid"], table.index, strict=True))
        dec_uuids = [str(u) for u in decisions["image_uuid"]]
        absent = [u for u in dec_uuids if u not in where]
        if absent:
            raise CleanloopError(
                f"decisions name {len(absent)} image_uuid(s) absent from {source}, first: {_listed(absent)}; "
                "a decision can only concern a scored train row"
            )
        rows = np.array([where[u] for u in dec_uuids], dtype=int)
        action = decisions["action"].to_numpy(dtype=object)
        new_label = decisions["new_label"].to_numpy(dtype=object)
        same = (action == "relabel") & (new_label == table.loc[rows, "given_label"].to_numpy(dtype=object))
        action = np.where(same, "keep", action)
        reviewed.iloc[rows] = True
        by_reviewer.iloc[rows[action != "keep"]] = True
        relabel = rows[action == "relabel"]
        table.loc[relabel, "new_label"] = new_label[action == "relabel"]

    # Automatic drops: flagged, not reviewed, capped per class, worst label_quality first.
    candidates = table[(is_issue | is_outlier) & ~reviewed].sort_values(
        ["label_quality", "image_uuid"], kind="mergesort"
    )
    caps = candidates["given_label"].map(
        lambda c: _cap(float(max_fraction_per_class), int(n_train_per_class[c]))
    )
    rank = candidates.groupby("given_label", sort=False).cumcount()
    auto = candidates[rank < caps]

    reviewer = table[by_reviewer].assign(reason="reviewer")
    out = pd.concat([auto, reviewer]).sort_values(["label_quality", "image_uuid"], kind="mergesort")
    out = out.loc[:, list(PRUNED_COLUMNS)].reset_index(drop=True)
    out["new_label"] = out["new_label"].astype(object).where(out["new_label"].notna(), None)
    return out


def apply_pruning(manifest: pd.DataFrame, pruned: pd.DataFrame) -> pd.DataFrame:
    """The manifest less the dropped train rows, with relabels applied to ``label``.

    Parameters
    ----------
    manifest : the input manifest (CONTRACT §2); extra columns are carried through.
    pruned : the output of :func:`select_pruned`, or ``prune/pruned_rows.csv`` read back
        (``new_label`` may be absent or empty: those rows are drops).

    Returns
    -------
    A new DataFrame with the manifest's columns in the same order and its rows in the same
    order (index reset). Val and test rows are never removed or changed: a pruned row that is
    not a train row of ``manifest`` is an error.
    """
    if "image_uuid" not in pruned.columns:
        raise CleanloopError("pruned rows: missing column image_uuid; pass the output of select_pruned")
    manifest = manifest.reset_index(drop=True)
    m_uuids = _text(manifest["image_uuid"])
    p_uuids = _text(pruned["image_uuid"])
    if "new_label" in pruned.columns:
        new_label = _text(pruned["new_label"])
    else:
        new_label = pd.Series("", index=pruned.index)

    split_of = dict(zip(m_uuids, _text(manifest["split"]), strict=True))
    absent = [u for u in p_uuids if u not in split_of]
    if absent:
        raise CleanloopError(
            f"pruned rows: {len(absent)} image_uuid(s) not in the manifest, first: {_listed(absent)}; "
            "the pruned rows belong to another manifest: rerun `cleanloop flag` and `cleanloop prune`"
        )
    not_train = [u for u in p_uuids if split_of[u] != "train"]
    if not_train:
        u = not_train[0]
        raise CleanloopError(
            f"pruned rows: image_uuid {u!r} is a {split_of[u]} row, not a train row "
            f"({len(not_train)} such row(s)); cleanloop never removes or relabels val or test rows"
        )
    dup = p_uuids.duplicated()
    if dup.any():
        raise CleanloopError(
            f"pruned rows: image_uuid {p_uuids[dup].iloc[0]!r} is listed more than once; list each row once"
        )

    drop = set(p_uuids[new_label == ""])
    relabel = dict(zip(p_uuids[new_label != ""], new_label[new_label != ""], strict=True))
    out = manifest.loc[~m_uuids.isin(drop)].copy()
    kept_uuids = m_uuids[out.index]
    changed = kept_uuids.isin(relabel.keys())
    if changed.any():
        out.loc[changed, "label"] = kept_uuids[changed].map(relabel)
    return out.reset_index(drop=True)

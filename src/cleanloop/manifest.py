"""The input manifest (CONTRACT §2): read CSV or Parquet, validate, resolve paths, fix the class order.

``validate`` and ``class_order`` are pure functions on a DataFrame; ``read_manifest`` and
``load_manifest`` are the only ones that touch the disk. Every problem raises
:class:`~cleanloop.errors.CleanloopError` with one line naming the file, the row or column,
and what to do.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cleanloop.errors import CleanloopError

REQUIRED_COLUMNS = ("image_uuid", "path", "label", "split")
SPLITS = ("train", "val", "test")
BLANK = ("", "nan", "None")  # what an empty cell reads as (CSV, or a Parquet null turned into text)
MISSING_GROUP = ("error", "own")  # data.missing_group: what a partly blank `group` column means
_MAX_LISTED = 10  # how many offending values an error message lists

# What MLflow accepts in a metric key on every platform: letters and digits of any script, "_",
# "-", ".", " " and "/" (no ":", which MLflow refuses on Windows). Here, not in cleanloop.tracking,
# so that the input checks can use it without importing MLflow.
_KEY_BAD = re.compile(r"[^\w\-. /]")
_KEY_MAX = 200  # MLflow keys are at most 250 characters; leaves room for "delta/recall/<key>/ci_high"


def class_key(name: str) -> str:
    """A class name as one part of an MLflow metric key (``test/recall/<key>``).

    Characters MLflow refuses become ``_``; so do the path parts it refuses (an empty, ``.`` or
    ``..`` part between slashes, a leading or trailing slash), since the key must be a
    normalised path. Letters of any script are kept (in NFC form): ``café`` stays ``café``.
    """
    key = _KEY_BAD.sub("_", unicodedata.normalize("NFC", str(name))).strip()[:_KEY_MAX].strip()
    parts = ["_" if part.strip() in ("", ".", "..") else part for part in key.split("/")]
    return "/".join(parts) or "_"


def _rows(df: pd.DataFrame, mask: pd.Series, fmt: str) -> str:
    """Human row numbers of ``mask``: CSV line numbers (header = line 1) or 0-based Parquet rows."""
    idx = [int(i) for i in df.index[mask][:_MAX_LISTED]]
    if fmt == "csv":
        return "line " + ", ".join(str(i + 2) for i in idx)
    return "row " + ", ".join(str(i) for i in idx)


def blank(values: pd.Series) -> pd.Series:
    """Which cells are empty (CONTRACT §2): ``""``, ``"nan"`` or ``"None"`` once stripped."""
    return values.astype(str).str.strip().isin(BLANK)


def _listed(values: Sequence) -> str:
    shown = ", ".join(repr(str(v)) for v in list(values)[:_MAX_LISTED])
    more = len(values) - _MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read a CSV (UTF-8, BOM and CRLF tolerated) or Parquet manifest; key columns as strings."""
    path = Path(path)
    if not path.is_file():
        raise CleanloopError(f"{path}: manifest not found; set data.manifest=/path/to/manifest.csv")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            df = pd.read_parquet(path)
        elif suffix in (".csv", ".tsv", ".txt"):
            df = pd.read_csv(
                path,
                sep="\t" if suffix == ".tsv" else ",",
                dtype=str,
                keep_default_na=False,
                encoding="utf-8-sig",
            )
        else:
            raise CleanloopError(f"{path}: unsupported manifest format {suffix!r}; use .csv or .parquet")
    except CleanloopError:
        raise
    except Exception as e:  # pandas/pyarrow parse errors: name the file, keep the library's reason
        raise CleanloopError(f"{path}: cannot read manifest ({type(e).__name__}: {e})") from e
    for col in ("image_uuid", "path", "label", "split", "group"):
        if col in df.columns:
            df[col] = df[col].astype(str).str.strip().where(df[col].notna(), "")
    return df.reset_index(drop=True)


def validate(
    df: pd.DataFrame,
    *,
    source: str = "manifest",
    fmt: str = "csv",
    classes: Sequence[str] | None = None,
    min_train_per_class: int | None = None,
    min_train_hint: str = "oof.n_folds",
    missing_group: str | None = None,
) -> None:
    """Check a manifest against CONTRACT §2 and §6; raise CleanloopError on the first problem.

    Parameters
    ----------
    df : the manifest, one row per image (N rows).
    source : the file name used in messages.
    fmt : ``"csv"`` (messages give line numbers) or ``"parquet"`` (0-based rows).
    classes : the fixed class order, if configured; every train label must be in it.
    min_train_per_class : each class needs at least this many train rows (e.g. the fold count).
    missing_group : for a step that makes folds, ``data.missing_group`` (see :func:`check_groups`);
        None skips the group check (a step that makes no folds).
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise CleanloopError(
            f"{source}: missing required column(s) {', '.join(missing)}; "
            f"a manifest needs {', '.join(REQUIRED_COLUMNS)} (found: {', '.join(map(str, df.columns))})"
        )
    if df.empty:
        raise CleanloopError(f"{source}: the manifest has no rows")
    for col in REQUIRED_COLUMNS:
        empty = blank(df[col])
        if empty.any():
            raise CleanloopError(
                f"{source}: empty {col!r} at {_rows(df, empty, fmt)} ({int(empty.sum())} rows); fill it in or drop the rows"
            )
    dup = df["image_uuid"].duplicated(keep=False)
    if dup.any():
        first = df.loc[dup, "image_uuid"].iloc[0]
        n = int(df["image_uuid"].duplicated().sum())
        raise CleanloopError(
            f"{source}: duplicate image_uuid {first!r} at {_rows(df, df['image_uuid'] == first, fmt)} "
            f"({n} duplicate rows in all); image_uuid must be unique"
        )
    bad_split = ~df["split"].isin(SPLITS)
    if bad_split.any():
        values = sorted(df.loc[bad_split, "split"].unique())
        raise CleanloopError(
            f"{source}: unknown split {_listed(values)} at {_rows(df, bad_split, fmt)} "
            f"({int(bad_split.sum())} rows); split must be one of {', '.join(SPLITS)}"
        )
    train = df[df["split"] == "train"]
    if train.empty:
        raise CleanloopError(
            f"{source}: no rows with split == 'train' (column 'split' has only {_listed(sorted(df['split'].unique()))}); "
            "cleanloop scores and retrains on the train split: set split=train on the rows to learn from"
        )
    train_labels = set(train["label"])
    if classes is not None:
        unknown = sorted(set(df["label"]) - set(map(str, classes)))
        if unknown:
            raise CleanloopError(
                f"{source}: label(s) {_listed(unknown)} are not in data.classes; add them to data.classes or fix the labels"
            )
    for split in ("val", "test"):
        rows = df["split"] == split
        absent = sorted(set(df.loc[rows, "label"]) - train_labels)
        if absent:
            where = rows & df["label"].isin(absent)
            raise CleanloopError(
                f"{source}: {split} label(s) {_listed(absent)} have no train rows, at {_rows(df, where, fmt)} "
                f"({int(where.sum())} rows); a model cannot learn them: add train rows or drop those {split} rows"
            )
    names = class_order(df, classes)
    by_key: dict[str, str] = {}
    for name in names:
        other = by_key.setdefault(class_key(name), name)
        if other != name:
            raise CleanloopError(
                f"{source}: classes {other!r} and {name!r} (column 'label') would share the MLflow metric key "
                f"{class_key(name)!r}, so their per-class metrics would overwrite each other; rename one of them"
            )
    if min_train_per_class:
        counts = train["label"].value_counts()
        small = counts[counts < min_train_per_class].sort_index().sort_values(kind="mergesort")  # smallest first
        if not small.empty:
            name, n = small.index[0], int(small.iloc[0])
            raise CleanloopError(
                f"{source}: class {name!r} has {n} train row(s), fewer than {min_train_hint}={min_train_per_class} "
                f"({len(small)} such class(es)); add rows, merge the class, or lower {min_train_hint}"
            )
    if missing_group is not None:
        check_groups(df, source=source, fmt=fmt, missing_group=missing_group)


def check_groups(df: pd.DataFrame, *, source: str = "manifest", fmt: str = "csv", missing_group: str = "error") -> int:
    """The train rows whose ``group`` is blank while other train rows have one; returns their count.

    Folds keep the rows of a group together (CONTRACT §2). A ``group`` column that is absent or
    blank in every train row means ungrouped folds (0 returned). Blank in some rows only is an
    error naming the first of them, unless ``missing_group="own"``: then each such row becomes
    its own group and the count is returned (the oof step logs it as a warning).
    """
    if missing_group not in MISSING_GROUP:
        raise CleanloopError(f"data.missing_group={missing_group!r}: choose {' or '.join(MISSING_GROUP)}")
    if "group" not in df.columns:
        return 0
    train = df["split"] == "train"
    empty = train & blank(df["group"])
    n_empty, n_train = int(empty.sum()), int(train.sum())
    if n_empty == 0 or n_empty == n_train:
        return 0
    if missing_group == "error":
        first = [f"{u!r} at {_rows(df, df.index == i, fmt)}"
                 for i, u in zip(df.index[empty][:3], df.loc[empty, "image_uuid"][:3], strict=True)]
        raise CleanloopError(
            f"{source}: column 'group' is blank in {n_empty} of {n_train} train rows but filled in the others "
            f"(first: {', '.join(first)}); fill in their group, or set data.missing_group=own to make each blank "
            "row its own group"
        )
    return n_empty


def class_order(df: pd.DataFrame, classes: Sequence[str] | None = None) -> list[str]:
    """``classes`` when given, else the sorted distinct train labels (CONTRACT §2)."""
    if classes is not None:
        return [str(c) for c in classes]
    return sorted(df.loc[df["split"] == "train", "label"].unique().tolist())


def resolve_paths(paths: pd.Series, *, base_dir: str | Path) -> pd.Series:
    """Absolute image paths: relative entries resolve against ``base_dir``."""
    base = Path(base_dir)
    return paths.map(lambda p: str(Path(p) if Path(p).is_absolute() else (base / p)))


def missing_files(paths: pd.Series) -> list[str]:
    return [p for p in paths if not Path(p).is_file()]


@dataclass(frozen=True)
class Manifest:
    """A validated manifest: the rows (plus ``abs_path``), the class order, and where it came from."""

    df: pd.DataFrame
    classes: list[str]
    source: Path
    fmt: str  # "csv" or "parquet": the format cleaned manifests are written in

    @property
    def train(self) -> pd.DataFrame:
        return self.df[self.df["split"] == "train"]

    def split(self, name: str) -> pd.DataFrame:
        return self.df[self.df["split"] == name]

    def label_indices(self, df: pd.DataFrame):
        index = {c: i for i, c in enumerate(self.classes)}
        return df["label"].map(index).to_numpy()


def load_manifest(
    path: str | Path,
    *,
    image_root: str | Path | None = None,
    classes: Sequence[str] | None = None,
    min_train_per_class: int | None = None,
    min_train_hint: str = "oof.n_folds",
    check_files: bool = True,
    missing_group: str | None = None,
) -> Manifest:
    """Read, validate and resolve a manifest; with ``check_files`` every image must exist.

    ``missing_group``: check the ``group`` column for fold making (:func:`check_groups`); None skips it."""
    path = Path(path)
    df = read_manifest(path)
    fmt = "parquet" if path.suffix.lower() == ".parquet" else "csv"
    validate(
        df,
        source=str(path),
        fmt=fmt,
        classes=classes,
        min_train_per_class=min_train_per_class,
        min_train_hint=min_train_hint,
        missing_group=missing_group,
    )
    df = df.copy()
    df["abs_path"] = resolve_paths(df["path"], base_dir=Path(image_root or path.parent).resolve())
    if check_files:
        gone = missing_files(df["abs_path"])
        if gone:
            raise CleanloopError(
                f"{path}: {len(gone)} image file(s) not found, first: {_listed(gone)}; "
                "fix the paths or set data.image_root"
            )
    return Manifest(df=df, classes=class_order(df, classes), source=path, fmt=fmt)

"""The OOF probabilities file (CONTRACT §3 ``oof/oof_probs.parquet``): write it, read it, check it.

Columns: ``image_uuid, label, fold`` and one float column per class. The class order, the head
(softmax / sigmoid), how the probabilities and the folds were made live in the Parquet schema
metadata under the key ``cleanloop``, so a reader never has to guess.

Beside it, ``embeddings.npy`` (float16, one row per train row) and ``embedding_ids.parquet``
(its rows' ``image_uuid``, same order): ``flag`` matches the two by image_uuid, never by
row order alone.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cleanloop.errors import CleanloopError
from cleanloop.io import write_atomic

log = logging.getLogger(__name__)

META_KEY = b"cleanloop"
BASE_COLUMNS = ("image_uuid", "label", "fold")
# How far a softmax row's sum may stray from one (float32 rounding over many classes) before the
# row is normalised, with a warning; cleanlab expects rows that sum to one.
ROW_SUM_TOLERANCE = 1e-3


def oof_frame(uuids, labels, folds, probs: np.ndarray, classes: list[str]) -> pd.DataFrame:
    clash = set(classes) & set(BASE_COLUMNS)
    if clash:
        raise CleanloopError(f"class name(s) {sorted(clash)} clash with OOF columns {BASE_COLUMNS}; rename the class")
    base = pd.DataFrame({"image_uuid": list(uuids), "label": list(labels), "fold": np.asarray(folds, dtype=np.int64)})
    return pd.concat([base, pd.DataFrame(probs.astype(np.float32), columns=classes)], axis=1)


def write_oof(path: str | Path, df: pd.DataFrame, *, classes: list[str], **meta) -> Path:
    """Write ``df`` with {"classes": [...], **meta} in the schema metadata, atomically."""
    table = pa.Table.from_pandas(df, preserve_index=False)
    payload = json.dumps({"classes": list(classes), **meta}).encode()
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), META_KEY: payload})
    return write_atomic(path, lambda p: pq.write_table(table, p))


EMBEDDINGS = "embeddings.npy"
EMBEDDING_IDS = "embedding_ids.parquet"
EMBEDDING_FILES = [EMBEDDINGS, EMBEDDING_IDS]


def write_embeddings(folder: str | Path, emb: np.ndarray, uuids) -> None:
    """``embeddings.npy`` (float16) and ``embedding_ids.parquet`` (``image_uuid`` of each row), atomically."""
    uuids = [str(u) for u in uuids]
    if len(uuids) != len(emb):
        raise ValueError(f"{len(uuids)} image_uuids for {len(emb)} embedding rows")
    folder = Path(folder)

    def save_npy(p: Path) -> None:
        with open(p, "wb") as f:  # a file object: np.save(path) would append ".npy" to the temp name
            np.save(f, np.asarray(emb).astype(np.float16))

    write_atomic(folder / EMBEDDINGS, save_npy)
    ids = pa.table({"image_uuid": pa.array(uuids, type=pa.string())})
    write_atomic(folder / EMBEDDING_IDS, lambda p: pq.write_table(ids, p))


def load_embeddings(oof_path: str | Path, *, train_uuids, file_rows: np.ndarray) -> np.ndarray | None:
    """The embeddings beside an OOF file, as float32 rows in ``train_uuids`` order; None when absent.

    With ``embedding_ids.parquet`` the rows are matched by image_uuid (another order is fine);
    ids that are not exactly the train rows are an error: the folder mixes the outputs of two
    runs, and the outlier score (hence what ``prune`` drops) must not rest on the wrong rows.
    Without the ids (an OOF folder made before they were written) the rows are matched by the
    file's row order (``file_rows``), with a warning.
    """
    path = Path(oof_path).with_name(EMBEDDINGS)
    if not path.is_file():
        return None
    try:
        emb = np.load(path)
    except Exception as e:
        raise CleanloopError(f"{path}: cannot read embeddings ({type(e).__name__}: {e}); re-run `cleanloop oof`") from e
    ids_path = path.with_name(EMBEDDING_IDS)
    if not ids_path.is_file():
        if len(emb) != len(file_rows):
            log.warning("%s: %d rows for %d OOF rows and no %s; outliers from pred_probs instead",
                        path, len(emb), len(file_rows), EMBEDDING_IDS)
            return None
        log.warning("%s: no %s beside it, so its rows are matched to %s by row order; re-run `cleanloop oof` to "
                    "record them", path, EMBEDDING_IDS, Path(oof_path).name)
        return emb[file_rows].astype(np.float32)
    try:
        ids = pd.read_parquet(ids_path, columns=["image_uuid"])["image_uuid"].astype(str)
    except Exception as e:
        raise CleanloopError(f"{ids_path}: cannot read embedding ids ({type(e).__name__}: {e}); "
                             "re-run `cleanloop oof`") from e
    if len(ids) != len(emb) or ids.duplicated().any():
        raise CleanloopError(f"{ids_path}: {len(ids)} image_uuids ({ids.nunique()} distinct) for the {len(emb)} rows "
                             f"of {path.name}; re-run `cleanloop oof`")
    train_uuids = [str(u) for u in train_uuids]
    want, have = set(train_uuids), set(ids)
    if want != have:
        missing, extra = sorted(want - have), sorted(have - want)
        raise CleanloopError(
            f"{path}: its rows ({ids_path.name}) are not the train rows of {Path(oof_path).name}: "
            f"{len(missing)} missing" + (f" (e.g. {missing[:3]})" if missing else "")
            + f", {len(extra)} unknown" + (f" (e.g. {extra[:3]})" if extra else "")
            + "; they come from another run: re-run `cleanloop oof`, or set flag.outlier.enabled=false"
        )
    position = pd.Series(np.arange(len(ids)), index=ids.to_numpy())
    return emb[position.loc[train_uuids].to_numpy()].astype(np.float32)


def read_meta(path: str | Path) -> dict:
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta[META_KEY]) if META_KEY in meta else {}


@dataclass(frozen=True)
class OOF:
    """Probabilities aligned to the manifest's train rows (same order)."""

    pred_probs: np.ndarray  # (N, K): sigmoid rows as stored (not yet normalised); other rows sum to one
    folds: np.ndarray  # (N,), -1 for in-sample scoring
    meta: dict
    file_rows: np.ndarray  # (N,): row i of the manifest's train split is row file_rows[i] of the file
    n_normalised: int = 0  # rows of a softmax file that did not sum to one, normalised here


def load_oof(path: str | Path, *, train: pd.DataFrame, classes: list[str], head: str | None = None) -> OOF:
    """Read an OOF parquet and align it to ``train`` (the manifest's train rows).

    Refuses a file made from another manifest (rows missing or extra, labels differing) or
    another class order, and probabilities that are NaN, negative or above one. Rows of a
    softmax file (any head but ``sigmoid``) that do not sum to one are normalised, with a warning.
    """
    path = Path(path)
    if not path.is_file():
        raise CleanloopError(f"{path}: OOF probabilities not found; run `cleanloop oof` first or set flag.oof=PATH")
    try:
        df = pd.read_parquet(path)
        meta = read_meta(path)
    except Exception as e:
        raise CleanloopError(f"{path}: cannot read OOF parquet ({type(e).__name__}: {e})") from e
    file_classes = meta.get("classes") or [c for c in df.columns if c not in BASE_COLUMNS]
    if list(file_classes) != list(classes):
        raise CleanloopError(
            f"{path}: class order {file_classes[:5]}{'...' if len(file_classes) > 5 else ''} differs from the "
            f"manifest's {classes[:5]}{'...' if len(classes) > 5 else ''}; re-run `cleanloop oof` on this manifest "
            "or set data.classes to the file's order"
        )
    missing_cols = [c for c in ("image_uuid", *classes) if c not in df.columns]
    if missing_cols:
        raise CleanloopError(f"{path}: missing column(s) {missing_cols[:5]}; expected image_uuid and one column per class")
    df["image_uuid"] = df["image_uuid"].astype(str)
    if df["image_uuid"].duplicated().any():
        raise CleanloopError(f"{path}: duplicate image_uuid {df.loc[df['image_uuid'].duplicated(), 'image_uuid'].iloc[0]!r}; "
                             "each train row must appear exactly once")
    want = set(train["image_uuid"])
    have = set(df["image_uuid"])
    if want != have:
        missing, extra = sorted(want - have), sorted(have - want)
        counts = [f"{len(missing)} train row(s) missing" + (f", e.g. {missing[:3]}" if missing else ""),
                  f"{len(extra)} unknown row(s)" + (f", e.g. {extra[:3]}" if extra else "")]
        raise CleanloopError(
            f"{path}: rows do not match the manifest's train split ({'; '.join(counts)}); "
            "the file was made from another manifest: re-run `cleanloop oof` on this manifest"
        )
    from cleanloop.cleaning import check_pred_probs, normalise_rows  # cleanlab: only once the rows match

    # Checked in the file's own row order, so that "row i" in a message is the file's row i.
    checked = check_pred_probs(df[list(classes)].to_numpy(), n_rows=len(df), n_classes=len(classes),
                               source=str(path), uuids=df["image_uuid"].tolist())
    position = pd.Series(np.arange(len(df)), index=df["image_uuid"])
    file_rows = position.loc[train["image_uuid"]].to_numpy()
    df = df.iloc[file_rows].set_index("image_uuid")
    if "label" in df.columns:
        differs = df["label"].astype(str).to_numpy() != train["label"].to_numpy()
        if differs.any():
            first = train["image_uuid"].to_numpy()[differs][0]
            raise CleanloopError(
                f"{path}: {int(differs.sum())} row(s) carry a different label than the manifest (first: {first!r}); "
                "the OOF file was made from another version of the manifest: re-run `cleanloop oof`"
            )
    probs = checked[file_rows]
    folds = df["fold"].to_numpy(dtype=np.int64) if "fold" in df.columns else np.full(len(train), -1)
    if head is not None and "head" not in meta:
        meta = {**meta, "head": head}
    n_normalised = 0
    if meta.get("head") != "sigmoid":
        sums = probs.sum(axis=1)
        off = np.abs(sums - 1.0) > ROW_SUM_TOLERANCE
        if off.any():
            n_normalised = int(off.sum())
            i = int(np.flatnonzero(off)[np.argmin(file_rows[off])])  # the first in the file's order
            log.warning("%s: %d of %d pred_probs row(s) do not sum to one (first image_uuid %r, file row %d, sum %.4g); "
                        "each row normalised to sum to one before cleanlab", path, n_normalised, len(probs),
                        str(train["image_uuid"].iloc[i]), int(file_rows[i]), float(sums[i]))
            probs = normalise_rows(probs)
    return OOF(pred_probs=probs, folds=folds, meta=meta, file_rows=file_rows, n_normalised=n_normalised)

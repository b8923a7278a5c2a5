"""Atomic file writing: every output goes to a temporary name in the same folder, then is renamed.

A reader (or a killed writer) therefore sees either the old file or the complete new one,
never half of it (CONTRACT §6).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

_UMASK = os.umask(0)
os.umask(_UMASK)  # read the process umask once (os.umask can only be read by setting it)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():  # mkstemp makes 0600 files: give outputs the usual umask permissions
            os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_atomic(path: str | os.PathLike, writer: Callable[[Path], Any]) -> Path:
    """Call ``writer(tmp_path)`` and rename the result to ``path``."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_atomic(path, lambda p: p.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n"))


ARROW_CSV_ROWS = 50_000  # tables this long are written by Arrow's CSV writer when they can be


def write_csv(path: str | os.PathLike, df: pd.DataFrame) -> Path:
    """``df`` as CSV, atomically. Long tables with no cell that needs quoting go through Arrow's
    writer, 5x faster than pandas' (0.25 s against 1.3 s at 121,514 x 8); the text then differs from
    pandas' only in how some floats are spelt (``2e-9`` for ``2e-09``, ``1`` for ``1.0``)."""
    table = _arrow_table(df)
    if table is None:
        return write_atomic(path, lambda p: df.to_csv(p, index=False))
    import pyarrow.csv as pcsv

    def write(p: Path) -> None:
        with open(p, "wb") as f:  # the header by hand: Arrow quotes it (and quoting_header needs pyarrow 18)
            f.write((",".join(df.columns) + "\n").encode())
            pcsv.write_csv(table, f, pcsv.WriteOptions(include_header=False, quoting_style="none"))

    return write_atomic(path, write)


_QUOTE = r'[,"\r\n]|^\s|\s$'  # a cell pandas would quote (or whose spaces a reader might strip)


def _arrow_table(df: pd.DataFrame):
    """``df`` as an Arrow table that can be written unquoted (booleans as True/False, as pandas
    writes them), or None: a short table, or one with a cell that needs quotes or an odd type."""
    if len(df) < ARROW_CSV_ROWS or not all(isinstance(c, str) for c in df.columns):
        return None
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    cols = {c: (np.where(df[c].to_numpy(), "True", "False") if df[c].dtype.kind == "b" else df[c]) for c in df.columns}
    try:
        table = pa.Table.from_pandas(pd.DataFrame(cols), preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return None
    for name, field, col in zip(df.columns, table.schema, table.columns, strict=True):
        if pa.types.is_string(field.type) or pa.types.is_large_string(field.type):
            if pc.any(pc.match_substring_regex(col, _QUOTE)).as_py():
                return None
        elif not (pa.types.is_integer(field.type) or pa.types.is_floating(field.type)):
            return None
        if pc.any(pc.match_substring_regex(pa.array([name]), _QUOTE)).as_py():
            return None
    return table


def write_table(path: str | os.PathLike, df: pd.DataFrame) -> Path:
    """Write CSV or Parquet by the file's extension."""
    suffix = Path(path).suffix.lower()
    if suffix == ".parquet":
        return write_atomic(path, lambda p: df.to_parquet(p, index=False))
    return write_csv(path, df)

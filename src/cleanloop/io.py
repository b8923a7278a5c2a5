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


def write_csv(path: str | os.PathLike, df: pd.DataFrame) -> Path:
    return write_atomic(path, lambda p: df.to_csv(p, index=False))


def write_table(path: str | os.PathLike, df: pd.DataFrame) -> Path:
    """Write CSV or Parquet by the file's extension."""
    suffix = Path(path).suffix.lower()
    if suffix == ".parquet":
        return write_atomic(path, lambda p: df.to_parquet(p, index=False))
    return write_csv(path, df)

"""The step cache: each step's outputs live under ``<paths.cache_dir>/steps/<step>/<key>/``.

The key hashes everything that changes a step's outputs (for ``oof``: the manifest's content,
the classes, model, recipe, folds and seed; for ``flag``: the OOF key plus the flag options;
and so on). A sweep over ``flag.*`` therefore trains the folds once. ``paths.out_dir`` keeps
the contract layout: its files are copies of the cached ones (hard links for big files).

Concurrent jobs that need the same entry (a joblib sweep) take a file lock on it: one builds,
the others wait and reuse.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cleanloop.io import write_json

log = logging.getLogger(__name__)

DONE = "cleanloop-entry.json"  # written last: an entry without it is unfinished (e.g. a killed oof)


@dataclass
class Entry:
    """One cached step output folder."""

    step: str
    key: str
    dir: Path

    @property
    def done(self) -> bool:
        return (self.dir / DONE).is_file()

    @property
    def info(self) -> dict:
        return json.loads((self.dir / DONE).read_text()) if self.done else {}

    def commit(self, **info) -> None:
        write_json(self.dir / DONE, {"step": self.step, "key": self.key, **info})


class StepCache:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def entry(self, step: str, key: str) -> Entry:
        return Entry(step, key, self.root / step / key)

    def find(self, step: str, key: str) -> Entry | None:
        e = self.entry(step, key)
        return e if e.done else None

    @contextmanager
    def claim(self, step: str, key: str) -> Iterator[Entry]:
        """Hold the entry's lock while checking and (re)building it."""
        e = self.entry(step, key)
        e.dir.mkdir(parents=True, exist_ok=True)
        with open(e.dir.with_name(key + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield e
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


LINK_ABOVE_BYTES = 8 << 20  # big files (OOF, embeddings, weights) are hard-linked; small ones copied


def _link_or_copy(src: str, dst: str) -> None:
    # A copy keeps the cache safe from in-place edits of a published CSV; a link saves the space of a
    # big file (cleanloop itself only ever replaces files by rename, never writes into them).
    if os.path.getsize(src) > LINK_ABOVE_BYTES:
        try:
            os.link(src, dst)
            return
        except OSError:  # another file system, or links not allowed
            pass
    shutil.copy2(src, dst)


def publish(entry_dir: Path, dest: Path, names: list[str]) -> None:
    """Make ``dest/<name>`` the cached ``entry_dir/<name>`` (files or folders), replacing what was there."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        src, dst = entry_dir / name, dest / name
        if dst.is_symlink() or dst.is_file():
            dst.unlink()
        elif dst.is_dir():
            shutil.rmtree(dst)
        if not src.exists():  # an optional output this entry lacks: leave no stale copy behind
            continue
        if src.is_dir():
            shutil.copytree(src, dst, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(src), str(dst))

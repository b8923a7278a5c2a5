"""The step cache: each step's outputs live under ``<paths.cache_dir>/steps/<step>/<key>/``.

The key (:mod:`cleanloop.lineage`) hashes everything that changes a step's outputs: its inputs'
content, its config, the image files and the code's versions. A sweep over ``flag.*`` therefore
trains the folds once. ``paths.out_dir`` keeps the contract layout: its files are copies of the
cached ones (hard links for big files).

Concurrent jobs that need the same entry (a joblib sweep) take a file lock on it: one builds,
the others wait and reuse.

An entry is built whole or not at all: :meth:`StepCache.rebuild` first removes the old entry's
done-marker, builds into a fresh temporary sibling folder (``.<key>.<random>.build``), writes the
marker there last and swaps the folder into place by rename. A kill at any point leaves the old
entry (no longer marked done), or the new one whole; a build killed after its marker was written
but before the swap is promoted by the next :meth:`StepCache.claim`. Work worth resuming is made of
entries of its own: ``oof``'s folds are ``oof-fold`` entries, each claimed and finished apart, so a
killed OOF build, or a fold job (``oof.folds``), leaves its finished folds for the next build.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cleanloop import locks
from cleanloop.io import _UMASK, write_json

log = logging.getLogger(__name__)

DONE = "cleanloop-entry.json"  # written last: an entry without it is unfinished (e.g. a killed oof)
BUILD_SUFFIX, OLD_SUFFIX = ".build", ".old"


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

    def unmark(self) -> None:
        """Remove the done-marker (call with the entry claimed): from here on no step takes the entry as finished."""
        (self.dir / DONE).unlink(missing_ok=True)

    def update(self, **info) -> None:
        """Rewrite the done-marker with ``info`` added (atomically; the entry's files stay as they are)."""
        write_json(self.dir / DONE, {**self.info, **info})

    def leftovers(self, suffix: str) -> list[Path]:
        """Temporary siblings of this entry left by a killed build (``.build``) or swap (``.old``), newest first."""
        found = [p for p in self.dir.parent.glob(f".{self.key}.*{suffix}") if p.is_dir()]
        return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def make_tmp_dir(parent: Path, prefix: str, suffix: str) -> Path:
    """A uniquely named new folder in ``parent`` with the usual permissions (mkdtemp's are 0700)."""
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent))
    os.chmod(path, 0o777 & ~_UMASK)
    return path


def _tmp_sibling(entry: Entry, suffix: str) -> Path:
    return make_tmp_dir(entry.dir.parent, f".{entry.key}.", suffix)


def swap_into_place(new: Path, dest: Path) -> None:
    """Make folder ``new`` be ``dest`` by rename; the folder ``dest`` was is removed."""
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=OLD_SUFFIX, dir=dest.parent))
        os.replace(dest, old)  # replaces the empty folder mkdtemp made
    os.replace(new, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class StepCache:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def entry(self, step: str, key: str) -> Entry:
        return Entry(step, key, self.root / step / key)

    def find(self, step: str, key: str) -> Entry | None:
        e = self.entry(step, key)
        if not e.done and any(p for p in e.leftovers(BUILD_SUFFIX) if (p / DONE).is_file()):
            with self.claim(step, key) as e:  # a build killed between writing its marker and the swap
                pass
        return e if e.done else None

    @contextmanager
    def claim(self, step: str, key: str) -> Iterator[Entry]:
        """Hold the entry's lock while checking and (re)building it."""
        e = self.entry(step, key)
        e.dir.parent.mkdir(parents=True, exist_ok=True)
        with open(e.dir.with_name(key + ".lock"), "w") as lock:
            locks.lock(lock)  # a byte-range lock, which NFS carries to the server (cleanloop.locks)
            try:
                self._recover(e)
                yield e
            finally:
                locks.unlock(lock)

    @staticmethod
    def _recover(e: Entry) -> None:
        """Under the lock every temporary sibling is a dead builder's: promote a finished build, drop old swaps."""
        for old in e.leftovers(OLD_SUFFIX):
            shutil.rmtree(old, ignore_errors=True)
        if e.done:
            return
        for build in e.leftovers(BUILD_SUFFIX):
            try:
                whole = json.loads((build / DONE).read_text()).get("key") == e.key
            except (OSError, ValueError):
                whole = False
            if whole:
                log.info("%s: finishing the publication of entry %s, killed before its swap", e.step, e.key)
                swap_into_place(build, e.dir)
                return

    def rebuild(self, e: Entry, build: Callable[[Path], dict]) -> dict:
        """Build ``e`` anew into a temporary sibling, mark it done and swap it into place; returns its info.

        Call with the entry claimed. A build that raises leaves nothing of itself and nothing marked done.
        """
        e.unmark()  # first: from here on no reader takes the old files for a finished entry
        builds = e.leftovers(BUILD_SUFFIX)
        tmp = _tmp_sibling(e, BUILD_SUFFIX)
        for stale in builds:  # under the lock: a dead builder's
            shutil.rmtree(stale, ignore_errors=True)
        try:
            info = build(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        Entry(e.step, e.key, tmp).commit(**info)
        swap_into_place(tmp, e.dir)
        return e.info


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


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
    """Make ``dest/<name>`` the cached ``entry_dir/<name>`` (files or folders), replacing what was there.

    Each name is copied to a temporary sibling first and renamed into place, so ``dest`` never
    holds half a file or half a model folder.
    """
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        src, dst = entry_dir / name, dest / name
        if not src.exists():  # an optional output this entry lacks: leave no stale copy behind
            _remove(dst)
            continue
        if src.is_dir():
            tmp = make_tmp_dir(dest, f".{name}.", ".tmp")
            try:
                shutil.copytree(src, tmp, copy_function=_link_or_copy, dirs_exist_ok=True)
                if dst.is_symlink() or dst.is_file():
                    dst.unlink()
                swap_into_place(tmp, dst)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        else:
            fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=dest)
            os.close(fd)
            os.unlink(tmp_name)
            try:
                _link_or_copy(str(src), tmp_name)
                if dst.is_dir() and not dst.is_symlink():
                    shutil.rmtree(dst)
                os.replace(tmp_name, dst)
            finally:
                if os.path.lexists(tmp_name):
                    os.unlink(tmp_name)

"""``cleanloop cache-steps list|prune``: what the step cache holds, and evicting by age or size (CONTRACT §8).

The step cache (:mod:`cleanloop.cache`) is ``<paths.cache_dir>/steps/<step>/<key>/``. One *entry*
here is one ``(step, key)``: its folder plus the temporary siblings a killed build (``.<key>.*.build``)
or swap (``.<key>.*.old``) left; an entry made only of a killed first build has no folder yet.
``steps/images/`` holds the image-scan entries (``bad_images.csv`` per manifest content): entries
like the others, cheap to rebuild. ``steps/oof-fold/`` holds one entry per trained OOF fold (what
``oof.folds`` jobs compute and a plain ``oof`` assembles); its STATE names the fold (``done, fold 3``,
``fold r1-3`` in a later ``oof.repeats`` run). Evicting one only means that fold trains again the
next time an OOF of its config is built; a finished ``oof`` entry does not need its folds.
Nothing else under ``paths.cache_dir`` (``models/``, ``lineage/``,
the decoded-image cache ``images/``) is listed or touched.

Times, per entry:

- *built*: when the entry was finished, the mtime of its done-marker (written last, and rewritten
  when a reuse records the entry's run in another MLflow store); for an unfinished entry the
  newest mtime of its files and folders.
- *used*: the later of *built* and the mtime of its lock file ``<key>.lock``. Every
  :meth:`StepCache.claim` (each step that builds or reuses the entry, and each image scan) opens
  the lock for writing, which sets its mtime: so *used* is when a step last claimed the entry.
  Access times are not used: ``noatime``/``relatime`` mounts keep them unreliable, and listing
  reads every marker. Reading an entry without claiming it (``compare`` locating a run's files)
  does not count.

``prune`` removes entries not used for ``--older-than`` days (``paths.cache_max_age_days``), then,
least recently used first, entries until the cache is at most ``--max-gb`` (``paths.cache_max_gb``;
GB = 10^9 bytes); and always the dead temporary siblings of finished entries. Each removal holds
the entry's lock (the same :mod:`cleanloop.locks` lock on ``<key>.lock`` as :meth:`StepCache.claim`, taken without
waiting: an entry being built or read under its lock is skipped, never waited for), checks the
entry was not used since the scan, unlinks the done-marker first (from then on no step takes the
entry as finished), renames the folder to a ``.old`` sibling and deletes that (a kill leaves a
``.old`` that the next claim or prune removes). :meth:`StepCache.claim` itself is not used: it
waits for a running build and marks the entry used. Lock files stay (empty): removing one while
a waiter holds it open would let two builders hold "the" lock.

Sizes count every file once (hard links within an entry once); a file also hard-linked from
``paths.out_dir`` (big outputs, :func:`cleanloop.cache.publish`) stays on disk after the entry
goes, so ``prune`` reports it apart from the freed bytes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cleanloop import locks
from cleanloop.cache import BUILD_SUFFIX, DONE, OLD_SUFFIX

GB = 10**9
DAY = 86400.0

USAGE = """usage: cleanloop cache-steps list [overrides]
       cleanloop cache-steps prune [--older-than DAYS] [--max-gb GB] [--dry-run] [overrides]

list:  the step cache's entries (<paths.cache_dir>/steps/<step>/<key>/): size, when built and
       last used, done or unfinished, the MLflow run ids recorded in the entry
prune: remove entries not used for DAYS days (default paths.cache_max_age_days), then the least
       recently used until the cache is at most GB (10^9 bytes; default paths.cache_max_gb), and
       dead temporary folders; --dry-run only lists what would go
overrides: Hydra overrides of the project's config, e.g. paths.root_dir=/data/project"""


@dataclass
class CacheEntry:
    """One ``(step, key)`` of the step cache, as found on disk."""

    step: str
    key: str
    dir: Path                      # <root>/<step>/<key>; absent for an entry made of leftovers only
    done: bool
    size: int                      # bytes of the folder and its leftovers, each file once
    linked: int                    # of which in files with other hard links (e.g. published outputs)
    built: float                   # epoch seconds, see the module's docstring
    used: float
    run_ids: list[str] = field(default_factory=list)
    leftovers: list[Path] = field(default_factory=list)
    leftover_size: int = 0
    busy: bool = False             # its lock is held now: a build (or a claim) is running
    detail: str = ""               # what the entry is, where its marker says more than its step (a fold's number)

    @property
    def lock(self) -> Path:
        return self.dir.with_name(self.key + ".lock")

    @property
    def state(self) -> str:
        if self.done:
            state = "done, in use" if self.busy else "done"
        else:
            state = "building" if self.busy else "unfinished"
        return f"{state}, {self.detail}" if self.detail else state


def _du(paths: list[Path]) -> tuple[int, int, float]:
    """(bytes, bytes in files with other hard links, newest mtime) of the files under ``paths``."""
    seen: set[tuple[int, int]] = set()
    size = linked = 0
    newest = 0.0
    for top in paths:
        for base, dirs, files in os.walk(top, followlinks=False):
            try:
                newest = max(newest, os.lstat(base).st_mtime)
            except OSError:
                continue  # removed meanwhile
            for name in files + [d for d in dirs if os.path.islink(os.path.join(base, d))]:
                try:
                    st = os.lstat(os.path.join(base, name))
                except OSError:
                    continue
                newest = max(newest, st.st_mtime)
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
                size += st.st_size
                if st.st_nlink > 1:
                    linked += st.st_size
    return size, linked, newest


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _marker(marker: Path) -> dict:
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _run_ids(info: dict) -> list[str]:
    ids = [info.get("run_id"), *dict(info.get("runs") or {}).values()]
    return list(dict.fromkeys(str(i) for i in ids if i))


def _detail(info: dict) -> str:
    """``fold 3`` (``fold r1-3`` in a later repeat) for an OOF fold entry; empty for the others."""
    fold, repeat = info.get("fold"), info.get("repeat") or 0
    if not isinstance(fold, int):
        return ""
    return f"fold r{repeat}-{fold}" if repeat else f"fold {fold}"


def _leftover_key(name: str) -> str | None:
    """The key of a temporary sibling ``.<key>.<random>.build`` / ``.old`` (mkdtemp's random part has no dot)."""
    for suffix in (BUILD_SUFFIX, OLD_SUFFIX):
        if name.startswith(".") and name.endswith(suffix):
            key, sep, _ = name[1:-len(suffix)].rpartition(".")
            return key if sep and key else None
    return None


def _inspect(step_dir: Path, key: str) -> CacheEntry | None:
    """The entry ``key`` of ``step_dir`` as it is now, or None when nothing of it is left."""
    folder = step_dir / key
    leftovers = sorted(p for p in step_dir.glob(f".{key}.*")
                       if _leftover_key(p.name) == key and p.is_dir() and not p.is_symlink())
    has_folder = folder.is_dir() and not folder.is_symlink()
    if not has_folder and not leftovers:
        return None
    size, linked, newest = _du(([folder] if has_folder else []) + leftovers)
    left_size = _du(leftovers)[0] if leftovers else 0
    marker_time = _mtime(folder / DONE) if has_folder else None
    done = marker_time is not None
    built = marker_time if done else newest
    lock_time = _mtime(folder.with_name(key + ".lock")) or 0.0
    info = _marker(folder / DONE) if done else {}
    return CacheEntry(step=step_dir.name, key=key, dir=folder, done=done, size=size, linked=linked,
                      built=built, used=max(built, lock_time), run_ids=_run_ids(info),
                      leftovers=leftovers, leftover_size=left_size, detail=_detail(info))


@contextmanager
def _try_lock(lock_path: Path, *, create: bool) -> Iterator[bool]:
    """Hold ``lock_path``'s lock if it is free (True), without waiting and without touching its mtime."""
    try:
        if create:
            try:  # a lock file prune creates is dated 1970: it marks no use of the entry
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
                os.utime(fd, (0, 0))
            except FileExistsError:
                fd = os.open(lock_path, os.O_RDWR)
        else:
            fd = os.open(lock_path, os.O_RDWR)
    except FileNotFoundError:
        yield True  # no lock file: no step has claimed the entry (a claim creates it)
        return
    except PermissionError:
        fd = os.open(lock_path, os.O_RDONLY)
    try:
        if not locks.lock(fd, blocking=False):
            yield False
            return
        try:
            yield True
        finally:
            locks.unlock(fd)
    finally:
        os.close(fd)


def scan(root: str | os.PathLike) -> list[CacheEntry]:
    """Every entry under the step cache ``root`` (``<paths.cache_dir>/steps``), by step then most recently used."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for step_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink()):
        keys = set()
        for p in step_dir.iterdir():
            key = _leftover_key(p.name) if p.name.startswith(".") else p.name
            if key and p.is_dir() and not p.is_symlink():
                keys.add(key)
        for key in keys:
            e = _inspect(step_dir, key)
            if e is not None:
                with _try_lock(e.lock, create=False) as free:
                    e.busy = not free
                found.append(e)
    return sorted(found, key=lambda e: (e.step, -e.used, e.key))


@dataclass
class Removal:
    entry: CacheEntry
    why: str                       # "unused for 31.0 days", "over the cap", "dead temporary folders"
    size: int                      # bytes removed (or that would be)
    freed: int                     # of which not hard-linked elsewhere
    skipped: str | None = None     # why it stayed ("in use", "used meanwhile")
    leftovers_only: bool = False   # only the dead temporary folders of a finished entry


def _remove_tree(path: Path, step_dir: Path, key: str) -> None:
    """Rename ``path`` to a ``.old`` sibling (gone at once for readers), then delete it."""
    trash = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=OLD_SUFFIX, dir=step_dir))
    os.replace(path, trash)  # replaces the empty folder mkdtemp made
    shutil.rmtree(trash)


def _evict(e: CacheEntry, why: str, *, dry_run: bool, leftovers_only: bool = False) -> Removal:
    step_dir = e.dir.parent
    with _try_lock(e.lock, create=not dry_run) as free:
        if not free:
            return Removal(e, why, 0, 0, skipped="in use", leftovers_only=leftovers_only)
        now = _inspect(step_dir, e.key)  # under the lock: as it is now
        if now is None:
            return Removal(e, why, 0, 0, skipped="gone meanwhile", leftovers_only=leftovers_only)
        if now.used > e.used or now.done != e.done:
            return Removal(e, why, 0, 0, skipped="used meanwhile", leftovers_only=leftovers_only)
        if leftovers_only:
            size = now.leftover_size
            freed = size - _du(now.leftovers)[1]
        else:
            size, freed = now.size, now.size - now.linked
        if not dry_run:
            if not leftovers_only:
                if now.done:
                    (now.dir / DONE).unlink()  # first: from here on no step takes the entry as finished
                if now.dir.is_dir():
                    _remove_tree(now.dir, step_dir, e.key)
            for p in now.leftovers:  # we hold the lock: their builders and swappers are dead
                shutil.rmtree(p)
        return Removal(e, why, size, freed, leftovers_only=leftovers_only)


@dataclass
class PruneResult:
    removals: list[Removal]
    remaining: int                 # bytes left in the cache (after a dry run: that would be left)
    entries_left: int


def prune(root: str | os.PathLike, *, older_than_days: float | None = None, max_bytes: int | None = None,
          dry_run: bool = False, now: float | None = None) -> PruneResult:
    """Remove the dead temporary folders of finished entries, entries not used for ``older_than_days``,
    then the least recently used until the cache holds at most ``max_bytes``; see the module's docstring."""
    now = time.time() if now is None else now
    entries = scan(root)
    removals: list[Removal] = []
    left = {(e.step, e.key): e.size for e in entries}
    for e in entries:
        if e.done and e.leftovers:
            r = _evict(e, "dead temporary folders", dry_run=dry_run, leftovers_only=True)
            removals.append(r)
            if not r.skipped:
                left[(e.step, e.key)] -= r.size
    kept = []
    for e in entries:
        idle = (now - e.used) / DAY
        if older_than_days is not None and idle > older_than_days:
            r = _evict(e, f"unused for {idle:.1f} days", dry_run=dry_run)
            removals.append(r)
            if not r.skipped:
                left.pop((e.step, e.key))
                continue
        kept.append(e)
    if max_bytes is not None:
        for e in sorted(kept, key=lambda e: (e.used, e.step, e.key)):
            if sum(left.values()) <= max_bytes:
                break
            r = _evict(e, f"least recently used, over {_size(max_bytes)}", dry_run=dry_run)
            removals.append(r)
            if not r.skipped:
                left.pop((e.step, e.key))
    return PruneResult(removals, sum(left.values()), len(left))


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def _age(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds >= DAY:
        return f"{seconds / DAY:.1f}d" if seconds < 10 * DAY else f"{seconds / DAY:.0f}d"
    for unit, span in (("h", 3600), ("m", 60)):
        if seconds >= span:
            return f"{seconds / span:.0f}{unit}"
    return f"{seconds:.0f}s"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def format_list(root: Path, entries: list[CacheEntry], now: float | None = None) -> list[str]:
    now = time.time() if now is None else now
    rows = [["STEP", "KEY", "SIZE", "BUILT", "USED", "STATE", "RUNS"]]
    for e in entries:
        state = e.state + (f" +{len(e.leftovers)} temp" if e.leftovers and e.done else "")
        rows.append([e.step, e.key, _size(e.size), _age(now - e.built) + " ago", _age(now - e.used) + " ago",
                     state, ",".join(e.run_ids) or "-"])
    lines = _table(rows) if entries else []
    total = sum(e.size for e in entries)
    lines.append(f"total: {len(entries)} entries, {_size(total)} in {root}")
    return lines


def format_prune(root: Path, result: PruneResult, dry_run: bool) -> list[str]:
    lines = []
    verb = "would remove" if dry_run else "removed"
    for r in result.removals:
        what = f"{r.entry.step}/{r.entry.key}" + (" temporary folders" if r.leftovers_only else "")
        if r.skipped:
            lines.append(f"kept {what}: {r.skipped} ({r.why})")
        else:
            lines.append(f"{verb} {what}  {_size(r.size)}  ({r.why})")
    gone = [r for r in result.removals if not r.skipped]
    size, freed = sum(r.size for r in gone), sum(r.freed for r in gone)
    linked = f" ({_size(size - freed)} stays, hard-linked from outputs)" if size > freed else ""
    if not gone:
        lines.append("nothing to remove")
    lines.append(f"{'would free' if dry_run else 'freed'} {_size(freed)}{linked}; "
                 f"{result.entries_left} entries, {_size(result.remaining)} left in {root}")
    return lines


class UsageError(Exception):
    pass


def _number(flag: str, value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise UsageError(f"{flag} {value!r}: give a number") from None
    if not math.isfinite(x) or x < 0:
        raise UsageError(f"{flag} {value!r}: give a number >= 0")
    return x


def parse_args(argv: list[str]) -> tuple[str, dict, list[str]]:
    """(``list`` or ``prune``, the prune flags given, the Hydra overrides); raises UsageError."""
    if not argv:
        raise UsageError("give a command: list or prune")
    command, rest = argv[0], argv[1:]
    if command not in ("list", "prune"):
        raise UsageError(f"unknown command {command!r}; choose list or prune")
    flags: dict = {}
    overrides = []
    i = 0
    while i < len(rest):
        arg = rest[i]
        name, eq, inline = arg.partition("=")
        if arg.startswith("-") and command == "list":
            raise UsageError(f"{name}: list takes no options, only overrides")
        if name in ("--older-than", "--max-gb"):
            if not eq:
                if i + 1 >= len(rest):
                    raise UsageError(f"{name} needs a value")
                i += 1
                inline = rest[i]
            flags[name[2:].replace("-", "_")] = _number(name, inline)
        elif arg == "--dry-run":
            flags["dry_run"] = True
        elif arg.startswith("-"):
            raise UsageError(f"unknown option {name}")
        elif eq:
            overrides.append(arg)
        else:
            raise UsageError(f"{arg!r} is neither an option nor an override (key=value)")
        i += 1
    return command, flags, overrides


class ConfigError(Exception):
    pass


def compose(overrides: list[str]):
    """The project's config (conf/config.yaml) with ``overrides``, as the steps compose it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from cleanloop.config import conf_dir, register_resolvers

    register_resolvers()
    if GlobalHydra.instance().is_initialized():  # an in-process caller's earlier Hydra app
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return hydra_compose("config", overrides=overrides)
    except Exception as e:  # Hydra's override and composition errors
        raise ConfigError(" ".join(str(e).split()) or type(e).__name__) from e  # one line


def _limit(cfg, key: str, flag: float | None, what: str) -> float | None:
    if flag is not None:
        return flag
    value = cfg.paths.get(key)
    if value is None:
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"paths.{key}={value!r}: give {what} or null") from None
    if not math.isfinite(x) or x < 0:
        raise ConfigError(f"paths.{key}={value!r}: give {what} >= 0 or null")
    return x


def main(argv: list[str]) -> int:
    """``cleanloop cache-steps ...``; returns the exit status (2: bad arguments, 1: an error)."""
    if argv and argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    try:
        command, flags, overrides = parse_args(argv)
    except UsageError as e:
        print(f"cleanloop cache-steps: error: {e}; usage: cleanloop cache-steps list|prune "
              "[--older-than DAYS] [--max-gb GB] [--dry-run] [overrides]", file=sys.stderr)
        return 2
    try:
        cfg = compose(overrides)
        root = (Path(str(cfg.paths.cache_dir)) / "steps").absolute()  # as steps.common.step_cache
        if command == "list":
            lines = format_list(root, scan(root))
        else:
            days = _limit(cfg, "cache_max_age_days", flags.get("older_than"), "a number of days")
            max_gb = _limit(cfg, "cache_max_gb", flags.get("max_gb"), "a size in GB")
            if days is None and max_gb is None:
                raise ConfigError("prune needs a limit: --older-than DAYS or --max-gb GB (or set "
                                  "paths.cache_max_age_days / paths.cache_max_gb)")
            dry_run = bool(flags.get("dry_run"))
            result = prune(root, older_than_days=days, max_bytes=None if max_gb is None else int(max_gb * GB),
                           dry_run=dry_run)
            lines = format_prune(root, result, dry_run)
    except ConfigError as e:
        print(f"cleanloop cache-steps: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"cleanloop cache-steps: error: {e}", file=sys.stderr)
        return 1
    print("\n".join(lines), flush=True)
    return 0

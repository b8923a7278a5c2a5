"""What a step's cache key is made of, in one place (CONTRACT §8).

Every step key is ``short_hash([step, parts])`` where ``parts`` holds

- ``step``: the step's own inputs and config (the OOF key's data, classes, recipe...; for the
  steps whose key is built elsewhere, that key);
- ``env``: :data:`KEY_VERSION`, cleanloop's version and those of torch, transformers, lightning
  and cleanlab: a code change that alters outputs never reuses old ones;
- ``images`` (steps that read the images: oof, flag, train): the resolved image root, the hash
  of the resolved image paths, and a content fingerprint of the image files.

The content fingerprint hashes every image's bytes (BLAKE2b), but reads the bytes only of files
whose stat signature (size, mtime, ctime, inode) differs from the one remembered in
``<paths.cache_dir>/lineage/image_stats.parquet``: a ``stat`` per image on an unchanged data set,
and an image rewritten in place at the same size, even with its mtime put back, is read again
(its ctime moved). A file merely touched is hashed again but keeps its digest, so the key holds.

The parts are written to each cache entry (``lineage.json`` and its done-marker) and logged to
the step's MLflow run as ``lineage.json``; :func:`explain` says which parts changed when a step
is recomputed.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from cleanloop import locks
from cleanloop.config import short_hash

log = logging.getLogger(__name__)

KEY_VERSION = 3  # bump when a code change alters any step's outputs: every key changes, nothing stale is reused
LIBRARIES = ("cleanloop", "torch", "transformers", "lightning", "cleanlab")
LINEAGE_FILE = "lineage.json"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """The code the outputs came from: :data:`KEY_VERSION` and the library versions (read from the
    installed distributions, without importing them)."""
    return {"key_version": KEY_VERSION, **{lib: _version(lib) for lib in LIBRARIES}}


def reads_images(step: str) -> bool:
    """Steps whose outputs depend on the image files (audit's hashes, oof, flag's montage and paths, train)."""
    return step in ("audit", "oof", "flag", "review") or step.startswith("train")


# -- image fingerprint ------------------------------------------------------------------------

_STATS_COLUMNS = {"path": "object", "bytes": "int64", "mtime_ns": "int64", "ctime_ns": "int64", "ino": "int64",
                  "digest": "object"}
_CHANGED: dict[str, tuple[int, int]] = {}  # content fingerprint -> (files changed, files) when this process saw it change


def _signature(path: str) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def _digest(path: str) -> str:
    from cleanloop.imagecache import file_digest

    try:
        return file_digest(path)
    except OSError:
        return "missing"


def content_digests(paths: Sequence[str], table_dir: str | os.PathLike, *, workers: int = 4) -> tuple[list[str], int]:
    """Each file's byte digest, re-reading only files whose stat signature changed since last seen;
    also the number of known files whose digest changed."""
    table_dir = Path(table_dir)
    table_dir.mkdir(parents=True, exist_ok=True)
    sigs = [_signature(p) for p in paths]
    with open(table_dir / "image_stats.lock", "w") as lock:
        locks.lock(lock)
        try:
            table_path = table_dir / "image_stats.parquet"
            if table_path.is_file():
                stats = pd.read_parquet(table_path)
            else:
                stats = pd.DataFrame({c: pd.Series(dtype=t) for c, t in _STATS_COLUMNS.items()})
            known = dict(zip(stats["path"], zip(stats["bytes"], stats["mtime_ns"], stats["ctime_ns"], stats["ino"],
                                                stats["digest"], strict=True), strict=True))
            out: list[str | None] = []
            fresh = []
            for i, (p, sig) in enumerate(zip(paths, sigs, strict=True)):
                seen = known.get(p)
                if sig is None:
                    out.append("missing")
                elif seen is not None and tuple(int(x) for x in seen[:4]) == sig:
                    out.append(seen[4])
                else:
                    out.append(None)
                    fresh.append(i)
            changed = 0
            if fresh:
                with ThreadPoolExecutor(max(1, workers)) as pool:
                    hashed = list(pool.map(lambda i: _digest(paths[i]), fresh))
                for i, d in zip(fresh, hashed, strict=True):
                    out[i] = d
                    seen = known.get(paths[i])
                    changed += seen is not None and seen[4] != d
                new = pd.DataFrame({"path": [paths[i] for i in fresh], "bytes": [sigs[i][0] for i in fresh],
                                    "mtime_ns": [sigs[i][1] for i in fresh], "ctime_ns": [sigs[i][2] for i in fresh],
                                    "ino": [sigs[i][3] for i in fresh], "digest": hashed})
                stats = pd.concat([stats, new]).drop_duplicates("path", keep="last").reset_index(drop=True)
                from cleanloop.io import write_table

                write_table(table_path, stats)
        finally:
            locks.unlock(lock)
    return out, changed  # type: ignore[return-value]


def images(cfg: DictConfig, m) -> dict:
    """The image part of a key: resolved root, the resolved paths' hash, the files' content fingerprint."""
    paths = [str(p) for p in m.df["abs_path"]]
    root = cfg.data.get("image_root") or Path(m.source).parent
    digests, changed = content_digests(paths, Path(cfg.paths.cache_dir) / "lineage",
                                       workers=int(cfg.data.get("scan_workers", 4)))
    content = short_hash(digests)
    if changed:
        _CHANGED[content] = (changed, len(paths))
    return {"root": str(Path(root).resolve()), "paths": short_hash(paths), "n": len(paths), "content": content}


# -- keys -------------------------------------------------------------------------------------


def inputs(cfg: DictConfig, m=None, *, with_images: bool = True) -> dict:
    """The parts every key shares: ``env``, and ``images`` of manifest ``m`` (the input manifest)."""
    parts = {"env": environment()}
    if with_images and m is not None:
        parts["images"] = images(cfg, m)
    return parts


def key(step: str, parts: dict, *, manifest: str | os.PathLike | None = None) -> tuple[str, dict]:
    """The entry key of ``step`` and its lineage record (the parts, plus what a reader needs that is
    not part of the key: the manifest path and when the key was made)."""
    k = short_hash([step, parts])
    record = {"step": step, "key": k, "parts": parts,
              "manifest": str(Path(manifest).resolve()) if manifest else None,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return k, record


# -- why a step was recomputed ----------------------------------------------------------------


def _diff_step(old, new) -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        names = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        return f"{', '.join(names)} changed" if names else ""
    return "its inputs or config changed" if old != new else ""


def _diff_images(old: dict | None, new: dict | None) -> list[str]:
    if old == new:
        return []
    if not old or not new:
        return ["image files changed"]
    out = []
    if old.get("root") != new.get("root"):
        out.append(f"image root changed ({old.get('root')} -> {new.get('root')})")
    if old.get("paths") != new.get("paths"):
        out.append("image paths changed")
    elif old.get("content") != new.get("content"):
        seen = _CHANGED.get(new.get("content", ""))
        out.append(f"image files changed ({seen[0]} of {seen[1]})" if seen else "image files changed")
    return out


def diff(old: dict, new: dict) -> list[str]:
    """Which parts differ between two lineage records, in words."""
    o, n = old.get("parts", {}), new.get("parts", {})
    out = []
    step = _diff_step(o.get("step"), n.get("step"))
    if step:
        out.append(step)
    oe, ne = o.get("env", {}), n.get("env", {})
    for name in sorted(set(oe) | set(ne)):
        if oe.get(name) != ne.get(name):
            label = "cleanloop key version" if name == "key_version" else name
            out.append(f"{label} {oe.get(name)} -> {ne.get(name)}")
    out += _diff_images(o.get("images"), n.get("images"))
    return out


def latest_record(step_dir: Path, manifest: str | None, *, done: str) -> dict | None:
    """The lineage of the newest finished entry of a step for the same manifest path."""
    best, best_time = None, ""
    for marker in step_dir.glob(f"*/{done}"):
        try:
            rec = json.loads(marker.read_text()).get("lineage")
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict) and rec.get("manifest") == manifest and str(rec.get("created", "")) >= best_time:
            best, best_time = rec, str(rec.get("created", ""))
    return best


def explain(step_dir: Path, record: dict, *, done: str, forced: bool) -> str:
    """Why ``record``'s step is being built, for the log: ``recomputing: <what changed>`` compared with
    the latest finished entry of the step for the same manifest, or ``computing: ...`` without one."""
    if forced and (step_dir / record["key"] / done).is_file():
        return "recomputing: paths.reuse_steps=false"
    old = latest_record(step_dir, record.get("manifest"), done=done)
    if old is None:
        return "computing: no earlier entry for this manifest"
    changed = diff(old, record)
    return "recomputing: " + ("; ".join(changed) if changed else "key parts differ from the latest entry")

"""The on-disk image cache: every image decoded, padded and resized once, read with no decode per epoch.

An image's entry is keyed by the hash of its file's bytes and the target size, so an edited
image (new bytes) gets a new entry and a renamed or copied one reuses its old entry. Two formats:

- ``raw``: one uint8 file of ``(slot, S, S, 3)`` pixels read through ``np.memmap`` (no decode at
  all; S x S x 3 bytes an image, 602 KB at 448 px, 73 GB for 121,514 images);
- ``jpeg``: one re-encoded JPEG per image at the target size (quality 95, 4:4:4: 58 KB at 448 px on
  bench/gpu.py's synthetic photos, a tenth of raw; a small decode, no resize), for when raw does
  not fit ``data.cache_max_gb``.

``auto`` keeps using a format already built at this size, else picks raw when the manifest's
images fit the budget. Layout under ``<paths.cache_dir>/images/<size>px-v<VERSION>/``: ``raw/pixels.u8`` and
``raw/slots.parquet`` (hash -> slot), ``jpeg/<hh>/<hash>.jpg``, and ``stats.parquet``: the path, size and mtime of every file
hashed, so a later run re-reads the bytes only of files whose size or mtime changed. Appends hold
a file lock (parallel sweep jobs), and an entry exists only once its index is written by rename:
a killed build leaves at most bytes past the last indexed slot, cut off by the next build.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cleanloop import locks
from cleanloop.errors import CleanloopError
from cleanloop.images import load_image, pad_to_square
from cleanloop.io import write_table

log = logging.getLogger(__name__)

FORMATS = ("auto", "raw", "jpeg")
VERSION = 1  # of the decode/pad/resize recipe: a change to it must not reuse old pixels
JPEG_QUALITY = 95


def file_digest(path: str) -> str:
    """Hash of the file's bytes (BLAKE2b, 128 bits)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def square_pixels(img: Image.Image, size: int) -> np.ndarray:
    """(S, S, 3) uint8 as the model sees an RGB image: padded to square, resized (bicubic)."""
    return np.asarray(pad_to_square(img).resize((size, size), Image.Resampling.BICUBIC), dtype=np.uint8)


def resize_square(path: str, size: int) -> np.ndarray:
    """The file decoded upright as :func:`square_pixels` gives it."""
    return square_pixels(load_image(path), size)


class DiskImageCache:
    """One target size's store (see the module docstring)."""

    def __init__(self, root: str | os.PathLike, size: int, *, fmt: str = "auto", max_gb: float = 200.0,
                 workers: int = 4):
        if fmt not in FORMATS:
            raise CleanloopError(f"data.cache_format={fmt!r}: choose one of {', '.join(FORMATS)}")
        self.size, self.fmt_wanted, self.max_gb, self.workers = int(size), fmt, float(max_gb), max(1, int(workers))
        self.dir = Path(root) / f"{self.size}px-v{VERSION}"
        self.slot_bytes = self.size * self.size * 3

    # -- bookkeeping -------------------------------------------------------------------------
    @contextmanager
    def _locked(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "lock", "w") as lock:
            locks.lock(lock)
            try:
                yield
            finally:
                locks.unlock(lock)

    def _read(self, name: str, columns: dict[str, str]) -> pd.DataFrame:
        path = self.dir / name
        if path.is_file():
            return pd.read_parquet(path)
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in columns.items()})

    def _stats(self) -> pd.DataFrame:
        return self._read("stats.parquet", {"path": "object", "bytes": "int64", "mtime_ns": "int64",
                                            "digest": "object"})

    def _slots(self) -> pd.DataFrame:
        return self._read("raw/slots.parquet", {"digest": "object", "slot": "int64"})

    def choose_format(self, n_images: int) -> str:
        """The wanted format; for ``auto`` the one already built here, else raw if it fits the budget."""
        if self.fmt_wanted != "auto":
            return self.fmt_wanted
        for fmt, marker in (("raw", "raw/slots.parquet"), ("jpeg", "jpeg")):
            if (self.dir / marker).exists():
                return fmt
        return "raw" if n_images * self.slot_bytes <= self.max_gb * 1e9 else "jpeg"

    def digests(self, paths: Sequence[str]) -> list[str]:
        """Each file's byte hash, re-reading only files whose size or mtime changed since last seen."""
        stats = self._stats()
        known = dict(zip(stats["path"], zip(stats["bytes"], stats["mtime_ns"], stats["digest"], strict=True),
                         strict=True))
        out, fresh = [], []
        for p in paths:
            st = os.stat(p)
            seen = known.get(p)
            if seen is not None and seen[0] == st.st_size and seen[1] == st.st_mtime_ns:
                out.append(seen[2])
            else:
                out.append(None)
                fresh.append((len(out) - 1, p, st))
        if fresh:
            with ThreadPoolExecutor(self.workers) as pool:
                hashed = list(pool.map(lambda item: file_digest(item[1]), fresh))
            for (i, _, _), d in zip(fresh, hashed, strict=True):
                out[i] = d
            new = pd.DataFrame({"path": [p for _, p, _ in fresh], "bytes": [st.st_size for _, _, st in fresh],
                                "mtime_ns": [st.st_mtime_ns for _, _, st in fresh], "digest": hashed})
            stats = pd.concat([stats, new]).drop_duplicates("path", keep="last")
            write_table(self.dir / "stats.parquet", stats.reset_index(drop=True))
        return out

    def lookup(self, digests: Sequence[str]) -> CacheReader | None:
        """A reader of the cached pixels of these byte digests when this store holds every one of them,
        else None. Read-only: it never builds, locks or writes (the audit reads the cache only when
        it is already there). ``reader[i]`` is ``digests[i]``'s (S, S, 3) square, as :meth:`ensure` gives it."""
        formats = ("raw", "jpeg") if self.fmt_wanted == "auto" else (self.fmt_wanted,)
        for fmt in formats:
            if fmt == "raw":
                index_path, pixels = self.dir / "raw" / "slots.parquet", self.dir / "raw" / "pixels.u8"
                if not index_path.is_file() or not pixels.is_file():
                    continue
                slots = pd.read_parquet(index_path)
                index = pd.Series(slots["slot"].to_numpy(np.int64), index=slots["digest"].to_numpy())
                keys = index.reindex(list(digests))
                # every slot indexed and inside the pixel file (an index is written only after its pixels)
                if keys.isna().any() or (len(keys) and (keys.max() + 1) * self.slot_bytes > pixels.stat().st_size):
                    continue
                return CacheReader(str(self.dir / "raw"), self.size, "raw", keys.to_numpy(np.int64))
            paths = [self._jpeg_path(d) for d in digests]
            if (self.dir / "jpeg").is_dir() and all(p.is_file() for p in paths):
                return CacheReader(str(self.dir / "jpeg"), self.size, "jpeg", [str(p) for p in paths])
        return None

    # -- building ----------------------------------------------------------------------------
    def ensure(self, paths: Sequence[str]) -> CacheReader:
        """Cache every image in ``paths`` not cached yet; a reader whose ``keys[i]`` is ``paths[i]``'s entry."""
        paths = [str(p) for p in paths]
        t0 = time.time()
        with self._locked():
            digests = self.digests(paths)
            fmt = self.choose_format(len(set(digests)))
            if fmt == "raw":
                keys, added = self._ensure_raw(paths, digests)
            else:
                keys, added = self._ensure_jpeg(paths, digests)
        if added:
            log.info("image cache: %d new image(s) at %d px (%s) in %.1fs -> %s", added, self.size, fmt,
                     time.time() - t0, self.dir)
        return CacheReader(str(self.dir / fmt), self.size, fmt, keys)

    def _missing(self, paths: list[str], digests: list[str], have) -> dict[str, str]:
        """digest -> one path to decode it from, for digests not stored yet (first path wins)."""
        todo: dict[str, str] = {}
        for p, d in zip(paths, digests, strict=True):
            if not have(d) and d not in todo:
                todo[d] = p
        return todo

    def _decode_all(self, todo: dict[str, str]):
        """(digest, pixels) in order, decoded by a thread pool (PIL releases the GIL while decoding),
        a chunk at a time so that at most a chunk of decoded images waits in memory."""
        size, items = self.size, list(todo.items())
        with ThreadPoolExecutor(self.workers) as pool:
            for start in range(0, len(items), 64 * self.workers):
                chunk = items[start:start + 64 * self.workers]
                yield from zip((d for d, _ in chunk), pool.map(lambda p: resize_square(p, size), (p for _, p in chunk)),
                               strict=True)

    def _ensure_raw(self, paths: list[str], digests: list[str]) -> tuple[np.ndarray, int]:
        slots = self._slots()
        index = dict(zip(slots["digest"], slots["slot"].astype(int), strict=True))
        todo = self._missing(paths, digests, index.__contains__)
        if todo:
            pixels = self.dir / "raw" / "pixels.u8"
            pixels.parent.mkdir(exist_ok=True)
            n = len(index)
            with open(pixels, "ab") as f:
                f.truncate(n * self.slot_bytes)  # drop what a killed build appended past the index
                for d, arr in self._decode_all(todo):
                    f.write(np.ascontiguousarray(arr).tobytes())
                    index[d] = n
                    n += 1
                f.flush()
                os.fsync(f.fileno())
            write_table(self.dir / "raw" / "slots.parquet", pd.DataFrame({"digest": list(index), "slot": list(index.values())}))
        return np.asarray([index[d] for d in digests], dtype=np.int64), len(todo)

    def _jpeg_path(self, digest: str) -> Path:
        return self.dir / "jpeg" / digest[:2] / f"{digest}.jpg"

    def _ensure_jpeg(self, paths: list[str], digests: list[str]) -> tuple[list[str], int]:
        todo = self._missing(paths, digests, lambda d: self._jpeg_path(d).is_file())
        for d, arr in self._decode_all(todo):
            target = self._jpeg_path(d)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".tmp")
            Image.fromarray(arr).save(tmp, format="JPEG", quality=JPEG_QUALITY, subsampling=0)  # 4:4:4 colour
            os.replace(tmp, target)
        return [str(self._jpeg_path(d)) for d in digests], len(todo)


class CacheReader:
    """Reads cached images by position; picklable for DataLoader workers (each opens its own memmap)."""

    def __init__(self, root: str, size: int, fmt: str, keys):
        self.root, self.size, self.fmt, self.keys = root, size, fmt, keys
        self._pixels = None

    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self):
        return {**self.__dict__, "_pixels": None}

    def __getitem__(self, i: int) -> np.ndarray:
        """(S, S, 3) uint8 of the i-th path given to ``ensure``."""
        if self.fmt == "raw":
            if self._pixels is None:
                self._pixels = np.memmap(Path(self.root) / "pixels.u8", dtype=np.uint8, mode="r").reshape(
                    -1, self.size, self.size, 3)
            return np.array(self._pixels[self.keys[i]])
        with Image.open(self.keys[i]) as img:
            return np.array(img.convert("RGB"), dtype=np.uint8)


def cache_from_config(cfg) -> DiskImageCache:
    """``data.cache_*`` and ``model.image_size`` of a composed config."""
    return DiskImageCache(Path(cfg.paths.cache_dir) / "images", cfg.model.image_size,
                          fmt=cfg.data.get("cache_format", "auto"), max_gb=cfg.data.get("cache_max_gb", 200),
                          workers=cfg.data.get("scan_workers", 4))

"""The on-disk image cache: same pixels as decoding, keyed by bytes, safe after a killed build."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cleanloop.data import ImageTransform, make_dataset
from cleanloop.imagecache import DiskImageCache, resize_square

from conftest import run_cli, write_png


def _images(folder, n=6):
    paths = []
    for i in range(n):
        p = folder / f"{i}.png"
        write_png(p, 30 * i, size=20 + 3 * i)  # different sizes: padding and resizing both happen
        paths.append(str(p))
    return paths


def test_raw_cache_gives_the_decoded_pixels_and_reuses_entries(tmp_path):
    paths = _images(tmp_path / "img")
    cache = DiskImageCache(tmp_path / "cache", 16, fmt="raw", workers=2)
    reader = cache.ensure(paths + paths[:2])  # a path twice: one entry
    assert reader.fmt == "raw" and len(reader) == 8
    for i, p in enumerate(paths + paths[:2]):
        assert np.array_equal(reader[i], resize_square(p, 16))
    assert (cache.dir / "raw" / "pixels.u8").stat().st_size == 6 * 16 * 16 * 3
    again = cache.ensure(paths[::-1])  # nothing new: same slots, file unchanged
    assert list(again.keys) == list(reader.keys[:6][::-1])
    assert (cache.dir / "raw" / "pixels.u8").stat().st_size == 6 * 16 * 16 * 3


def test_an_edited_image_gets_a_new_entry_and_a_touched_one_does_not(tmp_path):
    paths = _images(tmp_path / "img", 3)
    cache = DiskImageCache(tmp_path / "cache", 16, fmt="raw")
    before = cache.ensure(paths)
    os.utime(paths[0], ns=(1, 1))  # same bytes, new mtime: re-hashed, same entry
    write_png(tmp_path / "img" / "2.png", 250, size=30)  # new bytes at the same path
    after = cache.ensure(paths)
    assert after.keys[0] == before.keys[0] and after.keys[1] == before.keys[1]
    assert after.keys[2] == 3  # a fourth slot
    assert np.array_equal(after[2], resize_square(paths[2], 16))


def test_bytes_a_killed_build_appended_are_cut_off(tmp_path):
    paths = _images(tmp_path / "img", 4)
    cache = DiskImageCache(tmp_path / "cache", 16, fmt="raw")
    cache.ensure(paths[:2])
    with open(cache.dir / "raw" / "pixels.u8", "ab") as f:  # a build killed after writing half a slot
        f.write(b"\xff" * 300)
    reader = cache.ensure(paths)
    assert list(reader.keys) == [0, 1, 2, 3]
    for i, p in enumerate(paths):
        assert np.array_equal(reader[i], resize_square(p, 16))


def test_auto_falls_back_to_jpeg_over_the_budget_and_keeps_its_format(tmp_path):
    paths = _images(tmp_path / "img", 3)
    cache = DiskImageCache(tmp_path / "cache", 64, fmt="auto", max_gb=1e-6)  # 3 x 12 KB > 1 KB
    reader = cache.ensure(paths)
    assert reader.fmt == "jpeg" and all(str(k).endswith(".jpg") for k in reader.keys)
    for i, p in enumerate(paths):  # re-encoded at quality 95: close to, not equal to, the decoded pixels
        diff = np.abs(reader[i].astype(int) - resize_square(p, 64).astype(int))
        assert diff.mean() < 3
    assert DiskImageCache(tmp_path / "cache", 64, fmt="auto", max_gb=1e3).ensure(paths).fmt == "jpeg"


def test_dataset_items_are_identical_with_and_without_the_cache(tmp_path):
    paths = _images(tmp_path / "img", 4)
    Image.open(paths[1]).convert("P").save(paths[1])  # a palette image goes through the same conversion
    df = pd.DataFrame({"abs_path": paths, "image_uuid": list("abcd"), "label": ["x", "y", "x", "y"]})
    plain = make_dataset(df, ["x", "y"], ImageTransform(16))
    cached = make_dataset(df, ["x", "y"], ImageTransform(16), DiskImageCache(tmp_path / "c", 16, fmt="raw"))
    for i in range(4):
        a, b = plain[i], cached[i]
        assert a["label"] == b["label"] and a["image_uuid"] == b["image_uuid"]
        assert a["pixel_values"].dtype == b["pixel_values"].dtype and a["pixel_values"].shape == (3, 16, 16)
        assert bool((a["pixel_values"] == b["pixel_values"]).all())


def test_unknown_format_is_one_clear_error(tmp_path):
    from cleanloop.errors import CleanloopError

    with pytest.raises(CleanloopError, match="data.cache_format='png': choose one of auto, raw, jpeg"):
        DiskImageCache(tmp_path, 16, fmt="png")


def test_cache_command_builds_every_manifest_image(tiny_manifest, tmp_path):
    r = run_cli("cache", "data=manifest", f"data.manifest={tiny_manifest}", f"paths.root_dir={tmp_path}",
                "model=tiny", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "cache: 24 images at 32 px (raw)" in r.stdout + r.stderr
    assert (tmp_path / ".cache" / "cleanloop" / "images" / "32px-v1" / "raw" / "pixels.u8").stat().st_size == 24 * 32 * 32 * 3

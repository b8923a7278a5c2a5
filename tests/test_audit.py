"""The leakage audit's core (cleanloop.audit): hashes, near pairs, the pairs table and what it leaks."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw, ImageFont
from sklearn.datasets import load_digits, load_sample_images

from cleanloop import audit
from cleanloop.errors import CleanloopError

# ---------------------------------------------------------------------------------------------
# images on disk


def _digit(pixels: np.ndarray, size: int) -> Image.Image:
    # As the demo draws them: 8x8 ink intensities 0..16, white on black, upscaled bicubic.
    return Image.fromarray((pixels * (255.0 / 16.0)).astype(np.uint8), mode="L").resize(
        (size, size), Image.Resampling.BICUBIC)


def _noise(seed: int, size: int = 96) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _photo(n: int) -> Image.Image:
    photo = load_sample_images().images[n % 2]
    y, x = 40 + 100 * n, 60 + 120 * n
    return Image.fromarray(photo[y:y + 200, x:x + 200]).resize((128, 128), Image.Resampling.LANCZOS)


def _text(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    page = Image.new("L", (512, 512), 245)
    draw = ImageDraw.Draw(page)
    font = ImageFont.load_default(size=48)
    for row in range(8):
        words = " ".join("".join(chr(c) for c in rng.integers(97, 123, 4)) for _ in range(3))
        draw.text((30, row * 64 + 4), words, fill=20, font=font)
    return page.resize((128, 128), Image.Resampling.LANCZOS)


def _resized(img: Image.Image) -> Image.Image:
    return img.resize((int(img.width * 0.75), int(img.height * 0.75)), Image.Resampling.BICUBIC)


def _cropped(img: Image.Image, fraction: float = 0.04) -> Image.Image:
    dx, dy = round(img.width * fraction), round(img.height * fraction)
    return img.crop((dx, dy, img.width - dx, img.height - dy))


def _save(img: Image.Image, path, **kwargs) -> str:
    img.convert("RGB").save(path, **kwargs)
    return str(path)


def _copies(img: Image.Image, folder, name: str) -> dict[str, str]:
    """The original as PNG and its copies: bytes, 0.75x, JPEG quality 70, 4% border cropped."""
    original = _save(img, folder / f"{name}.png")
    exact = str(folder / f"{name}-copy.png")
    shutil.copyfile(original, exact)
    return {
        "original": original,
        "exact": exact,
        "resized": _save(_resized(img), folder / f"{name}-small.png"),
        "jpeg": _save(img, folder / f"{name}-q70.jpg", quality=70),
        "cropped": _save(_cropped(img), folder / f"{name}-crop.png"),
    }


def _manifest(uuids, labels, splits, groups=None) -> pd.DataFrame:
    df = pd.DataFrame({"image_uuid": uuids, "path": [f"/x/{u}.png" for u in uuids], "label": labels, "split": splits})
    if groups is not None:
        df["group"] = groups
    return df


def _pairs(rows: list[tuple[str, str]], kind: str = "near") -> pd.DataFrame:
    return pd.DataFrame({"image_uuid_a": [a for a, _ in rows], "image_uuid_b": [b for _, b in rows],
                         "kind": kind})


# ---------------------------------------------------------------------------------------------
# hashing files


def test_content_hashes_equal_for_byte_copies_only(tmp_path):
    files = _copies(_digit(load_digits().images[0], 64), tmp_path, "d0")
    hashes = audit.content_hashes(list(files.values()), workers=2)

    assert hashes.shape == (5,) and all(len(h) == 64 for h in hashes)
    assert hashes[0] == hashes[1]  # original and its byte copy
    assert len(set(hashes[1:])) == 4  # resized, JPEG and cropped copies differ in bytes
    with pytest.raises(CleanloopError, match=r"cannot read 2 of 3 image file\(s\): .*missing-1.*missing-2"):
        audit.content_hashes([files["original"], tmp_path / "missing-1.png", tmp_path / "missing-2.png"])


def test_perceptual_hashes_reject_unreadable_images(tmp_path):
    good = _save(_noise(0), tmp_path / "good.png")
    (tmp_path / "not-an-image.png").write_text("hello")
    bad = [str(tmp_path / "not-an-image.png"), str(tmp_path / "missing.png")]

    with pytest.raises(CleanloopError, match=r"cannot decode 2 of 3 image\(s\): .*not-an-image.png, .*missing.png"):
        audit.perceptual_hashes([good, *bad])
    assert audit.perceptual_hashes([good]).dtype == np.uint64
    with pytest.raises(CleanloopError, match="hash_size"):
        audit.perceptual_hashes([good], hash_size=9)


def test_perceptual_hash_is_imagehash_phash(tmp_path):
    path = _save(_photo(0), tmp_path / "p.png")
    [h] = audit.perceptual_hashes([path])
    assert f"{int(h):016x}" == str(imagehash.phash(Image.open(path)))


def test_copies_are_linked_and_distinct_images_are_not(tmp_path):
    # Digits, photo patches, noise and text pages, each with an exact, a resized, a JPEG and a cropped copy.
    digits = load_digits()
    originals = {f"digit{i}": _digit(digits.images[i], 96) for i in range(4)}
    originals |= {"photo0": _photo(0), "photo2": _photo(2), "noise0": _noise(0), "noise1": _noise(1),
                  "text0": _text(10), "text1": _text(11)}
    files = {name: _copies(img, tmp_path, name) for name, img in originals.items()}
    uuids = [f"{name}/{kind}" for name, copies in files.items() for kind in copies]
    paths = [p for copies in files.values() for p in copies.values()]
    manifest = _manifest(uuids, [u.split("/")[0] for u in uuids], ["train"] * len(uuids))

    pairs = audit.duplicate_pairs(manifest, content_hash=audit.content_hashes(paths),
                                  phash=audit.perceptual_hashes(paths))
    linked = {frozenset((a, b)): kind for a, b, kind in pairs[["image_uuid_a", "image_uuid_b", "kind"]].itertuples(index=False)}

    for name in originals:
        assert linked[frozenset((f"{name}/original", f"{name}/exact"))] == "exact"
        for copy in ("resized", "jpeg"):  # phash distance 0-2 for every kind of image here
            assert linked[frozenset((f"{name}/original", f"{name}/{copy}"))] == "near", (name, copy)
    for name in ("digit0", "digit1", "digit2", "digit3"):  # 4% crops: distance 2-6 on digits
        assert linked[frozenset((f"{name}/original", f"{name}/cropped"))] == "near", name
    # Noise and text pages are the perceptual hash's weak spot for crops (distance 10-20 at 4%):
    # the embedding check is there for them. Precision: no pair joins two different originals.
    assert all(a.split("/")[0] == b.split("/")[0] for a, b in map(tuple, pairs[["image_uuid_a", "image_uuid_b"]].to_numpy()))
    assert (pairs.loc[pairs["kind"] == "near", "method"] == "phash").all()


def test_default_phash_distance_measured_on_digits(tmp_path):
    # The data behind PHASH_MAX_DISTANCE: all 1,797 digits at 64 px, and copies of each.
    digits = load_digits()
    images = [_digit(px, 64) for px in digits.images]
    variants = {
        "original": lambda im: (im, {}),
        "resized": lambda im: (_resized(im), {}),
        "jpeg": lambda im: (im, {"quality": 70}),
        "crop2": lambda im: (_cropped(im, 0.02), {}),
        "crop4": lambda im: (_cropped(im, 0.04), {}),
    }
    hashes = {}
    for name, make in variants.items():
        ext = "jpg" if name == "jpeg" else "png"
        paths = []
        for k, im in enumerate(images):
            img, kwargs = make(im)
            paths.append(_save(img, tmp_path / f"{k}-{name}.{ext}", **kwargs))
        hashes[name] = audit.perceptual_hashes(paths)

    h = hashes["original"]
    i, j, dist = audit.hash_near_pairs(h, max_distance=16)
    cross = digits.target[i] != digits.target[j]
    n_pairs = len(h) * (len(h) - 1) // 2
    copy_dist = {name: audit.popcount64(hashes[name] ^ h) for name in variants if name != "original"}
    print(f"\nphash on {len(h)} digits at 64 px, {n_pairs} distinct pairs")
    for d in (4, 6, 8, 10, 12):
        recall = " ".join(f"{name} {np.mean(v <= d):.3f}" for name, v in copy_dist.items())
        print(f"  max_distance {d:2d}: {int((dist <= d).sum()):5d} distinct pairs "
              f"({int((cross & (dist <= d)).sum())} cross-class); copies linked: {recall}")

    d = audit.PHASH_MAX_DISTANCE
    assert (dist <= d).sum() <= 0.001 * n_pairs  # 1,433 of 1,613,706 (0.09%)
    assert (cross & (dist <= d)).sum() <= 15  # 9: look-alike 5/9, 9/7, 1/8...
    assert (copy_dist["resized"] <= d).all() and (copy_dist["jpeg"] <= d).all()  # largest distance 4
    assert np.mean(copy_dist["crop2"] <= d) >= 0.99  # 0.999
    assert np.mean(copy_dist["crop4"] <= d) >= 0.80  # 0.843
    assert (dist % 2 == 0).all()  # phash sets 32 of 64 bits, so distances are even


# ---------------------------------------------------------------------------------------------
# near pairs


def _brute_force(h: np.ndarray, max_distance: int):
    i, j = np.triu_indices(len(h), 1)
    dist = audit.popcount64(h[i] ^ h[j])
    keep = dist <= max_distance
    return i[keep], j[keep], dist[keep]


def _planted_hashes(seed: int = 0) -> np.ndarray:
    """~400 random 64-bit hashes: 60 bases, 4 copies of each with 0-13 bits flipped, repeats, 100 strangers."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 2**64, 60, dtype=np.uint64, endpoint=False)
    copies = []
    for _ in range(4):
        flips = np.zeros(len(base), dtype=np.uint64)
        for r in range(len(base)):
            for bit in rng.choice(64, rng.integers(0, 14), replace=False):
                flips[r] |= np.uint64(1) << np.uint64(bit)
        copies.append(base ^ flips)
    strangers = rng.integers(0, 2**64, 100, dtype=np.uint64, endpoint=False)
    return rng.permutation(np.concatenate([base, *copies, strangers, base[:5]]))


@pytest.mark.parametrize("max_distance", [0, 1, 3, 6, 8, 12])
def test_hash_near_pairs_equals_brute_force(max_distance):
    h = _planted_hashes()
    expected = _brute_force(h, max_distance)
    got = audit.hash_near_pairs(h, max_distance=max_distance)

    assert all(np.array_equal(g, e) for g, e in zip(got, expected, strict=True))
    assert len(expected[0]) > 0
    # the same bits as int64 or Python ints
    assert all(np.array_equal(g, e) for g, e in zip(audit.hash_near_pairs(h.view(np.int64), max_distance=max_distance),
                                                      expected, strict=True))
    assert all(np.array_equal(g, e) for g, e in zip(audit.hash_near_pairs([int(v) for v in h], max_distance=max_distance),
                                                      expected, strict=True))


@pytest.mark.parametrize("n_blocks", [1, 2, 3, 4, 5, 9])
def test_hash_near_pairs_any_block_count_equals_brute_force(n_blocks):
    # 1 and 2 blocks are wider than the dense table (sorted search); 9 is the plain pigeonhole trick.
    h = _planted_hashes(seed=1)
    max_distance = {1: 2, 2: 5}.get(n_blocks, 8)  # keeps the flips per block (ball) small
    expected = _brute_force(h, max_distance)
    got = audit._hash_near_pairs(h, max_distance, n_blocks)
    assert all(np.array_equal(g, e) for g, e in zip(got, expected, strict=True))


def test_hash_near_pairs_rejects_bad_input():
    with pytest.raises(CleanloopError, match="max_distance"):
        audit.hash_near_pairs(np.zeros(3, np.uint64), max_distance=40)
    with pytest.raises(CleanloopError, match="shape"):
        audit.hash_near_pairs(np.zeros((3, 2), np.uint64), max_distance=4)
    for n in (0, 1):  # with no rows every block count costs nothing: no 64-bit block of 2**40 flips
        assert all(len(a) == 0 for a in audit.hash_near_pairs(np.zeros(n, np.uint64), max_distance=16))


def test_hash_near_pairs_at_full_dataset_size():
    # N = 121,514 random hashes with a few planted neighbours; the time is reported, not asserted.
    rng = np.random.default_rng(2)
    h = rng.integers(0, 2**64, 121_514, dtype=np.uint64, endpoint=False)
    planted = rng.choice(len(h), 20, replace=False)
    for src, dst, bits in zip(planted[:10], planted[10:], range(10), strict=True):
        flip = sum(1 << int(b) for b in rng.choice(64, bits % (audit.PHASH_MAX_DISTANCE + 1), replace=False))
        h[dst] = h[src] ^ np.uint64(flip)
    start = time.perf_counter()
    i, j, dist = audit.hash_near_pairs(h, max_distance=audit.PHASH_MAX_DISTANCE)
    print(f"\nhash_near_pairs: N={len(h)}, max_distance={audit.PHASH_MAX_DISTANCE}: "
          f"{len(i)} pairs in {time.perf_counter() - start:.2f} s")
    found = set(zip(i.tolist(), j.tolist(), strict=True))
    assert all((min(a, b), max(a, b)) in found for a, b in zip(planted[:10].tolist(), planted[10:].tolist(), strict=True))
    assert (dist <= audit.PHASH_MAX_DISTANCE).all()


def _embedding_reference(x: np.ndarray, min_cosine: float, k: int) -> set[tuple[int, int]]:
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    pairs = set()
    for r in range(len(x)):
        for c in np.argsort(-sim[r], kind="stable")[:k]:
            if sim[r, c] >= min_cosine:
                pairs.add((min(r, c), max(r, c)))
    return pairs


def test_embedding_near_pairs_links_near_identical_vectors_only():
    eye = np.eye(6, 32, dtype=np.float32) * np.arange(1, 7, dtype=np.float32)[:, None]  # orthogonal, any scale
    near = 5.0 * eye[0] / 1.0 + 0.05 * eye[1] / 2.0  # row 0, scaled, nudged towards row 1
    x = np.vstack([eye, near, np.zeros(32, np.float32)])  # row 7: no direction

    i, j, cos = audit.embedding_near_pairs(x, min_cosine=0.99, k=3)

    assert list(zip(i.tolist(), j.tolist(), strict=True)) == [(0, 6)]
    assert cos[0] == pytest.approx(1 / np.sqrt(1 + 0.01**2), abs=1e-6)
    assert len(audit.embedding_near_pairs(x, min_cosine=-1.0, k=10)[0]) == 7 * 6 // 2  # all but the zero row


@pytest.mark.parametrize("k", [1, 3, 10])
@pytest.mark.parametrize("chunk", [7, 50, None])
def test_embedding_near_pairs_equals_reference(k, chunk):
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((30, 16))
    x = np.vstack([centres + 0.15 * rng.standard_normal((30, 16)) for _ in range(4)] + [rng.standard_normal((40, 16))])

    i, j, cos = audit.embedding_near_pairs(x, min_cosine=0.9, k=k, chunk=chunk)

    assert set(zip(i.tolist(), j.tolist(), strict=True)) == _embedding_reference(x, 0.9, k)
    assert (i < j).all() and len(set(zip(i.tolist(), j.tolist(), strict=True))) == len(i)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(cos, np.sum(xn[i] * xn[j], axis=1), atol=1e-5)


def test_embedding_near_pairs_rejects_bad_input():
    with pytest.raises(CleanloopError, match="NaN or infinite values in 1 row"):
        audit.embedding_near_pairs(np.array([[1.0, 0.0], [np.nan, 1.0]]), min_cosine=0.9)
    with pytest.raises(CleanloopError, match="min_cosine"):
        audit.embedding_near_pairs(np.eye(3), min_cosine=1.5)
    assert len(audit.embedding_near_pairs(np.ones((1, 4)), min_cosine=0.5)[0]) == 0


def _planted_embeddings(seed: int, n: int = 700, d: int = 96) -> np.ndarray:
    """Random rows at any scale; 80 planted pairs at cosine 0.91-0.995; 6 near copies of one row."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    a, b = rng.choice(n - 6, (2, 80), replace=False)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    z = x[b] - np.sum(x[b] * unit[a], axis=1, keepdims=True) * unit[a]
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    c = rng.uniform(0.91, 0.995, (80, 1)).astype(np.float32)
    x[b] = (c * unit[a] + np.sqrt(1 - c**2) * z) * rng.uniform(0.5, 3.0, (80, 1)).astype(np.float32)
    x[n - 6:] = x[a[0]] + 0.02 * rng.standard_normal((6, d)).astype(np.float32)  # more copies than k=3
    return x


@pytest.mark.parametrize("dims", [1, 4, 16, 48, 95])
@pytest.mark.parametrize("chunk", [None, 128])
def test_projected_search_equals_brute_force(dims, chunk):
    # Any orthonormal projection keeps every pair within the radius: the result is exact for every
    # dims, from 1 (almost every block falls back to the full product) to D - 1.
    x = _planted_embeddings(seed=dims)
    for k in (1, 3, 10):
        i, j, cos = audit.embedding_near_pairs(x, min_cosine=0.9, k=k, dims=dims, chunk=chunk)
        assert set(zip(i.tolist(), j.tolist(), strict=True)) == _embedding_reference(x, 0.9, k), k
        xn = x / np.linalg.norm(x, axis=1, keepdims=True)
        np.testing.assert_allclose(cos, np.sum(xn[i] * xn[j], axis=1), atol=1e-5)
    assert len(audit.embedding_near_pairs(x, min_cosine=0.9, k=1, dims=dims)[0]) >= 80


def test_projection_is_chosen_from_the_data(monkeypatch):
    # Thresholds lowered so a small set takes the path a large one does.
    monkeypatch.setattr(audit, "_PROJECTION_MIN_ROWS", 1000)
    monkeypatch.setattr(audit, "_PROJECTION_SAMPLE", 1000)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2500, 384)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)

    basis = audit._projection(x, 0.95, None)
    assert basis is not None and basis.shape[0] == 384 and basis.shape[1] in audit._PROJECTION_DIMS
    np.testing.assert_allclose(basis.T @ basis, np.eye(basis.shape[1]), atol=1e-5)  # orthonormal
    # a low threshold means a wide radius: nothing to rule out, so the full product
    assert audit._projection(x, 0.2, None) is None
    # fewer rows than _PROJECTION_MIN_ROWS, or dims 0 or >= D: the full product
    assert audit._projection(x[:999], 0.95, None) is None
    assert audit._projection(x, 0.95, 0) is None and audit._projection(x, 0.95, 384) is None
    # the search at the chosen projection equals the full product
    x[1:40] = x[0] + 0.01 * rng.standard_normal((39, 384)).astype(np.float32)
    auto = audit.embedding_near_pairs(x, min_cosine=0.95, k=5)
    full = audit.embedding_near_pairs(x, min_cosine=0.95, k=5, dims=0)
    assert all(np.array_equal(a, b) for a, b in zip(auto[:2], full[:2], strict=True)) and len(auto[0]) >= 39


# ---------------------------------------------------------------------------------------------
# pixel-level confirmation


def _sample_photo(rng: np.random.Generator, photos) -> Image.Image:
    photo = photos[int(rng.integers(len(photos)))]
    side = int(rng.integers(150, 300))
    y, x = int(rng.integers(0, photo.shape[0] - side)), int(rng.integers(0, photo.shape[1] - side))
    return Image.fromarray(photo[y:y + side, x:x + side]).resize((128, 128), Image.Resampling.LANCZOS)


def _crop_sides(img: Image.Image, left: float, top: float, right: float, bottom: float) -> Image.Image:
    return img.crop((round(img.width * left), round(img.height * top),
                     img.width - round(img.width * right), img.height - round(img.height * bottom)))


def test_thumbnails_are_grayscale_squares(tmp_path):
    rgb = np.random.default_rng(5).integers(0, 256, (20, 40, 3), dtype=np.uint8)
    colour = _save(Image.fromarray(rgb), tmp_path / "wide.png")
    gray = str(tmp_path / "wide-gray.png")
    Image.fromarray(rgb).convert("L").save(gray)

    thumbs = audit.thumbnails([colour, gray], side=16, workers=2)

    assert thumbs.shape == (2, 16, 16) and thumbs.dtype == np.float32
    assert 0.0 <= thumbs.min() and thumbs.max() <= 255.0
    np.testing.assert_allclose(thumbs[0], thumbs[1], atol=0.01)  # colour is dropped as PIL's "L" does
    assert audit.thumbnails([], side=16).shape == (0, 16, 16)
    with pytest.raises(CleanloopError, match=r"cannot decode 1 of 2 image\(s\): .*missing.png"):
        audit.thumbnails([colour, tmp_path / "missing.png"])
    with pytest.raises(CleanloopError, match="side=4"):
        audit.thumbnails([colour], side=4)


def test_pixel_similarity_confirms_copies_of_digits(tmp_path):
    # Digits as the demo draws them (32 px) and copies as bench/audit_bench.py injects them.
    digits = load_digits()
    paths, pairs = [], []
    for n in range(0, 200, 20):
        img = _digit(digits.images[n], 32)
        paths.append(_save(img, tmp_path / f"{n}.png"))
        original = len(paths) - 1
        copies = {
            "small": (img.resize((19, 19), Image.Resampling.BICUBIC), {}, "png"),
            "large": (img.resize((48, 48), Image.Resampling.BICUBIC), {}, "png"),
            "q60": (img, {"quality": 60}, "jpg"),
            "q85": (img, {"quality": 85}, "jpg"),
            "crop5": (_cropped(img, 0.05), {}, "png"),
            "crop-asym": (_crop_sides(img, 0.02, 0.05, 0.03, 0.04), {}, "png"),
        }
        for name, (copy, kwargs, ext) in copies.items():
            paths.append(_save(copy, tmp_path / f"{n}-{name}.{ext}", **kwargs))
            pairs.append((name, original, len(paths) - 1))
    thumbs = audit.thumbnails(paths)
    i, j = np.array([p[1] for p in pairs]), np.array([p[2] for p in pairs])

    score = audit.pixel_similarity(thumbs, i, j, paths=paths)
    print("\ndigit copies, lowest pixel score:", {name: round(float(score[[p[0] == name for p in pairs]].min()), 4)
                                                  for name in copies})
    assert (score >= audit.PIXEL_MIN_NCC).all()
    np.testing.assert_array_equal(score, audit.pixel_similarity(thumbs, j, i, paths=paths))  # symmetric
    # whole frames only: resized and JPEG copies still pass, crops need the box search
    frame = audit.pixel_similarity(thumbs, i, j, min_scale=1.0)
    cropped = np.array([p[0].startswith("crop") for p in pairs])
    assert (frame[~cropped] >= audit.PIXEL_MIN_NCC).all() and (frame[cropped] < audit.PIXEL_MIN_NCC).all()


def test_pixel_similarity_rejects_look_alike_digits(tmp_path):
    # Distinct digits of one class whose perceptual hashes are within the candidate distance: the
    # 150 closest in ink (8x8 L2) are the hardest; only the one pair of near-identical originals
    # (rows 1585 and 1648, L2 5.3; the next closest pair of the 1,797 is 7.5) is confirmed.
    digits = load_digits()
    paths = [_save(_digit(px, 32), tmp_path / f"{n}.png") for n, px in enumerate(digits.images)]
    i, j, _ = audit.hash_near_pairs(audit.perceptual_hashes(paths), max_distance=audit.CANDIDATE_PHASH_MAX_DISTANCE)
    same = digits.target[i] == digits.target[j]
    i, j = i[same], j[same]
    ink = np.linalg.norm(digits.data[i] - digits.data[j], axis=1)
    hardest = np.argsort(ink, kind="stable")[:150]
    i, j, ink = i[hardest], j[hardest], ink[hardest]

    score = audit.pixel_similarity(audit.thumbnails(paths), i, j, paths=paths)

    confirmed = score >= audit.PIXEL_MIN_NCC
    assert [(int(a), int(b)) for a, b in zip(i[confirmed], j[confirmed], strict=True)] == [(1585, 1648)]
    assert ink[confirmed][0] < 6.0 and np.sort(score)[-2] < audit.PIXEL_MIN_NCC - 0.001  # 0.9941


def test_pixel_similarity_confirms_copies_of_photos_and_text(tmp_path):
    # The numbers behind PIXEL_MIN_NCC's note on other images: 12 patches of scikit-learn's sample
    # photos and 4 text pages, 128 px, cropped 2-8% a side, resized and re-compressed.
    rng = np.random.default_rng(0)
    photos = load_sample_images().images
    originals = {f"photo{n}": _sample_photo(rng, photos) for n in range(12)} | {f"text{n}": _text(n) for n in range(4)}
    paths, pairs = [], []
    for name, img in originals.items():
        paths.append(_save(img, tmp_path / f"{name}.png"))
        original = len(paths) - 1
        for kind, copy, kwargs, ext in [("resized", _resized(img), {}, "png"), ("jpeg", img, {"quality": 60}, "jpg")] + [
                (f"crop{f}", _cropped(img, f), {}, "png") for f in (0.02, 0.035, 0.05, 0.08)]:
            paths.append(_save(copy, tmp_path / f"{name}-{kind}.{ext}", **kwargs))
            pairs.append((name, kind, original, len(paths) - 1))
    thumbs = audit.thumbnails(paths)
    i, j = np.array([p[2] for p in pairs]), np.array([p[3] for p in pairs])

    score = audit.pixel_similarity(thumbs, i, j, paths=paths)
    thumbs_only = audit.pixel_similarity(thumbs, i, j)

    kind = np.array([p[1] for p in pairs])
    text = np.array([p[0].startswith("text") for p in pairs])
    crop = np.char.startswith(kind, "crop")
    print("\nphotos and text, lowest pixel score:",
          {k: (round(float(score[(kind == k) & ~text].min()), 4), round(float(score[(kind == k) & text].min()), 4))
           for k in dict.fromkeys(kind)})
    print("crops confirmed, boxes rendered again / sampled from the thumbnail:",
          np.mean(score[crop] >= audit.PIXEL_MIN_NCC), np.mean(thumbs_only[crop] >= audit.PIXEL_MIN_NCC))
    assert (score[~crop] >= 0.999).all()
    assert score[crop & ~text].min() >= 0.996  # 0.9961; 2-8% crops of photographs
    assert score[crop & text].min() >= 0.995  # 0.9952: 8% crops of text pages; 2-5% >= 0.9976
    # A box sampled from a thumbnail is blurred by the interpolation: rendering it again from the
    # file is what lifts a crop to a resized copy's score.
    assert np.mean(score[crop] >= audit.PIXEL_MIN_NCC) >= 0.95
    assert np.mean(thumbs_only[crop] >= audit.PIXEL_MIN_NCC) <= 0.5
    # distinct originals are far below
    ii, jj = np.triu_indices(len(originals), 1)
    firsts = np.array(sorted({p[2] for p in pairs}))
    assert audit.pixel_similarity(thumbs, firsts[ii], firsts[jj], paths=paths).max() < 0.95


def test_pixel_similarity_flat_images_and_bad_input():
    side = 16
    ramp = np.tile(np.linspace(0, 255, side, dtype=np.float32), (side, 1))
    thumbs = np.stack([np.full((side, side), 100.0), np.full((side, side), 100.0), np.full((side, side), 151.0),
                       ramp, ramp[:, ::-1]]).astype(np.float32)

    score = audit.pixel_similarity(thumbs, [0, 0, 0, 3, 3], [1, 2, 3, 4, 3])

    assert score[:3].tolist() == pytest.approx([1.0, 1.0 - 51.0 / 255.0, 0.0])  # flat: levels compared
    assert score[3] < 0 and score[4] == pytest.approx(1.0)  # a mirrored ramp anticorrelates
    assert len(audit.pixel_similarity(thumbs, [], [])) == 0
    with pytest.raises(CleanloopError, match="min_scale"):
        audit.pixel_similarity(thumbs, [0], [1], min_scale=0.0)
    with pytest.raises(CleanloopError, match="thumbs has shape"):
        audit.pixel_similarity(thumbs[:, :4, :4], [0], [1])
    with pytest.raises(CleanloopError, match="paths has 1 rows"):
        audit.pixel_similarity(thumbs, [0], [1], paths=["x.png"])


# ---------------------------------------------------------------------------------------------
# the pairs table


def test_duplicate_pairs_columns_kinds_methods_and_order():
    manifest = _manifest(
        ["u5", "u1", "u3", "u2", "u4", "u6"],
        ["a", "a", "b", "a", "b", "c"],
        ["train", "test", "train", "val", "train", "test"],
        groups=["p1", None, "", "p2", "nan", "p3"],
    )
    content = ["x", "x", "y", "x", "z", "w"]  # u5, u1, u2: byte copies
    phash = np.array([0, 0, 0xFF00, 0, 0xFC00, 0xFFFF << 48], dtype=np.uint64)  # u3, u4: 2 bits apart
    emb = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0.999, 0.04], [0, 0, 1]], dtype=np.float32)

    pairs = audit.duplicate_pairs(manifest, content_hash=content, phash=phash, phash_max_distance=2,
                                  embeddings=emb, min_cosine=0.99)

    assert list(pairs.columns) == list(audit.PAIR_COLUMNS) == [
        "image_uuid_a", "image_uuid_b", "kind", "similarity", "split_a", "split_b",
        "label_a", "label_b", "group_a", "group_b", "method"]
    got = [tuple(r) for r in pairs[["image_uuid_a", "image_uuid_b", "kind", "method"]].to_numpy()]
    cos_34 = 0.999 / np.hypot(0.999, 0.04)
    assert got == [
        ("u1", "u2", "exact", "sha256"),
        ("u1", "u5", "exact", "sha256"),
        ("u2", "u5", "exact", "sha256"),
        ("u3", "u4", "near", "phash+embedding"),  # phash 2 bits apart: 1 - 2/64 < cosine
    ]
    assert pairs["similarity"].tolist() == pytest.approx([1.0, 1.0, 1.0, cos_34])
    row = pairs.iloc[3]
    assert (row.split_a, row.split_b, row.label_a, row.label_b, row.group_a, row.group_b) == (
        "train", "train", "b", "b", "", "")
    row = pairs.iloc[0]
    assert (row.split_a, row.split_b, row.group_a, row.group_b) == ("test", "val", "", "p2")

    # phash alone: its similarity; embeddings alone: method embedding
    only_phash = audit.duplicate_pairs(manifest, content_hash=content, phash=phash, phash_max_distance=2)
    assert only_phash.iloc[3][["method", "similarity"]].tolist() == ["phash", 1 - 2 / 64]
    only_emb = audit.duplicate_pairs(manifest, content_hash=content, embeddings=emb, min_cosine=0.99)
    assert only_emb["method"].tolist() == ["sha256"] * 3 + ["embedding"]
    # no copies at all: an empty table with the same columns
    none = audit.duplicate_pairs(manifest, content_hash=["a", "b", "c", "d", "e", "f"])
    assert none.empty and list(none.columns) == list(audit.PAIR_COLUMNS)


def test_duplicate_pairs_sorts_near_pairs_by_similarity_then_ids():
    manifest = _manifest(["d", "c", "b", "a"], ["x"] * 4, ["train"] * 4)
    phash = np.array([0b0, 0b1, 0b111, 0b1000111], dtype=np.uint64)
    pairs = audit.duplicate_pairs(manifest, content_hash=list("1234"), phash=phash, phash_max_distance=2)
    got = [(a, b, round(s * 64)) for a, b, s in pairs[["image_uuid_a", "image_uuid_b", "similarity"]].to_numpy()]
    # distances: d-c 1, b-a 1, c-b 2, d-b 3 (not linked)
    assert got == [("a", "b", 63), ("c", "d", 63), ("b", "c", 62)]


def test_duplicate_pairs_rejects_mismatched_inputs():
    manifest = _manifest(["a", "b"], ["x", "y"], ["train", "test"])
    with pytest.raises(CleanloopError, match="content_hash has 3 rows but the manifest has 2"):
        audit.duplicate_pairs(manifest, content_hash=["1", "2", "3"])
    with pytest.raises(CleanloopError, match="embeddings has 1 rows"):
        audit.duplicate_pairs(manifest, content_hash=["1", "2"], embeddings=np.ones((1, 3)))
    with pytest.raises(CleanloopError, match="image_uuid is not unique"):
        audit.duplicate_pairs(_manifest(["a", "a"], ["x", "y"], ["train", "test"]), content_hash=["1", "2"])


def _find_fixture(tmp_path):
    """Digits as the demo draws them, with copies across splits, and a look-alike pair of distinct digits."""
    digits = load_digits()
    # 1076 and 1134: two distinct 6s whose perceptual hashes are 10 bits apart at 32 px
    originals = {f"d{n}": _digit(digits.images[n], 32) for n in (0, 10, 20, 30, 1076, 1134)}
    files = {name: _save(img, tmp_path / f"{name}.png") for name, img in originals.items()}
    shutil.copyfile(files["d0"], tmp_path / "d0-copy.png")
    files["d0-copy"] = str(tmp_path / "d0-copy.png")
    files["d10-small"] = _save(originals["d10"].resize((20, 20), Image.Resampling.BICUBIC), tmp_path / "d10-small.png")
    files["d20-q70"] = _save(originals["d20"], tmp_path / "d20-q70.jpg", quality=70)
    files["d30-crop"] = _save(_crop_sides(originals["d30"], 0.03, 0.05, 0.04, 0.02), tmp_path / "d30-crop.png")
    uuids = list(files)
    manifest = pd.DataFrame({
        "image_uuid": uuids,
        "path": [files[u] for u in uuids],
        "label": ["zero", "zero", "one", "two", "six", "six", "zero", "zero", "nine", "three"],
        "split": ["train", "train", "train", "train", "train", "test", "test", "test", "train", "val"],
        "group": ["g0", "g1", "g2", "g3", "g4", "g5", "", "g6", "g7", None],
    })
    return manifest


def test_find_duplicates_confirms_near_pairs_at_pixel_level(tmp_path):
    manifest = _find_fixture(tmp_path)
    hashes = audit.perceptual_hashes(manifest["path"])
    lookalike = int(audit.popcount64(hashes[4:5] ^ hashes[5:6])[0])
    assert 0 < lookalike <= audit.CANDIDATE_PHASH_MAX_DISTANCE  # a candidate, which the pixels must reject

    pairs = audit.find_duplicates(manifest, workers=2)

    assert list(pairs.columns) == list(audit.PAIR_COLUMNS)
    got = [tuple(r) for r in pairs[["image_uuid_a", "image_uuid_b", "kind", "method"]].to_numpy()]
    assert got[0] == ("d0", "d0-copy", "exact", "sha256")
    assert sorted(got[1:]) == [("d10", "d10-small", "near", "pixels"), ("d20", "d20-q70", "near", "pixels"),
                               ("d30", "d30-crop", "near", "pixels")]
    assert pairs["similarity"].iloc[0] == 1.0 and (pairs["similarity"].iloc[1:] >= audit.PIXEL_MIN_NCC).all()
    row = pairs.set_index("image_uuid_b").loc["d20-q70"]
    assert (row.split_a, row.split_b, row.label_a, row.label_b, row.group_a, row.group_b) == (
        "train", "train", "one", "nine", "g2", "g7")
    assert pairs.set_index("image_uuid_b").loc["d30-crop", "group_b"] == ""
    # phash alone (no confirmation) would have linked the look-alikes
    loose = audit.find_duplicates(manifest, min_pixel_ncc=-1.0)
    assert ("d1076", "d1134") in set(zip(loose["image_uuid_a"], loose["image_uuid_b"], strict=True))
    # deterministic
    pd.testing.assert_frame_equal(pairs, audit.find_duplicates(manifest))


def test_find_duplicates_with_embeddings(tmp_path):
    manifest = _find_fixture(tmp_path)
    emb = np.eye(len(manifest), 16, dtype=np.float32)
    emb[5] = emb[4]  # the look-alikes: an embedding pair, not confirmed by the pixels
    emb[7] = emb[1] + 0.01 * emb[2]  # d10 and its small copy: both
    emb[9] = 0.5 * emb[0] + emb[9]  # d30's crop: cosine 0.45, below min_cosine; pixels alone

    pairs = audit.find_duplicates(manifest, embeddings=emb, min_cosine=0.95)

    method = dict(zip(zip(pairs["image_uuid_a"], pairs["image_uuid_b"], strict=True), pairs["method"], strict=True))
    assert method == {("d0", "d0-copy"): "sha256", ("d10", "d10-small"): "pixels+embedding",
                      ("d1076", "d1134"): "embedding", ("d20", "d20-q70"): "pixels", ("d30", "d30-crop"): "pixels"}
    sim = dict(zip(pairs["image_uuid_a"], pairs["similarity"], strict=True))
    assert sim["d1076"] == pytest.approx(1.0)  # its cosine
    with pytest.raises(CleanloopError, match="embeddings has 3 rows but the manifest has 10"):
        audit.find_duplicates(manifest, embeddings=emb[:3])


def test_find_duplicates_from_digests_and_cached_pixels_reads_no_image_file(tmp_path, monkeypatch):
    # The step's fast path: the lineage's BLAKE2b digests and the image cache's 64-px squares
    # (padded, then bicubic, as the cache stores them) give the pairs that decoding the files gives.
    from cleanloop.imagecache import file_digest, resize_square

    manifest = _find_fixture(tmp_path)
    paths = manifest["path"].tolist()
    decoded = audit.find_duplicates(manifest)
    digests = [file_digest(p) for p in paths]
    squares = [resize_square(p, audit.PIXELS_MIN_SIDE) for p in paths]

    def no_file(*args, **kwargs):
        raise AssertionError("an image file was read")

    monkeypatch.setattr(audit, "load_image", no_file)
    monkeypatch.setattr(audit, "content_hashes", no_file)
    sizes = audit.image_sizes(paths)  # headers only: d30-crop is 30 x 29, its square has a bar to cut off
    assert sizes[9] == (30, 29)
    cached = audit.find_duplicates(manifest, digests=digests, pixels=squares, sizes=sizes, workers=2)

    def linked(pairs):
        return sorted(zip(pairs["image_uuid_a"], pairs["image_uuid_b"], pairs["kind"], strict=True))

    assert linked(cached) == linked(decoded)  # exact, resized, JPEG and (non-square) cropped copies
    assert cached.loc[cached["kind"] == "exact", "method"].tolist() == ["blake2b"]
    assert (cached.loc[cached["kind"] == "near", "similarity"] >= audit.PIXEL_MIN_NCC).all()
    assert audit._pixel_sources == {}  # the pixels are let go
    with pytest.raises(CleanloopError, match="pixels has 2 rows but the manifest has 10"):
        audit.find_duplicates(manifest, digests=digests, pixels=squares[:2])
    with pytest.raises(CleanloopError, match=r"cannot decode 1 of 10 image\(s\): .*d0.png \(given pixels\)"):
        audit.find_duplicates(manifest, digests=digests, pixels=["not pixels", *squares[1:]])


def test_find_duplicates_rejects_bad_input(tmp_path):
    manifest = _find_fixture(tmp_path)
    with pytest.raises(CleanloopError, match="no column path"):
        audit.find_duplicates(manifest.drop(columns="path"))
    with pytest.raises(CleanloopError, match="min_pixel_ncc=2"):
        audit.find_duplicates(manifest, min_pixel_ncc=2)
    with pytest.raises(CleanloopError, match="max_distance=40"):
        audit.find_duplicates(manifest, phash_max_distance=40)
    with pytest.raises(CleanloopError, match=r"cannot read 1 of 10"):
        audit.find_duplicates(manifest.assign(path=manifest["path"].where(manifest.index != 3, "/nope.png")))
    empty = audit.find_duplicates(manifest.iloc[:0])
    assert empty.empty and list(empty.columns) == list(audit.PAIR_COLUMNS)


def test_audit_bench_quick(tmp_path):
    # bench/audit_bench.py cannot rot: its --quick run (a few hundred rows, 12,000 embeddings).
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import audit_bench

    start = time.perf_counter()
    result = audit_bench.main(["--quick", "--out", str(tmp_path / "b8.json")])
    print(f"\naudit_bench --quick: {time.perf_counter() - start:.1f} s")

    assert (tmp_path / "b8.json").is_file()
    d = result["demo"]["default"]
    assert d["cross_split_recall"] == 1.0 and d["cross_split_precision"] == 1.0 and d["train_recall"] == 1.0
    assert d["conflicting_label_copies_found"][0] == d["conflicting_label_copies_found"][1] > 0
    s = result["scale"]
    assert s["recall"] == 1.0 and s["decoys_found"] == 0 and s["subset_same_pairs"]


# ---------------------------------------------------------------------------------------------
# what the pairs mean


def test_linked_components_number_components_by_first_row():
    comp = audit.linked_components(7, [5, 1, 3], [6, 4, 1])
    assert comp.tolist() == [0, 1, 2, 1, 1, 3, 3]
    assert audit.linked_components(3, [], []).tolist() == [0, 1, 2]


def test_merge_groups_keeps_groups_together_and_joins_linked_ones():
    manifest = _manifest(
        ["r0", "r1", "r2", "r3", "r4", "r5", "r6", "r7"],
        ["a"] * 8,
        ["train"] * 8,
        groups=["pB", "pB", "pA", "pC", "", None, "pD", "linked:x"],
    )
    # r1 (pB) ~ r2 (pA): pA and pB become one; r4 and r5 (blank) are linked to each other;
    # r6 ~ "zz" (not in this manifest) is ignored.
    pairs = _pairs([("r1", "r2"), ("r4", "r5"), ("r6", "zz")])

    groups = audit.merge_groups(manifest, pairs)

    assert groups.index.equals(manifest.index) and groups.name == "group"
    # "linked:x" is an original group, so new names get a longer prefix that no group starts with
    assert groups.tolist() == [
        "_linked:group:pA", "_linked:group:pA", "_linked:group:pA",  # pB joined with pA: the smaller name
        "pC",  # untouched groups keep their names
        "_linked:image:r4", "_linked:image:r4",  # blank rows linked together: the smaller id
        "pD", "linked:x",
    ]
    # a blank row on its own is its own group, a blank row linked to a group joins it
    alone = audit.merge_groups(_manifest(["s0", "s1", "s2"], ["a"] * 3, ["train"] * 3, groups=["", "p1", "p1"]),
                               _pairs([]))
    assert alone.tolist() == ["linked:image:s0", "p1", "p1"]
    joined = audit.merge_groups(_manifest(["s0", "s1", "s2"], ["a"] * 3, ["train"] * 3, groups=["", "p1", "p1"]),
                                _pairs([("s2", "s0")]))
    assert joined.tolist() == ["linked:group:p1"] * 3
    # no group column at all: linked rows share a name, the others are their own
    nogroup = audit.merge_groups(_manifest(["b", "a", "c"], ["x"] * 3, ["train"] * 3), _pairs([("b", "a")]))
    assert nogroup.tolist() == ["linked:image:a", "linked:image:a", "linked:image:c"]


def _leak_manifest() -> pd.DataFrame:
    return _manifest(
        ["t1", "t2", "t3", "t4", "t5", "v1", "v2", "s1", "s2", "s3"],
        ["cat", "cat", "dog", "dog", "eel", "cat", "dog", "cat", "dog", "cat"],
        ["train"] * 5 + ["val"] * 2 + ["test"] * 3,
        groups=["g1", "g2", "g3", "g3", "", "g4", "g5", "g6", "g1", ""],
    )


def _leak_pairs() -> pd.DataFrame:
    return _pairs([
        ("s1", "t1"),  # train cat ~ test
        ("s1", "t2"),  # the same test row copies a second cat train row
        ("s2", "t3"),  # train dog ~ test (labelled dog)
        ("s3", "t3"),  # train dog ~ test labelled cat: counted under the train row's label, dog
        ("t1", "v1"),  # train cat ~ val
        ("t1", "t3"),  # two train rows, cat and dog: conflicting labels
        ("t3", "t4"),  # two dog train rows: no conflict
        ("s1", "v2"),  # val ~ test: no train row, not a leak
        ("t5", "zz"),  # not in the manifest: ignored
    ])


def test_leakage_per_class_counts():
    table = audit.leakage_per_class(_leak_pairs(), _leak_manifest(), classes=["dog", "cat", "eel", "fox"])

    assert list(table.columns) == list(audit.LEAKAGE_COLUMNS)
    assert table.to_dict("records") == [
        {"class": "dog", "n_train": 2, "train_test_pairs": 2, "train_val_pairs": 0,
         "test_rows_with_train_copy": 2, "val_rows_with_train_copy": 0, "conflicting_label_pairs": 1},
        {"class": "cat", "n_train": 2, "train_test_pairs": 2, "train_val_pairs": 1,
         "test_rows_with_train_copy": 1, "val_rows_with_train_copy": 1, "conflicting_label_pairs": 1},
        {"class": "eel", "n_train": 1, "train_test_pairs": 0, "train_val_pairs": 0,
         "test_rows_with_train_copy": 0, "val_rows_with_train_copy": 0, "conflicting_label_pairs": 0},
        {"class": "fox", "n_train": 0, "train_test_pairs": 0, "train_val_pairs": 0,
         "test_rows_with_train_copy": 0, "val_rows_with_train_copy": 0, "conflicting_label_pairs": 0},
    ]
    with pytest.raises(CleanloopError, match="train labels 'eel' are not among the 2 classes"):
        audit.leakage_per_class(_leak_pairs(), _leak_manifest(), classes=["dog", "cat"])


def test_conflicting_label_rows_lists_every_row_of_a_mixed_cluster():
    manifest = _manifest(
        ["a1", "a2", "a3", "b1", "b2", "c1", "c2", "d1"],
        ["psoriasis", "eczema", "eczema", "acne", "acne", "acne", "eczema", "acne"],
        ["train"] * 7 + ["test"],
    )
    # a1~a2~a3 chain into one mixed cluster; b1~b2 agree; c1~c2 mixed; c2~d1 crosses into test (ignored)
    pairs = _pairs([("a2", "a1"), ("a2", "a3"), ("b1", "b2"), ("c2", "c1"), ("c2", "d1")])

    rows = audit.conflicting_label_rows(pairs, manifest)

    assert list(rows.columns) == list(audit.CONFLICT_COLUMNS)
    assert [tuple(r) for r in rows.to_numpy()] == [
        ("a1", "psoriasis", 0, "eczema|psoriasis", 3),
        ("a2", "eczema", 0, "eczema|psoriasis", 3),
        ("a3", "eczema", 0, "eczema|psoriasis", 3),
        ("c1", "acne", 1, "acne|eczema", 2),
        ("c2", "eczema", 1, "acne|eczema", 2),
    ]
    assert audit.conflicting_label_rows(_pairs([("b1", "b2")]), manifest).empty


def test_summary_metrics():
    pairs = _leak_pairs()
    pairs.loc[0, "kind"] = "exact"

    metrics = audit.summary_metrics(pairs, _leak_manifest())

    assert metrics == {
        "audit/pairs_exact": 1.0,
        "audit/pairs_near": 8.0,
        "audit/leaks/train_test": 4.0,  # s1-t1, s1-t2, s2-t3, s3-t3
        "audit/leaks/train_val": 1.0,  # t1-v1
        "audit/test_rows_with_train_copy": 3.0,  # s1, s2, s3
        # g1 (t1, s2) is joined to g2, g3, g4, g5, g6 and the blank rows through the pairs;
        # every group here is linked to another
        "audit/groups_linked": 6.0,
        "audit/conflicting_label_clusters": 1.0,  # t1 (cat) ~ t3 (dog) ~ t4 (dog)
        "audit/conflicting_label_rows": 3.0,
    }
    assert all(isinstance(v, float) for v in metrics.values())
    lone = audit.summary_metrics(_pairs([]), _leak_manifest())
    assert lone["audit/groups_linked"] == 0.0 and lone["audit/pairs_exact"] == 0.0

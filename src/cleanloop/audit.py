"""The leakage audit's maths: find exact and near duplicate images and say what they leak.

:func:`find_duplicates` is the audit's entry point: exact pairs by content hash, near-pair
candidates by perceptual hash (and embeddings), near pairs confirmed at pixel level
(:func:`thumbnails`, :func:`pixel_similarity`), as one table. The rest are its parts.

Three ways to link two rows of a manifest:

* ``sha256`` (or ``blake2b``) - the files' bytes are identical (:func:`content_hashes`, or the
  digests a caller already has, e.g. the step's from :func:`cleanloop.lineage.content_digests`);
* ``phash`` - their perceptual hashes (DCT hash of the grayscale image, :func:`perceptual_hashes`)
  differ in at most ``max_distance`` of 64 bits (:func:`hash_near_pairs`): resized and
  re-compressed copies;
* ``embedding`` - their backbone embeddings are among each other's k nearest neighbours with a
  cosine similarity of at least ``min_cosine`` (:func:`embedding_near_pairs`, an exact search in
  a projection): crops and edits that move the perceptual hash too far.

A perceptual hash alone links distinct look-alike images (on the demo's digits, 1,449 pairs within 8
bits, 415 across labels), so :func:`find_duplicates` reports a phash pair only once the pixels
confirm it: each thumbnail is registered onto the other (a scale and shift per axis, for light
crops) and their normalised cross-correlation must reach ``PIXEL_MIN_NCC``.

:func:`duplicate_pairs` turns the links into one table of pairs; :func:`leakage_per_class`,
:func:`conflicting_label_rows` and :func:`summary_metrics` say what they mean for the splits and
labels; :func:`merge_groups` gives fold groups that keep linked rows together.

Everything here is a pure function (arrays and DataFrames in and out), except the functions that
read the image files (the two hash functions, :func:`thumbnails`, :func:`pixel_similarity` given
paths, :func:`find_duplicates`); :func:`find_duplicates` reads no image file when it is given the
files' digests and their pixels (``digests=``, ``pixels=``: the on-disk image cache's squares). N is
the number of rows. A manifest is a DataFrame with columns ``image_uuid``, ``path`` (absolute),
``label``, ``split`` (train/val/test) and optionally ``group`` (e.g. patient id; blank or absent
means unknown). Problems the user can fix raise :class:`~cleanloop.errors.CleanloopError` with one
line saying what is wrong.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import imagehash
import numpy as np
import pandas as pd
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from threadpoolctl import threadpool_limits

from cleanloop.errors import CleanloopError
from cleanloop.images import load_image
from cleanloop.manifest import blank

# Perceptual hashes closer than this many of 64 bits link two images (phash; its distances are
# always even, as each hash has 32 bits set). Measured by tests/test_audit.py on its own data:
# sklearn's 1,797 8x8 digits rendered at 64 px (white on black, bicubic), 1,613,706 pairs of
# distinct images:
#   max_distance         4      6      8      10     12
#   distinct pairs       73     400    1433   3633   8235   (cross-class: 0, 1, 9, 84, 446)
#   copies linked: resized 0.75x and JPEG q70: 100% from 4 up (largest distance seen: 4);
#   2% border crop 94.3 / 99.5 / 99.9 / 100 / 100%; 4% border crop 27 / 59 / 84 / 97 / 99.5%.
# 8 links every resized/re-compressed copy with a 2x margin and nearly all 2% crops, while 0.09%
# of distinct pairs link (same-writer look-alikes; 9 across classes); 10 would link 2.5x as many
# distinct pairs (84 across classes) for the last 4% crops, which the embedding check is for.
# dhash, average_hash and whash, compared once on the same digits (not in the test), link fewer
# 4% crops at a similar count of distinct pairs: about 3,600 pairs, phash 96%, dhash 17%;
# about 1,300-1,800 pairs, phash 84%, average_hash 33%, whash 10%.
# 8x8 digits are an extreme of look-alike images; on real photographs distinct pairs are rarer.
PHASH_MAX_DISTANCE = 8
PHASH_BITS = 64

# Embedding defaults. Not measured here (no pretrained backbone offline): the step's config
# should set min_cosine for its backbone; 0.95 only links near-identical embeddings.
EMBEDDING_MIN_COSINE = 0.95
EMBEDDING_K = 10
# Cells of one float32 block of cosine similarities (chunk x chunk): 2**25 cells is 128 MiB,
# whatever N is.
EMBEDDING_BLOCK_CELLS = 2**25
# embedding_near_pairs searches in a principal-axes projection of d of these dimensions (or in full
# dimension), fitted on a seeded sample of this many rows; below _PROJECTION_MIN_ROWS rows the full
# product is cheap (8,192^2 / 2 pairs x 1,152 multiply-adds: about 2-4 s), so it is used unless asked.
# On 121,514 random 1,152-d rows at cosine 0.95 the choice is 96 dimensions: 55-64 s instead of about
# 350 s for the full product, the same pairs (bench/audit_bench.py --part scale, one BLAS thread).
_PROJECTION_DIMS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512)
_PROJECTION_SAMPLE = 4096
_PROJECTION_SEED = 0
_PROJECTION_MIN_ROWS = 8192
# Relative cost, per pair, of one multiply-add of a float32 block product (BLAS), of comparing and
# finding the block's cells (compare, flatnonzero), and per element of a candidate pair verified in
# full dimension (rows gathered, then multiplied): measured about 0.06-0.13 ns, 0.75 ns and 4 ns
# on this project's busy 2-core AVX2 machine.
_COST_MADD, _COST_CELL, _COST_VERIFY = 1.0, 8.0, 30.0
# Slack on the projected test (half squared distance), far above float32 rounding (about 1e-6 for
# unit rows) so no pair within the radius is lost, far below the radius (0.05 at cosine 0.95).
_PROJECTION_SLACK = 1e-4
# A block whose projected candidates exceed its cells / this is computed in full dimension: with an
# element verified costing about 30 multiply-adds, verifying that many costs as much as the product.
_DENSE_CANDIDATES = 64

# hash_near_pairs: block values up to this many bits are looked up in a dense table (2**22 int64
# starts: 32 MiB); wider blocks are searched in a sorted array.
_DENSE_BITS = 22
# Relative cost of a key looked up in a dense table, in a sorted array, and of a candidate pair
# verified (measured on N=121,514 random hashes: about 25, 200 and 95 ns on a busy 2-core machine).
_COST_DENSE_KEY, _COST_SORTED_KEY, _COST_CANDIDATE = 1.0, 8.0, 4.0
# Bounds on the work arrays of hash_near_pairs, in elements (about 8-24 bytes each).
_KEYS_PER_CHUNK = 2**22
_CANDIDATES_PER_CHUNK = 2**23

# Pixel-level confirmation (pixel_similarity, find_duplicates): see PIXEL_MIN_NCC.
THUMBNAIL_SIDE = 32
PIXEL_MIN_SCALE = 0.8  # the registration finds crops of up to 10% of each side
# Pixel NCC of a confirmed near pair, measured by bench/audit_bench.py (B8) on the demo's 32-px
# digits with 100 injected copies (byte copies, resized 0.6-1.5x, JPEG q60-85, cropped 2-5% a side)
# among 18,239 candidate pairs of distinct images (phash distance <= 14):
#   injected copies score >= 0.9987 (resized; JPEG >= 0.9994, crops 0.99999 once re-rendered);
#   distinct digits <= 0.9941, but for one pair of near-identical originals (8x8 ink L2 5.3): 0.9976;
#   false pairs reported at phash distance <= 12 and NCC >= 0.990 / 0.993 / 0.995 to 0.998: 12 / 2 / 0.
# 0.996 sits between copies and distinct digits, nearer the latter, because crops of other images
# score lower: 2-8% a side off photographs (patches of scikit-learn's sample images) 0.9961-0.9998,
# off text pages 0.9976-0.9988 (8%: 0.9952) (tests/test_audit.py::
# test_pixel_similarity_confirms_copies_of_photos_and_text); distinct photographs stay below 0.95.
PIXEL_MIN_NCC = 0.996
# Perceptual-hash distance of a candidate pair. Resized and JPEG copies stay within 2 bits; crops of
# 2-5% a side reach 10 on the demo's 32-px digits (the bench's largest), 4% crops of 64-px digits 12
# for 99.5% of them (tests/test_audit.py::test_default_phash_distance_measured_on_digits). The pixel
# check keeps the precision, so 12: about 9,150 candidates on the demo (about 1.2 ms each to confirm on
# this project's 2-core machine), none false once confirmed; 10 halves them but leaves no margin for
# the bench's crops.
CANDIDATE_PHASH_MAX_DISTANCE = 12
# Gauss-Newton registration: (blur sigma in thumbnail pixels, steps) per stage; the blurred stage
# widens the basin (a 5% crop moves edge pixels by 1.6 px at 32 px), the sharp one refines.
_REGISTRATION = ((1.0, 3), (0.0, 5))
# Centred start boxes, as fractions of the largest crop (1 - min_scale): 0.8 -> sides 0.97, 0.9, 0.83.
_REGISTRATION_STARTS = (0.15, 0.5, 0.85)
_PAIRS_PER_CHUNK = 1024  # pairs registered at once: about 40 float32 (2 x 1,024, 32, 32) arrays live
# pixel_similarity renders a box again from its file when the thumbnails score it this or more
_RERENDER_GATE = 0.9
_FLAT_STD = 0.5  # a thumbnail whose pixels spread less than this (of 255) is flat: NCC is undefined

_READ_BLOCK = 1 << 20  # bytes read at a time when hashing file contents
# find_duplicates(pixels=...): the pixels of the rows come from the caller (the image cache), and
# pixel_similarity renders its boxes from them too. pixel_similarity takes only file paths (as
# strings), so each row is passed as "<prefix><token>/<row>/<file>", resolved by _rgb through the
# (pixels, sizes) registered under its token for the duration of that call (one token per call, so
# two searches at once, e.g. cycle's prefetch and a step, never read each other's pixels).
_PIXELS_PREFIX = "\x00cleanloop-pixels:"
_pixel_sources: dict[str, tuple[Sequence, Sequence | None]] = {}
_pixel_tokens = itertools.count()
# Smallest side of given pixels that find_duplicates takes as they are: a thumbnail is 32 px and the
# pixel check renders boxes of at least PIXEL_MIN_SCALE of a side from them, so smaller squares
# would be magnified (blurred); the step decodes the files instead.
PIXELS_MIN_SIDE = 2 * THUMBNAIL_SIDE
_MAX_LISTED = 5  # paths named in an error message

PAIR_COLUMNS = (
    "image_uuid_a",
    "image_uuid_b",
    "kind",
    "similarity",
    "split_a",
    "split_b",
    "label_a",
    "label_b",
    "group_a",
    "group_b",
    "method",
)
LEAKAGE_COLUMNS = (
    "class",
    "n_train",
    "train_test_pairs",
    "train_val_pairs",
    "test_rows_with_train_copy",
    "val_rows_with_train_copy",
    "conflicting_label_pairs",
)
CONFLICT_COLUMNS = ("image_uuid", "given_label", "cluster", "cluster_labels", "cluster_size")


def _listed(paths: Sequence) -> str:
    shown = ", ".join(str(p) for p in list(paths)[:_MAX_LISTED])
    more = len(paths) - _MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


def _map(func, items: Sequence, workers: int) -> list:
    if workers <= 1 or len(items) < 2:
        return [func(x) for x in items]
    # Threads: hashlib and PIL's decoders release the GIL while they work.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(func, items))


def _shown(path: str) -> str:
    """A path as a message names it: a row of given pixels by its file's path."""
    if path.startswith(_PIXELS_PREFIX):
        return f"{path.split('/', 2)[2]} (given pixels)"
    return path


def _map_files(func, paths: Sequence, workers: int, *, verb: str, what: str) -> list:
    """``func`` over the paths (None for a file it cannot use); any None is one CleanloopError listing them."""
    paths = [str(p) for p in paths]
    results = _map(func, paths, workers)
    bad = [_shown(p) for p, r in zip(paths, results, strict=True) if r is None]
    if bad:
        raise CleanloopError(f"cannot {verb} {len(bad)} of {len(paths)} {what}: {_listed(bad)}; "
                             "fix or remove them from the manifest")
    return results


# ---------------------------------------------------------------------------------------------
# hashing files


def content_hashes(paths: Sequence[str], *, workers: int = 1) -> np.ndarray:
    """The sha256 hex digest of each file's bytes.

    Parameters
    ----------
    paths : sequence of str, length N
        Image files (any file: only the bytes count).
    workers : int
        Threads reading files at once.

    Returns
    -------
    np.ndarray, shape (N,), str
        64 hex characters per file; equal digests mean byte-identical files.

    Raises
    ------
    CleanloopError
        Files that cannot be read, listing the first few and their count.
    """

    def digest(path):
        h = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(_READ_BLOCK), b""):
                    h.update(block)
        except OSError:
            return None
        return h.hexdigest()

    digests = _map_files(digest, paths, workers, verb="read", what="image file(s)")
    return np.array(digests, dtype=str) if digests else np.array([], dtype="<U64")


def perceptual_hashes(paths: Sequence[str], *, hash_size: int = 8, workers: int = 1) -> np.ndarray:
    """The perceptual hash (``imagehash.phash``, a DCT hash) of each image, as one integer.

    Each image is decoded as training sees it (:func:`cleanloop.images.load_image`: EXIF
    orientation applied, then RGB), and phash takes it to grayscale, 4 * hash_size pixels square,
    so copies in another format, size or colour mode hash alike. Bit k of the integer is hash bit
    k in imagehash's row-major order, counted from the most significant bit.

    Parameters
    ----------
    paths : sequence of str, length N
    hash_size : int
        Side of the hash's bit grid: ``hash_size**2`` bits, at most 64. :func:`duplicate_pairs`
        counts similarity out of 64 bits, so keep the default 8 for it.
    workers : int
        Threads decoding images at once.

    Returns
    -------
    np.ndarray, shape (N,), uint64

    Raises
    ------
    CleanloopError
        Images that cannot be decoded, listing the first few and their count.
    """
    if not 2 <= hash_size <= 8:
        raise CleanloopError(f"hash_size={hash_size}: choose 2..8 (hash_size**2 bits must fit in 64)")

    def phash(path):
        try:
            bits = imagehash.phash(_rgb(path), hash_size=hash_size).hash.ravel()
        except CleanloopError:
            return None
        # Pack most significant bit first, as imagehash's str() does.
        return int(np.packbits(np.r_[np.zeros(64 - bits.size, bool), bits]).view(">u8")[0])

    hashes = _map_files(phash, paths, workers, verb="decode", what="image(s)")
    return np.array(hashes, dtype=np.uint64)


# ---------------------------------------------------------------------------------------------
# near pairs


_BYTE_BITS = np.array([bin(b).count("1") for b in range(256)], dtype=np.uint8)


def popcount64(x) -> np.ndarray:
    """Set bits of each 64-bit integer; shape as ``x``, int64."""
    x = np.ascontiguousarray(x, dtype=np.uint64)
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x).astype(np.int64)
    return _BYTE_BITS[x.view(np.uint8)].reshape(*x.shape, 8).sum(axis=-1, dtype=np.int64)


def _as_hashes(hashes) -> np.ndarray:
    # A list of Python ints above 2**63 would become float64 (losing bits) in np.asarray.
    arr = np.asarray(hashes) if hasattr(hashes, "dtype") else np.array(list(hashes), dtype=object)
    if arr.ndim != 1:
        raise CleanloopError(f"hashes has shape {arr.shape}, expected (N,)")
    if arr.dtype == np.uint64:
        return arr
    if arr.dtype.kind in "iu" and arr.dtype.itemsize == 8:
        return arr.view(np.uint64)  # the same bits (e.g. read back from a signed int64 column)
    if arr.dtype.kind not in "iuO":
        raise CleanloopError(f"hashes have dtype {arr.dtype}, expected uint64 (a float cannot hold 64 bits)")
    try:
        return np.array([int(h) for h in arr.tolist()], dtype=np.uint64)
    except (TypeError, ValueError, OverflowError) as e:
        raise CleanloopError(f"hashes are not 64-bit unsigned integers ({e})") from e


def _blocks(n_blocks: int) -> list[tuple[int, int]]:
    """(shift, width) of each of ``n_blocks`` nearly equal bit blocks of a 64-bit integer."""
    widths = [PHASH_BITS // n_blocks + (1 if k < PHASH_BITS % n_blocks else 0) for k in range(n_blocks)]
    shifts = np.cumsum([0, *widths[:-1]])
    return [(int(s), w) for s, w in zip(shifts, widths, strict=True)]


def _ball(width: int, radius: int) -> int:
    return sum(math.comb(width, r) for r in range(min(radius, width) + 1))


def _choose_blocks(n: int, max_distance: int) -> int:
    """The number of blocks that makes the least work for N uniformly random hashes.

    With m blocks, two hashes within ``d`` bits agree within ``d // m`` bits on at least one block
    (pigeonhole), so every row looks up the ``ball`` of values that close to its own in each
    block: m * ball lookups per row, each finding about N / 2**width rows to verify.
    """
    best, best_cost = 1, math.inf
    for m in range(1, min(max_distance + 1, PHASH_BITS) + 1):
        radius = max_distance // m
        cost = 0.0
        for _, width in _blocks(m):
            keys = n * _ball(width, radius)
            key_cost = _COST_DENSE_KEY if width <= _DENSE_BITS else _COST_SORTED_KEY
            cost += keys * key_cost + keys * n / 2.0**width * _COST_CANDIDATE
        if cost < best_cost:
            best, best_cost = m, cost
    return best


def hash_near_pairs(hashes, *, max_distance: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs of 64-bit hashes within ``max_distance`` bits of each other, without N^2 work.

    Multi-index hashing (Norouzi et al., 2012): the 64 bits are cut into m blocks; two hashes
    within d bits agree within d // m bits on at least one block, so only rows whose block value
    is that close are compared. m = d + 1 blocks with exact block matches is the plain pigeonhole
    trick; m is chosen for the least work (for d = 8 and N = 121,514: 3 blocks of 21-22 bits, each
    matched within 2 bits). Memory stays bounded: rows are processed in chunks.

    Parameters
    ----------
    hashes : array_like, shape (N,)
        uint64 (or int64 with the same bits, or Python ints below 2**64).
    max_distance : int
        Largest Hamming distance linked, 0..32.

    Returns
    -------
    i, j : np.ndarray, shape (P,), int64
        Row indices, ``i < j``, sorted by i then j.
    distance : np.ndarray, shape (P,), int64
        Hamming distance of each pair.
    """
    if not 0 <= int(max_distance) <= PHASH_BITS // 2:
        raise CleanloopError(f"max_distance={max_distance}: choose 0..{PHASH_BITS // 2} bits of {PHASH_BITS}")
    h = _as_hashes(hashes)
    if len(h) < 2:  # (and with no rows every block count costs 0, so one 64-bit block would be chosen)
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy(), empty.copy()
    return _hash_near_pairs(h, int(max_distance), _choose_blocks(len(h), int(max_distance)))


def _hash_near_pairs(h: np.ndarray, max_distance: int, n_blocks: int):
    n = len(h)
    radius = max_distance // n_blocks
    blocks = _blocks(n_blocks)
    out_i, out_j, out_d = [], [], []
    for k, (shift, width) in enumerate(blocks):
        vals = (h >> np.uint64(shift)) & np.uint64((1 << width) - 1)
        order = np.argsort(vals, kind="stable")  # rows by block value: each value's bucket is a run
        flips = np.array([sum(1 << b for b in bits)
                          for r in range(min(radius, width) + 1)
                          for bits in itertools.combinations(range(width), r)], dtype=np.uint64)
        dense = width <= _DENSE_BITS
        if dense:
            # int32 keys and a table of bucket starts by value; most keys of a wide block find an
            # empty bucket, which the byte-per-value `occupied` table (4 MiB at most) rules out first.
            vals, flips = vals.astype(np.int32), flips.astype(np.int32)
            counts = np.bincount(vals, minlength=1 << width)
            occupied = counts > 0
            starts = np.zeros((1 << width) + 1, dtype=np.int64)
            np.cumsum(counts, out=starts[1:])
        else:
            sorted_vals = vals[order]
        rows_per_chunk = max(1, _KEYS_PER_CHUNK // len(flips))
        for start in range(0, n, rows_per_chunk):
            keys = (vals[start:start + rows_per_chunk, None] ^ flips[None, :]).ravel()
            if dense:
                hit = np.flatnonzero(occupied[keys])
                keys = keys[hit]
                lo = starts[keys]
                count = starts[keys + 1] - lo
            else:
                lo = np.searchsorted(sorted_vals, keys, side="left")
                count = np.searchsorted(sorted_vals, keys, side="right") - lo
                hit = np.flatnonzero(count)
                lo, count = lo[hit], count[hit]
            qrow = start + hit // len(flips)
            # Expand the buckets in slices of about _CANDIDATES_PER_CHUNK candidate pairs.
            ends = np.cumsum(count)
            total = int(ends[-1]) if len(ends) else 0
            cuts = np.searchsorted(ends, np.arange(_CANDIDATES_PER_CHUNK, total, _CANDIDATES_PER_CHUNK))
            for a, b in zip(np.r_[0, cuts + 1], np.r_[cuts + 1, len(count)], strict=True):
                if a >= b:
                    continue
                c = count[a:b]
                offset = np.arange(int(c.sum())) - np.repeat(np.cumsum(c) - c, c)
                i = np.repeat(qrow[a:b], c)
                j = order[np.repeat(lo[a:b], c) + offset]
                keep = i < j  # each pair is found from both ends, and a row finds itself
                i, j = i[keep], j[keep]
                x = h[i] ^ h[j]
                dist = popcount64(x)
                keep = dist <= max_distance
                # A pair close on several blocks is kept by the first of them only.
                for prev_shift, prev_width in blocks[:k]:
                    prev = (x >> np.uint64(prev_shift)) & np.uint64((1 << prev_width) - 1)
                    keep &= popcount64(prev) > radius
                out_i.append(i[keep])
                out_j.append(j[keep])
                out_d.append(dist[keep])
    if not out_i:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy(), empty.copy()
    i, j, d = (np.concatenate(a).astype(np.int64) for a in (out_i, out_j, out_d))
    order = np.lexsort((j, i))
    return i[order], j[order], d[order]


def _close_top_k(sim: np.ndarray, min_cosine: float, k: int):
    """(row, column, similarity) of each row's at most k largest similarities >= min_cosine."""
    close = sim >= min_cosine
    many = np.flatnonzero(close.sum(axis=1) > k)
    if len(many):  # the rest keep all their close columns, with no partition to pay for
        top = np.argpartition(-sim[many], k - 1, axis=1)[:, :k]
        close[many] = False
        close[many[:, None], top] = True
    r, c = np.nonzero(close)
    return r, c, sim[r, c]


def _top_k_per_row(rows: np.ndarray, cols: np.ndarray, cos: np.ndarray, k: int):
    order = np.lexsort((cols, -cos, rows))
    rows, cols, cos = rows[order], cols[order], cos[order]
    first = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]]) if len(rows) else np.zeros(0, np.int64)
    rank = np.arange(len(rows)) - np.repeat(first, np.diff(np.r_[first, len(rows)]))
    keep = rank < k
    return rows[keep], cols[keep], cos[keep]


def _projection(x: np.ndarray, min_cosine: float, dims: int | None) -> np.ndarray | None:
    """An orthonormal basis (D, d) to search in, or None to search in full dimension.

    The basis is the top ``d`` principal axes of a seeded sample of the (unit) rows. When ``dims``
    is None, ``d`` is the one of ``_PROJECTION_DIMS`` with the least estimated work per pair:
    ``d + 2`` multiply-adds for the projected product, a compare per cell, and ``D`` elements
    gathered and multiplied for each candidate pair the projection cannot rule out, at the
    candidate rate counted on a second, disjoint sample (the fitted sample's own spread along its
    principal axes is inflated, most for isotropic data: twice the true one for 4,096 random
    1,152-d rows). The full-dimension product (``D`` multiply-adds) wins for small D, low
    ``min_cosine`` or fewer than ``_PROJECTION_MIN_ROWS`` rows.
    """
    n, d = x.shape
    if dims is not None:
        dims = int(dims)
        if dims <= 0 or dims >= d:
            return None
    elif n < _PROJECTION_MIN_ROWS:
        return None
    rng = np.random.default_rng(_PROJECTION_SEED)
    picked = rng.permutation(n)[:2 * _PROJECTION_SAMPLE]
    fit = x[np.sort(picked[:_PROJECTION_SAMPLE])].astype(np.float64)
    fit -= fit.mean(axis=0)
    with threadpool_limits(1):  # LAPACK's eigh on 2 threads of a busy machine: 11.7 s for D = 1,152, 0.5 s on one
        _, vectors = np.linalg.eigh(fit.T @ fit)
    axes = vectors[:, ::-1]  # principal axes, largest variance first
    if dims is None:
        held_out = x[np.sort(picked[_PROJECTION_SAMPLE:])]
        pairs = len(held_out) * (len(held_out) - 1) / 2
        best, best_cost = None, d * _COST_MADD + _COST_CELL
        for cand in (c for c in _PROJECTION_DIMS if c < d):
            if (cand + 2) * _COST_MADD + _COST_CELL >= best_cost:
                break  # more dimensions only cost more from here
            p = held_out @ axes[:, :cand].astype(np.float32)
            sq = np.einsum("ij,ij->i", p, p)
            dist2 = sq[:, None] + sq[None, :] - 2.0 * (p @ p.T)
            close = (int(np.count_nonzero(dist2 <= 2.0 * (1.0 - min_cosine + _PROJECTION_SLACK))) - len(p)) / 2
            cost = (cand + 2) * _COST_MADD + _COST_CELL + max(close, 0) / pairs * d * _COST_VERIFY
            if cost < best_cost:
                best, best_cost = cand, cost
        if best is None:
            return None
        dims = best
    return np.ascontiguousarray(axes[:, :dims], dtype=np.float32)


def _dense_block(x: np.ndarray, a: int, b: int, chunk: int, min_cosine: float, k: int) -> list:
    """(rows, columns, cosines) of each side of block (a, b), each row's k best >= min_cosine."""
    sim = x[a:a + chunk] @ x[b:b + chunk].T
    if a == b:
        np.fill_diagonal(sim, -np.inf)  # not its own neighbour
    sides = [(sim, a, b)] if a == b else [(sim, a, b), (sim.T, b, a)]
    out = []
    for block, r0, c0 in sides:
        r, c, v = _close_top_k(block, min_cosine, k)
        out.append((r + r0, c + c0, v))
    return out


def embedding_near_pairs(embeddings, *, min_cosine: float, k: int = EMBEDDING_K, chunk: int | None = None,
                         dims: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs of rows whose embeddings are near neighbours with cosine similarity >= ``min_cosine``.

    A pair is kept when either row is among the other's ``k`` nearest neighbours by cosine (so a
    row in a big cluster of copies links to at most k of them directly; components still join the
    cluster). Rows are compared in ``chunk`` x ``chunk`` blocks, each block once (it serves its
    rows and, transposed, its columns), so memory stays bounded whatever N is.

    Exact search in a projection: for unit rows, cosine >= c is Euclidean distance <= sqrt(2 - 2c),
    and an orthonormal projection only shrinks distances, so every such pair is within that
    radius in the projection too. Blocks are searched there (d + 2 multiply-adds per pair instead
    of D), and each candidate is verified by its full-dimension cosine: the result is the same as
    the full product's. A block with too many candidates (the projection rules out little there)
    is computed in full dimension instead. See :func:`_projection` for how d is chosen; on
    121,514 random 1,152-d rows at min_cosine 0.95 it picks 96 (bench/audit_bench.py --part scale).

    Parameters
    ----------
    embeddings : array_like, shape (N, D)
        Any scale: rows are normalised here. A row of zeros has no direction and links to nothing.
    min_cosine : float
        Smallest cosine similarity linked, in [-1, 1].
    k : int
        Neighbours per row considered (the row itself excluded).
    chunk : int, optional
        Side of a block of similarities; default ``isqrt(EMBEDDING_BLOCK_CELLS)`` (128 MiB blocks).
    dims : int, optional
        Dimensions of the projection searched: None chooses from the data (full dimension below
        ``_PROJECTION_MIN_ROWS`` rows), 0 or >= D searches in full dimension.

    Returns
    -------
    i, j : np.ndarray, shape (P,), int64
        Row indices, ``i < j``, sorted by i then j, each pair once.
    cosine : np.ndarray, shape (P,), float64
        Cosine similarity of each pair, clipped into [-1, 1].
    """
    x = np.array(embeddings, dtype=np.float32)  # a copy: normalised in place
    if x.ndim != 2:
        raise CleanloopError(f"embeddings has shape {x.shape}, expected (N, D)")
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise CleanloopError(f"embeddings has NaN or infinite values in {int(bad.sum())} row(s) "
                             f"(first: row {int(np.flatnonzero(bad)[0])}); recompute them")
    if not -1.0 <= min_cosine <= 1.0:
        raise CleanloopError(f"min_cosine={min_cosine}: choose a cosine similarity in [-1, 1]")
    if k < 1:
        raise CleanloopError(f"k={k}: choose at least 1 neighbour")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    rows_kept = np.flatnonzero(norms[:, 0] > 0)  # rows of zeros take no part
    if len(rows_kept) < len(x):
        x = x[rows_kept]
    n = len(x)
    k = min(int(k), n - 1)
    chunk = max(1, int(chunk) if chunk is not None else math.isqrt(EMBEDDING_BLOCK_CELLS))
    basis = _projection(x, min_cosine, dims) if n >= 2 else None
    if basis is not None:
        # Squared distance <= r^2 is p.q - |p|^2/2 - |q|^2/2 >= -r^2/2: one product of rows
        # lengthened by two columns, compared with one number, instead of three passes per block.
        p = x @ basis
        half = 0.5 * np.einsum("ij,ij->i", p, p)[:, None]
        ones = np.ones_like(half)
        left, right = np.hstack([p, -half, ones]), np.hstack([p, ones, -half])
        del p
        threshold = np.float32(-(1.0 - min_cosine) - _PROJECTION_SLACK)
    # Each block adds at most k candidates per row; pruning to each row's k best whenever they
    # pile up keeps them to O(N k).
    limit = max(4 * n * k, 1 << 20)
    rows, cols, cos = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.float32)]
    held = 0
    for a in range(0, n if k >= 1 else 0, chunk):
        for b in range(a, n, chunk):
            if basis is None:
                found = _dense_block(x, a, b, chunk, min_cosine, k)
            else:
                # flatnonzero: 2-d nonzero costs about ten times as much per cell (4 ns against 0.35)
                width = min(chunk, n - b)
                r, c = np.divmod(np.flatnonzero(left[a:a + chunk] @ right[b:b + chunk].T >= threshold), width)
                if a == b:
                    keep = r < c  # each pair once, not a row with itself
                    r, c = r[keep], c[keep]
                if len(r) > min(chunk, n - a) * width // _DENSE_CANDIDATES:
                    found = _dense_block(x, a, b, chunk, min_cosine, k)
                else:
                    r, c = r + a, c + b
                    v = np.einsum("ij,ij->i", x[r], x[c])
                    close = v >= min_cosine
                    r, c, v = r[close], c[close], v[close]
                    found = [(r, c, v), (c, r, v)]
            for r, c, v in found:
                rows.append(r)
                cols.append(c)
                cos.append(v)
                held += len(r)
            if held > limit:
                rows, cols, cos = ([v] for v in _top_k_per_row(*map(np.concatenate, (rows, cols, cos)), k))
                held = len(rows[0])
    i, j, c = _top_k_per_row(*map(np.concatenate, (rows, cols, cos)), k)
    i, j = rows_kept[i], rows_kept[j]
    c = np.clip(c.astype(np.float64), -1.0, 1.0)
    a, b = np.minimum(i, j), np.maximum(i, j)
    # A pair found from both ends keeps the larger value (float32 products of different blocks may
    # differ in the last bit), so the result does not depend on the chunking.
    order = np.lexsort((-c, b, a))
    a, b, c = a[order], b[order], c[order]
    first = np.r_[True, (a[1:] != a[:-1]) | (b[1:] != b[:-1])] if len(a) else np.zeros(0, bool)
    return a[first].astype(np.int64), b[first].astype(np.int64), c[first]


# ---------------------------------------------------------------------------------------------
# pixel-level confirmation


def _rgb(path: str) -> Image.Image:
    """The image decoded as training sees it (RGB), or a row of the pixels given to find_duplicates.

    A path ``<_PIXELS_PREFIX><token>/<row>/<file>`` is row ``row`` of the pixel source registered
    under ``token``: (H, W, 3) uint8, e.g. the image cache's square, taken as it is (no file read).
    """
    if not path.startswith(_PIXELS_PREFIX):
        return load_image(path)
    token, row, _ = path[len(_PIXELS_PREFIX):].split("/", 2)
    try:
        source, sizes = _pixel_sources[token]
        pixels = np.asarray(source[int(row)], dtype=np.uint8)
        if sizes is not None:
            pixels = unpadded(pixels, sizes[int(row)])
        return Image.fromarray(pixels if pixels.ndim == 2 else pixels[..., :3]).convert("RGB")
    except (OSError, ValueError, IndexError, KeyError, TypeError) as e:
        raise CleanloopError(f"{_shown(path)}: cannot read its pixels ({type(e).__name__}: {e})") from e


def unpadded(square: np.ndarray, size) -> np.ndarray:
    """The part of a padded square (:func:`cleanloop.imagecache.square_pixels`) that shows the image.

    The image cache pads an image of ``size`` = (width, height) symmetrically to a square, then
    resizes it; this cuts the bars off again, rounding inwards so that no pixel blended with a bar
    is kept (at most one pixel of the image lost a side). A square image's square is returned whole.
    Measured on tests/test_audit.py's images (README, the audit): with the bars kept, every crop that
    changes the aspect ratio by a pixel or more, and 5 of 6 crops of a 4:3 photograph, score under
    ``PIXEL_MIN_NCC`` (0.64-0.995) while the decoded files score 0.998-1.0; with them cut off, the
    squares of 64 and 448 px confirm all of them (>= 0.9964), as the decoded files do.
    """
    w, h = (int(v) for v in size)
    if w == h or w <= 0 or h <= 0:
        return square
    side = max(w, h)
    scale_y, scale_x = square.shape[0] / side, square.shape[1] / side
    left, top = (side - w) // 2, (side - h) // 2
    x0, x1 = math.ceil(left * scale_x), math.floor((left + w) * scale_x)
    y0, y1 = math.ceil(top * scale_y), math.floor((top + h) * scale_y)
    return square[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)]


def image_sizes(paths: Sequence[str], *, workers: int = 1) -> list[tuple[int, int]]:
    """Each image's upright (width, height), from its header only (no decode): EXIF orientations
    5-8 swap the two, as :func:`cleanloop.images.load_image` turns the image.

    Raises
    ------
    CleanloopError
        Files whose header cannot be read, listing the first few and their count.
    """

    def size(path):
        try:
            with Image.open(path) as img:
                w, h = img.size
                turned = img.getexif().get(0x0112, 1) in (5, 6, 7, 8)
        except (OSError, ValueError, Image.DecompressionBombError):
            return None
        return (h, w) if turned else (w, h)

    return _map_files(size, paths, workers, verb="read the header of", what="image(s)")


def _gray(path: str) -> Image.Image:
    """The image decoded as training sees it (:func:`_rgb`), as float grayscale ("F": 0..255, no rounding)."""
    return _rgb(path).convert("L").convert("F")


def _render(gray: Image.Image, side: int, box=None) -> np.ndarray:
    """A (side, side) float32 thumbnail of ``gray``, or of its ``box`` (left, top, right, bottom)."""
    return np.asarray(gray.resize((side, side), Image.Resampling.BILINEAR, box=box), dtype=np.float32)


def thumbnails(paths: Sequence[str], *, side: int = THUMBNAIL_SIDE, workers: int = 1) -> np.ndarray:
    """Each image as a ``side`` x ``side`` grayscale thumbnail, float32 in 0..255.

    Decoded as training sees it (:func:`cleanloop.images.load_image`: EXIF orientation applied),
    taken to grayscale, then resized (bilinear, antialiased when shrinking) to a square, whatever
    its aspect ratio: a copy in another size or format gives nearly the same thumbnail. Float, not
    uint8, so rounding does not cap the similarity of low-contrast copies.

    Parameters
    ----------
    paths : sequence of str, length N
    side : int
        Thumbnail side in pixels, at least 8.
    workers : int
        Threads decoding images at once.

    Returns
    -------
    np.ndarray, shape (N, side, side), float32

    Raises
    ------
    CleanloopError
        Images that cannot be decoded, listing the first few and their count.
    """
    if side < 8:
        raise CleanloopError(f"side={side}: choose at least 8 pixels")

    def thumb(path):
        try:
            return _render(_gray(path), side)
        except CleanloopError:
            return None

    thumbs = _map_files(thumb, paths, workers, verb="decode", what="image(s)")
    return np.stack(thumbs) if thumbs else np.zeros((0, side, side), np.float32)


def _normalised(x: np.ndarray) -> np.ndarray:
    """Each (side, side) image minus its mean, scaled to unit norm (zeros if flat): NCC is a dot product."""
    x = x - x.mean(axis=(1, 2), keepdims=True)
    norm = np.sqrt(np.einsum("pij,pij->p", x, x))[:, None, None]
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def _blurred(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of each image (separable, edges repeated)."""
    if sigma <= 0:
        return x
    radius = int(3 * sigma + 0.5)
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel = (kernel / kernel.sum()).astype(np.float32)
    side = x.shape[-1]
    padded = np.pad(x, ((0, 0), (radius, radius), (radius, radius)), mode="edge")
    rows = sum(w * padded[:, t:t + side, :] for t, w in enumerate(kernel))
    return sum(w * rows[:, :, t:t + side] for t, w in enumerate(kernel))


def _warped(img: np.ndarray, warp: np.ndarray) -> np.ndarray:
    """Sample each image at its box: warp (P, 4) = (sx, tx, sy, ty), unit coordinate u -> s u + t.

    Bilinear and separable, as two batched products with each image's (side, side) interpolation
    matrices (half the time of gathering rows and columns); edges repeated outside the frame.
    """
    p, side, _ = img.shape
    u = (np.arange(side, dtype=np.float32) + 0.5) / side
    at, out = np.arange(p)[:, None], np.arange(side)[None, :]

    def weights(s, t):
        pos = np.clip((s[:, None] * u + t[:, None]) * side - 0.5, 0.0, side - 1.0)
        low = np.minimum(pos.astype(np.int64), side - 2)
        frac = (pos - low).astype(np.float32)
        w = np.zeros((p, side, side), dtype=np.float32)  # w[p, source, output]
        w[at, low, out] = 1 - frac
        w[at, low + 1, out] = frac
        return w

    return weights(warp[:, 2], warp[:, 3]).transpose(0, 2, 1) @ img @ weights(warp[:, 0], warp[:, 1])


def _composed(warp: np.ndarray, step: np.ndarray, min_scale: float) -> np.ndarray:
    """``warp`` composed with the inverse of the step's warp u -> (1 + ds) u + dt, the box kept in the frame."""
    out = warp.copy()
    for s, t in ((0, 1), (2, 3)):
        grow = 1.0 + step[:, s]
        out[:, t] = warp[:, t] - warp[:, s] * step[:, t] / grow
        out[:, s] = np.clip(warp[:, s] / grow, min_scale, 1.0)
        out[:, t] = np.clip(out[:, t], 0.0, 1.0 - out[:, s])
    return out


def _registered_ncc(thumbs: np.ndarray, t: np.ndarray, i: np.ndarray, min_scale: float
                    ) -> tuple[np.ndarray, np.ndarray]:
    """NCC of each template ``thumbs[t]`` with the box of ``thumbs[i]`` that best matches it, and the box (P, 4).

    The NCC is the higher of the whole frame's and the box's, the box sampled from the image itself.
    What depends on one thumbnail only (its blur, normalisation and, as a template, its Jacobian
    and Hessian) is computed once per distinct thumbnail of the chunk, not once per pair: a
    thumbnail is on the side of many candidate pairs (on the demo, 1,581 thumbnails for 8,238
    pairs), and this work was a third of the registration's time.
    """
    ut, t = np.unique(t, return_inverse=True)
    ui, i = np.unique(i, return_inverse=True)
    a, b = thumbs[ut], thumbs[ui]
    p, side = len(t), thumbs.shape[1]
    za = _normalised(a)
    identity = np.einsum("pij,pij->p", za[t], _normalised(b)[i])
    sigmas = {sigma for sigma, _ in _REGISTRATION}
    blurred_a = {sigma: _normalised(_blurred(a, sigma)) for sigma in sigmas}
    blurred_b = {sigma: _blurred(b, sigma) for sigma in sigmas}
    # Start from the best of a few centred boxes, compared blurred (Gauss-Newton from one start
    # can stop at the frame's edge when the content sits at an edge); whole-frame copies (resized,
    # re-compressed) are scored at the whole frame anyway.
    sigma0 = _REGISTRATION[0][0]
    template, image = blurred_a[sigma0][t], blurred_b[sigma0][i]
    best = np.full(p, -np.inf, dtype=np.float32)
    warp = np.zeros((p, 4), dtype=np.float32)
    for scale in (1.0 - (1.0 - min_scale) * f for f in _REGISTRATION_STARTS):
        box = np.tile(np.array([scale, (1.0 - scale) / 2.0] * 2, dtype=np.float32), (p, 1))
        fit = np.einsum("pij,pij->p", template, _normalised(_warped(image, box)))
        better = fit > best
        best[better], warp[better] = fit[better], box[better]
    u = (np.arange(side, dtype=np.float32) + 0.5) / side
    for sigma, steps in _REGISTRATION:
        template_u = blurred_a[sigma]
        gy, gx = np.gradient(template_u, axis=(1, 2))
        # Inverse compositional Gauss-Newton (Baker and Matthews, 2004): the Jacobian and Hessian
        # are the template's, computed once; each step only warps the image.
        jac_u = np.stack([gx * u[None, None, :], gx, gy * u[None, :, None], gy], axis=1).reshape(len(ut), 4, -1) * side
        hessian = jac_u @ jac_u.transpose(0, 2, 1)
        hessian += np.eye(4, dtype=np.float32) * (1e-6 * np.trace(hessian, axis1=1, axis2=2)[:, None, None] + 1e-12)
        inverse_u = np.linalg.inv(hessian)
        template, image, jac, inverse = template_u[t], blurred_b[sigma][i], jac_u[t], inverse_u[t]
        warped = _normalised(_warped(image, warp))
        fit = np.einsum("pij,pij->p", template, warped)
        damping = np.ones((p, 1), dtype=np.float32)
        for _ in range(steps):
            error = (warped - template).reshape(p, -1)
            step = np.einsum("pkl,pl->pk", inverse, np.einsum("pkn,pn->pk", jac, error)) * damping
            step = np.clip(step, -0.25, 0.25)  # a Gauss-Newton step far from the optimum can overshoot
            trial = _composed(warp, step, min_scale)
            trial_warped = _normalised(_warped(image, trial))
            trial_fit = np.einsum("pij,pij->p", template, trial_warped)
            # Keep a step only where it raises the NCC, else halve it: the linearisation ignores
            # the normalisation and content leaving the frame, and can point the wrong way.
            better = trial_fit > fit
            warp[better], warped[better], fit[better] = trial[better], trial_warped[better], trial_fit[better]
            damping = np.where(better[:, None], np.minimum(damping * 2.0, 1.0), damping * 0.5)
    registered = np.einsum("pij,pij->p", za[t], _normalised(_warped(b[i], warp)))
    return np.maximum(identity, registered), warp


def pixel_similarity(thumbs: np.ndarray, i, j, *, min_scale: float = PIXEL_MIN_SCALE,
                     paths: Sequence[str] | None = None, workers: int = 1) -> np.ndarray:
    """How alike the pixels of each pair of thumbnails are, allowing for a light crop of either one.

    Each side in turn is the template: the other is searched for the box (a scale and a shift in
    each axis, the box inside the frame and at least ``min_scale`` of its side) that best matches
    the template, by Gauss-Newton on the thumbnails (blurred, then sharp). The pair scores the
    normalised cross-correlation (NCC, the Pearson correlation of the pixels) of the template with
    that box, or with the whole frame if higher, in the better of its two directions.

    A box sampled from a thumbnail is blurred by the interpolation, which caps a crop of a
    textured image near 0.985-0.997 at 32 px; with ``paths``, a box whose score reaches
    ``_RERENDER_GATE`` is rendered again from its file, as :func:`thumbnails` renders a whole
    image, so a crop scores as a resized copy does (about 0.999). Two distinct images rarely score
    that high, even when their perceptual hashes are close (see ``PIXEL_MIN_NCC``). Two flat
    (constant) thumbnails score ``1 - |difference of their levels| / 255``; a flat one and another 0.

    Parameters
    ----------
    thumbs : np.ndarray, shape (R, side, side)
        :func:`thumbnails`.
    i, j : array_like, shape (P,), int
        Rows of ``thumbs`` to compare.
    min_scale : float
        Smallest box side, as a fraction of the frame, in (0, 1]: 0.8 finds crops of up to 10%
        of each side; 1.0 compares whole frames only.
    paths : sequence of str, length R, optional
        The image file of each row of ``thumbs``, to render boxes from.
    workers : int
        Threads registering chunks of pairs and decoding images at once.

    Returns
    -------
    np.ndarray, shape (P,), float64
        In [-1, 1], deterministic.
    """
    if not 0.0 < min_scale <= 1.0:
        raise CleanloopError(f"min_scale={min_scale}: choose a fraction of the frame in (0, 1]")
    thumbs = np.asarray(thumbs, dtype=np.float32)
    if thumbs.ndim != 3 or thumbs.shape[1] != thumbs.shape[2] or thumbs.shape[1] < 8:
        raise CleanloopError(f"thumbs has shape {thumbs.shape}, expected (R, side, side) with side >= 8")
    if paths is not None:
        _check_length("paths", len(paths), len(thumbs))
    i, j = np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64)
    # both directions, one after the other: i as template, then j
    template, image = np.r_[i, j], np.r_[j, i]
    score = np.zeros(len(template), dtype=np.float64)
    warp = np.zeros((len(template), 4), dtype=np.float64)
    chunks = [slice(start, start + 2 * _PAIRS_PER_CHUNK) for start in range(0, len(template), 2 * _PAIRS_PER_CHUNK)]

    def register(at: slice):
        return _registered_ncc(thumbs, template[at], image[at], float(min_scale))

    # threads: numpy's batched products and elementwise work release the GIL
    for at, (chunk_score, chunk_warp) in zip(chunks, _map(register, chunks, workers), strict=True):
        score[at], warp[at] = chunk_score, chunk_warp
    if paths is not None:
        moved = np.abs(warp - [1.0, 0.0, 1.0, 0.0]).max(axis=1) > 1e-3
        redo = np.flatnonzero(moved & (score >= _RERENDER_GATE))
        if len(redo):
            boxes = _rendered_boxes([str(paths[r]) for r in image[redo]], warp[redo], thumbs.shape[1], workers)
            again = np.einsum("pij,pij->p", _normalised(thumbs[template[redo]]), _normalised(boxes))
            score[redo] = np.maximum(score[redo], again)
    out = np.maximum(score[:len(i)], score[len(i):])
    spread = thumbs.std(axis=(1, 2))
    level = thumbs.mean(axis=(1, 2))
    flat_a, flat_b = spread[i] < _FLAT_STD, spread[j] < _FLAT_STD
    out[flat_a | flat_b] = 0.0
    both = flat_a & flat_b
    out[both] = 1.0 - np.abs(level[i[both]] - level[j[both]]) / 255.0
    return np.clip(out, -1.0, 1.0)


def _rendered_boxes(paths: list[str], warp: np.ndarray, side: int, workers: int) -> np.ndarray:
    """Thumbnail of each box (sx, tx, sy, ty in unit coordinates) of each path; each file decoded once."""
    order = np.argsort(np.asarray(paths, dtype=object), kind="stable")
    out = np.zeros((len(paths), side, side), dtype=np.float32)
    runs = np.flatnonzero(np.r_[True, [paths[order[k]] != paths[order[k - 1]] for k in range(1, len(order))]])
    spans = list(zip(runs, np.r_[runs[1:], len(order)], strict=True))

    def render(span):
        a, b = span
        gray = _gray(paths[order[a]])
        width, height = gray.size
        return [_render(gray, side, (tx * width, ty * height, (sx + tx) * width, (sy + ty) * height))
                for sx, tx, sy, ty in warp[order[a:b]]]

    for (a, b), thumbs in zip(spans, _map(render, spans, workers), strict=True):
        out[order[a:b]] = thumbs
    return out


# ---------------------------------------------------------------------------------------------
# the pairs table


def _rows(manifest: pd.DataFrame) -> pd.DataFrame:
    """image_uuid, label, split, group of each row as stripped strings (blank group: "")."""
    missing = [c for c in ("image_uuid", "label", "split") if c not in manifest.columns]
    if missing:
        raise CleanloopError(f"manifest has no column(s) {', '.join(missing)}")
    def text(col: str) -> np.ndarray:
        # As read_manifest does: a null is "" (pandas 3 keeps it NaN through astype(str)).
        values = manifest[col]
        return values.astype(str).str.strip().where(values.notna(), "").to_numpy(dtype=object)

    rows = pd.DataFrame({"image_uuid": text("image_uuid"), "label": text("label"), "split": text("split")})
    if "group" in manifest.columns:
        group = pd.Series(text("group"), dtype=object)
        rows["group"] = group.mask(blank(group), "").to_numpy(dtype=object)
    else:
        rows["group"] = ""
    dup = rows["image_uuid"].duplicated(keep=False)
    if dup.any():
        raise CleanloopError(f"manifest: image_uuid is not unique ({_listed(rows['image_uuid'][dup].unique())}); "
                             "give every row its own id")
    return rows


def _check_length(name: str, n: int, n_rows: int) -> None:
    if n != n_rows:
        raise CleanloopError(f"{name} has {n} rows but the manifest has {n_rows}; recompute it for this manifest")


def duplicate_pairs(
    manifest: pd.DataFrame,
    *,
    content_hash: Sequence[str],
    phash=None,
    phash_max_distance: int = PHASH_MAX_DISTANCE,
    embeddings=None,
    min_cosine: float = EMBEDDING_MIN_COSINE,
    k: int = EMBEDDING_K,
) -> pd.DataFrame:
    """One row per pair of manifest rows linked as exact or near duplicates.

    Parameters
    ----------
    manifest : DataFrame, N rows
        Columns image_uuid (unique), label, split and optionally group.
    content_hash : sequence of str, shape (N,)
        :func:`content_hashes` of the rows' files; equal digests make an ``exact`` pair.
    phash : array_like, shape (N,), uint64, optional
        :func:`perceptual_hashes`; pairs within ``phash_max_distance`` bits are linked.
    embeddings : array_like, shape (N, D), optional
        Backbone embeddings; pairs found by :func:`embedding_near_pairs` with ``min_cosine`` and
        ``k`` are linked.

    Returns
    -------
    DataFrame
        Columns ``PAIR_COLUMNS``: image_uuid_a < image_uuid_b (string order), kind, similarity,
        split, label and group ("" when blank) of each side, method.

        * ``exact`` pairs (equal content hashes; every pair of a cluster of copies): similarity
          1.0, method ``sha256`` (whatever else links them).
        * ``near`` pairs: method ``phash``, ``embedding`` or ``phash+embedding``; similarity is
          the larger of ``1 - hamming / 64`` (phash) and the cosine (embedding) of the methods
          that linked the pair.

        Sorted by kind (exact first), similarity (descending), image_uuid_a, image_uuid_b.
    """
    rows = _rows(manifest)
    n = len(rows)
    content = np.asarray(content_hash).astype(str)
    _check_length("content_hash", len(content), n)

    near = pd.DataFrame({"i": np.zeros(0, np.int64), "j": np.zeros(0, np.int64)})
    if phash is not None:
        hashes = _as_hashes(phash)
        _check_length("phash", len(hashes), n)
        i, j, dist = hash_near_pairs(hashes, max_distance=phash_max_distance)
        near = pd.DataFrame({"i": i, "j": j, "phash": 1.0 - dist / PHASH_BITS})
    if embeddings is not None:
        emb = np.asarray(embeddings)
        _check_length("embeddings", len(emb), n)
        i, j, cos = embedding_near_pairs(emb, min_cosine=min_cosine, k=k)
        near = near.merge(pd.DataFrame({"i": i, "j": j, "embedding": cos}), on=["i", "j"], how="outer")
    return _pairs_table(rows, _exact_pairs(content), _near_pairs(near, content, ("phash", "embedding")))


def _exact_pairs(content: np.ndarray, method: str = "sha256") -> pd.DataFrame:
    """Every pair (i < j) within each cluster of equal digests (clusters of copies are small)."""
    n = len(content)
    codes, _ = pd.factorize(content)
    by_code = np.argsort(codes, kind="stable")
    sorted_codes = codes[by_code]
    starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]]) if n else np.zeros(0, np.int64)
    ends = np.r_[starts[1:], n]
    exact_i, exact_j = [], []
    for a, b in zip(starts[ends - starts > 1], ends[ends - starts > 1], strict=True):
        members = by_code[a:b]
        ii, jj = np.triu_indices(b - a, 1)
        exact_i.append(members[ii])
        exact_j.append(members[jj])
    i = np.concatenate(exact_i) if exact_i else np.zeros(0, np.int64)
    j = np.concatenate(exact_j) if exact_j else np.zeros(0, np.int64)
    return pd.DataFrame({"i": np.minimum(i, j), "j": np.maximum(i, j), "similarity": 1.0,
                         "method": method, "kind": "exact"})


def _near_pairs(near: pd.DataFrame, content: np.ndarray, methods: Sequence[str]) -> pd.DataFrame:
    """Near pairs from one column per method (its similarity; NaN where it did not link the pair).

    Pairs of equal digests are dropped (they are exact pairs); method joins the names of the
    methods that linked the pair with ``+``; similarity is the largest of theirs.
    """
    lo, hi = np.minimum(near["i"], near["j"]), np.maximum(near["i"], near["j"])
    near = near.assign(i=lo.astype(np.int64), j=hi.astype(np.int64))
    near = near[content[near["i"].to_numpy()] != content[near["j"].to_numpy()]]  # already exact
    methods = [m for m in methods if m in near.columns]
    if methods:
        near = near[near[methods].notna().any(axis=1).to_numpy()]
    method = np.full(len(near), "", dtype=object)
    for m in methods:
        found = near[m].notna().to_numpy()
        method[found] = np.where(method[found] == "", m, method[found] + "+" + m)
    return near.assign(
        similarity=near[methods].max(axis=1) if methods else 0.0, method=method, kind="near",
    )[["i", "j", "similarity", "method", "kind"]]


def _pairs_table(rows: pd.DataFrame, exact: pd.DataFrame, near: pd.DataFrame) -> pd.DataFrame:
    """The PAIR_COLUMNS table of exact and near pairs of row indices, in its documented order."""
    pairs = pd.concat([exact[["i", "j", "similarity", "method", "kind"]], near], ignore_index=True)
    i, j = pairs["i"].to_numpy(np.int64), pairs["j"].to_numpy(np.int64)
    uuid = rows["image_uuid"].to_numpy()
    swap = uuid[i] > uuid[j]
    a, b = np.where(swap, j, i), np.where(swap, i, j)
    out = pd.DataFrame({
        "image_uuid_a": uuid[a],
        "image_uuid_b": uuid[b],
        "kind": pairs["kind"].to_numpy(dtype=object),
        "similarity": pairs["similarity"].to_numpy(dtype=np.float64),
        "split_a": rows["split"].to_numpy()[a],
        "split_b": rows["split"].to_numpy()[b],
        "label_a": rows["label"].to_numpy()[a],
        "label_b": rows["label"].to_numpy()[b],
        "group_a": rows["group"].to_numpy()[a],
        "group_b": rows["group"].to_numpy()[b],
        "method": pairs["method"].to_numpy(dtype=object),
    }, columns=list(PAIR_COLUMNS))
    out["_exact_first"] = out["kind"] != "exact"
    out = out.sort_values(["_exact_first", "similarity", "image_uuid_a", "image_uuid_b"],
                          ascending=[True, False, True, True], kind="stable")
    return out.drop(columns="_exact_first").reset_index(drop=True)


def find_duplicates(
    manifest: pd.DataFrame,
    *,
    phash_max_distance: int = CANDIDATE_PHASH_MAX_DISTANCE,
    min_pixel_ncc: float = PIXEL_MIN_NCC,
    embeddings=None,
    min_cosine: float = EMBEDDING_MIN_COSINE,
    k: int = EMBEDDING_K,
    workers: int = 1,
    digests: Sequence[str] | None = None,
    pixels: Sequence | None = None,
    sizes: Sequence | None = None,
) -> pd.DataFrame:
    """Exact and near duplicate pairs of a manifest's images, near ones confirmed at pixel level.

    1. ``exact``: files with equal sha256 digests (:func:`content_hashes`), or equal ``digests``.
    2. Candidates: pairs whose perceptual hashes are within ``phash_max_distance`` bits
       (:func:`perceptual_hashes`, :func:`hash_near_pairs`) and, with ``embeddings``, pairs of
       k nearest neighbours at cosine >= ``min_cosine`` (:func:`embedding_near_pairs`).
    3. Confirmation: each candidate's thumbnails (:func:`thumbnails`, decoded for the candidates'
       rows only) are compared by :func:`pixel_similarity`; a pair at ``min_pixel_ncc`` or above
       is a near duplicate. A perceptual hash alone is not evidence: on the demo's digits 1,449
       pairs are within 8 bits, 415 of them across labels, and all but a few are distinct images.
    4. Embedding pairs are reported whether or not their pixels confirm them: they are there for
       the edits the pixel check does not follow (heavier crops, flips, colour changes, overlays),
       so ``min_cosine`` is their confirmation and must be set for the backbone (a backbone that
       puts distinct images of one class at 0.95 needs a higher value).

    Parameters
    ----------
    manifest : DataFrame, N rows
        Columns image_uuid (unique), path (absolute), label, split and optionally group.
    phash_max_distance : int
        Largest Hamming distance (of 64 bits) of a candidate pair, 0..32.
    min_pixel_ncc : float
        Smallest :func:`pixel_similarity` of a confirmed pair, in [-1, 1].
    embeddings : array_like, shape (N, D), optional
        Rows aligned with the manifest's.
    min_cosine, k : float, int
        For :func:`embedding_near_pairs`.
    workers : int
        Threads reading and decoding files.
    digests : sequence of str, length N, optional
        A digest of each row's file bytes that the caller already has (the step passes the
        BLAKE2b digests of :func:`cleanloop.lineage.content_digests`, remembered by file stat):
        equal digests make an ``exact`` pair, and the files are not read again to hash them.
    pixels : sequence, length N, optional
        ``pixels[r]``: row r's image as (H, W, 3) uint8 (or (H, W) grayscale), e.g. a
        :class:`cleanloop.imagecache.CacheReader` of the rows' cached squares. The perceptual
        hashes, thumbnails and the boxes the pixel check renders are then computed from these
        pixels, as :func:`perceptual_hashes` and :func:`thumbnails` compute them from a decoded
        file, and no image file is decoded. Give pixels of at least ``PIXELS_MIN_SIDE`` a side
        (smaller ones are magnified by the pixel check's boxes). With ``digests`` too, no image
        file is read but for ``sizes``' headers.
    sizes : sequence of (width, height), length N, optional
        With ``pixels`` that are padded squares (the image cache's): each row's upright size
        (:func:`image_sizes`), so the bars are cut off (:func:`unpadded`) and the rest is hashed and
        compared as the decoded file is. Without them a non-square image is compared with its bars.

    Returns
    -------
    DataFrame
        Columns ``PAIR_COLUMNS`` as :func:`duplicate_pairs`'s, one row per pair:

        * ``exact``: similarity 1.0, method ``sha256`` (``blake2b`` with ``digests``);
        * ``near``: method ``pixels`` (a perceptual-hash or embedding candidate whose pixels are
          confirmed; similarity: the pixel NCC), ``embedding`` (cosine >= min_cosine, pixels not
          confirmed; similarity: the cosine) or ``pixels+embedding`` (both; the larger).

        Sorted by kind (exact first), similarity (descending), image_uuid_a, image_uuid_b. The
        same files always give the same table.

    Raises
    ------
    CleanloopError
        A missing column, unreadable files, mismatched embeddings, or a threshold out of range.
    """
    rows = _rows(manifest)
    if "path" not in manifest.columns:
        raise CleanloopError("manifest has no column path")
    if not -1.0 <= min_pixel_ncc <= 1.0:
        raise CleanloopError(f"min_pixel_ncc={min_pixel_ncc}: choose a correlation in [-1, 1]")
    paths = [str(p) for p in manifest["path"]]
    n = len(rows)
    emb = None
    if embeddings is not None:
        emb = np.asarray(embeddings)
        _check_length("embeddings", len(emb), n)
    if digests is not None:
        content = np.array([str(d) for d in digests], dtype=object)
        _check_length("digests", len(content), n)
    if pixels is not None:
        _check_length("pixels", len(pixels), n)
    if sizes is not None:
        _check_length("sizes", len(sizes), n)
    if digests is None:
        content = content_hashes(paths, workers=workers)
    token = str(next(_pixel_tokens))
    if pixels is not None:
        _pixel_sources[token] = (pixels, sizes)
        paths = [f"{_PIXELS_PREFIX}{token}/{r}/{p}" for r, p in enumerate(paths)]  # resolved by _rgb
    try:
        i, j, _ = hash_near_pairs(perceptual_hashes(paths, workers=workers), max_distance=phash_max_distance)
        near = pd.DataFrame({"i": i, "j": j})
        if emb is not None:
            ei, ej, cos = embedding_near_pairs(emb, min_cosine=min_cosine, k=k)
            near = near.merge(pd.DataFrame({"i": ei, "j": ej, "embedding": cos}), on=["i", "j"], how="outer")
            near = near.sort_values(["i", "j"], kind="stable").reset_index(drop=True)
        near = near[content[near["i"].to_numpy()] != content[near["j"].to_numpy()]]  # exact pairs
        ci, cj = near["i"].to_numpy(np.int64), near["j"].to_numpy(np.int64)
        needed, local = np.unique(np.r_[ci, cj], return_inverse=True)
        thumbs = thumbnails([paths[r] for r in needed], workers=workers)
        score = pixel_similarity(thumbs, local[:len(ci)], local[len(ci):], paths=[paths[r] for r in needed],
                                 workers=workers)
    finally:
        _pixel_sources.pop(token, None)
    near = near.assign(pixels=np.where(score >= min_pixel_ncc, score, np.nan))
    method = "sha256" if digests is None else "blake2b"
    return _pairs_table(rows, _exact_pairs(content, method), _near_pairs(near, content, ("pixels", "embedding")))


# ---------------------------------------------------------------------------------------------
# what the pairs mean


def _pair_rows(pairs: pd.DataFrame, rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Manifest row index of each side of the pairs whose two ids are both in ``rows``."""
    missing = [c for c in ("image_uuid_a", "image_uuid_b") if c not in pairs.columns]
    if missing:
        raise CleanloopError(f"pairs has no column(s) {', '.join(missing)}; make them with duplicate_pairs")
    index = pd.Index(rows["image_uuid"])
    a = index.get_indexer(pairs["image_uuid_a"].astype(str))
    b = index.get_indexer(pairs["image_uuid_b"].astype(str))
    known = (a >= 0) & (b >= 0) & (a != b)
    return a[known].astype(np.int64), b[known].astype(np.int64)


def _train_leaks(a: np.ndarray, b: np.ndarray, rows: pd.DataFrame, other: str):
    """For pairs of one train row and one ``other``-split row: the train row's label, the other row."""
    split = rows["split"].to_numpy()
    a_train = (split[a] == "train") & (split[b] == other)
    b_train = (split[b] == "train") & (split[a] == other)
    train = np.r_[a[a_train], b[b_train]]
    copy = np.r_[b[a_train], a[b_train]]
    return rows["label"].to_numpy()[train], copy


def linked_components(n_rows: int, i, j) -> np.ndarray:
    """Connected component of each row in the graph with edges (i[p], j[p]).

    Parameters
    ----------
    n_rows : int
    i, j : array_like, shape (P,), int
        Row indices of linked pairs.

    Returns
    -------
    np.ndarray, shape (n_rows,), int64
        Component ids 0.. numbered in order of each component's first row; an unlinked row is a
        component of its own.
    """
    i, j = np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64)
    if n_rows == 0:
        return np.zeros(0, dtype=np.int64)
    graph = coo_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(n_rows, n_rows))
    _, labels = connected_components(graph, directed=False)
    # Renumber by first row, whatever order scipy visits components in.
    _, first = np.unique(labels, return_index=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[labels]


def _group_components(rows: pd.DataFrame, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Components over the pairs (a, b) and over shared non-blank original groups."""
    group = rows["group"].to_numpy()
    has = np.flatnonzero(group != "")
    codes, _ = pd.factorize(group[has])
    hub = np.full(codes.max() + 1 if len(codes) else 0, -1, dtype=np.int64)
    hub[codes] = has  # one row of each group (the last written): every member links to it
    return linked_components(len(rows), np.r_[a, has], np.r_[b, hub[codes]])


def merge_groups(manifest: pd.DataFrame, pairs: pd.DataFrame) -> pd.Series:
    """A fold group per row that keeps linked rows together, as well as the original groups.

    Rows are joined when a pair links them or when they share a non-blank ``group``; a blank group
    is the row's own. For the train rows' folds, pass the train rows: pairs naming a row that is
    not in ``manifest`` are ignored, and links are followed through the given rows only.

    Names:

    * a component that is exactly one original group keeps that group's name;
    * any other component (groups joined by a pair, rows with a blank group, alone or linked) is
      named ``<prefix>group:<smallest original group name in it>``, or
      ``<prefix>image:<smallest image_uuid in it>`` when none of its rows has a group.

    The prefix is ``linked:``, lengthened with ``_`` in front until no original group starts with
    it, so a new name never equals an original one; group names are unique to a component and
    image ids to a row, so two components never share a name. The same manifest and pairs always
    give the same names.

    Returns
    -------
    pd.Series, index of ``manifest``, str, name ``group``
    """
    rows = _rows(manifest)
    a, b = _pair_rows(pairs, rows)
    comp = _group_components(rows, a, b)
    group = rows["group"].to_numpy()
    prefix = "linked:"
    while any(g.startswith(prefix) for g in set(group) - {""}):
        prefix = "_" + prefix
    frame = pd.DataFrame({"comp": comp, "group": group, "uuid": rows["image_uuid"].to_numpy()})
    frame["grouped"] = frame["group"] != ""
    per = frame.groupby("comp").agg(uuid=("uuid", "min"), all_grouped=("grouped", "all"))
    named = frame[frame["grouped"]].groupby("comp")["group"]
    per["group"] = named.min().reindex(per.index)
    per["n_groups"] = named.nunique().reindex(per.index, fill_value=0)
    names = np.where(
        per["all_grouped"] & (per["n_groups"] == 1),
        per["group"],  # exactly one original group: unchanged
        np.where(per["group"].notna(), prefix + "group:" + per["group"].fillna(""), prefix + "image:" + per["uuid"]),
    )
    return pd.Series(names[comp], index=manifest.index, name="group", dtype=object)


def leakage_per_class(pairs: pd.DataFrame, manifest: pd.DataFrame, *, classes: Sequence[str]) -> pd.DataFrame:
    """What the pairs leak from each class's training rows into val and test.

    A pair of a train row and a val or test row is counted under the train row's label. Only
    direct pairs count (a test row linked to a train row through a val row is not a train-test
    pair). Splits and labels come from ``manifest``; pairs naming rows not in it are ignored.

    Returns
    -------
    DataFrame, one row per class in the order of ``classes``
        class; n_train (train rows with that label); train_test_pairs, train_val_pairs; and
        test_rows_with_train_copy, val_rows_with_train_copy: distinct test/val rows paired with a
        train row of the class (a row copying train rows of two classes counts under both);
        conflicting_label_pairs: pairs of two train rows with different labels, counted under
        both labels (so the column sums to twice the number of such pairs).

    Raises
    ------
    CleanloopError
        A train row's label is not in ``classes``.
    """
    rows = _rows(manifest)
    classes = [str(c) for c in classes]
    train = rows["split"] == "train"
    unknown = sorted(set(rows.loc[train, "label"]) - set(classes))
    if unknown:
        raise CleanloopError(f"train labels {_listed([repr(u) for u in unknown])} are not among the "
                             f"{len(classes)} classes; "
                             "check the class list against the manifest")
    a, b = _pair_rows(pairs, rows)
    label = rows["label"].to_numpy()
    split = rows["split"].to_numpy()
    table = pd.DataFrame({"class": classes})
    table["n_train"] = table["class"].map(rows.loc[train, "label"].value_counts()).fillna(0)
    for other in ("test", "val"):
        cls, copy = _train_leaks(a, b, rows, other)
        found = pd.DataFrame({"class": cls, "copy": copy})
        table[f"train_{other}_pairs"] = table["class"].map(found["class"].value_counts()).fillna(0)
        rows_with = found.drop_duplicates()["class"].value_counts()
        table[f"{other}_rows_with_train_copy"] = table["class"].map(rows_with).fillna(0)
    both = (split[a] == "train") & (split[b] == "train") & (label[a] != label[b])
    conflicts = pd.Series(np.r_[label[a[both]], label[b[both]]]).value_counts()
    table["conflicting_label_pairs"] = table["class"].map(conflicts).fillna(0)
    counts = list(LEAKAGE_COLUMNS[1:])
    table[counts] = table[counts].astype(np.int64)
    return table[list(LEAKAGE_COLUMNS)]


def conflicting_label_rows(pairs: pd.DataFrame, manifest: pd.DataFrame) -> pd.DataFrame:
    """Train rows in a cluster of duplicates that carries more than one label.

    Clusters are the connected components of the pairs between train rows (near pairs chain: A
    like B like C puts A and C in one cluster). Every row of a cluster with two or more labels is
    listed, as nothing says which label is right.

    Returns
    -------
    DataFrame
        Columns ``CONFLICT_COLUMNS``: image_uuid, given_label, cluster (0.. in order of the
        clusters' smallest image_uuid), cluster_labels (the cluster's labels, sorted, joined by
        ``|``), cluster_size (its train rows). Sorted by cluster, then image_uuid.
    """
    rows = _rows(manifest)
    train = rows[rows["split"] == "train"].reset_index(drop=True)
    a, b = _pair_rows(pairs, train)
    comp = linked_components(len(train), a, b)
    frame = pd.DataFrame({"image_uuid": train["image_uuid"], "given_label": train["label"], "comp": comp})
    by = frame.groupby("comp")
    frame["cluster_size"] = by["image_uuid"].transform("size")
    frame["n_labels"] = by["given_label"].transform("nunique")
    frame = frame[(frame["cluster_size"] > 1) & (frame["n_labels"] > 1)]
    if frame.empty:
        return pd.DataFrame({c: pd.Series(dtype=np.int64 if c in ("cluster", "cluster_size") else object)
                             for c in CONFLICT_COLUMNS})
    by = frame.groupby("comp")
    frame = frame.assign(
        cluster_labels=by["given_label"].transform(lambda s: "|".join(sorted(set(s)))),
        first=by["image_uuid"].transform("min"),
    )
    frame["cluster"] = pd.factorize(frame["first"], sort=True)[0].astype(np.int64)
    frame["cluster_size"] = frame["cluster_size"].astype(np.int64)
    frame = frame.sort_values(["cluster", "image_uuid"], kind="stable")
    return frame[list(CONFLICT_COLUMNS)].reset_index(drop=True)


def summary_metrics(pairs: pd.DataFrame, manifest: pd.DataFrame) -> dict[str, float]:
    """The audit's headline numbers, with MLflow metric keys.

    * ``audit/pairs_exact``, ``audit/pairs_near``: rows of ``pairs`` of each kind;
    * ``audit/leaks/train_test``, ``audit/leaks/train_val``: pairs of a train row and a test (val) row;
    * ``audit/test_rows_with_train_copy``: distinct test rows paired with a train row;
    * ``audit/groups_linked``: original non-blank groups whose rows are joined, through pairs
      anywhere in the manifest, to a row outside the group;
    * ``audit/conflicting_label_clusters``, ``audit/conflicting_label_rows``: from
      :func:`conflicting_label_rows`.

    Splits come from ``manifest``; pairs naming rows not in it count only in the pair counts.
    """
    rows = _rows(manifest)
    a, b = _pair_rows(pairs, rows)
    kind = pairs["kind"].astype(str) if "kind" in pairs.columns else pd.Series(dtype=str)
    _, test_copy = _train_leaks(a, b, rows, "test")
    _, val_copy = _train_leaks(a, b, rows, "val")

    comp = _group_components(rows, a, b)
    frame = pd.DataFrame({"comp": comp, "group": rows["group"].to_numpy()})
    comp_size = frame.groupby("comp")["group"].transform("size")
    group_size = frame.groupby("group")["group"].transform("size")
    grouped = frame["group"] != ""
    groups_linked = frame.loc[grouped & (comp_size > group_size), "group"].nunique()

    conflicts = conflicting_label_rows(pairs, manifest)
    return {
        "audit/pairs_exact": float((kind == "exact").sum()),
        "audit/pairs_near": float((kind == "near").sum()),
        "audit/leaks/train_test": float(len(test_copy)),
        "audit/leaks/train_val": float(len(val_copy)),
        "audit/test_rows_with_train_copy": float(len(np.unique(test_copy))),
        "audit/groups_linked": float(groups_linked),
        "audit/conflicting_label_clusters": float(conflicts["cluster"].nunique()),
        "audit/conflicting_label_rows": float(len(conflicts)),
    }

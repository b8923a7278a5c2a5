"""The cleaning maths of the ``flag`` step: check out-of-fold ``pred_probs``, find label issues and
outliers with cleanlab, summarise them per class, and draw a montage of the candidates.

Everything here is a pure function (arrays in, arrays or DataFrames out) except
``render_montage``, which writes the one PNG it is given a path for. In arrays a class is its
index 0..K-1; wherever a person reads it, it is its name. N is the number of rows, K the number
of classes. Problems the user can fix raise :class:`~cleanloop.errors.CleanloopError` with one
line saying what is wrong and what to do.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from cleanlab.count import _reduce_issues, calibrate_confident_joint
from cleanlab.filter import _keep_at_least_n_per_class, find_label_issues
from cleanlab.internal.constants import CONFIDENT_THRESHOLDS_LOWER_BOUND
from cleanlab.outlier import OutOfDistribution
from cleanlab.rank import get_label_quality_scores
from PIL import Image, ImageDraw, ImageFont, ImageOps

from cleanloop.errors import CleanloopError
from cleanloop.io import write_atomic

# cleanlab's own choices (cleanlab.filter.find_label_issues, cleanlab.rank.get_label_quality_scores).
FILTER_BY = (
    "prune_by_noise_rate",
    "prune_by_class",
    "both",
    "confident_learning",
    "predicted_neq_given",
    "low_normalized_margin",
    "low_self_confidence",
)
RANK_BY = ("self_confidence", "normalized_margin", "confidence_weighted_entropy")
# The filter_by values whose flags come from cleanlab's prune count matrix (the calibrated confident
# joint); frac_noise and min_examples_per_class apply to these only.
PRUNE_FILTERS = ("prune_by_noise_rate", "prune_by_class", "both")
# cleanlab's own warning when frac_noise is given to a filter that ignores it (filter.find_label_issues).
_FRAC_NOISE_IGNORED = (
    "frac_noise and num_to_remove_per_class parameters are only supported for filter_by 'prune_by_noise_rate', "
    "'prune_by_class', and 'both'. They are not supported for methods 'confident_learning', "
    "'predicted_neq_given', 'low_normalized_margin' or 'low_self_confidence'."
)

# find_issues streams pred_probs in row chunks above this many cells (N x K), to the same result. In
# memory it peaks at about BYTES_PER_CELL bytes per cell above its input (float64 copies and cleanlab's
# temporaries; bench/RESULTS.md, B2), so 2**28 cells (268M: 268k rows x 1000 classes, or 10.7M rows x 25) need
# about 6 GiB, a quarter of a 24 GiB machine; ImageNet's 1.28M x 1000 would need about 30 GiB.
BATCHED_ABOVE_CELLS = 2**28
BYTES_PER_CELL = 25
# Cells per chunk when streaming (16k rows x 1000 classes): the chunk's float64 copy and two temporaries
# of its size, about 0.45 GiB of heap whatever N is, plus about 100 bytes per row (bench/RESULTS.md, B2).
BATCH_CELLS = 2**24

# How far outside [0, 1] a probability may stray (float32 softmax/sigmoid rounding) before it is
# an error rather than noise; values within it are clipped into [0, 1].
PROB_TOLERANCE = 1e-6
# Guards ceil(top_fraction * N) against float error: 0.1 * 30 is 3.0000000000000004, not 3.
_FRACTION_EPS = 1e-9

PRED_PROBS_FIX = "re-run `cleanloop oof`, or fix the file given as flag.oof"

# Montage layout, in pixels.
MONTAGE_PAD = 6  # space around each thumbnail and its caption
MONTAGE_BACKGROUND = (255, 255, 255)
MONTAGE_TEXT = (20, 20, 20)
MONTAGE_PLACEHOLDER = (190, 190, 190)  # unreadable image
MONTAGE_BORDER = (200, 200, 200)
MONTAGE_MARK = (230, 110, 0)  # frame of a marked cell (the flag step marks outliers) and its legend swatch
MONTAGE_MARK_WIDTH = 4  # inside the cell's padding: it never covers the image or the caption
MONTAGE_LEGEND_BACKGROUND = (241, 243, 245)  # the legend band under the grid
MONTAGE_LEGEND_MIN_WIDTH = 420  # a grid of one or two cells is widened so the legend stays readable


# ---------------------------------------------------------------------------------------------
# pred_probs


def check_pred_probs(
    pred_probs,
    *,
    n_rows: int,
    n_classes: int,
    source: str = "pred_probs",
    uuids: Sequence[str] | None = None,
    fix: str = PRED_PROBS_FIX,
) -> np.ndarray:
    """Validate predicted probabilities and return them as float64, clipped into [0, 1].

    Rows need not sum to 1 (a sigmoid head's do not); see :func:`normalise_rows`.

    Parameters
    ----------
    pred_probs : array_like, shape (N, K)
        One row per example, one column per class.
    n_rows, n_classes : int
        The expected N and K.
    source : str
        What the array came from (e.g. the file name), to start the error message.
    uuids : sequence of str, shape (N,), optional
        ``image_uuid`` of each row, so that an error names the first bad row.
    fix : str
        What the user should do, ending the error message.

    Returns
    -------
    np.ndarray, shape (N, K), float64

    Raises
    ------
    CleanloopError
        Wrong shape, non-numeric values, NaN or infinity, values below 0 or above 1
        (beyond ``PROB_TOLERANCE``).
    """
    where = "pred_probs" if source == "pred_probs" else f"{source}: pred_probs"
    try:
        probs = np.array(pred_probs, dtype=np.float64)  # always a copy: clipped in place below
    except (TypeError, ValueError) as e:
        raise CleanloopError(f"{where} is not a numeric array ({e}); {fix}") from e
    if probs.ndim != 2 or probs.shape != (n_rows, n_classes):
        raise CleanloopError(
            f"{where} has shape {probs.shape}, expected ({n_rows}, {n_classes}) (N rows x K classes); {fix}"
        )

    _check_values(probs, where=where, fix=fix, uuids=uuids, n_rows=n_rows)
    return np.clip(probs, 0.0, 1.0, out=probs)


def _check_values(probs: np.ndarray, *, where: str, fix: str, uuids=None, n_rows: int, first_row: int = 0) -> None:
    """Raise on NaN, infinity or values outside [0, 1] (beyond ``PROB_TOLERANCE``), naming the first bad row.

    ``probs`` may be the chunk of an ``n_rows``-row array that starts at row ``first_row``.
    """
    if probs.size == 0:
        return
    lo, hi = float(probs.min()), float(probs.max())  # a NaN makes both NaN, failing the test below
    if -PROB_TOLERANCE <= lo and hi <= 1 + PROB_TOLERANCE:
        return  # the usual case: two cheap passes, no N x K masks

    def first(bad_rows: np.ndarray) -> str:
        i = first_row + int(np.flatnonzero(bad_rows)[0])
        if uuids is not None and len(uuids) == n_rows:
            return f"first image_uuid {str(uuids[i])!r} (row {i})"
        return f"first row {i}"

    for problem, bad in (
        ("NaN", np.isnan(probs)),
        ("infinite values", np.isinf(probs)),
        ("negative values", probs < -PROB_TOLERANCE),
        ("values above 1", probs > 1 + PROB_TOLERANCE),
    ):
        bad_rows = bad.any(axis=1)
        if bad_rows.any():
            raise CleanloopError(
                f"{where} has {problem} in {int(bad_rows.sum())} row(s), {first(bad_rows)}; {fix}"
            )


def normalise_rows(pred_probs) -> np.ndarray:
    """Divide each row by its sum, so that a sigmoid head's scores become a distribution.

    Parameters
    ----------
    pred_probs : array_like, shape (N, K)
        Non-negative scores (check them first with :func:`check_pred_probs`).

    Returns
    -------
    np.ndarray, shape (N, K), float64
        Rows summing to 1; a row of zeros becomes uniform, 1/K each (the model has no preference).
    """
    probs = np.asarray(pred_probs, dtype=np.float64)
    sums = probs.sum(axis=1, keepdims=True)
    zero = sums[:, 0] <= 0
    out = np.divide(probs, sums, out=np.zeros_like(probs), where=sums > 0)
    out[zero] = 1.0 / probs.shape[1]
    return out


# ---------------------------------------------------------------------------------------------
# label issues and outliers


def _check_labels(labels, *, n_rows: int, n_classes: int) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1 or len(arr) != n_rows:
        raise CleanloopError(
            f"labels has shape {arr.shape}, expected ({n_rows},) (one class index per pred_probs row)"
        )
    if arr.dtype.kind not in "iu":
        if arr.dtype.kind != "f" or not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise CleanloopError(
                f"labels must be class indices 0..{n_classes - 1} (got dtype {arr.dtype}); "
                "map class names to their index in the class order first"
            )
    arr = arr.astype(np.int64)
    out = (arr < 0) | (arr >= n_classes)
    if out.any():
        i = int(np.flatnonzero(out)[0])
        raise CleanloopError(
            f"labels has {int(out.sum())} value(s) outside 0..{n_classes - 1}, first {int(arr[i])} at row {i}; "
            "pred_probs needs one column per class in the class order"
        )
    return arr


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise CleanloopError(f"unknown {name}={value!r}; use one of {', '.join(allowed)}")


def find_issues(
    labels,
    pred_probs,
    *,
    filter_by: str = "prune_by_noise_rate",
    frac_noise: float = 1.0,
    min_examples_per_class: int = 1,
    n_jobs: int = 1,
    rank_by: str = "self_confidence",
    batched: bool | None = None,
) -> pd.DataFrame:
    """Score every row's label and flag the likely mislabelled ones, with cleanlab.

    In memory (the default below ``BATCHED_ABOVE_CELLS``) this is cleanlab's
    ``filter.find_label_issues`` and ``rank.get_label_quality_scores`` on float64 ``pred_probs``.
    Batched, ``pred_probs`` (e.g. a ``np.load(..., mmap_mode="r")`` memmap) is read in row chunks of
    about ``BATCH_CELLS`` cells, never whole, and the same steps are computed pass by pass (see
    ``_find_issues_batched``): the result equals the in-memory one (flags, scores, predictions) for
    every ``filter_by``, ``frac_noise`` and ``min_examples_per_class``. Batched keeps a few values per
    row and K x K counts in memory; it reads ``pred_probs`` up to three times (``prune_by_noise_rate``
    and ``both``; two for the other filters, one for ``predicted_neq_given``).

    Parameters
    ----------
    labels : array_like of int, shape (N,)
        Given class index of each row, 0..K-1.
    pred_probs : array_like, shape (N, K)
        Out-of-fold predicted probabilities (rows summing to 1).
    filter_by : str
        cleanlab's ``filter_by``: one of ``FILTER_BY``.
    frac_noise : float in (0, 1]
        cleanlab's ``frac_noise``: flag only this fraction of the estimated issues.
    min_examples_per_class : int
        cleanlab's ``min_examples_per_class``: never flag a class below this many rows.
    n_jobs : int
        cleanlab's ``n_jobs`` (processes; 1 keeps it in this process). In memory only: batched
        always runs in this process (its result does not depend on it).
    rank_by : str
        cleanlab's ``method`` for the label quality score: one of ``RANK_BY``.
    batched : bool or None
        None: batched when N x K > ``BATCHED_ABOVE_CELLS``. True / False: always / never.

    Returns
    -------
    pd.DataFrame, N rows, in input order
        ``predicted`` (int, argmax of pred_probs), ``label_quality`` (float in [0, 1],
        lower = more likely mislabelled), ``is_label_issue`` (bool).
    """
    _check_choice("filter_by", filter_by, FILTER_BY)
    _check_choice("rank_by", rank_by, RANK_BY)
    if not 0.0 < frac_noise <= 1.0:
        raise CleanloopError(f"frac_noise={frac_noise} must be in (0, 1]")
    if min_examples_per_class < 0:
        raise CleanloopError(f"min_examples_per_class={min_examples_per_class} must be >= 0")
    if n_jobs < 1:
        raise CleanloopError(f"n_jobs={n_jobs} must be >= 1")
    probs = np.asarray(pred_probs)
    if probs.ndim != 2:
        raise CleanloopError(f"pred_probs has shape {probs.shape}, expected (N rows, K classes)")
    n, k = probs.shape
    if n == 0:
        raise CleanloopError("no rows to score: pred_probs is empty")
    if k < 2:
        raise CleanloopError(f"pred_probs has {k} column(s); label issues need at least 2 classes")
    labels_arr = _check_labels(labels, n_rows=n, n_classes=k)
    if batched is None:
        batched = n * k > BATCHED_ABOVE_CELLS
    if batched:
        return _find_issues_batched(labels_arr, probs, filter_by=filter_by, frac_noise=frac_noise,
                                    min_examples_per_class=min_examples_per_class, rank_by=rank_by)
    probs = check_pred_probs(probs, n_rows=n, n_classes=k)

    is_issue = find_label_issues(
        labels_arr,
        probs,
        filter_by=filter_by,
        frac_noise=frac_noise,
        min_examples_per_class=min_examples_per_class,
        n_jobs=n_jobs,
    )
    quality = get_label_quality_scores(labels_arr, probs, method=rank_by)
    return pd.DataFrame(
        {
            "predicted": probs.argmax(axis=1).astype(np.int64),
            "label_quality": np.asarray(quality, dtype=np.float64),
            "is_label_issue": np.asarray(is_issue, dtype=bool),
        }
    )


def _find_issues_batched(
    labels: np.ndarray,
    pred_probs,
    *,
    filter_by: str,
    frac_noise: float,
    min_examples_per_class: int,
    rank_by: str,
) -> pd.DataFrame:
    """``find_issues`` reading ``pred_probs`` in row chunks of about ``BATCH_CELLS`` cells.

    cleanlab's ``filter.find_label_issues`` (and ``count.compute_confident_joint``) step by step,
    on each chunk converted to float64 and clipped as :func:`check_pred_probs` converts the whole
    array, so every number is the one the in-memory path computes and the result is equal:

    1. Every row: check its values; ``predicted``, ``label_quality``, its self-confidence
       ``p[y]``, whether ``y`` is within 1e-6 of its argmax (``_reduce_issues``: never flagged),
       and the score a ``low_*`` filter ranks by. The per-class thresholds are then the mean
       self-confidence of each class, taken over the kept vector in row order, so that numpy
       sums it in the same order as cleanlab (a sum of chunk sums would round differently).
    2. Given the thresholds, the confident joint is a count, added up chunk by chunk; also which
       rows fall off its diagonal (``confident_learning``, and the number of issues ``low_*`` flag).
       It is calibrated and turned into the prune count matrix by cleanlab's own functions.
    3. ``prune_by_noise_rate`` / ``both``: for each (given k, true j) with ``need`` rows to prune,
       the ``need + 1`` rows of class k with the largest margin ``p[j] - p[k]``, kept by a bounded
       selection merged chunk by chunk (ties by row). If the last of ``need`` and the extra one
       have different margins, the ``need`` rows are the ones cleanlab picks, whatever its sort
       does with ties. If equal, cleanlab's unstable ``argsort`` decides: that pair's margin column
       (one value per row of class k) is read and sorted exactly as cleanlab sorts it.

    ``prune_by_class`` sorts each class's self-confidences as cleanlab does, ``low_*`` all N
    scores; both are vectors of N values, as are the outputs.
    """
    n, k = pred_probs.shape
    if pred_probs.dtype.kind not in "biuf":
        raise CleanloopError(f"pred_probs is not a numeric array (dtype {pred_probs.dtype}); {PRED_PROBS_FIX}")
    if filter_by not in PRUNE_FILTERS and frac_noise != 1.0:
        warnings.warn(_FRAC_NOISE_IGNORED, UserWarning, stacklevel=3)
    rows = max(1, BATCH_CELLS // k)
    chunks = [(start, min(n, start + rows)) for start in range(0, n, rows)]

    def read(start: int, stop: int, *, check: bool = False) -> np.ndarray:
        probs = np.array(pred_probs[start:stop], dtype=np.float64)  # a copy, as check_pred_probs makes
        if check:
            _check_values(probs, where="pred_probs", fix=PRED_PROBS_FIX, n_rows=n, first_row=start)
        return np.clip(probs, 0.0, 1.0, out=probs)

    low = filter_by.startswith("low_")
    predicted = np.empty(n, dtype=np.int64)
    quality = np.empty(n, dtype=np.float64)
    self_conf = np.empty(n, dtype=np.float64)
    given_is_max = np.empty(n, dtype=bool)
    score = np.empty(n, dtype=np.float64) if low else None
    for start, stop in chunks:  # pass 1: values, and everything that depends on its own row only
        probs, y = read(start, stop, check=True), labels[start:stop]
        predicted[start:stop] = probs.argmax(axis=1)
        self_conf[start:stop] = probs[np.arange(stop - start), y]
        quality[start:stop] = get_label_quality_scores(y, probs, method=rank_by)
        given_is_max[start:stop] = _reduce_issues(pred_probs=probs, labels=y)
        if low:
            score[start:stop] = get_label_quality_scores(y, probs, method=filter_by[4:], adjust_pred_probs=False)
    columns = {"predicted": predicted, "label_quality": quality}

    if filter_by == "predicted_neq_given":
        return pd.DataFrame({**columns, "is_label_issue": (predicted != labels) & ~given_is_max})

    counts = np.bincount(labels, minlength=k)
    by_class = np.argsort(labels, kind="stable")  # the rows of each class, in row order
    class_start = np.concatenate(([0], np.cumsum(counts)))

    def rows_of(c: int) -> np.ndarray:
        return by_class[class_start[c]:class_start[c + 1]]

    # count.get_confident_thresholds: a class without rows gets 2 (BIG_VALUE), never reached.
    thresholds = np.clip([np.mean(self_conf[rows_of(c)]) if counts[c] else 2 for c in range(k)],
                         a_min=CONFIDENT_THRESHOLDS_LOWER_BOUND, a_max=None)
    cutoff = thresholds - 1e-6
    pairs = np.zeros(k * k, dtype=np.int64)  # [true guess, given], as sklearn's confusion_matrix lays it out
    off_diagonal = np.empty(n, dtype=bool)
    for start, stop in chunks:  # pass 2: the confident joint (count.compute_confident_joint)
        probs, y = read(start, stop), labels[start:stop]
        confident = probs >= cutoff
        n_confident = confident.sum(axis=1)
        guess = np.where(n_confident > 1, predicted[start:stop], confident.argmax(axis=1))
        some = n_confident > 0
        pairs += np.bincount(guess[some] * k + y[some], minlength=k * k)
        off_diagonal[start:stop] = some & (guess != y)
    is_issue = np.zeros(n, dtype=bool)

    if low:  # count.num_label_issues ("off_diagonal"), then the lowest scores
        is_issue[np.argsort(score)[: int(np.sum(off_diagonal & ~given_is_max))]] = True
        return pd.DataFrame({**columns, "is_label_issue": is_issue})
    if filter_by == "confident_learning":
        is_issue = off_diagonal
    else:
        # The transposed C-ordered array cleanlab gets from confusion_matrix(...).T: its calibration
        # sums in memory order, so the layout is kept too.
        joint = pairs.reshape(k, k).T if pairs.any() else np.zeros((k, k), dtype=int)
        np.fill_diagonal(joint, joint.diagonal().clip(min=1))
        joint = calibrate_confident_joint(joint, labels)
        prune = _keep_at_least_n_per_class(prune_count_matrix=joint.T, n=min_examples_per_class,
                                           frac_noise=frac_noise)
        # cleanlab skips (with a warning) a class of min_examples_per_class rows or fewer, and
        # drops the mask of a class of one row.
        few = counts <= min_examples_per_class
        eligible = ~few & (counts > 1)
        if filter_by in ("prune_by_class", "both"):
            for c in np.flatnonzero(few):
                warnings.warn(f"May not flag all label issues in class: {c}, it has too few examples "
                              "(see argument: `min_examples_per_class`)", UserWarning, stacklevel=3)
            for c in np.flatnonzero(eligible):
                num_issues, members = counts[c] - prune[c, c], rows_of(c)
                if num_issues >= 1:  # the lowest self-confidences, by cleanlab's (unstable) argsort
                    is_issue[members[np.argsort(self_conf[members])[:num_issues]]] = True
        if filter_by in ("prune_by_noise_rate", "both"):
            for c in np.flatnonzero(few):
                warnings.warn(f"May not flag all label issues in class: {c}, it has too few examples "
                              "(see `min_examples_per_class` argument)", UserWarning, stacklevel=3)
            need = np.where(eligible[:, None], prune.T, 0)  # need[c, j]: rows of given c to flag as j
            np.fill_diagonal(need, 0)
            by_noise = _prune_by_noise_rate(pred_probs, labels, self_conf, np.maximum(need, 0), chunks,
                                            read=read, rows_of=rows_of)
            is_issue = by_noise & is_issue if filter_by == "both" else by_noise
    is_issue &= ~given_is_max
    return pd.DataFrame({**columns, "is_label_issue": is_issue})


def _prune_by_noise_rate(pred_probs, labels, self_conf, need, chunks, *, read, rows_of) -> np.ndarray:
    """cleanlab's ``_prune_by_count`` over row chunks: per (given c, true j), the ``need[c, j]`` rows of
    class c with the largest margin ``p[j] - p[c]``; the mask of every row so picked.

    Keeps ``need + 1`` candidates per pair in one sorted run (pair, margin descending, row); a new
    chunk's cells enter only above the pair's current last candidate (an equal margin in a later
    row ranks below it), so each merge sorts few more than the kept rows.
    """
    n, k = pred_probs.shape
    keep = np.where(need > 0, need + 1, 0).ravel()
    # floor[c, j]: a cell must beat it to be a candidate; +inf for the pairs with nothing to prune.
    floor = np.where(need > 0, -np.inf, np.inf)
    pair = np.empty(0, dtype=np.int64)
    margin = np.empty(0, dtype=np.float64)
    row = np.empty(0, dtype=np.int64)
    rank = np.empty(0, dtype=np.int64)
    for start, stop in chunks:  # pass 3
        y = labels[start:stop]
        probs = read(start, stop)
        probs -= self_conf[start:stop, None]  # p[j] - p[y], the same subtraction cleanlab does
        r, j = np.nonzero(probs > floor[y])
        if not r.size:
            continue
        pair = np.concatenate((pair, y[r] * k + j))
        margin = np.concatenate((margin, probs[r, j]))
        row = np.concatenate((row, start + r))
        order = np.lexsort((row, -margin, pair))
        pair, margin, row = pair[order], margin[order], row[order]
        first = np.flatnonzero(np.r_[True, pair[1:] != pair[:-1]])
        rank = np.arange(len(pair)) - np.repeat(first, np.diff(np.r_[first, len(pair)]))
        kept = rank < keep[pair]
        pair, margin, row, rank = pair[kept], margin[kept], row[kept], rank[kept]
        last = rank == keep[pair] - 1  # the pair is full: later cells must beat its last candidate
        floor.ravel()[pair[last]] = margin[last]

    is_issue = np.zeros(n, dtype=bool)
    picked = rank < keep[pair] - 1
    extra = np.flatnonzero(rank == keep[pair] - 1)  # a pair's need+1-th candidate, after its need-th
    tied = extra[margin[extra] == margin[extra - 1]]
    is_issue[row[picked & ~np.isin(pair, pair[tied])]] = True
    for p in pair[tied]:  # the cut falls among equal margins: sort the pair's column as cleanlab does
        c, j = divmod(int(p), k)
        members = rows_of(c)
        column = np.clip(np.asarray(pred_probs[members, j], dtype=np.float64), 0.0, 1.0)
        is_issue[members[np.argsort(-(column - self_conf[members]))[: need[c, j]]]] = True
    return is_issue


def outlier_scores(pred_probs, *, labels=None, features=None) -> np.ndarray:
    """How atypical each row is, with ``cleanlab.outlier.OutOfDistribution``: higher = more outlying.

    With ``features`` (e.g. image embeddings) the score grows with the mean distance to the
    row's k nearest neighbours (cleanlab uses cosine distance above 3 feature dimensions, so
    direction matters, not length). Without, it grows with the entropy of ``pred_probs``,
    adjusted by cleanlab's per-class confidence thresholds when ``labels`` are given.

    Parameters
    ----------
    pred_probs : array_like, shape (N, K)
    labels : array_like of int, shape (N,), optional
    features : array_like, shape (N, M), optional

    Returns
    -------
    np.ndarray, shape (N,), float64 in [0, 1]
        ``1 - cleanlab's score`` (cleanlab's is lower = more outlying). Fewer than 2 rows: zeros.
    """
    probs = np.asarray(pred_probs, dtype=np.float64)
    if probs.ndim != 2:
        raise CleanloopError(f"pred_probs has shape {probs.shape}, expected (N rows, K classes)")
    n = len(probs)
    if features is not None:
        feats = np.asarray(features, dtype=np.float64)
        if feats.ndim != 2 or len(feats) != n:
            raise CleanloopError(
                f"features has shape {feats.shape}, expected ({n}, M): one embedding per pred_probs row"
            )
        if not np.isfinite(feats).all():
            raise CleanloopError("features has NaN or infinite values; re-compute the embeddings")
    if n < 2:  # no neighbours, no distribution: nothing is an outlier
        return np.zeros(n)

    with warnings.catch_warnings():
        # cleanlab warns that nothing needed fitting when it has no labels to adjust by; expected here.
        warnings.filterwarnings("ignore", message="No estimates need to be", category=UserWarning)
        if features is not None:
            scores = OutOfDistribution().fit_score(features=feats, verbose=False)
        elif labels is not None:
            labels_arr = _check_labels(labels, n_rows=n, n_classes=probs.shape[1])
            scores = OutOfDistribution().fit_score(pred_probs=probs, labels=labels_arr, verbose=False)
        else:  # cleanlab's default adjusts by thresholds fitted from labels; without them, plain entropy
            ood = OutOfDistribution(params={"adjust_pred_probs": False})
            scores = ood.fit_score(pred_probs=probs, verbose=False)
    return 1.0 - np.asarray(scores, dtype=np.float64)


def mark_outliers(scores, *, top_fraction: float) -> np.ndarray:
    """Mark the ``ceil(top_fraction * N)`` highest outlier scores (at least 1 when top_fraction > 0).

    Parameters
    ----------
    scores : array_like, shape (N,)
        Outlier scores, higher = more outlying (:func:`outlier_scores`).
    top_fraction : float in [0, 1]

    Returns
    -------
    np.ndarray of bool, shape (N,)
        Ties are broken by row order: the earlier row is marked first.
    """
    if not 0.0 <= top_fraction <= 1.0:
        raise CleanloopError(f"top_fraction={top_fraction} must be in [0, 1] (a fraction of the rows)")
    s = np.asarray(scores, dtype=np.float64)
    n = len(s)
    count = 0 if top_fraction == 0 else max(1, math.ceil(top_fraction * n - _FRACTION_EPS))
    count = min(count, n)
    order = np.argsort(-s, kind="stable")  # stable sort: equal scores keep row order
    marked = np.zeros(n, dtype=bool)
    marked[order[:count]] = True
    return marked


# ---------------------------------------------------------------------------------------------
# summaries


def _same_length(**arrays) -> int:
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"{name} has {n}" for name, n in lengths.items())
        raise CleanloopError(f"arrays of different lengths: {shown}; pass one value per row")
    return next(iter(lengths.values()))


def issues_per_class(given_labels: Sequence[str], is_issue, classes: Sequence[str]) -> pd.DataFrame:
    """Rows and flagged rows per given class.

    Parameters
    ----------
    given_labels : sequence of str, shape (N,)
        Given class name of each row.
    is_issue : array_like of bool, shape (N,)
    classes : sequence of str, shape (K,)
        Every class appears in the result, even with no rows.

    Returns
    -------
    pd.DataFrame, K rows
        ``class, n_rows, n_issues, issue_rate`` (issue_rate = n_issues / n_rows, 0 without rows),
        sorted by issue_rate descending, then class.
    """
    _same_length(given_labels=given_labels, is_issue=is_issue)
    flagged = np.asarray(is_issue, dtype=bool)
    classes = [str(c) for c in classes]
    # Count by distinct value (a vectorised factorize), then name each value as str(value): no
    # Python-level pass over the N rows.
    given = given_labels if isinstance(given_labels, pd.Series) else np.asarray(given_labels, dtype=object)
    codes, values = pd.factorize(given, use_na_sentinel=False)
    names, name_of_value = np.unique(np.array([str(v) for v in values], dtype=object), return_inverse=True)
    names, name_of_value = names.tolist(), name_of_value.reshape(-1)
    missing = np.asarray(pd.isna(values), dtype=bool)
    unknown = sorted({names[i] for i in name_of_value[~missing]} - set(classes))
    if missing.any():  # a missing label (None, NaN) is never a class name
        unknown = [math.nan, *unknown]
    if unknown:
        raise CleanloopError(
            f"given label(s) {', '.join(map(repr, unknown[:10]))} are not in the class order; "
            "add them to data.classes or fix the labels"
        )
    row_name = name_of_value[codes]
    count = dict(zip(names, np.bincount(row_name, minlength=len(names)).tolist(), strict=True))
    flagged_count = dict(zip(names, np.bincount(row_name[flagged], minlength=len(names)).tolist(), strict=True))
    out = pd.DataFrame(
        {
            "class": classes,
            "n_rows": np.array([count.get(c, 0) for c in classes], dtype=np.int64),
            "n_issues": np.array([flagged_count.get(c, 0) for c in classes], dtype=np.int64),
        }
    )
    rows = out["n_rows"].to_numpy()
    out["issue_rate"] = np.divide(
        out["n_issues"].to_numpy(dtype=np.float64), rows, out=np.zeros(len(out)), where=rows > 0
    )
    return out.sort_values(["issue_rate", "class"], ascending=[False, True], kind="stable").reset_index(
        drop=True
    )


def _flagged_values(values, flagged: np.ndarray) -> np.ndarray:
    """``values[flagged]`` as an object array; a Series is indexed first, so only flagged rows are converted."""
    if isinstance(values, pd.Series):
        return values[flagged].to_numpy(dtype=object)
    return np.asarray(values, dtype=object)[flagged]


def issue_confusions(given_labels: Sequence[str], predicted_labels: Sequence[str], is_issue) -> pd.DataFrame:
    """Which given class the flagged rows were predicted as.

    Parameters
    ----------
    given_labels, predicted_labels : sequence of str, shape (N,)
    is_issue : array_like of bool, shape (N,)

    Returns
    -------
    pd.DataFrame
        ``given_label, predicted_label, count`` over the flagged rows only, one row per pair
        seen, sorted by count descending, then given_label, predicted_label.
    """
    _same_length(given_labels=given_labels, predicted_labels=predicted_labels, is_issue=is_issue)
    flagged = np.asarray(is_issue, dtype=bool)
    pairs = pd.DataFrame(
        {
            "given_label": _flagged_values(given_labels, flagged).astype(str),
            "predicted_label": _flagged_values(predicted_labels, flagged).astype(str),
        }
    )
    counts = pairs.groupby(["given_label", "predicted_label"]).size().rename("count").reset_index()
    counts["count"] = counts["count"].astype(np.int64)
    return counts.sort_values(
        ["count", "given_label", "predicted_label"], ascending=[False, True, True], kind="stable"
    ).reset_index(drop=True)


def flag_scores(flagged, truly_bad) -> dict:
    """Precision and recall of the flags against a known truth (the demo's ground truth).

    Parameters
    ----------
    flagged, truly_bad : array_like of bool, shape (N,)

    Returns
    -------
    dict
        ``precision`` (0 when nothing is flagged), ``recall`` (0 when nothing is bad),
        ``n_flagged``, ``n_bad``, ``true_positives``; plain Python numbers, ready for JSON.
    """
    _same_length(flagged=flagged, truly_bad=truly_bad)
    f = np.asarray(flagged, dtype=bool)
    b = np.asarray(truly_bad, dtype=bool)
    tp, n_flagged, n_bad = int((f & b).sum()), int(f.sum()), int(b.sum())
    return {
        "precision": tp / n_flagged if n_flagged else 0.0,
        "recall": tp / n_bad if n_bad else 0.0,
        "n_flagged": n_flagged,
        "n_bad": n_bad,
        "true_positives": tp,
    }


# ---------------------------------------------------------------------------------------------
# montage


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # scalable font: Pillow >= 10.1 with FreeType
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _text_width(draw: ImageDraw.ImageDraw, text: str, font) -> float:
    return draw.textlength(text, font=font)


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: float) -> str:
    """``text``, cut with an ellipsis if it is wider than ``width``."""
    if _text_width(draw, text, font) <= width:
        return text
    while text and _text_width(draw, text + "…", font) > width:
        text = text[:-1]
    return text + "…"


def _thumbnail(path: str, thumb: int, font) -> Image.Image:
    """The image fitted into a ``thumb`` square (pixel art, e.g. 8x8 digits, stays crisp)."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode.startswith(("I", "F")):  # 16-bit/float greyscale: convert("RGB") would saturate
                a = np.asarray(im, dtype=np.float64)
                span = float(a.max() - a.min()) or 1.0
                im = Image.fromarray(((a - a.min()) / span * 255).astype(np.uint8))
            im = im.convert("RGB")
        scale = thumb / max(im.size)
        resample = Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.LANCZOS
        im = ImageOps.contain(im, (thumb, thumb), method=resample)
        tile = Image.new("RGB", (thumb, thumb), MONTAGE_BACKGROUND)
        tile.paste(im, ((thumb - im.width) // 2, (thumb - im.height) // 2))
    except Exception:  # any unreadable file (missing, truncated, not an image): a grey tile, never a crash
        tile = Image.new("RGB", (thumb, thumb), MONTAGE_PLACEHOLDER)
        draw = ImageDraw.Draw(tile)
        draw.text(
            (thumb / 2, thumb / 2),
            _fit(draw, "unreadable", font, thumb - 4),
            fill=MONTAGE_TEXT,
            font=font,
            anchor="mm",
        )
    ImageDraw.Draw(tile).rectangle([0, 0, thumb - 1, thumb - 1], outline=MONTAGE_BORDER)
    return tile


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: float) -> list[str]:
    """``text`` broken at spaces into lines no wider than ``width`` (a longer word is cut with an ellipsis)."""
    out: list[str] = []
    line = ""
    for word in text.split():
        trial = f"{line} {word}" if line else word
        if line and _text_width(draw, trial, font) > width:
            out.append(line)
            trial = word
        line = trial
    out.append(line)
    return [_fit(draw, x, font, width) for x in out]


def _legend_lines(draw, legend: Sequence[str], mark_label: str, font, width: float, line_h: int):
    """The legend band's lines as (indent, text, swatch?): ``legend``, then the mark's line after a swatch."""
    out: list[tuple[int, str, bool]] = []
    for text in legend:
        out.extend((0, line, False) for line in _wrap(draw, str(text), font, width))
    if mark_label:
        indent = line_h + 2
        for j, line in enumerate(_wrap(draw, mark_label, font, width - indent)):
            out.append((indent, line, j == 0))
    return out


def render_montage(
    paths: Sequence[str],
    captions: Sequence[str],
    out_path: str | os.PathLike,
    *,
    columns: int = 10,
    thumb: int = 96,
    marked: Sequence[bool] | None = None,
    mark_label: str = "",
    legend: Sequence[str] = (),
    empty: str = "no flagged rows",
) -> Path:
    """Draw the images in a grid, each captioned underneath, and write it as a PNG (atomically).

    Parameters
    ----------
    paths : sequence of str, shape (n,)
        Image files; one that cannot be read gets a grey "unreadable" tile.
    captions : sequence of str, shape (n,)
        One per image; ``"\\n"`` starts a new line (e.g. ``"seven -> one\\n0.03"``). A line wider
        than the cell is cut with an ellipsis.
    out_path : path
        The PNG to write.
    columns : int
        Images per row (fewer when there are fewer images).
    thumb : int
        Side of each thumbnail's square, in pixels.
    marked : sequence of bool, shape (n,), optional
        Cells to frame in ``MONTAGE_MARK`` (the flag step marks its outliers).
    mark_label : str
        What the frame means; drawn in the legend after a swatch of the frame's colour.
    legend : sequence of str
        Lines that explain the picture (what a caption says, the order), drawn in a band under
        the grid and wrapped to its width. With neither ``legend`` nor ``mark_label``, no band.
    empty : str
        What the picture says when there are no images.

    Returns
    -------
    Path
        ``out_path``.
    """
    if len(paths) != len(captions):
        raise CleanloopError(f"render_montage got {len(paths)} path(s) but {len(captions)} caption(s)")
    if columns < 1 or thumb < 16:
        raise CleanloopError(f"render_montage needs columns >= 1 and thumb >= 16 (got {columns}, {thumb})")
    if marked is not None and len(marked) != len(paths):
        raise CleanloopError(f"render_montage got {len(paths)} path(s) but {len(marked)} marked flag(s)")
    font = _font(max(11, thumb // 7))
    ascent, descent = font.getmetrics() if hasattr(font, "getmetrics") else (11, 3)
    line_h = ascent + descent + 2

    if not paths:
        img = Image.new("RGB", (max(240, 3 * thumb), thumb), MONTAGE_BACKGROUND)
        ImageDraw.Draw(img).text(
            (img.width / 2, img.height / 2), empty, fill=MONTAGE_TEXT, font=font, anchor="mm"
        )
        return write_atomic(out_path, lambda p: img.save(p, format="PNG"))

    lines = [str(c).split("\n") for c in captions]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widest = max(_text_width(measure, line, font) for cap in lines for line in cap)
    # A cell is as wide as its thumbnail, or its widest caption up to twice that: names stay readable.
    text_w = int(min(max(thumb, math.ceil(widest)), 2 * thumb))
    cell_w = text_w + 2 * MONTAGE_PAD
    cell_h = thumb + max(len(c) for c in lines) * line_h + 2 * MONTAGE_PAD
    n_cols = min(columns, len(paths))
    n_rows = math.ceil(len(paths) / n_cols)
    grid_w, grid_h = n_cols * cell_w, n_rows * cell_h
    width = max(grid_w, MONTAGE_LEGEND_MIN_WIDTH) if (legend or mark_label) else grid_w
    band = _legend_lines(measure, legend, mark_label, font, width - 2 * MONTAGE_PAD, line_h)
    band_h = len(band) * line_h + 2 * MONTAGE_PAD if band else 0
    img = Image.new("RGB", (width, grid_h + band_h), MONTAGE_BACKGROUND)
    draw = ImageDraw.Draw(img)
    for i, (path, cap) in enumerate(zip(paths, lines, strict=True)):
        x0, y0 = (i % n_cols) * cell_w, (i // n_cols) * cell_h
        img.paste(_thumbnail(str(path), thumb, font), (x0 + (cell_w - thumb) // 2, y0 + MONTAGE_PAD))
        if marked is not None and marked[i]:
            draw.rectangle([x0 + 1, y0 + 1, x0 + cell_w - 2, y0 + cell_h - 2], outline=MONTAGE_MARK,
                           width=MONTAGE_MARK_WIDTH)
        y = y0 + MONTAGE_PAD + thumb + 2
        for line in cap:
            draw.text(
                (x0 + cell_w / 2, y),
                _fit(draw, line, font, text_w),
                fill=MONTAGE_TEXT,
                font=font,
                anchor="ma",
            )
            y += line_h
    if band:
        draw.rectangle([0, grid_h, width - 1, grid_h + band_h - 1], fill=MONTAGE_LEGEND_BACKGROUND)
        draw.line([0, grid_h, width - 1, grid_h], fill=MONTAGE_BORDER)
        y = grid_h + MONTAGE_PAD
        for indent, line, swatch in band:
            if swatch:
                side = line_h - 4
                draw.rectangle([MONTAGE_PAD, y + 1, MONTAGE_PAD + side, y + 1 + side], outline=MONTAGE_MARK,
                               width=max(2, side // 4))
            draw.text((MONTAGE_PAD + indent, y), line, fill=MONTAGE_TEXT, font=font)
            y += line_h
    return write_atomic(out_path, lambda p: img.save(p, format="PNG"))

"""Decoding images from disk, with no torch or Lightning import (the input checks run before those load).

``load_image`` gives upright RGB (EXIF orientation applied; grayscale, palette, RGBA, CMYK and
16-bit converted); ``image_problem`` says why an image cannot be decoded; ``pad_to_square``
keeps the whole image when it is made square.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps

from cleanloop.errors import CleanloopError

# PIL warns (on stderr) when it opens an image between one and two times Image.MAX_IMAGE_PIXELS;
# ``image_problem`` reports such an image as a reason in the step's one-line error instead, and
# nothing decodes an image the scan rejected. A filter, not ``catch_warnings``: the scan runs in
# threads, and ``catch_warnings`` swaps process-wide state.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def load_image(path: str) -> Image.Image:
    """Decode to upright RGB: EXIF orientation applied; grayscale, palette, RGBA, CMYK converted."""
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            if img.mode == "I;16" or img.mode == "I":  # 16-bit grayscale: scale to 8 bits
                arr = np.asarray(img, dtype=np.float32)
                img = Image.fromarray((arr / max(float(arr.max()), 1.0) * 255.0).astype(np.uint8))
            return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise CleanloopError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e


def image_problem(path: str) -> str | None:
    """Why PIL cannot fully decode ``path`` (zero bytes, not an image, truncated, too many pixels), or None.

    The reason is short and one line; it never repeats ``path`` (the error message names the file).
    """
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as img:
            limit = Image.MAX_IMAGE_PIXELS
            if limit and img.width * img.height > limit:
                return (f"decompression bomb: {img.width}x{img.height} pixels exceeds PIL's limit of {limit} "
                        "(Image.MAX_IMAGE_PIXELS)")
            img.load()
    except Image.UnidentifiedImageError:
        return "not an image: PIL cannot identify the file's format"
    except Exception as e:  # PIL raises many types; each becomes one reason
        text = " ".join(str(e).replace(str(path), "<file>").split())[:160]
        return f"{type(e).__name__}: {text}" if text else type(e).__name__
    return None


def unreadable_images(paths: Sequence[str], *, workers: int = 4) -> list[tuple[int, str]]:
    """(index, reason) of every image in ``paths`` that cannot be decoded; threads, as PIL releases the GIL."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        reasons = list(pool.map(image_problem, paths, chunksize=64))
    return [(i, r) for i, r in enumerate(reasons) if r is not None]


def pad_to_square(img: Image.Image, fill: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    """Pad the short side symmetrically so nothing is cropped away."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas

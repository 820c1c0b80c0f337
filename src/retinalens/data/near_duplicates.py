"""Near-duplicate images: the same scan resized, re-encoded or slightly cropped.

An exact sha256 catches a copy byte for byte, not a half-size re-save of a test scan added to
training. Two images are near-duplicates here when both hold:

- their perceptual hashes (DCT pHash, 64 bits: the 8x8 lowest frequencies of a 32x32 greyscale
  reduction, above or below their median) differ in at most PHASH_BITS bits, taking the closest of
  the centre crops at scales CROP_SCALES of each image (so a copy cropped by up to ~5% all round
  still meets its original at the matching scale);
- their pooled backbone features (which the feature cache already holds) have a cosine of at least
  MIN_COSINE.

Measured on oct-kermany (748 real scans; tests/data/test_near_duplicates.py checks it): half-size,
JPEG quality 50, half-size at quality 30, and 2% / 5% crops all round of real train scans were at
most 4 bits and cosine 0.83 from their originals; of the 79,851 pairs of train x test scans
(different patients) none meets both conditions. Each alone would not do: 2 distinct pairs are
within 4 bits (at cosines 0.77 and 0.78, the closest to this threshold), and 3 pairs have a cosine
above 0.93 (at 10 bits or more). Not caught: crops from one side only (3% off the left: up to 8
bits), flips, rotations.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import ImageDecodeError
from .decode import decode_image

PHASH_BITS = 4  # at most this many of 64 bits differ, at the closest pair of crop scales
MIN_COSINE = 0.8  # and the backbone features point the same way
CROP_SCALES = (1.0, 0.95, 0.9)  # centre crops hashed per image
_SIDE, _FACTOR = 8, 4  # 8x8 DCT coefficients of a 32x32 reduction (the usual pHash)


def perceptual_hashes(path: str | Path) -> np.ndarray:
    """(len(CROP_SCALES), 64) booleans: the pHash of each centre crop of the image."""
    from PIL import Image
    from scipy.fft import dctn

    grey = decode_image(path, keep_grey=True).convert("L")
    w, h = grey.size
    n = _SIDE * _FACTOR
    out = np.zeros((len(CROP_SCALES), _SIDE * _SIDE), dtype=bool)
    for row, s in enumerate(CROP_SCALES):
        dx, dy = w * (1 - s) / 2, h * (1 - s) / 2
        small = grey.resize((n, n), Image.Resampling.BOX, box=(dx, dy, w - dx, h - dy))
        low = dctn(np.asarray(small, dtype=np.float64), norm="ortho")[:_SIDE, :_SIDE]
        out[row] = (low > np.median(low)).ravel()
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)


def near_duplicate_pairs(paths_a: Sequence[Path], features_a: np.ndarray, paths_b: Sequence[Path],
                         features_b: np.ndarray, *, same_set: bool = False,
                         groups: tuple[Sequence[str], Sequence[str]] | None = None) -> list[tuple[int, int, int, float]]:
    """(i, j, pHash bits, cosine) for every near-duplicate pair of image i of A and image j of B.

    Features are the images' pooled backbone features, in path order. The cosine screens first (a
    matrix product), so only the few pairs above MIN_COSINE are decoded and hashed. `same_set`: A and B
    are one set (pairs i < j only). `groups`: a group (patient) per image of A and of B; pairs within
    one group are not looked at. An image that cannot be decoded is never anyone's duplicate."""
    if not len(paths_a) or not len(paths_b):
        return []
    cos = _unit(features_a) @ _unit(features_b).T
    if same_set:
        cos = np.triu(cos, k=1) + np.tril(np.full_like(cos, -1.0))
    candidates = np.argwhere(cos >= MIN_COSINE)
    if groups is not None:
        ga, gb = groups
        candidates = [(i, j) for i, j in candidates if ga[i] != gb[j]]
    hashes: dict[tuple[int, int], np.ndarray | None] = {}

    def hashed(side: int, i: int) -> np.ndarray | None:
        key = (0 if same_set else side, i)
        if key not in hashes:
            try:
                hashes[key] = perceptual_hashes((paths_a if side == 0 else paths_b)[i])
            except (ImageDecodeError, OSError):  # an unreadable file is reported where it is decoded for the model
                hashes[key] = None
        return hashes[key]

    pairs = []
    for i, j in candidates:
        ha, hb = hashed(0, int(i)), hashed(1, int(j))
        if ha is None or hb is None:
            continue
        bits = int((ha[:, None, :] != hb[None, :, :]).sum(axis=2).min())
        if bits <= PHASH_BITS:
            pairs.append((int(i), int(j), bits, float(cos[i, j])))
    return pairs

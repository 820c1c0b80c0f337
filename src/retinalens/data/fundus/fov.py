"""The circular field of view of a fundus photograph: where the bright disc on the black background is.

Threshold. Background brightness differs between cameras (Kaggle: 0-3; IDRiD: a glow up to ~30 round
the disc) and so does the brightness of the disc's rim (a dim rim of 15-25 in some Kaggle photos), so
no fixed level or fraction of the peak works for all. The disc's edge is a sharp step, though: the
number of pixels above a level t barely changes while t crosses that step (the gap between the
background and the rim) and changes fast inside the background and inside the disc. We take the
lowest level of that stable stretch (a maximally stable region, read off the histogram in
microseconds), step half-way up, and take the largest connected region above it (scipy.ndimage;
scipy comes with scikit-learn). Measured on the shared Kaggle and IDRiD photos: see tests/data/test_fundus.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

MIN_PEAK = 40              # brightest 1% of pixels below this (of 255): near-black, nothing to see
WORK_SIDE = 1024           # find_fov works on a copy at most this long (integer box reduction)
_STEP = 6                  # levels over which the pixel count above a threshold must stay stable
_STABLE_SLACK = 0.005      # a level is "stable" when its loss is within 0.5% of the most stable one


@dataclass(frozen=True)
class FOV:
    """The circular field of view, in pixels of the image given to `find_fov`."""

    box: tuple[int, int, int, int]  # left, top, right, bottom (right/bottom exclusive), clipped to the image
    centre: tuple[float, float]     # x, y of the disc's centre (may lie outside the box when cut by the frame)
    radius: float                   # estimated radius of the whole disc, also the part cut off by the frame
    fraction: float                 # share of the image's pixels inside the field of view


def find_fov(img: Image.Image) -> FOV | None:
    """The field of view of a fundus photograph, or None when the image is (nearly) black."""
    from scipy import ndimage as ndi

    img = img.convert("RGB")
    width, height = img.size
    k = max(1, math.ceil(max(width, height) / WORK_SIDE))
    a = np.asarray(img.reduce(k) if k > 1 else img)
    # Max over channels: the background is black in all three, the disc bright in at least one
    # (red in most photos, not in every camera's white balance). The median drops JPEG specks.
    v = _median3(np.maximum(np.maximum(a[..., 0], a[..., 1]), a[..., 2]))
    hist = np.bincount(v.ravel(), minlength=256)
    p99 = int(np.searchsorted(hist.cumsum(), 0.99 * v.size))
    if p99 < MIN_PEAK:
        return None
    labels, n = ndi.label(v > _stable_threshold(hist, p99))
    if n == 0:
        return None
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    region = labels == sizes.argmax()
    h, w = region.shape
    rows, cols = np.flatnonzero(region.any(axis=1)), np.flatnonzero(region.any(axis=0))
    box = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)  # working pixels
    # Row by row, the span from the leftmost to the rightmost disc pixel: the disc without its holes
    # (a dark lesion is still field of view), and the edge points the circle is fitted to.
    sub = region[rows]
    first = sub.argmax(axis=1)
    last = w - 1 - sub[:, ::-1].argmax(axis=1)
    area = float((last - first + 1).sum())
    cx, cy, r = _fit_circle(region, rows, first, last, cols, box)
    # Working pixels back to the image's; one block of margin when reduced (a block half inside the
    # disc may average below the threshold).
    pad = k if k > 1 else 0
    l, t, rr, b = box
    return FOV((max(0, l * k - pad), max(0, t * k - pad), min(width, rr * k + pad), min(height, b * k + pad)),
               (float(cx * k), float(cy * k)), float(r * k), area / (h * w))


def _median3(v: np.ndarray) -> np.ndarray:
    """3x3 separable median (a row median of 3, then a column median of 3): kills specks, keeps edges."""
    def med(x: np.ndarray, axis: int) -> np.ndarray:
        p = np.pad(x, [(1, 1) if i == axis else (0, 0) for i in range(2)], mode="edge")
        lo, mid, hi = (p[i:i + x.shape[0]] if axis == 0 else p[:, i:i + x.shape[1]] for i in range(3))
        return np.maximum(np.minimum(lo, mid), np.minimum(np.maximum(lo, mid), hi))
    return med(med(v, 1), 0)


def _stable_threshold(hist: np.ndarray, p99: int) -> int:
    """The lowest level of the stable stretch between background and disc (see the module docstring)."""
    count = hist[::-1].cumsum()[::-1][1:].astype(np.float64)  # count[t]: pixels brighter than t
    count = np.append(count, np.zeros(_STEP + 1))
    lo, hi = 4, int(min(100, 0.4 * p99))
    if hi <= lo:
        return lo + _STEP // 2
    t = np.arange(lo, hi + 1)
    loss = (count[t] - count[t + _STEP]) / np.maximum(count[t], 1)
    first = int(t[np.argmax(loss <= loss.min() + _STABLE_SLACK)])
    return first + _STEP // 2  # the middle of the step, clear of the background's brightest pixels


def _fit_circle(region: np.ndarray, rows: np.ndarray, first: np.ndarray, last: np.ndarray,
                cols: np.ndarray, box: tuple[int, int, int, int]) -> tuple[float, float, float]:
    """Centre and radius of the disc (working pixels, continuous coordinates): a least-squares circle
    through the region's edge where the frame does not cut it, else the box's own circle."""
    h, w = region.shape
    l, t, r, b = box
    fallback = ((l + r) / 2, (t + b) / 2, max(r - l, b - t) / 2)
    sub = region[:, cols]
    top = sub.argmax(axis=0)
    bottom = h - 1 - sub[::-1].argmax(axis=0)
    xs = [first[first > 0], last[last < w - 1] + 1.0, cols[top > 0] + 0.5, cols[bottom < h - 1] + 0.5]
    ys = [rows[first > 0] + 0.5, rows[last < w - 1] + 0.5, top[top > 0], bottom[bottom < h - 1] + 1.0]
    x, y = np.concatenate(xs).astype(np.float64), np.concatenate(ys).astype(np.float64)
    if len(x) < 20:
        return fallback
    for _ in range(3):  # fit, drop the points far off (a camera's notch, a flat side), fit again
        a = np.column_stack([x, y, np.ones_like(x)])
        (p, q, c), *_ = np.linalg.lstsq(a, x * x + y * y, rcond=None)
        cx, cy = p / 2, q / 2
        radius = math.sqrt(max(c + cx * cx + cy * cy, 0.0))
        resid = np.abs(np.hypot(x - cx, y - cy) - radius)
        keep = resid <= max(3 * float(np.median(resid)), 1.5)
        if keep.all() or keep.sum() < 20:
            break
        x, y = x[keep], y[keep]
    # A circle much smaller than the region, or huge (a straight edge), is a bad fit.
    if not (0.4 * max(r - l, b - t) <= radius <= 1.5 * math.hypot(w, h)):
        return fallback
    return cx, cy, radius


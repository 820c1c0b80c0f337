"""The retinal band of an OCT B-scan, and the two-view input built from it (`resize="squash+band"`).

Kermany B-scans are 512-1536 px wide and 496 px high, and the retina is a band across a mostly dark
frame; squashed to 224x224, a 1536-px scan shrinks 7x across and 2x down. The two-view input keeps
the squash (the whole field of view) and adds the band at a kept aspect ratio:

    [ squash S x S | tile 1 | tile 2 | tile 3 ]  one uint8 input, S high and 4 S wide

- the squash: the whole scan resized to S x S (what `resize="squash"` feeds);
- the tiles: the retinal band (found from the image, with a margin; the whole scan where none is
  found) resized to S px high with its aspect kept, then `TILES` S x S crops from left to right
  (evenly spaced, overlapping where the band is narrower than 3 S).

Every consumer gets this one input (one decode, one ONNX input); each view is read by a network of its
own (`Preprocessing.view`, its columns of the input: a 7x7 map for the squash, 7x21 for the tiles at
S=224), and `train` averages the two in probability space: one head over both views' maps lost on
cross-validation where the two averaged won (README, "The two-view input"). `regions` says where each
part of the input came from in the scan: `pixels` builds the input from it, and `place_heatmap` puts
a Grad-CAM map of the input back onto the scan (the stronger view at each pixel).

The band finder (benchmarks/bench_preprocessing.py measured it on every scan of oct-kermany, with a
contact sheet of its crops): the bright, column-wise top and bottom of the tissue on a blurred copy
(speckle), 5th/95th percentiles across columns (tilt), saturated rows and columns ignored (the white
padding some scans carry), a margin of MARGIN of the scan height each way; shorter than MIN_BAND of the
height, or tissue in under 30% of the columns: no band (the tiles then cover the whole scan).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

MARGIN, MIN_BAND = 0.15, 0.25
TILES = 3
Box = tuple[float, float, float, float]  # (left, top, right, bottom), PIL's order


def retinal_band(img: Image.Image) -> tuple[int, int] | None:
    """(top, bottom) rows of the retinal band with the margin, or None where none is found."""
    small = img.convert("L").reduce(4)
    a = np.asarray(small.filter(ImageFilter.GaussianBlur(2)), dtype=np.float32)
    raw = np.asarray(small, dtype=np.float32)
    a[raw >= 250] = 0  # white padding is not tissue
    cols = a[:, (raw < 250).mean(axis=0) > 0.5]
    if cols.shape[1] < 8:
        return None
    level = np.percentile(cols, 50) + 0.5 * (np.percentile(cols, 99) - np.percentile(cols, 50))
    bright = cols > level
    has = bright.any(axis=0)
    if has.mean() < 0.3:
        return None
    tops = bright.argmax(axis=0)[has]
    bottoms = (bright.shape[0] - 1 - bright[::-1].argmax(axis=0))[has]
    h = img.height
    top = max(0, int(np.percentile(tops, 5) * 4 - MARGIN * h))
    bottom = min(h, int(np.percentile(bottoms, 95) * 4 + 4 + MARGIN * h))
    return (top, bottom) if bottom - top >= MIN_BAND * h else None


@dataclass(frozen=True)
class Region:
    """A part of the model input (`input_box`, whole pixels) and the part of the scan it shows
    (`image_box`, scan pixels, fractional where a tile's edge falls between two)."""

    input_box: tuple[int, int, int, int]
    image_box: Box


def band_width(width: int, band_height: int, size: int) -> int:
    """The band's width once resized to `size` px high with its aspect kept (at least one tile)."""
    return max(size, round(width * size / band_height))


def tile_starts(strip_width: int, size: int) -> list[int]:
    """The left edges of the TILES tiles on the resized band: first and last at its ends, evenly spaced."""
    return np.linspace(0, strip_width - size, TILES).round().astype(int).tolist()


def regions(width: int, height: int, band: tuple[int, int] | None, size: int) -> list[Region]:
    """The squash, then the TILES tiles of the band (the whole scan when `band` is None)."""
    top, bottom = band or (0, height)
    w = band_width(width, bottom - top, size)
    scale = width / w
    out = [Region((0, 0, size, size), (0.0, 0.0, float(width), float(height)))]
    for k, x in enumerate(tile_starts(w, size), start=1):
        out.append(Region((k * size, 0, (k + 1) * size, size), (x * scale, float(top), (x + size) * scale, float(bottom))))
    return out


def pixels(img: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    """The two-view input of one scan: size high, (1 + TILES) * size wide, in the image's mode."""
    band = retinal_band(img)
    out = Image.new(img.mode, ((1 + TILES) * size, size))
    out.paste(img.resize((size, size), resample), (0, 0))
    crop = img if band is None else img.crop((0, band[0], img.width, band[1]))
    strip = crop.resize((band_width(img.width, crop.height, size), size), resample)
    for k, x in enumerate(tile_starts(strip.width, size), start=1):
        out.paste(strip.crop((x, 0, x + size, size)), (k * size, 0))
    return out


def place_heatmap(heat: np.ndarray, img: Image.Image, size: int) -> np.ndarray:
    """A heat map of the two-view input (size, (1 + TILES) * size) -> the scan's (H, W): each view's
    part resized onto the scan pixels it shows, and at each pixel the strongest view's value (so a
    lesion one view found stays as bright as that view made it; outside the band, the squash's)."""
    out = np.zeros((img.height, img.width), dtype=np.float32)
    for r in regions(img.width, img.height, retinal_band(img), size):
        x0, y0, x1, y1 = r.input_box
        left, top, right, bottom = (int(round(v)) for v in r.image_box)
        right, bottom = max(right, left + 1), max(bottom, top + 1)
        part = Image.fromarray(np.ascontiguousarray(heat[y0:y1, x0:x1], dtype=np.float32))
        part = np.asarray(part.resize((right - left, bottom - top), Image.Resampling.BILINEAR), dtype=np.float32)
        view = out[top:bottom, left:right]
        np.maximum(view, part[:view.shape[0], :view.shape[1]], out=view)
    return np.clip(out, 0.0, 1.0)

"""Cheap image statistics. Most are computed on the model's own input (the decoded, resized uint8
pixels), so that training, evaluation and prediction measure exactly the same thing; the few that
only the file itself can tell (its decoded size, the 8x8 blocks of a damaged JPEG) are measured on
the full-resolution decode, through the `source_statistics` hook that ImageFiles calls."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data.decode import JPEG_GRID
from ..data.images import ImageFiles, image_batches
from ..data.transforms import Preprocessing
from .block_order import black_tail, block_step

STATISTICS = ("brightness", "clipped", "sharpness", "saturation")  # the fitted ones
FLOOR_STATISTICS = ("flat_band", "black_band", "contrast", "correlation")  # model input, judged against absolute floors
SOURCE_STATISTICS = ("min_side", "aspect", "block_run", "block_peak", "block_step", "black_tail")  # full-resolution decode
ALL_STATISTICS = STATISTICS + FLOOR_STATISTICS + SOURCE_STATISTICS
_LIT = 20  # a pixel darker than this (max channel, of 255) is background: the black around a scan or a fundus
_CLIPPED = 250
_DARK_IMAGE = 10  # mean grey level below which black rows are the image's darkness, not damage
_BLOCK = 8  # the JPEG block: corrupt entropy data decodes as runs of flat 8x8 blocks
_EDGE = 3  # grey levels between a flat block and the pixel row beside it: a hard block edge
# DCT frequencies (u + v >= 7 of 0..14) that compressed scans hold little of and a mis-decoded block
# (a bit flip that libjpeg resynchronises after) holds as a stripe or checker pattern at full contrast.
_U, _V = np.meshgrid(np.arange(_BLOCK), np.arange(_BLOCK), indexing="ij")
_HIGH = ((_U + _V) >= 7).astype(np.float32)
# The orthonormal 8-point DCT-II as a matrix (JPEG's forward DCT): D @ block @ D.T is the block's
# coefficients, one batched matmul over all blocks (several times faster than scipy.fft.dctn here).
_DCT = (np.cos((2 * np.arange(_BLOCK)[None] + 1) * np.arange(_BLOCK)[:, None] * np.pi / (2 * _BLOCK))
        * np.where(np.arange(_BLOCK)[:, None] == 0, np.sqrt(1 / _BLOCK), np.sqrt(2 / _BLOCK))).astype(np.float32)


def image_statistics(pixels: torch.Tensor | np.ndarray) -> dict[str, np.ndarray]:
    """uint8 (N, S, S, 3) -> per image:
    brightness: mean grey level in [0, 1] (near-black / overexposed);
    clipped: fraction of pixels with a channel at >= 250 (blown-out highlights);
    sharpness: log10(1 + variance of the Laplacian of the grey image) (low: blurred, high: noise);
    saturation: mean chroma (max - min channel, in [0, 1]) of the lit pixels (OCT is grey, fundus red/orange).

    Plain numpy on the channel planes: under 2 ms per 224 px image here, 15x less than the same in
    torch ops over the 3-wide channel axis (measured), which matters as every prediction pays it.
    """
    x = _numpy(pixels)
    n = len(x)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    hi, lo = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
    grey = _grey(x)
    lap = grey[:, :-2, 1:-1] + grey[:, 2:, 1:-1] + grey[:, 1:-1, :-2] + grey[:, 1:-1, 2:] - 4 * grey[:, 1:-1, 1:-1]
    lit = (hi >= _LIT).reshape(n, -1)
    chroma = (hi - lo).reshape(n, -1) * lit
    pixels_per_image = max(grey[0].size, 1) if n else 1
    return {
        "brightness": grey.reshape(n, -1).sum(1, dtype=np.float64) / pixels_per_image / 255,
        "clipped": np.count_nonzero((hi >= _CLIPPED).reshape(n, -1), axis=1) / pixels_per_image,
        "sharpness": np.log10(1 + lap.reshape(n, -1).var(1, ddof=1, dtype=np.float64)),
        "saturation": chroma.sum(1, dtype=np.float64) / np.maximum(np.count_nonzero(lit, axis=1), 1) / 255,
    }


def floor_statistics(pixels: torch.Tensor | np.ndarray) -> dict[str, np.ndarray]:
    """uint8 (N, S, S, 3) -> the statistics behind the absolute floors (trust/gate.py FLOORS), per image:
    flat_band: the longest run of rows whose pixels are all one grey value (neither black nor white),
      as a fraction of the height: the grey tail of a truncated file. Real scans have none (their
      dark background is speckle; only the white padding of registered OCT scans is flat);
    black_band: the same for black rows, in an image not dark as a whole (a scan dimmed to 5% has
      rows of zeros, and "too_dark" is the better reason for it). Kept apart because fundus photos
      are letterboxed in black: only a band of half the image (a blacked-out half) is damage;
    contrast: the standard deviation of the grey image, in grey levels (0: one flat colour);
    correlation: of horizontally adjacent grey pixels (pure noise ~0, any photograph far above)."""
    x = _numpy(pixels)
    grey = _grey(x)
    n = len(grey)
    value = grey[:, :, 0]
    one_value = (grey.max(2) == value) & (grey.min(2) == value)  # (N, S) rows
    lit = grey.reshape(n, -1).mean(1) >= _DARK_IMAGE  # a black band counts in an image otherwise lit
    black = one_value & (value < _LIT) & lit[:, None]
    a, b = grey[:, :, :-1].reshape(n, -1), grey[:, :, 1:].reshape(n, -1)
    a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):  # a flat image has no correlation (NaN)
        corr = (a * b).sum(1, dtype=np.float64) / np.sqrt((a * a).sum(1, dtype=np.float64) * (b * b).sum(1, dtype=np.float64))
    height = max(grey.shape[1], 1)
    return {"flat_band": longest_run(one_value & (value >= _LIT) & (value < _CLIPPED)) / height,
            "black_band": longest_run(black) / height,
            "contrast": grey.reshape(n, -1).std(1, dtype=np.float64), "correlation": corr}


def source_statistics(img: Image.Image) -> list[float]:
    """The full-resolution decode -> [min_side, aspect, block_run, block_peak, block_step, black_tail]
    (SOURCE_STATISTICS):
    min_side: the shorter side in pixels (a 1x1 PNG resizes into a perfectly plain model input);
    aspect: longer / shorter side (a 4000x20 strip squashed to a square is not a scan);
    block_run: the longest run, along a row of 8x8 blocks on the JPEG grid, of identical blocks of one
      flat grey (neither black background nor white padding): what the decoder makes of zeroed or
      garbled entropy data (each block repeats the last DC value) and of a truncated file's tail. The
      resize to the model input smears blocks into their neighbours, so this is read before it
      (a 1536x496 scan: about 60% of the time of its resize to 224 px, measured side by side);
    block_peak: for a JPEG decoded at full size (img.info[JPEG_GRID]; else NaN, not measured), the
      largest high-frequency DCT coefficient (u + v >= 7, orthonormal, grey levels) of any 8x8 block on
      its grid: a block that a flipped bit made libjpeg decode from the wrong symbols shows a stripe or
      checker pattern at full contrast, which no compressed scan holds (see trust/gate.py FLOORS);
    block_step, black_tail: for a greyscale JPEG on its grid (else NaN), a brightness shift from one
      block to the end of the image in block order (a flipped bit that changed one DC difference; see
      trust/block_order.py). A colour JPEG interleaves its components by MCU, an order these do not follow."""
    w, h = img.size
    grey = np.asarray(img if img.mode == "L" else img.convert("L"))
    h8, w8 = h // _BLOCK, w // _BLOCK
    run, step, tail = 0, np.nan, np.nan
    if h8 and w8:
        rows = grey[:h8 * _BLOCK, :w8 * _BLOCK].reshape(h8 * _BLOCK, w8, _BLOCK)
        hi, lo = _block_reduce(rows, np.maximum), _block_reduce(rows, np.minimum)
        value = rows[::_BLOCK, :, 0].astype(np.float32)  # (h8, w8): each block's first pixel
        flat = (hi == lo) & (value >= _LIT) & (value < _CLIPPED)
        # A decoding error starts and ends on a block edge; a blurred scan's flat blocks fade into
        # their neighbours. So a block counts only with a step to the pixel row above or below it.
        above = np.abs(value - np.vstack([value[:1], rows[_BLOCK - 1:-1:_BLOCK].mean(2)]))
        below = np.abs(value - np.vstack([rows[_BLOCK::_BLOCK].mean(2), value[-1:]]))
        flat &= np.maximum(above, below) >= _EDGE
        same = flat[:, 1:] & flat[:, :-1] & (value[:, 1:] == value[:, :-1])  # a block the copy of its left one
        run = int(longest_run(same).max()) + 1 if same.any() else int(flat.any())
        if img.info.get(JPEG_GRID) and img.mode == "L":  # a colour JPEG codes its blocks by MCU, not in raster order
            step = block_step(grey[:h8 * _BLOCK, :w8 * _BLOCK], (hi >= _CLIPPED) | (hi == lo))
            tail = black_tail(hi, _LIT)

    peak = _block_peak(grey[:h8 * _BLOCK, :w8 * _BLOCK], h8, w8) if img.info.get(JPEG_GRID) and h8 and w8 else np.nan
    return [float(min(w, h)), max(w, h) / max(min(w, h), 1), float(run), peak, step, tail]


def _block_peak(grey: np.ndarray, h8: int, w8: int) -> float:
    """The largest |DCT coefficient| at the _HIGH frequencies over the 8x8 blocks of `grey` (h8*8, w8*8)."""
    # Down the columns of each block row (62 products 8x8 @ 8xW for a 1536x496 scan), then along the
    # rows of each block (one batch over the last axis): no transposed copy. Axes: (h8, u, w8, v).
    columns = _DCT @ grey.astype(np.float32).reshape(h8, _BLOCK, w8 * _BLOCK)
    coefficients = columns.reshape(h8, _BLOCK, w8, _BLOCK) @ _DCT.T
    np.abs(coefficients, out=coefficients)
    coefficients *= _HIGH[None, :, None, :]
    return float(coefficients.max())


def _block_reduce(rows: np.ndarray, op: np.ufunc) -> np.ndarray:
    """(h8 * 8, w8, 8) -> (h8, w8): `op` over each 8x8 block, as 7 + 7 elementwise steps over whole
    planes (numpy's reductions over an axis of 8 cost ~10x more: a loop per row)."""
    across = rows[:, :, 0].copy()
    for k in range(1, _BLOCK):
        op(across, rows[:, :, k], out=across)
    down = across.reshape(-1, _BLOCK, across.shape[1])
    out = down[:, 0].copy()
    for k in range(1, _BLOCK):
        op(out, down[:, k], out=out)
    return out


def longest_run(mask: np.ndarray) -> np.ndarray:
    """(..., L) bool -> (...) the length of the longest run of True along the last axis."""
    ones = mask.astype(np.int32)
    total = np.cumsum(ones, axis=-1)
    at_last_false = np.maximum.accumulate(np.where(ones == 0, total, 0), axis=-1)
    return (total - at_last_false).max(axis=-1, initial=0)


def source_array(source: torch.Tensor | np.ndarray | None, n: int) -> dict[str, np.ndarray]:
    """(N, len(SOURCE_STATISTICS)) rows of `source_statistics` (NaN: not measured) -> {name: (N,)}; None: all NaN."""
    s = np.full((n, len(SOURCE_STATISTICS)), np.nan) if source is None else np.asarray(source, dtype=np.float64)
    return {k: s[:, j] for j, k in enumerate(SOURCE_STATISTICS)}


def all_statistics(pixels: torch.Tensor | np.ndarray, source: torch.Tensor | np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Every statistic the gate reads (ALL_STATISTICS), from the model input and the source rows."""
    return image_statistics(pixels) | floor_statistics(pixels) | source_array(source, len(pixels))


def file_statistics(paths: Sequence[Path | bytes], preprocessing: Preprocessing, *, workers: int = 0,
                    batch_size: int = 32) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """All statistics of image files through the one decode + resize path; rows of unreadable files
    are NaN, and the second array says which rows were read."""
    n = len(paths)
    out = {k: np.full(n, np.nan) for k in ALL_STATISTICS}
    ok = np.zeros(n, dtype=bool)
    batches = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    files = ImageFiles(list(paths), preprocessing, measure=source_statistics, n_measures=len(SOURCE_STATISTICS))
    for x, idx, errors, source in image_batches(files, batches, workers):
        good = [j for j, e in enumerate(errors) if not e]
        rows = idx[good].numpy()
        for k, v in all_statistics(x[good], source[good]).items():
            out[k][rows] = v
        ok[rows] = True
    return out, ok


def _numpy(pixels: torch.Tensor | np.ndarray) -> np.ndarray:
    return pixels.numpy() if isinstance(pixels, torch.Tensor) else np.asarray(pixels)


def _grey(x: np.ndarray) -> np.ndarray:
    grey = x[..., 0].astype(np.float32)
    grey += x[..., 1]
    grey += x[..., 2]
    grey /= 3
    return grey

"""Damage statistics of a JPEG's block order: a brightness shift that starts at one 8x8 block and lasts
to the end of the image.

A flipped bit that libjpeg decodes past without a warning often changes one DC difference: every later
block, in raster order, is brighter or darker by one amount from that block on (README, Quality gate;
`tests/robustness/bitflip_sample.py` makes them). Its border is a staircase: the block-row boundary above
the first shifted block, from its column to the right edge, then the next boundary down, from the left
edge to that column. Read on the pixels, the shift is a step between the two pixel rows on either side
of each of those boundaries, beyond the rows' own gradient, along nearly all of the staircase. Natural
edges are spread over several pixel rows, lie anywhere, and follow no block's staircase across the
width. A large negative shift clips everything after the flip to black instead (`black_tail`). Both read
a greyscale image on its JPEG's own 8x8 grid (`block_step` on the pixels, `black_tail` on each block's
maximum), and both cost a few milliseconds a scan (README).
"""

from __future__ import annotations

import numpy as np

_BLOCK = 8
_STEEP = 20.0  # grey levels a pixel row: beside a boundary this steep a natural edge is there
_HELD = 0.8  # the fraction of a staircase's boundaries that must step: a shift moves nearly all of them
_MIN_BOUNDARIES = 4  # and a staircase is judged on at least a quarter of the row's blocks, 4 at least
_LEVELS = np.arange(2, 66, 2, dtype=np.float32)  # the steps tested, grey levels (64: "64 or more")
_BLACK = 2  # a block whose brightest pixel is this dark is clipped black


def block_step(grey: np.ndarray, bad: np.ndarray) -> float:
    """The largest step (grey levels, of _LEVELS; 0: none) that _HELD (80%) of the boundaries along some
    staircase make, all in one direction: at a boundary on pixel row y = 8r, (row y - row y-1) less the
    mean of the steps just above and below it, averaged over each block's 8 columns. Boundaries beside
    a steep natural edge (the neighbouring row steps exceed _STEEP on average) or beside a `bad` block
    (h8, w8: white padding or a flat block, whose values clipping has cut) do not count. A staircase's
    first shifted block is in block row 1 or lower and column 1 or further right.
    `grey`: uint8 (h8 * 8, w8 * 8)."""
    h8, w8 = bad.shape
    if h8 < 4 or w8 < 2:
        return 0.0
    # The pixel rows around each boundary y = 8, 16, ...: y - 2, y - 1, y, y + 1 (strided views).
    above2, above, at, below = (grey[k:len(grey) - _BLOCK + k:_BLOCK].astype(np.float32) for k in (6, 7, 8, 9))
    step = (1.5 * (at - above) - 0.5 * (below - above2)).reshape(h8 - 1, w8, _BLOCK).mean(2)
    steep = (np.abs(above - above2) + np.abs(below - at)).reshape(h8 - 1, w8, _BLOCK).mean(2) / 2
    valid = ~(bad[1:] | bad[:-1] | (steep > _STEEP))  # (h8 - 1 boundaries, w8)
    n = _staircases(valid)
    judged = (n >= max(_MIN_BOUNDARIES, w8 // 4)) & (np.arange(w8) >= 1)

    def held(level: float, sign: float) -> bool:
        return bool(((_staircases((sign * step >= level) & valid) >= _HELD * n) & judged).any())

    best = 0.0
    for sign in (1.0, -1.0):  # held() is monotone in the level: bisect _LEVELS
        lo, hi = 0, len(_LEVELS)  # _LEVELS[:lo] hold, _LEVELS[hi:] do not
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if held(float(_LEVELS[mid]), sign) else (lo, mid)
        best = max(best, float(_LEVELS[lo - 1]) if lo else 0.0)
    return best


def black_tail(hi: np.ndarray, lit: float) -> float:
    """The largest fraction of clipped-black blocks (brightest pixel <= _BLACK) from some block to the
    end of the image in raster order, where that block is in column 2 or further right, the two before
    it in its row are not black, the blocks before it are lit (their brightest pixels average `lit` or
    more), and two block rows or more follow: what a large negative shift leaves.
    A black band of the image itself starts at a row's first block or leaves most blocks after it lit.
    `hi`: (h8, w8), each block's brightest pixel."""
    h8, w8 = hi.shape
    black = (hi <= _BLACK).reshape(-1)
    n = len(black)
    if n < 3 * w8 or w8 < 3:
        return 0.0
    k = np.arange(n)
    tail = np.cumsum(black[::-1])[::-1] / (n - k)
    # The blocks before it lit, on average (a scan dimmed to near black is "too_dark", not damaged).
    lit_before = np.concatenate([[0.0], np.cumsum(hi.reshape(-1), dtype=np.float64)[:-1]]) >= lit * np.maximum(k, 1)
    starts = (k % w8 >= 2) & (n - k >= 2 * w8) & lit_before
    starts[2:] &= ~black[1:-1] & ~black[:-2]
    return float(tail[starts].max(initial=0.0))


def _staircases(marked: np.ndarray) -> np.ndarray:
    """(h8 - 1 boundaries, w8) bool -> (h8 - 2, w8): for the staircase (r, c), boundary r - 1 from column
    c on and boundary r before column c, how many of its boundaries are marked: the whole upper
    boundary plus, column by column before c, what the lower one marks less what the upper one does
    (one cumulative sum, forward)."""
    upper, lower = marked[:-1].astype(np.int16), marked[1:].astype(np.int16)
    gained = np.cumsum(lower - upper, axis=1, dtype=np.int16)
    gained[:, 1:] = gained[:, :-1].copy()
    gained[:, 0] = 0
    return upper.sum(1, keepdims=True) + gained

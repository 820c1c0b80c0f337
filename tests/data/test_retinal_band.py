"""The two-view input (`resize="squash+band"`, data/retinal_band.py): its geometry on real scans of every
width, the band finder on scans with a known band, and heat maps put back where each view came from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retinalens.bundle.network import tta_view
from retinalens.data.decode import decode_image
from retinalens.data.retinal_band import MARGIN, TILES, regions, retinal_band
from retinalens.data.transforms import Preprocessing
from retinalens.demo import DEMO_DATA

SQUASH = Preprocessing(size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
TWO_VIEW = Preprocessing(size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize="squash+band")


def one_scan_per_width() -> list[Path]:
    seen: dict[tuple[int, int], Path] = {}
    for f in sorted(DEMO_DATA.glob("*/*/*.jpeg")):
        seen.setdefault(Image.open(f).size, f)
    return list(seen.values())


def synthetic_scan(width: int = 512, height: int = 496, band: tuple[int, int] = (180, 300), seed: int = 0) -> Image.Image:
    """Dark speckle with one bright, textured band of rows: a B-scan whose retina is known."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 40, size=(height, width)).astype(np.uint8)
    a[band[0]:band[1]] = rng.integers(150, 230, size=(band[1] - band[0], width)).astype(np.uint8)
    return Image.fromarray(a, "L")


@pytest.mark.parametrize("path", one_scan_per_width(), ids=lambda p: p.name)
def test_the_input_is_the_squash_then_tiles_that_span_the_band(path):
    img = decode_image(path, keep_grey=True)
    x = TWO_VIEW.pixels(img)
    assert x.dtype == torch.uint8 and tuple(x.shape) == (*TWO_VIEW.shape, 3) == (224, 224 * (1 + TILES), 3)
    assert torch.equal(x[:, :224], SQUASH.pixels(img))  # the first view is exactly the default input
    band = retinal_band(img)
    top, bottom = band or (0, img.height)
    parts = regions(img.width, img.height, band, 224)
    assert [r.input_box for r in parts] == [(k * 224, 0, (k + 1) * 224, 224) for k in range(1 + TILES)]
    tiles = [r.image_box for r in parts[1:]]
    assert all(t[1] == top and t[3] == bottom for t in tiles)
    assert tiles[0][0] == 0 and abs(tiles[-1][2] - img.width) < 1e-6  # left edge to right edge
    assert all(a[0] <= b[0] for a, b in zip(tiles, tiles[1:]))


def test_the_band_finder_finds_a_known_band_with_its_margin_and_refuses_a_blank_scan():
    img = synthetic_scan(band=(180, 300))
    top, bottom = retinal_band(img)
    margin = MARGIN * img.height
    assert abs(top - (180 - margin)) <= 8 and abs(bottom - (300 + margin)) <= 8
    assert retinal_band(Image.new("L", (512, 496), 20)) is None  # no tissue: the tiles cover the whole scan
    blank = Image.new("L", (512, 496), 20)
    assert [r.image_box[1::2] for r in regions(512, 496, retinal_band(blank), 224)[1:]] == [(0.0, 496.0)] * TILES


def test_a_map_of_one_tile_lands_on_the_scan_pixels_that_tile_shows():
    img = synthetic_scan(width=1536, band=(180, 300))
    band = retinal_band(img)
    tile = regions(img.width, img.height, band, 224)[2]  # the centre tile
    heat = np.zeros(TWO_VIEW.shape, dtype=np.float32)
    heat[:, 2 * 224:3 * 224] = 1.0
    placed = TWO_VIEW.place_heatmap(heat, img)
    assert placed.shape == (img.height, img.width) and placed.dtype == np.float32
    rows, cols = np.nonzero(placed > 0.5)
    left, top, right, bottom = tile.image_box
    assert rows.min() >= top - 1 and rows.max() <= bottom + 1 and cols.min() >= left - 1 and cols.max() <= right + 1
    assert (placed[int(top) + 2:int(bottom) - 2, int(left) + 2:int(right) - 2] > 0.99).all()
    # The squash's map covers the whole scan, and each pixel keeps the stronger view.
    heat[:, :224] = 0.5
    both = TWO_VIEW.place_heatmap(heat, img)
    assert np.allclose(both[placed > 0.99], 1.0) and np.allclose(both[placed == 0], 0.5, atol=1e-6)


def test_a_squashed_input_places_its_map_by_resizing():
    img = synthetic_scan()
    heat = np.zeros((224, 224), dtype=np.float32)
    heat[:, :112] = 1.0
    placed = SQUASH.place_heatmap(heat, img)
    assert placed.shape == (496, 512) and placed[:, :250].min() > 0.99 and placed[:, 262:].max() < 0.01


def test_flips_and_crops_refuse_the_two_view_input():
    x = torch.zeros(2, *TWO_VIEW.shape, 3, dtype=torch.uint8)
    assert tta_view("identity", x) is x
    for view in ("flip", "crop"):
        with pytest.raises(ValueError, match="square input"):
            tta_view(view, x)

"""A brightness shift from one JPEG block to the end of the image, in the order a greyscale JPEG codes
its blocks (what a flipped bit that changed one DC difference decodes to), is refused as damaged by the
gate's floors; the same real scan re-encoded alike, unshifted, is not."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retinalens.data.decode import decode_image
from retinalens.data.transforms import Preprocessing
from retinalens.trust.gate import FLOORS, Gate
from retinalens.trust.statistics import SOURCE_STATISTICS, all_statistics, source_statistics
from robustness.corpus import dc_shifted

PREPROCESSING = Preprocessing(size=224, mean=(0.5,) * 3, std=(0.5,) * 3)


def _floors(data: bytes) -> tuple[dict[str, float], str | None]:
    """The source statistics of a JPEG's bytes and the first floor it fails (None: passes them all)."""
    img = decode_image(data, keep_grey=True)
    source = source_statistics(img)
    verdict = Gate(list(FLOORS)).verdicts(all_statistics(PREPROCESSING.pixels(img)[None].numpy(), np.array([source])))[0]
    return dict(zip(SOURCE_STATISTICS, source)), verdict["reason"]


SHIFT_FLOORS = [c for c in FLOORS if c.score in ("block_step", "black_tail")]


@pytest.mark.parametrize("shift", [24, 40, -24, -120])
def test_a_shift_from_one_block_on_is_refused_and_the_clean_scan_is_not(demo_scans: dict[str, Path], shift: int) -> None:
    """Up, the dark background turns grey (block_step); far down, everything after the block is clipped
    black (black_tail); between, either. The clean scan stays below both floors."""
    for cls, path in demo_scans.items():
        jpeg = path.read_bytes()
        clean, clean_reason = _floors(dc_shifted(jpeg, (0.4, 0.5), 0))
        assert clean_reason is None, f"{cls}: the clean scan, re-encoded, refused ({clean_reason}; {clean})"
        assert not any(c.fails(np.array([clean[c.score]]))[0] for c in SHIFT_FLOORS), (cls, clean)
        stats, reason = _floors(dc_shifted(jpeg, (0.4, 0.5), shift))
        assert reason == "damaged", (cls, shift, stats)
        assert any(c.fails(np.array([stats[c.score]]))[0] for c in SHIFT_FLOORS), (cls, shift, stats)


def test_colour_jpegs_and_other_formats_are_not_measured(demo_scans: dict[str, Path]) -> None:
    """A colour JPEG codes its blocks by MCU, not in the raster order the statistics follow; a PNG has no blocks."""
    with Image.open(demo_scans["CNV"]) as im:
        rgb = np.asarray(im.convert("RGB")).copy()
    rgb[..., 0] = rgb[..., 0] // 2  # a tint: a colour image, not a grey one stored as RGB
    for fmt in ("JPEG", "PNG"):
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format=fmt)
        stats, _ = _floors(buf.getvalue())
        assert math.isnan(stats["block_step"]) and math.isnan(stats["black_tail"]), (fmt, stats)

"""The bit-flip sample behind the README's open limit (bitflip_sample.py): each copy holds the flips it
says, where it says, the same on every run, and the classification tells a sound copy from a refused one."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from robustness.bitflip_sample import NEAR_COPY, REFUSED_DECODER, Copy, classify, flip_bits
from robustness.corpus import entropy_span


def test_flips_are_seeded_and_inside_the_first_half_of_the_entropy_data(demo_scans: dict[str, Path]) -> None:
    for path in demo_scans.values():
        jpeg = path.read_bytes()
        start, end = entropy_span(jpeg)
        flipped = flip_bits(jpeg, 16, f"seed-{path.stem}")
        assert flipped == flip_bits(jpeg, 16, f"seed-{path.stem}")
        assert flipped != flip_bits(jpeg, 16, f"other-{path.stem}")
        changed = np.flatnonzero(np.frombuffer(jpeg, np.uint8) != np.frombuffer(flipped, np.uint8))
        assert len(changed) and changed.min() >= start and changed.max() < start + (end - start) // 2
        xor = np.bitwise_xor(np.frombuffer(jpeg, np.uint8), np.frombuffer(flipped, np.uint8))
        assert 1 <= int(np.unpackbits(xor).sum()) <= 16  # two flips of one bit cancel


def test_classify_tells_a_sound_copy_from_a_cut_one(demo_scans: dict[str, Path]) -> None:
    path = demo_scans["CNV"]
    jpeg = path.read_bytes()
    outcome, copy_pixels, source_pixels = classify(Copy("same", path, jpeg))
    assert outcome == NEAR_COPY and np.array_equal(copy_pixels, source_pixels)
    assert classify(Copy("cut", path, jpeg[:len(jpeg) // 2]))[0] == REFUSED_DECODER

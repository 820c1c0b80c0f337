"""What is stored of an upload: its pixels, bit for bit as decoded, and none of its metadata."""

from __future__ import annotations

import io
import random

import numpy as np
from PIL import Image

from retinalens.serve.uploads import without_metadata

SECRET = "Doe_Jane_19550101_MRN4711"


def test_real_jpegs_keep_their_pixels_and_lose_their_metadata(oct_images, pixels):
    scans = random.Random(0).sample(list(oct_images), min(40, len(oct_images)))
    for scan in scans:
        data = scan.read_bytes()
        stored, extension = without_metadata(data, "jpeg")
        assert extension == "jpeg" and np.array_equal(pixels(stored), pixels(data))
        assert b"\xff\xe1" not in stored[:stored.find(b"\xff\xda")]  # no APP1 (EXIF, XMP) before the scan


def test_every_place_metadata_hides_is_emptied(demo_scans, pixels, with_metadata):
    img = Image.open(demo_scans["DME"]).convert("RGB")
    exif = Image.Exif()
    exif[0x010E] = SECRET
    progressive = io.BytesIO()  # APPn, ICC, COM, several scans, and text after the end of the image
    img.save(progressive, format="JPEG", exif=exif, comment=SECRET.encode(), progressive=True,
             icc_profile=b"ICC " + SECRET.encode())
    rotated = io.BytesIO()  # EXIF orientation: the decoder turns it, so the stored copy is the turned pixels
    exif[0x0112] = 8
    img.save(rotated, format="JPEG", exif=exif)
    tiff = io.BytesIO()
    img.save(tiff, format="TIFF", description=SECRET)
    cases = [(progressive.getvalue() + SECRET.encode(), "jpeg", "jpeg"), (rotated.getvalue(), "jpeg", "png"),
             (with_metadata["jpeg"](demo_scans["CNV"], SECRET), "jpeg", "jpeg"),
             (with_metadata["png"](demo_scans["CNV"], SECRET), "png", "png"), (tiff.getvalue(), "tiff", "png")]
    for data, sniffed, kept_as in cases:
        assert SECRET.encode() in data
        stored, extension = without_metadata(data, sniffed)
        assert extension == kept_as and SECRET.encode() not in stored
        assert np.array_equal(pixels(stored), pixels(data))
    assert pixels(rotated.getvalue()).shape[:2] == (img.width, img.height)  # it was turned indeed

"""Prepare colour fundus photographs: find the circular field of view, crop the black border, square, resize.

Fundus cameras (Kaggle 2015 / EyePACS, IDRiD) record a bright disc on a black background, often cut
by the frame at the top and bottom. `find_fov` (fov.py) locates the disc on a downscaled copy,
`prepare_image` (crop.py) crops it, pads it to a square (black, the disc centred) and resizes it,
optionally with Graham's contrast normalisation (Kaggle 2015 winner). `prepare_fundus` (prepare.py)
does a folder or a labels CSV in parallel, resumably, writing only under the destination.
"""

from __future__ import annotations

from .crop import MIN_FOV_FRACTION, MIN_SIDE, UnusableFundusError, prepare_image
from .fov import FOV, MIN_PEAK, WORK_SIDE, find_fov
from .prepare import FORMATS, REPORT_NAME, PrepareReport, prepare_fundus

__all__ = ["FOV", "FORMATS", "MIN_FOV_FRACTION", "MIN_PEAK", "MIN_SIDE", "REPORT_NAME", "WORK_SIDE", "PrepareReport",
           "UnusableFundusError", "find_fov", "prepare_fundus", "prepare_image"]

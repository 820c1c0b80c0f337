"""POST /api/volume: uploaded B-scans as one OCT volume, answered by predict/volume.py's rule.

The B-scans are put in the natural order of their file names (browsers send files in any order) and
each is analysed and stored as /api/predict does (so each has its id, image and heat map); the volume's
answer comes from their model results, the quality gate's verdicts included.
"""

from __future__ import annotations

import os
from typing import Any

from ..config import VolumeConfig
from ..data.volumes import natural_key
from ..predict.volume import aggregate
from .service import Upload, jsonable

UPLOAD_GROUPING = "upload"  # the user said these files are one acquisition

VOLUME_DESCRIPTION = (
    "The uploaded B-scans as one OCT volume: `{volume, results}`. `results` are the B-scans in the natural order of "
    "their names, each as /api/predict gives it; `volume` is the eye-level answer: `label`, `referral`, `refer`, "
    "`p_referral` and `probabilities` of the B-scan that decided (`index_slice`, a position in `results`), "
    "`suspicious` (positions of the most suspicious B-scans), `gate` (`ok` false: too few gradable B-scans; then "
    "no label, level or decision), counts of ungradable and unreadable B-scans, and the `rule` in words.")


def in_slice_order(files: list[tuple[str | None, bytes]]) -> list[tuple[str | None, bytes]]:
    return sorted(files, key=lambda f: natural_key(os.path.basename(f[0] or "")))


def volume_answer(uploads: list[Upload], predictions: list[dict[str, Any]], rule: VolumeConfig = VolumeConfig(),
                  ) -> dict[str, Any]:
    """The volume's result (without its slices: they are the response's `results`)."""
    good = iter(predictions)
    slices = [{"input": u.name, "error": u.error} if u.error else next(good) | {"input": u.name} for u in uploads]
    answer = aggregate(f"{len(uploads)} uploaded B-scans", UPLOAD_GROUPING, slices, rule)
    return jsonable({k: v for k, v in answer.items() if k != "slices"})

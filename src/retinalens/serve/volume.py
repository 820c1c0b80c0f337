"""POST /api/volume: uploaded B-scans as one OCT volume, answered by predict/volume.py's rule.

The B-scans are put in the natural order of their file names (browsers send files in any order); a
multi-frame DICOM upload (an Ophthalmic Tomography volume in one file) stands for its frames, in file
order, each re-encoded losslessly as the command line does (data/volumes.py). Each B-scan is analysed and stored as /api/predict does (so each has its id, image and heat map); the volume's
answer comes from their model results, the quality gate's verdicts included.
"""

from __future__ import annotations

import os
from typing import Any

from ..config import VolumeConfig
from ..data.decode import decode_frames, is_dicom
from ..data.volumes import natural_key, png_bytes
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
    """The uploads in slice order, a multi-frame DICOM file replaced by its frames. Raises the decoder's
    ImageDecodeError (DicomTooLarge for a frame-count or size bomb, told by its header before any frame
    is decoded) for a DICOM volume that cannot be read whole."""
    out: list[tuple[str | None, bytes]] = []
    for name, data in sorted(files, key=lambda f: natural_key(os.path.basename(f[0] or ""))):
        frames = list(decode_frames(data, name=name or "upload", keep_grey=True)) if is_dicom(data) else []
        if len(frames) < 2:
            out.append((name, data))  # an ordinary image, a one-frame DICOM file included
        else:
            out += [(f"{name or 'upload'}#frame {i + 1}", png_bytes(f)) for i, f in enumerate(frames)]
    return out


def volume_answer(uploads: list[Upload], predictions: list[dict[str, Any]], rule: VolumeConfig = VolumeConfig(),
                  ) -> dict[str, Any]:
    """The volume's result (without its slices: they are the response's `results`)."""
    good = iter(predictions)
    slices = [{"input": u.name, "error": u.error} if u.error else next(good) | {"input": u.name} for u in uploads]
    answer = aggregate(f"{len(uploads)} uploaded B-scans", UPLOAD_GROUPING, slices, rule)
    return jsonable({k: v for k, v in answer.items() if k != "slices"})

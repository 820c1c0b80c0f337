"""OCT volumes in the web app, answered by predict/volume.py's rule.

POST /api/volume: the uploaded B-scans are one volume, put in the natural order of their file names
(browsers send files in any order). POST /api/predict: each multi-frame DICOM file (an Ophthalmic
Tomography volume in one file) is a volume of its own, as `predict` on the command line makes it, and
the other files are images. Either way a multi-frame file stands for its frames, in file order, each
re-encoded losslessly as the command line does (data/volumes.py); whether a DICOM file is multi-frame
is read from its header, so a one-frame file is decoded only by the ordinary path. Each B-scan is
analysed and stored as /api/predict does (so each has its id, image and heat map); the volume's answer
comes from their model results, the quality gate's verdicts included.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ..config import VolumeConfig
from ..data.decode import decode_frames, is_dicom
from ..data.dicom import DicomTooLarge
from ..data.volumes import dicom_frame_count, natural_key, png_bytes
from ..errors import ImageDecodeError
from ..predict.volume import aggregate
from .service import Upload, jsonable
from .uploads import display_name

UPLOAD_GROUPING = "upload"  # the user said these files are one acquisition

VOLUME_DESCRIPTION = (
    "The uploaded B-scans as one OCT volume: `{volume, results}`. `results` are the B-scans in the natural order of "
    "their names, each as /api/predict gives it; `volume` is the eye-level answer: `label`, `referral`, `refer`, "
    "`p_referral` and `probabilities` of the B-scan that decided (`index_slice`, a position in `results`), "
    "`suspicious` (positions of the most suspicious B-scans), `gate` (`ok` false: too few gradable B-scans; then "
    "no label, level or decision), counts of ungradable and unreadable B-scans, and the `rule` in words.")


@dataclass
class Expanded:
    """A request's files as the model takes them: each multi-frame DICOM file replaced by its frames."""

    files: list[tuple[str | None, bytes]] = field(default_factory=list)
    origin: list[int] = field(default_factory=list)  # each entry's position in the request
    volumes: list[tuple[int, str | None, range]] = field(default_factory=list)  # (position, name, entries) a file
    errors: dict[int, str] = field(default_factory=dict)  # entry -> why a multi-frame file could not be read


def header_frames(data: bytes) -> int:
    """How many frames a DICOM upload's header says it holds, read with `stop_before_pixels` (nothing
    decoded, so a one-frame file is decoded once, by the ordinary path); 1 for any other upload, 0 for a
    header that cannot be read (the ordinary path refuses that file with the rest)."""
    return dicom_frame_count(data) if is_dicom(data) else 1


def with_frames(files: list[tuple[str | None, bytes]], *, whole: bool = False) -> Expanded:
    """The files, each multi-frame DICOM file replaced by its frames in file order (re-encoded losslessly
    as the command line does, data/volumes.py). DicomTooLarge (a frame-count or size bomb, told by the
    header before any frame is decoded) is always raised; any other ImageDecodeError is raised when the
    files are one volume (`whole`: a part volume must not be answered), else kept as that file's error."""
    out = Expanded()
    for position, (name, data) in enumerate(files):
        if header_frames(data) < 2:
            out.files.append((name, data))  # an ordinary image, a one-frame DICOM file included
            out.origin.append(position)
            continue
        label = name or "upload"
        try:
            frames = [png_bytes(f) for f in decode_frames(data, name=label, keep_grey=True)]
        except DicomTooLarge:
            raise
        except ImageDecodeError as exc:
            if whole:
                raise
            out.errors[len(out.files)] = str(exc)
            out.files.append((name, data))
            out.origin.append(position)
            continue
        start = len(out.files)
        out.files += [(f"{label}#frame {i + 1}", frame) for i, frame in enumerate(frames)]
        out.origin += [position] * len(frames)
        out.volumes.append((position, name, range(start, len(out.files))))
    return out


def in_slice_order(files: list[tuple[str | None, bytes]]) -> Expanded:
    """The uploads of one volume in slice order (natural order of their names), a multi-frame DICOM file
    replaced by its frames; raises the decoder's ImageDecodeError for a DICOM volume that cannot be read whole."""
    return with_frames(sorted(files, key=lambda f: natural_key(os.path.basename(f[0] or ""))), whole=True)


def per_file(expanded: Expanded, uploads: list[Upload], predictions: list[dict[str, Any]],
             results: list[dict[str, Any]], rule: VolumeConfig = VolumeConfig()) -> dict[str, Any]:
    """/api/predict's answer: `results`, one per file that is one image (`index`: its position in the
    request), and `volumes`, one `{index, name, volume, results}` per multi-frame file, answered as a volume
    (grouping "file") from its frames' results (`index`: the frame's position in the volume)."""
    good = iter(predictions)
    model = [None if u.error else next(good) for u in uploads]
    inside = {k for *_, span in expanded.volumes for k in span}
    volumes = []
    for position, filename, span in expanded.volumes:
        name = display_name(filename, position)
        answer = volume_answer([uploads[k] for k in span], [model[k] for k in span if model[k] is not None], rule,
                               volume_id=name, grouping="file")
        volumes.append({"index": position, "name": name, "volume": answer,
                        "results": [results[k] | {"index": i} for i, k in enumerate(span)]})
    plain = [r | {"index": expanded.origin[k]} for k, r in enumerate(results) if k not in inside]
    return {"results": plain, "volumes": volumes}


def volume_answer(uploads: list[Upload], predictions: list[dict[str, Any]], rule: VolumeConfig = VolumeConfig(), *,
                  volume_id: str | None = None, grouping: str = UPLOAD_GROUPING) -> dict[str, Any]:
    """The volume's result (without its slices: they are the response's `results`); `predictions` are
    those of the uploads without an error, in order."""
    good = iter(predictions)
    slices = [{"input": u.name, "error": u.error} if u.error else next(good) | {"input": u.name} for u in uploads]
    answer = aggregate(volume_id or f"{len(uploads)} uploaded B-scans", grouping, slices, rule)
    return jsonable({k: v for k, v in answer.items() if k != "slices"})

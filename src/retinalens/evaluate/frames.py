"""The B-scans an evaluation scores: each image file, and each frame of a multi-frame file.

A multi-frame file (DICOM Ophthalmic Tomography, a multi-page TIFF: data/volumes.py's frame_formats)
is an OCT volume. Its frames are its B-scans: each is scored like an image, labelled with the file's
label and patient (discover's, from the file's tags), and the file is one volume (grouping "file").
Which files are multi-frame is read from their headers (frame_count), nothing decoded.

Each frame goes through the one decoder as the PNG re-encoding that `predict --volumes` makes of it
(data/volumes.py's multi_frame_volume), so both give a frame the same pixels. Its feature-cache key is
the sha256 of that PNG: what the backbone's decoder reads, as an image file's key is the sha256 of its
bytes. A key made of the file's hash and the frame's index would spare a cached run the decoding, but
the quality gate decodes every frame anyway, and such a key would keep the features of a frame whose
decoded pixels changed (a DICOM decoder that windows differently); this one changes with the pixels.

Memory: the frames of one multi-frame file at a time are held, as PNGs (lossless; about the size of
the file's uncompressed pixels), beside the file's bytes and one decoded frame; then only their
features stay, as for any image. The ordinary images are scored first, as one group, as before.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..bundle.store import Bundle
from ..data.discover import Sample
from ..data.images import ImageItem
from ..data.volumes import frame_count, multi_frame_volume
from ..errors import RetinaLensError
from ..features.cache import FeatureCache
from ..features.extract import ExtractReport, extract_features, head_inputs, open_cache
from ..models.heads import head_probabilities
from ..predict.ensemble import ensemble_outputs
from .trust import gate_verdicts


@dataclass(frozen=True)
class BScan:
    """One scored B-scan: an image file (`frame` None) or frame `frame` (0-based) of a multi-frame file."""

    sample: Sample  # the file's: its label and patient
    sha256: str  # its feature-cache key: the file's hash, or the hash of the frame's PNG
    frame: int | None = None

    @property
    def name(self) -> str:
        """As results name it: the file, or "file#frame N" (1-based) as predict --volumes does."""
        return str(self.sample.path) if self.frame is None else f"{self.sample.path}#frame {self.frame + 1}"


@dataclass
class Scored:
    """What the model made of the B-scans that could be read, in one order: the images, then the frames
    of each multi-frame file in turn."""

    bscans: list[BScan] = field(default_factory=list)
    raw_probs: list[np.ndarray] = field(default_factory=list)  # per group; probabilities() joins them
    pooled: list[np.ndarray] = field(default_factory=list)
    verdicts: list[dict] | None = None  # the quality gate's, one per B-scan (None: the bundle has none)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (input, reason), a broken file once
    n_files: int = 0  # multi-frame files whose frames were scored

    @property
    def probabilities(self) -> np.ndarray:
        """(N, K) head probabilities before the bundle's temperature, one row per B-scan."""
        return np.concatenate(self.raw_probs) if self.raw_probs else np.zeros((0, 0))

    def features(self) -> np.ndarray:
        """(N, C) pooled features, one row per B-scan."""
        return np.concatenate(self.pooled) if self.pooled else np.zeros((0, 0), dtype=np.float32)

    def load(self, indices: Sequence[int]) -> list[ImageItem]:
        """What the decoder reads for these B-scans (the report's gallery): an image's path, a frame's
        PNG; each multi-frame file is decoded once for all of its frames asked for."""
        wanted: dict[Path, list[int]] = {}
        for b in (self.bscans[i] for i in indices):
            if b.frame is not None:
                wanted.setdefault(b.sample.path, []).append(b.frame)
        pngs: dict[tuple[Path, int], ImageItem] = {}
        for path, frames in wanted.items():
            volume = multi_frame_volume(path)
            slices = volume.slices if volume is not None else ()
            if max(frames) >= len(slices):
                raise RetinaLensError(f"{path}: no longer holds the frames it was evaluated with")
            pngs.update({(path, k): slices[k].item for k in frames})
        return [b.sample.path if b.frame is None else pngs[(b.sample.path, b.frame)]
                for b in (self.bscans[i] for i in indices)]


def multi_frame(samples: Sequence[Sample]) -> list[bool]:
    """Whether each sample's file is multi-frame, by its header (a header that cannot be read: True for a
    multi-frame format, so that the file is listed as unreadable once, by frame_group)."""
    def many(path: Path) -> bool:
        try:
            return frame_count(path) >= 2
        except RetinaLensError:
            return True
    return [many(s.path) for s in samples]


def frame_groups(samples: Sequence[Sample], hashes: Sequence[str], failures: list[tuple[str, str]],
                 ) -> Iterator[tuple[list[BScan], list[ImageItem]]]:
    """(B-scans, what the decoder reads for each): the image files first, together, then each multi-frame
    file's frames, one file at a time (its frames are decoded when its turn comes). A multi-frame file
    that cannot be read whole is one entry of `failures`, and none of its frames is scored."""
    many = multi_frame(samples)
    images = [i for i, m in enumerate(many) if not m]
    if images:
        yield [BScan(samples[i], hashes[i]) for i in images], [samples[i].path for i in images]
    for i in (i for i, m in enumerate(many) if m):
        try:
            volume = multi_frame_volume(samples[i].path)
        except RetinaLensError as exc:
            failures.append((str(samples[i].path), str(exc)))
            continue
        if volume is None:  # the header counted frames its pixel data does not hold as two or more
            failures.append((str(samples[i].path), f"{samples[i].path}: holds fewer than 2 frames"))
            continue
        items = [s.item for s in volume.slices]
        yield [BScan(samples[i], hashlib.sha256(item).hexdigest(), k) for k, item in enumerate(items)], items


def score_bscans(bundle: Bundle, samples: Sequence[Sample], hashes: Sequence[str], cache: str | Path | None, *,
                 workers: int = 0, progress: bool = True) -> Scored:
    """Every B-scan of `samples` (files with their sha256s) through the bundle: a single network through
    its feature cache (an explicit `cache` holding other features is an error; the default root keys
    folders by backbone), an ensemble through the prediction path (predict/ensemble.py); the quality
    gate's verdicts per group, while its frames are held."""
    scored = Scored(verdicts=[] if bundle.manifest.gate is not None else None)
    store = None if bundle.is_ensemble else open_cache(
        cache, bundle.backbone, bundle.precision, spatial=bundle.head_config.input_kind == "spatial",
        on_mismatch="error" if cache is not None else "rebuild")
    for bscans, items in frame_groups(samples, hashes, scored.failures):
        names = [b.name for b in bscans]
        frames = bscans[0].frame is not None
        if store is None:
            keep, raw, pooled, failed = ensemble_outputs(bundle.members, bundle.views, items, names=names,
                                                         workers=workers, progress=progress and not frames)
        else:
            report, keep, raw = cached_probabilities(bundle, store, items, [b.sha256 for b in bscans],
                                                     workers=workers, progress=progress and not frames)
            # A frame's failure is named as the frame, not by the bytes it was read from.
            failed = [(names[k], store.failure(b.sha256) or "not extracted") for k, b in enumerate(bscans)
                      if b.sha256 not in store] if frames else report.failures
            pooled = store.pooled([bscans[k].sha256 for k in keep])
        scored.failures += failed
        scored.n_files += frames
        if not keep:
            continue
        scored.bscans += [bscans[k] for k in keep]
        scored.raw_probs.append(raw)
        scored.pooled.append(pooled)
        verdicts = gate_verdicts(bundle, [items[k] for k in keep], pooled, workers=workers)
        if scored.verdicts is not None and verdicts is not None:
            scored.verdicts += verdicts
    return scored


def cached_probabilities(bundle: Bundle, store: FeatureCache, items: Sequence[ImageItem], hashes: Sequence[str], *,
                         workers: int = 0, progress: bool = True) -> tuple[ExtractReport, list[int], np.ndarray]:
    """The bundle's head probabilities (before calibration) on images through its feature cache `store`,
    extracting what it lacks: (the extraction report, the indices of the images read, probabilities)."""
    report = extract_features(list(items), list(hashes), bundle.backbone, store, precision=bundle.precision,
                              workers=workers, progress=progress)
    keep = [i for i, h in enumerate(hashes) if h in store]
    return report, keep, head_probabilities(bundle.head, head_inputs(store, [hashes[i] for i in keep],
                                                                     bundle.head_config.input_kind))

"""The report's gallery: misclassified images as thumbnails beside their Grad-CAM overlays.

Heat maps are computed for the misclassified images only, the most confident mistakes first (they
teach the most), batched per predicted class so each map explains the class the evaluation gave.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from ..bundle.store import Bundle
    from ..predict.model import Model

GALLERY_LIMIT = 48
THUMBNAIL_SIDE = 192


@dataclass
class GalleryItem:
    name: str
    true_class: str
    predicted: str
    confidence: float  # the evaluation's probability of the (wrong) predicted class
    image_jpeg: bytes  # thumbnail of the image
    overlay_jpeg: bytes  # the same with the heat map of the predicted class


def misclassified_gallery(model: Model | Bundle, images: Sequence[str | Path], y_true: np.ndarray, probs: np.ndarray,
                          classes: Sequence[str], *, limit: int = GALLERY_LIMIT, batch_size: int = 16,
                          side: int = THUMBNAIL_SIDE, load: Callable[[Sequence[int]], list[Any]] | None = None,
                          ) -> tuple[list[GalleryItem], int, list[dict]]:
    """(items, number misclassified, failures): at most `limit` misclassified images, most confident first.
    `images` name them; `load(indices)` gives what the decoder reads for those (default: the files named),
    called for the chosen ones only (a frame of a multi-frame file is decoded again when shown)."""
    from .explainer import Explainer

    predicted = np.argmax(probs, axis=1)
    wrong = np.flatnonzero(predicted != np.asarray(y_true))
    chosen = sorted(wrong.tolist(), key=lambda i: (-probs[i, predicted[i]], str(images[i])))[:limit]
    by_index: dict[int, GalleryItem] = {}
    failures: list[dict] = []
    with Explainer(model) as ex:
        for k in sorted({int(predicted[i]) for i in chosen}):
            group = [i for i in chosen if predicted[i] == k]
            sources = load(group) if load is not None else [Path(images[i]) for i in group]
            results = ex.explain_many(sources, classes[k], batch_size=batch_size, max_side=side)
            for i, result in zip(group, results):
                if isinstance(result, dict):
                    failures.append(result)
                    continue
                by_index[i] = GalleryItem(str(images[i]), classes[int(y_true[i])], classes[k], float(probs[i, k]),
                                          jpeg_bytes(result.image), jpeg_bytes(result.overlay))
    return [by_index[i] for i in chosen if i in by_index], len(wrong), failures


def jpeg_bytes(image: Image.Image | None, quality: int = 82) -> bytes:
    buffer = io.BytesIO()
    if image is not None:
        image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()

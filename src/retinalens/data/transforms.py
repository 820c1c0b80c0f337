"""Preprocessing from the backbone's own config: the single transform used everywhere.

The config travels with every feature cache and every model bundle, so that training,
evaluation, prediction, export and serving feed the backbone exactly the same pixels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from . import retinal_band
from .decode import ImageSource, decode_image

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}
RESIZES = ("squash", "squash+band")  # squash+band: the OCT two-view input of data/retinal_band.py
# The part of the input a network reads, by resize mode: "whole", or one view of the two-view input
# (a network each, averaged: one head over both views' maps lost on CV, README "The two-view input").
VIEWS = {"squash": ("whole",), "squash+band": ("squash", "band")}


@dataclass(frozen=True)
class Preprocessing:
    """How an RGB image becomes the backbone's input tensor.

    `resize="squash"` resizes the whole image to size x size. OCT B-scans are wide (up to 3:1) and
    the lesion may sit anywhere along the scan, so we keep the whole field of view rather than
    centre-cropping it away (the original pipeline did the same). `resize="squash+band"` adds the
    retinal band in aspect-kept tiles beside the squash (data/retinal_band.py): size x 4 size.
    `view` is the part of that input the backbone reads (`columns`): the whole of it, or one view of the
    two-view input; all views share the pixels, so an ensemble of views decodes each image once.
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize: str = "squash"
    view: str = "whole"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self) | {"mean": list(self.mean), "std": list(self.std)}  # JSON-shaped, to compare with a manifest
        if self.view == "whole":  # not written: every cache key and bundle from before views stays what it was
            del d["view"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocessing":
        return cls(
            size=int(d["size"]),
            mean=tuple(float(x) for x in d["mean"]),  # type: ignore[arg-type]
            std=tuple(float(x) for x in d["std"]),  # type: ignore[arg-type]
            interpolation=str(d.get("interpolation", "bicubic")),
            resize=str(d.get("resize", "squash")),
            view=str(d.get("view", "whole")),
        )

    @classmethod
    def from_timm_config(cls, cfg: dict[str, Any]) -> "Preprocessing":
        _, h, w = cfg["input_size"]
        return cls(size=int(h), mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), interpolation=cfg["interpolation"])

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the model input: (S, S), or (S, 4 S) for the two-view input."""
        return (self.size, self.size * (1 + retinal_band.TILES) if self.resize == "squash+band" else self.size)

    @property
    def columns(self) -> tuple[int, int]:
        """The input's columns the backbone reads: all of them, the squash's (0, S) or the band's (S, 4 S)."""
        return {"squash": (0, self.size), "band": (self.size, self.shape[1])}.get(self.view, (0, self.shape[1]))

    @property
    def view_shape(self) -> tuple[int, int]:
        """(height, width) of what the backbone sees: the `columns` of the input."""
        a, b = self.columns
        return (self.size, b - a)

    def pixels(self, img: Image.Image) -> torch.Tensor:
        """RGB PIL image -> resized uint8 (H, W, 3) of `shape`. Normalisation happens batched, in
        `normalize`: a quarter of the bytes cross from decoding workers, and channels-last comes for free."""
        resample = _RESAMPLE.get(self.interpolation, Image.Resampling.BICUBIC)
        if self.resize == "squash+band":
            img = retinal_band.pixels(img, self.size, resample)
        elif img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), resample)
        return torch.from_numpy(np.array(img.convert("RGB"), dtype=np.uint8))

    def place_heatmap(self, heat: np.ndarray, img: Image.Image) -> np.ndarray:
        """A heat map over the model input (`shape`) -> the image's (H, W), float32 in [0, 1]: resized
        (squash), or each view's part put back on the scan pixels it shows (squash+band)."""
        if self.resize == "squash+band":
            return retinal_band.place_heatmap(heat, img, self.size)
        return resize_heatmap(heat, img.size)

    def load(self, source: ImageSource, *, name: str | None = None) -> torch.Tensor:
        """Decode + resize: the path from a file (or bytes) to the model's uint8 input."""
        # No JPEG draft decoding here: it changes pixels (and predictions) with the file format and
        # resolution, and the same scan must give the same answer as JPEG, PNG or a larger export.
        return self.pixels(decode_image(source, name=name, keep_grey=True))

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> float32 (N, 3, H, w), channels-last in memory, mean/std applied, only
        the view's `columns` (w of W): every network (traced, eager, exported) reads its view here."""
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        if self.view != "whole":
            a, b = self.columns
            batch = batch[:, :, a:b]
        return (batch.permute(0, 3, 1, 2).float() - mean) / std


def resize_heatmap(heat: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An (h, w) map -> (H, W) for an image of PIL size (W, H), bilinear, still in [0, 1]."""
    if heat.shape[::-1] == tuple(size):
        return heat.astype(np.float32)
    resized = Image.fromarray(heat.astype(np.float32)).resize(size, Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)

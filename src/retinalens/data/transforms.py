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

from .decode import ImageSource, decode_image

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class Preprocessing:
    """How an RGB image becomes the backbone's input tensor.

    `resize="squash"` resizes the whole image to size x size. OCT B-scans are wide (up to 3:1) and
    the lesion may sit anywhere along the scan, so we keep the whole field of view rather than
    centre-cropping it away (the original pipeline did the same).
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize: str = "squash"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return d | {"mean": list(self.mean), "std": list(self.std)}  # JSON-shaped, so it compares with a manifest

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocessing":
        return cls(
            size=int(d["size"]),
            mean=tuple(float(x) for x in d["mean"]),  # type: ignore[arg-type]
            std=tuple(float(x) for x in d["std"]),  # type: ignore[arg-type]
            interpolation=str(d.get("interpolation", "bicubic")),
            resize=str(d.get("resize", "squash")),
        )

    @classmethod
    def from_timm_config(cls, cfg: dict[str, Any]) -> "Preprocessing":
        _, h, w = cfg["input_size"]
        return cls(size=int(h), mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), interpolation=cfg["interpolation"])

    def pixels(self, img: Image.Image) -> torch.Tensor:
        """RGB PIL image -> resized uint8 (S, S, 3). Normalisation happens batched, in `normalize`:
        a quarter of the bytes cross from decoding workers, and channels-last comes for free."""
        if img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), _RESAMPLE.get(self.interpolation, Image.Resampling.BICUBIC))
        return torch.from_numpy(np.array(img.convert("RGB"), dtype=np.uint8))

    def load(self, source: ImageSource, *, name: str | None = None) -> torch.Tensor:
        """Decode + resize: the path from a file (or bytes) to the model's uint8 input."""
        # No JPEG draft decoding here: it changes pixels (and predictions) with the file format and
        # resolution, and the same scan must give the same answer as JPEG, PNG or a larger export.
        return self.pixels(decode_image(source, name=name, keep_grey=True))

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 (N, S, S, 3) -> float32 (N, 3, S, S), channels-last in memory, mean/std applied."""
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        return (batch.permute(0, 3, 1, 2).float() - mean) / std

"""One deployable graph per bundle: uint8 pixels -> (class probabilities, pooled features).

Every export format traces this module, so ONNX, TorchScript and Core ML share one contract: the
input is exactly what `Preprocessing.load` produces, stacked (N, S, S, 3) uint8 RGB; normalisation
runs inside the graph (as in the backbone's own traced path); the outputs are the class
probabilities (N, K), calibrated (logits divided by the bundle's temperature before the softmax:
the numbers `evaluate.calibration.calibrated` gives), and the globally pooled backbone features
(N, C) float32, which the quality gate reads.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..errors import RetinaLensError
from ..evaluate.calibration import bundle_temperature
from ..models.bundle import Bundle

# Bumped whenever the graph or its metadata change: cached exports of an older design are rebuilt.
EXPORT_VERSION = 1
INPUT_NAME = "pixels"
OUTPUT_NAMES = ("probabilities", "pooled")


def graph_temperature(manifest: dict[str, Any]) -> float:
    """The softmax temperature of a calibrated bundle (manifest["calibration"]["temperature"]), else 1."""
    t = bundle_temperature(manifest)
    if t is not None and not (math.isfinite(t) and t > 0):
        raise RetinaLensError(f"bundle calibration temperature must be a positive number, got {t}")
    return 1.0 if t is None else t


class DeployableModel(nn.Module):
    """Backbone + head as one module (fp32, eval): uint8 (N, S, S, 3) -> (probabilities (N, K), pooled (N, C))."""

    def __init__(self, bundle: Bundle) -> None:
        super().__init__()
        backbone = bundle.backbone
        self.features = backbone.model
        self.head = bundle.head.eval()
        self.preprocessing = backbone.preprocessing
        # Every spatial head (conv, dense, ...) takes channels-last maps, as the feature cache stores them.
        self.spatial = bundle.head_config.input_kind == "spatial"
        self.temperature = graph_temperature(bundle.manifest)
        self.eval()

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.features.forward_features(self.preprocessing.normalize(pixels)).float()
        pooled = maps.mean(dim=(2, 3))
        logits = self.head(maps.permute(0, 2, 3, 1) if self.spatial else pooled)
        return torch.softmax(logits / self.temperature, dim=1), pooled


def export_metadata(bundle: Bundle, fmt: str, input_dtype: str = "uint8") -> dict[str, Any]:
    """Everything a consumer needs besides the graph: classes, pixels contract, referral, provenance."""
    m = bundle.manifest
    size = bundle.preprocessing.size
    c = int(m["features"]["feature_shape"][0])
    return {
        "retinalens_export": EXPORT_VERSION,
        "format": fmt,
        "classes": bundle.classes,
        "referral": bundle.referral,
        "positive_classes": bundle.positive_classes,
        "preprocessing": bundle.preprocessing.to_dict(),
        "input": {"name": INPUT_NAME, "dtype": input_dtype, "shape": ["N", size, size, 3],
                  "meaning": "RGB pixels 0-255, decoded and resized to size x size as Preprocessing.load does "
                             "(resize 'squash', the given interpolation); normalisation is inside the graph"},
        "outputs": {"probabilities": ["N", len(bundle.classes)], "pooled": ["N", c]},
        "temperature": graph_temperature(m),
        "backbone": {k: m["backbone"].get(k) for k in ("name", "timm_name", "weights_sha256")},
        "head": m["head"],
        "bundle": {"manifest_sha256": bundle.manifest_sha256, "format": m.get("format"), "created": m.get("created"),
                   "task": m.get("task"), "name": bundle.path.name},
        "retinalens_version": __version__,
        "torch_version": torch.__version__,
    }

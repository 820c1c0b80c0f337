"""One deployable graph per bundle: uint8 pixels -> (class probabilities, pooled features).

Every export format traces this module, so ONNX, TorchScript and Core ML share one contract: the
input is exactly what `Preprocessing.load` produces, stacked (N, S, S, 3) uint8 RGB; normalisation
runs inside the graph (as in the backbone's own traced path); the outputs are the class
probabilities (N, K), calibrated (logits divided by the bundle's temperature before the softmax:
the numbers `evaluate.calibration.calibrated` gives), and the globally pooled backbone features
(N, C) float32, which the quality gate reads. An ensemble bundle is one graph all the same: every
member and every test-time view, and their average (bundle/network.py's Ensemble).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .._version import __version__
from .._deps import silenced
from ..errors import RetinaLensError
from ..bundle.network import Ensemble
from ..bundle.store import Bundle

# Bumped whenever the graph or its metadata change: cached exports of an older design are rebuilt.
EXPORT_VERSION = 2
INPUT_NAME = "pixels"
OUTPUT_NAMES = ("probabilities", "pooled")


def graph_temperature(bundle: Bundle) -> float:
    """The softmax temperature of a calibrated bundle, else 1."""
    t = bundle.temperature
    if t is not None and not (math.isfinite(t) and t > 0):
        raise RetinaLensError(f"bundle calibration temperature must be a positive number, got {t}")
    return 1.0 if t is None else t


class DeployableModel(nn.Module):
    """The bundle's networks (fp32, eval) with the calibrated softmax on top:
    uint8 (N, S, S, 3) -> (probabilities (N, K), pooled (N, C))."""

    def __init__(self, bundle: Bundle) -> None:
        super().__init__()
        self.net = Ensemble.from_bundle(bundle, temperature=graph_temperature(bundle))
        self.eval()

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net(pixels)


_INPUT_MEANING = {  # what a consumer must feed, by preprocessing resize mode (data/transforms.RESIZES)
    "squash": "RGB pixels 0-255, decoded and resized to size x size as Preprocessing.load does (resize 'squash', "
              "the given interpolation); normalisation is inside the graph",
    "squash+band": "RGB pixels 0-255 as Preprocessing.load makes them (resize 'squash+band', "
                   "retinalens.data.retinal_band): the scan squashed to size x size, then its retinal band, found "
                   "from the image outside the graph, in 3 aspect-kept size x size tiles, side by side; "
                   "normalisation is inside the graph"}


def export_metadata(bundle: Bundle, fmt: str, input_dtype: str = "uint8") -> dict[str, Any]:
    """Everything a consumer needs besides the graph: classes, pixels contract, referral, provenance."""
    m = bundle.manifest
    pp = bundle.preprocessing
    h, w = pp.shape
    c = int(m.feature_shape[0])
    return {
        "retinalens_export": EXPORT_VERSION,
        "format": fmt,
        "classes": bundle.classes,
        "referral": bundle.referral,
        "positive_classes": bundle.positive_classes,
        "preprocessing": bundle.preprocessing.to_dict(),
        "input": {"name": INPUT_NAME, "dtype": input_dtype, "shape": ["N", h, w, 3], "meaning": _INPUT_MEANING[pp.resize]},
        "outputs": {"probabilities": ["N", len(bundle.classes)], "pooled": ["N", c]},
        "temperature": graph_temperature(bundle),
        "backbone": {"name": m.backbone.name, "timm_name": m.backbone.timm_name,
                     "weights_sha256": m.backbone.weights_sha256},
        "head": m.head.to_dict(),
        "ensemble": {"members": [{"backbone": e.backbone.name, "weights_sha256": e.backbone.weights_sha256,
                                  "head": e.head.kind, "temperature": e.temperature} for e in m.ensemble()],
                     "views": list(m.tta)},
        "bundle": {"manifest_sha256": bundle.manifest_sha256, "format": m.format, "created": m.created,
                   "task": m.task, "name": bundle.path.name},
        "retinalens_version": __version__,
        "torch_version": torch.__version__,
    }


@contextlib.contextmanager
def converting(fmt: str, bundle: Bundle) -> Iterator[None]:
    """Turn an exporter failure (an operator it cannot express) into one clear line."""
    try:
        with silenced(), torch.no_grad():
            yield
    except RetinaLensError:
        raise
    except Exception as exc:  # noqa: BLE001 - exporters raise many types; all mean "cannot convert"
        raise RetinaLensError(f"{bundle.path}: backbone '{bundle.manifest.backbone.name}' cannot be "
                              f"exported to {fmt} ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]})") from None

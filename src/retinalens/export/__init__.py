"""Deployment: a bundle as one graph (ONNX, TorchScript, Core ML) and the onnxruntime inference path.

    from retinalens.export import export_bundle, OnnxModel
    export_bundle("bundle", "onnx", "model.onnx")        # + model.onnx.json, the metadata sidecar
    OnnxModel("model.onnx").probabilities(pixels)         # uint8 (N, S, S, 3) -> (N, K)

Optional dependencies (onnx, onnxruntime, coremltools) are imported only when used.
"""

from __future__ import annotations

from .formats import FORMATS, export_bundle
from .runtime import RUNTIMES, OnnxModel

__all__ = ["FORMATS", "RUNTIMES", "OnnxModel", "export_bundle"]

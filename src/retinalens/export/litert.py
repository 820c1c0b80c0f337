"""LiteRT (TensorFlow Lite) export for phones: `retinalens export BUNDLE --format tflite [--quantize int8]`.

The converter is Google's litert-torch (the maintained successor of ai-edge-torch; it installs beside
torch 2.14 without replacing it): it exports the same DeployableModel as every other format, so the
contract is the same: uint8 RGB pixels (1, S, S, 3) in, calibrated probabilities (1, K) and pooled
features (1, C) out, normalisation and the temperature inside the graph. The batch is fixed at one
image: that is how a phone app runs it, and LiteRT's delegates prefer static shapes.

Three quantised variants, all by ai-edge-quantizer, and their effect on accuracy is measured in
`make bench` (section `litert`), not assumed:
- `int8-weights`: the convolutions' weights stored as int8 per channel and dequantised when the model
  loads, so the arithmetic stays float32: about 3x smaller. The head's fully connected layer stays
  float32: a logistic head's weights can have outliers (largest 515, median 0.17 in the one-network
  OCT bundle of that head), which one int8 step per class rounds nearly all to zero (quantised too,
  that bundle's test accuracy fell from 0.876 to 0.504 on `oct-kermany/test`). It is a small part of the file.
- `fp16` (float casting): weights stored as float16, computed in float32: half the size.
- `int8` (`dynamic_wi8_afp32`): dynamic-range quantisation, activations quantised on the fly and the
  matrix products done in integers; smallest and, on ARM, the fastest; on x86 slower than fp32, and
  its accuracy depends on the head (the logistic head's bundle lost 36 points, the two-view default's
  conv heads none: see the README), so it is never the default.

The metadata travels in the JSON sidecar, as for the other formats (LiteRT's own metadata schema needs tflite-support, which is unmaintained).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._deps import require
from ..bundle.store import Bundle
from .graph import DeployableModel, converting, export_metadata

QUANTIZATIONS = ("none", "int8-weights", "fp16", "int8")
# Recipes for ai-edge-quantizer. fp16: float casting of the weights of every supported op, float arithmetic.
# int8 is the quantizer's own dynamic-range recipe.
_FP16 = [{"regex": ".*", "operation": "*", "algorithm_key": "float_casting",
          "op_config": {"weight_tensor_config": {"num_bits": 16, "dtype": "FLOAT"},
                        "compute_precision": "FLOAT", "explicit_dequantize": True}}]
_INT8_CONV_WEIGHTS = [{"regex": ".*", "operation": "CONV_2D", "algorithm_key": "min_max_uniform_quantize",
                       "op_config": {"weight_tensor_config": {"num_bits": 8, "symmetric": True,
                                                              "granularity": "CHANNELWISE", "dtype": "INT"},
                                     "compute_precision": "FLOAT", "explicit_dequantize": True}}]
_RECIPES: dict[str, Any] = {"fp16": _FP16, "int8-weights": _INT8_CONV_WEIGHTS}


def litert_bytes(bundle: Bundle, quantize: str = "none") -> tuple[bytes, dict[str, Any]]:
    """The bundle as one .tflite flatbuffer (and its metadata for the sidecar)."""
    litert_torch = require("litert_torch", "LiteRT export", extra="tflite")
    h, w = bundle.preprocessing.shape
    meta = export_metadata(bundle, "tflite") | {"quantization": quantize, "batch": 1}
    meta["input"] = meta["input"] | {"shape": [1, h, w, 3]}
    with converting("LiteRT", bundle), tempfile.TemporaryDirectory(prefix="retinalens-litert-") as tmp:
        model = litert_torch.convert(DeployableModel(bundle).eval(), (torch.zeros(1, h, w, 3, dtype=torch.uint8),))
        path = Path(tmp) / "model.tflite"
        model.export(str(path))
        if quantize != "none":
            path = _quantized(path, quantize)
        return path.read_bytes(), meta


def _quantized(path: Path, quantize: str) -> Path:
    quantizer = require("ai_edge_quantizer.quantizer", "LiteRT quantization", extra="tflite")
    recipes = require("ai_edge_quantizer.recipe", "LiteRT quantization", extra="tflite")
    q = quantizer.Quantizer(str(path))
    q.load_quantization_recipe(_RECIPES[quantize] if quantize in _RECIPES else recipes.dynamic_wi8_afp32())
    out = path.with_name(f"model-{quantize}.tflite")
    q.quantize().export_model(str(out), overwrite=True)
    return out


class LiteRTModel:
    """A .tflite export run by ai-edge-litert's interpreter: uint8 (N, S, S, 3) -> probabilities (N, K),
    one image per call (the graph's batch is one). For checking an export where it was made."""

    def __init__(self, path: str | Path) -> None:
        interpreter = require("ai_edge_litert.interpreter", "the LiteRT runtime", extra="tflite")
        self._it = interpreter.Interpreter(model_path=str(path))
        self._it.allocate_tensors()
        self._input = self._it.get_input_details()[0]["index"]
        # Outputs in the graph's order: probabilities, then pooled (the sidecar's "outputs").
        self._outputs = [d["index"] for d in sorted(self._it.get_output_details(), key=lambda d: d["name"])]

    def run(self, pixels: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(pixels, dtype=np.uint8)
        probs, pooled = [], []
        for image in x:
            self._it.set_tensor(self._input, image[None])
            self._it.invoke()
            p, f = (self._it.get_tensor(i).copy() for i in self._outputs)
            probs.append(p[0])
            pooled.append(f[0])
        return np.stack(probs), np.stack(pooled)

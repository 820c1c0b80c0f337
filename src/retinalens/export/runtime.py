"""The onnxruntime inference path, and the choice between it and PyTorch.

`OnnxModel` runs an exported file on its own (its metadata travels inside it). For a bundle, the
ONNX file is built on first use into a cache keyed by the sha256 of the bundle's manifest (bundles
stay read-only): `$RETINALENS_CACHE/onnx/<sha>/model.onnx`, else `~/.cache/retinalens/onnx/...`.
Its sidecar, written last, holds the file's hash: a torn, corrupt or outdated file is rebuilt.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.markup import escape

from .._console import console
from .._io import prune_entries, user_cache_dir
from .._deps import require
from ..data.hashing import sha256_file
from ..errors import RetinaLensError
from ..bundle.store import Bundle
from .formats import METADATA_KEY, onnx_bytes, sidecar_path, write_export
from .graph import EXPORT_VERSION, INPUT_NAME, OUTPUT_NAMES

RUNTIMES = ("auto", "torch", "onnx")
CACHE_ENTRIES = 8  # ONNX files kept (about 14 MB each for the default backbone), least recently used go


class OnnxModel:
    """An exported ONNX file in onnxruntime (CPU): uint8 (N, S, S, 3) -> (probabilities (N, K) float64,
    pooled features (N, C) float32). Thread-safe: onnxruntime sessions allow concurrent `run` calls."""

    def __init__(self, source: str | Path | bytes) -> None:
        ort = require("onnxruntime", "the onnx runtime")
        where = "the ONNX model" if isinstance(source, bytes) else str(source)
        try:
            options = ort.SessionOptions()
            # Denormals flushed, as on the PyTorch path (models/machine.py: 3x on EfficientNet-Lite0).
            options.add_session_config_entry("session.set_denormal_as_zero", "1")
            self.session = ort.InferenceSession(source if isinstance(source, bytes) else str(source),
                                                sess_options=options, providers=["CPUExecutionProvider"])
            self.metadata: dict[str, Any] = json.loads(self.session.get_modelmeta().custom_metadata_map[METADATA_KEY])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for unreadable files
            raise RetinaLensError(f"{where}: not a RetinaLens ONNX export ({type(exc).__name__})") from None
        self.classes: list[str] = list(self.metadata["classes"])

    def run(self, pixels: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = pixels.numpy() if isinstance(pixels, torch.Tensor) else pixels
        h, w = self.metadata["input"]["shape"][1:3]
        if x.dtype != np.uint8 or x.shape[1:] != (h, w, 3):
            raise ValueError(f"the model takes uint8 (N, {h}, {w}, 3) pixels, got {x.shape} {x.dtype}")
        probs, pooled = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: np.ascontiguousarray(x)})
        return probs.astype(np.float64), pooled

    def probabilities(self, pixels: torch.Tensor | np.ndarray) -> np.ndarray:
        return self.run(pixels)[0]


def resolve_runtime(runtime: str, precision: str = "fp32") -> str:
    """'torch' or 'onnx' for a bundle whose head was trained on features of `precision`.

    Measured on a 2-core Xeon with AVX512-BF16/AMX (benchmarks/bench_export.py, README "Export"):
    onnxruntime fp32 beat the traced fp32 TorchScript backbone in single-image latency and in batches
    of 16, with the same probabilities (within 1e-5): auto picks it for fp32 bundles on the CPU. A bf16
    bundle keeps PyTorch: onnxruntime was faster for single images but slower in batches than the bf16
    graph, and its fp32 probabilities differ from the bf16 features that `evaluate`, the calibration
    and the gate were fitted on (up to 0.23, and 1 label in 129 on the real test scans). No GPU was
    measured, so a CUDA machine keeps PyTorch.
    """
    if runtime not in RUNTIMES:
        raise RetinaLensError(f"unknown runtime '{runtime}': use one of {', '.join(RUNTIMES)}")
    if runtime == "onnx":
        require("onnxruntime", "--runtime onnx")
        return "onnx"
    if (runtime == "auto" and precision == "fp32" and importlib.util.find_spec("onnxruntime")
            and not torch.cuda.is_available()):
        return "onnx"
    return "torch"


def onnx_cache_root() -> Path:
    return user_cache_dir("onnx")


def _intact(model: Path) -> bool:
    """The sidecar (written last) is readable, of this export design, and hashes the file as it is now."""
    try:
        meta = json.loads(sidecar_path(model).read_text())
        return meta.get("retinalens_export") == EXPORT_VERSION and meta.get("sha256") == sha256_file(model)
    except (OSError, ValueError, AttributeError):
        return False


def cached_onnx(bundle: Bundle, root: str | Path | None = None) -> Path | bytes:
    """The bundle's ONNX file from the cache, (re)built when absent, corrupt or stale. Where the cache
    cannot be written, the export is returned in memory instead."""
    base = Path(root).expanduser() if root is not None else onnx_cache_root()
    model = base / bundle.manifest_sha256 / "model.onnx"
    if _intact(model):
        os.utime(model.parent)  # most recently used: pruned last
        return model
    data, meta = onnx_bytes(bundle)
    try:
        write_export(model, data, meta)
        prune_entries(base, CACHE_ENTRIES)
    except (RetinaLensError, OSError) as exc:
        console().print(f"[yellow]note:[/] ONNX cache not written ({escape(str(exc))}); using the export in memory")
        return data
    return model


def open_runtime(bundle: Bundle, runtime: str = "auto", onnx_file: str | Path | None = None) -> OnnxModel | None:
    """The onnxruntime model that Model uses, or None for PyTorch. A given `onnx_file` means onnx;
    with auto, a backbone the exporter cannot express falls back to PyTorch."""
    if onnx_file is not None and runtime == "torch":
        raise RetinaLensError("an exported ONNX file runs with the onnx runtime, not torch")
    if resolve_runtime("onnx" if onnx_file is not None else runtime, bundle.precision) == "torch":
        return None
    try:
        return onnx_runtime_for(bundle, onnx_file)
    except RetinaLensError as exc:
        if runtime != "auto" or onnx_file is not None:
            raise
        console().print(f"[yellow]note:[/] {escape(str(exc))}; running PyTorch instead")
        return None


def onnx_runtime_for(bundle: Bundle, onnx_file: str | Path | None = None) -> OnnxModel:
    """An onnxruntime model for this bundle: a given exported file (checked to come from this bundle),
    else the cached export."""
    if onnx_file is None:
        return OnnxModel(cached_onnx(bundle))
    model = OnnxModel(Path(onnx_file).expanduser())
    if model.metadata.get("bundle", {}).get("manifest_sha256") != bundle.manifest_sha256:
        raise RetinaLensError(f"{onnx_file} was exported from another bundle than {bundle.path}")
    return model

"""`retinalens export`: a bundle as one deployable file (ONNX, TorchScript, LiteRT) or package (Core ML).

Each export carries its metadata twice: inside the file (ONNX metadata_props / TorchScript extra
file / Core ML user metadata, key "retinalens") and in a JSON sidecar `FILE.json` that also holds
the file's sha256. A consumer needs nothing else: classes, pixels contract, referral levels,
backbone and the bundle's manifest hash are all there.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .._deps import require
from .._io import atomic_write_bytes, atomic_write_json, check_creatable
from ..errors import RetinaLensError
from ..bundle.store import Bundle, load_bundle
from .graph import INPUT_NAME, OUTPUT_NAMES, DeployableModel, converting, export_metadata
from .litert import QUANTIZATIONS, litert_bytes

FORMATS = {"onnx": ".onnx", "torchscript": ".pt", "coreml": ".mlpackage", "tflite": ".tflite"}
# 17: wide runtime support (onnxruntime >= 1.14, onnxruntime-web, TensorRT 8.6) and all ops we need.
ONNX_OPSET = 17
METADATA_KEY = "retinalens"


def sidecar_path(out: Path) -> Path:
    return out.with_name(out.name + ".json")


def default_output(bundle_path: Path, fmt: str) -> Path:
    return Path.cwd() / (bundle_path.resolve().name + FORMATS[fmt])


def check_output_path(out: Path, fmt: str) -> None:
    """Refuse a destination we could not (or should not) write before any work is done."""
    if fmt == "coreml":
        if out.is_file():
            raise RetinaLensError(f"--out {out} is a file; a Core ML package is a folder")
        if out.is_dir() and any(out.iterdir()) and not (out / "Manifest.json").is_file():
            raise RetinaLensError(f"--out {out} is a folder that is not a Core ML package; give a new path")
    elif out.is_dir():
        raise RetinaLensError(f"--out {out} is a folder; give a file name (e.g. {out / ('model' + FORMATS[fmt])})")
    check_creatable(out, out.parent)


def _sample(bundle: Bundle, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    # Batch 2, not 1: nothing in the traced graph can silently specialise on a batch of one.
    return torch.zeros(2, *bundle.preprocessing.shape, 3, dtype=dtype)


def onnx_bytes(bundle: Bundle) -> tuple[bytes, dict[str, Any]]:
    """The bundle as one ONNX graph (dynamic batch axis), checked, with its metadata embedded."""
    onnx = require("onnx", "ONNX export")
    meta = export_metadata(bundle, "onnx") | {"opset": ONNX_OPSET}
    buf = io.BytesIO()
    with converting("ONNX", bundle):
        torch.onnx.export(DeployableModel(bundle), (_sample(bundle),), buf, dynamo=False, opset_version=ONNX_OPSET,
                          input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                          dynamic_axes={name: {0: "N"} for name in (INPUT_NAME, *OUTPUT_NAMES)})
    proto = onnx.load_from_string(buf.getvalue())
    onnx.helper.set_model_props(proto, {METADATA_KEY: json.dumps(meta, sort_keys=True)})
    proto.doc_string = f"RetinaLens model: uint8 {INPUT_NAME} (N,H,W,3) -> probabilities (N,K), pooled (N,C)"
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString(), meta


def torchscript_bytes(bundle: Bundle) -> tuple[bytes, dict[str, Any]]:
    """The bundle traced and frozen (fp32, BatchNorm folded), metadata as the extra file retinalens.json."""
    meta = export_metadata(bundle, "torchscript")
    buf = io.BytesIO()
    with converting("TorchScript", bundle):
        frozen = torch.jit.freeze(torch.jit.trace(DeployableModel(bundle), _sample(bundle), check_trace=False))
        torch.jit.save(frozen, buf, _extra_files={f"{METADATA_KEY}.json": json.dumps(meta, sort_keys=True)})
    return buf.getvalue(), meta


def write_coreml(bundle: Bundle, out: Path) -> dict[str, Any]:
    """A Core ML ML Program package (fp32). Core ML takes no uint8 tensors: the same 0-255 RGB pixels
    come as float32; normalisation stays inside the graph."""
    ct = require("coremltools", "Core ML export")
    import numpy as np

    meta = export_metadata(bundle, "coreml", input_dtype="float32")
    h, w = bundle.preprocessing.shape
    with converting("Core ML", bundle):
        batch = torch.export.Dim("N", min=1, max=1024)
        program = torch.export.export(DeployableModel(bundle), (_sample(bundle, torch.float32),),
                                      dynamic_shapes={INPUT_NAME: {0: batch}}).run_decompositions({})
        ml = ct.convert(program, convert_to="mlprogram", compute_precision=ct.precision.FLOAT32,
                        minimum_deployment_target=ct.target.macOS13,
                        inputs=[ct.TensorType(name=INPUT_NAME, shape=(ct.RangeDim(1, 1024, 1), h, w, 3),
                                              dtype=np.float32)],
                        outputs=[ct.TensorType(name=name) for name in OUTPUT_NAMES])
        ml.user_defined_metadata[METADATA_KEY] = json.dumps(meta, sort_keys=True)
        ml.short_description = "RetinaLens: RGB pixels 0-255 (N,S,S,3) -> class probabilities, pooled features"
    _replace_folder(out, lambda tmp: ml.save(str(tmp)))
    return meta


def _replace_folder(out: Path, write: Callable[[Path], None]) -> None:
    """Write a folder under a temp name beside `out`, then swap it in: never half a package."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")) / out.name
    except OSError as exc:
        raise RetinaLensError(f"cannot write {out}: {exc.strerror or exc}") from None
    try:
        write(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def write_export(out: Path, data: bytes, meta: dict[str, Any]) -> None:
    """The file, then its sidecar (with the file's hash) last: the sidecar commits the export."""
    atomic_write_bytes(out, data)
    atomic_write_json(sidecar_path(out), meta | {"file": out.name, "sha256": hashlib.sha256(data).hexdigest()})


def export_bundle(bundle: str | Path | Bundle, fmt: str = "onnx", out: str | Path | None = None,
                  quantize: str = "none") -> Path:
    """Export a bundle (backbone + head + preprocessing as one graph); returns the written path.
    `quantize` ("none" | "int8-weights" | "fp16" | "int8") applies to the LiteRT format only."""
    if fmt not in FORMATS:
        raise RetinaLensError(f"unknown export format '{fmt}': use one of {', '.join(FORMATS)}")
    if quantize not in QUANTIZATIONS or (quantize != "none" and fmt != "tflite"):
        raise RetinaLensError(f"--quantize {quantize}: use one of {', '.join(QUANTIZATIONS)}; "
                              "quantised exports are LiteRT only (--format tflite)")
    loaded = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    target = Path(out).expanduser() if out is not None else default_output(loaded.path, fmt)
    check_output_path(target, fmt)
    # The converter is checked before the slow part.
    require({"onnx": "onnx", "coreml": "coremltools", "tflite": "litert_torch"}.get(fmt, "torch"), f"{fmt} export")
    if fmt == "coreml":
        meta = write_coreml(loaded, target)
        atomic_write_json(sidecar_path(target), meta | {"file": target.name})
    elif fmt == "tflite":
        write_export(target, *litert_bytes(loaded, quantize))
    else:
        write_export(target, *(onnx_bytes(loaded) if fmt == "onnx" else torchscript_bytes(loaded)))
    return target

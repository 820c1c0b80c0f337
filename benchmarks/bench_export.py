"""Export figures: file sizes, single-image latency and batch throughput, PyTorch against onnxruntime.

A default bundle (EfficientNet-Lite0, `--head auto`) is trained on the real Kermany OCT scans
(`oct-kermany/train` of the shared data, else the bundled demo sample) and measured on the real test
scans. PyTorch runs the traced, frozen backbone (bf16 where the CPU has bf16 units, as `predict`
does by default, and fp32); onnxruntime runs the exported fp32 graph. Label agreement and accuracy of
each path are reported too: a faster runtime that changes the answers is not a free win.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from retinalens.demo import DEMO_DATA
from retinalens.bundle.network import head_input
from retinalens.trust.calibration import calibrated
from retinalens.export.formats import export_bundle
from retinalens.export.runtime import OnnxModel
from retinalens.bundle.store import Bundle
from retinalens.models.heads import head_probabilities
from retinalens.predict.model import Model
from retinalens.train.pipeline import ExtractConfig, RunConfig, train_bundle

BATCH = 16


def _median_ms(fns: dict[str, Callable[[], object]], n: int, rounds: int = 3) -> dict[str, float]:
    """Per function: the median ms of a block of n // rounds calls, the best of `rounds` blocks taken
    in turn (ABCABCABC), so that a busy spell of a shared machine cannot make one path look slow.
    Blocks, not single calls in turn: onnxruntime's and OpenMP's worker threads spin for a while
    after each call, and would take the cores from the other runtime's next call."""
    best: dict[str, float] = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            fn()
            fn()  # warm-up: traced graphs optimise on their first calls, onnxruntime allocates its arenas
            times = []
            for _ in range(max(1, n // rounds)):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            best[name] = min(best[name], statistics.median(times) * 1000)
    return best


def _speeds(paths: dict[str, Callable[[torch.Tensor], np.ndarray]], x: torch.Tensor, n_single: int) -> dict:
    single = _median_ms({k: (lambda f=f: f(x[:1])) for k, f in paths.items()}, n_single)
    batch = _median_ms({k: (lambda f=f: f(x[:BATCH])) for k, f in paths.items()}, max(6, n_single // 4))
    return {k: {"single_image_ms": round(single[k], 2), f"batch{BATCH}_img_s": round(BATCH / batch[k] * 1000, 1)}
            for k in paths}


def run(shared_data: Path | None, n_single: int = 50) -> dict:
    oct_root = shared_data / "oct-kermany" if shared_data else None
    data = oct_root if oct_root and (oct_root / "train").is_dir() else DEMO_DATA
    with tempfile.TemporaryDirectory() as work:
        w = Path(work)
        bundle = train_bundle(RunConfig(data=str(data), extract=ExtractConfig(cache=str(w / "cache"))), w / "bundle",
                              progress=False)
        files = sorted((data / "test").glob("*/*.jpeg"))
        name = "oct-kermany" if data != DEMO_DATA else "demo sample"
        return {"data": f"{name}: default bundle trained on train/, measured on the {len(files)} real test scans"} | \
            measure(bundle, files, w, n_single)


def measure(bundle: Bundle, files: list[Path], work: Path, n_single: int = 50) -> dict:
    """Sizes, speeds and agreement of the three paths on these (labelled, CLASS/name.jpeg) scans."""
    t = time.perf_counter()
    onnx_file = export_bundle(bundle, "onnx", work / "model.onnx")
    export_s = time.perf_counter() - t
    ts_file = export_bundle(bundle, "torchscript", work / "model.pt")
    truth = [f.parent.name for f in files]
    x = torch.stack([bundle.preprocessing.load(f) for f in files])

    def torch_fp32(batch: torch.Tensor) -> np.ndarray:
        s, p = bundle.backbone.encode(batch, "fp32")
        return calibrated(head_probabilities(bundle.head, head_input(bundle.head_config, s, p)), bundle.temperature)

    default = f"torch_{bundle.precision}"
    paths = {default: Model(bundle, runtime="torch").probabilities, "torch_fp32": torch_fp32,
             "onnxruntime_fp32": OnnxModel(onnx_file).probabilities}
    probs = {k: np.concatenate([fn(x[i:i + BATCH]) for i in range(0, len(x), BATCH)]) for k, fn in paths.items()}
    out: dict = {"bundle_precision": bundle.precision, "head": bundle.head_config.kind,
                 "onnx_mb": round(onnx_file.stat().st_size / 1e6, 2),
                 "torchscript_mb": round(ts_file.stat().st_size / 1e6, 2), "onnx_export_s": round(export_s, 1)}
    speeds = _speeds(paths, x, n_single)
    for k, p in probs.items():
        out[k] = speeds[k] | {
            "test_accuracy": round(float(np.mean([bundle.classes[i] == t for i, t in zip(p.argmax(1), truth)])), 4),
            "labels_agree_with_default": round(float(np.mean(p.argmax(1) == probs[default].argmax(1))), 4),
            "max_abs_prob_diff_vs_default": float(np.abs(p - probs[default]).max()),
        }
    out["onnxruntime_vs_torch_fp32_max_abs_prob_diff"] = float(np.abs(probs["onnxruntime_fp32"] - probs["torch_fp32"]).max())
    # How far bf16 features are from fp32 ones (relative L2 over the test scans): why `auto` keeps PyTorch for bf16 bundles.
    (s16, p16), (s32, p32) = (bundle.backbone.encode(x, precision) for precision in ("bf16", "fp32"))
    out["bf16_vs_fp32_features_rel_l2"] = {"pooled": round(float((p16 - p32).norm() / p32.norm()), 4),
                                           "spatial": round(float((s16.float() - s32.float()).norm() / s32.float().norm()), 4)}
    return out


if __name__ == "__main__":
    print(json.dumps(run(Path(sys.argv[1]) if len(sys.argv) > 1 else None), indent=2))

"""LiteRT figures: each `--quantize` variant's size, speed and accuracy change on the real test scans.

The default bundle (`retinalens train DATA` with its defaults: for OCT scans the two-view input, a
Lite0 network on the squash and one on the retinal band, `--head auto` each, in one graph with one
224x896 input) is trained on `oct-kermany/train` and every
variant is measured on `oct-kermany/test` against the bundle's own PyTorch path: test accuracy, how many
scans keep the same class, the largest probability difference, file size, one image's latency (batch one,
as on a phone) and the conversion time. Needs the `tflite` extra; without it the section says so and
measures nothing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import retinalens
from retinalens.demo import DEMO_DATA
from retinalens.export.formats import export_bundle
from retinalens.export.litert import QUANTIZATIONS, LiteRTModel
from retinalens.predict.model import Model


def run(shared_data: Path | None, n_single: int = 20) -> dict:
    if not all(importlib.util.find_spec(m) for m in ("litert_torch", "ai_edge_litert", "ai_edge_quantizer")):
        return {"skipped": "needs the 'tflite' extra (pip install 'retinalens[tflite]')"}
    oct_root = shared_data / "oct-kermany" if shared_data else None
    data = oct_root if oct_root and (oct_root / "train").is_dir() else DEMO_DATA
    with tempfile.TemporaryDirectory() as work:
        w = Path(work)
        # The feature cache of the user's environment when there is one: extraction is not what is measured.
        cache = os.environ.get("RETINALENS_CACHE") or str(w / "cache")
        bundle = retinalens.train(data, w / "bundle", cache=cache)
        files = sorted((data / "test").glob("*/*.jpeg"))
        truth = np.array([bundle.classes.index(f.parent.name) for f in files])
        x = torch.stack([bundle.preprocessing.load(f) for f in files])
        reference = Model(bundle, runtime="torch").probabilities(x)
        out: dict = {"data": f"{'oct-kermany' if data != DEMO_DATA else 'demo sample'}: default bundle trained on "
                             f"train/, measured on the {len(files)} real test scans",
                     "members": [m.backbone.label for m in bundle.manifest.ensemble()],
                     "input_shape": list(bundle.preprocessing.shape),
                     "torch": {"precision": bundle.precision, "test_accuracy": _accuracy(reference, truth)}}
        for quantize in QUANTIZATIONS:
            t = time.perf_counter()
            path = export_bundle(bundle, "tflite", w / f"model-{quantize}.tflite", quantize=quantize)
            convert_s = time.perf_counter() - t
            model = LiteRTModel(path)
            probs, _ = model.run(x.numpy())
            out[quantize] = {
                "test_accuracy": _accuracy(probs, truth),
                "same_class_as_torch": f"{int((probs.argmax(1) == reference.argmax(1)).sum())} of {len(files)}",
                "max_abs_prob_diff_vs_torch": round(float(np.abs(probs - reference).max()), 4),
                "mb": round(path.stat().st_size / 1e6, 2),
                "single_image_ms": round(_median_ms(lambda: model.run(x[:1].numpy()), n_single), 1),
                "convert_s": round(convert_s, 1)}
        return out


def _accuracy(probs: np.ndarray, truth: np.ndarray) -> float:
    return round(float((probs.argmax(1) == truth).mean()), 4)


def _median_ms(fn, n: int) -> float:
    fn()  # warm-up: the interpreter allocates and packs its weights on the first call
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


if __name__ == "__main__":
    print(json.dumps(run(Path(sys.argv[1]) if len(sys.argv) > 1 else None), indent=2))

"""The speed targets of a quiet machine, in one short run (`python benchmarks/run.py --only speed`).

On a default bundle trained on oct-kermany/train (trained here first), measured on oct-kermany/test:
single-image `load(B).predict(path)` (median / p95 of 200, after 3 warm-up calls), its parts one at a
time (decode, resize, network, the gate's statistics that run beside them), and the same call
alternating, call by call, with the serial path (`predict_many` of the one image on one thread, which
the web server takes); the bundle's own runtime against fp32 PyTorch and onnxruntime on the same
pixels (bench_export.measure); InceptionV3 extraction in bf16 and fp32 on 100 scans against the
original Keras loop run just before on the same scans, with the share of the
arithmetic limit (matmul probe). `RETINALENS_KERAS_PYTHON` names the Keras environment.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import retinalens
from retinalens.bundle.store import load_bundle
from retinalens.data.decode import decode_image
from retinalens.data.hashing import sha256_files
from retinalens.models.machine import measure_matmul, runtime_settings
from retinalens.trust.statistics import all_statistics, source_statistics

ROOT = Path(__file__).resolve().parents[1]


def _median_ms(fn, n: int = 50) -> tuple[float, float]:
    for _ in range(3):
        fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1000)
    return round(statistics.median(ts), 1), round(float(np.percentile(ts, 95)), 1)


def _alternating(calls: dict[str, Any], n: int = 150) -> dict[str, float]:
    """Median ms of each call, the calls taking turns one by one: this virtual machine's speed moves by up
    to 2x within minutes, so only calls made side by side compare."""
    for fn in calls.values():
        fn()
    ts: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(n):
        for k, fn in calls.items():
            t = time.perf_counter()
            fn()
            ts[k].append((time.perf_counter() - t) * 1000)
    return {k: round(statistics.median(v), 1) for k, v in ts.items()}


def one_scan_parts_ms(bundle: Any, scan: Path) -> dict[str, float]:
    """One scan's parts one at a time on predict's one thread (median ms of 50): decode, alone and with
    the end check beside it, resize, the network ("network"; an ensemble's: network_<n>_<view>, one
    per member) and the gate's file and image statistics."""
    img = decode_image(scan, keep_grey=True)
    x = bundle.preprocessing.pixels(img)[None]
    members = bundle.members
    nets = {"network" if len(members) == 1 else f"network_{n}_{m.preprocessing.view}": m
            for n, m in enumerate(members, 1)}
    parts = {"decode": lambda: decode_image(scan, keep_grey=True),
             "decode_with_the_end_check_beside": lambda: decode_image(scan, keep_grey=True, concurrent=True),
             "resize": lambda: bundle.preprocessing.pixels(img),
             **{k: (lambda m=m: m.backbone.encode(x, m.precision)) for k, m in nets.items()},
             "gate_file_statistics": lambda: source_statistics(img), "gate_image_statistics": lambda: all_statistics(x)}
    with runtime_settings(1):
        return {k: _median_ms(fn)[0] for k, fn in parts.items()}


def run(shared: Path) -> dict[str, Any]:
    import run as bench  # benchmarks/run.py: the Keras loop, the extraction bench, the machine record
    from bench_export import measure

    oct_root = shared / "oct-kermany"
    files = sorted((oct_root / "test").glob("*/*.jpeg"))
    out: dict[str, Any] = {"data": "default bundle trained on oct-kermany/train; oct-kermany/test scans"}
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        # One network on the squash (--resize squash), the bundle the speed targets were set on; the OCT
        # default (--resize auto: two views, a network each) is timed by bench_ensemble's two-view row.
        retinalens.train(oct_root, work / "bundle", cache=work / "cache", resize="squash")
        model, bundle = retinalens.load(work / "bundle"), load_bundle(work / "bundle")
        scan = files[0]
        median, p95 = _median_ms(lambda: model.predict(scan), 200)
        out["single_image_predict_ms"] = {
            "scan_px": list(decode_image(scan, keep_grey=True).size), "median": median, "p95": p95, "calls": 200,
            "parts_ms": one_scan_parts_ms(bundle, scan),
            "how": "decode (the end check beside it), resize and network on the caller's thread; the gate's file and "
                   "image statistics on a second thread meanwhile (Model._alone)",
            # predict_many on one thread is the previous predict: everything serial on the caller's thread.
            "alternating_with_the_serial_path": _alternating({
                "predict": lambda: model.predict(scan),
                "predict_many_one_thread": lambda: model.predict_many([scan], threads=1)})}
        out["runtimes_on_the_same_pixels"] = measure(bundle, files, work, 50)
    probe = measure_matmul(size=2048, budget_s=1.0)
    rates = {"fp32": probe.fp32_gflops, "bf16": probe.bf16_gflops}
    paths = files[:100]
    keras_python = os.environ.get("RETINALENS_KERAS_PYTHON", str(ROOT / ".venv-keras" / "bin" / "python"))
    out["keras_extract"] = bench.keras(["extract", *map(str, paths)], keras_python)
    rate = out["keras_extract"].get("images_per_s")
    out["inception_v3_extract"] = [{k: v for k, v in bench.bench_extract("inception_v3", paths, sha256_files(paths), p,
                                                                         rates, 0, rate).items() if k != "profile_top_ops"}
                                   for p in ("bf16", "fp32")]
    out["matmul_gflops"] = rates
    return out

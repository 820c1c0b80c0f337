"""`--engine ray` against the local path: extraction images/s on the same images, Ray with 1 and 2
workers on a local Ray instance, and the per-image costs the README's scaling estimate is built on.

- costs_ms_per_image: decoding one scan (file -> 224 px uint8, one thread) and the backbone on
  decoded batches of 16 (one thread, and the process's default threads);
- local: extract_features into a fresh cache (threads decoding between backbone calls), at the
  default threads and at one thread (what a Ray worker reserving one CPU gets);
- ray_workers_N: extract_features_ray into a fresh cache, N actors of one CPU (one torch thread)
  each; `startup_s` (actor start, model build and trace, until the first batch is back) is kept
  out of `steady_images_per_s`;
- overhead_ms_per_image: Ray with one worker against the local path at one thread, steady state.

`python benchmarks/bench_ray.py` prints the JSON; `run(shared_data)` returns it (`make bench`, or
`python benchmarks/run.py --only ray`).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from retinalens.config import EngineConfig
from retinalens.data.hashing import sha256_files
from retinalens.engines.ray_extract import extract_features_ray
from retinalens.features.extract import ExtractReport, extract_features, open_cache
from retinalens.models.registry import create_backbone, resolve_precision

N = 128  # oct-kermany/test scans: enough for a steady rate, little enough for a shared 2-core machine
BATCH = 16


def _rates(r: ExtractReport) -> dict:
    first = min(BATCH, r.n_extracted)  # the first batch is in startup_s
    steady = (r.n_extracted - first) / (r.seconds - r.startup_s) if r.seconds > r.startup_s else 0.0
    return {"images": r.n_extracted, "seconds": round(r.seconds, 1), "startup_s": round(r.startup_s, 1),
            "images_per_s": round(r.images_per_s, 2), "steady_images_per_s": round(steady, 2)}


def _costs(bb, paths: list[Path], precision: str) -> dict:
    pp = bb.preprocessing
    decode = []
    for p in paths:
        t = time.perf_counter()
        pp.load(p)
        decode.append((time.perf_counter() - t) * 1000)
    x = torch.stack([pp.load(p) for p in paths[:BATCH]])
    out = {"decode_1_thread": round(statistics.median(decode), 2)}
    threads = torch.get_num_threads()
    for label, n in (("model_1_thread", 1), (f"model_{threads}_threads", threads)):
        torch.set_num_threads(n)
        bb.encode(x, precision)  # warm: the first call traces
        times = []
        for _ in range(3):
            t = time.perf_counter()
            bb.encode(x, precision)
            times.append((time.perf_counter() - t) * 1000 / BATCH)
        out[label] = round(statistics.median(times), 2)
    torch.set_num_threads(threads)
    return out


def run(shared_data: Path) -> dict:
    import ray

    paths = sorted((shared_data / "oct-kermany" / "test").glob("*/*.jpeg"))[:N]
    if len(paths) < N:
        raise SystemExit(f"the Ray benchmark needs {N} scans under {shared_data / 'oct-kermany' / 'test'}")
    hashes = sha256_files(paths)
    precision = resolve_precision("auto")
    bb = create_backbone()
    threads = torch.get_num_threads()
    res: dict = {"data": f"oct-kermany/test, first {N} scans (sorted)", "backbone": bb.name, "precision": precision,
                 "batch_size": BATCH, "costs_ms_per_image": _costs(bb, paths, precision)}
    with tempfile.TemporaryDirectory() as d:
        for n in (threads, 1):
            torch.set_num_threads(n)
            r = extract_features(paths, hashes, bb, open_cache(Path(d) / f"local{n}", bb, precision),
                                 precision=precision, batch_size=BATCH, progress=False)
            res[f"local_{n}_threads"] = _rates(r)
        torch.set_num_threads(threads)
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
        try:
            for w in (1, 2):
                r = extract_features_ray(paths, hashes, bb, open_cache(Path(d) / f"ray{w}", bb, precision),
                                         engine=EngineConfig(engine="ray", workers=w), precision=precision,
                                         batch_size=BATCH, chunk_size=256, progress=False)
                res[f"ray_workers_{w}"] = _rates(r)
        finally:
            ray.shutdown()
    one = res["ray_workers_1"]["steady_images_per_s"]
    local1 = res["local_1_threads"]["steady_images_per_s"]
    res["overhead_ms_per_image"] = round(1000 / one - 1000 / local1, 1) if one and local1 else None
    res["command"] = "python benchmarks/run.py --only ray"
    return res


if __name__ == "__main__":
    root = Path(__file__).resolve().parents[1]
    data = Path(os.environ.get("RETINALENS_SHARED_DATA", root.parent / "shared" / "data"))
    json.dump(run(data), sys.stdout, indent=2)
    print()

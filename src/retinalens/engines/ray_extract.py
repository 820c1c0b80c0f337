"""`extract --engine ray`: the extraction plan of features/extract.py run on a Ray Data pipeline.

The driver makes the plan (the missing hashes, cut into chunks and batches exactly as the local path
cuts them), sends one row per batch through decode tasks and an actor pool of backbones, and commits
what comes back through the same ChunkWriter and FeatureCache.write_chunk as the local path: the same
chunk files, the commit record last. Workers write nothing, so they need no access to the cache
folder. A killed job leaves whole chunks; the rerun (either engine) plans the rest and ends with a
cache bit-identical to an uninterrupted local run (given the same torch threads per model call:
oneDNN's small-batch kernels depend on the thread count).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from .._console import progress_bar
from ..config import EngineConfig
from ..data.images import check_batching
from ..errors import RetinaLensError
from ..features.cache import FeatureCache
from ..features.extract import ChunkWriter, ExtractReport, plan_extraction
from ..models.registry import Backbone
from .ray_cluster import one_row, ray_session, require_ray, run_pipeline, use_device, work_row


class Encoder:
    """A Ray actor's backbone, built once per actor from the registry (the same weights as the
    driver's, checked by their hash)."""

    def __init__(self, backbone: str, weights: str | None, pretrained: bool, weights_sha256: str, precision: str,
                 spatial: bool, threads: int, input: dict[str, Any]) -> None:
        from ..models.registry import create_backbone

        device = use_device(threads)
        # the driver's input size, resize and view: the pixels the decoders send
        self.backbone = create_backbone(backbone, weights=weights, pretrained=pretrained, **input)
        if self.backbone.weights_sha256 != weights_sha256:
            raise RetinaLensError(f"a Ray worker's {backbone} weights ({self.backbone.weights_sha256[:12]}) are not the "
                                  f"driver's ({weights_sha256[:12]}): give every node the same weights file")
        self.backbone.to(device)
        self.precision, self.spatial = precision, spatial

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        row = one_row(batch)
        s, p = self.backbone.encode(torch.from_numpy(np.asarray(row["pixels"])), self.precision)
        out = {"batch": np.array([row["batch"]]), "pooled": p.numpy()[None], "errors": np.array([row["errors"]])}
        return out | ({"spatial": s.numpy()[None]} if self.spatial else {})


def extract_features_ray(paths: list[Path], hashes: list[str], backbone: Backbone, cache: FeatureCache, *,
                         engine: EngineConfig, precision: str, batch_size: int, chunk_size: int,
                         shard: tuple[int, int] = (0, 1), weights: str | None = None, pretrained: bool = True,
                         progress: bool = True) -> ExtractReport:
    """extract_features on Ray: the same report, the same cache. `weights`, `pretrained`: how each
    worker builds `backbone` (a weights file must be at that path on every node)."""
    check_batching(batch_size, 0)
    require_ray()  # a missing extra is said before any work
    plan = plan_extraction(paths, hashes, cache, batch_size=batch_size, chunk_size=chunk_size, shard=shard)
    if not plan.todo:
        return plan.report
    rows = [work_row(b, [plan.paths[i] for i in idx], [str(plan.paths[i]) for i in idx])
            for b, idx in enumerate(plan.batches)]
    worker: dict[str, Any] = {"backbone": backbone.name, "weights": weights, "pretrained": pretrained,
                              "weights_sha256": backbone.weights_sha256, "precision": precision,
                              "spatial": cache.has_spatial, "threads": engine.threads,
                              "input": {"input_size": backbone.preprocessing.size,
                                        "resize": backbone.preprocessing.resize, "view": backbone.preprocessing.view}}
    writer = ChunkWriter(plan, cache)
    with ray_session(engine) as ray, progress_bar(len(plan.todo), f"extract {backbone.name} (ray)", progress) as advance:
        start = time.perf_counter()
        for out in run_pipeline(ray, rows, Encoder, worker, engine, {"preprocessing": backbone.preprocessing}):
            spatial = np.asarray(out["spatial"]) if cache.has_spatial else None
            advance(writer.add(plan.batches[int(out["batch"])], np.asarray(out["pooled"]), spatial,
                               json.loads(str(out["errors"]))))
            plan.report.startup_s = plan.report.startup_s or time.perf_counter() - start
        plan.report.seconds = time.perf_counter() - start
    return plan.report

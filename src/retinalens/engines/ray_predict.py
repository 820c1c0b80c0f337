"""`predict --engine ray`: batch prediction on a Ray Data pipeline, one loaded bundle per actor.

The driver expands the inputs (files, folders, URLs: downloaded here, as the local path does), cuts
them into the batches `predict_many` would run, and sends one row per batch through the decode tasks
(with the gate's full-resolution statistics when the bundle has a gate) and an actor pool of Models,
each answering with Model.batch_results: the very results of the local path. The bundle folder must
be at the same path on every node.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._console import progress_bar
from ..config import EngineConfig
from ..data.images import check_batching
from ..bundle.store import load_bundle
from ..predict.inputs import expand_inputs
from ..predict.model import BATCH_SIZE, Model
from .ray_cluster import one_row, ray_session, require_ray, run_pipeline, use_device, work_row


class Predictor:
    """A Ray actor's Model, loaded once per actor (PyTorch on a GPU, else the bundle's usual runtime)."""

    def __init__(self, bundle: str, runtime: str, threads: int) -> None:
        from ..predict.model import load

        device = use_device(threads)
        self.model = load(bundle, runtime="torch" if device == "cuda" else runtime)
        if device == "cuda":
            self.model.backbone.to(device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        row = one_row(batch)
        stats = torch.from_numpy(np.asarray(row["stats"])) if "stats" in row else None
        results = self.model.batch_results(torch.from_numpy(np.asarray(row["pixels"])), list(row["names"]),
                                           json.loads(str(row["errors"])), stats)
        return {"batch": np.array([row["batch"]]), "results": np.array([json.dumps(results)])}


def iter_predictions_ray(bundle: str | Path, sources: Sequence[str | Path | bytes], *, engine: EngineConfig,
                         batch_size: int = BATCH_SIZE, runtime: str = "auto", progress: bool = False,
                         ordered: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    """(position among the expanded inputs, result) for every input, each once, as batches finish
    (in no particular order; `ordered`: the batches in the inputs' order); inputs that could not be
    obtained come first."""
    check_batching(batch_size, 0)
    require_ray()  # a missing extra is said before any work
    bundle = str(Path(bundle).expanduser().resolve())
    decoding = Model(load_bundle(bundle), runtime="torch").decoding()  # the driver runs no network
    inputs = expand_inputs(list(sources))
    good = [k for k, i in enumerate(inputs) if not i.error]
    for k, i in enumerate(inputs):
        if i.error:
            yield k, {"input": i.name, "error": i.error}
    batches = [good[b:b + batch_size] for b in range(0, len(good), batch_size)]
    rows = [work_row(b, [inputs[k].item for k in ks], [inputs[k].name for k in ks]) for b, ks in enumerate(batches)]
    if not rows:
        return
    seen: set[int] = set()
    with ray_session(engine) as ray, progress_bar(len(good), "predict (ray)", progress) as advance:
        for out in run_pipeline(ray, rows, Predictor, {"bundle": bundle, "runtime": runtime, "threads": engine.threads},
                                engine, decoding, ordered=ordered):
            b = int(out["batch"])
            if b in seen:  # a retried batch that had finished once already
                continue
            seen.add(b)
            yield from zip(batches[b], json.loads(str(out["results"])))
            advance(len(batches[b]))


def ordered_predictions_ray(bundle: str | Path, sources: Sequence[str | Path | bytes], *, engine: EngineConfig,
                            batch_size: int = BATCH_SIZE, runtime: str = "auto",
                            progress: bool = False) -> Iterator[dict[str, Any]]:
    """Model.predict_many's results on Ray, in the inputs' order, as the batches finish. Ray Data hands
    the batches back in order, so this holds at most one batch beyond the inputs that could not be
    obtained (known, like every input's name, before any work)."""
    waiting: dict[int, dict[str, Any]] = {}
    after = 0  # the position of the next result to give
    for k, result in iter_predictions_ray(bundle, sources, engine=engine, batch_size=batch_size, runtime=runtime,
                                          progress=progress, ordered=True):
        waiting[k] = result
        while after in waiting:
            yield waiting.pop(after)
            after += 1


def predict_ray(bundle: str | Path, sources: Sequence[str | Path | bytes], *, engine: EngineConfig,
                batch_size: int = BATCH_SIZE, runtime: str = "auto", progress: bool = False) -> list[dict[str, Any]]:
    """Model.predict_many on Ray: the same results, in the order of the inputs."""
    return list(ordered_predictions_ray(bundle, sources, engine=engine, batch_size=batch_size, runtime=runtime,
                                        progress=progress))

"""The Ray Data pipeline that extraction and batch prediction share: batches of work in, results out.

One row per batch of work (its file names, or bytes for downloaded inputs) -> `map(decode_row)`:
Ray tasks decoding with the one decoder (data/images.py) -> `map_batches(Worker)` on an actor pool
(ActorPoolStrategy through `concurrency=`), each actor holding one model, on a GPU when the cluster
has them -> rows back to the driver, in any order. A row is a whole batch of the caller's plan, so
every model call sees exactly the pixels the local path would give it.

Fault tolerance is Ray Data's own: an actor that dies (a killed process, a lost node) is restarted
and its unfinished batches are run again (map_batches' actor defaults, max_restarts=-1 and
max_task_retries=-1; a killed decode task is retried by Ray core). A retried batch can come back
twice; callers take each batch once, by its number.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

import numpy as np

from .._deps import require
from ..config import EngineConfig
from ..data.images import ImageFiles, image_batches
from ..data.transforms import Preprocessing
from ..errors import RetinaLensError

PURPOSE = "--engine ray"
MAX_BLOCKS = 1000  # Ray tasks over the input rows: enough to spread it, few enough to schedule cheaply


def require_ray() -> ModuleType:
    """ray, with Ray Data, or one line naming the extra that installs it."""
    ray = require("ray", PURPOSE)
    require("ray.data", PURPOSE)
    require("pyarrow", PURPOSE, "distributed")
    return ray


@contextlib.contextmanager
def ray_session(cfg: EngineConfig) -> Iterator[ModuleType]:
    """Connected to Ray for the duration: the caller's own connection when it has one (a notebook, a
    test's cluster: left as it is), else cfg.address (None: $RAY_ADDRESS, or a new local instance that
    ends with the block)."""
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    try:
        ray.init(address=cfg.address, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {cfg.address}" if cfg.address else "a local Ray instance"
        raise RetinaLensError(f"cannot start or reach {where}: {exc}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def actor_options(ray: ModuleType, cfg: EngineConfig) -> dict[str, Any]:
    """map_batches' resources: cfg.workers actors (0: from 1 up to what the cluster holds), each with
    cpus_per_worker CPUs and gpus_per_worker GPUs (None: 1 when the cluster has any)."""
    have = ray.cluster_resources()
    gpus = cfg.gpus_per_worker if cfg.gpus_per_worker is not None else (1.0 if have.get("GPU", 0) else 0.0)
    if cfg.workers < 0 or cfg.cpus_per_worker <= 0 or gpus < 0:
        raise RetinaLensError("need --ray-workers >= 0, and a positive number of CPUs per worker")
    most = int(have.get("GPU", 0) // gpus) if gpus else int(have.get("CPU", 1) // cfg.cpus_per_worker)
    concurrency: int | tuple[int, int] = cfg.workers or (1, max(1, most))
    return {"concurrency": concurrency, "num_cpus": cfg.cpus_per_worker, "num_gpus": gpus}


def work_row(batch: int, items: Sequence[Path | bytes], names: Sequence[str]) -> dict[str, Any]:
    """One batch of work as a plain row: file names travel (every node reads its files; absolute, as a
    worker's working folder is not the driver's), bytes only for inputs that have no file (downloads)."""
    return {"batch": batch, "names": list(names),
            "paths": [str(i.absolute()) if isinstance(i, Path) else "" for i in items],
            "data": [i if isinstance(i, bytes) else b"" for i in items]}


def decode_row(row: dict[str, Any], preprocessing: Preprocessing,
               measure: Callable[..., Sequence[float]] | None = None, n_measures: int = 0) -> dict[str, Any]:
    """A work row -> its pixels (N, S, S, 3) uint8, one error string per image ('' when it decoded) and,
    with `measure`, the full-resolution statistics (N, n_measures): data/images.py's ImageFiles."""
    items = [d if d else Path(p) for p, d in zip(row["paths"], row["data"])]
    files = ImageFiles(items, preprocessing, list(row["names"]), measure=measure, n_measures=n_measures)
    x, _, errors, *stats = next(image_batches(files, [list(range(len(items)))], threads=1))
    out = {"batch": row["batch"], "names": list(row["names"]), "pixels": x.numpy(), "errors": json.dumps(list(errors))}
    return out | ({"stats": stats[0].numpy()} if stats else {})


def one_row(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """map_batches(batch_size=1) hands a worker one work row as a batch of one: that row."""
    return {k: v[0] for k, v in batch.items()}


def run_pipeline(ray: ModuleType, rows: list[dict[str, Any]], worker: type, worker_kwargs: dict[str, Any],
                 cfg: EngineConfig, decode_kwargs: dict[str, Any], *, ordered: bool = False) -> Iterator[dict[str, Any]]:
    """rows -> decode (Ray tasks) -> `worker` (an actor pool) -> its output rows, as they finish, or
    in the rows' order (`ordered`: Ray Data holds what finished early, within its own memory budget)."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the caller draws its own bar, in images
    ctx.print_on_execution_start = False
    ctx.execution_options.preserve_order = ordered  # set on every run: the context outlives it
    ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), MAX_BLOCKS))
    ds = ds.map(decode_row, fn_kwargs=decode_kwargs)
    ds = ds.map_batches(worker, batch_size=1, fn_constructor_kwargs=worker_kwargs, **actor_options(ray, cfg))
    yield from ds.iter_rows()


def use_device(threads: int) -> str:
    """In a worker: its torch threads (0: the whole CPUs it reserved, at least 1) and device (cuda
    when Ray gave it a GPU)."""
    import ray
    import torch

    reserved = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    torch.set_num_threads(threads if threads > 0 else max(1, int(reserved)))
    return "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"

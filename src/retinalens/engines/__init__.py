"""Engines that run extraction and batch prediction beyond one process: Ray Data (`--engine ray`).

They drive the same pieces as the local path (the extraction plan and chunk protocol of
features/extract.py, the decoder of data/images.py, predict's Model) and add only the distribution.
"""

from __future__ import annotations

from ..config import ENGINES, EngineConfig, given
from ..errors import RetinaLensError


def engine_config(engine: str | None = None, address: str | None = None, workers: int | None = None) -> EngineConfig:
    """The --engine, --address and --ray-workers of a command (None: EngineConfig's default), checked
    (with Ray installed, for --engine ray)."""
    cfg = EngineConfig(**given(engine=engine, address=address, workers=workers))
    if cfg.engine not in ENGINES:
        raise RetinaLensError(f"unknown engine '{cfg.engine}': use one of {', '.join(ENGINES)}")
    if cfg.engine == "local" and (cfg.address is not None or cfg.workers):
        raise RetinaLensError("--address and --ray-workers are for --engine ray")
    if cfg.workers < 0:
        raise RetinaLensError(f"--ray-workers must be >= 0 (0: as many as the cluster holds), got {cfg.workers}")
    if cfg.engine == "ray":
        from .ray_cluster import require_ray

        require_ray()  # a missing extra is said before any work
    return cfg

"""`retinalens train --nproc N [--nnodes M --rdzv-endpoint HOST:PORT [--rdzv-timeout S]]`: the same command on N processes
per machine, started through torchrun's own launcher (train/distributed.py)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from ..errors import RetinaLensError

# The options that start the processes: the processes themselves are not given them.
LAUNCH_OPTIONS = ("--nproc", "--nnodes", "--rdzv-endpoint", "--rdzv-timeout")


def worker_args(argv: Sequence[str]) -> list[str]:
    """`argv` (the train command as typed) without the launch options and their values."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a in LAUNCH_OPTIONS:
            skip = True
        elif not a.startswith(tuple(f"{o}=" for o in LAUNCH_OPTIONS)):
            out.append(a)
    return out


def launch_train(argv: Sequence[str], *, mode: str, batch_size: int, nproc: int, nnodes: int,
                 rdzv_endpoint: str | None, rdzv_timeout: int | None = None) -> None:
    """Check what several processes cannot do, then run `retinalens train` (argv) under torchrun."""
    if "WORLD_SIZE" in os.environ:
        raise RetinaLensError("--nproc starts torchrun: under torchrun already, leave it out (torchrun's "
                              "--nproc-per-node says how many processes)")
    if nnodes < 1 or (nnodes > 1) != bool(rdzv_endpoint):
        raise RetinaLensError("--nnodes N (N > 1) and --rdzv-endpoint HOST:PORT go together: every machine runs the "
                              "same command with the same endpoint")
    if rdzv_timeout is not None and (not rdzv_endpoint or rdzv_timeout < 1):
        raise RetinaLensError(f"--rdzv-timeout SECONDS (at least 1, got {rdzv_timeout}) is for a run on several machines: "
                              "with --nnodes and --rdzv-endpoint")
    from ..train.distributed import check_world, launch

    check_world(mode, batch_size, nproc * nnodes)
    launch(worker_args(argv), nproc=nproc, nnodes=str(nnodes), rdzv_endpoint=rdzv_endpoint, rdzv_timeout=rdzv_timeout)

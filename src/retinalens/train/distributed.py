"""Training on several processes or machines: torchrun's world, PyTorch DDP, and the launcher.

A run started by torchrun (or by `retinalens train --nproc N`, which starts torchrun through its own
API) has one process per rank. Every rank draws the same epoch order from the run's seed and takes its
share of each global batch, the way DistributedSampler deals out a data set (rank r takes every
world-size-th sample from r on); DistributedDataParallel averages the gradients. The global batch size
stays the one given: each rank trains on batch_size / world_size samples.

Rank 0 alone writes the checkpoints and the bundle. A checkpoint holds only global state (the epoch,
the optimiser, the schedule; the data order and the augmentation are functions of (seed, epoch)), so a
run resumes on any number of processes. Process groups have a timeout: a rank left waiting for a dead
peer gives up instead of hanging; torchrun ends the other ranks as soon as one fails.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import RetinaLensError

if TYPE_CHECKING:  # torch is imported where it is used: the launcher checks options without it
    import torch
    from torch import nn

T = TypeVar("T")
# How long a rank waits in a collective for its peers (a barrier after sharded extraction, a gradient
# all-reduce) before it gives up: long enough for the slowest rank's share, short of a silent hang.
TIMEOUT = timedelta(minutes=30)
PEER_GRACE_S = 10.0  # see process_group
# The image modes whose training DDP reproduces: their BatchNorm layers never train (the frozen
# backbone's inference graph; a fine-tuned backbone keeps its ImageNet statistics), so splitting a
# batch across processes changes no statistic. A from-scratch network's BatchNorm would normalise each
# rank's share alone (SyncBatchNorm runs on GPUs only); the bottleneck mode trains a small head on
# cached features in seconds, where extraction, not training, takes the time.
DISTRIBUTED_MODES = ("frozen", "finetune")


@dataclass(frozen=True)
class World:
    """This process's place among the run's processes (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0  # the rank on this machine: which GPU it takes

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's part of `items`: every size-th item from `rank` on (DistributedSampler's dealing)."""
        return list(items[self.rank::self.size])


def torchrun_world(env: dict[str, str] | None = None) -> World:
    """The world torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK); one process without."""
    env = dict(os.environ) if env is None else env
    if "WORLD_SIZE" not in env:
        return World()
    return World(int(env.get("RANK", 0)), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))


def check_world(mode: str, batch_size: int, world_size: int) -> None:
    """Refuse what several processes cannot train the way one does, before any work."""
    if world_size < 1:
        raise RetinaLensError(f"--nproc must be at least 1, got {world_size}")
    if world_size == 1:
        return
    if mode not in DISTRIBUTED_MODES:
        why = ("it trains a head on cached features in seconds; extraction is what takes the time: share it "
               "with `retinalens extract --shard K/N`" if mode == "bottleneck" else
               "its BatchNorm layers train, and each process would normalise its share of a batch alone")
        raise RetinaLensError(f"--mode {mode} trains in one process ({why}); several processes train "
                              f"--mode {' or '.join(DISTRIBUTED_MODES)}")
    if batch_size % world_size:
        raise RetinaLensError(f"--batch-size {batch_size} is the global batch: it must divide by the {world_size} "
                              f"processes (each trains batch-size / processes), e.g. {batch_size - batch_size % world_size or world_size}")


@contextmanager
def process_group(world: World, device: torch.device) -> Iterator[None]:
    """The run's process group (gloo on the CPU, NCCL on CUDA), from torchrun's environment."""
    if world.size == 1:
        yield
        return
    import torch
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT,
                            rank=world.rank, world_size=world.size)
    try:
        yield
    except RuntimeError as exc:
        if not isinstance(exc, dist.DistError) and not any(b in str(exc) for b in ("gloo", "NCCL")):
            raise  # not a collective that failed: a bug, reported as one
        # A peer is gone. torchrun's agent ends this process within a moment of the peer's end and
        # reports the run's failure once; a process still alive after PEER_GRACE_S lost a peer on
        # another machine, and says so itself.
        time.sleep(PEER_GRACE_S)
        raise RetinaLensError(f"rank {world.rank} lost the other processes of the run ({str(exc).splitlines()[0][:200]}); "
                              "the last finished epoch's checkpoint is kept: run again with --resume") from None
    dist.destroy_process_group()


def _device() -> torch.device:
    """Where a collective's tensors live: NCCL needs them on this rank's GPU."""
    import torch
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def sum_across(world: World, values: Sequence[float]) -> list[float]:
    """Each value summed over the ranks (float64: counts stay exact)."""
    if world.size == 1:
        return list(values)
    import torch
    import torch.distributed as dist

    t = torch.tensor(list(values), dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return t.tolist()


def from_main(world: World, value: Any) -> Any:
    """Rank 0's `value`, on every rank (a resumed checkpoint: only rank 0 need see the file)."""
    if world.size == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0, device=_device())
    return box[0]


def barrier(world: World) -> None:
    if world.size > 1:
        import torch.distributed as dist

        dist.barrier()


def data_parallel(module: nn.Module, world: World, device: torch.device) -> nn.Module:
    """`module` with its gradients averaged over the ranks (itself on one process). Only the parameters
    that require gradients now take part: the caller wraps again when that set changes (a warm-up)."""
    if world.size == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    # BatchNorm buffers never change here (see DISTRIBUTED_MODES): syncing them every step is waste.
    return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None,
                                   forward_sync_buffers=False)


def launch(command: Sequence[str], *, nproc: int, nnodes: str = "1", rdzv_endpoint: str | None = None,
           rdzv_id: str = "retinalens", rdzv_timeout: int | None = None) -> None:
    """Run `python -m retinalens COMMAND` as torchrun would with these options (torch.distributed.run's
    own parser and launcher). A failed rank ends the run: one RetinaLensError saying which and how, or,
    when the rank refused its input (exit 2, its message printed), exit 2 with nothing more to say.
    `rdzv_timeout`: seconds the rendezvous waits for every machine to join (None: torchrun's default,
    its c10d handler's join_timeout); a machine that never comes is one RetinaLensError after it."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.run import parse_args, run

    rdzv = (["--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint, "--rdzv-id", rdzv_id] if rdzv_endpoint
            else ["--standalone"])
    if rdzv_timeout is not None:
        rdzv += ["--rdzv-conf", f"join_timeout={rdzv_timeout}"]
    # Only local rank 0 prints: every rank would print the same lines. The others' output goes to
    # torchrun's log folder.
    args = parse_args(["--nnodes", nnodes, "--nproc-per-node", str(nproc), *rdzv, "--local-ranks-filter", "0",
                       "--module", "retinalens", *command])
    # The machine's cores shared out between its processes (torchrun's default is one thread each).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # torchrun's agent logs every worker it stops and every failure at length; the one line below says it.
    agent = logging.getLogger("torch.distributed.elastic")
    level = agent.level
    agent.setLevel(logging.CRITICAL)
    try:
        run(args)
    except RendezvousError as exc:  # RendezvousTimeoutError among them: the machines did not all come
        waited = f"{rdzv_timeout} s" if rdzv_timeout is not None else "torchrun's join timeout"
        said = "".join(f": {line[:200]}" for line in str(exc).strip().splitlines()[:1])  # often empty
        raise RetinaLensError(f"the rendezvous at {rdzv_endpoint} did not gather the {nnodes} machines of the run "
                              f"within {waited} (--rdzv-timeout; {type(exc).__name__}{said}): start the same command "
                              "on every machine, with the same --rdzv-endpoint") from None
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        if failure.exitcode == 2:
            raise SystemExit(2) from None
        how = (f"was killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exited with code {failure.exitcode}")
        raise RetinaLensError(f"rank {rank} of the run (pid {failure.pid}) {how}, which ended every rank; the last "
                              "finished epoch's checkpoint is kept: run the same command again with --resume "
                              "(on any number of processes) to continue") from None
    finally:
        agent.setLevel(level)

"""Training on several processes: torchrun workers (gloo on loopback) on real scans, against one process.

Fine-tuning on 2 processes against 1 (the warm-up epoch, then the backbone's last group); the frozen
mode killed on 2 processes and resumed on 1, against 1 throughout; the frozen mode on two "machines"
(two torchrun agents started independently, meeting at a c10d rendezvous on loopback), against 1, and
one whose second machine never comes.

Tolerance of "the same model": the models train under bf16 autocast where the CPU has bf16 (this one
does), and the two ranks' half-batch matrix products round differently from one process's whole-batch
ones (about 1e-3 relative); Adam turns that into steps on near-zero gradients. Measured on these
scans: per-tensor relative L2 difference of the weights at most 8e-3 (fine-tuned) and 8.4e-4 (frozen,
killed and resumed); in the fine-tuned backbone at most 5.3% of how far training moved each tensor from
ImageNet's; losses within 8e-4 relative. Asserted: 2e-2, 15% and 2e-3, and identical validation
accuracy every epoch. No BatchNorm statistic
trains in these modes (the frozen backbone is its inference graph, a fine-tuned one keeps ImageNet's
statistics; the heads have none), so none differs between 1 and 2 ranks.
"""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import assert_clean_error, cli_command, cli_env, run_cli, small_oct_dataset
from retinalens.cli.launch import worker_args
from retinalens.train.images import CHECKPOINT

EPOCHS = 3
WEIGHT_RTOL, MOVED_RTOL, LOSS_RTOL = 2e-2, 0.15, 2e-3
FINETUNE = ["--mode", "finetune", "--unfreeze", 1, "--warmup-epochs", 1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    data = small_oct_dataset(root / "data", per_class_train=5, per_class_test=1)
    common = [data, "--mode", "frozen", "--epochs", EPOCHS, "--batch-size", 8, "--quiet", "--cache", root / "cache"]
    return root, common


@pytest.fixture(scope="module")
def one_process(setup):
    root, common = setup
    r = run_cli("train", *common, "--out", root / "one")
    assert r.returncode == 0, r.stderr
    return root / "one"


def _curves(bundle: Path) -> list[dict[str, float]]:
    with open(bundle / "curves.csv") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _assert_same_model(a: Path, b: Path, start: dict[str, torch.Tensor] | None = None) -> None:
    """`start`: the backbone's weights before training; each trained tensor's difference between the
    runs must be small against how far training moved it."""
    ca, cb = _curves(a), _curves(b)
    assert [r["val_acc"] for r in ca] == [r["val_acc"] for r in cb]
    for ra, rb in zip(ca, cb, strict=True):
        for k in ("train_loss", "val_loss"):
            assert abs(ra[k] - rb[k]) <= LOSS_RTOL * abs(ra[k]), (k, ra, rb)
        assert ra["train_acc"] == rb["train_acc"]
    for name in ("head", "backbone"):
        wa, wb = load_file(str(a / f"{name}.safetensors")), load_file(str(b / f"{name}.safetensors"))
        assert wa.keys() == wb.keys()
        for k in (k for k in wa if wa[k].is_floating_point() and wa[k].norm() > 0):
            assert float((wa[k] - wb[k]).norm() / wa[k].norm()) <= WEIGHT_RTOL, k
            if name == "backbone" and start is not None and not torch.equal(wa[k], start[k]):
                assert float((wa[k] - wb[k]).norm() / (wa[k] - start[k]).norm()) <= MOVED_RTOL, k


def test_two_processes_fine_tune_the_model_one_process_fine_tunes(setup, backbone):
    root, common = setup
    one = run_cli("train", *common, *FINETUNE, "--out", root / "ft1")
    assert one.returncode == 0, one.stderr
    two = run_cli("train", *common, *FINETUNE, "--out", root / "ft2", "--nproc", 2)
    assert two.returncode == 0, two.stderr
    assert two.stderr.count("bundle written") == 1  # rank 0's
    assert not (root / "ft2.checkpoints").exists()
    before = backbone.model.state_dict()
    _assert_same_model(root / "ft1", root / "ft2", start=before)
    # The backbone's last group did train (on both ranks alike), and nothing else in it did.
    tuned = load_file(str(root / "ft2" / "backbone.safetensors"))
    changed = {k for k in tuned if not torch.equal(tuned[k], before[k])}
    assert changed and all(k.startswith(("blocks.6.", "conv_head.", "bn2.")) for k in changed), changed


def _checkpoint_epoch(path: Path) -> int:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])
    except (OSError, RuntimeError, EOFError, KeyError):
        return 0


def _rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of the worker of `rank` that torchrun (in process `launcher`) started."""
    children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    for pid in children:
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return int(pid)
    return None


def test_a_killed_rank_ends_the_run_and_it_resumes_on_another_number_of_processes(setup, one_process):
    root, common = setup
    out = root / "killed"
    ckpt = out.with_name("killed.checkpoints") / CHECKPOINT
    proc = subprocess.Popen(cli_command("train", *common, "--out", out, "--nproc", 2), env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 400
    while _checkpoint_epoch(ckpt) < 1 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    rank1 = _rank_pid(proc.pid, 1)
    assert proc.poll() is None and rank1, "the run ended before a rank could be killed"
    os.kill(rank1, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)  # no hang: the run ends within the peer grace
    killed_at = _checkpoint_epoch(ckpt)
    assert proc.returncode == 2 and 1 <= killed_at < EPOCHS and not out.exists()
    errors = [ln for ln in stderr.splitlines() if "error" in ln.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: rank 1 ") and "SIGKILL" in errors[0], stderr
    assert "--resume" in errors[0] and "Traceback" not in stderr

    # The checkpoint is never continued with other options, on any number of processes.
    other = run_cli("train", *common, "--out", out, "--resume", "--lr", 0.01, "--nproc", 2)
    assert other.returncode == 2 and "other data, splits or options" in other.stderr, other.stderr

    resumed = run_cli("train", *common, "--out", out, "--resume")  # one process now
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming after epoch {killed_at}" in resumed.stderr
    _assert_same_model(one_process, out)


def test_what_several_processes_cannot_do_is_refused_before_any_work(tmp_path, setup):
    _, common = setup
    for extra, needle in ((["--batch-size", 7], "must divide by the 2 processes"),
                          (["--mode", "bottleneck"], "--mode bottleneck trains in one process"),
                          (["--mode", "scratch", "--backbone", "eyenet"], "--mode scratch trains in one process"),
                          (["--nnodes", 2], "--rdzv-endpoint"),
                          (["--rdzv-timeout", 5], "--rdzv-timeout SECONDS")):
        r = run_cli("train", *common, "--out", tmp_path / "never", "--nproc", 2, *extra)
        assert_clean_error(r, needle)
    r = run_cli("train", *common, "--out", tmp_path / "never", "--nproc", 2, WORLD_SIZE="2")
    assert_clean_error(r, "under torchrun already")
    assert not (tmp_path / "never").exists() and not (tmp_path / "never.checkpoints").exists()
    # What the workers are given: the command, less the options that launch them.
    assert worker_args(["train", "d", "--nproc", "2", "--nnodes=2", "--rdzv-endpoint", "h:1", "--lr", "1",
                        "--rdzv-timeout", "9"]) == ["train", "d", "--lr", "1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nodes(common: list, out: Path, port: int, count: int) -> list[subprocess.Popen]:
    """`count` machines' launches of a 2-machine run: each its own torchrun agent, started on its own
    (one thread each: two of them share this machine's cores)."""
    args = [*common, "--out", out, "--nproc", 1, "--nnodes", 2, "--rdzv-endpoint", f"127.0.0.1:{port}",
            "--rdzv-timeout", 8]
    return [subprocess.Popen(cli_command("train", *args), env=cli_env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(count)]


def test_two_machines_meet_at_the_rendezvous_and_train_the_model_one_process_trains(setup, one_process):
    root, common = setup
    out = root / "nodes"
    nodes = _nodes(common, out, _free_port(), 2)
    stderrs = [p.communicate(timeout=600)[1] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], stderrs
    # The bundle is written once, by global rank 0 (each machine's local rank 0 prints; only one says it).
    assert sum(e.count("bundle written") for e in stderrs) == 1, stderrs
    assert not out.with_name("nodes.checkpoints").exists()
    _assert_same_model(one_process, out)


def test_a_machine_that_never_comes_ends_the_run_at_the_rendezvous_timeout(setup, tmp_path):
    _, common = setup
    start = time.monotonic()
    (node,) = _nodes(common, tmp_path / "alone", _free_port(), 1)
    _, stderr = node.communicate(timeout=120)
    took = time.monotonic() - start
    r = subprocess.CompletedProcess(node.args, node.returncode, "", stderr)
    assert_clean_error(r, "did not gather the 2 machines of the run within 8 s", "--rdzv-endpoint")
    assert 8 <= took < 90, took  # the timeout, plus starting Python and torch on a loaded machine
    assert not (tmp_path / "alone").exists() and not (tmp_path / "alone.checkpoints").exists()

"""What this machine does fast, decided from what it does rather than from what it advertises.

bf16 or fp32: a CPU with AMX tiles (amx_bf16 + amx_tile) multiplies bf16 matrices at several times its
fp32 rate, so bf16 is chosen without a measurement. AVX512-BF16 alone is no such promise: on a Xeon
without AMX, bf16 matrix products ran at 0.55x the fp32 rate (143-147 vs 255-270 GFLOP/s, 4096 x 4096,
2 threads) and bf16 extraction was slower than fp32. Such a CPU (any CPU with a bf16 flag and no
AMX) gets a short matmul probe, fp32 against bf16 at a convolution-like size, and bf16 only when it
wins clearly. The probe's result is cached per machine (CPU model, flags, torch version, threads) in
`$RETINALENS_CACHE/machine/` (else `~/.cache/retinalens/machine/`), so it runs once per machine.

Run-time settings (`runtime_settings`): denormal floats flushed to zero (EfficientNet-Lite0 ran one
image in 45 ms with denormals, 13.5 ms without: the tiny activations of its depthwise layers fall
into the slow microcode path of x86 FPUs), and the intra-op thread count; both restored on exit.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ContextManager, Iterator

import torch

from .._io import atomic_write_json, user_cache_dir

AMX_FLAGS = frozenset({"amx_bf16", "amx_tile"})
# A CPU flag saying it has bf16 arithmetic of some kind (x86 AVX512-BF16 / AVX-NE-CONVERT, Arm BF16).
BF16_FLAGS = frozenset({"avx512_bf16", "avx_ne_convert", "bf16"})
BF16_MARGIN = 1.1  # bf16 must beat fp32 by 10% in the probe: its features differ, a tie is no reason
PROBE_FORMAT = 1


@dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: frozenset[str]

    @property
    def has_amx(self) -> bool:
        return AMX_FLAGS <= self.flags


def cpu_info(cpuinfo: str | None = None) -> CpuInfo:
    """The CPU's model name and feature flags, from /proc/cpuinfo (x86 `flags`, Arm `Features`);
    elsewhere (macOS, Windows) the platform's processor name and no flags."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    model, flags = "", ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = value
    return CpuInfo(model or platform.processor() or platform.machine(), frozenset(flags.split()))


@dataclass(frozen=True)
class MatmulProbe:
    """fp32 and bf16 matrix-product rates of this machine (GFLOP/s) at `size` x `size`."""

    fp32_gflops: float
    bf16_gflops: float
    size: int
    threads: int


def choose_cpu_precision(flags: frozenset[str], probe: MatmulProbe | None) -> str:
    """'bf16' or 'fp32' for `--precision auto` on a CPU with these flags and this probe result (None:
    not measured). AMX: bf16. No bf16 flag: fp32 (bf16 would be emulated). Otherwise the probe decides."""
    if AMX_FLAGS <= flags:
        return "bf16"
    if not flags & BF16_FLAGS or probe is None:
        return "fp32"
    return "bf16" if probe.bf16_gflops > BF16_MARGIN * probe.fp32_gflops else "fp32"


def needs_probe(flags: frozenset[str]) -> bool:
    """Only a CPU with bf16 flags but no AMX leaves the choice open."""
    return bool(flags & BF16_FLAGS) and not AMX_FLAGS <= flags


def _rate(dtype: torch.dtype, n: int, budget_s: float) -> float:
    """GFLOP/s of n x n products, timed over about `budget_s` after one warm-up product."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # kernel selection and first-touch allocations are not the rate
    reps, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < budget_s or reps < 2:
        a @ b
        reps += 1
    return 2 * n**3 * reps / elapsed / 1e9


def measure_matmul(size: int = 1024, budget_s: float = 0.1) -> MatmulProbe:
    """fp32 vs bf16 rates. 1024 x 1024 is about the size of the backbones' 1x1 convolutions as
    oneDNN sees them (pixels x channels); a few hundred ms in all."""
    return MatmulProbe(round(_rate(torch.float32, size, budget_s), 1), round(_rate(torch.bfloat16, size, budget_s), 1),
                       size, torch.get_num_threads())


def probe_key(info: CpuInfo, threads: int) -> str:
    """What the probe's answer depends on: the CPU, the torch build and the number of threads."""
    text = json.dumps([PROBE_FORMAT, info.model, sorted(info.flags), torch.__version__, threads])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def probe_path(info: CpuInfo, threads: int, root: Path | None = None) -> Path:
    return (root if root is not None else user_cache_dir("machine")) / f"matmul-{probe_key(info, threads)}.json"


def cached_probe(info: CpuInfo | None = None, root: Path | None = None) -> MatmulProbe:
    """The matmul probe of this machine: read from the cache, else measured and written (atomically;
    an unwritable cache only means measuring again next time). An unreadable file is measured over."""
    info = info or cpu_info()
    path = probe_path(info, torch.get_num_threads(), root)
    try:
        probe = MatmulProbe(**{k: v for k, v in json.loads(path.read_text()).items() if k != "cpu"})
        if all(isinstance(v, (int, float)) and v > 0 for v in asdict(probe).values()):
            return probe
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    probe = measure_matmul()
    try:
        atomic_write_json(path, asdict(probe) | {"cpu": info.model})
    except Exception:  # noqa: BLE001 - a read-only home or a full disk must not stop a prediction
        pass
    return probe


def auto_cpu_precision(info: CpuInfo | None = None, root: Path | None = None) -> str:
    """What `--precision auto` runs on this CPU (the probe only where the flags leave it open)."""
    info = info or cpu_info()
    return choose_cpu_precision(info.flags, cached_probe(info, root) if needs_probe(info.flags) else None)


def flush_denormal_enabled() -> bool:
    """Whether denormals are flushed now (torch has a setter, no getter): a denormal times one reads
    as zero only when the FPU treats denormal inputs as zero."""
    return float((torch.tensor([1e-39], dtype=torch.float32) * 1.0).item()) == 0.0


def usable_cores(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The cores this process may use: its affinity mask (taskset, cpusets), and a container's CPU quota
    (cgroup v2 `cpu.max`, e.g. `docker --cpus 2`), which the mask does not show."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):  # no cgroup v2 here, or a file we do not understand: the mask it is
        pass
    return cores


@contextmanager
def runtime_settings(threads: int | None = None, flush_denormal: bool = True) -> Iterator[None]:
    """Inference settings for the duration of a call, the caller's restored after it: denormals
    flushed to zero, and `threads` intra-op threads (None: leave torch's own choice, one per core).
    Prediction and extraction enter this around their loops.

    The flush is a CPU register of each thread (MXCSR), and torch sets the calling thread's only: it
    covers all the arithmetic of a 1-thread call (single-image predict) and the caller's share of a
    parallel one. Intra-op worker threads that start while it is on inherit it and keep it; torch
    offers no way to reach the others."""
    old_threads, old_flush = torch.get_num_threads(), flush_denormal_enabled()
    try:
        if flush_denormal and not old_flush:
            torch.set_flush_denormal(True)
        if threads is not None and threads != old_threads:
            torch.set_num_threads(threads)
        yield
    finally:
        if flush_denormal and not old_flush:
            torch.set_flush_denormal(False)
        if torch.get_num_threads() != old_threads:
            torch.set_num_threads(old_threads)


class _FusionSwitch:
    """torch's oneDNN Graph fusion switch is process-wide, so the calls that want it on count
    themselves in under a lock and the last one out restores what was there: two bf16 graphs run
    side by side (an ensemble's members, `Model._alone`) keep it on until both are done. The one
    piece of module state here, because the switch it guards is the process's."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._before = False

    @contextmanager
    def on(self) -> Iterator[None]:
        with self._lock:
            if self._users == 0:
                self._before = torch.jit.onednn_fusion_enabled()
                torch.jit.enable_onednn_fusion(True)
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    torch.jit.enable_onednn_fusion(self._before)

    @contextmanager
    def off(self) -> Iterator[None]:
        """Off for the call unless a concurrent call holds it on (then that call's graphs come first)."""
        with self._lock:
            old = torch.jit.onednn_fusion_enabled()
            if self._users == 0:
                torch.jit.enable_onednn_fusion(False)
        try:
            yield
        finally:
            with self._lock:
                if self._users == 0:
                    torch.jit.enable_onednn_fusion(old)


_FUSION = _FusionSwitch()


def onednn_fusion(enabled: bool = True) -> ContextManager[None]:
    """oneDNN Graph fusion for the frozen TorchScript graphs run inside: each convolution and the
    ReLU6 / add after it become one kernel. EfficientNet-Lite0 bf16 on 2 cores (AMX Xeon, others
    paused): one image 5.5-6.5 ms against 11.5-14 ms, 16 images 115 ms against 143 ms. In bf16 the
    features are bit-identical to the unfused graph's (EfficientNet-Lite0/2, MobileNetV2, InceptionV3,
    EyeNet; one image and batches); in fp32 a fused residual add rounds differently (up to 3e-5 in
    batches), so `encode` fuses bf16 graphs only and fp32 features stay those of every existing cache.

    torch's switch is read when a graph is optimised for a new input shape (its first two calls), so
    it is set for the call and restored after, counted across threads (_FusionSwitch): a concurrent
    call that ended mid-optimisation would have left that shape unfused, slower for the process's life."""
    return _FUSION.on() if enabled else _FUSION.off()

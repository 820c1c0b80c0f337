"""The machine's precision choice (flags and a cached matmul probe), and the run-time settings that
prediction and extraction apply (denormals flushed, threads) restored after them, and the cores a
process may use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from retinalens.models.machine import (
    CpuInfo, MatmulProbe, auto_cpu_precision, cached_probe, choose_cpu_precision, cpu_info, flush_denormal_enabled,
    needs_probe, onednn_fusion, probe_path, runtime_settings, usable_cores,
)

SAPPHIRE = frozenset("fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8".split())
COOPER = frozenset("fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni".split())  # AVX512-BF16, no AMX
SKYLAKE = frozenset("fpu sse2 avx2 avx512f avx512_vnni".split())
# The figures of the Xeon without AMX (4096 x 4096, 2 threads): bf16 at 0.55x fp32.
SLOW_BF16 = MatmulProbe(fp32_gflops=262.0, bf16_gflops=145.0, size=4096, threads=2)
FAST_BF16 = MatmulProbe(fp32_gflops=100.0, bf16_gflops=400.0, size=1024, threads=2)


def test_amx_means_bf16_whatever_the_probe() -> None:
    assert choose_cpu_precision(SAPPHIRE, None) == "bf16"
    assert choose_cpu_precision(SAPPHIRE, SLOW_BF16) == "bf16"
    assert not needs_probe(SAPPHIRE)


def test_avx512_bf16_without_amx_follows_the_probe() -> None:
    assert needs_probe(COOPER)
    assert choose_cpu_precision(COOPER, SLOW_BF16) == "fp32"  # the machine: bf16 slower
    assert choose_cpu_precision(COOPER, FAST_BF16) == "bf16"
    assert choose_cpu_precision(COOPER, None) == "fp32"  # not measured: the safe choice
    tie = MatmulProbe(fp32_gflops=100.0, bf16_gflops=105.0, size=1024, threads=2)
    assert choose_cpu_precision(COOPER, tie) == "fp32"  # within the margin: fp32's exact features


def test_no_bf16_flag_means_fp32_without_probing() -> None:
    assert not needs_probe(SKYLAKE)
    assert choose_cpu_precision(SKYLAKE, FAST_BF16) == "fp32"
    assert choose_cpu_precision(frozenset(), None) == "fp32"


def test_cpu_info_reads_x86_and_arm_cpuinfo() -> None:
    x86 = cpu_info("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Gold 6348\nflags\t\t: fpu avx512_bf16 sse2\n"
                   "processor\t: 1\nmodel name\t: Intel(R) Xeon(R) Gold 6348\nflags\t\t: fpu avx512_bf16 sse2\n")
    assert x86 == CpuInfo("Intel(R) Xeon(R) Gold 6348", frozenset({"fpu", "avx512_bf16", "sse2"}))
    assert not x86.has_amx and needs_probe(x86.flags)
    arm = cpu_info("processor\t: 0\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd sve bf16 i8mm\nCPU implementer\t: 0x41\n")
    assert "bf16" in arm.flags and needs_probe(arm.flags)
    this = cpu_info()  # this machine's own, as read from /proc/cpuinfo
    assert this.model and (not Path("/proc/cpuinfo").is_file() or this.flags)


def test_probe_is_measured_once_then_read_from_the_cache(tmp_path: Path) -> None:
    info = CpuInfo("Test CPU without AMX", COOPER)
    path = probe_path(info, torch.get_num_threads(), tmp_path)
    assert not path.exists()
    first = cached_probe(info, tmp_path)  # measured on this machine
    assert first.fp32_gflops > 0 and first.bf16_gflops > 0 and first.threads == torch.get_num_threads()
    assert json.loads(path.read_text())["cpu"] == info.model
    # The second call reads the file: values written into it come back, and decide `auto`.
    path.write_text(json.dumps({"fp32_gflops": 1.0, "bf16_gflops": 999.0, "size": 1024, "threads": first.threads}))
    assert cached_probe(info, tmp_path).bf16_gflops == 999.0
    assert auto_cpu_precision(info, tmp_path) == "bf16"
    path.write_text(json.dumps({"fp32_gflops": 262.0, "bf16_gflops": 145.0, "size": 1024, "threads": first.threads}))
    assert auto_cpu_precision(info, tmp_path) == "fp32"
    # Another CPU model (or flags, torch version, threads) is another machine: another file.
    assert probe_path(CpuInfo("Other CPU", COOPER), first.threads, tmp_path) != path
    assert probe_path(info, first.threads + 1, tmp_path) != path


def test_a_damaged_probe_file_is_measured_over(tmp_path: Path) -> None:
    info = CpuInfo("Test CPU without AMX", COOPER)
    path = probe_path(info, torch.get_num_threads(), tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for damaged in ('{"fp32_gflops": 1.0, "bf16',  # torn write of an older process
                    '["not", "an", "object"]',
                    '{"fp32_gflops": "fast", "bf16_gflops": 2.0, "size": 1024, "threads": 2}'):
        path.write_text(damaged)
        probe = cached_probe(info, tmp_path)
        assert probe.fp32_gflops > 0 and json.loads(path.read_text())["bf16_gflops"] == probe.bf16_gflops


def test_an_amx_machine_never_probes(tmp_path: Path) -> None:
    assert auto_cpu_precision(CpuInfo("Test CPU with AMX", SAPPHIRE), tmp_path) == "bf16"
    assert not list(tmp_path.rglob("*.json"))


def _denormal_survives() -> bool:
    return float((torch.full((64,), 1e-39) * 1.0).min()) > 0.0


def test_runtime_settings_flush_denormals_and_set_threads_then_restore() -> None:
    before_threads = torch.get_num_threads()
    torch.set_flush_denormal(False)
    assert not flush_denormal_enabled() and _denormal_survives()
    with runtime_settings(threads=1):
        assert flush_denormal_enabled() and not _denormal_survives()
        assert torch.get_num_threads() == 1
    assert not flush_denormal_enabled() and _denormal_survives()
    assert torch.get_num_threads() == before_threads
    with pytest.raises(RuntimeError), runtime_settings(threads=1):
        raise RuntimeError("a failing prediction")
    assert not flush_denormal_enabled() and torch.get_num_threads() == before_threads


def test_runtime_settings_leave_a_callers_own_flush_on() -> None:
    torch.set_flush_denormal(True)
    try:
        with runtime_settings():
            assert flush_denormal_enabled()
        assert flush_denormal_enabled()  # it was the caller's, so it stays
        with runtime_settings(flush_denormal=False):
            assert flush_denormal_enabled()  # asked not to flush: the caller's state is not touched
    finally:
        torch.set_flush_denormal(False)


def test_usable_cores_follows_a_container_quota(tmp_path):
    cpu_max = tmp_path / "cpu.max"
    unlimited = usable_cores(tmp_path / "absent")
    cpu_max.write_text("max 100000\n")
    assert usable_cores(cpu_max) == unlimited  # no quota: the affinity mask
    cpu_max.write_text("150000 100000\n")  # 1.5 CPUs: two threads may each get some of the time
    assert usable_cores(cpu_max) == min(unlimited, 2)
    cpu_max.write_text("50000 100000\n")
    assert usable_cores(cpu_max) == 1
    cpu_max.write_text("garbage")
    assert usable_cores(cpu_max) == unlimited


def test_fusion_stays_on_until_the_last_of_two_concurrent_calls_ends() -> None:
    """Two bf16 graphs side by side (an ensemble's members in Model._alone): the call that ends first
    must not switch fusion off under the other, whose new input shape may be being optimised; after
    both, the switch is what it was, and an fp32 call inside a bf16 one does not turn it off."""
    import threading

    assert not torch.jit.onednn_fusion_enabled()
    inside, leave, seen = threading.Event(), threading.Event(), []

    def other() -> None:
        with onednn_fusion():
            inside.set()
            leave.wait(10)
            seen.append(torch.jit.onednn_fusion_enabled())

    t = threading.Thread(target=other)
    t.start()
    assert inside.wait(10)
    with onednn_fusion():
        with onednn_fusion(False):
            assert torch.jit.onednn_fusion_enabled()  # the other call's graphs are running fused
    leave.set()
    t.join(10)
    assert seen == [True] and not torch.jit.onednn_fusion_enabled()
    with onednn_fusion(False):
        assert not torch.jit.onednn_fusion_enabled()
    assert not torch.jit.onednn_fusion_enabled()

"""Throughput bookkeeping: the hardware peak MFU divides by, native-bf16 detection, peak memory.

MFU is model FLOPs per second over the peak of the hardware for the dtype in use, so it cannot
exceed 1. A timed matmul alone is not that peak: other processes sharing the cores lower it (on
a busy 2-core machine a 1024 matmul reached a tenth of the CPU's peak), and a bf16 matmul on a
CPU that only emulates bf16 measures the emulation (~0.6 GFLOP/s here), not the silicon. So:

- CPU: cores × clock × FLOPs per cycle, read from the CPU's features (`/proc/cpuinfo` on
  Linux): 2 FMA units × SIMD lanes × 2 (AVX2 + FMA: 32 fp32 FLOPs a cycle, AVX-512: 64);
  AVX512-BF16 doubles that for bf16, AMX-BF16 gives 1024; without native bf16 the arithmetic
  runs on the fp32 units, so the fp32 figure is the bf16 peak too. Cores are the physical cores
  the process may use, at most `torch.get_num_threads()`; the clock is the highest the system
  reports.
- CUDA: the data-sheet dense figure for a few known GPUs (H100, H200, A100).
- Either way also the best of several timed matmuls, and the peak is the larger of the two: a
  clock boosted past the reported one still cannot give an MFU above 1 on matmul-bound work.
"""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class Peak:
    """A peak FLOP rate, the dtype it is for and how it was found."""

    flops: float
    dtype: str  # "fp32" | "bf16" | "fp16"
    source: str  # e.g. "2 cores × 2.45 GHz × 32 FLOP/cycle (AVX2 FMA)", "timed matmul"

    @property
    def label(self) -> str:
        """'156.5 GFLOP/s fp32 peak': what an MFU is a share of."""
        return f"{format_flops(self.flops)} {self.dtype} peak"


def format_flops(flops: float) -> str:
    """1.2e12 → '1.2 TFLOP/s' (three significant digits)."""
    for unit, scale in (("PFLOP/s", 1e15), ("TFLOP/s", 1e12), ("GFLOP/s", 1e9), ("MFLOP/s", 1e6)):
        if flops >= scale:
            return f"{flops / scale:.3g} {unit}"
    return f"{flops:.3g} FLOP/s"


# -- the CPU's features --------------------------------------------------------------------------
@dataclass(frozen=True)
class CpuInfo:
    """What the peak of a CPU needs: usable physical cores, the clock and the ISA flags."""

    cores: int
    ghz: float
    flags: frozenset[str]


def read_cpu_info(
    cpuinfo: str | None = None, allowed: set[int] | None = None, max_khz: float | None = None
) -> CpuInfo | None:
    """Parse `/proc/cpuinfo` text (read here when None) for the CPUs in `allowed` (default: this
    process's affinity). None when it names no clock or flags (not Linux, or a bare VM)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
    if allowed is None and hasattr(os, "sched_getaffinity"):
        allowed = set(os.sched_getaffinity(0))
    cores: set[tuple[str, str] | int] = set()
    mhz: list[float] = []
    flags: frozenset[str] = frozenset()
    for block in cpuinfo.strip().split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
        if "processor" not in fields or not fields["processor"].isdigit():
            continue
        cpu = int(fields["processor"])
        if allowed is not None and cpu not in allowed:
            continue
        # Hyper-threads share a core's FMA units: count (package, core) pairs, not processors.
        if "core id" in fields:
            cores.add((fields.get("physical id", "0"), fields["core id"]))
        else:
            cores.add(cpu)
        if "cpu MHz" in fields:
            mhz.append(float(fields["cpu MHz"]))
        named = re.search(r"@\s*([\d.]+)\s*GHz", fields.get("model name", ""))
        if named:
            mhz.append(float(named.group(1)) * 1000)
        flags = flags or frozenset(fields.get("flags", "").split())
    if max_khz is None:
        max_khz = _max_khz()
    if max_khz:
        mhz.append(max_khz / 1000)
    if not cores or not mhz or not flags:
        return None
    return CpuInfo(len(cores), max(mhz) / 1000, flags)


def _max_khz() -> float | None:
    """The highest clock cpufreq reports (boost included), in kHz; None without cpufreq."""
    try:
        return float(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text())
    except (OSError, ValueError):
        return None


def flops_per_cycle(flags: frozenset[str], dtype: str) -> tuple[int, str]:
    """Peak FLOPs per cycle per core for `dtype` given x86 ISA `flags`, and the ISA it assumes.

    Two vector FMA units per core (Intel since Haswell, AMD since Zen 2); an FMA is 2 FLOPs. An
    upper bound where a part has fewer (some AVX-512 parts have one 512-bit unit): MFU errs low.
    """
    if dtype == "bf16" and "amx_bf16" in flags:
        return 1024, "AMX-BF16"
    if dtype == "fp16" and "amx_fp16" in flags:
        return 1024, "AMX-FP16"
    if dtype == "bf16" and "avx512_bf16" in flags:
        return 2 * 16 * 2 * 2, "AVX512-BF16"  # a bf16 dot product: two pairs per fp32 lane
    if dtype == "fp16" and "avx512_fp16" in flags:
        return 2 * 32 * 2, "AVX512-FP16"
    if "avx512f" in flags:
        per, isa = 2 * 16 * 2, "AVX-512 FMA"
    elif "avx2" in flags and "fma" in flags:
        per, isa = 2 * 8 * 2, "AVX2 FMA"
    elif "avx" in flags:
        per, isa = 8 + 8, "AVX"  # one add and one multiply unit, 8 lanes each
    else:
        per, isa = 4 + 4, "SSE"
    if dtype != "fp32":
        isa += f", no native {dtype}: fp32 units"
    return per, isa


def cpu_peak(info: CpuInfo, dtype: str, threads: int | None = None) -> Peak:
    """The CPU's peak for `dtype` on `threads` cores (default: `torch.get_num_threads()`)."""
    threads = torch.get_num_threads() if threads is None else threads
    cores = max(1, min(info.cores, threads))
    per, isa = flops_per_cycle(info.flags, dtype)
    source = f"{cores} core{'s' if cores != 1 else ''} × {info.ghz:.2f} GHz × {per} FLOP/cycle"
    return Peak(cores * info.ghz * 1e9 * per, dtype, f"{source} ({isa})")


# Dense data-sheet figures (no sparsity), FLOP/s: (name fragment, {dtype: peak}). fp32 is the
# CUDA-core rate; with TF32 matmuls allowed it is the TF32 tensor-core rate.
_GPUS = (
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "fp32": 51.2e12, "tf32": 378e12}),
    ("H100", {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 66.9e12, "tf32": 494.7e12}),
    ("H200", {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 66.9e12, "tf32": 494.7e12}),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12, "tf32": 156e12}),
)


def gpu_sheet_peak(name: str, dtype: str, tf32: bool = False) -> Peak | None:
    """The data-sheet peak of a known GPU (`name` as CUDA reports it), else None."""
    for fragment, peaks in _GPUS:
        if fragment in name:
            key = "tf32" if dtype == "fp32" and tf32 else dtype
            if key in peaks:
                return Peak(peaks[key], dtype, f"{fragment} data sheet ({key}, dense)")
    return None


def hardware_peak(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, measure: bool = True
) -> Peak:
    """The peak MFU divides by: the larger of the hardware's figure for `dtype` (see the module
    docstring) and, when `measure`, the best of several timed matmuls."""
    device = torch.device(device)
    name = _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))
    sheet: Peak | None = None
    if device.type == "cpu":
        info = read_cpu_info()
        sheet = cpu_peak(info, name) if info is not None else None
    elif device.type == "cuda":
        tf32 = torch.get_float32_matmul_precision() != "highest"
        sheet = gpu_sheet_peak(torch.cuda.get_device_name(device), name, tf32)
    if not measure and sheet is not None:
        return sheet
    # Emulated bf16 on a CPU times the emulation, not the units: time fp32 there instead.
    timed_dtype = dtype
    if device.type == "cpu" and dtype != torch.float32 and not cpu_has_native_bf16():
        timed_dtype = torch.float32
    size, seconds = (8192, 1.0) if device.type == "cuda" else (1024, 0.3)
    measured = measure_peak_flops(device, timed_dtype, size, seconds)
    if sheet is not None and sheet.flops >= measured:
        return sheet
    what = "timed matmul" + (" in fp32 (bf16 is emulated)" if timed_dtype != dtype else "")
    return Peak(measured, name, f"{what}, {size}×{size}")


# -- throughput --------------------------------------------------------------------------------
def measure_peak_flops(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    size: int = 1024,
    seconds: float = 0.25,
) -> float:
    """FLOP/s of the fastest of several square `size` matmuls on `device` in `dtype`.

    Timed in the calling process, so it sees the same threads and clocks as training does. It is
    a lower bound on the hardware's peak (others sharing the cores slow it): `hardware_peak` is
    what MFU divides by. A dtype the CPU only emulates (bf16 without AVX512-BF16/AMX, ~100x
    slower than fp32) is timed at a smaller size so the measurement stays well under a second."""
    device = torch.device(device)
    # A private generator: measuring must not move the training RNG stream (exact resume).
    gen = torch.Generator(device=device).manual_seed(0)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(n: int) -> float:
        a = torch.randn(n, n, device=device, generator=gen).to(dtype)
        b = torch.randn(n, n, device=device, generator=gen).to(dtype)
        a @ b  # warm-up: the first call selects kernels
        sync()
        # The fastest single product, not the mean: other processes sharing the cores would
        # otherwise lower the figure further.
        start, reps, best = time.perf_counter(), 0, float("inf")
        while True:
            t0 = time.perf_counter()
            a @ b
            sync()
            best = min(best, time.perf_counter() - t0)
            reps += 1
            if time.perf_counter() - start > seconds or reps >= 500:
                return 2.0 * n**3 / best

    if device.type == "cpu" and dtype != torch.float32 and not cpu_has_native_bf16():
        size = min(size, 256)
    return timed(size)


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN has bf16 kernels on this CPU (AVX512-BF16 / AMX); else bf16 is emulated."""
    try:
        # Private op: no public query says what oneDNN's bf16 kernels need (get_capabilities
        # lists ISA flags only).
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process so far: CUDA allocator peak, else the peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return float("nan")
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / (2**30 if sys.platform == "darwin" else 2**20)

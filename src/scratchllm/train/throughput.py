"""Throughput bookkeeping: a measured matmul peak for MFU, native-bf16 detection, peak memory."""

from __future__ import annotations

import sys
import time

import torch


# -- throughput --------------------------------------------------------------------------------
def measure_peak_flops(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    size: int = 1024,
    seconds: float = 0.25,
) -> float:
    """FLOP/s of a square `size` matmul on `device` in `dtype`: the practical peak for MFU.

    Timed in the calling process, so it sees the same threads and clocks as training does.
    A dtype the hardware only emulates (bf16 on CPUs without AVX512-BF16/AMX runs ~100x slower
    than fp32) is measured at a smaller size so the measurement stays well under a second."""
    device = torch.device(device)
    # A private generator: measuring must not move the training RNG stream (exact resume).
    gen = torch.Generator(device=device).manual_seed(0)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(n: int) -> tuple[float, int]:
        a = torch.randn(n, n, device=device, generator=gen).to(dtype)
        b = torch.randn(n, n, device=device, generator=gen).to(dtype)
        a @ b  # warm-up: the first call selects kernels
        sync()
        # The fastest single product, not the mean: other processes sharing the cores would
        # otherwise lower the "peak" and push MFU past 100% once they stop.
        start, reps, best = time.perf_counter(), 0, float("inf")
        while True:
            t0 = time.perf_counter()
            a @ b
            sync()
            best = min(best, time.perf_counter() - t0)
            reps += 1
            if time.perf_counter() - start > seconds or reps >= 500:
                return 2.0 * n**3 / best, reps

    if device.type == "cpu" and dtype != torch.float32 and not cpu_has_native_bf16():
        size = min(size, 256)
    return timed(size)[0]


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN has bf16 kernels on this CPU (AVX512-BF16 / AMX); else bf16 is emulated."""
    try:
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

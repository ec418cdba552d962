"""Roofline: the device's peaks, measured once per run (never taken from a datasheet), and the
achieved fraction of them for each measurement.

  peak GB/s     a large device-to-device copy (bytes read + bytes written) / time
  peak TFLOP/s  a large square matmul in the benchmark dtype (bf16 on GPUs, fp32 on CPUs)
  % floor       time the op's bytes (inputs once + outputs once) need at peak GB/s / measured
                time  (= achieved GB/s / peak GB/s)
  % compute     achieved TFLOP/s / peak TFLOP/s
The best of a few repeats is the peak (what the device can reach), after a warm-up.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict

import torch


@dataclass
class Peaks:
    gbps: float
    tflops: float
    what: str

    def as_dict(self) -> Dict[str, float]:
        return {"peak_gbps": self.gbps, "peak_tflops": self.tflops}


def _best_time(fn, device: torch.device, reps: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize(device)
            best = min(best, a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
    return best


def measure_peaks(device: torch.device, dtype: torch.dtype, quick: bool = False) -> Peaks:
    """Copy bandwidth and matmul throughput of `device` (a second or two; less when quick)."""
    cuda = device.type == "cuda"
    copy_mb = (64 if quick else 1024) if cuda else (16 if quick else 128)
    n = (2048 if quick else 8192) if cuda else (256 if quick else 1024)
    reps = 3 if quick else (10 if cuda else 5)
    src = torch.empty(copy_mb << 20, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    t_copy = _best_time(lambda: dst.copy_(src), device, reps)
    del src, dst
    mm_dtype = torch.float32 if (not cuda and dtype in (torch.float16, torch.bfloat16)) else dtype
    a = torch.randn(n, n, device=device, dtype=mm_dtype)
    b = torch.randn(n, n, device=device, dtype=mm_dtype)
    t_mm = _best_time(lambda: a @ b, device, reps)
    gbps = 2 * (copy_mb << 20) / t_copy / 1e9
    tflops = 2 * n ** 3 / t_mm / 1e12
    what = (f"copy {copy_mb} MB: {gbps:.3g} GB/s; "
            f"{str(mm_dtype).replace('torch.', '')} matmul {n}^3: {tflops:.3g} TFLOP/s")
    return Peaks(gbps, tflops, what)


def achieved(flops: float, nbytes: float, seconds: float, peaks: Peaks = None) -> Dict[str, float]:
    """TFLOP/s, GB/s and, given peaks, % of the memory floor and of the compute ceiling."""
    nan = float("nan")
    tf = flops / seconds / 1e12 if seconds > 0 else nan
    gb = nbytes / seconds / 1e9 if seconds > 0 else nan
    return {
        "tflops": tf,
        "gbps": gb,
        "pct_floor": 100 * gb / peaks.gbps if peaks and peaks.gbps > 0 else nan,
        "pct_compute": 100 * tf / peaks.tflops if peaks and peaks.tflops > 0 else nan,
    }

"""Honest timing of one case: warm-up, then repeats until a time target, inputs rotated across
repeats, median and 20/80 percentiles, peak memory.

GPU: CUDA events around each call (GPU time, launch gaps included), all reps queued then one
sync. CPU: wall clock (time.perf_counter) around each call. Inputs are rotated over several
independent sets, enough to exceed the last-level cache, so repeats do not measure a warm L2.
Modes: fwd (inputs do not require grad: the inference path), bwd (the forward graph is built
untimed once per input set, then `autograd.grad(..., retain_graph=True)` is timed), fwd+bwd.
"""
from __future__ import annotations

import math
import signal
import statistics
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

from .registry import Case, OpSpec, main_output


class CaseTimeout(Exception):
    """A case ran past its time limit (raised from SIGALRM between Python-level steps)."""


@contextmanager
def time_limit(seconds: Optional[float]):
    """Raise CaseTimeout after `seconds` of wall time. Best effort: the signal is handled between
    Python bytecodes, so a single long C++ call (an autograd backward) finishes first."""
    usable = (seconds is not None and seconds > 0 and hasattr(signal, "setitimer")
              and threading.current_thread() is threading.main_thread())
    if not usable:
        yield
        return

    def _raise(signum, frame):
        raise CaseTimeout(f"ran past {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def percentile(xs: List[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass
class Timing:
    times_s: List[float]
    peak_mb: float = float("nan")
    note: str = ""
    sets: int = 1

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def p20_s(self) -> float:
        return percentile(self.times_s, 20)

    @property
    def p80_s(self) -> float:
        return percentile(self.times_s, 80)

    @property
    def reps(self) -> int:
        return len(self.times_s)


# ------------------------------------------------------------------------------------------------
# Memory
# ------------------------------------------------------------------------------------------------
def _rss_kb(field_name: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory allocated during a block, above what was allocated before it (MB).
    CUDA: the caching allocator's counters. CPU: the process's resident-set high-water mark
    (reset through /proc/self/clear_refs; approximate, since freed memory may stay resident)."""

    def __init__(self, device: torch.device):
        self.device, self.mb = device, float("nan")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current RSS
                self.base = _rss_kb("VmRSS")
            except OSError:
                self.base = None
        return self

    def __exit__(self, *exc):
        if exc[0] is not None:
            return False
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mb = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2 ** 20
        elif self.base is not None:
            hwm = _rss_kb("VmHWM")
            if hwm is not None:
                self.mb = max(hwm - self.base, 0) / 1024
        return False


# ------------------------------------------------------------------------------------------------
# Cache-aware input rotation
# ------------------------------------------------------------------------------------------------
def cache_bytes(device: torch.device) -> int:
    """Size of the cache repeats could be served from: the GPU's L2, the CPU's last level."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    for idx in (3, 2):
        try:
            with open(f"/sys/devices/system/cpu/cpu0/cache/index{idx}/size") as f:
                s = f.read().strip()
            mult = {"K": 1 << 10, "M": 1 << 20}.get(s[-1], 1)
            return int(s.rstrip("KM")) * mult
        except (OSError, ValueError):
            continue
    return 32 << 20


def n_input_sets(set_bytes: int, device: torch.device, max_sets: int = 8) -> int:
    """Enough independent input sets that cycling through them overflows the cache (2x)."""
    if set_bytes <= 0:
        return 1
    return max(1, min(max_sets, math.ceil(2 * cache_bytes(device) / set_bytes)))


# ------------------------------------------------------------------------------------------------
# The measurement
# ------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_step(case: Case, spec: OpSpec, run: Callable, device: torch.device,
               sets: int, seed: int = 0) -> Callable[[int], None]:
    """step(i) runs one timed call on input set i % sets, in the case's mode."""
    grad = case.mode != "fwd"
    from .registry import DTYPES
    dtype = DTYPES[case.dtype]
    d = spec.dims(case.cfg)
    kwargs = spec.kwargs(d)
    inputs = [spec.make_inputs(case.cfg, dtype, device, seed=seed + i, grad=grad)
              for i in range(sets)]
    leaves = [[x for x in inp.values() if x.requires_grad] for inp in inputs]
    gen = torch.Generator(device=device).manual_seed(seed + 1000)
    out_shape = spec.shape_of(spec.output, d)
    dos = [torch.randn(out_shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
           for _ in range(sets)] if grad else []

    if case.mode == "fwd":
        def step(i):
            with torch.no_grad():
                run(inputs[i % sets], kwargs)
        return step
    if case.mode == "fwd+bwd":
        def step(i):
            j = i % sets
            o = main_output(run(inputs[j], kwargs))
            torch.autograd.grad(o, leaves[j], dos[j], allow_unused=True)
        return step
    # bwd: forward graphs built once, untimed; each call differentiates through its own graph
    outs = [main_output(run(inputs[j], kwargs)) for j in range(sets)]
    _sync(device)

    def step(i):
        j = i % sets
        torch.autograd.grad(outs[j], leaves[j], dos[j], retain_graph=True, allow_unused=True)
    return step


def measure(step: Callable[[int], None], device: torch.device, *, warmup: int, min_reps: int,
            max_reps: int, target_s: float, once_over_s: float, once: bool = False,
            deadline: Optional[float] = None) -> Timing:
    """Time step(i) repeatedly. The first call (compile, caches) is a warm-up; when it alone
    takes over `once_over_s` (or once=True), it is the only measurement, reported as such.
    Repeats continue until `target_s` of measured time and at least `min_reps` calls, stopping
    early past `deadline` (time.monotonic())."""
    mem = PeakMemory(device)
    t0 = time.perf_counter()
    with mem:
        step(0)
        _sync(device)
    first = time.perf_counter() - t0
    if once:
        return Timing([first], mem.mb, "timed once, no warm-up")
    if first >= once_over_s and device.type == "cuda":
        # a slow first GPU call is usually JIT compilation: look at a second one
        t0 = time.perf_counter()
        step(1)
        _sync(device)
        second = time.perf_counter() - t0
        if second >= once_over_s:
            return Timing([second], mem.mb, f"timed once after one warm-up call "
                                            f"({second:.1f} s per call)")
    elif first >= once_over_s:
        return Timing([first], mem.mb, f"timed once (the first call took {first:.1f} s), "
                                       f"no warm-up")
    for i in range(1, warmup):
        step(i)
    _sync(device)
    times: List[float] = []
    i = warmup
    # estimate per-call cost from the first call to size the batch of reps between syncs
    est = max(first, 1e-6)
    while True:
        n = max(1, min(max_reps - len(times),
                       math.ceil((target_s - sum(times)) / est) if times else min_reps))
        if device.type == "cuda":
            ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(n)]
            for a, b in ev:
                a.record()
                step(i)
                b.record()
                i += 1
            torch.cuda.synchronize(device)
            times += [a.elapsed_time(b) / 1e3 for a, b in ev]
        else:
            for _ in range(n):
                t = time.perf_counter()
                step(i)
                times.append(time.perf_counter() - t)
                i += 1
        est = statistics.median(times)
        done = len(times) >= max_reps or (len(times) >= min_reps and sum(times) >= target_s)
        late = deadline is not None and time.monotonic() > deadline and len(times) >= 1
        if done or late:
            break
    return Timing(times, mem.mb)

"""Timing of one case with maintained timers: warm-up, enough repeats for a stated confidence,
input rotation, and the load the machine was under meanwhile.

CPU: torch.utils.benchmark.Timer(num_threads=--threads).adaptive_autorange: it warms up, sizes
blocks of calls so the timer's overhead is negligible, and repeats until the interquartile range
is under 10 % of the median (or its time cap). GPU: triton.testing.do_bench (CUDA events, L2
flushed before every call, all times returned). Both report per-call times; the median, its 95 %
bootstrap interval and the p20-p80 spread come from stats.py. A call slower than a few seconds is
timed once (listed as such in the summary and on the plots).

Inputs are rotated over several independent sets, enough to exceed the CPU's last-level cache,
so repeats do not measure a warm cache. Modes: fwd (inputs do not require grad: the inference
path), bwd (the forward graph is built untimed once per input set, then `autograd.grad(...,
retain_graph=True)` is timed), fwd+bwd.
"""
from __future__ import annotations

import itertools
import math
import signal
import statistics
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

from . import load, stats
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


percentile = stats.percentile


@dataclass
class Timing:
    times_s: List[float]
    peak_mb: float = float("nan")
    note: str = ""
    once: bool = False              # one call, no warm-up and no interval
    others: float = float("nan")    # cores other processes used meanwhile (load.Sampler)
    noisy: bool = False

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s) if self.times_s else float("nan")

    @property
    def ci_s(self):
        """95 % bootstrap interval of the median (nan, nan with one sample)."""
        return stats.median_ci(self.times_s)[1:]

    @property
    def p20_s(self) -> float:
        return stats.percentile(self.times_s, 20)

    @property
    def p80_s(self) -> float:
        return stats.percentile(self.times_s, 80)

    @property
    def reps(self) -> int:
        return len(self.times_s)


class CudaPeakMemory:
    """Allocator peak above what was allocated before the block (MB); CUDA only (on CPU there
    is no per-block peak a harness can read reliably, so none is reported)."""

    def __init__(self, device: torch.device):
        self.device, self.mb = device, float("nan")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc):
        if exc[0] is None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mb = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2 ** 20
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


def measure(step: Callable[[int], None], device: torch.device, *, threads: int,
            min_time_s: float, max_time_s: float, once_over_s: float, once: bool = False,
            threshold: float = 0.1) -> Timing:
    """Time step(i) (i counts up: input rotation). The first call is a warm-up; when it alone
    takes `once_over_s` or more (or once=True), it is the only measurement, reported as such.
    Else CPU: Timer.adaptive_autorange(threshold, min_run_time, max_run_time); GPU: do_bench."""
    counter = itertools.count()

    def fn():
        step(next(counter))

    cpus = len(load.usable_cpus())
    with load.Sampler() as ls, CudaPeakMemory(device) as mem:
        prev = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            t0 = time.perf_counter()
            fn()
            _sync(device)
            first = time.perf_counter() - t0
        finally:
            torch.set_num_threads(prev)
        if once or first >= once_over_s:
            note = ("timed once, no warm-up" if once else
                    f"timed once ({first:.1f} s per call), no warm-up")
            times = [first]
        elif device.type == "cuda":
            times = _do_bench(fn, max_time_s)
            note = ""
        else:
            from torch.utils.benchmark import Timer
            timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
            # it stops after > 3 blocks once IQR/median < threshold; give it room for 4-6
            # blocks of a slow call, whatever max_time_s says (the case's time limit rules)
            m = timer.adaptive_autorange(threshold=threshold, min_run_time=min_time_s,
                                         max_run_time=max(max_time_s, 6 * first))
            times = list(m.times)
            note = ""
    noisy = load.is_noisy(ls.others, threads, cpus)
    return Timing(times, mem.mb, note, once=len(times) == 1, others=ls.others,
                  noisy=noisy)


def _do_bench(fn: Callable[[], None], max_time_s: float) -> List[float]:
    """triton.testing.do_bench's per-call times in seconds (CUDA events, L2 flushed)."""
    import triton.testing as tt
    rep_ms = max(25.0, 1e3 * max_time_s / 2)
    try:
        ms = tt.do_bench(fn, warmup=25, rep=rep_ms, return_mode="all")
    except (TypeError, ValueError):  # an older triton without return_mode="all"
        ms = list(tt.do_bench(fn, warmup=25, rep=rep_ms, quantiles=[0.2, 0.35, 0.5, 0.65, 0.8]))
    return [x / 1e3 for x in ms]


def round_sampler(step: Callable[[int], None], device: torch.device, *, threads: int,
                  round_s: float, call_s: float, start: int = 1) -> Callable[[], List[float]]:
    """One side of an interleaved round (stats.interleave_rounds): each call of the returned
    function times about `round_s` seconds of calls of step (inputs still rotated) and returns
    the per-call times. Short calls: Timer.blocked_autorange (blocks sized so the timer's
    overhead is negligible) on CPU, do_bench on GPU; calls of round_s / 3 or more (`call_s`, the
    warm-up call's time): timed one by one, at least one per round. No warm-up here: the caller
    ran one before the first round."""
    counter = itertools.count(start)

    def fn():
        step(next(counter))

    def sample() -> List[float]:
        if device.type == "cuda":
            return _do_bench(fn, round_s)
        prev = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            if call_s < round_s / 3:
                from torch.utils.benchmark import Timer
                m = Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads) \
                    .blocked_autorange(min_run_time=round_s)
                return list(m.times)
            times: List[float] = []
            while not times or sum(times) < round_s:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return times
        finally:
            torch.set_num_threads(prev)
    return sample

"""How busy the machine is: cores, threads, and the CPU time other processes take from us.

`others` is measured, not guessed: over a time window, the busy time of the CPUs this process may
run on (/proc/stat, only those in its affinity set) minus this process's own CPU time (all its
threads), in cores. A busy loop elsewhere reads as ~1.0. The 1-minute load average is recorded
too (it counts runnable tasks on the whole machine, so it lags and overcounts in containers).

A measurement is `noisy` when other processes took more than the cores our threads leave free:
    others > usable CPUs - threads + 0.25
e.g. 2 CPUs: with --threads 1 one busy core elsewhere is fine, with --threads 2 it is not.
"""
from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from typing import Dict, Optional, Set

SLACK = 0.25  # cores of other work tolerated beyond the free ones (bookkeeping daemons)


def usable_cpus() -> Set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def physical_cores() -> int:
    """Physical cores among the CPUs this process may use (hyper-threads counted once)."""
    cpus = usable_cpus()
    seen = set()
    for c in cpus:
        base = f"/sys/devices/system/cpu/cpu{c}/topology/"
        try:
            with open(base + "core_id") as f:
                core = f.read().strip()
            with open(base + "physical_package_id") as f:
                pkg = f.read().strip()
        except OSError:
            return max(1, len(cpus))
        seen.add((pkg, core))
    return max(1, len(seen) or len(cpus))


def _cpu_busy_s(cpus: Set[int]) -> Optional[float]:
    """Busy seconds (all but idle and iowait) summed over `cpus`, from /proc/stat."""
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    busy = 0
    found = False
    try:
        with open("/proc/stat") as f:
            for line in f:
                if not line.startswith("cpu") or line.startswith("cpu "):
                    continue
                name, *vals = line.split()
                try:
                    idx = int(name[3:])
                except ValueError:
                    continue
                if idx not in cpus:
                    continue
                v = [int(x) for x in vals]
                # user nice system idle iowait irq softirq steal (guest* are inside user)
                busy += sum(v[:8]) - v[3] - v[4]
                found = True
    except OSError:
        return None
    return busy / hz if found else None


def _own_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return float("nan")


class Sampler:
    """with Sampler() as s: ...   then s.others (cores used by other processes meanwhile)."""

    def __init__(self):
        self.cpus = usable_cpus()
        self.others = float("nan")
        self.wall = 0.0

    def __enter__(self):
        self._t = time.monotonic()
        self._busy = _cpu_busy_s(self.cpus)
        self._own = _own_cpu_s()
        return self

    def __exit__(self, *exc):
        self.wall = time.monotonic() - self._t
        busy = _cpu_busy_s(self.cpus)
        # /proc/stat ticks at 100 Hz: windows under ~0.2 s read too coarse to say anything
        if busy is not None and self._busy is not None and self.wall >= 0.2:
            other = (busy - self._busy) - (_own_cpu_s() - self._own)
            self.others = max(0.0, other / self.wall)
        return False


def others_now(window_s: float = 0.5) -> float:
    """Cores other processes use right now (sampled over `window_s` while we sleep)."""
    with Sampler() as s:
        time.sleep(window_s)
    return s.others


def is_noisy(others: float, threads: int, cpus: Optional[int] = None) -> bool:
    if others != others:  # nan: unknown, not noisy
        return False
    free = (cpus if cpus is not None else len(usable_cpus())) - threads
    return others > max(free, 0) + SLACK


@dataclass
class Check:
    load1: float
    others: float
    threads: int
    cpus: int
    noisy: bool

    def warning(self) -> Optional[str]:
        if not self.noisy:
            return None
        free = max(1, int(self.cpus - self.others + 0.5))
        return (f"WARNING: the machine is busy: other processes use {self.others:.1f} of its "
                f"{self.cpus} usable CPUs (1-min load average {self.load1:.1f}), and this run "
                f"uses {self.threads} thread(s). Timings will be slower and noisier than on an "
                f"idle machine; rows measured under load are flagged 'noisy'. "
                + (f"Try --threads {free}, or run when the machine is idle."
                   if free < self.threads else "Run when the machine is idle for clean numbers."))

    def as_dict(self) -> Dict[str, float]:
        return {"load1": self.load1, "others": self.others}


def check(threads: int, window_s: float = 0.5) -> Check:
    """The load check before a run."""
    cpus = len(usable_cpus())
    others = others_now(window_s)
    return Check(loadavg(), others, threads, cpus, is_noisy(others, threads, cpus))


class Monitor:
    """Samples `others` in the background every `period_s` for the whole run, for cases too
    short to measure on their own (/proc/stat ticks at 100 Hz)."""

    def __init__(self, period_s: float = 0.5):
        import threading
        self.period_s = period_s
        self.readings = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            with Sampler() as s:
                self._stop.wait(self.period_s)
            if s.others == s.others:
                self.readings.append((time.monotonic(), s.others))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=2)
        return False

    def around(self, t0: float, t1: float) -> float:
        """Mean of the readings that end within [t0, t1 + period], else the latest one."""
        got = [o for t, o in self.readings if t0 <= t <= t1 + self.period_s]
        if got:
            return sum(got) / len(got)
        return self.readings[-1][1] if self.readings else float("nan")

"""The statistics the harness states: percentiles, a bootstrap interval for the median, a
bootstrap interval for a speedup (unpaired: ratio of medians; paired: per interleaved round), the
verdict read off that interval, and the A B A B ... interleaving of the sides of a comparison
(two revisions, or the providers of one case).

Pure Python, deterministic (seeded resampling), no timing in here: tests drive it with a
synthetic timer of known noise.
"""
from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass
from typing import Callable, List, Sequence, Tuple

CONFIDENCE = 0.95   # of every interval the harness prints
RESAMPLES = 2000    # bootstrap resamples (enough for stable 2.5 / 97.5 percentiles)


def percentile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    s = sorted(xs)
    if not s:
        return float("nan")
    if len(s) == 1:
        return s[0]
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _boot_medians(xs: Sequence[float], rng: random.Random, n: int) -> List[float]:
    k = len(xs)
    return [statistics.median(rng.choices(xs, k=k)) for _ in range(n)]


def median_ci(xs: Sequence[float], confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
              seed: int = 0) -> Tuple[float, float, float]:
    """(median, lo, hi): the sample median and its percentile-bootstrap interval. With one
    sample the interval is unknown (nan, nan)."""
    xs = list(xs)
    if not xs:
        return float("nan"), float("nan"), float("nan")
    med = statistics.median(xs)
    if len(xs) < 2:
        return med, float("nan"), float("nan")
    b = _boot_medians(xs, random.Random(seed), resamples)
    a = (1 - confidence) / 2
    return med, percentile(b, 100 * a), percentile(b, 100 * (1 - a))


def relative_halfwidth(xs: Sequence[float], **kw) -> float:
    """Half the width of the median's interval over the median (0.05: +-5 %)."""
    med, lo, hi = median_ci(xs, **kw)
    if not (med > 0) or math.isnan(lo):
        return float("inf")
    return (hi - lo) / 2 / med


@dataclass
class Speedup:
    """B's median time over A's (>1: A is faster), with its bootstrap interval."""
    ratio: float
    lo: float
    hi: float
    n_a: int
    n_b: int

    @property
    def verdict(self) -> str:
        if math.isnan(self.lo):
            return "undecided (too few samples)"
        if self.lo <= 1.0 <= self.hi:
            return "no significant difference"
        return "faster" if self.lo > 1.0 else "slower"

    def text(self, a: str = "current", b: str = "other") -> str:
        if math.isnan(self.lo):
            return f"{self.ratio:.3g}x ({self.verdict})"
        v = self.verdict
        what = v if v == "no significant difference" else f"{a} is {v}"
        return f"{self.ratio:.3g}x [{self.lo:.3g}-{self.hi:.3g}] ({what})"


def speedup_ci(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE,
               resamples: int = RESAMPLES, seed: int = 0) -> Speedup:
    """median(b) / median(a) and its interval: each side resampled on its own (the samples are
    interleaved in time, so slow drifts of the machine hit both sides alike)."""
    a, b = list(a), list(b)
    r = statistics.median(b) / statistics.median(a)
    if len(a) < 2 or len(b) < 2:
        return Speedup(r, float("nan"), float("nan"), len(a), len(b))
    rng = random.Random(seed)
    ma, mb = _boot_medians(a, rng, resamples), _boot_medians(b, rng, resamples)
    rs = [y / x for x, y in zip(ma, mb) if x > 0]
    q = (1 - confidence) / 2
    return Speedup(r, percentile(rs, 100 * q), percentile(rs, 100 * (1 - q)), len(a), len(b))


def geomean_ci(speedups: Sequence[Speedup]) -> Tuple[float, float, float]:
    """Geometric mean of several speedups, its interval from the geometric means of the ends
    (conservative: the cases' intervals are treated as moving together)."""
    ok = [s for s in speedups if s.ratio > 0]
    if not ok:
        return float("nan"), float("nan"), float("nan")
    g = lambda xs: math.exp(sum(math.log(x) for x in xs) / len(xs))  # noqa: E731
    if any(math.isnan(s.lo) for s in ok):
        return g([s.ratio for s in ok]), float("nan"), float("nan")
    return g([s.ratio for s in ok]), g([s.lo for s in ok]), g([s.hi for s in ok])


def interleave_rounds(samplers: Sequence[Callable[[], List[float]]], rounds: int,
                      on_round: Callable[[int], None] = None
                      ) -> Tuple[List[List[List[float]]], str]:
    """Run the sides in turn, A B (C ...) A B ..., `rounds` times; each sampler call is one
    side's sample of a round (one or more per-call times). Returns (per side, its samples per
    round) and the order run, e.g. 'ABABAB'. Used by `--compare` (two revisions in two worker
    processes) and by the main run (the providers of one case in this process), so a change of
    load during the run hits every side of a round alike and the speedups come from paired
    rounds (paired_speedup_ci). The side that starts alternates every round pair (ABBA ABBA ...)
    would cancel a linear drift exactly; plain ABAB halves it and keeps the order easy to read,
    which is what we do."""
    per: List[List[List[float]]] = [[] for _ in samplers]
    order = []
    names = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    for i in range(rounds):
        for j, sample in enumerate(samplers):
            per[j].append(list(sample()))
            order.append(names[j % len(names)])
        if on_round is not None:
            on_round(i + 1)
    return per, "".join(order)


def interleave(sample_a: Callable[[], List[float]], sample_b: Callable[[], List[float]],
               rounds: int, on_round: Callable[[int], None] = None
               ) -> Tuple[List[float], List[float], str]:
    """interleave_rounds for two sides, the rounds pooled: (A's times, B's times, order)."""
    (ra, rb), order = interleave_rounds([sample_a, sample_b], rounds, on_round)
    return [x for r in ra for x in r], [x for r in rb for x in r], order


def paired_speedup_ci(rounds_a: Sequence[Sequence[float]], rounds_b: Sequence[Sequence[float]],
                      confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
                      seed: int = 0) -> Speedup:
    """B's time over A's (>1: A is faster) from interleaved rounds, paired by round.

    Each round i gives r_i = median(B's calls in round i) / median(A's calls in round i): the
    two samples of a round ran back to back, so a load that comes and goes between rounds
    scales both and cancels in r_i. The speedup is the geometric mean of the r_i; its interval
    is a two-level bootstrap: rounds resampled with replacement (the spread between rounds),
    then each chosen round's calls resampled on each side (the spread within a round). With
    fewer than two rounds the interval is unknown (nan): the verdict is 'undecided'."""
    pairs = [(list(a), list(b)) for a, b in zip(rounds_a, rounds_b) if a and b]
    n_a = sum(len(a) for a, _ in pairs)
    n_b = sum(len(b) for _, b in pairs)
    if not pairs:
        return Speedup(float("nan"), float("nan"), float("nan"), 0, 0)

    def logr(a, b):
        ma, mb = statistics.median(a), statistics.median(b)
        return math.log(mb / ma) if ma > 0 and mb > 0 else float("nan")

    logs = [logr(a, b) for a, b in pairs]
    logs_ok = [x for x in logs if not math.isnan(x)]
    if not logs_ok:
        return Speedup(float("nan"), float("nan"), float("nan"), n_a, n_b)
    ratio = math.exp(sum(logs_ok) / len(logs_ok))
    if len(pairs) < 2:
        return Speedup(ratio, float("nan"), float("nan"), n_a, n_b)
    rng = random.Random(seed)
    k = len(pairs)
    boot = []
    for _ in range(resamples):
        acc = 0.0
        for _ in range(k):
            a, b = pairs[rng.randrange(k)]
            x = logr(rng.choices(a, k=len(a)) if len(a) > 1 else a,
                     rng.choices(b, k=len(b)) if len(b) > 1 else b)
            acc += 0.0 if math.isnan(x) else x
        boot.append(math.exp(acc / k))
    q = (1 - confidence) / 2
    return Speedup(ratio, percentile(boot, 100 * q), percentile(boot, 100 * (1 - q)), n_a, n_b)

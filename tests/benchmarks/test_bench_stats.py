"""The interval and interleaving logic, driven by a synthetic timer with known noise."""
import random

import pytest

from benchmarks import load, stats


class SyntheticTimer:
    """Per-call times: base * (1 + drift * calls so far) * lognormal noise (sigma), with an
    optional burst of load (x factor) over a window of calls - what a busy machine does."""

    def __init__(self, seed, sigma=0.05, drift=0.0, burst=None):
        self.rng, self.sigma, self.drift, self.burst, self.calls = \
            random.Random(seed), sigma, drift, burst, 0

    def side(self, base, n=5):
        def sample():
            out = []
            for _ in range(n):
                f = 1 + self.drift * self.calls
                if self.burst and self.burst[0] <= self.calls < self.burst[1]:
                    f *= self.burst[2]
                out.append(base * f * self.rng.lognormvariate(0, self.sigma))
                self.calls += 1
            return out
        return sample


def test_percentile_interpolates():
    xs = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert stats.percentile(xs, 50) == 3.0
    assert stats.percentile(xs, 20) == pytest.approx(1.8)
    assert stats.percentile([7.0], 20) == 7.0


def test_median_interval_covers_the_true_median_at_the_stated_rate():
    hits = 0
    for seed in range(100):
        rng = random.Random(seed)
        xs = [10.0 * rng.lognormvariate(0, 0.1) for _ in range(25)]
        med, lo, hi = stats.median_ci(xs, resamples=400, seed=seed)
        assert lo <= med <= hi
        hits += lo <= 10.0 <= hi
    assert 85 <= hits <= 100  # 95 % stated; bootstrap of a median is a little conservative
    assert stats.median_ci([3.0])[1] != stats.median_ci([3.0])[1]  # one sample: nan


@pytest.mark.parametrize("true_ratio,verdict", [(1.0, "no significant difference"),
                                                (1.25, "faster"), (0.8, "slower")])
def test_interleaved_speedup_gives_the_right_verdict(true_ratio, verdict):
    # A is the current code (base 1.0), B the other revision (base true_ratio); 5 % noise,
    # a 30 % drift over the run and a 3x burst of load in the middle
    for seed in range(5):
        t = SyntheticTimer(seed, sigma=0.05, drift=0.3 / 60, burst=(20, 30, 3.0))
        a, b, order = stats.interleave(t.side(1.0), t.side(true_ratio), rounds=6)
        assert order == "AB" * 6 and len(a) == len(b) == 30
        sp = stats.speedup_ci(a, b, seed=seed)
        assert sp.verdict == verdict, (seed, sp)
        assert sp.lo <= sp.ratio <= sp.hi
        if verdict == "no significant difference":
            assert "no significant difference" in sp.text()
        else:
            assert abs(sp.ratio / true_ratio - 1) < 0.1


def test_without_interleaving_drift_fakes_a_speedup():
    """What the old one-sample-per-side, A-then-B compare did: with a machine slowing down over
    the run, identical code looks faster; interleaving removes the artefact."""
    t = SyntheticTimer(0, sigma=0.02, drift=1.0 / 60)
    a = t.side(1.0, 30)()
    b = t.side(1.0, 30)()
    assert stats.speedup_ci(a, b).verdict == "faster"  # wrong: same code
    t = SyntheticTimer(0, sigma=0.02, drift=1.0 / 60)
    a, b, _ = stats.interleave(t.side(1.0), t.side(1.0), rounds=6)
    assert stats.speedup_ci(a, b).verdict == "no significant difference"


def test_one_sample_per_side_is_undecided_and_geomean_combines():
    sp = stats.speedup_ci([1.0], [2.0])
    assert sp.ratio == 2.0 and "undecided" in sp.verdict
    g, lo, hi = stats.geomean_ci([stats.Speedup(2.0, 1.5, 2.5, 5, 5),
                                  stats.Speedup(0.5, 0.4, 0.6, 5, 5)])
    assert g == pytest.approx(1.0) and lo < 1 < hi


def test_relative_halfwidth_shrinks_with_less_noise():
    rng = random.Random(1)
    noisy = [rng.lognormvariate(0, 0.3) for _ in range(20)]
    quiet = [rng.lognormvariate(0, 0.01) for _ in range(20)]
    assert stats.relative_halfwidth(quiet) < 0.02 < stats.relative_halfwidth(noisy)


def test_noisy_rule_counts_the_cores_our_threads_leave_free():
    assert not load.is_noisy(1.0, threads=1, cpus=2)   # a busy loop on the other core
    assert load.is_noisy(1.0, threads=2, cpus=2)       # it takes a core we use
    assert not load.is_noisy(0.1, threads=2, cpus=2)
    assert not load.is_noisy(float("nan"), threads=2, cpus=2)
    c = load.Check(load1=3.0, others=1.0, threads=2, cpus=2, noisy=True)
    assert "--threads 1" in c.warning() and "busy" in c.warning()
    assert load.Check(0.0, 0.0, 2, 2, False).warning() is None
    assert 1 <= load.physical_cores() <= len(load.usable_cpus())


def test_sampler_sees_a_busy_loop_in_another_process():
    import subprocess
    import sys
    import time
    p = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        with load.Sampler() as s:
            time.sleep(0.6)
    finally:
        p.kill()
        p.wait()
    assert s.others >= 0.7, s.others  # the loop is one core (plus whatever else runs)


class RoundLoad:
    """A machine whose load changes between rounds (x1 to x3 for a whole round, both sides of
    the round alike) plus 5 % per-call noise: what separately timed rows cannot survive."""

    def __init__(self, seed):
        self.rng = random.Random(seed)
        self.factor = 1.0

    def next_round(self, _i=None):
        self.factor = self.rng.uniform(1.0, 3.0)

    def side(self, base, n=5):
        def sample():
            return [base * self.factor * self.rng.lognormvariate(0, 0.05) for _ in range(n)]
        return sample


@pytest.mark.parametrize("true_ratio,verdict", [(1.0, "no significant difference"),
                                                (1.15, "faster"), (0.87, "slower")])
def test_paired_rounds_survive_load_that_changes_between_rounds(true_ratio, verdict):
    for seed in range(5):
        m = RoundLoad(seed)
        m.next_round()
        per, order = stats.interleave_rounds([m.side(1.0), m.side(true_ratio)], 6,
                                             on_round=m.next_round)
        assert order == "AB" * 6 and [len(r) for r in per[0]] == [5] * 6
        sp = stats.paired_speedup_ci(per[0], per[1], seed=seed)
        assert sp.verdict == verdict, (seed, sp)
        assert sp.lo <= sp.ratio <= sp.hi and abs(sp.ratio / true_ratio - 1) < 0.05
        assert (sp.n_a, sp.n_b) == (30, 30)


def test_unpaired_rows_under_changing_load_cannot_tell():
    """The same data, each side's calls pooled and compared unpaired (separately timed rows):
    the interval is several times wider and a real 15 % speedup is lost in it."""
    widths = []
    lost = 0
    for seed in range(5):
        m = RoundLoad(seed)
        m.next_round()
        per, _ = stats.interleave_rounds([m.side(1.0), m.side(1.15)], 6, on_round=m.next_round)
        pa = stats.paired_speedup_ci(per[0], per[1], seed=seed)
        un = stats.speedup_ci([x for r in per[0] for x in r], [x for r in per[1] for x in r],
                              seed=seed)
        widths.append((un.hi - un.lo) / (pa.hi - pa.lo))
        lost += un.verdict != "faster"
    assert min(widths) > 2 and lost >= 3, (widths, lost)


def test_interleave_rounds_takes_any_number_of_sides_and_one_round_is_undecided():
    calls = []
    mk = lambda name, t: (lambda: calls.append(name) or [t])  # noqa: E731
    per, order = stats.interleave_rounds([mk("a", 1.0), mk("b", 2.0), mk("c", 4.0)], 3)
    assert order == "ABCABCABC" and "".join(calls) == "abcabcabc"
    assert per[2] == [[4.0]] * 3
    sp = stats.paired_speedup_ci(per[0], per[2])
    assert sp.ratio == pytest.approx(4.0) and sp.lo == pytest.approx(4.0)
    one = stats.paired_speedup_ci([[1.0, 1.1]], [[2.0, 2.1]])
    assert one.ratio == pytest.approx(2.0, rel=0.05) and "undecided" in one.verdict

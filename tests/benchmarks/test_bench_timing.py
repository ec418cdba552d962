"""Timing helpers: percentiles, repeat policy, time limits, input rotation, run prediction."""
import time

import pytest
import torch

from benchmarks import timing
from benchmarks.cli import Runner
from benchmarks.registry import Case, Config, suite


def test_measure_warms_up_rotates_and_repeats():
    calls = []

    def step(i):
        calls.append(i)
        time.sleep(0.002)

    t = timing.measure(step, torch.device("cpu"), threads=1, min_time_s=0.02, max_time_s=0.2,
                       once_over_s=10.0)
    assert calls[0] == 0 and calls == list(range(len(calls)))  # inputs rotate: i counts up
    assert t.reps >= 2 and not t.once  # Timer.adaptive_autorange (> 3 blocks unless capped)
    assert 0.0015 < t.median_s < 0.2 and t.p20_s <= t.median_s <= t.p80_s
    lo, hi = t.ci_s
    assert lo <= t.median_s <= hi
    one = timing.measure(step, torch.device("cpu"), threads=1, min_time_s=1.0, max_time_s=1.0,
                         once_over_s=10.0, once=True)
    assert one.reps == 1 and one.once and "once" in one.note
    slow = timing.measure(lambda i: time.sleep(0.05), torch.device("cpu"), threads=1,
                          min_time_s=1.0, max_time_s=1.0, once_over_s=0.01)
    assert slow.reps == 1 and slow.once and "timed once" in slow.note


def test_measure_runs_with_the_asked_threads_and_restores_them():
    seen = []
    before = torch.get_num_threads()
    timing.measure(lambda i: seen.append(torch.get_num_threads()), torch.device("cpu"),
                   threads=1, min_time_s=0.0, max_time_s=0.01, once_over_s=10.0)
    assert set(seen) == {1} and torch.get_num_threads() == before


def test_time_limit_interrupts_a_python_loop():
    with pytest.raises(timing.CaseTimeout):
        with timing.time_limit(0.2):
            while True:
                pass
    with timing.time_limit(5.0):  # and is disarmed after the block
        pass
    time.sleep(0.01)


def test_rotation_overflows_the_cache():
    cpu = torch.device("cpu")
    c = timing.cache_bytes(cpu)
    assert timing.n_input_sets(c * 4, cpu) == 1
    assert timing.n_input_sets(c // 2, cpu) == 4
    assert timing.n_input_sets(1, cpu) == 8


def test_prediction_is_conservative_then_fitted():
    r = Runner(suite("cpu"), torch.device("cpu"), {}, None, None, 1, 30.0, 100.0)
    base = Config(1, 1024, 4, 64, 64)
    case = lambda T: Case("chunk_gla", "ours-torch", base.with_T(T), "fwd", "fp32")  # noqa
    assert r.predict(case(1024)) is None
    r.history[r._hkey(case(1024))] = [(1024, 1.0)]
    assert r.predict(case(4096)) == pytest.approx(16.0)  # one size: assume quadratic
    r.history[r._hkey(case(1024))].append((2048, 2.0))
    assert r.predict(case(8192)) == pytest.approx(8.0)  # fitted: linear
    # fwd+bwd measured at one size only borrows the forward's fitted growth (linear here)
    fb = lambda T: Case("chunk_gla", "ours-torch", base.with_T(T), "fwd+bwd", "fp32")  # noqa
    r.history[r._hkey(fb(1024))] = [(1024, 3.0)]
    assert r.predict(fb(4096)) == pytest.approx(12.0)
    # a mode not measured yet at this T: from the forward (fwd+bwd ~ 3x fwd)
    assert r.predict(fb(2048)) == pytest.approx(6.0)
    # a case predicted over the cap is skipped with a note, not run
    res = r.run_case(case(1 << 20))
    assert res.status == "skipped" and "predicted" in res.note


def test_groups_pair_the_providers_of_one_case_and_skip_peers_without_ours():
    r = Runner(suite("cpu"), torch.device("cpu"), {}, None, None, 1, 30.0, 100.0)
    cfg = Config(1, 1 << 20, 4, 64, 64)
    mk = lambda op, p, m="fwd": Case(op, p, cfg, m, "fp32")  # noqa: E731
    cases = [mk("chunk_gla", "ours-torch"), mk("chunk_gla", "sdpa"), mk("chunk_gla", "reference"),
             mk("chunk_gla", "ours-torch", "fwd+bwd"), mk("causal_conv1d_fn", "ours-torch")]
    g = Runner.groups(cases)
    # same op, shape, mode: ours and SDPA together; the reference and lone cases are not grouped
    assert g[cases[0]] == g[cases[1]] == (cases[0], cases[1])
    assert cases[2] not in g and cases[3] not in g and cases[4] not in g
    # ours predicted over the per-case cap: skipped, and SDPA (nothing to compare) not timed
    r.history[r._hkey(cases[0])] = [(1024, 1.0)]
    res = r.run_group(g[cases[0]])
    assert res[cases[0]].status == "skipped" and "predicted" in res[cases[0]].note
    assert res[cases[1]].status == "skipped" and "nothing to compare" in res[cases[1]].note

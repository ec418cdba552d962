"""The registry through pytest-benchmark: tiny shapes here (it is also a check that every case
builds and runs); `pytest tests/benchmarks/test_bench_pytest_plugin.py --benchmark-only
--benchmark-columns=median` gives pytest-benchmark's own table."""
import pytest
import torch

from benchmarks import registry, timing

pytest.importorskip("pytest_benchmark")  # a test extra; bare GPU machines may lack it

CASES = [c for c in registry.pytest_cases(quick=True) if c.cfg.T == 64]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.op}-{c.provider}-{c.mode}")
def test_registry_case(benchmark, case):
    run = registry.provider_function(case.provider, registry.OPS[case.op])
    step = timing.build_step(case, case.spec, run, torch.device("cpu"), sets=2)
    benchmark.extra_info.update(flops=case.spec.flops(case.cfg, case.mode),
                                bytes=case.spec.bytes(case.cfg, torch.float32, case.mode))
    it = iter(range(1 << 30))
    benchmark.pedantic(lambda: step(next(it)), rounds=2, iterations=1, warmup_rounds=0)

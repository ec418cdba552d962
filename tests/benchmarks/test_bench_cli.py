"""A smoke run of the CLI at a tiny shape into a tmp folder, and the compare helpers."""
import os

import pytest

from benchmarks import cli, compare, report
from benchmarks.report import Result


def test_quick_cli_run_writes_table_csv_log_and_plots(tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(["--quick", "--op", "chunk_linear_attn,causal_conv1d_fn",
                   "--provider", "ours-torch,sdpa", "--T", "32,64", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "device peaks (measured now)" in text
    assert "== chunk_linear_attn" in text and "== causal_conv1d_fn" in text
    assert "max rel err" in text and "summary" in text and "vs sdpa:" in text
    rows = report.read_csv(str(out / "results.csv"))
    got = {(r.op, r.provider, r.T, r.mode) for r in rows}
    for T in (32, 64):
        for m in ("fwd", "fwd+bwd"):
            assert ("chunk_linear_attn", "ours-torch", T, m) in got
            assert ("sdpa_causal", "sdpa", T, m) in got
            assert ("causal_conv1d_fn", "ours-torch", T, m) in got
    for r in rows:
        assert r.median_ms > 0 and r.p20_ms <= r.median_ms <= r.p80_ms and r.tokens_per_s > 0
        assert r.gbps > 0 and r.pct_floor > 0 and r.git_rev and r.torch and r.date
        if r.provider == "ours-torch":  # fp32 torch path vs the float64 reference
            assert r.max_rel_err < 1e-4, (r.op, r.max_rel_err)
    assert sorted(os.listdir(out / "plots")) == ["causal_conv1d_fn.png", "chunk_linear_attn.png"]
    assert "summary" in (out / "bench.log").read_text()


def test_compare_helpers():
    a = Result(op="chunk_gla", provider="ours-torch", mode="fwd", shape="s", T=64, dtype="fp32",
               median_ms=2.0)
    b = Result(**{**a.__dict__, "median_ms": 6.0})
    lines, geo = compare.speedup_table([a], [b], "HEAD~1")
    assert geo["ours-torch"] == pytest.approx(3.0) and "3.00x" in lines[1]

    class A:  # parsed flags of `--quick --op chunk_gla --T 64 --compare HEAD`
        quick, gpu_suite, op, provider, dtype, T, mode = True, False, ["chunk_gla"], None, \
            None, [64], None
        device, max_case_s, budget_s = None, None, None
    argv = compare.child_argv(A)
    assert argv[:5] == ["--quick", "--op", "chunk_gla", "--T", "64"]
    assert "--no-csv" in argv and "--compare" not in argv

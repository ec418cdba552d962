"""The CLI end to end at tiny shapes (into tmp folders), and its refusals: everything that cannot
run is an error with a non-zero exit before any timing."""
import os
import subprocess
import sys
import time

import pytest

from benchmarks import cli, compare, env, report

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_quick_cli_run_writes_table_csv_log_plots_and_report(tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(["--quick", "--op", "chunk_linear_attn,causal_conv1d_fn", "--threads", "1",
                   "--provider", "ours-torch,sdpa", "--T", "32,64", "--out", str(out),
                   "--report"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "device peaks (measured now" in text and "load before the run" in text
    assert "== chunk_linear_attn" in text and "== causal_conv1d_fn" in text
    assert "max rel err" in text and "summary" in text and "vs sdpa:" in text
    assert "not fully timed:" in text and "load during the run" in text
    assert "interleaved rounds" in text and "speedup [95% interval]" in text
    assert "issue" not in text.lower()
    rows = report.read_csv(str(out / "results.csv"))
    got = {(r.op, r.provider, r.T, r.mode) for r in rows}
    for T in (32, 64):
        for m in ("fwd", "fwd+bwd"):
            assert ("chunk_linear_attn", "ours-torch", T, m) in got
            # SDPA timed in interleaved rounds with this op: its own row, with the speedup
            assert ("chunk_linear_attn", "sdpa", T, m) in got
            assert ("causal_conv1d_fn", "ours-torch", T, m) in got
    for r in rows:
        assert r.median_ms > 0 and r.p20_ms <= r.median_ms <= r.p80_ms and r.tokens_per_s > 0
        assert r.gbps > 0 and r.pct_floor > 0 and r.git_rev and r.torch and r.date
        assert r.threads == 1 and r.others == r.others and r.load1 == r.load1
        if r.reps > 1:
            assert r.ci_lo_ms <= r.median_ms <= r.ci_hi_ms
        if r.op == "chunk_linear_attn":  # ours and SDPA: timed in interleaved rounds
            assert r.rounds >= 2
        if r.provider == "sdpa":  # the speedup of ours vs SDPA, from the paired rounds
            assert r.speedup_vs == "ours-torch" and r.speedup_lo <= r.speedup <= r.speedup_hi
        if r.provider == "ours-torch":  # fp32 torch path vs the float64 reference
            assert r.max_rel_err < 1e-4, (r.op, r.max_rel_err)
    assert sorted(os.listdir(out / "plots")) == ["gla.png", "ssm.png"]
    assert "summary" in (out / "bench.log").read_text()
    md = (out / "report.md").read_text()
    assert "![gla.png](plots/gla.png)" in md and "threads: 1" in md
    # and the page again, from the CSV alone
    assert cli.main(["--report-from", str(out / "results.csv"), "--out", str(tmp_path / "r"),
                     "--no-plots"]) == 0
    assert "## chunk_linear_attn" in (tmp_path / "r" / "report.md").read_text()


@pytest.mark.parametrize("argv,words", [
    (["--provider", "fla"], "provider fla cannot run here"),
    (["--provider", "ours-triton", "--op", "chunk_gla"], "provider ours-triton cannot run"),
    (["--op", "selective_scan_fn", "--provider", "sdpa"], "provider sdpa cannot run"),
    (["--compare", "nosuchrev"], "not a revision"),
    (["--device", "cuda"], "CUDA device"),
])
def test_what_cannot_run_is_an_error_before_any_timing(argv, words, capsys, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    from benchmarks import roofline
    monkeypatch.setattr(roofline, "measure_peaks", lambda *a, **k: pytest.fail("timed"))
    t0 = time.monotonic()
    assert cli.main(["--quick"] + argv) == 2
    assert time.monotonic() - t0 < 20
    cap = capsys.readouterr()
    assert words in cap.out + cap.err


def test_save_refuses_a_dirty_checkout(monkeypatch, capsys):
    monkeypatch.setattr(env, "git_revision", lambda path=None: "abc1234+dirty")
    assert cli.main(["--quick", "--save", "--op", "causal_conv1d_fn"]) == 2
    assert "commit" in capsys.readouterr().out


def test_default_run_folder_is_ignored_by_git():
    rel = os.path.relpath(os.path.join(cli.RUNS_DIR, "20990101-000000", "results.csv"), ROOT)
    got = subprocess.run(["git", "check-ignore", "-q", rel], cwd=ROOT)
    assert got.returncode == 0, f"{rel} is not ignored: add benchmarks/runs/ to .gitignore"


def test_compare_report_lines_say_no_significant_difference():
    from benchmarks import stats
    from benchmarks.registry import Case, Config
    c = Case("chunk_gla", "ours-torch", Config(1, 64, 2, 32, 32), "fwd", "fp32")
    rows = [compare.Row(c, stats.Speedup(1.02, 0.95, 1.1, 12, 12), 2.0, 2.04),
            compare.Row(c, stats.Speedup(1.5, 1.3, 1.7, 12, 12), 2.0, 3.0),
            compare.Row(c, None, error="rev: AttributeError")]
    text = "\n".join(compare.report_lines(rows, "HEAD~1"))
    assert "1.02x [0.95-1.1] (no significant difference)" in text
    assert "1.5x [1.3-1.7] (current is faster)" in text and "not compared" in text
    assert "faster in 1, slower in 0, no significant difference in 1 of 2" in text


@pytest.mark.skipif(not os.environ.get("BENCH_SLOW_TESTS"),
                    reason="two worker processes and a git worktree: 1-3 min on 2 busy cores; "
                           "BENCH_SLOW_TESTS=1 runs it")
def test_compare_interleaves_two_real_revisions(tmp_path):
    """HEAD vs HEAD (same lightning_ops code): a short interleaved run in subprocesses; the
    verdict for identical code should not be a big difference."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--compare", "HEAD", "--threads", "1",
         "--op", "causal_conv1d_fn", "--mode", "fwd", "--T", "64", "--rounds", "2"],
        cwd=ROOT, text=True, capture_output=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "interleaved A B A B" in proc.stdout
    line = [x for x in proc.stdout.splitlines() if x.startswith("causal_conv1d_fn")][0]
    ratio = float(line.split("x")[0].split()[-1])
    assert 0.5 < ratio < 2.0, line

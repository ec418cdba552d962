"""CSV, table, summary and plot writers (always into tmp_path, never benchmarks/results)."""
import math
import os

import pytest

from benchmarks import report
from benchmarks.report import Result


def _r(op="chunk_gla", provider="ours-torch", mode="fwd+bwd", T=4096, ms=10.0, **kw):
    base = dict(op=op, provider=provider, mode=mode, shape=f"B1 T{T} H4 K64 V64", T=T,
                dtype="fp32", median_ms=ms, p20_ms=ms * 0.9, p80_ms=ms * 1.1, reps=5,
                ci_lo_ms=ms * 0.95, ci_hi_ms=ms * 1.05, threads=2,
                tokens_per_s=T / ms * 1e3, B=1, H=4, K=64, V=64, device="cpu", git_rev="abc")
    base.update(kw)
    return Result(**base)


def test_csv_round_trip_appends_under_one_header(tmp_path):
    path = str(tmp_path / "sub" / "results.csv")
    rows = [_r(), _r(provider="sdpa", ms=25.0, max_rel_err=1.5e-7, note="a, b; c")]
    # SDPA is shown under every q/k/v op but stored once per shape
    again = _r(op="chunk_simple_gla", provider="sdpa", ms=25.0)
    assert report.write_csv(path, rows + [again, _r(status="skipped", note="x")]) == 2
    assert report.write_csv(path, [_r(T=1024, ms=2.5)]) == 1
    lines = open(path).read().splitlines()
    assert lines[0].split(",") == report.CSV_FIELDS and len(lines) == 4
    back = report.read_csv(path)
    assert [(b.op, b.provider) for b in back] == [("chunk_gla", "ours-torch"),
                                                  ("sdpa_causal", "sdpa"),
                                                  ("chunk_gla", "ours-torch")]
    assert [b.key()[1:] for b in back] == [r.key()[1:] for r in rows] + [_r(T=1024).key()[1:]]
    assert back[1].median_ms == 25.0 and back[1].max_rel_err == 1.5e-7
    assert back[1].note == "a, b; c" and back[2].T == 1024
    assert math.isnan(back[0].max_rel_err)  # unknown stays unknown, not 0
    for k in ("op", "provider", "mode", "shape", "dtype", "median_ms", "p20_ms", "p80_ms",
              "tokens_per_s", "gbps", "pct_floor", "peak_mb", "device", "torch", "triton",
              "git_rev", "date"):
        assert k in report.CSV_FIELDS


def test_csv_with_an_old_header_is_migrated(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("op,provider,median_ms,git_rev\nchunk_gla,ours-torch,3.5,c5fc1b3\n")
    report.write_csv(str(path), [_r(noisy=True, others=1.2)])
    back = report.read_csv(str(path))
    assert [b.op for b in back] == ["chunk_gla", "chunk_gla"] and os.listdir(tmp_path) == [
        "results.csv"]
    assert back[0].median_ms == 3.5 and back[0].git_rev == "c5fc1b3" and back[0].threads == 0
    assert back[1].noisy and back[1].others == 1.2 and back[1].threads == 2
    assert not back[0].noisy and math.isnan(back[0].ci_lo_ms)


def test_summary_counts_wins_and_losses_per_peer_with_intervals():
    rs = [_r(ms=10.0), _r(provider="sdpa", ms=30.0),
          _r(T=1024, ms=4.0), _r(T=1024, provider="sdpa", ms=2.0),
          _r(T=1024, provider="ours-triton", ms=3.0),  # our fastest backend is the one compared
          _r(T=256, ms=1.0), _r(T=256, provider="sdpa", ms=1.02)]  # within the intervals
    sp = sorted(x[0] for x in report.speedups(rs, "sdpa"))
    assert sp == pytest.approx([2.0 / 3.0, 1.02, 3.0])
    (line,) = report.summary(rs)
    assert line.startswith("vs sdpa: faster in 1/3 (best 3x [2.71-3.32] chunk_gla T4096 fwd+bwd)")
    assert "slower in 1/3 (0.667x" in line and "no significant difference in 1/3" in line


def test_holes_list_every_case_not_fully_timed():
    rs = [_r(), _r(T=1024, reps=1, ci_lo_ms=float("nan")), _r(T=256, noisy=True),
          _r(T=16384, status="skipped", note="predicted ~50 s per call"),
          _r(T=16384, provider="sdpa", status="timeout", note="ran past 30 s")]
    h = report.holes(rs)
    assert any("timed once" in x and "T1024" in x for x in h)
    assert any(x.startswith("1 skipped: predicted") and "T16384" in x for x in h)
    assert any("timeout" in x and "sdpa T16384" in x for x in h)
    assert any("1 of 3 timed rows are noisy" in x for x in h)
    assert report.holes([_r()]) == []


def test_cpu_targets_use_a_lower_bound_when_the_peer_was_not_timed_in_full():
    rs = [_r(ms=100.0), _r(provider="reference", mode="fwd", ms=2000.0),
          _r(provider="reference", status="skipped", note="predicted"),
          _r(T=16384, ms=500.0), _r(T=16384, provider="sdpa", ms=400.0)]
    a, b = report.cpu_targets(rs)
    assert "T=4096 vs reference: >=20.00x (goal >= 10x) PASS" in a
    assert b.startswith("headline: chunk_gla fwd+bwd T=16384 vs SDPA causal: 0.80x") and "FAIL" in b
    rs[2] = _r(provider="reference", ms=900.0)
    assert "reference: 9.00x (goal >= 10x) FAIL" in report.cpu_targets(rs)[0]
    rs[2] = _r(provider="reference", status="timeout", note="ran past 30 s (stopped)")
    assert "reference: >=300.00x" in report.cpu_targets(rs)[0]  # the limit beats the fwd
    rs[4] = _r(T=16384, provider="sdpa", status="timeout", note="ran past 0.4 s")
    assert "SDPA causal: >=0.80x (goal > 1x) UNDECIDED" in report.cpu_targets(rs)[1]
    rs[3] = _r(T=16384, status="skipped", note="predicted ~50 s per call")
    assert report.cpu_targets(rs)[1] == ("headline: chunk_gla fwd+bwd T=16384 vs SDPA causal: not "
                                         "measured (ours-torch: skipped predicted ~50 s per call;"
                                         " sdpa: timeout ran past 0.4 s)")
    assert report.cpu_targets([_r(op="chunk_simple_gla")]) == []


def test_table_has_a_block_per_op_and_marks_big_errors():
    rs = [_r(mode="fwd", ms=3.0, max_rel_err=2e-7), _r(max_rel_err=2e-7),
          _r(provider="sdpa", status="timeout", note="ran past 30 s"),
          _r(op="causal_conv1d_fn", shape="B1 D256 L4096 W4", max_rel_err=0.5)]
    t = report.table(rs, "header note")
    assert t.splitlines()[0] == "header note"
    assert "== chunk_gla  [B1 T H4 K64 V64]" in t and "== causal_conv1d_fn" in t
    assert "fwd ms" in t and "fwd+bwd ms" in t and "3 ±5%" in t
    assert "timeout" in t and "ran past 30 s" in t
    assert "5.0e-01 !" in t and "2.0e-07 !" not in t


def test_plot_writes_one_png_per_family_and_marks_holes(tmp_path):
    rs = [_r(T=T, ms=T / 100, mode=m, provider=p)
          for T in (1024, 4096) for m in ("fwd", "fwd+bwd") for p in ("ours-torch", "sdpa")]
    rs += [_r(T=16384, status="skipped", note="x"), _r(T=8192, reps=1, noisy=True),
           _r(op="causal_conv1d_fn")]
    paths, why = report.plot(rs, str(tmp_path / "plots"))
    assert why is None and sorted(os.path.basename(p) for p in paths) == ["gla.png", "ssm.png"]
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert os.path.getsize(p) > 5000
    md = report.markdown(rs, paths, str(tmp_path), ["device: cpu"], report.summary(rs))
    assert "| T | provider |" in md and "![gla.png](plots/gla.png)" in md
    assert "## Not fully timed" in md and "skipped" in md and "noisy" in md


def test_causal_and_non_causal_sdpa_are_stored_apart(tmp_path):
    """An unpaired SDPA row under a bidirectional op (lion_attn: non-causal SDPA) is stored as
    'sdpa_full' and read back under the bidirectional ops only, never under the causal ones."""
    path = str(tmp_path / "results.csv")
    rows = [_r(), _r(provider="sdpa", ms=25.0), _r(op="lion_attn"),
            _r(op="lion_attn", provider="sdpa", ms=50.0)]
    assert report.write_csv(path, rows) == 4
    back = report.read_csv(path)
    assert sorted(b.op for b in back if b.provider == "sdpa") == ["sdpa_causal", "sdpa_full"]
    shown = {(r.op, r.median_ms) for r in report.expand_sdpa(back) if r.provider == "sdpa"}
    assert shown == {("chunk_gla", 25.0), ("lion_attn", 50.0)}

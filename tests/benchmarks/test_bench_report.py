"""CSV, table, summary and plot writers (always into tmp_path, never benchmarks/results)."""
import math
import os

from benchmarks import report
from benchmarks.report import Result


def _r(op="chunk_gla", provider="ours-torch", mode="fwd+bwd", T=4096, ms=10.0, **kw):
    base = dict(op=op, provider=provider, mode=mode, shape=f"B1 T{T} H4 K64 V64", T=T,
                dtype="fp32", median_ms=ms, p20_ms=ms * 0.9, p80_ms=ms * 1.1, reps=5,
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


def test_csv_with_an_old_header_is_kept_aside(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("op,ms\nx,1\n")
    report.write_csv(str(path), [_r()])
    assert report.read_csv(str(path))[0].op == "chunk_gla"
    old = [p for p in os.listdir(tmp_path) if p.endswith(".old")]
    assert len(old) == 1 and (tmp_path / old[0]).read_text() == "op,ms\nx,1\n"


def test_summary_counts_wins_and_losses_per_peer():
    rs = [_r(ms=10.0), _r(provider="sdpa", ms=30.0),
          _r(T=1024, ms=4.0), _r(T=1024, provider="sdpa", ms=2.0),
          _r(T=1024, provider="ours-triton", ms=3.0)]  # our fastest backend is the one compared
    sp = sorted(x for x, _, _ in report.speedups(rs, "sdpa"))
    assert sp == [2.0 / 3.0, 3.0]
    (line,) = report.summary(rs)
    assert line.startswith("vs sdpa: faster in 1/2 (best 3x chunk_gla T4096 fwd+bwd)")
    assert "slower in 1/2 (0.667x chunk_gla T1024 fwd+bwd)" in line


def test_cpu_targets_use_a_lower_bound_when_the_peer_was_not_timed_in_full():
    rs = [_r(ms=100.0), _r(provider="reference", mode="fwd", ms=2000.0),
          _r(provider="reference", status="skipped", note="predicted"),
          _r(T=16384, ms=500.0), _r(T=16384, provider="sdpa", ms=400.0)]
    a, b = report.cpu_targets(rs)
    assert "T=4096 vs reference: >=20.00x (need >= 10x) PASS" in a
    assert b.startswith("target chunk_gla fwd+bwd T=16384 vs SDPA causal: 0.80x") and "FAIL" in b
    rs[2] = _r(provider="reference", ms=900.0)
    assert "reference: 9.00x (need >= 10x) FAIL" in report.cpu_targets(rs)[0]
    rs[2] = _r(provider="reference", status="timeout", note="ran past 30 s (stopped)")
    assert "reference: >=300.00x" in report.cpu_targets(rs)[0]  # the limit beats the fwd
    rs[4] = _r(T=16384, provider="sdpa", status="timeout", note="ran past 0.4 s")
    assert "SDPA causal: >=0.80x (need > 1x) UNDECIDED" in report.cpu_targets(rs)[1]
    rs[3] = _r(T=16384, status="skipped", note="predicted ~50 s per call")
    assert report.cpu_targets(rs)[1] == ("target chunk_gla fwd+bwd T=16384 vs SDPA causal: not "
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
    assert "fwd ms (p20-p80)" in t and "fwd+bwd ms (p20-p80)" in t
    assert "timeout" in t and "ran past 30 s" in t
    assert "5.0e-01 !" in t and "2.0e-07 !" not in t


def test_plot_writes_one_png_per_op(tmp_path):
    rs = [_r(T=T, ms=T / 100, mode=m, provider=p)
          for T in (1024, 4096) for m in ("fwd", "fwd+bwd") for p in ("ours-torch", "sdpa")]
    paths, why = report.plot(rs + [_r(op="causal_conv1d_fn")], str(tmp_path / "plots"))
    assert why is None and len(paths) == 2
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert os.path.getsize(p) > 5000

"""The lease's one command (tools/gpu_lane.py, `make gpu-lane OUT=...`) works before device time
is spent: its --dry-run on the CPU (interpreter, tiny shapes, CUDA-only steps skipped) runs every
step, writes the files the lease brings back (at most 8) and passes its parity checks."""
from __future__ import annotations

import csv
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_gpu_lane_dry_run(tmp_path):
    out = tmp_path / "lane"
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    # the pytest step collects this small folder only (the suite's own collection is make test)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_lane.py"), "--dry-run",
                        "--out", str(out), "--tests-path", os.path.join(ROOT, "tests", "gpu"),
                        "--suite-timeout", "600"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    files = sorted(os.listdir(out))
    assert len(files) <= 8, files
    for f in ("lane.log", "env.txt", "gpu-tests.log", "gpu_bench.csv"):
        assert f in files, files
    rows = list(csv.DictReader(open(out / "gpu_bench.csv")))
    parity = [r for r in rows if r["kind"] == "parity"]
    assert len(parity) >= 5 and all(r["note"] == "ok" for r in parity), parity
    kinds = {r["kind"] for r in rows}
    assert {"throughput", "decode"} <= kinds, kinds
    assert any(r["provider"] == "ours-triton" and r["median_ms"] for r in rows
               if r["kind"] == "throughput")

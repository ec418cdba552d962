"""Every Triton launch configuration fits an sm_90 GPU (H100 / H200), checked ahead of time on
the CPU (tools/sm90_resources.py): the launchers' real configurations are recorded (K, V in
16..512, fp32/fp16/bf16, every gate kind, varlen on/off, every family) and compiled for sm_90
under this triton and, where `make sm90-env` could install it, the GPU machines' triton 3.6.
Fails when a configuration needs more than 232,448 B of shared memory, does not compile, or a
grid passes 65,535 on axis y or z. Results are cached in the committed table
benchmarks/results/sm90_resources.csv (keyed by kernel source, arguments and triton version):
configurations the table lacks are compiled within LIGHTNING_OPS_SM90_BUDGET_S seconds per
triton (largest tiles first); LIGHTNING_OPS_SM90_STRICT=1 fails on any left over."""
from __future__ import annotations

import os
import subprocess
import sys

from sm90_compile import ROOT, clean_env, skip_without_ptxas

PY36 = os.path.join(ROOT, ".venv-triton36", "bin", "python")


def _clean_env():
    return clean_env(OMP_NUM_THREADS="1")


def test_launch_grids_within_cuda_limits():
    """Record (not run) the launches at shapes that used to pass 65,535 on grid y/z: decode
    with batch x heads = 70,000, and a vector-gated backward over 1.1M tokens (chunk_intra_grad
    put 4 x chunks on y). Also: what cannot fit is refused before any launch."""
    code = r'''
import sys, torch
sys.path.insert(0, "tools")
import sm90_resources as R
from lightning_ops import triton_utils
from lightning_ops.chunk import triton as G
from lightning_ops.delta import triton as D
from lightning_ops.ssm import triton as S
with triton_utils.pretend_gpu(), R.Recorder() as rec:
    B, H, K = 70000, 1, 16
    q = torch.randn(B, 1, H, K); g = -torch.rand(B, 1, H, K)
    G.forward(q, q, q, g, None, 0.25, None, False, None, "recurrent")
    G.backward(q, q, q, g, None, 0.25, None, None, "recurrent", q, None)
    D.forward(q, q, q, g[..., 0], g[..., 0].neg(), 0.25, None, False, None, False, "recurrent")
    st = torch.randn(B, H, 16, 16); x = torch.randn(B, H, 16)
    S.state_update(st, x, x.abs(), -torch.rand(H, 16, 16), torch.randn(B, 1, 16),
                   torch.randn(B, 1, 16), None, None, None, False)
    T = 1100 * 1024
    q = torch.randn(1, T, 1, 16); g = -torch.rand(1, T, 1, 16)
    G.backward(q, q, q, g, None, 0.25, None, None, "chunk", q, None)
    for la in rec.launches:
        la["case"] = "grid test"
    bad = R.grid_violations(rec.launches)
    assert not bad, bad
    print("launches", len(rec.launches))
    try:
        q = torch.randn(70000, 64, 1, 16)
        G.forward(q, q, q, None, None, 0.25, None, False, None, "chunk")
    except ValueError as e:
        assert "65535" in str(e), e
    else:
        raise AssertionError("batch x heads over 65535 was not refused")
'''
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_clean_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def test_sm90_resources_fit(tmp_path):
    import shutil

    import triton
    skip_without_ptxas()
    pythons = ["--python", sys.executable]
    if os.path.exists(PY36):
        pythons += ["--python", PY36]
    else:
        print("triton 3.6 env (.venv-triton36, `make sm90-env`) is missing: checking under "
              f"triton {triton.__version__} only; the table's 3.6 rows are kept as they are")
    budget = os.environ.get("LIGHTNING_OPS_SM90_BUDGET_S", "90")
    # the committed table is the cache; the run writes its additions to a copy, so `make test`
    # never modifies a tracked file (`make sm90-table` updates the committed one on purpose)
    table = tmp_path / "sm90_resources.csv"
    shutil.copy(os.path.join(ROOT, "benchmarks", "results", "sm90_resources.csv"), table)
    cmd = [sys.executable, os.path.join(ROOT, "tools", "sm90_resources.py"), "check",
           "--jobs", "2", "--budget-s", budget, "--table", str(table), *pythons]
    if os.environ.get("LIGHTNING_OPS_SM90_STRICT") == "1":
        cmd.append("--strict")
    r = subprocess.run(cmd, cwd=ROOT, env=_clean_env(), capture_output=True, text=True,
                       timeout=3600)
    print(r.stdout[-6000:])
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]


def test_compile_worker_leaves_no_orphans(tmp_path):
    """A worker's own children (ptxas, minutes on a large kernel) die with the worker's process
    group when the budget ends it: nothing keeps burning the CPU the rest of the suite needs."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import sm90_resources as R
    pid_file = tmp_path / "child.pid"
    code = ("import subprocess, sys; p = subprocess.Popen(['sleep', '300']); "
            f"open({str(pid_file)!r}, 'w').write(str(p.pid))")
    r = R._run_own_group([sys.executable, "-c", code], env=dict(os.environ))
    assert r.returncode == 0
    pid = int(pid_file.read_text())
    import time
    for _ in range(50):  # gone, or a zombie left for init to reap
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in "ZX":
                    return
        except (FileNotFoundError, ProcessLookupError):
            return
        time.sleep(0.1)
    os.kill(pid, 9)
    raise AssertionError("the worker's child outlived it")

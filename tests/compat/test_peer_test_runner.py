"""tools/run_peer_tests.py: mamba-ssm's / causal-conv1d's own test files run against the drop-in
(peers blocked, patch_mamba_ssm / patch_causal_conv1d in alias mode, device 'cuda' -> 'cpu')."""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _runner():
    sys.path.insert(0, str(REPO / "tools"))
    try:
        return importlib.import_module("run_peer_tests")
    finally:
        sys.path.remove(str(REPO / "tools"))


def test_cpu_device_rewrite_touches_only_device_assignments():
    run = _runner()
    text = ("device = 'cuda'\n    device=\"cuda\"\n"
            "torch.cuda.manual_seed_all(0)\nx = y.to(device='cuda:1')\ndevice = 'cudax'\n")
    new, n = run.cpu_device_rewrite(text)
    assert n == 2
    assert new == ("device = 'cpu'\n    device=\"cpu\"\n"
                   "torch.cuda.manual_seed_all(0)\nx = y.to(device='cuda:1')\ndevice = 'cudax'\n")


def test_tokens_counts_seqlen_and_batch_names():
    run = _runner()
    assert run._tokens({"seqlen": 4096, "dim": 64}) == 4096
    assert run._tokens({"B": 2, "T": 100}) == 200
    assert run._tokens({"batch": 3, "seqlen": 10}) == 30
    assert run._tokens({"cu_seqlens": [0, 5, 17]}) == 17
    assert run._tokens({"dim": 64}) == 0


def test_mamba_suite_blocks_peers_patches_both_and_runs_on_cpu(tmp_path):
    tests = tmp_path / "tests"
    (tests / "ops").mkdir(parents=True)
    (tests / "ops" / "test_tiny.py").write_text(
        "import sys, pytest, torch\n"
        "from mamba_ssm.ops.selective_scan_interface import selective_scan_fn, "
        "selective_scan_ref\n"
        "from causal_conv1d import causal_conv1d_fn\n"
        "def test_served_by_us():\n"
        "    assert sys.modules['mamba_ssm'].__name__ == 'lightning_ops.compat.mamba_ssm'\n"
        "    assert sys.modules['causal_conv1d'].__name__ == "
        "'lightning_ops.compat.causal_conv1d'\n"
        "@pytest.mark.parametrize('seqlen', [8, 4096])\n"
        "def test_scan(seqlen):\n"
        "    device = 'cuda'\n"
        "    u = torch.randn(1, 2, seqlen, device=device)\n"
        "    dt = torch.rand(1, 2, seqlen, device=device)\n"
        "    A = -torch.rand(2, 4, device=device)\n"
        "    B, C = torch.randn(1, 4, seqlen), torch.randn(1, 4, seqlen)\n"
        "    torch.testing.assert_close(selective_scan_fn(u, dt, A, B, C),\n"
        "                               selective_scan_ref(u, dt, A, B, C))\n"
        "def test_fails():\n"
        "    import mamba_ssm.ops.triton.ssd_chunk_state  # noqa: F401\n")
    before = (tests / "ops" / "test_tiny.py").read_text()
    out = tmp_path / "summary.json"
    rc = _runner().main(["--peer", "mamba_ssm", "--tests", str(tests), "--files",
                         "ops/test_tiny.py", "--max-tokens", "1024", "--device", "cpu",
                         "--timeout", "300", "--json", str(out)])
    (s,) = json.loads(out.read_text())
    assert (s["passed"], s["failed"], s["deselected"]) == (2, 1, 1), s
    assert rc == 1
    assert any("ssd_chunk_state" in r for r in s["reasons"]), s["reasons"]
    assert (tests / "ops" / "test_tiny.py").read_text() == before   # rewritten in a copy only


def test_known_reasons_are_specific():
    """A known (not-a-drop-in-bug) note names one test's failure, never a generic assert."""
    run = _runner()
    known = run.SUITES["mamba_ssm"].known
    assert not run._known("test_mamba_inner_fn: assert False", known)  # served since
    assert not run._known("test_selective_scan: assert False", known)
    assert not run._known("test_selective_state_update: assert False", known)
    assert run._known("tests/ops/triton/test_ssd.py: ModuleNotFoundError: No module named "
                      "'mamba_ssm.ops.triton.ssd_chunk_state': ...", known)
    assert not run._known("test_x: ModuleNotFoundError: No module named "
                          "'mamba_ssm.ops.triton.ssd_combined'", known)
    fla = run.SUITES["fla"].known
    assert run._known("test_flash_qla_verifier_rejects: ModuleNotFoundError: No module named "
                      "'fla.ops.gated_delta_rule.backends': ...", fla)
    assert not run._known("test_chunk: ValueError: q/k (K) head dim is 512", fla)

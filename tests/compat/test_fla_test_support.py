"""What fla's own op test files import besides the ops (fla.utils, fla.ops.utils.cache, the
naive references, kernel-level names), served by the mirrors so those files run against our
drop-in (tools/run_fla_tests.py). float64 checks against lightning_ops.reference, and one
regression test per fix the fla test files found."""
from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lightning_ops as lo
from lightning_ops import reference as spec
from lightning_ops.compat import UnsupportedArgumentError
from lightning_ops.compat import _fla, _fla_env, _refs

D64 = torch.float64


def _r(*shape, seed=0, dtype=D64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------------------------------------
# fla.utils
# ---------------------------------------------------------------------------------------------
def test_assert_close_semantics():
    ref = _r(64)
    _fla_env.assert_close("x", ref, ref + 1e-7, 0.0)            # absolute early pass
    _fla_env.assert_close("x", ref, ref * 1.001, 0.01)           # relative RMS 1e-3 < 1e-2
    with pytest.raises(AssertionError, match="ratio"):
        _fla_env.assert_close("x", ref, ref * 1.1, 0.01)
    bad = ref.clone()
    bad[3] = float("nan")
    with pytest.raises(AssertionError, match="NaN detected in tri"):
        _fla_env.assert_close("x", ref, bad, 0.5)
    with pytest.warns(UserWarning):
        _fla_env.assert_close("x", ref, ref * 1.1, 0.01, warning=True)
    assert _fla_env.get_err_ratio(ref, 2 * ref) == pytest.approx(1.0, rel=1e-6)
    assert _fla_env.get_abs_err(ref, ref + 0.5) == pytest.approx(0.5)


def test_device_flags_describe_this_machine():
    cuda = torch.cuda.is_available()
    assert _fla_env.device == ("cuda" if cuda else "cpu")
    assert _fla_env.device_torch_lib is getattr(torch, _fla_env.device)
    assert _fla_env.IS_NVIDIA == (cuda and not torch.version.hip)
    assert not _fla_env.IS_NPU and not _fla_env.IS_TMA_SUPPORTED
    if not cuda:
        assert not (_fla_env.IS_NVIDIA_HOPPER or _fla_env.IS_NVIDIA_BLACKWELL
                    or _fla_env.IS_NVIDIA_SM100 or _fla_env.IS_NVIDIA_SM120)


def test_cache_mode_from_env(monkeypatch):
    assert _fla_env.FlaCacheMode.from_env() is _fla_env.FlaCacheMode.DISABLED or \
        "FLA_CACHE_MODE" in __import__("os").environ
    monkeypatch.setenv("FLA_CACHE_MODE", "full")
    assert _fla_env.FlaCacheMode.from_env().uses_default_config()
    monkeypatch.setenv("FLA_CACHE_MODE", "nonsense")
    with pytest.raises(ValueError, match="FLA_CACHE_MODE"):
        _fla_env.FlaCacheMode.from_env()


# ---------------------------------------------------------------------------------------------
# references and ops, float64
# ---------------------------------------------------------------------------------------------
B, T, H, K, V = 2, 37, 3, 8, 6


def test_naive_refs_take_a_broadcast_initial_state():
    """Regression (fla tests/ops/test_gla.py, test_simple_gla.py test_fused_recurrent_varlen):
    fla's varlen tests call the naive references per sequence with initial_state=h0[i], shape
    [H, K, V]; fla's references broadcast it (S += h0). Ours read it as a wrong shape."""
    q, k, v = _r(1, T, H, K), _r(1, T, H, K, seed=1), _r(1, T, H, V, seed=2)
    gk = F.logsigmoid(_r(1, T, H, K, seed=3))
    g = F.logsigmoid(_r(1, T, H, seed=4))
    beta = torch.sigmoid(_r(1, T, H, seed=5))
    h0 = _r(H, K, V, seed=6)
    full = h0[None]
    for fn, args in ((_refs.naive_recurrent_gla, (q, k, v, gk)),
                     (_refs.naive_recurrent_simple_gla, (q, k, v, g)),
                     (_refs.naive_recurrent_linear_attn, (q, k, v)),
                     (_refs.naive_recurrent_gated_delta_rule, (q, k, v, beta, g)),
                     (_refs.naive_recurrent_kda, (q, k, v, gk, beta))):
        o1, h1 = fn(*args, initial_state=h0, output_final_state=True)
        o2, h2 = fn(*args, initial_state=full, output_final_state=True)
        torch.testing.assert_close(o1, o2, rtol=0, atol=0)
        torch.testing.assert_close(h1, h2, rtol=0, atol=0)
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    o1, h1 = _refs.delta_rule_recurrence(qh, kh, vh, beta.transpose(1, 2), initial_state=h0)
    o2, h2 = _refs.delta_rule_recurrence(qh, kh, vh, beta.transpose(1, 2), initial_state=full)
    torch.testing.assert_close(o1, o2, rtol=0, atol=0)
    torch.testing.assert_close(h1, h2, rtol=0, atol=0)


@pytest.mark.parametrize("gated", [True, False])
def test_parallel_simple_gla_and_its_reference(gated):
    q, k, v = _r(B, T, H, K), _r(B, T, H, K, seed=1), _r(B, T, H, V, seed=2)
    g = F.logsigmoid(_r(B, T, H, seed=3)) if gated else None
    o_ref, _ = spec.simple_gla_ref(q, k, v, g, None, 0.5)
    o_n, A = _refs.naive_parallel_simple_gla(q, k, v, g, scale=0.5)
    assert A.shape == (B, H, T, T) and A.dtype == D64
    assert torch.all(A.triu(1) == 0)
    torch.testing.assert_close(o_n, o_ref, rtol=1e-10, atol=1e-10)
    o, attn = _fla.parallel_simple_gla(q, k, v, g, scale=0.5, output_attentions=True)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(attn, A, rtol=1e-12, atol=1e-12)
    assert _fla.parallel_simple_gla(q, k, v, g)[1] is None


def test_naive_chunk_kda_matches_the_recurrent_reference():
    HV = 2 * H
    q, k = F.normalize(_r(B, T, H, K), dim=-1), F.normalize(_r(B, T, H, K, seed=1), dim=-1)
    v = _r(B, T, HV, V, seed=2)
    g = F.logsigmoid(_r(B, T, HV, K, seed=3))
    beta = torch.sigmoid(_r(B, T, HV, seed=4))
    h0 = _r(B, HV, K, V, seed=5)
    o_r, h_r = _refs.naive_recurrent_kda(q, k, v, g, beta, 0.7, h0, True)
    o_c, h_c = _refs.naive_chunk_kda(q, k, v, g, beta, 0.7, h0, True, chunk_size=16)
    torch.testing.assert_close(o_c, o_r, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h_c, h_r, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="power of 2"):
        _refs.naive_chunk_kda(q, k, v, g, beta, chunk_size=48)


def test_gdn_gate_values_and_gradients():
    g = _r(B, T, H).requires_grad_()
    A_log = _r(H, seed=1).requires_grad_()
    dt_bias = _r(H, seed=2).requires_grad_()
    ref = _refs.naive_gdn_gate(g, A_log, dt_bias, output_dtype=D64)
    ours = _fla.fused_gdn_gate(g, A_log, dt_bias, output_dtype=D64)
    torch.testing.assert_close(ours, -A_log.exp() * F.softplus(g + dt_bias), rtol=1e-12, atol=0)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    (gr,) = torch.autograd.grad(ours.sum(), [A_log])
    torch.testing.assert_close(gr, (-A_log.exp() * F.softplus(g + dt_bias)).sum((0, 1)),
                               rtol=1e-12, atol=1e-12)
    assert _fla.fused_gdn_gate(g.float(), A_log.float()).dtype == torch.float32


def test_fused_recurrent_kda_fwd_state_pool_in_place():
    N, slots, HV = 3, 7, H
    q, k = F.normalize(_r(N, 1, H, K), dim=-1), F.normalize(_r(N, 1, H, K, seed=1), dim=-1)
    v = _r(N, 1, HV, V, seed=2)
    g = F.logsigmoid(_r(N, 1, HV, K, seed=3))
    beta = torch.sigmoid(_r(N, 1, HV, seed=4))
    pool = _r(slots, HV, K, V, seed=5)
    before = pool.clone()
    idx = torch.tensor([5, 0, 3], dtype=torch.int32)
    o_ref, h_ref = _refs.naive_recurrent_kda(q, k, v, g, beta, None, before[idx.long()], True)
    o, st = _fla.fused_recurrent_kda_fwd(q, k, v, g, beta, initial_state=pool,
                                         ssm_state_indices=idx)
    assert st is pool
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(pool[idx.long()], h_ref, rtol=1e-10, atol=1e-10)
    untouched = [i for i in range(slots) if i not in (5, 0, 3)]
    assert torch.equal(pool[untouched], before[untouched])
    with pytest.raises(UnsupportedArgumentError, match="num_accepted_tokens"):
        _fla.fused_recurrent_kda_fwd(q, k, v, g, beta, initial_state=pool,
                                     ssm_state_indices=idx, num_accepted_tokens=idx)


@pytest.mark.parametrize("groups", [1, H])
def test_log_linear_attn_default_scale_and_reference(groups):
    Tl, L = 21, 6
    q, k = _r(B, Tl, groups, K), _r(B, Tl, groups, K, seed=1)
    v = _r(B, Tl, H, V, seed=2)
    g = F.logsigmoid(_r(B, Tl, H, seed=3))
    lam = _r(B, Tl, H, L, seed=4)
    o_ref = spec.log_linear_attn_ref(q, k, v, g, lam, 1.0)[0]
    torch.testing.assert_close(_refs.naive_log_linear_attn(q, k, v, g, lam), o_ref,
                               rtol=1e-10, atol=1e-10)
    o, ht = _fla.chunk_log_linear_attn(q, k, v, g, lam)      # fla's default scale is 1.0
    assert ht is None
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    o_s = _fla.chunk_log_linear_attn(q, k, v, g, lam, scale=None)[0]
    torch.testing.assert_close(o_s, o_ref * K ** -0.5, rtol=1e-10, atol=1e-10)
    with pytest.raises(UnsupportedArgumentError, match="initial_state"):
        _fla.chunk_log_linear_attn(q, k, v, g, lam, initial_state=(torch.zeros(1),))


def test_not_served_markers_import_and_raise():
    for marker in (_fla.recompute_w_u_fwd, _fla.prepare_wy_repr_bwd,
                   _fla.chunkwise_bwd_kernel_dkg):
        with pytest.raises(UnsupportedArgumentError, match=marker.__name__):
            marker(1, 2)
        with pytest.raises(UnsupportedArgumentError, match="not served"):
            marker[(1,)]


# ---------------------------------------------------------------------------------------------
# the runner: fla blocked, patch_fla in alias mode, a test file importing what fla's do
# ---------------------------------------------------------------------------------------------
def test_run_fla_tests_blocks_fla_and_runs_a_file(tmp_path):
    ops = tmp_path / "tests" / "ops"
    ops.mkdir(parents=True)
    (tmp_path / "tests" / "conftest.py").write_text(
        "from fla.utils import device_torch_lib  # noqa: F401\n")
    (ops / "test_tiny.py").write_text(
        "import sys, pytest, torch\n"
        "from fla.utils import assert_close, device, device_platform, IS_NVIDIA\n"
        "from fla.ops.utils.cache import FLA_CACHE_MODE\n"
        "from fla.ops.simple_gla import chunk_simple_gla\n"
        "from fla.ops.simple_gla.naive import naive_recurrent_simple_gla\n"
        "def test_served_by_us():\n"
        "    assert sys.modules['fla'].__name__ == 'lightning_ops.compat.fla'\n"
        "@pytest.mark.parametrize('B,T', [(1, 16), (4, 4096)])\n"
        "def test_op(B, T):\n"
        "    q, k, v = (torch.randn(B, T, 2, 8, device=device) for _ in range(3))\n"
        "    g = torch.nn.functional.logsigmoid(torch.randn(B, T, 2, device=device))\n"
        "    ref, _ = naive_recurrent_simple_gla(q, k, v, g)\n"
        "    tri, _ = chunk_simple_gla(q, k, v, g)\n"
        "    assert_close('o', ref, tri, 1e-4)\n"
        "def test_fails():\n"
        "    import fla.ops.not_ours  # noqa: F401\n")
    repo = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(repo / "tools"))
    try:
        run = importlib.import_module("run_fla_tests")
    finally:
        sys.path.remove(str(repo / "tools"))
    out = tmp_path / "summary.json"
    rc = run.main(["--tests", str(tmp_path / "tests"), "--files", "test_tiny.py",
                   "--max-tokens", "1024", "--timeout", "300", "--json", str(out),
                   "--report-dir", str(tmp_path / "rep")])
    import json
    (s,) = json.loads(out.read_text())
    assert (s["passed"], s["failed"], s["deselected"]) == (2, 1, 1), s
    assert rc == 1
    assert any("fla.ops.not_ours" in r for r in s["reasons"]), s["reasons"]


def test_in_kernel_beta_sigmoid_stays_fp32():
    """Regression (fla tests/ops/test_kda.py test_chunk_use_beta_sigmoid_in_kernel): the
    in-kernel sigmoid of an fp16 beta was rounded back to fp16 (~1.7e-4 relative error in ht,
    over fla's 1e-4). fla keeps it fp32: so must we, bit for bit against passing the fp32
    sigmoid ourselves."""
    Bk, Tk, Hk, Dk = 1, 20, 2, 16
    q, k = (F.normalize(_r(Bk, Tk, Hk, Dk, seed=s), dim=-1).half() for s in (0, 1))
    v = _r(Bk, Tk, Hk, Dk, seed=2).half()
    g = F.logsigmoid(_r(Bk, Tk, Hk, Dk, seed=3)).float()
    beta_raw = _r(Bk, Tk, Hk, seed=4).half()
    for neg in (False, True):
        post = beta_raw.float().sigmoid() * (2 if neg else 1)
        o1, h1 = _fla.chunk_kda(q, k, v, g, post, output_final_state=True)
        o2, h2 = _fla.chunk_kda(q, k, v, g, beta_raw, output_final_state=True,
                                use_beta_sigmoid_in_kernel=True, allow_neg_eigval=neg)
        assert torch.equal(o1, o2) and torch.equal(h1, h2)


def test_chunk_size_errors_use_fla_wording():
    """Regression (fla tests/ops/test_kda.py test_chunk_invalid_chunk_size)."""
    q = _r(1, 8, 1, 16).float()
    g = F.logsigmoid(q)
    beta = torch.rand(1, 8, 1)
    with pytest.raises(ValueError, match=r"`chunk_size` must be either 32 or 64"):
        _fla.chunk_kda(q, q, q, g, beta, chunk_size=16)
    with pytest.raises(ValueError, match=r"`chunk_size` must be 16, 32, or 64"):
        _fla.chunk_gated_delta_rule(q, q, q, g[..., 0], beta, chunk_size=128)


@pytest.mark.parametrize("varlen", [False, True])
@pytest.mark.parametrize("state_v_first", [False, True])
def test_chunk_kda_return_intermediate_states(varlen, state_v_first):
    """Was UnsupportedArgumentError (fla tests/ops/test_kda.py
    test_chunk_return_intermediate_states): h [B, NT, HV, K, V] (varlen [1, total chunks, ...])
    holds the state at the start of every 64-token chunk, in k's dtype."""
    Tk, Hk, Kk, Vk = 150, 2, 8, 4
    Bk = 1 if varlen else 2
    q, k = (F.normalize(_r(Bk, Tk, Hk, Kk, seed=s), dim=-1) for s in (0, 1))
    v = _r(Bk, Tk, Hk, Vk, seed=2)
    g = F.logsigmoid(_r(Bk, Tk, Hk, Kk, seed=3))
    beta = torch.sigmoid(_r(Bk, Tk, Hk, seed=4))
    cu = torch.tensor([0, 64, 65, 150]) if varlen else None
    N = 3 if varlen else Bk
    h0 = _r(N, Hk, Kk, Vk, seed=5)
    h0_in = h0.transpose(-1, -2) if state_v_first else h0
    o, ht, h = _fla.chunk_kda(q, k, v, g, beta, initial_state=h0_in, output_final_state=True,
                              return_intermediate_states=True, cu_seqlens=cu,
                              state_v_first=state_v_first)
    o_ref, ht_ref = _fla.chunk_kda(q, k, v, g, beta, initial_state=h0_in,
                                   output_final_state=True, cu_seqlens=cu,
                                   state_v_first=state_v_first)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ht, ht_ref, rtol=1e-10, atol=1e-10)
    bounds = [0, 64, 65, 150] if varlen else [0, Tk]
    starts = []                                   # (row, sequence, start token, seq start)
    for n in range(len(bounds) - 1):
        for s in range(bounds[n], bounds[n + 1], 64):
            starts.append((n, s, bounds[n]))
    assert h.shape == ((1, len(starts)) if varlen else (Bk, len(starts))) + h0_in.shape[1:]
    assert h.dtype == k.dtype
    for i, (n, s, bos) in enumerate(starts):
        rows = slice(0, 1) if varlen else slice(None)
        init = h0_in[n:n + 1] if varlen else h0_in
        if s == bos:
            expect = init
        else:
            expect = _fla.chunk_kda(q[rows, bos:s], k[rows, bos:s], v[rows, bos:s],
                                    g[rows, bos:s], beta[rows, bos:s], initial_state=init,
                                    output_final_state=True, state_v_first=state_v_first)[1]
        got = h[:, i] if not varlen else h[0, i][None]
        torch.testing.assert_close(got, expect, rtol=1e-10, atol=1e-10)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the fake fla lacks most modules
def test_replace_mode_keeps_an_installed_flas_test_helpers(tmp_path, monkeypatch):
    """With fla installed, patch_fla() replaces ops, never fla's own testing helpers, flags,
    cache mode, kernel internals (our import-only markers), decode entry or log-linear op."""
    import lightning_ops.compat as lc
    from compat_helpers import drop_peer_modules

    lc.unpatch()
    drop_peer_modules()
    files = {
        "fla/__init__.py": "",
        "fla/utils.py": "def assert_close(*a, **k):\n    pass\ndevice = 'theirs'\n",
        "fla/ops/__init__.py": "",
        "fla/ops/utils/__init__.py": "",
        "fla/ops/utils/cache.py": "FLA_CACHE_MODE = 'theirs'\n",
        "fla/ops/gated_delta_rule/__init__.py": "",
        "fla/ops/gated_delta_rule/wy_fast.py": "def recompute_w_u_fwd():\n    return 'theirs'\n",
        "fla/ops/simple_gla/__init__.py": "",
        "fla/ops/simple_gla/parallel.py": "def parallel_simple_gla():\n    return 'theirs'\n",
        "fla/ops/kda/__init__.py": "",
        "fla/ops/kda/fused_recurrent.py": "def fused_recurrent_kda_fwd():\n    return 'theirs'\n",
        "fla/ops/log_linear_attn/__init__.py": "",
        "fla/ops/log_linear_attn/chunk.py": "def chunk_log_linear_attn():\n    return 'theirs'\n"
                                            "def chunkwise_bwd_kernel_dkg():\n    return 'theirs'\n",
    }
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert lc.patch_fla() == "replace"
        import fla.ops.gated_delta_rule.wy_fast as wy
        import fla.ops.kda.fused_recurrent as kfr
        import fla.ops.log_linear_attn.chunk as llc
        import fla.ops.simple_gla.parallel as par
        import fla.ops.utils.cache as cache
        import fla.utils as fu
        assert fu.device == "theirs" and fu.assert_close.__module__ == "fla.utils"
        assert cache.FLA_CACHE_MODE == "theirs"
        assert wy.recompute_w_u_fwd() == "theirs"
        assert kfr.fused_recurrent_kda_fwd() == "theirs"
        assert llc.chunk_log_linear_attn() == llc.chunkwise_bwd_kernel_dkg() == "theirs"
        assert par.parallel_simple_gla is _fla.parallel_simple_gla      # an op: replaced
    finally:
        lc.unpatch()
        drop_peer_modules()

"""The peers' reference functions served at the peers' paths (lightning_ops.compat._refs).

The peers' own test files import these next to the ops (mamba-ssm's tests/ops/test_selective_scan
.py: selective_scan_ref, mamba_inner_ref; test_selective_state_update.py:
selective_state_update_ref; causal-conv1d's tests/test_causal_conv1d.py: causal_conv1d_ref,
causal_conv1d_update_ref, causal_conv1d_varlen_states(_ref); fla's tests/ops/test_<op>.py:
fla.ops.<op>.naive functions). Checked here: each imports from the peer path (in alias mode,
as the peers' tests would), has the recorded peer signature, and agrees with our op on a tiny
float64 input. Signatures themselves: tests/compat/test_signature_parity.py.
"""
from __future__ import annotations

import importlib
import importlib.util

import pytest
import torch
import torch.nn.functional as F

import lightning_ops.compat as lc

from test_signature_parity import PEER_SIGNATURES, signature_mismatches

D64 = torch.float64

SERVED = [
    ("mamba_ssm.ops.selective_scan_interface", "selective_scan_ref"),
    ("mamba_ssm.ops.selective_scan_interface", "mamba_inner_ref"),
    ("mamba_ssm.ops.triton.selective_state_update", "selective_state_update_ref"),
    ("causal_conv1d.causal_conv1d_interface", "causal_conv1d_ref"),
    ("causal_conv1d.causal_conv1d_interface", "causal_conv1d_update_ref"),
    ("causal_conv1d.causal_conv1d_varlen", "causal_conv1d_varlen_states"),
    ("causal_conv1d.causal_conv1d_varlen", "causal_conv1d_varlen_states_ref"),
    ("fla.ops.gla.naive", "naive_recurrent_gla"),
    ("fla.ops.simple_gla.naive", "naive_recurrent_simple_gla"),
    ("fla.ops.linear_attn.naive", "naive_recurrent_linear_attn"),
    ("fla.ops.linear_attn.naive", "naive_chunk_linear_attn"),
    ("fla.ops.delta_rule.naive", "delta_rule_recurrence"),
    ("fla.ops.gated_delta_rule.naive", "naive_recurrent_gated_delta_rule"),
    ("fla.ops.gated_delta_rule", "naive_recurrent_gated_delta_rule"),
    ("fla.ops.kda.naive", "naive_recurrent_kda"),
    ("fla.ops.kda.gate", "naive_kda_gate"),
    ("fla.ops.kda.gate", "naive_kda_lowerbound_gate"),
]


def _peer_installed(peer):
    try:
        return importlib.util.find_spec(peer) is not None
    except (ImportError, ValueError):
        return False


@pytest.mark.parametrize("module,name", SERVED, ids=[f"{m}.{n}" for m, n in SERVED])
def test_served_at_peer_path_with_peer_signature(module, name):
    mirror = importlib.import_module(f"lightning_ops.compat.{module}")
    assert name in mirror.__all__
    recorded = next((m for m, t in PEER_SIGNATURES.items() if name in t), None)
    assert recorded is not None, f"{name}: no recorded peer signature"
    assert getattr(mirror, name) is getattr(
        importlib.import_module(f"lightning_ops.compat.{recorded}"), name)
    assert signature_mismatches(recorded, name, PEER_SIGNATURES[recorded][name]) == []


@pytest.mark.parametrize("peer", lc.PEERS)
def test_peer_test_imports_resolve_in_alias_mode(peer):
    """The import lines of the peers' test files, through the patched peer names."""
    if _peer_installed(peer):
        pytest.skip(f"{peer} installed: replace mode keeps the peer's own references")
    lines = {
        "mamba_ssm": [
            "from mamba_ssm.ops.selective_scan_interface import selective_scan_fn, selective_scan_ref",
            "from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn, mamba_inner_ref",
            "from mamba_ssm.ops.triton.selective_state_update import selective_state_update, "
            "selective_state_update_ref",
        ],
        "causal_conv1d": [
            "from causal_conv1d.causal_conv1d_interface import causal_conv1d_fn, causal_conv1d_ref",
            "from causal_conv1d.causal_conv1d_interface import causal_conv1d_update, "
            "causal_conv1d_update_ref",
            "from causal_conv1d.causal_conv1d_varlen import causal_conv1d_varlen_states, "
            "causal_conv1d_varlen_states_ref",
        ],
        "fla": [
            "from fla.ops.gla.naive import naive_recurrent_gla",
            "from fla.ops.linear_attn.naive import naive_chunk_linear_attn, naive_recurrent_linear_attn",
            "from fla.ops.simple_gla.naive import naive_recurrent_simple_gla",
            "from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule",
            "from fla.ops.gated_delta_rule import naive_recurrent_gated_delta_rule",
            "from fla.ops.kda.naive import naive_recurrent_kda",
            "from fla.ops.kda.gate import fused_kda_gate, naive_kda_gate, naive_kda_lowerbound_gate",
            "from fla.ops.delta_rule.naive import delta_rule_recurrence",
        ],
    }[peer]
    was = dict(lc.patched())
    getattr(lc, f"patch_{peer}")()
    try:
        for line in lines:
            exec(line, {})                                          # noqa: S102 - fixed lines
    finally:
        if peer not in was:
            lc.unpatch(peer)


def test_references_are_not_patched_over_an_installed_peer():
    from lightning_ops.compat._refs import REFERENCES
    for module, name in SERVED:
        if not name.endswith("_states"):                      # the varlen op is not a reference
            assert name in REFERENCES, name


# =============================================================================================
# agreement with our ops, float64, tiny inputs
# =============================================================================================
def _g(seed):
    return torch.Generator().manual_seed(seed)


def _r(*shape, seed=0):
    return torch.randn(*shape, generator=_g(seed), dtype=D64)


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def _m(module):
    return importlib.import_module(f"lightning_ops.compat.{module}")


@pytest.mark.parametrize("bc", ["variable", "grouped", "fixed"])
def test_selective_scan_ref_matches_selective_scan_fn(bc):
    m = _m("mamba_ssm.ops.selective_scan_interface")
    b, d, n, L = 2, 4, 3, 5
    u, delta, z = _r(b, d, L), _r(b, d, L, seed=1), _r(b, d, L, seed=2)
    A = -_r(d, n, seed=3).exp()
    shape = {"variable": (b, n, L), "grouped": (b, 2, n, L), "fixed": (d, n)}[bc]
    B, C = _r(*shape, seed=4), _r(*shape, seed=5)
    D, bias = _r(d, seed=6), _r(d, seed=7)
    args = (u, delta, A, B, C, D, z, bias, True, True)
    y_ref, last_ref = m.selective_scan_ref(*args)
    y, last = m.selective_scan_fn(*args)
    _close(y_ref, y)
    _close(last_ref, last)
    assert m.selective_scan_ref(u, delta, A, B, C).shape == (b, d, L)
    if bc == "variable":  # complex A: mamba-ssm's (real, imag) pairs along L, as the op
        Ac, Bp = A.to(torch.complex128), torch.cat([B, B], -1)
        _close(m.selective_scan_ref(u, delta, Ac, Bp, Bp), m.selective_scan_fn(u, delta, Ac, Bp, Bp))


def test_mamba_inner_ref_matches_mamba_inner_fn():
    m = _m("mamba_ssm.ops.selective_scan_interface")
    b, L, d, n, r, W, dm = 2, 5, 4, 3, 2, 4, 6
    xz = _r(b, 2 * d, L)
    conv_w, conv_b = _r(d, 1, W, seed=1), _r(d, seed=2)
    x_proj = _r(r + 2 * n, d, seed=3) * 0.5
    dt_proj = _r(d, r, seed=4) * 0.5
    out_w, out_b = _r(dm, d, seed=5), _r(dm, seed=6)
    A = -_r(d, n, seed=7).exp()
    D, dt_bias = _r(d, seed=8), _r(d, seed=9)
    args = (xz, conv_w, conv_b, x_proj, dt_proj, out_w, out_b, A)
    kw = dict(D=D, delta_bias=dt_bias)
    ref = m.mamba_inner_ref(*args, **kw)
    assert ref.shape == (b, L, dm)
    _close(ref, m.mamba_inner_fn(*args, **kw))
    _close(m.mamba_inner_ref(*args, delta_softplus=False, **kw),
           m.mamba_inner_fn(*args, delta_softplus=False, **kw))


@pytest.mark.parametrize("heads", [True, False])
def test_selective_state_update_ref_matches_op(heads):
    m = _m("mamba_ssm.ops.triton.selective_state_update")
    if heads:
        b, h, p, n, g = 2, 4, 3, 5, 2
        state = _r(b, h, p, n)
        x, dt, z = _r(b, h, p, seed=1), _r(b, h, p, seed=2), _r(b, h, p, seed=3)
        A = -_r(h, p, n, seed=4).exp()
        B, C = _r(b, g, n, seed=5), _r(b, g, n, seed=6)
        D, dt_bias = _r(h, p, seed=7), _r(h, p, seed=8)
    else:
        b, d, n = 2, 4, 5
        state = _r(b, d, n)
        x, dt, z = _r(b, d, seed=1), _r(b, d, seed=2), _r(b, d, seed=3)
        A = -_r(d, n, seed=4).exp()
        B, C = _r(b, n, seed=5), _r(b, n, seed=6)
        D, dt_bias = _r(d, seed=7), _r(d, seed=8)
    s_ref, s_op = state.clone(), state.clone()
    out_ref = m.selective_state_update_ref(s_ref, x, dt, A, B, C, D, z, dt_bias, True)
    out = m.selective_state_update(s_op, x, dt, A, B, C, D, z, dt_bias, True)
    assert out_ref.shape == x.shape
    _close(out_ref, out)
    _close(s_ref, s_op)                                   # both update the state in place
    assert not torch.equal(s_ref, state)


@pytest.mark.parametrize("initial", [False, True])
def test_causal_conv1d_ref_matches_causal_conv1d_fn(initial):
    m = _m("causal_conv1d.causal_conv1d_interface")
    b, d, L, W = 2, 3, 7, 4
    x, w, bias = _r(b, d, L), _r(d, W, seed=1), _r(d, seed=2)
    init = _r(b, d, W - 1, seed=3) if initial else None
    out_ref, fin_ref = m.causal_conv1d_ref(x, w, bias, init, True, None, "silu")
    out, fin = m.causal_conv1d_fn(x, w, bias, None, init, True, None, "silu")
    _close(out_ref, out)
    _close(fin_ref, fin)
    buf = torch.empty(b, d, W - 1, dtype=D64)
    _, fin2 = m.causal_conv1d_ref(x, w, bias, init, True, buf)
    assert fin2 is buf
    _close(buf, fin_ref)
    with pytest.raises(NotImplementedError, match="activation"):
        m.causal_conv1d_ref(x, w, activation="relu")


def test_causal_conv1d_ref_seq_idx_matches_op_and_per_sequence_runs():
    m = _m("causal_conv1d.causal_conv1d_interface")
    b, d, L, W = 1, 3, 8, 4
    x, w, bias = _r(b, d, L), _r(d, W, seed=1), _r(d, seed=2)
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2]], dtype=torch.int32)
    ref = m.causal_conv1d_ref(x, w, bias, activation="silu", seq_idx=seq_idx)
    _close(ref, m.causal_conv1d_fn(x, w, bias, seq_idx, activation="silu"))
    for s, e in [(0, 3), (3, 5), (5, 8)]:                 # each run alone, from a zero history
        _close(ref[..., s:e], m.causal_conv1d_ref(x[..., s:e], w, bias, activation="silu"))


@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("circular", [False, True])
def test_causal_conv1d_update_ref_matches_op(tokens, circular):
    m = _m("causal_conv1d.causal_conv1d_interface")
    b, d, W, S = 2, 3, 4, 5
    w, bias = _r(d, W, seed=1), _r(d, seed=2)
    x = _r(b, d, tokens, seed=3) if tokens > 1 else _r(b, d, seed=3)
    state = _r(b, d, S, seed=4)
    cache = torch.tensor([2, 7], dtype=torch.int32) if circular else None
    s_ref, s_op = state.clone(), state.clone()
    y_ref = m.causal_conv1d_update_ref(x, s_ref, w, bias, "silu", cache)
    y = m.causal_conv1d_update(x, s_op, w, bias, "silu", cache)
    assert y_ref.shape == x.shape
    _close(y_ref, y)
    _close(s_ref, s_op)


def test_causal_conv1d_varlen_states_and_ref():
    m = _m("causal_conv1d.causal_conv1d_varlen")
    x = _r(9, 3)
    cu = torch.tensor([0, 2, 2, 9], dtype=torch.int32)
    st = m.causal_conv1d_varlen_states(x, cu, 4)
    assert st.shape == (3, 3, 4) and st.stride(1) == 1            # channel-last, as the peer
    _close(st, m.causal_conv1d_varlen_states_ref(x, cu, 4))
    _close(st[0], torch.cat([torch.zeros(3, 2, dtype=D64), x[0:2].T], dim=1))
    assert torch.all(st[1] == 0)
    _close(st[2], x[5:9].T)
    # it is the state causal_conv1d_fn leaves after each sequence (W - 1 = 4)
    ccm = _m("causal_conv1d.causal_conv1d_interface")
    w = _r(3, 5, seed=1)
    _, fin = ccm.causal_conv1d_ref(x[5:9].T[None], w, return_final_states=True)
    _close(fin[0], st[2])


# fla ----------------------------------------------------------------------------------------
B, T, H, K, V = 2, 6, 2, 4, 3


def _qkv(hv=H):
    q = F.normalize(_r(B, T, H, K), dim=-1)
    k = F.normalize(_r(B, T, H, K, seed=1), dim=-1)
    return q, k, _r(B, T, hv, V, seed=2)


def _gate(*shape, seed):
    return -torch.rand(*shape, generator=_g(seed), dtype=D64) * 0.5


def _beta(*shape):
    return torch.rand(*shape, generator=_g(9), dtype=D64)


def test_naive_recurrent_gla_matches_fused_recurrent_gla():
    q, k, v = _qkv()
    gk, h0 = _gate(B, T, H, K, seed=3), _r(B, H, K, V, seed=4)
    o_ref, ht_ref = _m("fla.ops.gla.naive").naive_recurrent_gla(q, k, v, gk, h0, True)
    o, ht = _m("fla.ops.gla").fused_recurrent_gla(q, k, v, gk, initial_state=h0,
                                                  output_final_state=True)
    _close(o_ref, o)
    _close(ht_ref, ht)
    assert _m("fla.ops.gla.naive").naive_recurrent_gla(q, k, v, gk)[1] is None


def test_naive_recurrent_simple_gla_matches_fused_recurrent_simple_gla():
    q, k, v = _qkv()
    g, h0 = _gate(B, T, H, seed=3), _r(B, H, K, V, seed=4)
    f = _m("fla.ops.simple_gla.naive").naive_recurrent_simple_gla
    o_ref, ht_ref = f(q, k, v, g, 0.7, h0)                # fla's default: final state returned
    o, ht = _m("fla.ops.simple_gla").fused_recurrent_simple_gla(
        q, k, v, g, scale=0.7, initial_state=h0, output_final_state=True)
    _close(o_ref, o)
    _close(ht_ref, ht)
    assert f(q, k, v, g, output_final_state=False)[1] is None


@pytest.mark.parametrize("normalize", [False, True])
def test_naive_linear_attn_matches_fused_recurrent_and_chunk(normalize):
    nv = _m("fla.ops.linear_attn.naive")
    la = _m("fla.ops.linear_attn")
    q, k, v = _qkv()
    o_ref, st_ref = nv.naive_recurrent_linear_attn(q, k, v, None, None, True, normalize)
    o, st = la.fused_recurrent_linear_attn(q, k, v, output_final_state=True,
                                           normalize=normalize)
    _close(o_ref, o)
    if normalize:
        _close(st_ref[0], st[0])
        _close(st_ref[1], st[1])
    else:
        _close(st_ref, st)
    o_chunk = nv.naive_chunk_linear_attn(q, k, v, normalize=normalize)
    assert isinstance(o_chunk, torch.Tensor)
    _close(o_chunk, o_ref)
    if normalize:                                         # (kv, z) initial state carries on
        o1, s1 = nv.naive_recurrent_linear_attn(q[:, :3], k[:, :3], v[:, :3], None, None, True,
                                                True)
        o2, _ = nv.naive_recurrent_linear_attn(q[:, 3:], k[:, 3:], v[:, 3:], None, s1, True,
                                               True)
        _close(torch.cat([o1, o2], 1), o_ref)


def test_delta_rule_recurrence_head_first_matches_fused_recurrent_delta_rule():
    q, k, v = _qkv()
    beta, h0 = _beta(B, T, H), _r(B, H, K, V, seed=4)
    hf = lambda x: x.transpose(1, 2).contiguous()               # noqa: E731
    o_ref, ht_ref = _m("fla.ops.delta_rule.naive").delta_rule_recurrence(
        hf(q), hf(k), hf(v), hf(beta), h0)
    o, ht = _m("fla.ops.delta_rule").fused_recurrent_delta_rule(
        q, k, v, beta, initial_state=h0, output_final_state=True)
    _close(o_ref, hf(o))
    _close(ht_ref, ht)


def test_naive_recurrent_gated_delta_rule_matches_fused_recurrent():
    q, k, v = _qkv()
    g, beta, h0 = _gate(B, T, H, seed=3), _beta(B, T, H), _r(B, H, K, V, seed=4)
    f = _m("fla.ops.gated_delta_rule.naive").naive_recurrent_gated_delta_rule
    assert f is _m("fla.ops.gated_delta_rule").naive_recurrent_gated_delta_rule
    o_ref, ht_ref = f(q, k, v, beta, g, 0.6, h0, True)         # fla's order: beta before g
    o, ht = _m("fla.ops.gated_delta_rule").fused_recurrent_gated_delta_rule(
        q, k, v, g, beta=beta, scale=0.6, initial_state=h0, output_final_state=True)
    _close(o_ref, o)
    _close(ht_ref, ht)


def test_naive_recurrent_kda_matches_fused_recurrent_kda_grouped_heads():
    q, k, v = _qkv(hv=2 * H)
    g, beta = _gate(B, T, 2 * H, K, seed=3), _beta(B, T, 2 * H)
    h0 = _r(B, 2 * H, K, V, seed=4)
    o_ref, ht_ref = _m("fla.ops.kda.naive").naive_recurrent_kda(q, k, v, g, beta, None, h0, True)
    o, ht = _m("fla.ops.kda").fused_recurrent_kda(q, k, v, g, beta, initial_state=h0,
                                                  output_final_state=True)
    _close(o_ref, o)
    _close(ht_ref, ht)


def test_naive_kda_gates_match_fused_kda_gate():
    gm = _m("fla.ops.kda.gate")
    graw = _r(B, T, H, K)
    A_log, dt_bias = _r(H, seed=1), _r(H * K, seed=2)
    ref = gm.naive_kda_gate(graw, A_log, dt_bias, D64)
    assert ref.dtype == D64 and gm.naive_kda_gate(graw, A_log).dtype == torch.float32
    _close(ref, gm.fused_kda_gate(graw, A_log, dt_bias, output_dtype=D64))
    _close(ref, -A_log.exp()[:, None] * F.softplus(graw + dt_bias.view(H, K)))
    lb = gm.naive_kda_lowerbound_gate(graw, A_log, dt_bias, -3.0, D64)
    _close(lb, -3.0 * torch.sigmoid(A_log.exp()[:, None] * (graw + dt_bias.view(H, K))))
    _close(gm.naive_kda_lowerbound_gate(graw, None, dt_bias, -3.0, D64),
           gm.fused_kda_gate(graw, None, dt_bias, -3.0, output_dtype=D64))

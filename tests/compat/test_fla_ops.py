"""fla 0.6.0 signatures (lightning_ops.compat) against the reference, float64 on CPU: positional
order, defaults, return conventions and the glue (normalize, reverse, state_v_first, lightning
slopes, in-kernel gates, beta sigmoid, mixed dtypes)."""
import pytest
import torch
import torch.nn.functional as F

import lightning_ops as lo
from lightning_ops import reference as R
from lightning_ops.compat import UnsupportedArgumentError
from lightning_ops.compat import _fla as C

from helpers import assert_close, cu_seqlens_from_lengths, log_gate

TOL = 1e-10
f64 = torch.float64


def _qkv(B=2, T=7, H=2, K=8, V=4, HV=None, seed=0, dtype=f64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=g, dtype=dtype)
    k = torch.randn(B, T, H, K, generator=g, dtype=dtype)
    v = torch.randn(B, T, HV or H, V, generator=g, dtype=dtype)
    return q, k, v


def _h0(N, H, K, V, seed=1):
    return torch.randn(N, H, K, V, generator=torch.Generator().manual_seed(seed), dtype=f64)


def _flip(x, cu=None):
    """Reverse time per sequence (plain Python, independent of the compat helper)."""
    if cu is None:
        return x.flip(1)
    parts = [x[:, s:e].flip(1) for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())]
    return torch.cat(parts, 1)


# ---------------------------------------------------------------------------------------------
# linear attention: normalize (fla's default True for chunk, False for fused_recurrent)
# ---------------------------------------------------------------------------------------------
def _normalized_ref(q, k, v, scale=None, kv0=None, z0=None, cu=None):
    o, ht = R.linear_attn_ref(q, k, v, scale, kv0, True, cu)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    segs = [(0, q.shape[1])] if cu is None else list(zip(cu[:-1].tolist(), cu[1:].tolist()))
    den = torch.empty(q.shape[:3] + (1,), dtype=f64)
    zs = []
    for n, (s, e) in enumerate(segs):
        kc = k[:, s:e].cumsum(1)
        if z0 is not None:
            kc = kc + (z0[n:n + 1] if cu is not None else z0)
        den[:, s:e] = (q[:, s:e] * scale * kc).sum(-1, keepdim=True) + 1e-10
        zs.append(kc[:, -1:] if e > s else (z0[n:n + 1] if z0 is not None else
                                            torch.zeros_like(k[:, :1])))
    z = torch.cat(zs, 0) if cu is not None else zs[0]
    return o / den, ht, z


def test_chunk_linear_attn_normalizes_by_default():
    q, k, v = _qkv()
    o, (ht, z) = C.chunk_linear_attn(q, k, v, output_final_state=True)
    o_ref, ht_ref, z_ref = _normalized_ref(q, k, v)
    assert_close("o", o, o_ref, TOL)
    assert_close("ht", ht, ht_ref.float(), 1e-6)
    assert z.shape == (2, 1, 2, 8) and z.dtype == k.dtype
    assert_close("z", z, z_ref, TOL)
    # normalize=False is our plain op; positional order (..., output_final_state, normalize, cu)
    o2, ht2 = C.chunk_linear_attn(q, k, v, None, None, True, False, None)
    o3, ht3 = lo.chunk_linear_attn(q, k, v, output_final_state=True)
    assert torch.equal(o2, o3) and torch.equal(ht2, ht3)
    # without output_final_state fla still returns the (None, z_state) pair
    _, st = C.chunk_linear_attn(q, k, v)
    assert isinstance(st, tuple) and st[0] is None and st[1].shape == (2, 1, 2, 8)


def test_linear_attn_normalize_varlen_and_tuple_state_chain():
    q, k, v = _qkv(B=1, T=9)
    cu = cu_seqlens_from_lengths([4, 0, 5])
    kv0, z0 = _h0(3, 2, 8, 4), torch.rand(3, 1, 2, 8, dtype=f64)
    o, (ht, z) = C.chunk_linear_attn(q, k, v, initial_state=(kv0, z0), output_final_state=True,
                                     cu_seqlens=cu)
    o_ref, ht_ref, z_ref = _normalized_ref(q, k, v, None, kv0, z0, cu)
    assert_close("o", o, o_ref, TOL)
    assert_close("ht", ht, ht_ref, TOL)
    assert_close("z", z, z_ref, TOL)
    # chaining: the (kv, z) state of the first half continues into the second half
    q, k, v = _qkv(B=2, T=8)
    full, _ = C.fused_recurrent_linear_attn(q, k, v, normalize=True)
    a, st = C.fused_recurrent_linear_attn(q[:, :3], k[:, :3], v[:, :3], normalize=True,
                                          output_final_state=True)
    b, _ = C.fused_recurrent_linear_attn(q[:, 3:], k[:, 3:], v[:, 3:], initial_state=st,
                                         normalize=True)
    assert_close("chained", torch.cat([a, b], 1), full, TOL)


def test_linear_attn_normalize_gradients():
    q, k, v = (t.requires_grad_() for t in _qkv(B=1, T=5, K=4, V=3))
    o, (_, z) = C.chunk_linear_attn(q, k, v, output_final_state=True)
    o_ref, _, z_ref = _normalized_ref(q, k, v)
    w1, w2 = torch.randn_like(o), torch.randn_like(z)
    g = torch.autograd.grad((o * w1).sum() + (z * w2).sum(), (q, k, v))
    g_ref = torch.autograd.grad((o_ref * w1).sum() + (z_ref * w2).sum(), (q, k, v))
    for name, a, b in zip("qkv", g, g_ref):
        assert_close(f"d{name}", a, b, 1e-9)


@pytest.mark.parametrize("lengths", [None, [3, 0, 1, 4]])
def test_fused_recurrent_reverse(lengths):
    B = 2 if lengths is None else 1
    T = 8
    q, k, v = _qkv(B=B, T=T)
    cu = None if lengths is None else cu_seqlens_from_lengths(lengths)
    N = B if cu is None else len(lengths)
    g = log_gate(B, T, 2)
    h0 = _h0(N, 2, 8, 4)
    o, ht = C.fused_recurrent_simple_gla(q, k, v, g, None, None, h0, True, True,
                                         cu_seqlens=cu)
    o_ref, ht_ref = R.simple_gla_ref(_flip(q, cu), _flip(k, cu), _flip(v, cu), _flip(g, cu),
                                     None, None, h0, True, cu)
    assert_close("o", o, _flip(o_ref, cu), TOL)
    assert_close("ht", ht, ht_ref, TOL)
    o, _ = C.fused_recurrent_linear_attn(q, k, v, reverse=True, cu_seqlens=cu)
    o_ref, _ = R.linear_attn_ref(_flip(q, cu), _flip(k, cu), _flip(v, cu), cu_seqlens=cu)
    assert_close("o linear", o, _flip(o_ref, cu), TOL)


# ---------------------------------------------------------------------------------------------
# simple GLA / GLA: state_v_first, fused_recurrent_gla(gk, gv), kwargs
# ---------------------------------------------------------------------------------------------
def test_state_v_first_transposes_states():
    q, k, v = _qkv(K=8, V=4)
    g = log_gate(2, 7, 2, 8)
    h0 = _h0(2, 2, 8, 4)
    o, ht = C.chunk_gla(q, k, v, g, None, h0.transpose(-1, -2).contiguous(), True, True)
    o_ref, ht_ref = R.gla_ref(q, k, v, g, None, h0, True)
    assert ht.shape == (2, 2, 4, 8)
    assert_close("o", o, o_ref, TOL)
    assert_close("ht", ht, ht_ref.transpose(-1, -2), TOL)
    gs = log_gate(2, 7, 2)
    o, ht = C.chunk_simple_gla(q, k, v, gs, None, None, h0.transpose(-1, -2), True,
                               state_v_first=True)
    o_ref, ht_ref = R.simple_gla_ref(q, k, v, gs, None, None, h0, True)
    assert_close("o sgla", o, o_ref, TOL)
    assert_close("ht sgla", ht, ht_ref.transpose(-1, -2), TOL)
    # fla's deprecated alias
    with pytest.warns(DeprecationWarning, match="transpose_state_layout"):
        o2, _ = C.fused_recurrent_simple_gla(q, k, v, gs, initial_state=h0.transpose(-1, -2),
                                             transpose_state_layout=True)
    assert_close("o alias", o2, o_ref, TOL)


def test_fused_recurrent_gla_gk_gv():
    q, k, v = _qkv()
    gk = log_gate(2, 7, 2, 8)
    h0 = _h0(2, 2, 8, 4)
    o, ht = C.fused_recurrent_gla(q, k, v, gk, None, 0.5, h0, True)   # fla's positional order
    o_ref, ht_ref = R.gla_ref(q, k, v, gk, 0.5, h0, True)
    assert_close("o", o, o_ref, TOL)
    assert_close("ht", ht, ht_ref, TOL)
    o, _ = C.fused_recurrent_gla(q, k, v)                              # no gate: linear attn
    assert_close("o nogate", o, R.linear_attn_ref(q, k, v)[0], TOL)
    o, _ = C.fused_recurrent_gla(q, k, v, gk=gk, reverse=True)
    assert_close("o rev", o, _flip(R.gla_ref(_flip(q), _flip(k), _flip(v), _flip(gk))[0]), TOL)
    with pytest.raises(UnsupportedArgumentError, match="gv"):
        C.fused_recurrent_gla(q, k, v, gk, gv=log_gate(2, 7, 2, 4))
    with pytest.raises(NotImplementedError, match="deprecated"):
        C.fused_chunk_gla(q=q)


def test_kwargs_chunk_size_and_unknown():
    q, k, v = _qkv()
    g = log_gate(2, 7, 2)
    o_ref, _ = R.simple_gla_ref(q, k, v, g)
    o, _ = C.chunk_simple_gla(q, k, v, g, chunk_size=16, cu_seqlens_cpu=None)
    assert_close("o", o, o_ref, TOL)
    with pytest.raises(ValueError, match="power of 2"):
        C.chunk_simple_gla(q, k, v, g, chunk_size=48)
    with pytest.raises(ValueError, match="16, 32, or 64"):
        C.chunk_delta_rule(q, k, v, torch.rand(2, 7, 2, dtype=f64), chunk_size=128)
    with pytest.raises(TypeError, match="chunk_sz"):
        C.chunk_simple_gla(q, k, v, g, chunk_sz=16)
    with pytest.raises(DeprecationWarning, match="head_first"):
        C.chunk_simple_gla(q, k, v, g, head_first=False)
    with pytest.raises(TypeError):          # chunk_gla takes no **kwargs in fla either
        C.chunk_gla(q, k, v, log_gate(2, 7, 2, 8), chunk_size=64)


def test_mixed_value_dtype_is_promoted():
    q, k, v = _qkv()
    g = log_gate(2, 7, 2, 8)
    o, _ = C.chunk_gla(q.float(), k.float(), v, g)           # v float64, q/k float32
    assert o.dtype == f64
    o_ref, _ = R.gla_ref(q.float().double(), k.float().double(), v, g)
    assert_close("o", o, o_ref, TOL)
    beta = torch.rand(2, 7, 2, dtype=f64)
    gs = log_gate(2, 7, 2)
    o, _ = C.chunk_gated_delta_rule(q.float(), k.float(), v, gs, beta)
    assert o.dtype == torch.float32                            # fla returns q's dtype here
    o_ref, _ = R.gated_delta_rule_ref(q.float().double(), k.float().double(), v, gs, beta)
    assert_close("o gdn", o, o_ref, 1e-6)


# ---------------------------------------------------------------------------------------------
# Lightning Attention: fla's slopes from layer_idx / num_layers
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer_idx,num_layers", [(0, 4), (3, 4), (2, 3)])
def test_lightning_slopes(layer_idx, num_layers):
    H = 4
    q, k, v = _qkv(H=H)
    g_gamma = torch.tensor([-(8 / H) * (1 - layer_idx / num_layers) * h for h in range(H)],
                           dtype=torch.float32)
    h0 = _h0(2, H, 8, 4)
    o_ref, ht_ref = R.simple_gla_ref(q, k, v, None, g_gamma.double(), None, h0, True)
    o, ht = C.chunk_lightning_attn(q, k, v, layer_idx, num_layers, None, h0, True)
    assert_close("o", o, o_ref, 1e-6)
    assert_close("ht", ht, ht_ref, 1e-6)
    o, ht = C.fused_recurrent_lightning_attn(q, k, v, layer_idx, num_layers, None, h0, True)
    assert_close("o rec", o, o_ref, 1e-6)
    assert (C.lightning_g_gamma(H, layer_idx, num_layers)[0] == 0)


# ---------------------------------------------------------------------------------------------
# delta rules: fla's positional order, gates and beta in "kernel"
# ---------------------------------------------------------------------------------------------
def test_delta_rule_positional_order():
    q, k, v = _qkv(B=1, T=9)
    beta = torch.rand(1, 9, 2, dtype=f64)
    cu = cu_seqlens_from_lengths([4, 5])
    h0 = _h0(2, 2, 8, 4)
    # fla: (q, k, v, beta, scale, initial_state, output_final_state, use_qk_l2norm, cu_seqlens)
    o, ht = C.chunk_delta_rule(q, k, v, beta, 0.3, h0, True, True, cu)
    o_ref, ht_ref = R.delta_rule_ref(q, k, v, beta, 0.3, h0, True, cu, True)
    assert_close("o", o, o_ref, TOL)
    assert_close("ht", ht, ht_ref, TOL)
    o, ht = C.fused_recurrent_delta_rule(q, k, v, beta, 0.3, h0, True, True, cu)
    assert_close("o rec", o, o_ref, TOL)
    o, _ = C.fused_recurrent_delta_rule(q, k, v)                   # beta defaults to ones
    assert_close("o ones", o, R.delta_rule_ref(q, k, v, torch.ones(1, 9, 2, dtype=f64))[0], TOL)


def test_gated_delta_rule_gate_and_beta_in_kernel():
    q, k, v = _qkv(H=2, HV=4)                                     # grouped value heads
    graw = torch.randn(2, 7, 4, dtype=f64)
    braw = torch.randn(2, 7, 4, dtype=f64)
    A_log = torch.rand(4, dtype=f64)
    dt_bias = torch.randn(4, dtype=f64)
    g = -A_log.exp() * F.softplus(graw + dt_bias)
    beta = 2 * torch.sigmoid(braw)
    h0 = _h0(2, 4, 8, 4)
    o_ref, ht_ref = R.gated_delta_rule_ref(q, k, v, g, beta, None, h0, True)
    o, ht = C.chunk_gated_delta_rule(q, k, v, graw, braw, None, h0.transpose(-1, -2), True,
                                     False, True, True, True, use_gate_in_kernel=True,
                                     A_log=A_log, dt_bias=dt_bias)
    assert_close("o", o, o_ref, TOL)
    assert_close("ht", ht, ht_ref.transpose(-1, -2), TOL)
    o, ht = C.fused_recurrent_gated_delta_rule(
        q, k, v, graw, None, None, braw, None, h0, True, use_gate_in_kernel=True, A_log=A_log,
        dt_bias=dt_bias, use_beta_sigmoid_in_kernel=True, allow_neg_eigval=True)
    assert_close("o rec", o, o_ref, TOL)
    assert_close("ht rec", ht, ht_ref, TOL)
    with pytest.raises(ValueError, match="allow_neg_eigval"):
        C.chunk_gated_delta_rule(q, k, v, g, beta, allow_neg_eigval=True)
    with pytest.raises(ValueError, match="A_log"):
        C.chunk_gated_delta_rule(q, k, v, graw, beta, use_gate_in_kernel=True)


def test_fused_recurrent_gated_delta_rule_defaults_and_refusals():
    q, k, v = _qkv()
    o, _ = C.fused_recurrent_gated_delta_rule(q, k, v)             # no gate, beta = 1
    assert_close("o", o, R.delta_rule_ref(q, k, v, torch.ones(2, 7, 2, dtype=f64))[0], TOL)
    gk = log_gate(2, 7, 2, 8)                                      # a per-key gate: KDA
    o, _ = C.fused_recurrent_gated_delta_rule(q, k, v, gk=gk)
    assert_close("o gk", o, R.kda_ref(q, k, v, gk, torch.ones(2, 7, 2, dtype=f64))[0], TOL)
    with pytest.raises(UnsupportedArgumentError, match="gv"):
        C.fused_recurrent_gated_delta_rule(q, k, v, gv=log_gate(2, 7, 2, 4))
    with pytest.raises(UnsupportedArgumentError, match="cp_context"):
        C.chunk_gated_delta_rule(q, k, v, log_gate(2, 7, 2), torch.rand(2, 7, 2, dtype=f64),
                                 cp_context=object())
    assert C.chunk_gdn is C.chunk_gated_delta_rule


# ---------------------------------------------------------------------------------------------
# KDA
# ---------------------------------------------------------------------------------------------
def test_kda_gate_and_beta_in_kernel_and_layouts():
    q, k, v = _qkv(H=2, HV=4)                                     # grouped value heads
    graw = torch.randn(2, 7, 4, 8, dtype=f64)
    braw = torch.randn(2, 7, 4, dtype=f64)
    A_log = torch.rand(4, dtype=f64)
    dt_bias = torch.randn(4 * 8, dtype=f64)
    g = -A_log.exp()[:, None] * F.softplus(graw + dt_bias.view(4, 8))
    beta = torch.sigmoid(braw)
    h0 = _h0(2, 4, 8, 4)
    o_ref, ht_ref = R.kda_ref(q, k, v, g, beta, None, h0, True, use_qk_l2norm_in_kernel=True)
    o, ht = C.chunk_kda(q, k, v, graw, braw, None, h0, True, True, True, True,
                        A_log=A_log, dt_bias=dt_bias)
    assert_close("o", o, o_ref, TOL)
    assert_close("ht", ht, ht_ref, TOL)
    o, ht = C.fused_recurrent_kda(q, k, v, graw, braw, A_log, dt_bias, None,
                                  h0.transpose(-1, -2), True, True, True, True,
                                  state_v_first=True)
    assert_close("o rec", o, o_ref, TOL)
    assert_close("ht rec", ht, ht_ref.transpose(-1, -2), TOL)
    # lower_bound form, and the standalone gate
    gl = -3.0 * torch.sigmoid(A_log.exp()[:, None] * (graw + dt_bias.view(4, 8)))
    assert_close("gate", C.fused_kda_gate(graw, A_log, dt_bias, lower_bound=-3.0,
                                          output_dtype=f64), gl, TOL)
    o, _ = C.chunk_kda(q, k, v, graw, beta, use_gate_in_kernel=True, A_log=A_log,
                       dt_bias=dt_bias, lower_bound=-3.0, safe_gate=True)
    assert_close("o lb", o, R.kda_ref(q, k, v, gl, beta)[0], TOL)


def test_kda_refusals():
    q, k, v = _qkv()
    g, beta = log_gate(2, 7, 2, 8), torch.rand(2, 7, 2, dtype=f64)
    with pytest.raises(ValueError, match="A_log"):
        C.chunk_kda(q, k, v, g, beta, use_gate_in_kernel=True)
    with pytest.raises(ValueError, match="chunk_size"):
        C.chunk_kda(q, k, v, g, beta, chunk_size=16)
    with pytest.raises(ValueError, match="lower_bound"):
        C.chunk_kda(q, k, v, g, beta, use_gate_in_kernel=True, safe_gate=True,
                    A_log=torch.zeros(2, dtype=f64))
    with pytest.raises(TypeError, match="nonsense"):
        C.chunk_kda(q, k, v, g, beta, nonsense=1)

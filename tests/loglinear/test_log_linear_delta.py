"""Log-linear Gated DeltaNet: chunk_log_linear_gated_delta_rule (chunked torch), its decode form
(fused_recurrent_log_linear_gated_delta_rule, log_linear_gated_delta_rule_step) and the
LogLinearGatedDeltaNet layer.

Against the float64 token-by-token spec (reference.log_linear_gated_delta_rule_ref): o, the final
state (ht, offsets) and every gradient (q, k, v, g, level_scales, beta, initial ht) through one
(o*do).sum() + (ht*dht).sum() backward, on odd shapes (T = 1, T not a multiple of the chunk, K != V
and not powers of two, grouped value heads), dense / varlen (length-1 and empty segments),
initial states at odd offsets, with and without the in-kernel q/k l2 norm. The spec itself is
checked two independent ways (every lambda = 1 is Gated DeltaNet; the materialised pairwise form
with explicit products of transitions). gradcheck on a tiny case; extreme gates (-inf resets,
-1e4, -20 everywhere); non-finite inputs stay causal; fp32 / bf16; decode == full forward;
opcheck + torch.compile(fullgraph=True); bad input. The layer: an independent float64 reference
of its equations (forward and every parameter gradient), decode == full forward, padding masks in
any arrangement and packing == each sequence alone, state_dict keys, empty input, bad caches."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import layers
import lightning_ops
from layers.log_linear_delta import LogLinearGatedDeltaNet
from lightning_ops import reference as R
from lightning_ops.loglinear import (LogLinearAttentionState, chunk_log_linear_gated_delta_rule,
                                     fused_recurrent_log_linear_gated_delta_rule,
                                     log_linear_gated_delta_rule_step)
from lightning_ops.loglinear.delta import _lld_bwd, _lld_fwd

F64 = torch.float64
NAMES = ("q", "k", "v", "g", "level_scales", "beta")


def _rel(a, e):
    if e.numel() == 0 or not e.abs().max() > 0:
        return (a.double() - e.double()).abs().max().item() if e.numel() else 0.0
    return ((a.double() - e.double()).abs().max() / e.double().abs().max().clamp_min(1e-30)).item()


def _cu(lengths):
    return None if lengths is None else torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)))


def _inputs(B, T, G, H, K, V, L, N, offsets=None, seed=0, l2=True):
    """Random inputs; without the in-kernel l2 norm, keys of norm 0.9 (a stable recurrence)."""
    gen = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=gen, dtype=F64)  # noqa: E731
    k = rn(B, T, G, K)
    if not l2:
        k = 0.9 * k / k.norm(dim=-1, keepdim=True)
    x = dict(q=rn(B, T, G, K), k=k, v=rn(B, T, H, V),
             g=-0.5 * torch.rand(B, T, H, generator=gen, dtype=F64),
             level_scales=torch.rand(B, T, H, L, generator=gen, dtype=F64),
             beta=torch.rand(B, T, H, generator=gen, dtype=F64))
    h0 = None
    if offsets is not None:
        ht = rn(N, H, L, K, V)
        for n, t0 in enumerate(offsets):  # only the buckets that exist at offset t0
            for l in range(L):
                if l == 0 or not (t0 >> (l - 1)) & 1:
                    ht[n, :, l] = 0
        h0 = (ht, torch.tensor(offsets, dtype=torch.int64))
    return x, h0


def _run(fn, x, h0, cu, dtype, **kw):
    """o, (ht, offsets) and the gradients of every float input through one probe backward."""
    leaves = {n: t.detach().to(dtype).requires_grad_() for n, t in x.items()}
    init = None
    if h0 is not None:
        init = (h0[0].detach().to(dtype).requires_grad_(), h0[1])
    o, st = fn(**leaves, initial_state=init, output_final_state=True, cu_seqlens=cu, **kw)
    gen = torch.Generator().manual_seed(123)
    do = torch.randn(o.shape, generator=gen, dtype=F64).to(o.dtype)
    dht = torch.randn(st[0].shape, generator=gen, dtype=F64).to(st[0].dtype)
    ((o * do).sum() + (st[0] * dht).sum()).backward()
    zero = lambda t: torch.zeros_like(t) if t.grad is None else t.grad  # noqa: E731
    grads = {n: zero(t) for n, t in leaves.items()}
    if init is not None:
        grads["h0"] = zero(init[0])
    return o, st, grads


CASES = [  # B, T, G, H, K, V, L, chunk, lengths, offsets, l2
    pytest.param(2, 37, 1, 3, 4, 5, 8, 4, None, None, True, id="dense-T37-C4"),
    pytest.param(2, 37, 1, 3, 4, 5, 3, 4, None, [7, 1], False, id="few-levels-offsets"),
    pytest.param(1, 1, 1, 1, 2, 3, 4, 8, None, None, True, id="T1"),
    pytest.param(2, 19, 2, 4, 3, 2, 7, 8, None, [0, 0], True, id="gva-zero-offsets"),
    pytest.param(2, 21, 1, 2, 3, 4, 9, 4, None, [13, 6], True, id="dense-offsets"),
    pytest.param(1, 30, 1, 2, 3, 2, 8, 4, [1, 0, 8, 21], None, True, id="varlen"),
    pytest.param(1, 30, 1, 2, 3, 2, 8, 4, [1, 0, 8, 21], [5, 0, 7, 16], False,
                 id="varlen-offsets"),
    pytest.param(1, 24, 1, 1, 2, 2, 6, 64, None, [3], True, id="one-chunk-offset"),
    pytest.param(1, 45, 1, 2, 5, 7, 10, 8, None, [37], True, id="odd-KV-offset"),
]


@pytest.mark.parametrize("B,T,G,H,K,V,L,C,lengths,offsets,l2", CASES)
def test_chunk_matches_reference_f64(B, T, G, H, K, V, L, C, lengths, offsets, l2):
    cu = _cu(lengths)
    N = B if cu is None else len(lengths)
    x, h0 = _inputs(B, T, G, H, K, V, L, N, offsets, l2=l2)
    kw = dict(use_qk_l2norm_in_kernel=l2)
    o_r, st_r, g_r = _run(R.log_linear_gated_delta_rule_ref, x, h0, cu, F64, **kw)
    o_c, st_c, g_c = _run(chunk_log_linear_gated_delta_rule, x, h0, cu, F64, chunk_size=C, **kw)
    assert isinstance(st_c, LogLinearAttentionState)
    assert _rel(o_c, o_r) <= 1e-10 and _rel(st_c.ht, st_r[0]) <= 1e-10
    assert st_c.offsets.tolist() == st_r[1].tolist()
    for n in g_r:
        assert torch.isfinite(g_c[n]).all(), n
        assert _rel(g_c[n], g_r[n]) <= 1e-10, (n, _rel(g_c[n], g_r[n]))


# -- the spec, checked independently ------------------------------------------------------------
@pytest.mark.parametrize("offsets", [None, [5, 12]])
def test_all_levels_weighed_one_is_gated_delta_rule(offsets):
    """The level states sum to the Gated DeltaNet state: with lambda = 1 on enough levels the op
    is lightning_ops.chunk_gated_delta_rule (scale 1), from the summed initial levels."""
    B, T, H, K, V, L = 2, 40, 2, 4, 3, 7  # levels of positions < 64: at most 6
    x, h0 = _inputs(B, T, 1, H, K, V, L, B, offsets)
    x["level_scales"] = torch.ones_like(x["level_scales"])
    o, st = chunk_log_linear_gated_delta_rule(**x, initial_state=h0, output_final_state=True,
                                              use_qk_l2norm_in_kernel=True, chunk_size=8)
    o_gdn, ht_gdn = lightning_ops.chunk_gated_delta_rule(
        x["q"], x["k"], x["v"], x["g"], x["beta"], scale=1.0,
        initial_state=None if h0 is None else h0[0].sum(2), output_final_state=True,
        use_qk_l2norm_in_kernel=True)
    assert _rel(o, o_gdn) <= 1e-10 and _rel(st.ht.sum(2), ht_gdn) <= 1e-10


def test_reference_equals_materialised_pairwise_form():
    """o_t = sum_{s<=t} lambda_t[lev(s, t)] (q_t^T A_t ... A_{s+1} k_s) beta_s v_s with
    A_r = exp(g_r) (I - beta_r k_r k_r^T) multiplied out explicitly (no recurrence, no chunks)."""
    B, T, H, K, V, L = 1, 11, 2, 3, 2, 5
    x, _ = _inputs(B, T, 1, H, K, V, L, B, l2=False)
    o_r, _ = R.log_linear_gated_delta_rule_ref(**x, scale=0.7)
    q, k, v, g, lam, beta = (x[n][0] for n in NAMES)
    eye = torch.eye(K, dtype=F64)
    o = torch.zeros(T, H, V, dtype=F64)
    for h in range(H):
        for t in range(T):
            Phi = eye.clone()  # A_t ... A_{s+1}
            for s in range(t, -1, -1):
                lev = R.log_linear_level(s, t)
                if lev < L:
                    w = lam[t, h, lev] * (q[t, 0] @ Phi @ k[s, 0]) * beta[s, h]
                    o[t, h] += 0.7 * w * v[s, h]
                ks = k[s, 0]
                Phi = Phi @ (g[s, h].exp() * (eye - beta[s, h] * torch.outer(ks, ks)))
    assert _rel(o_r[0], o) <= 1e-12


def test_gradcheck_tiny():
    """Finite differences through the custom op (every input, the initial hierarchy included),
    across chunk boundaries with an odd offset."""
    x, h0 = _inputs(1, 6, 1, 1, 2, 2, 4, 1, [3], l2=False)
    ins = [x[n].clone().requires_grad_() for n in NAMES] + [h0[0].clone().requires_grad_()]

    def f(q, k, v, g, lam, beta, ht):
        o, st = chunk_log_linear_gated_delta_rule(q, k, v, g, lam, beta, 0.5, (ht, h0[1]), True,
                                                  use_qk_l2norm_in_kernel=True, chunk_size=2)
        return o, st.ht

    assert torch.autograd.gradcheck(f, ins, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("fill", ["-inf", "huge", "strong"])
def test_extreme_gates_exact(fill):
    B, T, H, K, V, L = 2, 24, 2, 3, 3, 7
    x, h0 = _inputs(B, T, 1, H, K, V, L, B, [5, 12])
    g = x["g"]
    if fill == "-inf":  # resets, one inside a chunk, two in a row, one on a chunk's first token
        g[0, 3, 0] = g[1, 9, 1] = g[0, 16:18, 1] = g[1, 4, 0] = -math.inf
    elif fill == "huge":
        g[0, 3, 0] = g[1, 9, 1] = -1e4
    else:
        g.fill_(-20.0)
    kw = dict(use_qk_l2norm_in_kernel=True)
    o_r, st_r, g_r = _run(R.log_linear_gated_delta_rule_ref, x, h0, None, F64, **kw)
    o_c, st_c, g_c = _run(chunk_log_linear_gated_delta_rule, x, h0, None, F64, chunk_size=4, **kw)
    assert torch.isfinite(o_c).all() and torch.isfinite(st_c.ht).all()
    assert _rel(o_c, o_r) <= 1e-10 and _rel(st_c.ht, st_r[0]) <= 1e-10
    for n in g_r:
        assert torch.isfinite(g_c[n]).all(), n
        assert (g_c[n] - g_r[n]).abs().max() <= 1e-10 * g_r[n].abs().max().clamp_min(1e-300), n


@pytest.mark.parametrize("bad", ["v", "k", "beta"])
def test_nonfinite_input_stays_causal(bad):
    """A NaN at token t of one sequence: that sequence's outputs before t (and every other
    sequence) are exact; from t on they are NaN, as is its final state."""
    B, T, H, K, V, L, t = 2, 20, 2, 3, 3, 6, 9
    x, _ = _inputs(B, T, 1, H, K, V, L, B)
    o_ok, st_ok = chunk_log_linear_gated_delta_rule(**x, output_final_state=True, chunk_size=8,
                                                    use_qk_l2norm_in_kernel=True)
    x[bad][0, t] = float("nan")
    o, st = chunk_log_linear_gated_delta_rule(**x, output_final_state=True, chunk_size=8,
                                              use_qk_l2norm_in_kernel=True)
    assert _rel(o[0, :t], o_ok[0, :t]) <= 1e-12 and _rel(o[1], o_ok[1]) <= 1e-12
    assert torch.isnan(o[0, t:]).all() and torch.isnan(st.ht[0]).all()
    assert _rel(st.ht[1], st_ok.ht[1]) <= 1e-12


def test_fp32_bf16_and_default_chunk():
    x, h0 = _inputs(2, 70, 1, 2, 8, 8, 9, 2, [0, 37])
    kw = dict(initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True)
    o_r, st_r = R.log_linear_gated_delta_rule_ref(**x, **kw)
    x32 = {n: t.float() for n, t in x.items()}
    o, st = chunk_log_linear_gated_delta_rule(**x32, **{**kw, "initial_state": (h0[0].float(),
                                                                                 h0[1])})
    assert o.dtype == torch.float32 and st.ht.dtype == torch.float32
    assert _rel(o, o_r) <= 1e-5 and _rel(st.ht, st_r[0]) <= 1e-5
    xb = {n: t.bfloat16() for n, t in x.items()}
    o, st = chunk_log_linear_gated_delta_rule(**xb, **kw)
    assert o.dtype == torch.bfloat16 and st.ht.dtype == torch.float32
    assert _rel(o, o_r) <= 5e-2


@pytest.mark.parametrize("lengths", [None, [3, 0, 14, 1]])
def test_decode_equals_full_forward(lengths):
    """chunk over a prefix, then one log_linear_gated_delta_rule_step per token (O(log T)
    states), equals the chunked forward over the whole sequence; fused_recurrent equals it too,
    gradients included."""
    T, H, K, V, L = 18, 2, 3, 4, 7
    cu = _cu(lengths)
    B = 2 if cu is None else 1
    x, _ = _inputs(B, T, 1, H, K, V, L, B)
    kw = dict(use_qk_l2norm_in_kernel=True)
    o_full, st_full = chunk_log_linear_gated_delta_rule(**x, output_final_state=True,
                                                        cu_seqlens=cu, chunk_size=4, **kw)
    o_rec, st_rec, g_rec = _run(fused_recurrent_log_linear_gated_delta_rule, x, None, cu, F64,
                                **kw)
    _, _, g_chk = _run(chunk_log_linear_gated_delta_rule, x, None, cu, F64, chunk_size=4, **kw)
    assert _rel(o_rec, o_full) <= 1e-12 and _rel(st_rec[0], st_full.ht) <= 1e-12
    for n in g_chk:
        assert _rel(g_rec[n], g_chk[n]) <= 1e-10, n
    if cu is None:
        P = 7
        _, st = chunk_log_linear_gated_delta_rule(**{n: t[:, :P] for n, t in x.items()},
                                                  output_final_state=True, chunk_size=4, **kw)
        for t in range(P, T):
            o_t, st = log_linear_gated_delta_rule_step(*(x[n][:, t] for n in NAMES), st, **kw)
            assert _rel(o_t, o_full[:, t]) <= 1e-12
        assert _rel(st.ht, st_full.ht) <= 1e-12 and st.offsets.tolist() == [T, T]


def test_empty_and_bad_input():
    x, _ = _inputs(2, 0, 1, 2, 3, 3, 4, 2)
    o, st = chunk_log_linear_gated_delta_rule(**x, output_final_state=True)
    assert o.shape == (2, 0, 2, 3) and st.ht.shape == (2, 2, 4, 3, 3)
    assert st.offsets.tolist() == [0, 0]
    x, _ = _inputs(2, 5, 1, 2, 3, 3, 4, 2)
    with pytest.raises(ValueError, match="beta"):
        chunk_log_linear_gated_delta_rule(**{**x, "beta": x["beta"][:, :, :1]})
    with pytest.raises(ValueError, match="level_scales"):
        chunk_log_linear_gated_delta_rule(**{**x, "level_scales": x["level_scales"][..., 0]})
    with pytest.raises(ValueError, match="initial_state.ht"):
        chunk_log_linear_gated_delta_rule(**x, initial_state=(torch.zeros(2, 2, 3, 3, 3,
                                                                          dtype=F64),
                                                              torch.zeros(2, dtype=torch.int64)))
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_log_linear_gated_delta_rule(**x, chunk_size=6)


# -- custom op: opcheck and torch.compile --------------------------------------------------------
def _op_args(B=2, T=9, G=1, H=2, K=3, V=4, L=5, offsets=(0, 5), cu=None, seed=0):
    N = B if cu is None else len(cu) - 1
    x, h0 = _inputs(B, T, G, H, K, V, L, N, offsets, seed)
    xs = [x[n].requires_grad_() for n in NAMES]
    ht, off = (None, None) if h0 is None else (h0[0].requires_grad_(), h0[1])
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int64)
    return (*xs, ht, off, cu)


OPCHECK = {
    "states": dict(),
    "no-state": dict(offsets=None),
    "gva": dict(G=1, H=3, offsets=(3, 0)),
    "varlen": dict(B=1, T=9, cu=[0, 4, 4, 9], offsets=(0, 2, 7)),
    "empty-T": dict(T=0),
}


@pytest.mark.parametrize("case", list(OPCHECK))
@pytest.mark.parametrize("want", [True, False], ids=["final", "no-final"])
def test_opcheck(case, want):
    torch.library.opcheck(_lld_fwd, (*_op_args(**OPCHECK[case]), 1.0, want, True, 4))


def test_opcheck_backward_op():
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in _op_args()]
    do = torch.randn_like(args[2])
    dht = torch.randn(2, 2, 5, 3, 4, dtype=F64)
    torch.library.opcheck(_lld_bwd, (do, dht, *args, 0.5, True, 4),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("case", ["states", "varlen"])
def test_compile_fullgraph_forward_backward_matches_eager(case):
    torch._dynamo.reset()
    args = _op_args(**OPCHECK[case])

    def f(q, k, v, g, lam, beta, h0, off, cu):
        return chunk_log_linear_gated_delta_rule(q, k, v, g, lam, beta, 0.5, (h0, off), True, cu,
                                                 True, chunk_size=4)

    def run(fn):
        xs = [None if a is None else (a.detach().clone().requires_grad_()
                                      if a.is_floating_point() else a.clone()) for a in args]
        o, (ht, offsets) = fn(*xs)
        gen = torch.Generator().manual_seed(7)
        ((o * torch.randn(o.shape, generator=gen, dtype=F64)).sum()
         + (ht * torch.randn(ht.shape, generator=gen, dtype=F64)).sum()).backward()
        return [o, ht, offsets] + [xs[i].grad for i in range(7)]

    eager = run(f)
    comp = run(torch.compile(f, fullgraph=True, backend="aot_eager"))
    for i, (a, b) in enumerate(zip(eager, comp)):
        assert torch.equal(a, b), i


# -- the layer -----------------------------------------------------------------------------------
HID = 16


def make(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(hidden_size=HID, head_dim=4, num_heads=2, num_v_heads=4, expand_v=1.5,
               num_levels=6, layer_idx=0)
    cfg.update(kw)
    m = LogLinearGatedDeltaNet(**cfg).double()
    with torch.no_grad():  # non-trivial level weights and norm weight
        m.L.copy_(torch.randn_like(m.L))
        m.o_norm.weight.copy_(1 + 0.3 * torch.randn_like(m.o_norm.weight))
    return m


def hidden(B, T, seed=1):
    return torch.randn(B, T, HID, generator=torch.Generator().manual_seed(seed), dtype=F64)


def layer_reference(m, x):
    """The layer's equations written out: projections -> causal depthwise convs + SiLU ->
    beta = sigmoid(b_proj x), g = -exp(A_log) softplus(a_proj x + dt_bias), lambda =
    softplus(L l_proj x) -> the token-by-token spec (q/k l2-normalised, scale 1) -> per-head
    RMSNorm * weight * silu(g_proj x) -> o_proj."""
    b, l, _ = x.shape

    def conv(lin, c):
        y = lin(x).transpose(1, 2)
        W = c.weight.shape[-1]
        return F.silu(F.conv1d(F.pad(y, (W - 1, 0)), c.weight, c.bias,
                               groups=y.shape[1])).transpose(1, 2)

    H, HV, K, V = m.num_heads, m.num_v_heads, m.head_k_dim, m.head_v_dim
    q = conv(m.q_proj, m.q_conv1d).reshape(b, l, H, K)
    k = conv(m.k_proj, m.k_conv1d).reshape(b, l, H, K)
    v = conv(m.v_proj, m.v_conv1d).reshape(b, l, HV, V)
    beta = torch.sigmoid(m.b_proj(x))
    g = -m.A_log.exp() * F.softplus(m.a_proj(x) + m.dt_bias)
    lam = F.softplus(m.L * m.l_proj(x).reshape(b, l, HV, m.num_levels))
    o, _ = R.log_linear_gated_delta_rule_ref(q, k, v, g, lam, beta,
                                             use_qk_l2norm_in_kernel=True)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + m.o_norm.eps) * m.o_norm.weight
    o = o * F.silu(m.g_proj(x).reshape(b, l, HV, V))
    return m.o_proj(o.reshape(b, l, HV * V))


def test_layer_float64_forward_and_every_gradient_match_reference():
    m = make()
    r = copy.deepcopy(m)
    x = hidden(2, 11).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    out, _, _ = m(x)
    ref = layer_reference(r, xr)
    assert _rel(out, ref) <= 1e-10
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    assert _rel(x.grad, xr.grad) <= 1e-10, "d hidden_states"
    for (name, p), pr in zip(m.named_parameters(), r.parameters()):
        assert p.grad is not None and _rel(p.grad, pr.grad) <= 1e-9, f"d {name}"


def _decode(m, x, split, mask=None):
    cache = layers.Cache()
    kw = {} if mask is None else {"attention_mask": mask[:, :split]}
    outs = [m(x[:, :split], past_key_values=cache, use_cache=True, **kw)[0]]
    for t in range(split, x.shape[1]):
        kw = {} if mask is None else {"attention_mask": mask[:, :t + 1]}
        outs.append(m(x[:, t:t + 1], past_key_values=cache, use_cache=True, **kw)[0])
    return torch.cat(outs, 1), cache


@torch.no_grad()
def test_layer_decode_equals_full_forward():
    """Prefill + one-token steps (the O(log T) hierarchy) and a multi-token continuation of a
    cache equal the full forward, states included; the fused_recurrent mode too."""
    m = make()
    x = hidden(2, 13)
    full, _, cache_full = m(x, past_key_values=layers.Cache(), use_cache=True)
    ht_f, off_f = cache_full[0]["recurrent_state"]
    assert ht_f.shape == (2, 4, 6, 4, 6) and ht_f.dtype == F64 and off_f.tolist() == [13, 13]
    for split in (1, 5):
        out, cache = _decode(m, x, split)
        assert _rel(out, full) <= 1e-12
        ht, off = cache[0]["recurrent_state"]
        assert off.tolist() == [13, 13] and _rel(ht, ht_f) <= 1e-12
        assert cache.get_seq_length(0) == 13
    cache = layers.Cache()
    a, _, cache = m(x[:, :6], past_key_values=cache, use_cache=True)
    b, _, cache = m(x[:, 6:], past_key_values=cache, use_cache=True)
    assert _rel(torch.cat([a, b], 1), full) <= 1e-12
    m.mode = "fused_recurrent"
    out, _, _ = m(x)
    assert _rel(out, full) <= 1e-12


@torch.no_grad()
def test_layer_padding_mask_and_packing_equal_each_sequence_alone():
    m = make()
    x = hidden(3, 10)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, :3] = 0            # left padding
    mask[1, 7:] = 0            # right padding
    mask[2, [1, 4, 5]] = 0     # gaps
    out, _, cache = m(x, attention_mask=mask, past_key_values=layers.Cache(), use_cache=True)
    for b in range(3):
        keep = mask[b].bool()
        alone, _, c1 = m(x[b:b + 1, keep], past_key_values=layers.Cache(), use_cache=True)
        assert _rel(out[b, keep], alone[0]) <= 1e-12
        assert out[b, ~keep].abs().max().item() == 0
        ht, off = cache[0]["recurrent_state"]
        assert off[b].item() == int(keep.sum())
        assert _rel(ht[b], c1[0]["recurrent_state"][0][0]) <= 1e-12
    # left-padded prompt, then decode steps (one of them padded for row 1)
    x2 = hidden(2, 9, seed=3)
    m2 = torch.ones(2, 9, dtype=torch.long)
    m2[0, :2] = 0
    m2[1, 6] = 0
    dec, cache = _decode(m, x2, 4, m2)
    for b in range(2):
        keep = m2[b].bool()
        alone, _, _ = m(x2[b:b + 1, keep])
        assert _rel(dec[b, keep], alone[0]) <= 1e-12
    assert cache[0]["recurrent_state"][1].tolist() == [7, 8]
    # packed sequences, then one packed token each == per-sequence decode
    lens = [5, 1, 7]
    xp = hidden(1, sum(lens), seed=4)
    cu = torch.tensor([0, 5, 6, 13])
    out, _, cache = m(xp, cu_seqlens=cu, past_key_values=layers.Cache(), use_cache=True)
    assert cache[0]["recurrent_state"][1].tolist() == lens
    y = hidden(1, 3, seed=9)
    step, _, _ = m(y, cu_seqlens=torch.tensor([0, 1, 2, 3]), past_key_values=cache,
                   use_cache=True)
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        c = layers.Cache()
        alone, _, _ = m(xp[:, a:b], past_key_values=c, use_cache=True)
        assert _rel(out[:, a:b], alone) <= 1e-12
        one, _, _ = m(y[:, i:i + 1], past_key_values=c, use_cache=True)
        assert _rel(step[:, i], one[:, 0]) <= 1e-12


def test_layer_parameters_defaults_empty_input_and_bad_cache():
    m = LogLinearGatedDeltaNet(hidden_size=16, head_dim=4, num_heads=2)
    got = {k: list(v.shape) for k, v in m.state_dict().items()}
    gdn = {k: list(v.shape) for k, v in
           layers.GatedDeltaNet(hidden_size=16, head_dim=4, num_heads=2).state_dict().items()}
    assert got == {**gdn, "l_proj.weight": [2 * 15, 16], "L": [2, 15]}
    assert torch.equal(m.L, torch.ones(2, 15)) and m.L._no_weight_decay
    assert LogLinearGatedDeltaNet(hidden_size=16, head_dim=4, num_heads=2,
                                  max_position_embeddings=65536).num_levels == 17
    with pytest.raises(NotImplementedError, match="matrix_router"):
        LogLinearGatedDeltaNet(hidden_size=16, head_dim=4, num_heads=2, matrix_router=True)
    out, attn, _ = m(torch.randn(2, 3, 16))
    assert out.shape == (2, 3, 16) and out.dtype == torch.float32 and attn is None
    m = make()
    for shape in ((0, 4), (2, 0)):
        x = torch.zeros(*shape, HID, dtype=F64)
        out, _, cache = m(x, past_key_values=layers.Cache(), use_cache=True)
        assert out.shape == x.shape
        ht, off = cache[0]["recurrent_state"]
        assert ht.shape == (shape[0], 4, 6, 4, 6) and off.shape == (shape[0],)
    x = hidden(2, 3)
    _, _, cache = m(x, past_key_values=layers.Cache(), use_cache=True)
    bad = cache.clone()
    bad[0]["recurrent_state"] = bad[0]["recurrent_state"][0]  # a bare tensor, no offsets
    with pytest.raises(TypeError, match="tuple"):
        m(x[:, :1], past_key_values=bad, use_cache=True)
    with pytest.raises(ValueError, match="holds 2 sequences"):
        m(x[:1, :1], past_key_values=cache.clone(), use_cache=True)
    sub = cache.index_select(torch.tensor([1]))
    a, _, _ = m(x[1:, :1], past_key_values=sub, use_cache=True)
    b, _, _ = m(x[:, :1], past_key_values=cache.clone(), use_cache=True)
    assert _rel(a[0], b[1]) <= 1e-12

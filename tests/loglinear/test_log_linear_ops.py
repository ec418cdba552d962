"""chunk_log_linear_attn (chunked torch) and its decode form (fused_recurrent_log_linear_attn,
log_linear_attn_step) against the float64 token-by-token reference (reference.
log_linear_attn_ref): o, final state (ht, offsets) and every gradient (q, k, v, g, level_scales,
initial ht) through one (o*do).sum() + (ht*dht).sum() backward; dense / varlen (length-1 and
empty segments), grouped q/k, T = 1, T not a multiple of the chunk, few and many levels, initial
states at odd offsets, -inf and huge gates, decode == full forward, bad input."""
from __future__ import annotations

import math

import pytest
import torch

from lightning_ops import reference as R
from lightning_ops.loglinear import (LogLinearAttentionState, chunk_log_linear_attn,
                                     fused_recurrent_log_linear_attn, log_linear_attn_step)

F64 = torch.float64


def _rel(a, e):
    if e.numel() == 0 or not e.abs().max() > 0:
        return (a.double() - e.double()).abs().max().item() if e.numel() else 0.0
    return ((a.double() - e.double()).abs().max() / e.double().abs().max().clamp_min(1e-30)).item()


def _inputs(B, T, G, H, K, V, L, N, offsets=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=gen, dtype=F64)  # noqa: E731
    x = dict(q=rn(B, T, G, K), k=rn(B, T, G, K), v=rn(B, T, H, V),
             g=-0.5 * torch.rand(B, T, H, generator=gen, dtype=F64),
             level_scales=torch.rand(B, T, H, L, generator=gen, dtype=F64))
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


CASES = [  # B, T, G, H, K, V, L, chunk, lengths, offsets
    pytest.param(2, 37, 1, 3, 4, 5, 8, 4, None, None, id="dense-T37-C4"),
    pytest.param(2, 37, 1, 3, 4, 5, 3, 4, None, None, id="dense-few-levels"),
    pytest.param(1, 1, 1, 1, 2, 3, 4, 8, None, None, id="T1"),
    pytest.param(2, 19, 2, 4, 3, 2, 7, 8, None, [0, 0], id="gqa-zero-offsets"),
    pytest.param(2, 21, 1, 2, 3, 4, 9, 4, None, [13, 6], id="dense-offsets"),
    pytest.param(1, 30, 1, 2, 3, 2, 8, 4, [1, 0, 8, 21], None, id="varlen"),
    pytest.param(1, 30, 1, 2, 3, 2, 8, 4, [1, 0, 8, 21], [5, 0, 7, 16], id="varlen-offsets"),
    pytest.param(1, 24, 1, 1, 2, 2, 6, 64, None, [3], id="one-chunk-offset"),
]


@pytest.mark.parametrize("B,T,G,H,K,V,L,C,lengths,offsets", CASES)
def test_chunk_matches_reference_f64(B, T, G, H, K, V, L, C, lengths, offsets):
    cu = None if lengths is None else torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)))
    N = B if cu is None else len(lengths)
    x, h0 = _inputs(B, T, G, H, K, V, L, N, offsets)
    o_r, st_r, g_r = _run(R.log_linear_attn_ref, x, h0, cu, F64)
    o_c, st_c, g_c = _run(chunk_log_linear_attn, x, h0, cu, F64, chunk_size=C)
    assert isinstance(st_c, LogLinearAttentionState)
    assert _rel(o_c, o_r) <= 1e-10 and _rel(st_c.ht, st_r[0]) <= 1e-10
    assert st_c.offsets.tolist() == st_r[1].tolist()
    for n in g_r:
        assert torch.isfinite(g_c[n]).all(), n
        assert _rel(g_c[n], g_r[n]) <= 1e-10, (n, _rel(g_c[n], g_r[n]))


@pytest.mark.parametrize("fill", ["-inf", "huge", "strong"])
def test_extreme_gates_exact(fill):
    B, T, H, K, V, L = 2, 24, 2, 3, 3, 7
    x, h0 = _inputs(B, T, 1, H, K, V, L, B, [5, 12])
    g = x["g"]
    if fill == "-inf":
        g[0, 3, 0] = g[1, 9, 1] = g[0, 16:18, 1] = -math.inf
    elif fill == "huge":
        g[0, 3, 0] = g[1, 9, 1] = -1e4
    else:
        g.fill_(-20.0)
    o_r, st_r, g_r = _run(R.log_linear_attn_ref, x, h0, None, F64)
    o_c, st_c, g_c = _run(chunk_log_linear_attn, x, h0, None, F64, chunk_size=4)
    assert _rel(o_c, o_r) <= 1e-10 and _rel(st_c.ht, st_r[0]) <= 1e-10
    for n in g_r:
        assert torch.isfinite(g_c[n]).all(), n
        assert (g_c[n] - g_r[n]).abs().max() <= 1e-10 * g_r[n].abs().max().clamp_min(1e-300), n


def test_fp32_and_default_chunk():
    x, h0 = _inputs(2, 70, 1, 2, 8, 8, 9, 2, [0, 37])
    o_r, st_r = R.log_linear_attn_ref(**x, initial_state=h0, output_final_state=True)
    x32 = {n: t.float() for n, t in x.items()}
    o, st = chunk_log_linear_attn(**x32, initial_state=(h0[0].float(), h0[1]),
                                  output_final_state=True)
    assert o.dtype == torch.float32 and st.ht.dtype == torch.float32
    assert _rel(o, o_r) <= 1e-5 and _rel(st.ht, st_r[0]) <= 1e-5


@pytest.mark.parametrize("lengths", [None, [3, 0, 14, 1]])
def test_decode_equals_full_forward(lengths):
    """chunk over a prefix, then one log_linear_attn_step per token (O(log T) states), equals the
    chunked forward over the whole sequence; fused_recurrent equals it too, gradients included."""
    T, H, K, V, L = 18, 2, 3, 4, 7
    cu = None if lengths is None else torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)))
    B = 2 if cu is None else 1
    x, _ = _inputs(B, T, 1, H, K, V, L, B)
    o_full, st_full = chunk_log_linear_attn(**x, output_final_state=True, cu_seqlens=cu,
                                            chunk_size=4)
    o_rec, st_rec, g_rec = _run(fused_recurrent_log_linear_attn, x, None, cu, F64)
    _, _, g_chk = _run(chunk_log_linear_attn, x, None, cu, F64, chunk_size=4)
    assert _rel(o_rec, o_full) <= 1e-12 and _rel(st_rec[0], st_full.ht) <= 1e-12
    for n in g_chk:
        assert _rel(g_rec[n], g_chk[n]) <= 1e-10, n
    if cu is None:
        P = 7
        _, st = chunk_log_linear_attn(**{n: t[:, :P] for n, t in x.items()},
                                      output_final_state=True, chunk_size=4)
        for t in range(P, T):
            o_t, st = log_linear_attn_step(*(x[n][:, t] for n in ("q", "k", "v", "g",
                                                                  "level_scales")), st)
            assert _rel(o_t, o_full[:, t]) <= 1e-12
        assert _rel(st.ht, st_full.ht) <= 1e-12 and st.offsets.tolist() == [T, T]


def test_empty_and_bad_input():
    x, _ = _inputs(2, 0, 1, 2, 3, 3, 4, 2)
    o, st = chunk_log_linear_attn(**x, output_final_state=True)
    assert o.shape == (2, 0, 2, 3) and st.ht.shape == (2, 2, 4, 3, 3)
    x, _ = _inputs(2, 5, 1, 2, 3, 3, 4, 2)
    with pytest.raises(ValueError, match="level_scales"):
        chunk_log_linear_attn(**{**x, "level_scales": x["level_scales"][..., 0]})
    with pytest.raises(ValueError, match="g"):
        chunk_log_linear_attn(**{**x, "g": x["g"][:, :, :1]})
    with pytest.raises(ValueError, match="initial_state.ht"):
        chunk_log_linear_attn(**x, initial_state=(torch.zeros(2, 2, 3, 3, 3, dtype=F64),
                                                  torch.zeros(2, dtype=torch.int64)))
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_log_linear_attn(**x, chunk_size=6)


def test_hmamba_scan_matches_reference_composition():
    """Log-linear Mamba-2's scan (fla's hmamba_chunk_scan_combined) = the reference op on
    (q=C, k=B, v=x dt, g=A dt, lambda=softplus(L dl)) plus D x, gated by silu(z); gradients."""
    from lightning_ops.loglinear import hmamba_chunk_scan_combined
    gen = torch.Generator().manual_seed(5)
    rn = lambda *s: torch.randn(*s, generator=gen, dtype=F64)  # noqa: E731
    b, l, h, p, g_, n, ell = 2, 13, 2, 3, 1, 4, 6
    args = dict(x=rn(b, l, h, p), dt=rn(b, l, h), A=-torch.rand(h, generator=gen, dtype=F64),
                B=rn(b, l, g_, n), C=rn(b, l, g_, n), dl=rn(b, l, h, ell), L=rn(h, ell),
                D=rn(h), z=rn(b, l, h, p), dt_bias=rn(h))
    leaves = {k: t.clone().requires_grad_() for k, t in args.items()}
    y, st = hmamba_chunk_scan_combined(**leaves, chunk_size=4, dt_softplus=True,
                                       return_final_states=True)
    (y.sum() + st.ht.sum()).backward()
    ref = {k: t.clone().requires_grad_() for k, t in args.items()}
    dt = torch.nn.functional.softplus(ref["dt"] + ref["dt_bias"])
    o, rst = R.log_linear_attn_ref(ref["C"], ref["B"], ref["x"] * dt[..., None], ref["A"] * dt,
                                   torch.nn.functional.softplus(ref["L"] * ref["dl"]),
                                   output_final_state=True)
    yr = (o + ref["x"] * ref["D"][:, None]) * torch.nn.functional.silu(ref["z"])
    (yr.sum() + rst[0].sum()).backward()
    assert _rel(y, yr) <= 1e-10
    for k in args:
        assert _rel(leaves[k].grad, ref[k].grad) <= 1e-10, k


def test_fused_recurrent_empty_segment_state_matches_chunk():
    """An empty varlen segment's final state holds only the buckets that exist at its offset
    (the decode form returned the initial state's absent slots as they were)."""
    g_ = torch.Generator().manual_seed(3)
    T, H, K, V, L = 10, 2, 4, 3, 5
    q, k = (torch.randn(1, T, H, K, generator=g_, dtype=F64) for _ in range(2))
    v = torch.randn(1, T, H, V, generator=g_, dtype=F64)
    g = -torch.rand(1, T, H, generator=g_, dtype=F64)
    lam = torch.rand(1, T, H, L, generator=g_, dtype=F64)
    cu = torch.tensor([0, 4, 4, 10])
    h0 = LogLinearAttentionState(torch.randn(3, H, L, K, V, generator=g_, dtype=F64),
                                 torch.tensor([3, 5, 6]))
    o1, s1 = fused_recurrent_log_linear_attn(q, k, v, g, lam, h0, True, cu)
    o2, s2 = chunk_log_linear_attn(q, k, v, g, lam, h0, True, cu)
    assert torch.allclose(o1, o2, atol=1e-12) and torch.allclose(s1.ht, s2.ht, atol=1e-12)
    assert torch.equal(s1.offsets, s2.offsets)


def test_forced_kernel_backend_raises_not_silently_torch():
    """Log-linear attention has torch and triton paths, no cuda one: use_backend("cuda") must
    say so (the triton backend: tests/loglinear/test_log_linear_triton.py)."""
    from lightning_ops import BackendUnavailableError, use_backend
    q = torch.randn(1, 4, 1, 4)
    lam = torch.rand(1, 4, 1, 3)
    with use_backend("cuda"), pytest.raises(BackendUnavailableError, match="no cuda"):
        chunk_log_linear_attn(q, q, q, -torch.rand(1, 4, 1), lam)
    chunk_log_linear_attn(q, q, q, -torch.rand(1, 4, 1), lam)  # unforced: torch

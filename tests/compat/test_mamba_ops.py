"""mamba-ssm 2.3.2 / causal-conv1d 1.7.0 signatures (lightning_ops.compat) against the reference
and independent torch code, float64 on CPU."""
import pytest
import torch
import torch.nn.functional as F

import lightning_ops as lo
from lightning_ops import reference as R
from lightning_ops.compat import UnsupportedArgumentError
from lightning_ops.compat import _mamba as M

from helpers import assert_close, cu_seqlens_from_lengths

TOL = 1e-10
f64 = torch.float64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=_gen(seed), dtype=f64)


# ---------------------------------------------------------------------------------------------
# causal-conv1d
# ---------------------------------------------------------------------------------------------
def test_causal_conv1d_fn_positional_order_and_final_states_out():
    x, w, b = _rand(2, 3, 6), _rand(3, 4, seed=1), _rand(3, seed=2)
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.int32)
    # causal-conv1d: (x, weight, bias, seq_idx, initial_states, return_final_states,
    #                 final_states_out, activation)
    out = M.causal_conv1d_fn(x, w, b, seq_idx, None, False, None, "silu")
    ref = lo.causal_conv1d_fn(x, w, b, activation="silu", seq_idx=seq_idx)
    assert torch.equal(out, ref)
    h0 = _rand(2, 3, 3, seed=3)
    buf = torch.full((2, 3, 3), float("nan"), dtype=f64)
    out, fin = M.causal_conv1d_fn(x, w, b, None, h0, True, buf, "swish")
    out_ref, fin_ref = R.causal_conv1d_ref(x, w, b, h0, True, "silu")
    assert fin is buf
    assert_close("out", out, out_ref, TOL)
    assert_close("final", fin, fin_ref, TOL)
    with pytest.raises(NotImplementedError, match="activation"):
        M.causal_conv1d_fn(x, w, activation="relu")


@pytest.mark.parametrize("activation", [None, "silu"])
def test_causal_conv1d_fn_seq_idx_padding_outputs_zero(activation):
    """Regression (causal-conv1d tests/test_causal_conv1d.py test_causal_conv1d_varlen_padding):
    a token with seq_idx < 0 is padding and its output is exactly 0 (not the bias, not a
    window over the other padding tokens), as causal-conv1d's kernel (#78). The other tokens
    see only their own sequence; gradients follow (no padding output feeds back)."""
    b, d, L, W = 2, 3, 9, 4
    x, w, bias = _rand(b, d, L).requires_grad_(), _rand(d, W, seed=1), _rand(d, seed=2)
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, -1, -1, -1, -1],
                            [-1, -1, 2, 2, 2, 2, 3, -1, 3]], dtype=torch.int32)
    out = M.causal_conv1d_fn(x, w, bias, seq_idx, activation=activation)
    pad = (seq_idx < 0)[:, None].expand(b, d, L)
    assert torch.equal(out[pad], torch.zeros_like(out[pad]))
    # the reference, written out: each real token's window over its own sequence only
    ref = torch.zeros_like(out)
    for i in range(b):
        for t in range(L):
            s = int(seq_idx[i, t])
            if s < 0:
                continue
            acc = bias.clone()
            for j in range(W):
                u = t - (W - 1) + j
                if u >= 0 and int(seq_idx[i, u]) == s:
                    acc = acc + w[:, j] * x[i, :, u]
            ref[i, :, t] = F.silu(acc) if activation else acc
    assert_close("out", out, ref, TOL)
    g = _rand(b, d, L, seed=3)
    (dx,) = torch.autograd.grad((out * g).sum(), x)
    (dx_ref,) = torch.autograd.grad((ref * g).sum(), x)
    assert_close("dx", dx, dx_ref, TOL)


def _ring_update_ref(x, conv_state, weight, bias, activation, cache_seqlens):
    """causal-conv1d's circular-buffer update, written out token by token."""
    b, d, L = x.shape
    S, W = conv_state.shape[-1], weight.shape[-1]
    out = torch.empty_like(x)
    for i in range(b):
        c = int(cache_seqlens[i])
        hist = [conv_state[i, :, (c - (W - 1) + j) % S].clone() for j in range(W - 1)]
        for t in range(L):
            conv_state[i, :, (c + t) % S] = x[i, :, t]
            win = torch.stack(hist + [x[i, :, t]], -1)
            o = (win * weight).sum(-1) + (0 if bias is None else bias)
            out[i, :, t] = F.silu(o) if activation else o
            hist = hist[1:] + [x[i, :, t]]
    return out


@pytest.mark.parametrize("L", [1, 3, 7])
def test_causal_conv1d_update_circular(L):
    b, d, S, W = 3, 4, 5, 4
    x, w, bias = _rand(b, d, L), _rand(d, W, seed=1), _rand(d, seed=2)
    st = _rand(b, d, S, seed=3)
    cache = torch.tensor([0, 2, 9], dtype=torch.int32)
    st_ref = st.clone()
    out_ref = _ring_update_ref(x, st_ref, w, bias, "silu", cache)
    out = M.causal_conv1d_update(x, st, w, bias, "silu", cache)
    assert_close("out", out, out_ref, TOL)
    assert_close("state", st, st_ref, TOL)
    # x [B, D] form
    st2 = _rand(b, d, S, seed=3)
    out1 = M.causal_conv1d_update(x[..., 0], st2, w, bias, None, cache)
    assert out1.shape == (b, d)


def test_causal_conv1d_update_state_indices_with_padding():
    b, d, W, pool = 3, 4, 3, 5
    x, w = _rand(b, d), _rand(d, W, seed=1)
    states = _rand(pool, d, W - 1, seed=2)
    idx = torch.tensor([4, -1, 1], dtype=torch.int32)
    before = states.clone()
    out = M.causal_conv1d_update(x, states, w, None, "silu", None, idx)
    sub = before[[4, 1]].clone()
    out_ref = R.causal_conv1d_update_ref(x[[0, 2]], sub, w, None, "silu")
    assert_close("out", out[[0, 2]], out_ref, TOL)
    assert torch.equal(out[1], torch.zeros(d, dtype=f64))          # padding row
    assert_close("state rows", states[[4, 1]], sub, TOL)
    for r in (0, 2, 3):                                             # untouched rows
        assert torch.equal(states[r], before[r])
    # every row padding: nothing moves
    st = before.clone()
    M.causal_conv1d_update(x, st, w, None, None, None, torch.full((b,), -1, dtype=torch.int64))
    assert torch.equal(st, before)


# ---------------------------------------------------------------------------------------------
# mamba-ssm: selective scan and mamba_inner_fn
# ---------------------------------------------------------------------------------------------
def test_selective_scan_fixed_B_C():
    b, d, n, L = 2, 3, 4, 5
    u, delta = _rand(b, d, L), _rand(b, d, L, seed=1).sigmoid()
    A = -_rand(d, n, seed=2).exp()
    Bf, Cf = _rand(d, n, seed=3), _rand(d, n, seed=4)
    y, last = M.selective_scan_fn(u, delta, A, Bf, Cf, return_last_state=True)
    Bx = Bf[None, :, :, None].expand(b, d, n, L)                    # one group per channel
    Cx = Cf[None, :, :, None].expand(b, d, n, L)
    y_ref, last_ref = R.selective_scan_ref(u, delta, A, Bx, Cx, return_last_state=True)
    assert_close("y", y, y_ref, TOL)
    assert_close("last", last, last_ref, TOL)


# complex A (S4D-style, mamba-ssm's layout): variable B / C real [b, (G,) N, 2L] holding
# (real, imag) pairs interleaved along L; y = 2 Re(C . h); the last state is complex
def _pairs(X):
    """complex [..., L] -> mamba-ssm's real [..., 2L] (real, imag interleaved)."""
    return torch.view_as_real(X).flatten(-2)


@pytest.mark.parametrize("bc", ["variable", "grouped", "fixed"])
def test_selective_scan_complex_A_on_the_real_axis_is_twice_the_real_scan(bc):
    """Independent of the complex code: with Im A = Im B = Im C = 0 every state is real and
    each of the N complex states stands for a conjugate pair, so y = 2 y_real (+ D u)."""
    b, d, n, L = 2, 4, 3, 7
    u, delta, z = _rand(b, d, L), _rand(b, d, L, seed=1).sigmoid(), _rand(b, d, L, seed=2)
    A = -_rand(d, n, seed=3).exp()
    shape = {"variable": (b, n, L), "grouped": (b, 2, n, L), "fixed": (d, n)}[bc]
    B, C = _rand(*shape, seed=4), _rand(*shape, seed=5)
    D = _rand(d, seed=6)
    y_real, last_real = M.selective_scan_fn(u, delta, A, B, C, None, z, None, True, True)

    def cplx(X):
        Xc = X.to(torch.complex128)
        return Xc if bc == "fixed" else _pairs(Xc)

    y, last = M.selective_scan_fn(u, delta, A.to(torch.complex128), cplx(B), cplx(C), D, z,
                                  None, True, True)
    assert y.dtype == f64 and last.dtype == torch.complex128
    assert_close("y", y, 2 * y_real + D[:, None] * u * F.silu(z), TOL)
    assert_close("last", torch.view_as_real(last),
                 torch.view_as_real(last_real.to(torch.complex128)), TOL)


def test_selective_scan_complex_A_closed_form():
    """One channel, one state, against the closed form
    h_t = sum_{s <= t} exp(A sum_{s < r <= t} delta_r) delta_s u_s B_s, y_t = 2 Re(C_t h_t),
    and torch.autograd.gradcheck through u, delta, A (complex) and the paired B."""
    L = 6
    u, delta = _rand(1, 1, L), _rand(1, 1, L, seed=1).sigmoid()
    A = torch.complex(-_rand(1, 1, seed=2).exp(), _rand(1, 1, seed=3))
    Bc = torch.complex(_rand(1, 1, L, seed=4), _rand(1, 1, L, seed=5))
    Cc = torch.complex(_rand(1, 1, L, seed=6), _rand(1, 1, L, seed=7))
    y, last = M.selective_scan_fn(u, delta, A, _pairs(Bc), _pairs(Cc), return_last_state=True)
    cum = torch.cumsum(delta[0, 0], 0)
    t, s = torch.arange(L)[:, None], torch.arange(L)[None, :]
    decay = torch.exp(A[0, 0] * (cum[:, None] - cum[None, :])) * (s <= t)
    h = decay @ (delta[0, 0] * u[0, 0] * Bc[0, 0]).to(torch.complex128)
    assert_close("y", y[0, 0], 2 * (h * Cc[0, 0]).real, TOL)
    assert_close("last", torch.view_as_real(last[0, 0, 0]), torch.view_as_real(h[-1]), TOL)

    def f(u_, delta_, A_, B_):
        return M.selective_scan_fn(u_, delta_, A_, B_, _pairs(Cc), return_last_state=True)
    torch.autograd.gradcheck(f, (u.requires_grad_(), delta.requires_grad_(),
                                 A.requires_grad_(), _pairs(Bc).requires_grad_()))


def test_selective_scan_complex_A_bad_inputs():
    b, d, n, L = 1, 2, 3, 4
    u, delta = _rand(b, d, L), _rand(b, d, L, seed=1).sigmoid()
    A = torch.complex(-_rand(d, n, seed=2).exp(), _rand(d, n, seed=3))
    B = _rand(b, n, 2 * L, seed=4)
    with pytest.raises(ValueError, match=r"B must have shape \[B, N, 2L\] = \[1, 3, 8\].*"
                                         r"got \[1, 3, 4\]"):
        M.selective_scan_fn(u, delta, A, B[..., :L], B)
    with pytest.raises(TypeError, match="C must be a real float tensor"):
        M.selective_scan_fn(u, delta, A, B, B.to(torch.complex128))
    with pytest.raises(ValueError, match=r"C must have shape \[D, N\] = \[2, 3\]"):
        M.selective_scan_fn(u, delta, A, B, A[:, :2])
    with pytest.raises(ValueError, match=r"delta must have shape \[B, D, L\]"):
        M.selective_scan_fn(u, delta[..., :2], A, B, B)


@pytest.mark.parametrize("var_shape", [(2, 4, 5), (2, 1, 4, 5), (2, 3, 4, 5)])
@pytest.mark.parametrize("fixed", ["B", "C"])
def test_selective_scan_one_fixed_one_variable(fixed, var_shape):
    """Regression (mamba-ssm tests/ops/test_selective_scan.py test_mamba_inner_fn, a fixed
    [D, N] B with a projected [b, N, L] C and vice versa): our op takes B and C in one
    layout, the mixed pair raised "C must have B's shape". Gradients reach both."""
    b, d, n, L = 2, 6, 4, 5
    u, delta = _rand(b, d, L).requires_grad_(), _rand(b, d, L, seed=1).sigmoid()
    A = -_rand(d, n, seed=2).exp()
    F_ = _rand(d, n, seed=3).requires_grad_()
    V = _rand(*var_shape, seed=4).requires_grad_()
    Bm, Cm = (F_, V) if fixed == "B" else (V, F_)
    y, last = M.selective_scan_fn(u, delta, A, Bm, Cm, return_last_state=True)
    # written out: the fixed one per channel, the variable one's group c // (D / G)
    Fx = F_[None, :, :, None].expand(b, d, n, L)
    Vg = V if V.dim() == 4 else V[:, None]
    Vx = Vg.repeat_interleave(d // Vg.shape[1], dim=1)
    Bx, Cx = (Fx, Vx) if fixed == "B" else (Vx, Fx)
    y_ref, last_ref = R.selective_scan_ref(u, delta, A, Bx, Cx, return_last_state=True)
    assert_close("y", y, y_ref, TOL)
    assert_close("last", last, last_ref, TOL)
    g = _rand(b, d, L, seed=5)
    grads = torch.autograd.grad((y * g).sum(), (u, F_, V))
    grads_ref = torch.autograd.grad((y_ref * g).sum(), (u, F_, V))
    for name, a, r in zip(("du", "dfixed", "dvariable"), grads, grads_ref):
        assert_close(name, a, r, TOL)


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


@pytest.mark.parametrize("fixed", [None, "B", "C"])
def test_mamba_inner_fn_complex_A(fixed):
    """A complex A: x_proj yields (real, imag) column pairs for B / C (2N columns each), as
    mamba-ssm lays them out; the same block composed by hand over the scan."""
    b, d_model, d, n, r, W, L = 2, 6, 4, 3, 2, 4, 5
    xz = _rand(b, 2 * d, L)
    conv_w, conv_b = _rand(d, 1, W, seed=1), _rand(d, seed=2)
    x_proj = _rand(r + (1 if fixed else 2) * 2 * n, d, seed=3)
    cf = torch.complex(_rand(d, n, seed=13), _rand(d, n, seed=15))
    Bf, Cf = (cf if fixed == "B" else None), (cf if fixed == "C" else None)
    dt_proj = _rand(d, r, seed=4)
    out_w, out_b = _rand(d_model, d, seed=5), _rand(d_model, seed=6)
    A = torch.complex(-_rand(d, n, seed=7).exp(), _rand(d, n, seed=16))
    D, dt_bias = _rand(d, seed=8), _rand(d, seed=9)
    out = M.mamba_inner_fn(xz, conv_w, conv_b, x_proj, dt_proj, out_w, out_b, A, Bf, Cf, D,
                           dt_bias)
    x, z = xz.chunk(2, dim=1)
    x = R.causal_conv1d_ref(x, conv_w[:, 0], conv_b, activation="silu")
    dbl = x.transpose(1, 2) @ x_proj.t()                            # b l (r + ...)
    delta = (dbl[..., :r] @ dt_proj.t()).transpose(1, 2)

    def cols(start):                                                # b l 2n -> b 1 n l complex
        M2 = dbl[..., start:start + 2 * n].reshape(b, L, n, 2)
        return torch.view_as_complex(M2.contiguous()).transpose(1, 2)[:, None]
    Bm = cols(r) if Bf is None else Bf[None, :, :, None].expand(b, d, n, L)
    Cm = cols(dbl.shape[-1] - 2 * n) if Cf is None else Cf[None, :, :, None].expand(b, d, n, L)
    y = R.selective_scan_ref(x, delta, A, Bm, Cm, D, z, dt_bias, True)
    ref = y.transpose(1, 2) @ out_w.t() + out_b
    assert_close("out", out, ref, TOL)


@pytest.mark.parametrize("rms,fixed", [(False, None), (True, None), (False, "B"),
                                        (False, "C")])
def test_mamba_inner_fn(rms, fixed):
    b, d_model, d, n, r, W, L = 2, 6, 4, 3, 2, 4, 5
    xz = _rand(b, 2 * d, L)
    conv_w, conv_b = _rand(d, 1, W, seed=1), _rand(d, seed=2)
    x_proj = _rand(r + (1 if fixed else 2) * n, d, seed=3)
    Bf = _rand(d, n, seed=13) if fixed == "B" else None       # input-independent B or C
    Cf = _rand(d, n, seed=14) if fixed == "C" else None
    dt_proj = _rand(d, r, seed=4)
    out_w, out_b = _rand(d_model, d, seed=5), _rand(d_model, seed=6)
    A = -_rand(d, n, seed=7).exp()
    D, dt_bias = _rand(d, seed=8), _rand(d, seed=9)
    bw, cw, dw = (_rand(n, seed=10), _rand(n, seed=11), _rand(d, seed=12)) if rms else \
        (None, None, None)
    out = M.mamba_inner_fn(xz, conv_w, conv_b, x_proj, dt_proj, out_w, out_b, A, Bf, Cf, D,
                           dt_bias, None, None, True, 1, bw, cw, dw, 1e-6)
    # the same block written plainly over the reference ops
    x, z = xz.chunk(2, dim=1)
    x = R.causal_conv1d_ref(x, conv_w[:, 0], conv_b, activation="silu")
    xt = x.transpose(1, 2)                                          # b l d
    dbl = xt @ x_proj.t()
    delta = dbl[..., :r] @ dt_proj.t()                              # b l d
    Bm, Cm = dbl[..., r:r + n], dbl[..., dbl.shape[-1] - n:]
    if rms:
        delta, Bm, Cm = _rms(delta, dw, 1e-6), _rms(Bm, bw, 1e-6), _rms(Cm, cw, 1e-6)
    Bm, Cm = Bm.transpose(1, 2)[:, None], Cm.transpose(1, 2)[:, None]      # b 1 n l
    if fixed == "B":
        Bm, Cm = Bf[None, :, :, None].expand(b, d, n, L), Cm.expand(b, d, n, L)
    if fixed == "C":
        Bm, Cm = Bm.expand(b, d, n, L), Cf[None, :, :, None].expand(b, d, n, L)
    y = R.selective_scan_ref(x, delta.transpose(1, 2), A, Bm, Cm, D, z, dt_bias, True)
    ref = y.transpose(1, 2) @ out_w.t() + out_b
    assert out.shape == (b, L, d_model)
    assert_close("out", out, ref, TOL)


# ---------------------------------------------------------------------------------------------
# mamba-ssm: Mamba-2 SSD with mamba-ssm's cu_seqlens / seq_idx / state_dtype semantics
# ---------------------------------------------------------------------------------------------
def _ssd_inputs(b=1, l=9, h=2, p=3, g=1, n=4):
    x = _rand(b, l, h, p)
    dt = _rand(b, l, h, seed=1)
    A = -_rand(h, seed=2).exp()
    B, C = _rand(b, l, g, n, seed=3), _rand(b, l, g, n, seed=4)
    return x, dt, A, B, C


def test_ssd_cu_seqlens_only_for_varlen_states():
    x, dt, A, B, C = _ssd_inputs()
    cu = cu_seqlens_from_lengths([4, 5])
    # mamba-ssm ignores cu_seqlens unless return_varlen_states: no reset at 4
    y = M.mamba_chunk_scan_combined(x, dt, A, B, C, 4, cu_seqlens=cu, dt_softplus=True)
    y_ref, _ = R.ssd_ref(x, dt, A, B, C, dt_softplus=True)
    assert_close("y", y, y_ref, TOL)
    seq_idx = torch.tensor([[0] * 4 + [1] * 5], dtype=torch.int32)
    y, fin, var = M.mamba_chunk_scan_combined(x, dt, A, B, C, 4, seq_idx=seq_idx, cu_seqlens=cu,
                                              dt_softplus=True, return_final_states=True,
                                              return_varlen_states=True)
    y_ref, var_ref = R.ssd_ref(x, dt, A, B, C, cu_seqlens=cu, dt_softplus=True)
    assert_close("y varlen", y, y_ref, TOL)
    assert_close("varlen states", var, var_ref, TOL)
    assert_close("final", fin, var_ref[-1:], TOL)
    y2, var2 = M.mamba_chunk_scan_combined(x, dt, A, B, C, 4, seq_idx=seq_idx, cu_seqlens=cu,
                                           dt_softplus=True, return_varlen_states=True)
    assert torch.equal(var2, var)
    with pytest.raises(UnsupportedArgumentError, match="seq_idx"):
        M.mamba_chunk_scan_combined(x, dt, A, B, C, 4, cu_seqlens=cu, return_varlen_states=True)
    with pytest.raises(UnsupportedArgumentError, match="initial_states"):
        M.mamba_chunk_scan_combined(x, dt, A, B, C, 4, seq_idx=seq_idx, cu_seqlens=cu,
                                    initial_states=_rand(1, 2, 3, 4),
                                    return_varlen_states=True)


def test_ssd_state_dtype_and_initial_state_of_sequence_zero():
    x, dt, A, B, C = _ssd_inputs(b=2)
    h0 = _rand(2, 2, 3, 4, seed=5)
    y, fin = M.mamba_chunk_scan_combined(x, dt, A, B, C, 8, initial_states=h0,
                                         return_final_states=True)
    assert fin.dtype == C.dtype                                     # mamba-ssm: C's dtype
    y_ref, fin_ref = R.ssd_ref(x, dt, A, B, C, initial_states=h0)
    assert_close("y", y, y_ref, TOL)
    assert_close("final", fin, fin_ref, TOL)
    _, fin32 = M.mamba_chunk_scan_combined(x, dt, A, B, C, 8, initial_states=h0,
                                           return_final_states=True, state_dtype=torch.float32)
    assert fin32.dtype == torch.float32
    # the initial state reaches sequence id 0 only (row 1 starts at id 1: dropped)
    seq_idx = torch.tensor([[0] * 9, [1] * 9], dtype=torch.int32)
    y = M.mamba_chunk_scan_combined(x, dt, A, B, C, 8, initial_states=h0, seq_idx=seq_idx)
    h0_eff = h0.clone()
    h0_eff[1] = 0
    assert_close("y seq_idx", y, R.ssd_ref(x, dt, A, B, C, initial_states=h0_eff)[0], TOL)
    with pytest.raises(TypeError, match="state_dtype"):
        M.mamba_chunk_scan_combined(x, dt, A, B, C, 8, state_dtype="float32")


def test_selective_state_update_batch_indices():
    pool, b, h, p, n = 4, 3, 2, 3, 4
    state = _rand(pool, h, p, n)
    x, dt = _rand(b, h, p, seed=1), _rand(b, h, p, seed=2)
    A = -_rand(h, p, n, seed=3).exp()
    B, C = _rand(b, 1, n, seed=4), _rand(b, 1, n, seed=5)
    D, z, dt_bias = _rand(h, p, seed=6), _rand(b, h, p, seed=7), _rand(h, p, seed=8)
    idx = torch.tensor([2, -1, 0])
    before = state.clone()
    out = M.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, True, idx)
    sub = before[[2, 0]].clone()
    out_ref = R.selective_state_update_ref(sub, x[[0, 2]], dt[[0, 2]], A, B[[0, 2]],
                                           C[[0, 2]], D, z[[0, 2]], dt_bias, True)
    assert_close("out", out[[0, 2]], out_ref, TOL)
    assert torch.equal(out[1], torch.zeros(h, p, dtype=f64))
    assert_close("rows", state[[2, 0]], sub, TOL)
    assert torch.equal(state[[1, 3]], before[[1, 3]])
    # without indices: plain in-place update, as ours
    st1, st2 = before[:3].clone(), before[:3].clone()
    o1 = M.selective_state_update(st1, x, dt, A, B, C, D, z, dt_bias, True)
    o2 = lo.selective_state_update(st2, x, dt, A, B, C, D, z, dt_bias, True)
    assert torch.equal(o1, o2) and torch.equal(st1, st2)


# ---------------------------------------------------------------------------------------------
# mamba-ssm: mamba_split_conv1d_scan_combined (Mamba-2's block after in_proj; what mamba-ssm's
# Mamba2 and Hugging Face's Mamba-2 family call in training)
# ---------------------------------------------------------------------------------------------
def _mamba2_layer(d_ssm, ngroups, rmsnorm, norm_before_gate, D_has_hdim):
    layers = pytest.importorskip("lightning_ops.layers")
    torch.manual_seed(0)
    m = layers.Mamba2(d_model=12, d_state=4, d_conv=4, expand=2, headdim=4, d_ssm=d_ssm,
                      ngroups=ngroups, rmsnorm=rmsnorm, norm_before_gate=norm_before_gate,
                      D_has_hdim=D_has_hdim, dt_limit=(0.0, 0.3), bias=True, chunk_size=8,
                      dtype=f64).to(f64)  # A_log, D, dt_bias too (float32 by default)
    with torch.no_grad():  # away from the init's ones / zeros, so every term shows
        for p in (m.D, m.conv1d.bias) + ((m.norm.weight,) if rmsnorm else ()):
            p.copy_(torch.randn(p.shape, generator=_gen(7), dtype=f64))
    return m


def _split_call(m, zxbcdt, **kw):
    return M.mamba_split_conv1d_scan_combined(
        zxbcdt, m.conv1d.weight[:, 0], m.conv1d.bias, m.dt_bias, -m.A_log.exp(),
        m.D.view(m.nheads, m.headdim) if m.D_has_hdim else m.D, m.chunk_size, dt_limit=m.dt_limit, activation="silu",
        rmsnorm_weight=m.norm.weight if m.rmsnorm else None,
        rmsnorm_eps=m.norm.eps if m.rmsnorm else 1e-6, outproj_weight=m.out_proj.weight,
        outproj_bias=m.out_proj.bias, headdim=None if m.D_has_hdim else m.headdim,
        ngroups=m.ngroups, norm_before_gate=m.norm_before_gate, **kw)


@pytest.mark.parametrize("d_ssm,ngroups,rmsnorm,nbg,hdim", [
    (24, 1, True, False, False),    # Mamba2's defaults
    (16, 2, True, True, True),      # a zx0 gated-MLP part (d_ssm < d_inner), grouped norm
    (24, 3, False, False, False),   # no norm: the z gate inside the scan
])
def test_split_conv1d_scan_combined_is_the_mamba2_block(d_ssm, ngroups, rmsnorm, nbg, hdim):
    """Against our Mamba2 layer (its own composition: in_proj split, ShortConvolution, SSD,
    grouped gated RMSNorm, the gated MLP part, out_proj), outputs and every gradient."""
    m = _mamba2_layer(d_ssm, ngroups, rmsnorm, nbg, hdim)
    u = torch.randn(2, 11, 12, generator=_gen(1), dtype=f64, requires_grad=True)
    ref = m(u)
    out = _split_call(m, m.in_proj(u))
    assert_close("out", out, ref, TOL)
    g = torch.randn(ref.shape, generator=_gen(2), dtype=f64)
    params = [u] + [p for p in m.parameters()]
    got = torch.autograd.grad((out * g).sum(), params, allow_unused=True)
    want = torch.autograd.grad((ref * g).sum(), params, allow_unused=True)
    for i, (a, r) in enumerate(zip(got, want)):
        assert (a is None) == (r is None), i
        if a is not None:
            assert_close(f"grad {i}", a, r, TOL)


def test_split_conv1d_scan_combined_seq_idx_and_states():
    """seq_idx resets the conv taps and the state; initial_states reach sequence id 0; the
    final states are the SSD's (checked against the layer run per segment)."""
    m = _mamba2_layer(24, 1, True, False, False)
    u = torch.randn(1, 13, 12, generator=_gen(3), dtype=f64)
    zx = m.in_proj(u)
    seq_idx = torch.tensor([[0] * 6 + [1] * 7], dtype=torch.int32)
    out = _split_call(m, zx, seq_idx=seq_idx)
    parts = torch.cat([_split_call(m, zx[:, :6]), _split_call(m, zx[:, 6:])], dim=1)
    assert_close("out", out, parts, TOL)
    h0 = torch.randn(1, 6, 4, 4, generator=_gen(4), dtype=f64)
    out, fin = _split_call(m, zx, initial_states=h0, return_final_states=True)
    # the final state written out: the conv and the SSD token loop of the spec
    xBC = R.causal_conv1d_ref(zx[..., 24:56].transpose(1, 2), m.conv1d.weight[:, 0],
                              m.conv1d.bias, activation="silu").transpose(1, 2)
    x, B, C = xBC.split([24, 4, 4], dim=-1)
    _, fin_ref = R.ssd_ref(x.reshape(1, 13, 6, 4), zx[..., 56:], -m.A_log.exp(),
                           B.reshape(1, 13, 1, 4), C.reshape(1, 13, 1, 4), m.D,
                           dt_bias=m.dt_bias, initial_states=h0, dt_softplus=True,
                           dt_limit=m.dt_limit)
    assert_close("final", fin, fin_ref, TOL)
    assert_close("out", out[:, :5], _split_call(m, zx[:, :5], initial_states=h0), TOL)
    _, fin32 = _split_call(m, zx, initial_states=h0, return_final_states=True,
                           state_dtype=torch.float32)
    assert fin.dtype == f64 and fin32.dtype == torch.float32


def test_split_conv1d_scan_ref_and_errors():
    from lightning_ops.compat._refs import mamba_split_conv1d_scan_ref
    m = _mamba2_layer(24, 1, True, False, False)
    u = torch.randn(2, 9, 12, generator=_gen(5), dtype=f64)
    zx = m.in_proj(u)
    args = (zx, m.conv1d.weight[:, 0], m.conv1d.bias, m.dt_bias, -m.A_log.exp(), m.D, 8)
    kw = dict(dt_limit=m.dt_limit, rmsnorm_weight=m.norm.weight, rmsnorm_eps=m.norm.eps,
              outproj_weight=m.out_proj.weight, outproj_bias=m.out_proj.bias, headdim=4,
              norm_before_gate=False)
    assert_close("ref", mamba_split_conv1d_scan_ref(*args, **kw),
                 M.mamba_split_conv1d_scan_combined(*args, **kw), TOL)
    with pytest.raises(ValueError, match=r"headdim must be given when D has shape \[nheads\]"):
        M.mamba_split_conv1d_scan_combined(*args)
    with pytest.raises(ValueError, match=r"zxbcdt must have shape \[batch, seqlen, 2 \* d_nonssm"):
        M.mamba_split_conv1d_scan_combined(zx[..., 1:], *args[1:], headdim=4)
    with pytest.raises(ValueError, match=r"A must have shape \[nheads\] = \[6\], got \[5\]"):
        M.mamba_split_conv1d_scan_combined(*args[:4], args[4][:5], *args[5:], headdim=4)
    with pytest.raises(ValueError, match=r"ngroups must divide nheads = 6, got 4"):
        M.mamba_split_conv1d_scan_combined(*args, headdim=4, ngroups=4)


def test_selective_scan_delta_softplus_none_is_false():
    """mamba-ssm's own ssd_selective_scan passes delta_softplus=None (its CUDA binding reads it
    as False)."""
    b, d, n, L = 1, 2, 3, 4
    u, delta = _rand(b, d, L), _rand(b, d, L, seed=1).sigmoid()
    A, B = -_rand(d, n, seed=2).exp(), _rand(b, n, L, seed=3)
    assert torch.equal(M.selective_scan_fn(u, delta, A, B, B, delta_softplus=None),
                       M.selective_scan_fn(u, delta, A, B, B, delta_softplus=False))


def test_ssd_combined_module_references():
    """mamba-ssm's other ssd_combined names: mamba_chunk_scan (the unfused SSD) is the op;
    ssd_chunk_scan_combined_ref the spec; ssd_selective_scan the SSD as Mamba-1's scan per
    channel (A in float32, as mamba-ssm's), also with per-channel dt / dt_bias and an [h * p, n]
    A; mamba_conv1d_scan_ref the conv and the SSD."""
    from lightning_ops.compat import _refs as Rf
    b, l, h, p, g, n = 2, 13, 4, 3, 2, 5
    x, dt, A = _rand(b, l, h, p), _rand(b, l, h, seed=1).sigmoid(), -_rand(h, seed=2).exp()
    B, C = _rand(b, l, g, n, seed=3), _rand(b, l, g, n, seed=4)
    D, z, db = _rand(h, p, seed=5), _rand(b, l, h, p, seed=6), _rand(h, seed=7)
    y_ref, _ = R.ssd_ref(x, dt, A, B, C, D=D, z=z, dt_bias=db, dt_softplus=True)
    assert_close("mamba_chunk_scan", M.mamba_chunk_scan(x, dt, A, B, C, 8, D, z, db, True),
                 y_ref, TOL)
    assert_close("ssd_chunk_scan_combined_ref",
                 Rf.ssd_chunk_scan_combined_ref(x, dt, A, B, C, 8, D, z, db, True), y_ref, TOL)
    A32 = A.float().double()
    y32, _ = R.ssd_ref(x, dt, A32, B, C, D=D, z=z, dt_bias=db, dt_softplus=True,
                       dt_limit=(0.0, 0.6))
    assert_close("ssd_selective_scan",
                 Rf.ssd_selective_scan(x, dt, A, B, C, D, z, db, True, (0.0, 0.6)), y32, TOL)
    Ahpn = A32[:, None, None].expand(h, p, n).reshape(h * p, n)
    got = Rf.ssd_selective_scan(x, dt[..., None].expand(b, l, h, p), Ahpn, B, C, D, z,
                                db[:, None].expand(h, p), True)
    y32, _ = R.ssd_ref(x, dt, A32, B, C, D=D, z=z, dt_bias=db, dt_softplus=True)
    assert_close("ssd_selective_scan per channel", got, y32, TOL)
    xBC = _rand(b, l, h * p + 2 * g * n, seed=8)
    w, cb = _rand(h * p + 2 * g * n, 4, seed=9), _rand(h * p + 2 * g * n, seed=10)
    conv = R.causal_conv1d_ref(xBC.transpose(1, 2), w, cb, activation="silu").transpose(1, 2)
    xs, Bs, Cs = conv.split([h * p, g * n, g * n], dim=-1)
    want, _ = R.ssd_ref(xs.reshape(b, l, h, p), dt, A, Bs.reshape(b, l, g, n),
                        Cs.reshape(b, l, g, n), D=D, z=z, dt_bias=db, dt_softplus=True)
    got = Rf.mamba_conv1d_scan_ref(xBC, w, cb, dt, A, 8, D, z.reshape(b, l, h * p), db, True,
                                   ngroups=g)
    assert_close("mamba_conv1d_scan_ref", got, want.reshape(b, l, h * p), TOL)

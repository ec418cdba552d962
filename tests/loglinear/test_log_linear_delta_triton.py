"""Triton forward of chunk_log_linear_gated_delta_rule (lightning_ops/loglinear/triton_delta.py;
the op's backward then recomputes the torch forward under autograd) against the float64
reference (reference.log_linear_gated_delta_rule_ref).

CPU: under TRITON_INTERPRET=1 in fp32, through the public op with the triton backend forced and
every torch.empty NaN-filled (unwritten outputs and scratch fail): o and the final state within
1e-5 relative RMS, the next offsets exact, and, in the cases marked so, the gradients of one
(o*do).sum() + (ht*dht).sum() backward (the torch recompute after the triton forward) within
1e-4 (the fp32 torch backward's own accuracy) and equal, bit for bit, to those after a torch
forward. Shapes: T = 1, T < C, T not a multiple of C, several chunk levels (T = 300, C = 16),
L below and above what T reaches, B = H = 1, K != V, K and V not powers of two and over one
64-wide block, grouped value heads (H = 2 G), varlen with length-1 and empty segments, initial
states at offsets 5, 37 and 4133 (every slot random: the absent ones must be ignored), the final
state on and off, the in-kernel q/k l2 norm, gates of -20 per token, -1e4 and -inf.
Also: backend choice, float64 forced onto triton, empty inputs, non-finite inputs (the
NonFiniteGuard), torch.compile(fullgraph=True) through the op on the triton backend.
GPU (@pytest.mark.gpu): bf16 parity (helpers.lowp_bound against the torch backend in bf16) at
K = V = 128 and K = 256, V = 512 (also in tests/gpu/test_large_head_dims.py).
"""
from __future__ import annotations


import pytest
import torch

import lightning_ops as lo
from lightning_ops import reference as R
from lightning_ops.loglinear import chunk_log_linear_gated_delta_rule
from helpers import (assert_lowp_parity, nan_filled_empty, rel_rms, requires_gpu,
                     requires_triton)
from loglinear_cases import DEV, assert_compiled_matches_eager, make_inputs, run_op

pytestmark = requires_triton

F64 = torch.float64
TOL = 1e-5
# the gradients come from the torch chunked forward recomputed under autograd in fp32 (the
# kernels play no part: test_triton_matches_reference checks they equal the torch backend's
# bit for bit); a T = 1 dbeta of 0.017 summed from O(1) terms is 1.06e-5 off in fp32
GRAD_TOL = 1e-4


def _inputs(B, T, G, H, K, V, L, lengths=None, offsets=None, fill=None, l2=False, seed=0,
            device=DEV):
    """loglinear_cases' inputs plus beta in (0, 1); without the in-kernel l2 norm, keys of norm
    0.9 (a contracting recurrence, as the layer's normalised keys give)."""
    x, cu, init = make_inputs(B, T, G, H, K, V, L, lengths, offsets, fill, seed, device)
    gen = torch.Generator().manual_seed(seed + 1)
    x["beta"] = torch.rand(B, T, H, generator=gen, dtype=F64).to(device)
    if not l2:
        x["k"] = 0.9 * x["k"] / x["k"].norm(dim=-1, keepdim=True)
    if fill == "-1e4":
        x["g"][:, T // 3] = -1e4
    return x, cu, init


def _run(x, cu, init, dtype, want_final=True, chunk_size=16, backend="triton", grad=True,
         l2=False):
    return run_op(chunk_log_linear_gated_delta_rule, x, cu, init, dtype, want_final,
                  chunk_size, backend, grad, use_qk_l2norm_in_kernel=l2)


def _reference(x, cu, init, want_final=True, grad=True, l2=False):
    leaves = {n: t.detach().cpu().requires_grad_(grad) for n, t in x.items()}
    h0 = None if init is None else (init[0].detach().cpu().requires_grad_(grad), init[1].cpu())
    o, st = R.log_linear_gated_delta_rule_ref(**leaves, scale=1.0, initial_state=h0,
                                              output_final_state=True,
                                              cu_seqlens=None if cu is None else cu.cpu(),
                                              use_qk_l2norm_in_kernel=l2)
    grads = {}
    if grad:
        gen = torch.Generator().manual_seed(123)
        loss = (o * torch.randn(o.shape, generator=gen, dtype=F64)).sum()
        dht = torch.randn(st[0].shape, generator=gen, dtype=F64)
        if want_final:
            loss = loss + (st[0] * dht).sum()
        loss.backward()
        grads = {n: t.grad for n, t in leaves.items()}
        if h0 is not None:
            grads["h0"] = h0[0].grad
    return o, st, grads


def _check(got, want, want_final=True, grads=True, dtype=torch.float32):
    (o, st, dg), (o_r, st_r, dg_r) = got, want
    assert o.dtype == dtype and torch.isfinite(o).all()
    assert rel_rms(o.cpu(), o_r) <= TOL, ("o", rel_rms(o.cpu(), o_r))
    if want_final:
        assert st.ht.dtype == (F64 if dtype == F64 else torch.float32)
        assert torch.isfinite(st.ht).all()
        assert rel_rms(st.ht.cpu(), st_r[0]) <= TOL, ("ht", rel_rms(st.ht.cpu(), st_r[0]))
        assert st.offsets.tolist() == st_r[1].tolist()
    else:
        assert st is None
    if grads:
        for n, e in dg_r.items():
            a = dg[n]
            if e is None:  # unused by the reference (the initial state at L = 1): zero
                assert a is None or not a.any(), n
                continue
            assert a is not None and torch.isfinite(a).all(), n
            assert rel_rms(a.cpu(), e) <= GRAD_TOL, (n, rel_rms(a.cpu(), e))


@pytest.fixture
def nan_empty(monkeypatch):
    nan_filled_empty(monkeypatch)


CASES = [  # B, T, G, H, K, V, L, chunk, lengths, offsets, l2, grads
    pytest.param(1, 1, 1, 1, 4, 5, 4, 16, None, None, False, True, id="T1"),
    pytest.param(2, 11, 1, 2, 4, 6, 5, 16, None, None, False, True, id="T<C"),
    pytest.param(2, 37, 1, 2, 6, 3, 8, 16, None, [5, 37], False, True, id="T37-offsets-5-37"),
    pytest.param(1, 300, 1, 1, 4, 6, 11, 16, None, None, False, False, id="T300-C16-levels"),
    pytest.param(1, 300, 1, 1, 4, 4, 14, 16, None, [37], False, False,
                 id="T300-L-above-offset37"),
    pytest.param(1, 77, 1, 1, 4, 4, 15, 16, None, [4133], False, False, id="offset4133"),
    pytest.param(1, 100, 1, 1, 4, 4, 4, 16, None, None, False, False, id="L-below-intra"),
    pytest.param(1, 100, 1, 1, 4, 4, 6, 16, None, [5], False, False, id="L-few-chunk-levels"),
    pytest.param(1, 20, 1, 1, 4, 4, 1, 16, None, [5], False, True, id="L1"),
    pytest.param(2, 40, 2, 4, 5, 3, 8, 16, None, [5, 37], True, True, id="gva-H2G-l2"),
    pytest.param(1, 33, 1, 2, 3, 4, 8, 16, [1, 0, 8, 1, 23], [5, 0, 7, 16, 37], False, True,
                 id="varlen-offsets"),
    pytest.param(1, 66, 1, 1, 16, 16, 10, 32, [1, 1, 63, 1], None, False, False,
                 id="varlen-C32"),
    pytest.param(1, 50, 1, 1, 4, 4, 21, 16, [0, 17, 0, 33], [4133, 37, 9, 0], False, False,
                 id="varlen-empty-ends-L21"),
    pytest.param(1, 130, 1, 1, 100, 80, 10, 64, None, [37], True, False, id="K100-V80-C64-l2"),
]


@pytest.mark.parametrize("B,T,G,H,K,V,L,C,lengths,offsets,l2,grads", CASES)
def test_triton_matches_reference(B, T, G, H, K, V, L, C, lengths, offsets, l2, grads,
                                  nan_empty):
    x, cu, init = _inputs(B, T, G, H, K, V, L, lengths, offsets, l2=l2)
    want = _reference(x, cu, init, grad=grads, l2=l2)
    got = _run(x, cu, init, torch.float32, chunk_size=C, grad=grads, l2=l2)
    _check(got, want, grads=grads)
    if grads:  # the backward is the torch recompute whichever backend ran the forward
        base = _run(x, cu, init, torch.float32, chunk_size=C, backend="torch", l2=l2)
        for n, a in got[2].items():
            assert torch.equal(a, base[2][n]), n


@pytest.mark.parametrize("fill", ["strong", "-inf", "-1e4"])
def test_extreme_gates(fill, nan_empty):
    """-20 per token (decays to e^-1280 inside a chunk), a -1e4 gate and -inf gates (resets):
    every exponent a sum of its own gates, finite outputs, no NaN from -inf - -inf."""
    x, cu, init = _inputs(2, 50, 1, 2, 4, 4, 9, offsets=[5, 37], fill=fill)
    want = _reference(x, cu, init, grad=False)
    _check(_run(x, cu, init, torch.float32, grad=False), want, grads=False)


def test_no_final_state(nan_empty):
    x, cu, init = _inputs(1, 45, 1, 2, 4, 4, 8, offsets=[21])
    want = _reference(x, cu, init, want_final=False)
    _check(_run(x, cu, init, torch.float32, want_final=False), want, want_final=False)


def test_float64_forced_triton(nan_empty):
    """float64 inputs on a forced triton backend: computed in fp32, returned in float64."""
    x, cu, init = _inputs(1, 40, 1, 2, 4, 4, 8, offsets=[3])
    want = _reference(x, cu, init, grad=False)
    _check(_run(x, cu, init, F64, grad=False), want, grads=False, dtype=F64)


def test_empty_inputs():
    """T = 0 (empty varlen segments only): the op answers before any backend runs (the initial
    state passed through as it is)."""
    x, _, init = _inputs(1, 0, 1, 2, 4, 4, 5, offsets=[7])
    cu = torch.zeros(3, dtype=torch.int32, device=DEV)
    init = (init[0][:1].expand(2, -1, -1, -1, -1).contiguous(), torch.tensor([7, 9], device=DEV))
    with lo.use_backend("triton"):
        o, st = chunk_log_linear_gated_delta_rule(
            **{n: t.float() for n, t in x.items()}, initial_state=(init[0].float(), init[1]),
            output_final_state=True, cu_seqlens=cu)
    assert o.shape == (1, 0, 2, 4) and st.ht.dtype == torch.float32
    assert torch.equal(st.ht, init[0].float()) and st.offsets.tolist() == [7, 9]


def test_backend_choice(monkeypatch):
    """Forced triton runs the kernels (counted); unforced CPU runs torch; no cuda backend."""
    from lightning_ops import BackendUnavailableError
    from lightning_ops.loglinear import triton_delta as TD
    calls = []
    real = TD.forward
    monkeypatch.setattr(TD, "forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.delenv("LIGHTNING_OPS_BACKEND", raising=False)
    assert lo.backend.family_backends("loglinear_delta") == ("triton", "torch")
    x, _, _ = _inputs(1, 5, 1, 1, 4, 4, 3, device="cpu")
    x = {n: t.float() for n, t in x.items()}
    chunk_log_linear_gated_delta_rule(**x)
    assert not calls
    with lo.use_backend("triton"):
        chunk_log_linear_gated_delta_rule(**x)
    assert calls == [1]
    with lo.use_backend("cuda"), pytest.raises(BackendUnavailableError, match="no cuda"):
        chunk_log_linear_gated_delta_rule(**x)


@pytest.mark.parametrize("bad", ["v", "k", "beta"])
def test_nonfinite_input_stays_causal(bad):
    """A NaN at token t of one sequence (the NonFiniteGuard around the kernels): the triton
    outputs match the torch backend's, NaN from t on and in that sequence's final state."""
    x, _, _ = _inputs(2, 20, 1, 2, 3, 3, 6, l2=True)
    t = 9
    x[bad][0, t] = float("nan")
    kw = dict(output_final_state=True, chunk_size=16, use_qk_l2norm_in_kernel=True)
    x32 = {n: v.float() for n, v in x.items()}
    with lo.use_backend("torch"):
        o_t, st_t = chunk_log_linear_gated_delta_rule(**{n: v.cpu() for n, v in x32.items()},
                                                      **kw)
    with lo.use_backend("triton"):
        o, st = chunk_log_linear_gated_delta_rule(**x32, **kw)
    o, ht = o.cpu(), st.ht.cpu()
    assert torch.isnan(o[0, t:]).all() and torch.isnan(ht[0]).all()
    assert torch.isfinite(o[0, :t]).all() and torch.isfinite(o[1]).all()
    assert rel_rms(o[0, :t], o_t[0, :t]) <= TOL and rel_rms(o[1], o_t[1]) <= TOL
    assert rel_rms(ht[1], st_t.ht[1]) <= TOL


def test_compile_fullgraph_triton():
    """torch.compile(fullgraph=True) through the op on the triton backend, forward and
    backward: same bits as eager."""
    torch._dynamo.reset()
    x, cu, init = _inputs(1, 12, 1, 1, 4, 4, 6, lengths=[5, 7], offsets=[3, 0])
    names = ("q", "k", "v", "g", "level_scales", "beta")
    args = [x[n].float() for n in names] + [init[0].float(), init[1], cu]

    def f(q, k, v, g, lam, beta, h0, off, cu):
        with lo.use_backend("triton"):
            return chunk_log_linear_gated_delta_rule(q, k, v, g, lam, beta, 0.5, (h0, off), True,
                                                     cu, chunk_size=16)

    assert_compiled_matches_eager(f, args, 7)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("K,V", [(128, 128), (256, 512)])
def test_gpu_bf16_parity(K, V):
    """Against the float64 truth of the fp32 inputs, the triton forward in bf16 is within 2x of
    the torch backend run on the same bf16 inputs (helpers.lowp_bound); its gradients (the torch
    recompute) are finite."""
    x, cu, init = _inputs(2, 700, 1, 2, K, V, 12, offsets=[5, 37], l2=True, device="cuda")
    o_r, st_r, _ = _reference(x, cu, init, grad=False, l2=True)
    dt = torch.bfloat16
    base = _run(x, cu, init, dt, chunk_size=64, backend="torch", grad=False, l2=True)
    ours = _run(x, cu, init, dt, chunk_size=64, backend="triton", grad=False, l2=True)
    assert ours[0].dtype == dt and ours[1].ht.dtype == torch.float32

    def errs(r):
        return {"o": rel_rms(r[0].cpu(), o_r), "ht": rel_rms(r[1].ht.cpu(), st_r[0])}
    assert_lowp_parity(errs(ours), errs(base), what=f"K={K} V={V} bf16")
    _, _, dg = _run(x, cu, init, dt, chunk_size=64, backend="triton", l2=True)
    assert all(torch.isfinite(t).all() for t in dg.values())

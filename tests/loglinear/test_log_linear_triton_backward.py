"""Triton backward of chunk_log_linear_attn (lightning_ops/loglinear/triton_backward.py).

CPU: under TRITON_INTERPRET=1 in fp32, the gradients of one (o*do).sum() + (ht*dht).sum()
backward through the public op with the triton backend forced (forward and backward kernels;
every torch.empty NaN-filled, so unwritten elements fail) against the same backward on the torch
backend in float64 (loglinear.torch.backward, itself checked against the reference at 1e-10):
each gradient within 1e-5 relative RMS of its own size. Shapes: T = 1, T < C, T not a multiple
of C, several chunk levels (T = 200, C = 16), B = H = 1, K != V, K and V over one 64-wide
block (two V tiles: partial sums), grouped q/k (H = 2G), varlen with length-1 and empty
segments, initial states at odd offsets with and without dht, L below and above what T reaches,
gates of -20 per token and -inf.
GPU (@pytest.mark.gpu): bf16 gradients against the float64 truth, within 2x of the torch
backend run in bf16 (helpers.lowp_bound).
"""
from __future__ import annotations

import pytest
import torch

import lightning_ops as lo
from lightning_ops.loglinear import LogLinearAttentionState, chunk_log_linear_attn
from helpers import (assert_lowp_parity, nan_filled_empty, rel_rms, requires_gpu,
                     requires_triton)
from loglinear_cases import make_inputs as _inputs

pytestmark = requires_triton

F64 = torch.float64
TOL = 1e-5


def _grads(x, cu, init, dtype, backend, want_final=True, chunk_size=16):
    """The gradients of one probe backward through the public op on `backend`."""
    leaves = {n: t.detach().to(dtype).requires_grad_() for n, t in x.items()}
    h0 = None
    if init is not None:
        hdt = F64 if dtype == F64 else torch.float32
        h0 = LogLinearAttentionState(init[0].detach().to(hdt).requires_grad_(), init[1])
    with lo.use_backend(backend):
        o, st = chunk_log_linear_attn(**leaves, initial_state=h0, output_final_state=want_final,
                                      cu_seqlens=cu, chunk_size=chunk_size, scale=0.7)
    gen = torch.Generator().manual_seed(123)
    loss = (o * torch.randn(o.shape, generator=gen, dtype=F64).to(o)).sum()
    if want_final:
        loss = loss + (st.ht * torch.randn(st.ht.shape, generator=gen, dtype=F64).to(st.ht)).sum()
    loss.backward()
    out = {n: t.grad for n, t in leaves.items()}
    if h0 is not None:
        out["h0"] = h0.ht.grad
    return out


def _check(got, want, tol=TOL):
    assert set(got) == set(want)
    for n, e in want.items():
        a = got[n]
        assert a is not None and torch.isfinite(a).all(), n
        assert rel_rms(a.cpu(), e.cpu()) <= tol, (n, rel_rms(a.cpu(), e.cpu()))


@pytest.fixture
def nan_empty(monkeypatch):
    nan_filled_empty(monkeypatch)


CASES = [  # B, T, G, H, K, V, L, lengths, offsets, final
    pytest.param(1, 1, 1, 1, 4, 5, 4, None, None, True, id="T1"),
    pytest.param(2, 11, 1, 2, 4, 6, 5, None, None, True, id="T<C-gva"),
    pytest.param(2, 37, 1, 1, 6, 3, 8, None, [5, 37], True, id="T37-offsets-5-37"),
    pytest.param(1, 21, 1, 1, 6, 3, 8, None, [37], False, id="offset-no-dht"),
    pytest.param(1, 200, 1, 1, 4, 6, 14, None, [37], True, id="T200-C16-L-above"),
    pytest.param(1, 100, 1, 1, 4, 4, 6, None, [5], True, id="L-few-chunk-levels"),
    pytest.param(1, 60, 1, 1, 4, 4, 4, None, None, True, id="L-below-intra"),
    pytest.param(1, 40, 2, 4, 5, 3, 8, None, [5], True, id="gva-H2G"),
    pytest.param(1, 33, 1, 2, 3, 4, 8, [1, 0, 8, 1, 23], [5, 0, 7, 16, 37], True,
                 id="varlen-offsets"),
    pytest.param(1, 40, 1, 1, 70, 80, 8, None, [37], True, id="K70-V80-two-tiles"),
]


@pytest.mark.parametrize("B,T,G,H,K,V,L,lengths,offsets,final", CASES)
def test_triton_backward_matches_torch(B, T, G, H, K, V, L, lengths, offsets, final, nan_empty,
                                       monkeypatch):
    from lightning_ops.loglinear import torch as LT
    from lightning_ops.loglinear import triton_backward as TB
    x, cu, init = _inputs(B, T, G, H, K, V, L, lengths, offsets)
    want = _grads(x, cu, init, F64, "torch", final)
    calls = []
    real = TB.backward
    monkeypatch.setattr(TB, "backward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(LT, "backward", None)  # the torch backward must not run here
    got = _grads(x, cu, init, torch.float32, "triton", final)
    assert calls == [1]
    _check(got, want)


@pytest.mark.parametrize("fill", ["strong", "-inf"])
def test_triton_backward_extreme_gates(fill, nan_empty):
    """-20 per token (decays to e^-320 across a chunk) and -inf gates (resets): finite, exact
    gradients (no -inf - -inf, no difference of large sums)."""
    x, cu, init = _inputs(1, 40, 1, 2, 4, 4, 9, offsets=[37], fill=fill)
    _check(_grads(x, cu, init, torch.float32, "triton"), _grads(x, cu, init, F64, "torch"))


def test_triton_backward_deterministic(monkeypatch):
    """Same inputs, same bits (partial sums over V tiles reduced in a fixed order); with the
    partial-sum cap forcing one slot, the two V tiles run as two launches adding in turn."""
    from lightning_ops.loglinear import triton_backward as TB
    x, cu, init = _inputs(1, 20, 1, 1, 4, 80, 8, offsets=[21])
    a = _grads(x, cu, init, torch.float32, "triton")
    b = _grads(x, cu, init, torch.float32, "triton")
    assert all(torch.equal(a[n], b[n]) for n in a)
    monkeypatch.setattr(TB, "PARTIAL_MAX_BYTES", 1)
    _check(_grads(x, cu, init, torch.float32, "triton"), _grads(x, cu, init, F64, "torch"))


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("K,V", [(64, 64), (128, 128)])
def test_gpu_bf16_backward_parity(K, V):
    """bf16 gradients of the triton backward against the float64 truth, within 2x of the torch
    backend's bf16 gradients (helpers.lowp_bound)."""
    x, cu, init = _inputs(2, 700, 1, 2, K, V, 12, offsets=[5, 37], device="cuda")
    want = _grads(x, cu, init, F64, "torch", chunk_size=64)
    base = _grads(x, cu, init, torch.bfloat16, "torch", chunk_size=64)
    ours = _grads(x, cu, init, torch.bfloat16, "triton", chunk_size=64)

    def errs(d):
        return {n: rel_rms(d[n].double().cpu(), want[n].cpu()) for n in want}
    assert all(torch.isfinite(t).all() for t in ours.values())
    assert_lowp_parity(errs(ours), errs(base), what=f"K={K} V={V} bf16 backward")

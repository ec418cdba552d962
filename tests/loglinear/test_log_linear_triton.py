"""Triton backend of chunk_log_linear_attn (the forward kernels of lightning_ops/loglinear/
triton.py; the op then runs the backward of loglinear/triton_backward.py) against the float64
reference (reference.log_linear_attn_ref).

CPU: under TRITON_INTERPRET=1 in fp32, through the public op with the triton backend forced and
every torch.empty NaN-filled (unwritten outputs fail): o and the final state within 1e-5
relative RMS, the next offsets exact, and the gradients of one (o*do).sum() + (ht*dht).sum()
backward (the triton backend's backward) within 1e-5 too, in the cases marked so (the
backward's own tests: test_log_linear_triton_backward.py). Shapes: T = 1, T < C, T not a
multiple of C, several chunk levels (T = 300, C = 16), B = H = 1, K != V (and K, V over one
64-wide block), grouped q/k, varlen with length-1 and empty segments, initial states at odd
offsets, final state on and off, L below and above what T reaches, gates of -20 per token and
-inf.
Also: backend choice, torch.compile(fullgraph=True) through the op on the triton backend.
GPU (@pytest.mark.gpu): bf16 / fp16 parity (helpers.lowp_bound against the torch backend in
that dtype) at K = V = 64, 128 and 256.
"""
from __future__ import annotations

import pytest
import torch

import lightning_ops as lo
from lightning_ops import reference as R
from lightning_ops.loglinear import chunk_log_linear_attn
from helpers import (assert_lowp_parity, nan_filled_empty, rel_rms, requires_gpu,
                     requires_triton)
from loglinear_cases import assert_compiled_matches_eager, make_inputs as _inputs, run_op

pytestmark = requires_triton

F64 = torch.float64
TOL = 1e-5
NAMES = ("q", "k", "v", "g", "level_scales")


def _run(x, cu, init, dtype, want_final=True, chunk_size=16, backend="triton", grad=True):
    return run_op(chunk_log_linear_attn, x, cu, init, dtype, want_final, chunk_size, backend,
                  grad)


def _reference(x, cu, init, want_final=True, grad=True):
    leaves = {n: t.detach().cpu().requires_grad_(grad) for n, t in x.items()}
    h0 = None if init is None else (init[0].detach().cpu().requires_grad_(grad), init[1].cpu())
    o, st = R.log_linear_attn_ref(**leaves, initial_state=h0, output_final_state=True,
                                  cu_seqlens=None if cu is None else cu.cpu())
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


def _check(got, want, want_final=True, grads=True):
    (o, st, dg), (o_r, st_r, dg_r) = got, want
    assert o.dtype == torch.float32 and torch.isfinite(o).all()
    assert rel_rms(o.cpu(), o_r) <= TOL, ("o", rel_rms(o.cpu(), o_r))
    if want_final:
        assert st.ht.dtype == torch.float32 and torch.isfinite(st.ht).all()
        assert rel_rms(st.ht.cpu(), st_r[0]) <= TOL, ("ht", rel_rms(st.ht.cpu(), st_r[0]))
        assert st.offsets.tolist() == st_r[1].tolist()
    else:
        assert st is None
    if grads:
        for n, e in dg_r.items():
            a = dg[n]
            assert a is not None and torch.isfinite(a).all(), n
            assert rel_rms(a.cpu(), e) <= TOL, (n, rel_rms(a.cpu(), e))


@pytest.fixture
def nan_empty(monkeypatch):
    nan_filled_empty(monkeypatch)


CASES = [  # B, T, G, H, K, V, L, chunk, lengths, offsets, grads
    pytest.param(1, 1, 1, 1, 4, 5, 4, 16, None, None, True, id="T1"),
    pytest.param(2, 11, 1, 2, 4, 6, 5, 16, None, None, True, id="T<C"),
    pytest.param(2, 37, 1, 2, 6, 3, 8, 16, None, [5, 37], True, id="T37-offsets-5-37"),
    pytest.param(1, 300, 1, 1, 4, 6, 11, 16, None, None, False, id="T300-C16-levels"),
    pytest.param(1, 300, 1, 1, 4, 4, 14, 16, None, [37], False, id="T300-L-above-offset37"),
    pytest.param(1, 100, 1, 1, 4, 4, 4, 16, None, None, False, id="L-below-intra"),
    pytest.param(1, 100, 1, 1, 4, 4, 6, 16, None, [5], False, id="L-few-chunk-levels"),
    pytest.param(2, 40, 2, 4, 5, 3, 8, 16, None, [5, 37], False, id="gva-H2G"),
    pytest.param(1, 33, 1, 2, 3, 4, 8, 16, [1, 0, 8, 1, 23], [5, 0, 7, 16, 37], False,
                 id="varlen-offsets"),
    pytest.param(1, 66, 1, 1, 16, 16, 10, 32, [1, 1, 63, 1], None, False, id="varlen-C32"),
    pytest.param(1, 130, 1, 1, 100, 80, 10, 64, None, [37], False, id="K100-V80-C64"),
]


@pytest.mark.parametrize("B,T,G,H,K,V,L,C,lengths,offsets,grads", CASES)
def test_triton_matches_reference(B, T, G, H, K, V, L, C, lengths, offsets, grads, nan_empty):
    x, cu, init = _inputs(B, T, G, H, K, V, L, lengths, offsets)
    want = _reference(x, cu, init, grad=grads)
    got = _run(x, cu, init, torch.float32, chunk_size=C, grad=grads)
    _check(got, want, grads=grads)


@pytest.mark.parametrize("fill", ["strong", "-inf"])
def test_extreme_gates(fill, nan_empty):
    """-20 per token (decays to e^-1280 inside a chunk) and -inf gates (resets): exact segment
    sums, finite outputs, no NaN from -inf - -inf."""
    x, cu, init = _inputs(2, 50, 1, 2, 4, 4, 9, offsets=[5, 37], fill=fill)
    want = _reference(x, cu, init, grad=False)
    _check(_run(x, cu, init, torch.float32, grad=False), want, grads=False)


def test_no_final_state(nan_empty):
    x, cu, init = _inputs(1, 45, 1, 2, 4, 4, 8, offsets=[21])
    want = _reference(x, cu, init, want_final=False)
    _check(_run(x, cu, init, torch.float32, want_final=False), want, want_final=False)


def test_backend_choice(monkeypatch):
    """Forced triton runs the kernels (counted); unforced CPU runs torch; a forced cuda
    backend raises (the log-linear Gated DeltaNet's choice: test_log_linear_delta_triton.py)."""
    from lightning_ops import BackendUnavailableError
    from lightning_ops.loglinear import triton as LT
    calls = []
    real = LT.forward
    monkeypatch.setattr(LT, "forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.delenv("LIGHTNING_OPS_BACKEND", raising=False)
    assert lo.backend.family_backends("loglinear") == ("triton", "torch")  # CUDA: triton first
    x, cu, init = _inputs(1, 5, 1, 1, 4, 4, 3, device="cpu")
    x = {n: t.float() for n, t in x.items()}
    chunk_log_linear_attn(**x)
    assert not calls
    with lo.use_backend("triton"):
        chunk_log_linear_attn(**x)
    assert calls == [1]
    with lo.use_backend("cuda"), pytest.raises(BackendUnavailableError, match="no cuda"):
        chunk_log_linear_attn(**x)


def test_compile_fullgraph_triton():
    """torch.compile(fullgraph=True) through the op on the triton backend, forward and
    backward: same bits as eager."""
    torch._dynamo.reset()
    x, cu, init = _inputs(1, 12, 1, 1, 4, 4, 6, lengths=[5, 7], offsets=[3, 0])
    args = [x[n].float() for n in NAMES] + [init[0].float(), init[1], cu]

    def f(q, k, v, g, lam, h0, off, cu):
        with lo.use_backend("triton"):
            return chunk_log_linear_attn(q, k, v, g, lam, (h0, off), True, cu, scale=0.5,
                                         chunk_size=16)

    assert_compiled_matches_eager(f, args, 6)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("K,V", [(64, 64), (128, 128), (256, 256)])
def test_gpu_low_precision_parity(dtype, K, V):
    """Against the float64 truth of the fp32 inputs, the triton forward in bf16 / fp16 is within
    2x of the torch backend run on the same low-precision inputs (helpers.lowp_bound)."""
    x, cu, init = _inputs(2, 700, 1, 2, K, V, 12, offsets=[5, 37], device="cuda")
    o_r, st_r, _ = _reference(x, cu, init, grad=False)
    base = _run(x, cu, init, dtype, chunk_size=64, backend="torch", grad=False)
    ours = _run(x, cu, init, dtype, chunk_size=64, backend="triton", grad=False)
    assert ours[0].dtype == dtype and ours[1].ht.dtype == torch.float32

    def errs(r):
        return {"o": rel_rms(r[0].cpu(), o_r), "ht": rel_rms(r[1].ht.cpu(), st_r[0])}
    assert_lowp_parity(errs(ours), errs(base), what=f"K={K} V={V} {dtype}")
    # the triton backward after the triton forward: finite gradients in 16-bit
    _, _, dg = _run(x, cu, init, dtype, chunk_size=64, backend="triton")
    assert all(torch.isfinite(t).all() for t in dg.values())

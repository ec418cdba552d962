"""mamba_chunk_scan_combined (Mamba-2 SSD) against reference.ssd_ref: y, final states and every
gradient (x, dt, A, B, C, D, z, dt_bias, initial_states) on every backend."""
import pytest
import torch

from helpers import cu_seqlens_from_lengths
from lightning_ops import reference
from lightning_ops.backend import use_backend
from lightning_ops.ssm.ops import mamba_chunk_scan_combined
from ssm_cases import as_baseline, as_ref, cfg, check_parity, ssd_inputs  # noqa: F401

ARGS = ("x", "dt", "A", "B", "C")


def _run(inp, chunk, **kw):
    return mamba_chunk_scan_combined(*[inp[k] for k in ARGS], chunk, D=inp["D"], z=inp["z"],
                                     dt_bias=inp["dt_bias"],
                                     initial_states=inp["initial_states"],
                                     return_final_states=True, **kw)


def _ref(inp, **kw):
    return reference.ssd_ref(*[inp[k] for k in ARGS], D=inp["D"], z=inp["z"],
                             dt_bias=inp["dt_bias"], initial_states=inp["initial_states"], **kw)


def _check(cfg, out, ref_out, inp, ref_in, chunk=16, **kw):
    """Parity. In fp32 (Triton) each tensor passes within max(tol, 2 x the error of eager
    PyTorch in fp32 on the same inputs, i.e. the torch backend): the gate gradients (dt, A,
    dt_bias) come from the chunk engine's d b = q*dq - k*dk identity, whose fp32 cancellation
    alone reaches ~1e-5 on some inputs (see the SSM report)."""
    backend, dtype, device, tol, metric = cfg
    baseline = None
    if dtype != torch.float64:
        base_in = as_baseline(inp, dtype)
        with use_backend("torch"):
            base_out = _run(base_in, chunk, **kw)
        baseline = (base_out, base_in)
    check_parity(("y", "final_states"), out, ref_out, inp, ref_in, tol, metric, baseline)


@pytest.mark.parametrize("b, l, h, p, g, n, chunk, D, opts", [
    (1, 1, 1, 1, 1, 1, 16, None, dict()),                              # T = 1, all dims 1
    (2, 63, 4, 8, 2, 16, 16, "h", dict(dt_softplus=True)),             # groups, odd length
    (1, 300, 2, 5, 1, 12, 32, "hp", dict(dt_softplus=True, dt_limit=(0.05, 0.6))),
    (2, 40, 3, 4, 3, 6, 64, "h", dict()),                              # T < chunk, K != V
])
@pytest.mark.parametrize("h0", [False, True])
def test_ssd_parity(cfg, b, l, h, p, g, n, chunk, D, opts, h0):
    backend, dtype, device, tol, metric = cfg
    inp = ssd_inputs(b, l, h, p, g, n, D=D, z=D is not None, dt_bias=D is not None, h0=h0,
                     dtype=dtype, device=device, seed=l + h)
    ref_in = as_ref(inp)
    y, fin = _run(inp, chunk, **opts)
    y_ref, fin_ref = _ref(ref_in, **opts)
    assert y.dtype == dtype and fin.shape == (b, h, p, n)
    _check(cfg, (y, fin), (y_ref, fin_ref), inp, ref_in, chunk, **opts)


@pytest.mark.parametrize("lengths", [[5, 1, 0, 40, 17], [1], [63, 1, 64]])
def test_ssd_varlen(cfg, lengths):
    """cu_seqlens: every sequence has its own initial and final state (incl. length 0 and 1)."""
    backend, dtype, device, tol, metric = cfg
    T, N = sum(lengths), len(lengths)
    inp = ssd_inputs(1, T, 2, 4, 1, 8, h0=True, N=N, dtype=dtype, device=device, seed=T)
    ref_in = as_ref(inp)
    cu = cu_seqlens_from_lengths(lengths, device=device)
    y, fin = _run(inp, 16, cu_seqlens=cu, dt_softplus=True)
    y_ref, fin_ref = _ref(ref_in, cu_seqlens=cu.cpu(), dt_softplus=True)
    assert fin.shape == (N, 2, 4, 8)
    _check(cfg, (y, fin), (y_ref, fin_ref), inp, ref_in, cu_seqlens=cu.cpu(), dt_softplus=True)


def test_ssd_seq_idx(cfg):
    """seq_idx resets the state to zero inside a row (with and without cu_seqlens)."""
    backend, dtype, device, tol, metric = cfg
    inp = ssd_inputs(2, 50, 2, 3, 2, 4, h0=True, dtype=dtype, device=device, seed=7)
    ref_in = as_ref(inp)
    seq_idx = torch.zeros(2, 50, dtype=torch.int32)
    seq_idx[0, 17:] = 1
    seq_idx[0, 18:] = 2   # a length-1 run
    seq_idx[1, 33:] = 5
    y, fin = _run(inp, 16, seq_idx=seq_idx.to(device))
    y_ref, fin_ref = _ref(ref_in, seq_idx=seq_idx)
    _check(cfg, (y, fin), (y_ref, fin_ref), inp, ref_in, seq_idx=seq_idx)


def test_ssd_seq_idx_with_cu_seqlens(cfg):
    backend, dtype, device, tol, metric = cfg
    lengths = [20, 1, 29]
    inp = ssd_inputs(1, 50, 2, 3, 1, 4, h0=True, N=3, dtype=dtype, device=device, seed=8)
    ref_in = as_ref(inp)
    cu = cu_seqlens_from_lengths(lengths)
    seq_idx = torch.tensor([[0] * 10 + [1] * 10 + [2] + [3] * 5 + [4] * 24], dtype=torch.int32)
    y, fin = _run(inp, 16, seq_idx=seq_idx.to(device), cu_seqlens=cu.to(device))
    y_ref, fin_ref = _ref(ref_in, seq_idx=seq_idx, cu_seqlens=cu)
    _check(cfg, (y, fin), (y_ref, fin_ref), inp, ref_in, seq_idx=seq_idx, cu_seqlens=cu)


def test_ssd_return_forms():
    inp = ssd_inputs(1, 9, 2, 3, 1, 4, N=2, h0=True)
    cu = cu_seqlens_from_lengths([4, 5])
    args = [inp[k].detach() for k in ARGS]
    y = mamba_chunk_scan_combined(*args, 8)
    assert isinstance(y, torch.Tensor) and y.shape == (1, 9, 2, 3)
    y2, varlen = mamba_chunk_scan_combined(*args, 8, cu_seqlens=cu, return_varlen_states=True)
    y3, fin, varlen3 = mamba_chunk_scan_combined(*args, 8, cu_seqlens=cu,
                                                 return_final_states=True,
                                                 return_varlen_states=True)
    _, fin_ref = reference.ssd_ref(*args, cu_seqlens=cu)
    assert torch.allclose(varlen, fin_ref, rtol=1e-10, atol=1e-12)
    assert torch.equal(fin, varlen3[-1:]) and torch.equal(varlen3, varlen)


def test_ssd_strong_decay_finite():
    g = torch.Generator().manual_seed(0)
    l = 4096
    x = torch.randn(1, l, 2, 4, generator=g, requires_grad=True)
    dt = torch.full((1, l, 2), 20.0, requires_grad=True)
    A = torch.full((2,), -1.0, requires_grad=True)
    B, C = torch.randn(1, l, 1, 8, generator=g), torch.randn(1, l, 1, 8, generator=g)
    y, fin = mamba_chunk_scan_combined(x, dt, A, B, C, 256, return_final_states=True)
    (y.sum() + fin.sum()).backward()
    for t in (y, fin, x.grad, dt.grad, A.grad):
        assert torch.isfinite(t).all()


def _good():
    return dict(x=torch.zeros(1, 8, 4, 3), dt=torch.zeros(1, 8, 4), A=torch.zeros(4),
                B=torch.zeros(1, 8, 2, 5), C=torch.zeros(1, 8, 2, 5), chunk_size=16)


@pytest.mark.parametrize("bad, match, exc", [
    (dict(chunk_size=48), "power of two", ValueError),
    (dict(chunk_size=16.0), "chunk_size must be a Python int", TypeError),
    (dict(x=torch.zeros(1, 8, 4)), "x must have shape", ValueError),
    (dict(dt=torch.zeros(1, 8, 3)), "dt must have shape", ValueError),
    (dict(B=torch.zeros(1, 8, 3, 5), C=torch.zeros(1, 8, 3, 5)), "groups", ValueError),
    (dict(C=torch.zeros(1, 8, 2, 4)), "C must have shape", ValueError),
    (dict(D=torch.zeros(3)), "D must have shape", ValueError),
    (dict(initial_states=torch.zeros(1, 4, 3, 4)), "initial_states must have shape",
     ValueError),
    (dict(dt_limit=(1.0,)), "dt_limit", TypeError),
    (dict(seq_idx=torch.zeros(1, 8)), "seq_idx must be an int32", TypeError),
    (dict(cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32)), "cu_seqlens", ValueError),
    (dict(return_varlen_states=True), "needs cu_seqlens", ValueError),
])
def test_ssd_validation(bad, match, exc):
    args = _good()
    args.update(bad)
    with pytest.raises(exc, match=match):
        mamba_chunk_scan_combined(**args)

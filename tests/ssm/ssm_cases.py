"""Input builders and the parity check shared by the SSM tests of every backend."""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

import pytest

from helpers import (INTERPRET, assert_close, backward_probe, grads_of, nan_filled_empty,
                     rel_err, rel_rms, triton_device)

# (backend, dtype, device, tolerance, metric): the torch path in float64 against the float64
# reference; Triton in fp32 (under TRITON_INTERPRET=1 on CPU, or on a GPU)
BACKENDS = [
    pytest.param(("torch", torch.float64, "cpu", 1e-10, rel_err), id="torch"),
    pytest.param(("triton", torch.float32, triton_device(), 1e-5, rel_rms), id="triton",
                 marks=pytest.mark.skipif(not (torch.cuda.is_available() or INTERPRET),
                                          reason="Triton needs a GPU or TRITON_INTERPRET=1")),
]


@pytest.fixture(params=BACKENDS)
def cfg(request, monkeypatch):
    """The backend under test, forced for the test's duration; kernels see NaN-filled outputs."""
    from lightning_ops.backend import use_backend
    nan_filled_empty(monkeypatch)
    with use_backend(request.param[0]):
        yield request.param


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def scan_inputs(b, d, n, L, groups: Optional[int], *, D=True, z=True, bias=True, seed=0,
                dtype=torch.float64, device="cpu") -> Dict[str, Optional[torch.Tensor]]:
    """selective_scan_fn inputs; groups None -> B/C [b, n, L], else [b, G, n, L]."""
    g = gen(seed)

    def r(*s, scale=1.0, shift=0.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * scale + shift)

    bc = (b, n, L) if groups is None else (b, groups, n, L)
    x = dict(
        u=r(b, d, L), delta=r(b, d, L, scale=0.5, shift=-1.0) if bias else
        torch.rand(b, d, L, generator=g, dtype=torch.float64) * 0.8 + 0.05,
        A=-torch.exp(r(d, n, scale=0.5)), B=r(*bc), C=r(*bc),
        D=r(d) if D else None, z=r(b, d, L) if z else None,
        delta_bias=r(d, scale=0.3) if bias else None)
    return {k: None if v is None else v.to(device, dtype).requires_grad_() for k, v in x.items()}


def ssd_inputs(b, l, h, p, g_, n, *, D="h", z=True, dt_bias=True, h0=False, N=None, seed=0,
               dtype=torch.float64, device="cpu"):
    gg = gen(seed)

    def r(*s, scale=1.0, shift=0.0):
        return torch.randn(*s, generator=gg, dtype=torch.float64) * scale + shift

    N = b if N is None else N
    x = dict(
        # dt > 0 even without softplus (as the model's dt is): decays exp(dt A) <= 1
        x=r(b, l, h, p), dt=r(b, l, h, scale=0.5).abs() + 0.05, A=-torch.exp(r(h, scale=0.5)),
        B=r(b, l, g_, n), C=r(b, l, g_, n),
        D=None if D is None else (r(h) if D == "h" else r(h, p)),
        z=r(b, l, h, p) if z else None,
        dt_bias=torch.rand(h, generator=gg, dtype=torch.float64) * 0.2 if dt_bias else None,
        initial_states=r(N, h, p, n) if h0 else None)
    return {k: None if v is None else v.to(device, dtype).requires_grad_() for k, v in x.items()}


def conv_inputs(b, d, L, W, *, bias=True, h0=False, seed=0, dtype=torch.float64, device="cpu"):
    g = gen(seed)
    x = dict(x=torch.randn(b, d, L, generator=g, dtype=torch.float64),
             weight=torch.randn(d, W, generator=g, dtype=torch.float64),
             bias=torch.randn(d, generator=g, dtype=torch.float64) if bias else None,
             initial_states=torch.randn(b, d, W - 1, generator=g, dtype=torch.float64)
             if h0 else None)
    return {k: None if v is None else v.to(device, dtype).requires_grad_() for k, v in x.items()}


def as_ref(inputs: Dict[str, Optional[torch.Tensor]]):
    """float64 CPU leaf copies (the reference's inputs)."""
    return {k: None if v is None else v.detach().cpu().double().requires_grad_()
            for k, v in inputs.items()}


def check_parity(name_outs: Sequence[str], outs, ref_outs, inputs, ref_inputs, tol, metric,
                 baseline=None):
    """Compare the outputs, then every gradient of one (o*do).sum() + (ht*dht).sum().
    baseline: optional (outs, inputs) of the reference run in the tested dtype ("plain
    PyTorch"): a tensor then passes within max(tol, 2 x the baseline's own error), for results
    whose conditioning no fp32 evaluation meets tol on (e.g. ddt_bias: a sum of cancelling
    terms)."""
    def bound(err_base):
        return tol if err_base is None else max(tol, 2 * err_base)

    base_outs, base_in = baseline if baseline is not None else (None, None)
    for i, (nm, a, e) in enumerate(zip(name_outs, outs, ref_outs)):
        eb = None if base_outs is None else metric(base_outs[i], e)
        assert_close(nm, a, e, bound(eb), metric)
    names = [k for k, v in inputs.items() if v is not None]
    if not names:  # a decode step: no gradients
        return
    got = grads_of(backward_probe(outs), [inputs[k] for k in names])
    want = grads_of(backward_probe(ref_outs), [ref_inputs[k] for k in names])
    base = [None] * len(names) if base_in is None else \
        grads_of(backward_probe(base_outs), [base_in[k] for k in names])
    for nm, a, e, bg in zip(names, got, want, base):
        assert a is not None, f"d{nm} missing"
        if e.numel() and e.abs().max() == 0:  # exactly zero (e.g. dA at T=1): absolute check
            assert a.abs().max() <= tol * 1e-2, f"d{nm}: {a.abs().max():.3e}, expected 0"
            continue
        assert_close(f"d{nm}", a, e, bound(None if bg is None else metric(bg, e)), metric)


def as_baseline(inputs, dtype):
    """Leaf copies of the inputs in `dtype` on CPU, for the reference run as a baseline."""
    return {k: None if v is None else v.detach().cpu().to(dtype).requires_grad_()
            for k, v in inputs.items()}

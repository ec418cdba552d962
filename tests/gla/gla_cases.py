"""Shared cases of the GLA-family tests (torch and Triton backends): the public ops by name and
the gates each takes, the input builder, leaf copies, one run with every gradient, and the
float64 reference (reference.gated_linear_attn_ref) on the same inputs.

A run returns (o, ht, grads) with grads keyed by GRAD_NAMES, from one (o*do).sum() +
(ht*dht).sum() backward with fixed random cotangents; `flat` lays it out as RESULT_NAMES."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

import lightning_ops as lo
from helpers import backward_probe, cu_seqlens_from_lengths, grads_of, log_gate
from lightning_ops import reference
from lightning_ops.chunk.constants import GAMMA_GATE, NO_GATE, SCALAR_GATE, VECTOR_GATE

F64 = torch.float64


@dataclass(frozen=True)
class Op:
    """A public op pair (chunk, fused_recurrent) and the gates it takes: `kind` the gate kind
    (lightning_ops/chunk/constants.py); `gamma`: a SCALAR_GATE op given a per-head g_gamma too;
    `slope`: the GAMMA_GATE decay passed as Lightning Attention's positional slope (-g_gamma)."""
    kind: int
    chunk: Callable
    recurrent: Callable
    gamma: bool = False
    slope: bool = False

    @property
    def has_gamma(self) -> bool:
        return self.kind == GAMMA_GATE or self.gamma

    def __call__(self, mode, q, k, v, g, g_gamma, **kw):
        fn = self.chunk if mode == "chunk" else self.recurrent
        if self.kind == NO_GATE:
            return fn(q, k, v, **kw)
        if self.slope:
            return fn(q, k, v, -g_gamma, **kw)
        if self.kind == VECTOR_GATE:
            return fn(q, k, v, g, **kw)
        return fn(q, k, v, g=g, g_gamma=g_gamma, **kw)


OPS: Dict[str, Op] = {
    "linear": Op(NO_GATE, lo.chunk_linear_attn, lo.fused_recurrent_linear_attn),
    "simple_g": Op(SCALAR_GATE, lo.chunk_simple_gla, lo.fused_recurrent_simple_gla),
    "simple_gamma": Op(GAMMA_GATE, lo.chunk_simple_gla, lo.fused_recurrent_simple_gla),
    "simple_both": Op(SCALAR_GATE, lo.chunk_simple_gla, lo.fused_recurrent_simple_gla,
                      gamma=True),
    "lightning": Op(GAMMA_GATE, lo.lightning_attn, lo.fused_recurrent_lightning_attn,
                    slope=True),
    "gla": Op(VECTOR_GATE, lo.chunk_gla, lo.fused_recurrent_gla),
}

GRAD_NAMES = ("q", "k", "v", "g", "h0")
RESULT_NAMES = ("o", "ht") + tuple("d" + n for n in GRAD_NAMES)


def make_inputs(op: str, B, T, H, K, V, *, lengths: Optional[Sequence[int]] = None, N=None,
                h0=True, low=-0.5, gamma: Tuple[float, float] = (0.02, 0.2),
                dtype=torch.float32, state_dtype=None, device="cpu", seed=0):
    """Inputs of OPS[op] as a dict q, k, v, g, gamma, h0, cu (absent ones None), no gradients.
    q, k, v, h0 ~ N(0, 1) and g (log decays in (low, 0)) drawn in float64 and cast to dtype;
    g_gamma = -(gamma[0] + gamma[1] * U(0, 1)) per head. state_dtype (default: dtype): h0 and
    g_gamma cast once more, after dtype. N initial states: len(lengths) under varlen, else N or
    B. One generator, drawn in this order, so a seed fixes every value."""
    gen = torch.Generator().manual_seed(seed)
    spec = OPS[op]

    def randn(*s):
        return torch.randn(*s, generator=gen, dtype=F64).to(device=device, dtype=dtype)

    q, k, v = randn(B, T, H, K), randn(B, T, H, K), randn(B, T, H, V)
    g = g_gamma = None
    if spec.kind == SCALAR_GATE:
        g = log_gate(B, T, H, low=low, generator=gen).to(device=device, dtype=dtype)
    if spec.kind == VECTOR_GATE:
        g = log_gate(B, T, H, K, low=low, generator=gen).to(device=device, dtype=dtype)
    if spec.has_gamma:
        u = torch.rand(H, generator=gen, dtype=F64)
        g_gamma = (-(gamma[0] + gamma[1] * u)).to(device=device, dtype=state_dtype or dtype)
    cu = None if lengths is None else cu_seqlens_from_lengths(lengths, device=device)
    if N is None:
        N = B if lengths is None else len(lengths)
    s0 = None
    if h0:
        s0 = randn(N, H, K, V)
        s0 = s0 if state_dtype is None else s0.to(state_dtype)
    return dict(q=q, k=k, v=v, g=g, gamma=g_gamma, h0=s0, cu=cu)


def with_grad(x, dtype=None):
    """Leaf copies of the differentiable inputs (GRAD_NAMES): all in float64 for dtype=float64,
    else q, k, v, g cast to dtype (initial_state kept); g_gamma takes no gradient."""
    out = dict(x)
    for name in GRAD_NAMES:
        t = x[name]
        if t is None:
            continue
        t = t.detach()
        if dtype == F64:
            t = t.double()
        elif dtype is not None and name != "h0":
            t = t.to(dtype)
        out[name] = t.clone().requires_grad_(True)
    if dtype == F64 and x["gamma"] is not None:
        out["gamma"] = x["gamma"].double()
    return out


def run_op(op: str, mode: str, x, **kw):
    """OPS[op] in `mode` ("chunk" | "recurrent") on inputs x (its h0 and cu included)."""
    return OPS[op](mode, x["q"], x["k"], x["v"], x["g"], x["gamma"], initial_state=x["h0"],
                   cu_seqlens=x["cu"], **kw)


def run(x, fn):
    """(o, ht, grads): fn(x)'s outputs and the gradients of x's leaves (GRAD_NAMES)."""
    o, ht = fn(x)
    grads = grads_of(backward_probe([o, ht]), [x[n] for n in GRAD_NAMES])
    return o, ht, dict(zip(GRAD_NAMES, grads))


def reference_run(x, output_final_state=True, scale=None):
    """Float64 reference outputs and gradients for inputs x (on float64 leaf copies)."""
    r = with_grad(x, F64)
    return run(r, lambda r: reference.gated_linear_attn_ref(
        r["q"], r["k"], r["v"], r["g"], r["gamma"], scale, r["h0"], output_final_state, r["cu"]))


def flat(result):
    """(o, ht, grads) as a list in RESULT_NAMES order."""
    o, ht, grads = result
    return [o, ht] + [grads[n] for n in GRAD_NAMES]

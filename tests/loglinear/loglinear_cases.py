"""The inputs shared by the log-linear Triton tests (forward and backward): float64 tensors, the
cu_seqlens of given lengths and an initial state at given offsets; gates in (-0.5, 0) unless
`fill` asks for strong (-20 per token) or reset (-inf) gates."""
from __future__ import annotations

import math

import torch

import lightning_ops as lo
from lightning_ops.loglinear import LogLinearAttentionState
from helpers import cu_seqlens_from_lengths, triton_device

F64 = torch.float64
DEV = triton_device()


def make_inputs(B, T, G, H, K, V, L, lengths=None, offsets=None, fill=None, seed=0, device=DEV):
    """float64 inputs (gates in (-0.5, 0) unless fill), cu_seqlens and the initial state."""
    gen = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=gen, dtype=F64)  # noqa: E731
    x = dict(q=rn(B, T, G, K), k=rn(B, T, G, K), v=rn(B, T, H, V),
             g=-0.5 * torch.rand(B, T, H, generator=gen, dtype=F64),
             level_scales=torch.rand(B, T, H, L, generator=gen, dtype=F64))
    if fill == "strong":
        x["g"].fill_(-20.0)
    elif fill == "-inf":
        x["g"][:, [3, min(17, T - 1)], 0] = -math.inf
        x["g"][:, T // 2:T // 2 + 2, -1] = -math.inf
    cu = None if lengths is None else cu_seqlens_from_lengths(lengths, device)
    N = B if lengths is None else len(lengths)
    init = None
    if offsets is not None:  # every slot random: the ones absent at the offset are ignored
        init = (rn(N, H, L, K, V).to(device), torch.tensor(offsets, device=device))
    return {n: t.to(device) for n, t in x.items()}, cu, init


def assert_compiled_matches_eager(f, args, n_grad: int) -> None:
    """torch.compile(f, fullgraph=True) against eager f on the same inputs (the first n_grad
    of args take gradients; f returns (o, LogLinearAttentionState)): o, the final state, its
    offsets and every gradient bit-for-bit."""
    def run(fn):
        leaves = [t.detach().clone().requires_grad_() for t in args[:n_grad]]
        o, st = fn(*leaves, *args[n_grad:])
        gen = torch.Generator().manual_seed(7)
        ((o * torch.randn(o.shape, generator=gen).to(o)).sum() + st.ht.square().sum()).backward()
        return [o, st.ht, st.offsets] + [t.grad for t in leaves]

    eager = run(f)
    comp = run(torch.compile(f, fullgraph=True, backend="aot_eager"))
    for i, (a, b) in enumerate(zip(eager, comp)):
        assert torch.equal(a, b), i


def run_op(op, x, cu, init, dtype, want_final=True, chunk_size=16, backend="triton", grad=True,
           **kwargs):
    """o, state and (with grad) the gradients of one probe backward of a log-linear op (x the
    make_inputs tensors by name, init (ht, offsets) or None), on `backend`."""
    leaves = {n: t.detach().to(dtype).requires_grad_(grad) for n, t in x.items()}
    h0 = None
    if init is not None:
        h0 = LogLinearAttentionState(init[0].detach().float().requires_grad_(grad), init[1])
    with lo.use_backend(backend):
        o, st = op(**leaves, initial_state=h0, output_final_state=want_final, cu_seqlens=cu,
                   chunk_size=chunk_size, **kwargs)
    grads = {}
    if grad:
        gen = torch.Generator().manual_seed(123)
        loss = (o * torch.randn(o.shape, generator=gen, dtype=F64).to(o)).sum()
        if want_final:
            dht = torch.randn(st.ht.shape, generator=gen, dtype=F64).to(st.ht)
            loss = loss + (st.ht * dht).sum()
        loss.backward()
        grads = {n: t.grad for n, t in leaves.items()}
        if h0 is not None:
            grads["h0"] = h0.ht.grad
    return o, st, grads

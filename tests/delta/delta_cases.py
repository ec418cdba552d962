"""Shared cases and the comparison harness of the delta-rule tests (torch and Triton backends).

A case is run through the public op and through reference.gated_delta_rule_ref with the same
inputs; o, the final state and every gradient (q, k, v, g, beta, initial_state) from one
(o*do).sum() + (ht*dht).sum() backward are compared."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

import lightning_ops as lo
from helpers import (assert_close, backward_probe, cu_seqlens_from_lengths, grads_of,
                     leaf_copies, log_gate)
from lightning_ops import reference


@dataclass
class Case:
    B: int = 1
    T: int = 1
    H: int = 1
    K: int = 16
    V: int = 16
    HV: Optional[int] = None  # value heads (grouped when a multiple of H)
    gated: bool = True
    vector: bool = False  # KDA: a per-channel gate g [B, T, HV, K] (with gated=True)
    l2: bool = False
    h0: bool = True
    final: bool = True
    lengths: Optional[Sequence[int]] = None  # varlen: B == 1, T == sum(lengths)
    mode: str = "chunk"
    scale: Optional[float] = None

    @property
    def id(self) -> str:
        kind = "kda" if self.vector else "gdn" if self.gated else "dn"
        s = (f"{kind}-{self.mode[:3]}-B{self.B}T{self.T}H{self.H}"
             f"HV{self.HV or self.H}K{self.K}V{self.V}")
        s += "-l2" if self.l2 else ""
        s += "" if self.h0 else "-noh0"
        s += "" if self.final else "-nofinal"
        s += f"-var{len(self.lengths)}" if self.lengths else ""
        s += "" if self.scale is None else f"-s{self.scale}"
        return s


CASES = [
    Case(T=1),                                                        # one token, B=H=1
    Case(B=2, T=37, H=2, K=32, V=16, gated=False),                    # T < chunk, no gate
    Case(B=2, T=37, H=2, K=32, V=16, l2=True),
    Case(T=150, H=2, K=20, V=12, l2=True),                            # T % 64 != 0, odd dims
    Case(T=150, H=2, K=20, V=12, gated=False, h0=False),
    Case(T=70, H=2, HV=4, K=16, V=8, l2=True),                        # grouped value heads
    Case(T=70, H=1, HV=3, K=8, V=24, gated=False),
    Case(T=100, H=2, K=16, V=32, lengths=[1, 1, 64, 0, 34], l2=True),  # varlen, 1- and 0-length
    Case(T=100, H=2, K=16, V=32, lengths=[1, 1, 64, 0, 34], gated=False, h0=False),
    Case(T=67, H=2, HV=4, K=8, V=8, lengths=[65, 1, 1], final=False),  # varlen + groups
    Case(T=20, K=128, V=256, l2=True, scale=0.3),                     # large head dims
    Case(T=20, K=256, V=64, gated=False),
    Case(T=9, H=2, K=16, V=8, mode="recurrent", l2=True),             # token-by-token path
    Case(T=9, H=2, K=16, V=8, mode="recurrent", gated=False, lengths=[4, 1, 4]),
    Case(T=40, H=2, HV=4, K=16, V=8, mode="recurrent"),               # recurrent, chunk path
]
# KDA (per-channel gates): the same matrix over the vector-gate paths
KDA_CASES = [
    Case(T=1, vector=True),
    Case(B=2, T=37, H=2, K=32, V=16, vector=True, l2=True),
    Case(T=150, H=2, K=20, V=12, vector=True, l2=True),               # 3 chunks, odd dims
    Case(T=70, H=2, HV=4, K=16, V=8, vector=True),                    # grouped value heads
    Case(T=100, HV=2, K=16, V=32, lengths=[1, 1, 64, 0, 34], vector=True, l2=True),
    Case(T=67, H=2, HV=4, K=8, V=8, lengths=[65, 1, 1], vector=True, final=False, h0=False),
    Case(T=20, K=128, V=64, vector=True, l2=True, scale=0.3),         # large head dims
    Case(T=9, H=2, HV=4, K=16, V=8, mode="recurrent", vector=True, l2=True, lengths=[4, 1, 4]),
    Case(B=2, T=5, K=32, V=16, mode="recurrent", vector=True),
]


def make_inputs(c: Case, dtype=torch.float64, device="cpu", seed=0):
    """Leaf tensors (q, k, v, g, beta, h0) in `dtype` (g / h0 None when absent), cotangents
    (do, dht) and cu_seqlens. Keys are unnormalised with l2=True (the kernel normalises them);
    otherwise they are l2-normalised here, as delta-rule models feed them."""
    gen = torch.Generator().manual_seed(seed)
    HV = c.HV or c.H
    B = c.B
    N = len(c.lengths) if c.lengths else B

    def rnd(*shape, s=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * s

    q = rnd(B, c.T, c.H, c.K, s=2.0 if c.l2 else 1.0)
    k = rnd(B, c.T, c.H, c.K, s=3.0)
    if not c.l2:
        k = reference.l2norm(k)
    v = rnd(B, c.T, HV, c.V)
    g_shape = (B, c.T, HV, c.K) if c.vector else (B, c.T, HV)
    g = log_gate(*g_shape, low=-1.0, generator=gen) if c.gated else None
    beta = torch.rand(B, c.T, HV, generator=gen, dtype=torch.float64) * 1.9 + 0.05
    h0 = rnd(N, HV, c.K, c.V) if c.h0 else None
    cu = cu_seqlens_from_lengths(c.lengths) if c.lengths else None
    cast = [None if x is None else x.to(device, dtype) for x in (q, k, v, g, beta, h0)]
    return cast, cu if cu is None else cu.to(device)


def run_op(c: Case, inputs, cu):
    """The public op on leaf copies of inputs: (outputs [o, ht], leaves)."""
    leaves = leaf_copies(inputs)
    q, k, v, g, beta, h0 = leaves
    kw = dict(scale=c.scale, initial_state=h0, output_final_state=c.final, cu_seqlens=cu,
              use_qk_l2norm_in_kernel=c.l2)
    if c.vector:
        fn = lo.chunk_kda if c.mode == "chunk" else lo.fused_recurrent_kda
        o, ht = fn(q, k, v, g, beta, **kw)
    elif c.gated:
        fn = lo.chunk_gated_delta_rule if c.mode == "chunk" else lo.fused_recurrent_gated_delta_rule
        o, ht = fn(q, k, v, g, beta, **kw)
    else:
        fn = lo.chunk_delta_rule if c.mode == "chunk" else lo.fused_recurrent_delta_rule
        o, ht = fn(q, k, v, beta, **kw)
    return [o, ht], leaves


def run_ref(c: Case, inputs, cu):
    """reference.gated_delta_rule_ref on leaf copies of inputs: (outputs [o, ht], leaves)."""
    leaves = leaf_copies(inputs)
    q, k, v, g, beta, h0 = leaves
    o, ht = reference.gated_delta_rule_ref(q, k, v, g, beta, c.scale, h0, c.final, cu, c.l2)
    return [o, ht], leaves


NAMES = ["q", "k", "v", "g", "beta", "initial_state"]


def outputs_and_grads(outs, leaves):
    grads = grads_of(backward_probe(outs), leaves)
    return dict(o=outs[0], final_state=outs[1], **{f"d{n}": gr for n, gr in zip(NAMES, grads)})


def compare(c: Case, got: dict, want: dict, tol: float, metric) -> None:
    if not c.final:
        assert got["final_state"] is None
    for name, expected in want.items():
        assert_close(f"{c.id}: {name}", got[name], expected, tol, metric)

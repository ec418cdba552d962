"""LION: bidirectional ("full") linear attention with a decay mask (Afzal et al., 2025,
"Linear Attention for Efficient Bidirectional Sequence Modeling"), over the causal chunk engine.

    o_i = scale * sum_j M_ij (q_i . k_j) v_j   over ALL j of i's sequence,
    M_ij = exp(sum_{t in [j, i)} g_t)  for j <= i
    M_ij = exp(sum_{t in (i, j]} g_t)  for j >  i

i.e. a key j is decayed by its own gate and by the gates of every token between it and the
query, never by the query's gate: the mask of the authors' code (their `Causal_Mask_Selective`
and RNN form; the paper's displayed recurrence puts the gate on the query instead, a one-token
shift of the same model). Log decays g_t = g[b, t, h] (+ g_gamma[h]), both optional:
  LION-LIT: no gate (M = 1, plain full linear attention),
  LION-D:   g_gamma [H], a fixed per-head decay (M_ij = exp(g_gamma)^|i - j|, RetNet-like),
  LION-S:   g [B, T, H], a data-dependent scalar decay.
A -inf gate at token r: no other token sees r's key and no token sees across r (r itself still
reads both sides).

How it is computed, with no T x T matrix (memory linear in T), through the public causal op
(whose recurrence is S_t = exp(f_t) S_{t-1} + k_t v_t^T, range (j, i] of f):
  causal part     o^F = the causal op with f_t = g_{t-1} (0 at a sequence start): [j, i) of g
  strict upper    o^B_i = exp(g_{i+1}) q_i^T S^B_{i+1},  S^B_i = exp(g_{i+1}) S^B_{i+1} + k_i v_i^T
                  = the causal op on the per-sequence time-reversed (k, v, g shifted by one),
                    queried one step earlier with q~_i = exp(g_{i+1}) q_i: no diagonal term to
                    subtract (no cancellation), exact for -inf gates (exp(-inf) q = 0).
Both directions run as ONE call of the causal op: the reversed copy is stacked along the batch
(or appended as more packed sequences under cu_seqlens), so every backend (torch, Triton, CUDA)
and its backward come for free, and a small batch still fills the device. Time reversal and the
query shift are one index per token (rev(t) = bos + eos - 1 - t, rev(t) - 1), built on the device
from cu_seqlens (no host sync); both are involutions, so their backward is the same gather (no
scatter-add, deterministic). Gate shifts are rolls with the sequence ends masked.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import validation as V
from ..gla.ops import chunk_linear_attn, chunk_simple_gla

Tensor = torch.Tensor


class _Involution(torch.autograd.Function):
    """x.index_select(1, idx) for an index that is its own inverse (idx[idx] = arange): the
    backward is the same gather (no scatter-add, deterministic)."""

    @staticmethod
    def forward(ctx, x: Tensor, idx: Tensor) -> Tensor:
        ctx.save_for_backward(idx)
        return x.index_select(1, idx)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (idx,) = ctx.saved_tensors
        return grad.index_select(1, idx), None


def _involution(x: Tensor, idx: Tensor) -> Tensor:
    return _Involution.apply(x, idx)


def lion_indices(T: int, cu_seqlens: Optional[Tensor], device) -> tuple:
    """(rev [T], shift [T], has_next [T] bool): rev(t) = bos + eos - 1 - t reverses each
    sequence; shift(t) = rev(t) - 1 for tokens that have a successor in their sequence (itself
    otherwise), has_next marks them. Both indices are involutions."""
    t = torch.arange(T, device=device)
    if cu_seqlens is None:
        bos = torch.zeros_like(t)
        eos = torch.full_like(t, T)
    else:
        cu = cu_seqlens.to(device=device, dtype=torch.int64)
        seg = torch.searchsorted(cu[1:].contiguous(), t, right=True).clamp_max(cu.numel() - 2)
        bos, eos = cu[seg], cu[seg + 1]
    rev = bos + eos - 1 - t
    has_next = t < eos - 1
    shift = torch.where(has_next, rev - 1, t)
    return rev, shift, has_next


def lion_attn(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor] = None,
              g_gamma: Optional[Tensor] = None, scale: Optional[float] = None,
              cu_seqlens: Optional[Tensor] = None) -> Tensor:
    """Bidirectional linear attention with a decay mask (LION-LIT / -D / -S, see the module doc).

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V].
        g: [B, T, H] data-dependent log decays (<= 0; -inf is a hard boundary), LION-S.
        g_gamma: [H] fixed per-head log decay (<= 0), LION-D. Takes a gradient when it requires
            one. g and g_gamma add when both are given; neither: LION-LIT.
        scale: default K ** -0.5.
        cu_seqlens: [N + 1] (B == 1) packs N sequences; each is bidirectional on its own.
    Returns o [B, T, H, V] in v's dtype. (No state: a bidirectional op has none to carry; the
    LION normalisation, o / (q . sum_j M_ij k_j), is a v column of ones away, see layers.LION.)
    """
    B, T, H, K, _ = V.qkv_dims(q, k, v, max_key=V.MAX_GLA_KEY_DIM)
    V.check_tensor("g", g, (B, T, H), "[B, T, H]", q)
    V.check_tensor("g_gamma", g_gamma, (H,), "[H]", q)
    V.check_scale(scale)
    V.check_cu_seqlens(cu_seqlens, B, T, q)
    rev, shift, has_next = lion_indices(T, cu_seqlens, q.device)
    keep = has_next.view(1, T, 1, 1)
    # gates of the walks: forward g_{t-1} (0 at a start), backward g_{t+1} (0 at an end)
    gf = gn = None
    if g is not None:
        first = _involution(has_next.view(1, T, 1), rev)  # has a predecessor
        gf = torch.where(first, g.roll(1, 1), g.new_zeros(()))
        gn = torch.where(has_next.view(1, T, 1), g.roll(-1, 1), g.new_zeros(()))
    # the reversed pass is queried one step earlier: q~_i = exp(g_{i+1}) q_i at i+1's slot
    qe = q
    if g is not None or g_gamma is not None:
        cd = torch.promote_types(q.dtype, torch.float32)
        lg = torch.zeros((), dtype=cd, device=q.device)
        if gn is not None:
            lg = lg + gn.to(cd)
        if g_gamma is not None:
            lg = lg + g_gamma.to(cd)
        qe = (q.to(cd) * lg.exp().expand(B, T, H)[..., None]).to(q.dtype)
    qb = torch.where(keep, _involution(qe, shift), qe.new_zeros(()))
    kb, vb = _involution(k, rev), _involution(v, rev)
    if cu_seqlens is None:   # both directions in one call: stacked along the batch
        cat, cu2 = (lambda a, b: torch.cat([a, b], 0)), None
    else:                    # or as N more packed sequences
        cat = lambda a, b: torch.cat([a, b], 1)  # noqa: E731
        cu2 = torch.cat([cu_seqlens, cu_seqlens[1:] + T])
    q2, k2, v2 = cat(q, qb), cat(k, kb), cat(v, vb)
    if g is None and g_gamma is None:
        o2, _ = chunk_linear_attn(q2, k2, v2, scale=scale, cu_seqlens=cu2)
    else:
        g2 = None if g is None else cat(gf, _involution(gn, rev))
        o2, _ = chunk_simple_gla(q2, k2, v2, g=g2, g_gamma=g_gamma, scale=scale,
                                 cu_seqlens=cu2)
    if cu_seqlens is None:
        of, ob = o2[:B], o2[B:]
    else:
        of, ob = o2[:, :T], o2[:, T:]
    upper = torch.where(keep, _involution(ob, shift), ob.new_zeros(()))
    return of + upper

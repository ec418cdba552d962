"""Chunked PyTorch engine of the delta-rule family (DeltaNet, Gated DeltaNet): the CPU default
and the executable spec of the Triton kernels.

    S_t = exp(g_t) S_{t-1};  S_t += beta_t k_t (v_t - S_t^T k_t)^T;  o_t = scale * S_t^T q_t

Per chunk of C tokens (b = chunk-local cumsum of g, all <= 0; S the state before the chunk),
the WY/UT representation turns the C sequential rank-1 updates into one triangular solve:

  A_ij = beta_i (k_i . k_j) exp(b_i - b_j)   (j < i)       L = I + A  (unit lower triangular)
  u = L^-1 (beta v),  w = L^-1 (beta exp(b) k)              (chunk-local, no state needed)
  v_new = u - w S                                           (the effective values written)
  S'    = exp(b_last) S + (k exp(b_last - b))^T v_new       (inter-chunk state passing)
  o     = (scale q exp(b)) S + [(scale q k^T) * exp(b_i - b_j)]_{j <= i} v_new

From there on the math is the GLA family's with a scalar gate and v_new for v, so this module
reuses the chunk engine (lightning_ops.chunk.torch) for the layout (ChunkLayout: varlen,
padding, chunk groups), the gate cumsum and factors, the state loops (scan_group /
scan_group_reverse) and the output (chunk_output). The delta-specific parts: the WY transform
and the v_new dependence of the state loop. Like the GLA engine, forward and backward walk the
stream a group of chunks at a time; the backward's first pass keeps each group's WY pieces and
states for its second, reverse pass (recomputing the WY transform would cost more than keeping
it). Written with b_t = sum_{s<=t} g_s for short, but every decay is computed from its own gates
(prefix, suffix and segment sums, see the chunk engine's "Gates"), never as a difference of
cumsums: reset gates (-inf) and huge gates are exact. The decay mask is built once per group and
shared by the k k^T and q k^T scores.

Backward is hand-written: the reverse state loop carries dS through v_new = u - w S, then every
chunk-local gradient is batched. The solve's adjoint is a matmul with the stored inverse
(d rhs = L^-T [du | dw], dA = -tril(d rhs [u | w]^T, -1)). The gate gradient sums, for every
g_s, only the terms whose decay contains it (pair decays of both score matrices, exp(b) in q and
w, exp(b_last - b) in the state update, exp(b_last) on the state): accurate relative to its own
size at strong decays. Non-finite inputs: lightning_ops.nonfinite.NonFiniteGuard.

Grouped value heads (HV = m * H): q and k are repeated to HV heads before chunking and their
gradients summed back over each group. The in-kernel l2 norm of q, k (reference.l2norm) is
applied first, its gradient by hand. Varlen reads the lengths on the host (ChunkLayout).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..chunk.constants import RECURRENT_MAX_T, TORCH_CHUNK
from ..chunk.torch import (
    ChunkGroup,
    ChunkLayout,
    causal_decay_mask,
    causal_scores,
    chunk_output,
    chunk_size_for,
    gate_factors,
    group_chunks,
    gate_grad,
    intra_chunk_scores,
    intra_chunk_scores_backward,
    longest,
    mul_if,
    pair_gate_grad,
    scan_group,
    scan_group_reverse,
)
from ..nonfinite import NonFiniteGuard
from ..precision import accumulation_dtype
from .l2norm import l2norm, l2norm_backward

Tensor = torch.Tensor


def _chunk_size(mode: str, max_len: int) -> int:
    # C=64 measured best on CPU for K=V=64 (fewer Python steps in the state loop vs O(T*C)
    # intra work and the C x C solve); mode="recurrent" runs one-token chunks up to
    # RECURRENT_MAX_T tokens (the literal token-by-token recurrence).
    if mode == "recurrent" and max_len <= RECURRENT_MAX_T:
        return 1
    return chunk_size_for(max_len, TORCH_CHUNK)


@dataclass
class _Setup:
    """What every group of a call shares: the layout, q and k after the optional l2 norm (kept
    for its backward) and the head repeat, the initial states."""
    layout: ChunkLayout
    dt: torch.dtype
    groups: list
    qn: Tensor  # [B, T, H, K], compute dtype
    kn: Tensor
    rq: Optional[Tensor]
    rk: Optional[Tensor]
    qh: Tensor  # [B, T, HV, K]
    kh: Tensor
    h0: Tensor  # [N, HV, K, V], sequence order


@dataclass
class _Chunked:
    """One group's inputs in the chunk stream [n, HV, C, *], compute dtype; q already times
    scale (None where a pass does not need it)."""
    q: Optional[Tensor]
    k: Tensor
    v: Tensor
    beta: Tensor  # [n, HV, C, 1]
    g: Optional[Tensor]  # [n, HV, C] per-token log decays, 0 in padding


def _setup(q, k, v, initial_state, cu_seqlens, use_l2, mode) -> _Setup:
    B, T, H, K = q.shape
    HV, Vd = v.shape[2:]
    layout = ChunkLayout.build(B, T, cu_seqlens, _chunk_size(mode, longest(T, cu_seqlens)),
                               q.device)
    dt = accumulation_dtype(q)
    qn, kn, rq, rk = q.to(dt), k.to(dt), None, None
    if use_l2:
        (qn, rq), (kn, rk) = l2norm(qn), l2norm(kn)
    qh, kh = qn, kn
    if HV != H:
        qh, kh = qn.repeat_interleave(HV // H, 2), kn.repeat_interleave(HV // H, 2)
    h0 = (q.new_zeros(layout.N, HV, K, Vd, dtype=dt) if initial_state is None
          else initial_state.to(dt))
    groups = layout.groups(group_chunks(HV, layout.C, K, Vd, dt))
    return _Setup(layout, dt, groups, qn, kn, rq, rk, qh, kh, h0)


def _pack_group(s: _Setup, grp: ChunkGroup, v, g, beta, scale, with_q: bool = True
                ) -> _Chunked:
    L, dt = s.layout, s.dt
    return _Chunked(L.pack(s.qh, dt, grp).mul_(scale) if with_q else None, L.pack(s.kh, dt, grp),
                    L.pack(v, dt, grp), L.pack(beta, dt, grp)[..., None],
                    None if g is None else L.pack(g, dt, grp))


def _scores(x: Tensor, y: Tensor, g: Optional[Tensor], D: Optional[Tensor] = None):
    """(D, (x y^T) * decay) with zeros above the diagonal. Scalar gates (and none) share the
    [C, C] decay mask D (built here when not given); vector gates (KDA) use the GLA engine's
    sub-chunked scores, where the decay differs per channel (D is None)."""
    if g is not None and g.dim() == 4:
        return None, intra_chunk_scores(x, y, g)
    if D is None:
        D = causal_decay_mask(g, x.shape[2], x)
    return D, causal_scores(x, y, D)


def _scores_backward(dA: Tensor, x: Tensor, y: Tensor, g: Optional[Tensor],
                     D: Optional[Tensor]):
    """(dx, dy, dg through the pair decays: vector gates only, else None) of _scores."""
    if g is not None and g.dim() == 4:
        dx, dy, _, dg = intra_chunk_scores_backward(dA, x, y, g)
        return dx, dy, dg
    dS = dA * D
    return dS @ y, dS.transpose(-1, -2) @ x, None


def _unit_lower_inverse(Akk: Tensor, beta: Tensor) -> Tensor:
    """(I + tril(beta * Akk, -1))^-1, batched over [NC, HV]. Solving against a broadcast
    identity is several times faster on CPU than solving against the [C, V] / [C, K]
    right-hand sides, and the inverse turns the backward's transposed solve into a matmul."""
    L = (Akk * beta).tril_(-1)
    eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device).expand_as(L)
    return torch.linalg.solve_triangular(L, eye, upper=False, unitriangular=True)


@dataclass
class _Forward:
    """Every forward intermediate of one group that the backward reuses (all [n, HV, ...],
    compute dtype)."""
    q_decay: Optional[Tensor]  # exp(b)           [.., C, 1]
    k_decay: Optional[Tensor]  # exp(b_last - b)  [.., C, 1]
    chunk_decay: Optional[Tensor]  # exp(b_last)  [.., 1, 1]
    D: Optional[Tensor]  # decay mask (None for vector gates)
    Akk: Tensor  # (k k^T) * D
    Tinv: Tensor  # (I + tril(beta Akk, -1))^-1
    kb: Tensor  # beta exp(b) k
    u: Tensor  # Tinv beta v
    w: Tensor  # Tinv kb
    kd: Tensor  # k exp(b_last - b)
    v_new: Tensor  # u - w S
    states: Tensor  # S before each chunk


def _forward_states(layout: ChunkLayout, grp: ChunkGroup, x: _Chunked, h: Tensor
                    ) -> Tuple[_Forward, Tensor]:
    """The WY transform and the state loop of one group; h: the states before the group
    (stream order) -> after it."""
    q_decay, k_decay, chunk_decay = gate_factors(x.g)
    D, Akk = _scores(x.k, x.k, x.g)
    Tinv = _unit_lower_inverse(Akk, x.beta)
    kb = mul_if(x.k * x.beta, q_decay)
    u, w = Tinv @ (x.v * x.beta), Tinv @ kb
    kd = mul_if(x.k, k_decay)
    kdT = kd.transpose(-1, -2)
    v_new = torch.empty_like(u)

    def step(sl, h):
        # v_new = u - w S ;  S' = exp(b_last) S + kd^T v_new
        vn = torch.baddbmm(u[sl].flatten(0, 1), w[sl].flatten(0, 1), h.flatten(0, 1),
                           alpha=-1).view(u[sl].shape)
        v_new[sl] = vn
        return mul_if(h, None if chunk_decay is None else chunk_decay[sl]) + kdT[sl] @ vn

    states, h = scan_group(layout, grp, h, step)
    return _Forward(q_decay, k_decay, chunk_decay, D, Akk, Tinv, kb, u, w, kd, v_new,
                    states), h


def _token_walk(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                use_l2):
    """mode "recurrent" up to RECURRENT_MAX_T tokens: the recurrence itself, token by token
    (a decode step does only the step's work: no chunk layout, no solve). Varlen sequences are
    padded to the longest with zero tokens (beta = g = 0 leaves a state exactly as it is).
    Non-finite inputs reach only what follows them, as in the recurrence.

    Per token, with D = diag(exp(g_t)) (a scalar per head, or per key channel for KDA) and S
    the state before it: e = beta v - (beta D k)^T S, S_t = D S + k e^T (one scaling pass, one
    in-place rank-1 update), o = scale q^T S_t: three batched matmuls and four passes over the
    state. Torch's per-op overhead, not the arithmetic, dominates a step at decode sizes, so
    the token loop works on views of [N * HV, L, ...] rows (no per-token reshapes or copies)."""
    B, T, H, K = q.shape
    HV, Vd = v.shape[2:]
    dt = accumulation_dtype(q)
    as_dt = lambda x: x if x is None or x.dtype == dt else x.to(dt)  # noqa: E731
    qn, kn = as_dt(q), as_dt(k)
    if use_l2:
        qn, kn = l2norm(qn)[0], l2norm(kn)[0]
    if HV != H:
        qn, kn = qn.repeat_interleave(HV // H, 2), kn.repeat_interleave(HV // H, 2)
    xs = [qn, kn, as_dt(v), as_dt(beta), as_dt(g)]
    if cu_seqlens is not None:  # [1, T] packed -> [N, longest] padded
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        L = max(lengths, default=0)
        pos = torch.arange(L, device=q.device)
        valid = pos[None, :] < torch.tensor(lengths, device=q.device)[:, None]
        idx = (cu_seqlens[:-1, None].to(pos.dtype) + pos[None, :]).clamp(max=max(T - 1, 0))
        xs = [None if x is None else torch.where(
            valid.view(*valid.shape, *[1] * (x.dim() - 2)), x[0][idx], 0.) for x in xs]
    qs, ks, vs, bs, gs = xs
    N, L = ks.shape[:2]
    M = N * HV  # the batched-matmul batch: one (sequence, value head) state each

    def rows(x, *tail):  # [N, L, HV, ...] -> [M, L, *tail] (a view when L == 1)
        return (x if L == 1 else x.transpose(1, 2)).reshape(M, L, *tail)

    bk = ks * bs[..., None]  # beta k; e = beta v - (beta D k)^T S in one baddbmm
    if gs is not None:
        decay = gs.exp()  # [N, L, HV] or [N, L, HV, K]
        bk = bk * (decay[..., None] if gs.dim() == 3 else decay)
        dS = rows(decay, 1, 1) if gs.dim() == 3 else rows(decay, K, 1)
    bk, bv = rows(bk, 1, K), rows(vs * bs[..., None], 1, Vd)
    kc, qr = rows(ks, K, 1), rows(qs, 1, K)
    # never updated in place: the initial state itself is safe to start from
    S = torch.zeros(M, K, Vd, dtype=dt, device=q.device) if initial_state is None else \
        as_dt(initial_state).reshape(M, K, Vd)
    own = False  # S is the caller's initial state until the first update copies it
    outs = []
    for t in range(L):
        e = torch.baddbmm(bv.select(1, t), bk.select(1, t), S, alpha=-1)  # [M, 1, V]
        if gs is None:
            S = S if own else S.clone()
        else:
            S = S.mul_(dS.select(1, t)) if own else S * dS.select(1, t)
        own = True
        S.baddbmm_(kc.select(1, t), e)
        outs.append(torch.bmm(qr.select(1, t), S))  # [M, 1, V]
    if L == 1:
        o = outs[0].view(N, 1, HV, Vd)
    else:  # token-major and dense, as the custom op's fake promises
        o = torch.stack([x.view(N, HV, Vd) for x in outs], 1) if outs else \
            vs.new_empty(N, 0, HV, Vd)
    o = o.mul_(scale)
    if cu_seqlens is not None:
        o = o[valid].unsqueeze(0)
    final = None
    if output_final_state:  # never the caller's tensor (no token updated it when L == 0)
        final = (S if own else S.clone()).view(N, HV, K, Vd)
    return o.to(v.dtype), final


def forward(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
            use_qk_l2norm_in_kernel, mode):
    if mode == "recurrent" and longest(q.shape[1], cu_seqlens) <= RECURRENT_MAX_T:
        return _token_walk(q, k, v, g, beta, scale, initial_state, output_final_state,
                           cu_seqlens, use_qk_l2norm_in_kernel)
    guard = NonFiniteGuard.build(k, v, (g,), (beta,), cu_seqlens=cu_seqlens)
    if guard is not None:
        k, v, (g,), (beta,) = guard.clean(k, v, (g,), (beta,))
    s = _setup(q, k, v, initial_state, cu_seqlens, use_qk_l2norm_in_kernel, mode)
    layout = s.layout
    o = v.new_empty(v.shape)
    h = layout.to_stream_order(s.h0).clone()
    for grp in s.groups:  # one group of chunks at a time (see chunk.constants.GROUP_BYTES)
        x = _pack_group(s, grp, v, g, beta, scale)
        f, h = _forward_states(layout, grp, x, h)
        _, Aqk = _scores(x.q, x.k, x.g, f.D)
        layout.unpack_into(o, chunk_output(mul_if(x.q, f.q_decay), f.states, Aqk, f.v_new),
                           grp)
        del x, f, Aqk
    final = layout.to_sequence_order(h) if output_final_state else None
    return (o, final) if guard is None else guard.poison(o, final)


def backward(q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm_in_kernel, mode,
             do, dht):
    """Two passes over the chunk groups: forward (the WY transform and the state loop, each
    group's pieces kept for its backward), then backward from the last group."""
    guard = NonFiniteGuard.build(k, v, (g,), (beta,), cu_seqlens=cu_seqlens)
    if guard is not None:
        k, v, (g,), (beta,) = guard.clean(k, v, (g,), (beta,))
        do, dht = guard.clean_grads(do, dht)
    s = _setup(q, k, v, initial_state, cu_seqlens, use_qk_l2norm_in_kernel, mode)
    layout, dt, groups = s.layout, s.dt, s.groups
    T_ = lambda t: t.transpose(-1, -2)  # noqa: E731
    h = layout.to_stream_order(s.h0).clone()
    fs = []
    for i, grp in enumerate(groups):
        x = _pack_group(s, grp, v, g, beta, scale, with_q=i == len(groups) - 1)
        f, h = _forward_states(layout, grp, x, h)
        fs.append(f)
    del h
    dht = torch.zeros_like(s.h0) if dht is None else dht.to(dt)
    dh = layout.to_stream_order(dht).clone()

    B, T, H, K = q.shape
    HV = v.shape[2]
    post = HV != H or use_qk_l2norm_in_kernel  # dq, dk go through head sums / the l2 norm
    dq_all = torch.empty(B, T, HV, K, dtype=dt if post else q.dtype, device=q.device)
    dk_all = torch.empty(B, T, HV, K, dtype=dt if post else k.dtype, device=k.device)
    dv_all, dbeta_all = v.new_empty(v.shape), beta.new_empty(beta.shape)
    dg_all = None if g is None else g.new_empty(g.shape)
    for grp in reversed(groups):
        if grp is not groups[-1]:
            x = _pack_group(s, grp, v, g, beta, scale)
        f = fs.pop()
        qi = mul_if(x.q, f.q_decay)
        _, Aqk = _scores(x.q, x.k, x.g, f.D)
        doc = layout.pack(do, dt, grp)

        # Reverse state loop; with E the state after a chunk:
        #   dv_new = Aqk^T do + kd dE ;  dS = exp(b_last) dE + qi^T do - w^T dv_new
        q_pull, o_pull, wT = T_(qi) @ doc, T_(Aqk) @ doc, T_(f.w)
        dv_new = torch.empty_like(f.v_new)

        def step(sl, dE):
            dvn = torch.baddbmm(o_pull[sl].flatten(0, 1), f.kd[sl].flatten(0, 1),
                                dE.flatten(0, 1)).view(dE.shape[0], *o_pull.shape[1:])
            dv_new[sl] = dvn
            return q_pull[sl] + mul_if(dE, None if f.chunk_decay is None
                                       else f.chunk_decay[sl]) - wT[sl] @ dvn

        dE, dh = scan_group_reverse(layout, grp, dh, step)

        # o = qi S + (q k^T * D) v_new
        dAqk = doc @ T_(f.v_new)
        dqi = doc @ T_(f.states)
        dq, dk, dg_qk = _scores_backward(dAqk, x.q, x.k, x.g, f.D)
        dq += mul_if(dqi, f.q_decay)
        # E = exp(b_last) S + kd^T v_new
        dkd = f.v_new @ T_(dE)
        dk += mul_if(dkd, f.k_decay)
        # v_new = u - w S with u = Tinv (beta v), w = Tinv kb: the solve's adjoint
        dvb = T_(f.Tinv) @ dv_new
        dkb = -(T_(f.Tinv) @ (dv_new @ T_(f.states)))
        dA = -(dvb @ T_(f.u) + dkb @ T_(f.w)).tril_(-1)  # d of tril(beta Akk, -1)
        dbeta = (dA * f.Akk).sum(-1, keepdim=True) + (dvb * x.v).sum(-1, keepdim=True) \
            + (dkb * mul_if(x.k, f.q_decay)).sum(-1, keepdim=True)
        layout.unpack_into(dv_all, dvb * x.beta, grp)
        layout.unpack_into(dbeta_all, dbeta[..., 0], grp)
        dk += mul_if(dkb, f.q_decay) * x.beta
        dAkk = dA * x.beta
        dk1, dk2, dg_kk = _scores_backward(dAkk, x.k, x.k, x.g, f.D)  # k in both roles
        dk += dk1 + dk2
        layout.unpack_into(dq_all, dq.mul_(scale), grp)
        layout.unpack_into(dk_all, dk, grp)

        if x.g is not None:
            # The pair decays of both score matrices, exp(prefix) in qi and kb, exp(suffix) in
            # kd, exp(total) on the carried state: each summed only where it contains g_s.
            from_prefix = dqi * qi + dkb * f.kb
            from_suffix = dkd * f.kd
            from_total = (f.states * f.chunk_decay * dE).sum(-1)  # [n, HV, K]
            if x.g.dim() == 3:  # scalar gate: one decay per head
                from_pairs = pair_gate_grad(dAqk * Aqk + dAkk * f.Akk)
                from_prefix, from_suffix = from_prefix.sum(-1), from_suffix.sum(-1)
                from_total = from_total.sum(-1)
            else:  # KDA: the pair decays' share came with the score gradients
                from_pairs = dg_qk + dg_kk
            layout.unpack_into(dg_all, gate_grad(from_prefix, from_suffix, from_total,
                                                 from_pairs), grp)
        del x, f, step

    # Back to tokens: undo the head repeat and the l2 norm.
    dqt, dkt = dq_all, dk_all
    if HV != H:
        dqt = dqt.view(B, T, H, HV // H, K).sum(3)
        dkt = dkt.view(B, T, H, HV // H, K).sum(3)
    if use_qk_l2norm_in_kernel:
        dqt, dkt = l2norm_backward(dqt, s.qn, s.rq), l2norm_backward(dkt, s.kn, s.rk)
    dh0 = layout.to_sequence_order(dh)
    return (dqt.to(q.dtype), dkt.to(k.dtype), dv_all, dg_all, dbeta_all,
            None if initial_state is None else dh0.to(initial_state.dtype))

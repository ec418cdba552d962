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
reuses lightning_ops.gla.torch for the layout (ChunkLayout: varlen, padding), gate cumsums and
factors, intra-chunk scores, the state loops and the output; only the solve and the v_new
dependence of the state loop are delta-specific. Every exponent is <= 0 (masked before exp).

Backward is hand-written: the reverse state loop carries dS through v_new = u - w S, then every
chunk-local gradient is batched; the triangular solve's adjoint is one more solve with L^T. The
gate gradient uses the pair identity of the GLA engine (db_t = q_t.dq_t - k_t.dk_t for scores
built from exp(b_i - b_j)) plus the direct uses of exp(b), exp(b_last - b) and exp(b_last).

Grouped value heads (HV = m * H): q and k are repeated to HV heads before chunking and their
gradients summed back over each group. The in-kernel l2 norm of q, k (reference.l2norm) is
applied first, its gradient by hand.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..gla.torch import (
    ChunkLayout,
    chunk_local_cumsum,
    chunk_output,
    gate_factors,
    intra_chunk_scores,
    intra_chunk_scores_backward,
    scan_chunks,
    scan_chunks_reverse,
)

Tensor = torch.Tensor

# C=64 measured best on CPU for K=V=64 (fewer Python steps in the state loop vs O(T*C) intra
# work and the C x C solve); mode="recurrent" runs chunks of one token up to RECURRENT_MAX_T.
CHUNK_SIZE = 64
RECURRENT_MAX_T = 16
L2NORM_EPS = 1e-6


def _chunk_size(mode: str, max_len: int) -> int:
    if mode == "recurrent" and max_len <= RECURRENT_MAX_T:
        return 1  # the literal token-by-token recurrence
    C = 1
    while C < min(max_len, CHUNK_SIZE):
        C *= 2
    return C


def _mul(x: Tensor, factor: Optional[Tensor]) -> Tensor:
    return x if factor is None else x * factor


def _l2norm(x: Tensor):
    """(x / sqrt(|x|^2 + eps), 1 / sqrt(|x|^2 + eps)) over the last dim."""
    r = torch.rsqrt((x * x).sum(-1, keepdim=True) + L2NORM_EPS)
    return x * r, r


def _l2norm_backward(dy: Tensor, y: Tensor, r: Tensor) -> Tensor:
    """dx of y = x * r: dy/dx = r (I - y y^T)."""
    return r * (dy - y * (y * dy).sum(-1, keepdim=True))


@dataclass
class _Chunked:
    """Inputs in the chunk stream [NC, HV, C, *], compute dtype; q already times scale."""
    layout: ChunkLayout
    q: Tensor
    k: Tensor
    v: Tensor
    beta: Tensor  # [NC, HV, C, 1]
    b: Optional[Tensor]  # [NC, HV, C] chunk-local cumsum of g
    h0: Tensor
    qn: Tensor  # q, k after the optional l2 norm, [B, T, H, K] (kept for its backward)
    kn: Tensor
    rq: Optional[Tensor]
    rk: Optional[Tensor]


def _prepare(q, k, v, g, beta, scale, initial_state, cu_seqlens, use_l2, mode) -> _Chunked:
    B, T, H, K = q.shape
    HV, Vd = v.shape[2:]
    if cu_seqlens is None:
        max_len = T
    else:  # host read of the lengths, as ChunkLayout.build does
        max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    layout = ChunkLayout.build(B, T, cu_seqlens, _chunk_size(mode, max_len), q.device)
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qn, kn, rq, rk = q.to(dt), k.to(dt), None, None
    if use_l2:
        (qn, rq), (kn, rk) = _l2norm(qn), _l2norm(kn)
    qh, kh = qn, kn
    if HV != H:
        qh, kh = qn.repeat_interleave(HV // H, 2), kn.repeat_interleave(HV // H, 2)
    h0 = (q.new_zeros(layout.N, HV, K, Vd, dtype=dt) if initial_state is None
          else initial_state.to(dt))
    gc = None if g is None else layout.pack(g, dt)
    return _Chunked(layout, layout.pack(qh, dt) * scale, layout.pack(kh, dt),
                    layout.pack(v, dt), layout.pack(beta, dt)[..., None],
                    chunk_local_cumsum(gc), h0, qn, kn, rq, rk)


def _unit_lower_solve(Akk: Tensor, beta: Tensor, rhs: Tensor) -> Tensor:
    """(I + tril(beta * Akk, -1))^-1 rhs, batched over [NC, HV]."""
    L = (Akk * beta).tril(-1)
    return torch.linalg.solve_triangular(L, rhs, upper=False, unitriangular=True)


def _wy(x: _Chunked, q_decay, Akk):
    """u = L^-1 (beta v), w = L^-1 (beta exp(b) k), solved together."""
    Vd = x.v.shape[-1]
    rhs = torch.cat([x.v * x.beta, _mul(x.k * x.beta, q_decay)], -1)
    uw = _unit_lower_solve(Akk, x.beta, rhs)
    return uw[..., :Vd], uw[..., Vd:], rhs


def _forward_states(x: _Chunked):
    """The solve and the state loop: (factors, Akk, u, w, rhs, kd, v_new, states, final)."""
    q_decay, k_decay, chunk_decay = gate_factors(x.b)
    Akk = intra_chunk_scores(x.k, x.k, x.b)  # (k k^T) * exp(b_i - b_j), j <= i
    u, w, rhs = _wy(x, q_decay, Akk)
    kd = _mul(x.k, k_decay)
    v_new = torch.empty_like(u)

    def step(sl, h):
        vn = torch.baddbmm(u[sl].flatten(0, 1), w[sl].flatten(0, 1), h.flatten(0, 1),
                           alpha=-1).view(u[sl].shape)
        v_new[sl] = vn
        return _mul(h, None if chunk_decay is None else chunk_decay[sl]) \
            + kd[sl].transpose(-1, -2) @ vn

    states, final = scan_chunks(x.layout, x.h0, step)
    return (q_decay, k_decay, chunk_decay), Akk, u, w, rhs, kd, v_new, states, final


def forward(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
            use_qk_l2norm_in_kernel, mode):
    x = _prepare(q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm_in_kernel,
                 mode)
    (q_decay, _, _), _, _, _, _, _, v_new, states, final = _forward_states(x)
    Aqk = intra_chunk_scores(x.q, x.k, x.b)
    o = chunk_output(_mul(x.q, q_decay), states, Aqk, v_new)
    return x.layout.unpack(o).to(v.dtype), (final if output_final_state else None)


def backward(q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm_in_kernel, mode,
             do, dht):
    x = _prepare(q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm_in_kernel,
                 mode)
    layout, dt = x.layout, x.q.dtype
    (q_decay, k_decay, chunk_decay), Akk, u, w, rhs, kd, v_new, states, _ = _forward_states(x)
    qi = _mul(x.q, q_decay)
    Aqk = intra_chunk_scores(x.q, x.k, x.b)
    doc = layout.pack(do, dt)
    dht = torch.zeros_like(x.h0) if dht is None else dht.to(dt)

    # Reverse state loop. With E the state after a chunk:
    #   dv_new = Aqk^T do + kd dE ;  dS = exp(b_last) dE + qi^T do - w^T dv_new
    q_pull = qi.transpose(-1, -2) @ doc
    o_pull = Aqk.transpose(-1, -2) @ doc
    dv_new = torch.empty_like(v_new)

    def step(sl, dE):
        dvn = o_pull[sl] + kd[sl] @ dE
        dv_new[sl] = dvn
        return q_pull[sl] + _mul(dE, None if chunk_decay is None else chunk_decay[sl]) \
            - w[sl].transpose(-1, -2) @ dvn

    dE, dh0 = scan_chunks_reverse(layout, dht, step)

    # Output: o = qi S + Aqk v_new
    dq, dk = intra_chunk_scores_backward(doc @ v_new.transpose(-1, -2), x.q, x.k, x.b)
    db = None if x.b is None else (x.q * dq).sum(-1) - (x.k * dk).sum(-1)  # pair terms of Aqk
    dqi = doc @ states.transpose(-1, -2)
    dq = dq + _mul(dqi, q_decay)
    # State: E = exp(b_last) S + kd^T v_new
    dkd = v_new @ dE.transpose(-1, -2)
    dk = dk + _mul(dkd, k_decay)
    # v_new = u - w S, with [u | w] = L^-1 rhs:  d rhs = L^-T [du | dw],  dA = -tril(d rhs X^T)
    dX = torch.cat([dv_new, -dv_new @ states.transpose(-1, -2)], -1)
    L = (Akk * x.beta).tril(-1)
    drhs = torch.linalg.solve_triangular(L.transpose(-1, -2), dX, upper=True,
                                         unitriangular=True)
    X = torch.cat([u, w], -1)
    dA = -(drhs @ X.transpose(-1, -2)).tril(-1)
    dbeta = (dA * Akk).sum(-1, keepdim=True)  # A = beta_i * Akk_ij
    Vd = x.v.shape[-1]
    drv, drk = drhs[..., :Vd], drhs[..., Vd:]
    dv = drv * x.beta
    dbeta = dbeta + (drv * x.v).sum(-1, keepdim=True)
    dk = dk + _mul(drk, q_decay) * x.beta
    dbeta = dbeta + (drk * _mul(x.k, q_decay)).sum(-1, keepdim=True)
    # Akk = (k k^T) * exp(b_i - b_j): both factors are k
    dka, dkb = intra_chunk_scores_backward(dA * x.beta, x.k, x.k, x.b)
    dk = dk + dka + dkb

    dg = None
    if x.b is not None:
        db = db + (x.k * dka).sum(-1) - (x.k * dkb).sum(-1)  # pair terms of Akk
        db = db + (dqi * qi).sum(-1) + (drk * rhs[..., Vd:]).sum(-1)  # exp(b) factors
        dkd_kd = (dkd * kd).sum(-1)  # kd = k exp(b_last - b)
        db = db - dkd_kd
        # b_last enters through kd and the carried exp(b_last) S
        db_last = dkd_kd.sum(-1, keepdim=True) \
            + (states * chunk_decay * dE).sum((-1, -2))[..., None]
        dgc = db.flip(2).cumsum(2).flip(2) + db_last  # b_t, b_last are sums of g_s, s <= t
        dg = layout.unpack(dgc).to(g.dtype)

    # Back to tokens: undo scale, head repeat and l2 norm.
    B, T, H, K = q.shape
    HV = v.shape[2]
    dqt, dkt = layout.unpack(dq) * scale, layout.unpack(dk)
    if HV != H:
        dqt = dqt.view(B, T, H, HV // H, K).sum(3)
        dkt = dkt.view(B, T, H, HV // H, K).sum(3)
    if use_qk_l2norm_in_kernel:
        dqt, dkt = _l2norm_backward(dqt, x.qn, x.rq), _l2norm_backward(dkt, x.kn, x.rk)
    return (dqt.to(q.dtype), dkt.to(k.dtype), layout.unpack(dv).to(v.dtype), dg,
            layout.unpack(dbeta[..., 0]).to(beta.dtype),
            None if initial_state is None else dh0.to(initial_state.dtype))

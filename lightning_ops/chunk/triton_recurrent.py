"""Triton token-by-token (fused recurrent) kernels of the chunk engine's gate kinds: decode and
short T (mode "recurrent" of the GLA family).

One program per (V block, sequence x head) keeps the fp32 state [K, BV] in registers and walks
the tokens of its sequence. GATE (chunk/constants.py) is the kind of the per-token tensor g:
NO_GATE, SCALAR_GATE g [tokens, H] or VECTOR_GATE g [tokens, H, K]; HAS_GAMMA adds the
constant g_gamma[h] to the log decay of every token.

  forward:  S_t = e^{g_t} S_{t-1} + k_t v_t^T,  o_t = scale S_t^T q_t
  backward: dq_t = scale S_t do_t (forward walk, recomputing S);
            D_t = scale q_t do_t^T + e^{g_{t+1}} D_{t+1} (D_T adds dht), dk_t = D_t v_t,
            dv_t = D_t^T k_t, dh0 = e^{g_0} D_0 (reverse walk);
            dg_t = sum_{t' >= t} (q dq - k dk)_t' + rowsum(S_T * dht) (launcher).
The kernels write dq and dk without their k_t v_t^T / q_t do_t^T terms, c_t k_t and c_t q_t with
c_t = scale do_t.v_t (written apart): those cancel exactly in q dq - k dk, so the launcher forms
dg without them (no rounding error from large cancelling terms) and then adds them back.
Likewise with dht: the last token's dk (without c_T q_T) is exactly dht v_T, whose k_T part
cancels the k_T v_T^T part of rowsum(S_T * dht); with strong gates S_T ~ k_T v_T^T and that fp32
cancellation error would spread to every dg_t. So the fin term is rowsum(e^{g_T} S_{T-1} * dht)
and the launcher drops k_T dk_T from the last token of each sequence (dk itself is kept).
dq and dk reduce over V, so with several V blocks each block writes an fp32 partial (summed by
the launcher, in a fixed order: deterministic)."""
from __future__ import annotations

import triton
import triton.language as tl

from ..triton_utils import seq_bounds, state_tile
from . import constants

SCALAR_GATE = tl.constexpr(constants.SCALAR_GATE)
VECTOR_GATE = tl.constexpr(constants.VECTOR_GATE)


@triton.jit
def _decay(S, g, gm, p, i_h, o_k, m_k, H: tl.constexpr, K: tl.constexpr,
           GATE: tl.constexpr, HAS_GAMMA: tl.constexpr):
    """S * exp(log decay of token p)."""
    if GATE == VECTOR_GATE:
        gt = tl.load(g + (p * H + i_h) * K + o_k, mask=m_k, other=0.).to(tl.float32)
        if HAS_GAMMA:
            gt += gm
        S = S * tl.exp(gt)[:, None]
    elif GATE == SCALAR_GATE:
        gt = tl.load(g + p * H + i_h).to(tl.float32)
        if HAS_GAMMA:
            gt += gm
        S = S * tl.exp(gt)
    elif HAS_GAMMA:
        S = S * tl.exp(gm)
    return S


@triton.jit
def _token_walk_setup(i_v, i_n, i_h, init, gamma, cu_seqlens, T, H: tl.constexpr, K: tl.constexpr,
                V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_INIT: tl.constexpr,
                HAS_GAMMA: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Both token walks' setup: sequence bounds, the [BK, BV] tile's offsets and masks, the
    head index, the carried tile loaded from `init` (h0 forward, dht backward) or zeros, and the
    head's constant log decay (0 without g_gamma)."""
    bos, T_n = seq_bounds(i_n, cu_seqlens, T, IS_VARLEN)
    o_k, o_v, m_k, m_v, m_kv, kv = state_tile(0, i_v, K, V, BK, BV)
    head = (i_n * H + i_h).to(tl.int64)
    X = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_INIT:
        X += tl.load(init + head * K * V + kv, mask=m_kv, other=0.).to(tl.float32)
    gm = 0.
    if HAS_GAMMA:
        gm = tl.load(gamma + i_h).to(tl.float32)
    return bos, T_n, o_k, o_v, m_k, m_v, m_kv, head, kv, X, gm


@triton.jit(do_not_specialize=["T", "part_stride"])
def recurrent_fwd_kernel(
    q, k, v, g, gamma, h0, do, dht, out, fin, cdiag, cu_seqlens, scale, T, part_stride,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    GATE: tl.constexpr, HAS_GAMMA: tl.constexpr, USE_H0: tl.constexpr,
    STORE_FIN: tl.constexpr, BWD: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """Forward token walk. BWD=0: out = o [tokens, H, V], fin = final state [N, H, K, V].
    BWD=1: out = dq partials [NV, tokens, H, K] (part_stride = tokens * H * K) without the c_t k_t
    term, cdiag = c_t partials [NV, tokens, H], fin = the final-state term of dg without the
    last token's k_T v_T^T, rowsum(e^{g_T} S_{T-1} * dht), as partials [NV, N, H, K]."""
    i_nh, i_v = tl.program_id(0), tl.program_id(1)  # (sequence x head) on x: no 65535 cap
    i_n, i_h = i_nh // H, i_nh % H
    bos, T_n, o_k, o_v, m_k, m_v, m_kv, head, kv, S, gm = _token_walk_setup(
        i_v, i_n, i_h, h0, gamma, cu_seqlens, T, H, K, V, BK, BV, USE_H0, HAS_GAMMA, IS_VARLEN)
    Sd = S  # BWD: e^{g_T} S_{T-1}, the decayed state before the last token's update
    for t in range(0, T_n):
        p = bos + t
        kt = tl.load(k + (p * H + i_h) * K + o_k, mask=m_k, other=0.).to(tl.float32)
        vt = tl.load(v + (p * H + i_h) * V + o_v, mask=m_v, other=0.).to(tl.float32)
        S = _decay(S, g, gm, p, i_h, o_k, m_k, H, K, GATE, HAS_GAMMA)
        if BWD:
            Sd = S
            dot_ = tl.load(do + (p * H + i_h) * V + o_v, mask=m_v, other=0.).to(tl.float32)
            dqt = tl.sum(S * dot_[None, :], axis=1) * scale
            tl.store(out + i_v.to(tl.int64) * part_stride + (p * H + i_h) * K + o_k, dqt,
                     mask=m_k)
            tl.store(cdiag + i_v.to(tl.int64) * (part_stride // K) + p * H + i_h,
                     tl.sum(vt * dot_, axis=0) * scale)
        S += kt[:, None] * vt[None, :]
        if BWD == 0:
            qt = tl.load(q + (p * H + i_h) * K + o_k, mask=m_k, other=0.).to(tl.float32)
            ot = tl.sum(S * qt[:, None], axis=0) * scale
            tl.store(out + (p * H + i_h) * V + o_v, ot.to(out.dtype.element_ty), mask=m_v)
    if STORE_FIN:
        if BWD:
            dS = tl.load(dht + head * K * V + kv, mask=m_kv, other=0.).to(tl.float32)
            n_heads = tl.num_programs(0).to(tl.int64)  # the (sequence x head) axis
            tl.store(fin + (i_v * n_heads + head) * K + o_k, tl.sum(Sd * dS, axis=1), mask=m_k)
        else:
            tl.store(fin + head * K * V + kv, S.to(fin.dtype.element_ty), mask=m_kv)


@triton.jit(do_not_specialize=["T", "part_stride"])
def recurrent_bwd_kernel(
    q, k, v, g, gamma, do, dht, dk, dv, dh0, cu_seqlens, scale, T, part_stride,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    GATE: tl.constexpr, HAS_GAMMA: tl.constexpr, USE_DHT: tl.constexpr,
    STORE_DH0: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """Reverse token walk carrying D = dL/dS_t: dk partials [NV, tokens, H, K] fp32 without the
    c_t q_t term, dv [tokens, H, V], dh0 [N, H, K, V] fp32."""
    i_nh, i_v = tl.program_id(0), tl.program_id(1)  # (sequence x head) on x: no 65535 cap
    i_n, i_h = i_nh // H, i_nh % H
    bos, T_n, o_k, o_v, m_k, m_v, m_kv, head, kv, D, gm = _token_walk_setup(
        i_v, i_n, i_h, dht, gamma, cu_seqlens, T, H, K, V, BK, BV, USE_DHT, HAS_GAMMA, IS_VARLEN)
    for j in range(0, T_n):
        p = bos + T_n - 1 - j
        qt = tl.load(q + (p * H + i_h) * K + o_k, mask=m_k, other=0.).to(tl.float32)
        kt = tl.load(k + (p * H + i_h) * K + o_k, mask=m_k, other=0.).to(tl.float32)
        vt = tl.load(v + (p * H + i_h) * V + o_v, mask=m_v, other=0.).to(tl.float32)
        dot_ = tl.load(do + (p * H + i_h) * V + o_v, mask=m_v, other=0.).to(tl.float32)
        tl.store(dk + i_v.to(tl.int64) * part_stride + (p * H + i_h) * K + o_k,
                 tl.sum(D * vt[None, :], axis=1), mask=m_k)
        D += (scale * qt)[:, None] * dot_[None, :]
        tl.store(dv + (p * H + i_h) * V + o_v, tl.sum(D * kt[:, None], axis=0).to(
            dv.dtype.element_ty), mask=m_v)
        D = _decay(D, g, gm, p, i_h, o_k, m_k, H, K, GATE, HAS_GAMMA)
    if STORE_DH0:
        tl.store(dh0 + head * K * V + kv, D.to(dh0.dtype.element_ty), mask=m_kv)

"""Triton backend of the delta-rule family (DeltaNet, Gated DeltaNet, KDA).

Contract (lightning_ops/delta/ops.py):
  forward(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
          use_qk_l2norm_in_kernel, mode) -> (o, final_state or None)
  backward(q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm_in_kernel, mode,
           do, dht) -> (dq, dk, dv, dg or None, dbeta, dh0 or None)

Chunk mode (C = 64; b = chunk-local cumsum of g; S the state before a chunk), the math of
lightning_ops/delta/torch.py:
  wy_inverse_kernel   A = tril(beta (k k^T) e^{b_i - b_j}, -1), Ai = (I + A)^-1 on chip: four
                      16x16 diagonal blocks by forward substitution, the rest by block products
  wy_apply_kernel     w = Ai (beta e^b k), u = Ai (beta v)
  delta_state_kernel  walks the chunks: v_new = u - w S, S <- e^{b_L} S + (k e^{b_L - b})^T v_new
  GLA chunk_out_kernel   o = scale (q e^b) S + (scale q k^T * decay) v_new       (shared)
Backward: the forward is recomputed up to the states, then
  delta_state_bwd_kernel   walks back: dv_new = A_qk^T do + kd dE,
                           dS = e^{b_L} dE + scale (q e^b)^T do - w^T dv_new
  GLA chunk_dqkg_kernel    dq, dk, dg of the output and state parts (v_new as v)  (shared)
  wy_bwd_kernel            the triangular solve's adjoint: dv, dbeta and the WY parts of dk, dg
The inter-chunk state and output kernels of the GLA family are reused as they are: after the
WY transform the delta rule is gated linear attention with v_new for v. Only the state
walk itself is delta-specific (v_new depends on the state met), so it has its own kernels.

Vector gates (KDA, b [C, K] per channel): e^{b_i - b_j} sits inside the k k^T and q k^T sums,
so those scores come from the GLA engine's sub-chunked chunk_scores (every exponent <= 0):
A_kk feeds wy_inverse, A_qk the output and the reverse walk. Their gradients go back through
scores_backward (the GLA intra-chunk kernel, q = k for A_kk) and wy_gate_grad_kernel (A_kk's
and w's per-channel dg, reverse-cumsummed within the chunk). The kernels take the gate kind
GATE (chunk/constants.py: NO_GATE, SCALAR_GATE, VECTOR_GATE).

Recurrent mode: one program per (sequence, value head, V block) walks the tokens with the state
in registers (decode); q/k l2 norm in-kernel; grouped value heads read q/k head i // m directly.
Its backward runs the chunk backward (the same function, exactly differentiated).

Grouped value heads in chunk mode: q, k are repeated to HV heads before the chunk kernels (the
shared GLA kernels index q/k by the value head) and their gradients summed back. The chunk
mode's q/k l2 norm is applied by torch ops before the kernels (and its gradient after).
fp32 throughout the kernels' accumulators; float64 inputs are computed in fp32.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..chunk import constants
from ..chunk.constants import K_BLOCK, TRITON_CHUNK, gate_kind
from ..chunk.triton import (as_compute, check_mode, chunk_scores, empty_backward, empty_forward,
                            fp32_empty, gate_cumsum, restore_dtypes, scores_backward,
                            zero_floored)
from ..chunk.triton_kernels import (_gates, _load_A, _row_decay, chunk_dqkg_kernel,
                                    chunk_out_kernel)
from ..nonfinite import NonFiniteGuard
from ..triton_utils import (ChunkMeta, check_grid_yz, chunk_program, chunk_slot_base, dot_config,
                            exact_precision, full_k_stages, next_pow2, seq_bounds, state_tile)
from .l2norm import l2norm, l2norm_backward

Tensor = torch.Tensor

# rows per chunk in the kernels below (the WY inverse is written for 4 blocks of 16 rows)
CHUNK = tl.constexpr(constants.TRITON_CHUNK)
L2NORM_EPS = tl.constexpr(constants.L2NORM_EPS)
NO_GATE = tl.constexpr(constants.NO_GATE)
SCALAR_GATE = tl.constexpr(constants.SCALAR_GATE)
VECTOR_GATE = tl.constexpr(constants.VECTOR_GATE)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["T", "NT"])
def wy_inverse_kernel(k, beta, gc, Akk, Ai, cu_seqlens, chunk_indices, T, NT,
                      H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr,
                      GATE: tl.constexpr, IS_VARLEN: tl.constexpr, PREC: tl.constexpr):
    """Ai [tokens, H, 64] fp32: (I + A)^-1 of one (chunk, batch x head), A = tril(beta (k k^T)
    e^{b_r - b_s}, -1); row r of Ai is the chunk's token r. Vector gates (KDA) read the gated
    k k^T from Akk [tokens, H, 64] (chunk_scores: e^{b_r - b_s} per channel inside the sum);
    the other kinds form it here. The four 16x16 diagonal blocks are
    inverted together ([4, 16, 16]) by forward substitution (15 steps), the off-diagonal blocks
    by block forward substitution T_ij = -T_ii sum_{j <= l < i} A_il T_lj. Upper blocks are
    written as zeros so a [64, 64] load is the whole inverse.
    (Only builtins here, no tl.sum: each @jit call costs ~4 ms under TRITON_INTERPRET=1.)"""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_n, i_c, gid, bos, T_n = chunk_program(i_t, i_b, cu_seqlens, chunk_indices, T, NT, IS_VARLEN)
    r0 = i_c * CHUNK
    if r0 >= T_n:  # a padding program of a packed batch's grid
        return
    o = tl.arange(0, 16)
    # --- the diagonal blocks, batched [4 blocks, 16 rows, *]
    loc = r0 + tl.arange(0, 4)[:, None] * 16 + o[None, :]
    m = loc < T_n
    rows = (bos + loc) * H + i_h
    keep = m[:, :, None] & m[:, None, :] & (o[None, :, None] > o[None, None, :])
    if GATE == VECTOR_GATE:
        blk = tl.arange(0, 4) * 16
        A3 = tl.load(Akk + (rows * CHUNK)[:, :, None] + blk[:, None, None] + o[None, None, :],
                     mask=keep, other=0.)
    else:
        # k k^T over K in blocks of BK (unrolled): [*, 16, BK] tiles keep shared memory bounded
        A3 = tl.zeros([4, 16, 16], dtype=tl.float32)
        for i_k in tl.static_range(0, (K + BK - 1) // BK):
            o_k = i_k * BK + tl.arange(0, BK)
            k3 = tl.load(k + (rows * K)[:, :, None] + o_k[None, None, :],
                         mask=m[:, :, None] & (o_k < K)[None, None, :], other=0.).to(tl.float32)
            A3 += tl.dot(k3, tl.permute(k3, (0, 2, 1)), input_precision=PREC)
    b3 = tl.load(beta + rows, mask=m, other=0.).to(tl.float32)
    if GATE == SCALAR_GATE:
        G3 = tl.load(gc + rows, mask=m, other=0.)
        A3 = A3 * tl.exp(tl.where(keep, G3[:, :, None] - G3[:, None, :], 0.))
    A3 = tl.where(keep, A3 * b3[:, :, None], 0.)
    # step i makes row i: e_i - sum_{j<i} A_ij row_j (row i is still e_i, rows j < i are final)
    T3 = tl.where(o[None, :, None] == o[None, None, :], 1., 0.) + tl.zeros([4, 16, 16], tl.float32)
    for i in tl.static_range(1, 16):
        T3 -= tl.dot(tl.where(o[None, :, None] == i, A3, 0.), T3, input_precision=PREC)
    Ta, Tb = tl.split(tl.reshape(tl.permute(T3, (1, 2, 0)), (16, 16, 2, 2)))
    T00, T22 = tl.split(Ta)
    T11, T33 = tl.split(Tb)
    # --- the off-diagonal blocks (i, j) = (1,0) (2,0) (2,1) (3,0) (3,1) (3,2), batched [8, ..]
    p = tl.arange(0, 8)
    bi = tl.where(p < 1, 1, tl.where(p < 3, 2, tl.where(p < 6, 3, 0)))
    bj = tl.where((p == 2) | (p == 4), 1, tl.where(p == 5, 2, 0))
    li = r0 + bi[:, None] * 16 + o[None, :]
    lj = r0 + bj[:, None] * 16 + o[None, :]
    mi = (li < T_n) & (p < 6)[:, None]
    mj = (lj < T_n) & (p < 6)[:, None]
    ri = (bos + li) * H + i_h
    rj = (bos + lj) * H + i_h
    keep8 = mi[:, :, None] & mj[:, None, :]
    if GATE == VECTOR_GATE:
        A8 = tl.load(Akk + (ri * CHUNK)[:, :, None] + (bj * 16)[:, None, None]
                     + o[None, None, :], mask=keep8, other=0.)
    else:
        A8 = tl.zeros([8, 16, 16], dtype=tl.float32)
        for i_k in tl.static_range(0, (K + BK - 1) // BK):
            o_k = i_k * BK + tl.arange(0, BK)
            m_k = (o_k < K)[None, None, :]
            ki = tl.load(k + (ri * K)[:, :, None] + o_k[None, None, :],
                         mask=mi[:, :, None] & m_k, other=0.).to(tl.float32)
            kj = tl.load(k + (rj * K)[:, :, None] + o_k[None, None, :],
                         mask=mj[:, :, None] & m_k, other=0.).to(tl.float32)
            A8 += tl.dot(ki, tl.permute(kj, (0, 2, 1)), input_precision=PREC)
    bb = tl.load(beta + ri, mask=mi, other=0.).to(tl.float32)
    if GATE == SCALAR_GATE:
        Gi = tl.load(gc + ri, mask=mi, other=0.)
        Gj = tl.load(gc + rj, mask=mj, other=0.)
        A8 = A8 * tl.exp(tl.where(keep8, Gi[:, :, None] - Gj[:, None, :], 0.))
    A8 = tl.where(keep8, A8 * bb[:, :, None], 0.)
    # pair p = 4a + 2b + c: split c, then b, then a
    Xc0, Xc1 = tl.split(tl.reshape(tl.permute(A8, (1, 2, 0)), (16, 16, 2, 2, 2)))
    X00, X01 = tl.split(Xc0)
    X10, X11 = tl.split(Xc1)
    A10, A31 = tl.split(X00)
    A21, _u0 = tl.split(X01)
    A20, A32 = tl.split(X10)
    A30, _u1 = tl.split(X11)
    T10 = -tl.dot(T11, tl.dot(A10, T00, input_precision=PREC), input_precision=PREC)
    T21 = -tl.dot(T22, tl.dot(A21, T11, input_precision=PREC), input_precision=PREC)
    X20 = tl.dot(A20, T00, input_precision=PREC) + tl.dot(A21, T10, input_precision=PREC)
    T20 = -tl.dot(T22, X20, input_precision=PREC)
    T32 = -tl.dot(T33, tl.dot(A32, T22, input_precision=PREC), input_precision=PREC)
    X31 = tl.dot(A31, T11, input_precision=PREC) + tl.dot(A32, T21, input_precision=PREC)
    T31 = -tl.dot(T33, X31, input_precision=PREC)
    X30 = tl.dot(A30, T00, input_precision=PREC) + tl.dot(A31, T10, input_precision=PREC) \
        + tl.dot(A32, T20, input_precision=PREC)
    T30 = -tl.dot(T33, X30, input_precision=PREC)
    Z = tl.zeros([16, 16], dtype=tl.float32)
    full = o[None, :] < 16
    m0 = (r0 + o) < T_n
    m1 = (r0 + 16 + o) < T_n
    m2 = (r0 + 32 + o) < T_n
    m3 = (r0 + 48 + o) < T_n
    row0 = (bos + r0 + o) * H + i_h
    row1 = row0 + 16 * H
    row2 = row0 + 32 * H
    row3 = row0 + 48 * H
    p0 = Ai + (row0 * CHUNK)[:, None] + o[None, :]
    p1 = Ai + (row1 * CHUNK)[:, None] + o[None, :]
    p2 = Ai + (row2 * CHUNK)[:, None] + o[None, :]
    p3 = Ai + (row3 * CHUNK)[:, None] + o[None, :]
    tl.store(p0, T00, mask=m0[:, None] & full)
    tl.store(p0 + 16, Z, mask=m0[:, None] & full)
    tl.store(p0 + 32, Z, mask=m0[:, None] & full)
    tl.store(p0 + 48, Z, mask=m0[:, None] & full)
    tl.store(p1, T10, mask=m1[:, None] & full)
    tl.store(p1 + 16, T11, mask=m1[:, None] & full)
    tl.store(p1 + 32, Z, mask=m1[:, None] & full)
    tl.store(p1 + 48, Z, mask=m1[:, None] & full)
    tl.store(p2, T20, mask=m2[:, None] & full)
    tl.store(p2 + 16, T21, mask=m2[:, None] & full)
    tl.store(p2 + 32, T22, mask=m2[:, None] & full)
    tl.store(p2 + 48, Z, mask=m2[:, None] & full)
    tl.store(p3, T30, mask=m3[:, None] & full)
    tl.store(p3 + 16, T31, mask=m3[:, None] & full)
    tl.store(p3 + 32, T32, mask=m3[:, None] & full)
    tl.store(p3 + 48, T33, mask=m3[:, None] & full)


@triton.jit
def _wy_chunk(Ai, beta, bos, r0, T_n, i_h, H: tl.constexpr):
    """The chunk at local row r0 as the WY kernels read it: row offsets, row mask, row ids, its
    [CHUNK, CHUNK] inverse Ai and beta (fp32)."""
    o_t = tl.arange(0, CHUNK)
    m_t = (r0 + o_t) < T_n
    rows = (bos + r0 + o_t) * H + i_h
    Ti = tl.load(Ai + (rows * CHUNK)[:, None] + o_t[None, :],
                 mask=m_t[:, None] & (o_t[None, :] < CHUNK), other=0.)
    bt = tl.load(beta + rows, mask=m_t, other=0.).to(tl.float32)
    return o_t, m_t, rows, Ti, bt


@triton.jit(do_not_specialize=["T", "NT"])
def wy_apply_kernel(k, v, beta, gc, Ai, w, u, cu_seqlens, chunk_indices, T, NT,
                    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                    BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr,
                    IS_VARLEN: tl.constexpr, PREC: tl.constexpr):
    """w = Ai (beta e^b k) [tokens, H, K] and u = Ai (beta v) [tokens, H, V], fp32 (e^b per
    channel for vector gates)."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_n, i_c, gid, bos, T_n = chunk_program(i_t, i_b, cu_seqlens, chunk_indices, T, NT, IS_VARLEN)
    r0 = i_c * CHUNK
    if r0 >= T_n:  # a padding program of a packed batch's grid
        return
    o_t, m_t, rows, Ti, bt = _wy_chunk(Ai, beta, bos, r0, T_n, i_h, H)
    if GATE == SCALAR_GATE:
        G = tl.load(gc + rows, mask=m_t, other=0.)
        bk = bt * tl.exp(G)
    else:
        bk = bt
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m = m_t[:, None] & (o_k < K)[None, :]
        p = (rows * K)[:, None] + o_k[None, :]
        kt = tl.load(k + p, mask=m, other=0.).to(tl.float32) * bk[:, None]
        if GATE == VECTOR_GATE:
            kt = kt * tl.exp(tl.load(gc + p, mask=m, other=0.))
        tl.store(w + p, tl.dot(Ti, kt, input_precision=PREC), mask=m)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m = m_t[:, None] & (o_v < V)[None, :]
        p = (rows * V)[:, None] + o_v[None, :]
        vt = tl.load(v + p, mask=m, other=0.).to(tl.float32)
        tl.store(u + p, tl.dot(Ti, vt * bt[:, None], input_precision=PREC), mask=m)


@triton.jit
def _state_decay(G_L, GATE: tl.constexpr):
    """e^{G_L} as a factor of a [BK, BV] state: a scalar, or per row (vector gates)."""
    if GATE == VECTOR_GATE:
        f = tl.exp(G_L)[:, None]
    else:
        f = tl.exp(G_L)
    return f


@triton.jit
def _state_walk_setup(i_v, i_n, i_h, cu_seqlens, chunk_offsets, T, NT, H: tl.constexpr,
                K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                IS_VARLEN: tl.constexpr):
    """The state walks' shared setup: sequence bounds, the sequence's first chunk slot in the
    per-chunk state buffer, the [BK, BV] state tile's offsets and masks, and the head's base."""
    bos, T_n = seq_bounds(i_n, cu_seqlens, T, IS_VARLEN)
    base = chunk_slot_base(i_n, chunk_offsets, NT, IS_VARLEN)
    o_t = tl.arange(0, CHUNK)
    o_k, o_v, m_k, m_v, m_kv, kv = state_tile(0, i_v, K, V, BK, BV)
    head = (i_n * H + i_h).to(tl.int64) * K * V
    return bos, T_n, base, o_t, o_k, o_v, m_k, m_v, m_kv, kv, head


@triton.jit
def _chunk_tile(r0, o_t, o_k, o_v, m_k, m_v, bos, T_n, i_h, H: tl.constexpr, K: tl.constexpr,
                V: tl.constexpr):
    """Row mask, row ids and [64, K] / [64, BV] offsets of the chunk starting at token r0."""
    m_t = (r0 + o_t) < T_n
    rows = (bos + r0 + o_t) * H + i_h
    m_tk = m_t[:, None] & m_k[None, :]
    m_tv = m_t[:, None] & m_v[None, :]
    pk = (rows * K)[:, None] + o_k[None, :]
    pv = (rows * V)[:, None] + o_v[None, :]
    return m_t, rows, m_tk, m_tv, pk, pv


@triton.jit(do_not_specialize=["T", "NT"])
def delta_state_kernel(k, w, u, gc, hs, v_new, h0, ht, cu_seqlens, chunk_offsets, T, NT,
                       H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                       BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr,
                       USE_H0: tl.constexpr, STORE_HT: tl.constexpr, IS_VARLEN: tl.constexpr,
                       DT_S: tl.constexpr, PREC: tl.constexpr):
    """One program per (V block, sequence x head), the full K in registers (BK >= K): stores
    h_c (state before chunk c) and v_new = u - w h_c, and carries
    h <- e^{b_L} h + (k e^{b_L - b})^T v_new (e^{b_L} per row of h for vector gates)."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, T_n, base, o_t, o_k, o_v, m_k, m_v, m_kv, kv, head = _state_walk_setup(
        i_v, i_n, i_h, cu_seqlens, chunk_offsets, T, NT, H, K, V, BK, BV, IS_VARLEN)
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        S += tl.load(h0 + head + kv, mask=m_kv, other=0.).to(tl.float32)
    for i_c in range(0, tl.cdiv(T_n, CHUNK)):
        r0 = i_c * CHUNK
        tl.store(hs + ((base + i_c) * H + i_h) * K * V + kv, S, mask=m_kv)
        m_t, rows, m_tk, m_tv, pk, pv = _chunk_tile(r0, o_t, o_k, o_v, m_k, m_v, bos, T_n, i_h,
                                                    H, K, V)
        wt = tl.load(w + pk, mask=m_tk, other=0.)
        ut = tl.load(u + pv, mask=m_tv, other=0.)
        vn = ut - tl.dot(wt.to(DT_S), S.to(DT_S), input_precision=PREC)
        tl.store(v_new + pv, vn, mask=m_tv)
        kt = tl.load(k + pk, mask=m_tk, other=0.).to(tl.float32)
        if GATE != NO_GATE:
            G, G_L = _gates(gc, None, i_h, bos, r0, T_n, o_t, m_t, o_k, m_k, H, K, CHUNK, GATE)
            kt = kt * _row_decay(G, G_L, m_t, True, GATE)
            S = S * _state_decay(G_L, GATE)
        S += tl.dot(tl.trans(kt).to(DT_S), vn.to(DT_S), input_precision=PREC)
    if STORE_HT:
        tl.store(ht + head + kv, S, mask=m_kv)


@triton.jit(do_not_specialize=["T", "NT"])
def delta_state_bwd_kernel(q, k, w, do, gc, Aqk, dhs, dv_new, dht, dh0, cu_seqlens,
                           chunk_offsets, scale, T, NT,
                           H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                           BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr,
                           USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
                           IS_VARLEN: tl.constexpr, DT: tl.constexpr, DT_S: tl.constexpr,
                           PREC: tl.constexpr):
    """The reverse walk: with dE the gradient of the state after chunk c (stored in dhs),
    dv_new = A_qk^T do + (k e^{b_L - b}) dE  (A_qk = scale q k^T e^{b_t - b_s}, s <= t), then
    dS = e^{b_L} dE + scale (q e^b)^T do - w^T dv_new becomes the previous chunk's dE.
    Vector gates read A_qk from Aqk (chunk_scores, scale included)."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, T_n, base, o_t, o_k, o_v, m_k, m_v, m_kv, kv, head = _state_walk_setup(
        i_v, i_n, i_h, cu_seqlens, chunk_offsets, T, NT, H, K, V, BK, BV, IS_VARLEN)
    dS = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        dS += tl.load(dht + head + kv, mask=m_kv, other=0.).to(tl.float32)
    n_c = tl.cdiv(T_n, CHUNK)
    for j in range(0, n_c):
        i_c = n_c - 1 - j
        r0 = i_c * CHUNK
        tl.store(dhs + ((base + i_c) * H + i_h) * K * V + kv, dS, mask=m_kv)
        m_t, rows, m_tk, m_tv, pk, pv = _chunk_tile(r0, o_t, o_k, o_v, m_k, m_v, bos, T_n, i_h,
                                                    H, K, V)
        qt = tl.load(q + pk, mask=m_tk, other=0.).to(tl.float32)
        kt = tl.load(k + pk, mask=m_tk, other=0.).to(tl.float32)
        wt = tl.load(w + pk, mask=m_tk, other=0.)
        dot_ = tl.load(do + pv, mask=m_tv, other=0.).to(tl.float32)
        if GATE != NO_GATE:
            G, G_L = _gates(gc, None, i_h, bos, r0, T_n, o_t, m_t, o_k, m_k, H, K, CHUNK, GATE)
        # A_qk^T [s, t] = scale q_t . k_s e^{b_t - b_s} for t >= s (formed before the decayed
        # k / q tiles: fewer [64, K] tiles live at once, which sm_90 shared memory needs at
        # K = 256 in fp16)
        if GATE == VECTOR_GATE:
            At = _load_A(Aqk, bos + r0 + o_t, i_h, m_t, o_t, H, CHUNK, True)
        else:
            keep = (o_t[None, :] >= o_t[:, None]) & m_t[:, None] & m_t[None, :]
            At = tl.dot(kt.to(DT), tl.trans(qt).to(DT), input_precision=PREC)
            if GATE == SCALAR_GATE:
                At = At * tl.exp(tl.where(keep, G[None, :] - G[:, None], 0.))
            At = tl.where(keep, At * scale, 0.)
        if GATE != NO_GATE:
            kd = kt * _row_decay(G, G_L, m_t, True, GATE)
            qi = qt * _row_decay(G, G_L, m_t, False, GATE)
        else:
            kd = kt
            qi = qt
        dvn = tl.dot(At.to(DT), dot_.to(DT), input_precision=PREC) \
            + tl.dot(kd.to(DT_S), dS.to(DT_S), input_precision=PREC)
        tl.store(dv_new + pv, dvn, mask=m_tv)
        if GATE != NO_GATE:
            dS = dS * _state_decay(G_L, GATE)
        dS += scale * tl.dot(tl.trans(qi).to(DT), dot_.to(DT), input_precision=PREC)
        dS -= tl.dot(tl.trans(wt).to(DT_S), dvn.to(DT_S), input_precision=PREC)
    if STORE_DH0:
        tl.store(dh0 + head + kv, dS, mask=m_kv)


@triton.jit(do_not_specialize=["T", "NT"])
def wy_bwd_kernel(k, v, beta, gc, Ai, hs, dv_new, Akk, dk, dv, dbeta, dg, dAkk,
                  cu_seqlens, chunk_indices, T, NT,
                  H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                  BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr,
                  IS_VARLEN: tl.constexpr, DT_S: tl.constexpr, PREC: tl.constexpr):
    """Adjoint of the WY transform of one (chunk, batch x head), K in blocks of BK.
    From du = dv_new and dw = -dv_new h_c^T:  dvb = Ai^T du, dkb = Ai^T dw,
    dA = -tril(dvb u^T + dkb w^T, -1); then dv = beta dvb, dbeta, dk (fp32, the WY share) and
    dg (fp32, the WY share, already reverse-cumsummed within the chunk).
    Three passes, so no [64, K] tile is held whole (shared memory stays bounded at K = 256):
    over V blocks (dv, the u part of dA and dbeta), over K blocks (dw, dkb, the w part of dA,
    k k^T, the k parts of dbeta and dg; dk's dkb share stored), over K blocks again (dk += the
    A part, read back after a barrier).
    Vector gates (KDA): the gated k k^T comes from Akk (chunk_scores); the kernel stops at its
    gradient dAkk = beta dA [tokens, H, 64] (rows written whole, zeros off the strict lower
    triangle), whose dk and dg shares need e^{b_r - b_s} per channel (scores_backward, then
    wy_gate_grad_kernel), and dg gets the w share dkb * (beta e^b k) per channel, not yet
    reverse-cumsummed."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_n, i_c, gid, bos, T_n = chunk_program(i_t, i_b, cu_seqlens, chunk_indices, T, NT, IS_VARLEN)
    r0 = i_c * CHUNK
    if r0 >= T_n:  # a padding program of a packed batch's grid
        return
    o_t, m_t, rows, Ti, bt = _wy_chunk(Ai, beta, bos, r0, T_n, i_h, H)
    strict = (o_t[:, None] > o_t[None, :]) & m_t[:, None] & m_t[None, :]
    if GATE == SCALAR_GATE:
        G = tl.load(gc + rows, mask=m_t, other=0.)
        eG = tl.where(m_t, tl.exp(tl.where(m_t, G, 0.)), 0.)
        D = tl.exp(tl.where(strict, G[:, None] - G[None, :], 0.))
    else:
        eG = tl.where(m_t, 1., 0.)
        D = tl.full([CHUNK, CHUNK], 1., tl.float32)
    state = (gid * H + i_h) * K * V
    dA = tl.zeros([CHUNK, CHUNK], dtype=tl.float32)
    KK = tl.zeros([CHUNK, CHUNK], dtype=tl.float32)
    db_ = tl.zeros([CHUNK], dtype=tl.float32)
    dgk = tl.zeros([CHUNK], dtype=tl.float32)
    # pass 1, over V: dvb = Ai^T du, u = Ai (beta v)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        pv = (rows * V)[:, None] + o_v[None, :]
        dvn = tl.load(dv_new + pv, mask=m_tv, other=0.)
        vt = tl.load(v + pv, mask=m_tv, other=0.).to(tl.float32)
        dvb = tl.dot(tl.trans(Ti), dvn, input_precision=PREC)
        ut = tl.dot(Ti, vt * bt[:, None], input_precision=PREC)
        dA += tl.dot(dvb, tl.trans(ut), input_precision=PREC)
        db_ += tl.sum(dvb * vt, axis=1)
        tl.store(dv + pv, (dvb * bt[:, None]).to(dv.dtype.element_ty), mask=m_tv)
    # pass 2, over K: dw = -du h^T, dkb = Ai^T dw, w = Ai (beta e^b k)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_tk = m_t[:, None] & m_k[None, :]
        pk = (rows * K)[:, None] + o_k[None, :]
        kt = tl.load(k + pk, mask=m_tk, other=0.).to(tl.float32)
        if GATE == VECTOR_GATE:
            eGk = tl.where(m_tk, tl.exp(tl.load(gc + pk, mask=m_tk, other=0.)), 0.)
        else:
            eGk = eG[:, None]
        bte = bt[:, None] * eGk
        kb = kt * bte
        wt = tl.dot(Ti, kb, input_precision=PREC)
        dw = tl.zeros([CHUNK, BK], dtype=tl.float32)
        for i_v in range(0, tl.cdiv(V, BV)):
            o_v = i_v * BV + tl.arange(0, BV)
            m_v = o_v < V
            dvn = tl.load(dv_new + (rows * V)[:, None] + o_v[None, :],
                          mask=m_t[:, None] & m_v[None, :], other=0.)
            h = tl.load(hs + state + o_k[:, None] * V + o_v[None, :],
                        mask=m_k[:, None] & m_v[None, :], other=0.)
            dw -= tl.dot(dvn.to(DT_S), tl.trans(h).to(DT_S), input_precision=PREC)
        dkb = tl.dot(tl.trans(Ti), dw, input_precision=PREC)
        dA += tl.dot(dkb, tl.trans(wt), input_precision=PREC)
        db_ += tl.sum(dkb * kt * eGk, axis=1)
        if GATE == VECTOR_GATE:
            tl.store(dg + pk, dkb * kb, mask=m_tk)
        else:
            KK += tl.dot(kt, tl.trans(kt), input_precision=PREC)
            dgk += tl.sum(dkb * kb, axis=1)
        tl.store(dk + pk, dkb * bte, mask=m_tk)
    dA = tl.where(strict, -dA, 0.)
    if GATE == VECTOR_GATE:
        Akk_ = tl.load(Akk + (rows * CHUNK)[:, None] + o_t[None, :], mask=strict, other=0.)
    else:
        Akk_ = tl.where(strict, KK * D, 0.)
    db_ += tl.sum(dA * Akk_, axis=1)
    dAkk_ = dA * bt[:, None]
    tl.store(dbeta + rows, db_, mask=m_t)
    if GATE == VECTOR_GATE:
        tl.store(dAkk + (rows * CHUNK)[:, None] + o_t[None, :], dAkk_, mask=m_t[:, None])
    else:
        dKK = dAkk_ * D
        if GATE == SCALAR_GATE:
            P = dAkk_ * Akk_
            dgt = tl.sum(P, axis=1) - tl.sum(P, axis=0) + dgk
            tl.store(dg + rows, tl.cumsum(dgt, axis=0, reverse=True), mask=m_t)
        # pass 3, over K: dk += dKK k + dKK^T k (this program's own pass-2 stores, read back)
        tl.debug_barrier()
        for i_k in range(0, tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_tk = m_t[:, None] & (o_k < K)[None, :]
            pk = (rows * K)[:, None] + o_k[None, :]
            kt = tl.load(k + pk, mask=m_tk, other=0.).to(tl.float32)
            dkt = tl.load(dk + pk, mask=m_tk, other=0.) + tl.dot(dKK, kt, input_precision=PREC) \
                + tl.dot(tl.trans(dKK), kt, input_precision=PREC)
            tl.store(dk + pk, dkt, mask=m_tk)


@triton.jit(do_not_specialize=["T", "NT"])
def wy_gate_grad_kernel(k, dki, dkj, dgw, dg, cu_seqlens, chunk_indices, T, NT,
                        H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr,
                        IS_VARLEN: tl.constexpr):
    """Vector gates: the WY share of dg [tokens, H, K] fp32 of one (K block, chunk,
    batch x head): the reverse cumsum within the chunk of dgw + k (dki - dkj), where dki / dkj
    are the gated k k^T's gradients through its row / column factor (e^{+b} / e^{-b})."""
    i_k, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_n, i_c, gid, bos, T_n = chunk_program(i_t, i_b, cu_seqlens, chunk_indices, T, NT, IS_VARLEN)
    r0 = i_c * CHUNK
    if r0 < T_n:
        o_t = tl.arange(0, CHUNK)
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = ((r0 + o_t) < T_n)[:, None] & (o_k < K)[None, :]
        pk = (((bos + r0 + o_t) * H + i_h) * K)[:, None] + o_k[None, :]
        kt = tl.load(k + pk, mask=m_tk, other=0.).to(tl.float32)
        x = tl.load(dgw + pk, mask=m_tk, other=0.) + kt * (
            tl.load(dki + pk, mask=m_tk, other=0.) - tl.load(dkj + pk, mask=m_tk, other=0.))
        tl.store(dg + pk, tl.cumsum(x, axis=0, reverse=True), mask=m_tk)


@triton.jit(do_not_specialize=["T"])
def recurrent_fwd_kernel(q, k, v, g, beta, h0, o, ht, cu_seqlens, scale, T,
                         H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                         BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr,
                         L2: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr,
                         IS_VARLEN: tl.constexpr):
    """Token-by-token delta rule (decode): one program per (V block, sequence x value head),
    the [K, BV] state in registers. Value head i_hv reads q/k head i_hv // (HV // H).
    g: [tokens, HV] (scalar gate) or [tokens, HV, K] (vector gate), raw log decays."""
    i_nh, i_v = tl.program_id(0), tl.program_id(1)  # (sequence x head) on x: no 65535 cap
    i_n, i_hv = i_nh // HV, i_nh % HV
    i_h = i_hv // (HV // H)
    bos, T_n = seq_bounds(i_n, cu_seqlens, T, IS_VARLEN)
    o_k, o_v, m_k, m_v, m_kv, kv = state_tile(0, i_v, K, V, BK, BV)
    head = (i_n * HV + i_hv).to(tl.int64) * K * V
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        S += tl.load(h0 + head + kv, mask=m_kv, other=0.).to(tl.float32)
    for t in range(0, T_n):
        tok = bos + t
        qt = tl.load(q + (tok * H + i_h) * K + o_k, mask=m_k, other=0.).to(tl.float32)
        kt = tl.load(k + (tok * H + i_h) * K + o_k, mask=m_k, other=0.).to(tl.float32)
        vt = tl.load(v + (tok * HV + i_hv) * V + o_v, mask=m_v, other=0.).to(tl.float32)
        bt = tl.load(beta + tok * HV + i_hv).to(tl.float32)
        if L2:
            qt = qt / tl.sqrt(tl.sum(qt * qt, axis=0) + L2NORM_EPS)
            kt = kt / tl.sqrt(tl.sum(kt * kt, axis=0) + L2NORM_EPS)
        if GATE == SCALAR_GATE:
            S = S * tl.exp(tl.load(g + tok * HV + i_hv).to(tl.float32))
        elif GATE == VECTOR_GATE:
            gt = tl.load(g + (tok * HV + i_hv) * K + o_k, mask=m_k, other=0.).to(tl.float32)
            S = S * tl.exp(gt)[:, None]
        err = vt - tl.sum(S * kt[:, None], axis=0)
        S += (bt * kt)[:, None] * err[None, :]
        ot = scale * tl.sum(S * qt[:, None], axis=0)
        tl.store(o + (tok * HV + i_hv) * V + o_v, ot.to(o.dtype.element_ty), mask=m_v)
    if STORE_HT:
        tl.store(ht + head + kv, S, mask=m_kv)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
def _l2norm(x: Tensor):
    """(y in x's dtype, y fp32, r fp32) of the in-kernel l2 norm, computed in fp32."""
    y, r = l2norm(x.float())
    return y.to(x.dtype), y, r


def _state_bv(K: int, V: int) -> int:
    """V block of the state walks (the full K is in registers): [BK, BV] fp32 <= 64 x 64 x 2."""
    return min(next_pow2(V), 64 if next_pow2(K) <= 128 else 32)


def _walk_warps(K: int, BV: int) -> int:
    """The state walks hold [K, BV] state plus [64, K] tiles: 8 warps once those are large.
    (A shape heuristic, not tuned on hardware yet.)"""
    return 8 if next_pow2(K) * BV >= 128 * 64 else 4


class _Prep:
    """Inputs as the chunk kernels see them: q/k l2-normalised (if asked) and repeated to the
    value heads, the chunk table and the gate cumsum."""

    def __init__(self, q, k, v, g, beta, cu_seqlens, use_l2):
        B, T, H, K = q.shape
        self.H, self.HV, self.K, self.V = H, v.shape[2], K, v.shape[3]
        self.l2 = use_l2
        self.qn = self.kn = self.rq = self.rk = None
        if use_l2:
            q, self.qn, self.rq = _l2norm(q)
            k, self.kn, self.rk = _l2norm(k)
        if self.HV != H:
            m = self.HV // H
            q, k = q.repeat_interleave(m, 2).contiguous(), k.repeat_interleave(m, 2).contiguous()
        self.q, self.k = q, k
        self.meta = ChunkMeta(cu_seqlens, B, T, TRITON_CHUNK)
        # (batch or sequence) x heads go on grid y of the WY kernels and the state walks
        check_grid_yz(max(B, self.meta.N) * self.HV, "batch (or sequences) x heads")
        self.cu = cu_seqlens
        self.B, self.T = B, T
        self.gc = gate_cumsum(g, None, self.meta, B, T, self.HV)
        self.GATE = gate_kind(g)
        # vector gates: the gated k k^T of the WY transform (e^{b_r - b_s} per channel inside
        # the sum, so it cannot be formed from a k k^T product in the WY kernels); fp32
        # products whatever the input dtype, as the inverse's own (its substitution compounds)
        self.Akk = (chunk_scores(k, k, self.gc, self.meta, 1.0, torch.float32)
                    if self.GATE == VECTOR_GATE else None)

    def scores_qk(self, scale: float) -> Optional[Tensor]:
        """Vector gates: the output's intra-chunk scores A_qk (scale included); else None."""
        if self.GATE != VECTOR_GATE:
            return None
        return chunk_scores(self.q, self.k, self.gc, self.meta, scale, self.q.dtype)

    def grads_to_inputs(self, dq: Tensor, dk: Tensor):
        """dq, dk [B, T, HV, K] fp32 of the kernels' q/k -> of the op's q/k (fp32)."""
        if self.HV != self.H:
            B, T, _, K = dq.shape
            dq = dq.view(B, T, self.H, -1, K).sum(3)
            dk = dk.view(B, T, self.H, -1, K).sum(3)
        if self.l2:
            dq = l2norm_backward(dq, self.qn, self.rq)
            dk = l2norm_backward(dk, self.kn, self.rk)
        return dq, dk


def _wy(p: _Prep, v, beta):
    """Ai, w, u of every chunk."""
    meta, B, T, H, K, V = p.meta, p.B, p.T, p.HV, p.K, p.V
    _, _, PREC = dot_config(p.q.dtype)
    grid = (meta.grid_t, B * H)
    Ai = fp32_empty(v, B, T, H, TRITON_CHUNK)
    # fp32-accurate products in the inverse whatever the input dtype: its 15 substitution steps
    # compound rounding (the 16x16 products are cheap; 3xTF32 on the GPU: exact_precision)
    wy_inverse_kernel[grid](p.k, beta, p.gc, p.Akk, Ai, p.cu, meta.indices, T, meta.NT,
                            H=H, K=K, BK=min(K_BLOCK, next_pow2(K)), GATE=p.GATE,
                            IS_VARLEN=meta.is_varlen, PREC=exact_precision())
    w, u = fp32_empty(v, B, T, H, K), fp32_empty(v, B, T, H, V)
    wy_apply_kernel[grid](p.k, v, beta, p.gc, Ai, w, u, p.cu, meta.indices, T, meta.NT,
                          H=H, K=K, V=V, BK=min(64, next_pow2(K)), BV=min(64, next_pow2(V)),
                          GATE=p.GATE, IS_VARLEN=meta.is_varlen, PREC=PREC)
    return Ai, w, u


def _states(p: _Prep, w, u, h0, output_final_state):
    """h_c before every chunk, v_new, and the final states."""
    meta, T, H, K, V = p.meta, p.T, p.HV, p.K, p.V
    _, DT_S, PREC = dot_config(p.q.dtype)
    hs = fp32_empty(u, meta.n_chunks, H, K, V)
    v_new = fp32_empty(u, *u.shape)
    ht = fp32_empty(u, meta.N, H, K, V) if output_final_state else None
    BV = _state_bv(K, V)
    delta_state_kernel[(triton.cdiv(V, BV), meta.N * H)](
        p.k, w, u, p.gc, hs, v_new, h0, ht, p.cu, meta.offsets, T, meta.NT,
        H=H, K=K, V=V, BK=next_pow2(K), BV=BV, GATE=p.GATE, USE_H0=h0 is not None,
        STORE_HT=ht is not None, IS_VARLEN=meta.is_varlen, DT_S=DT_S, PREC=PREC,
        num_warps=_walk_warps(K, BV), num_stages=full_k_stages(K))
    return hs, v_new, ht


def _chunk_forward(q, k, v, g, beta, scale, h0, output_final_state, cu_seqlens, use_l2):
    p = _Prep(q, k, v, g, beta, cu_seqlens, use_l2)
    _, w, u = _wy(p, v, beta)
    hs, v_new, ht = _states(p, w, u, h0, output_final_state)
    meta, B, T, H, K, V = p.meta, p.B, p.T, p.HV, p.K, p.V
    DT, DT_S, PREC = dot_config(q.dtype)
    BK, BV = min(64, next_pow2(K)), min(64, next_pow2(V))
    o = torch.empty_like(v)
    chunk_out_kernel[(triton.cdiv(V, BV), meta.grid_t, B * H)](
        p.q, p.k, v_new, p.gc, None, p.scores_qk(scale), hs, o, p.cu, meta.indices, scale, T,
        meta.NT, H=H, K=K, V=V, C=TRITON_CHUNK, BK=BK, BV=BV, GATE=p.GATE, REV=False,
        IS_VARLEN=meta.is_varlen, DT=DT, DT_S=DT_S, PREC=PREC)
    return o, ht


def _chunk_backward(q, k, v, g, beta, scale, h0, cu_seqlens, use_l2, do, dht):
    p = _Prep(q, k, v, g, beta, cu_seqlens, use_l2)
    Ai, w, u = _wy(p, v, beta)
    hs, v_new, _ = _states(p, w, u, h0, False)
    meta, B, T, H, K, V = p.meta, p.B, p.T, p.HV, p.K, p.V
    DT, DT_S, PREC = dot_config(q.dtype)
    gated, GATE = p.gc is not None, p.GATE
    Aqk = p.scores_qk(scale)
    dhs = fp32_empty(v, meta.n_chunks, H, K, V)
    dv_new = fp32_empty(v, *v.shape)
    dh0 = fp32_empty(v, meta.N, H, K, V) if h0 is not None else None
    BV = _state_bv(K, V)
    delta_state_bwd_kernel[(triton.cdiv(V, BV), meta.N * H)](
        p.q, p.k, w, do, p.gc, Aqk, dhs, dv_new, dht, dh0, p.cu, meta.offsets, scale, T,
        meta.NT, H=H, K=K, V=V, BK=next_pow2(K), BV=BV, GATE=GATE, USE_DHT=dht is not None,
        STORE_DH0=dh0 is not None, IS_VARLEN=meta.is_varlen, DT=DT, DT_S=DT_S, PREC=PREC,
        num_warps=_walk_warps(K, BV),
        num_stages=full_k_stages(K, 4 if DT == tl.float32 else 2))
    # output and state parts of dq, dk, dg: the GLA kernel with v_new for v
    BK, BVo = min(64, next_pow2(K)), min(64, next_pow2(V))
    NK = triton.cdiv(K, BK)
    dq, dk_out = fp32_empty(v, B, T, H, K), fp32_empty(v, B, T, H, K)
    dA = dqi = dki = None
    if GATE == VECTOR_GATE:  # the output scores' gradient, through e^{b_t - b_s} per channel
        dA = chunk_scores(do, v_new, None, meta, scale, q.dtype)
        dqi, dki = scores_backward(p.q, p.k, p.gc, dA, meta, q.dtype)
        dg_out = fp32_empty(v, B, T, H, K)
    else:
        dg_out = fp32_empty(v, NK, B * T * H) if gated else None
    chunk_dqkg_kernel[(NK, meta.grid_t, B * H)](
        p.q, p.k, v_new, do, p.gc, None, hs, dhs, dA, dqi, dki, dq, dk_out, dg_out,
        p.cu, meta.indices, scale, T, meta.NT, B * T * H,
        H=H, K=K, V=V, C=TRITON_CHUNK, BK=BK, BV=BVo, GATE=GATE, HAS_DG=gated,
        IS_VARLEN=meta.is_varlen, DT=DT, DT_S=DT_S, PREC=PREC)
    # the WY transform's adjoint
    dk_wy = fp32_empty(v, B, T, H, K)
    dv = torch.empty_like(v)
    dbeta = fp32_empty(v, *beta.shape)
    dg_wy = fp32_empty(v, *g.shape) if gated else None
    dAkk = fp32_empty(v, B, T, H, TRITON_CHUNK) if GATE == VECTOR_GATE else None
    wy_bwd_kernel[(meta.grid_t, B * H)](
        p.k, v, beta, p.gc, Ai, hs, dv_new, p.Akk, dk_wy, dv, dbeta, dg_wy, dAkk, p.cu,
        meta.indices, T, meta.NT, H=H, K=K, V=V, BK=min(K_BLOCK, next_pow2(K)),
        BV=min(32, next_pow2(V)), GATE=GATE, IS_VARLEN=meta.is_varlen, DT_S=DT_S, PREC=PREC,
        num_warps=8 if K > 64 else 4)
    if GATE == VECTOR_GATE:
        # the gated k k^T's share: dk through both factors, dg per channel (then cumsummed)
        dki, dkj = scores_backward(p.k, p.k, p.gc, dAkk, meta, q.dtype)
        dk_wy += dki + dkj
        dg = torch.empty_like(dg_wy)
        BKg = min(64, next_pow2(K))
        wy_gate_grad_kernel[(triton.cdiv(K, BKg), meta.grid_t, B * H)](
            p.k, dki, dkj, dg_wy, dg, p.cu, meta.indices, T, meta.NT, H=H, K=K, BK=BKg,
            IS_VARLEN=meta.is_varlen)
        dg += dg_out
    elif gated:
        dg = dg_out.sum(0).view(g.shape) + dg_wy
    else:
        dg = None
    dq, dk = p.grads_to_inputs(dq, dk_out + dk_wy)
    return dq, dk, dv, dg, dbeta, dh0


def _recurrent_forward(q, k, v, g, beta, scale, h0, output_final_state, cu_seqlens, use_l2):
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    BK = next_pow2(K)
    BV = min(next_pow2(V), max(16, 8192 // BK))
    o = torch.empty_like(v)
    ht = fp32_empty(q, N, HV, K, V) if output_final_state else None
    recurrent_fwd_kernel[(N * HV, triton.cdiv(V, BV))](
        q, k, v, g, beta, h0, o, ht, cu_seqlens, scale, T,
        H=H, HV=HV, K=K, V=V, BK=BK, BV=BV, GATE=gate_kind(g), L2=use_l2,
        USE_H0=h0 is not None, STORE_HT=ht is not None, IS_VARLEN=cu_seqlens is not None)
    return o, ht


# ---------------------------------------------------------------------------------------------
# Backend contract
# ---------------------------------------------------------------------------------------------
def forward(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
            use_qk_l2norm_in_kernel, mode):
    check_mode(mode)
    # Chunks mix tokens both ways (0 * inf); the token walk of mode "recurrent" is causal as is.
    guard = (NonFiniteGuard.build(k, v, (g,), (beta,), cu_seqlens=cu_seqlens)
             if mode == "chunk" else None)
    if guard is not None:
        k, v, (g,), (beta,) = guard.clean(k, v, (g,), (beta,))
        o, ht = forward(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                        use_qk_l2norm_in_kernel, mode)
        return guard.poison(o, ht)
    in_dtype, f64 = v.dtype, q.dtype == torch.float64
    q, k, v, g, beta, h0 = as_compute(q, k, v, g, beta, initial_state)
    if q.shape[1] == 0:
        N = q.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
        o, ht = empty_forward(q, v, h0, output_final_state, N)
    else:
        run = _chunk_forward if mode == "chunk" else _recurrent_forward
        o, ht = run(q, k, v, g, beta, float(scale), h0, output_final_state, cu_seqlens,
                    use_qk_l2norm_in_kernel)
    if f64 and ht is not None:
        ht = ht.double()
    return o.to(in_dtype), ht


def backward(q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm_in_kernel, mode,
             do, dht):
    # mode "recurrent" is differentiated by the chunk kernels: the same function, and a
    # token-by-token reverse walk would need every state (or an unstable inversion).
    check_mode(mode)
    guard = NonFiniteGuard.build(k, v, (g,), (beta,), cu_seqlens=cu_seqlens)
    if guard is not None:
        k, v, (g,), (beta,) = guard.clean(k, v, (g,), (beta,))
        do, dht = guard.clean_grads(do, dht)
        return backward(q, k, v, g, beta, scale, initial_state, cu_seqlens,
                        use_qk_l2norm_in_kernel, mode, do, dht)
    dtypes = (q.dtype, k.dtype, v.dtype, None if g is None else g.dtype, beta.dtype,
              None if initial_state is None else initial_state.dtype)
    q, k, v, g, beta, h0, do, dht = as_compute(q, k, v, g, beta, initial_state, do, dht)
    if q.shape[1] == 0:
        (dq, dk, dv, dg, dbeta), dh0 = empty_backward(h0, dht, q, k, v, g, beta)
    else:
        dq, dk, dv, dg, dbeta, dh0 = _chunk_backward(q, k, v, g, beta, float(scale), h0,
                                                     cu_seqlens, use_qk_l2norm_in_kernel,
                                                     do, dht)
        dg = zero_floored(dg, g)
    return restore_dtypes((dq, dk, dv, dg, dbeta, dh0), dtypes)

"""Triton kernels of the chunk engine (launchers in lightning_ops/chunk/triton.py; the delta
rule's launchers in lightning_ops/delta/triton.py use chunk_cumsum, chunk_out and chunk_dqkg).

One engine for every gate kind, picked by the constexpr GATE (kinds: chunk/constants.py):
  NO_GATE      linear attention         SCALAR_GATE  cumulative sums in gc [tokens, H]
  GAMMA_GATE   constant g_gamma [H]     VECTOR_GATE  cumulative sums in gc [tokens, H, K]
(SCALAR_GATE and VECTOR_GATE fold g_gamma into gc when both are given.)
G below is the chunk-local inclusive cumulative log decay of a row, G_L that of the chunk's last
valid row, h_c the state before chunk c, dh_c the gradient of the state after chunk c.

Math of one chunk (rows t, s; A_ts = scale sum_k q_tk k_sk e^{G_tk - G_sk} for s <= t,
dA_ts = scale do_t . v_s for s <= t):
  o_t      = scale (q_t e^{G_t}) h_c + sum_{s<=t} A_ts v_s
  h_{c+1}  = e^{G_L} h_c + sum_s (k_s e^{G_L - G_s}) v_s^T
  dh_{c-1} = e^{G_L} dh_c + scale sum_t (q_t e^{G_t}) do_t^T
  dv_s     = (k_s e^{G_L - G_s}) dh_c + sum_{t>=s} A_ts do_t
  dq_t     = scale (do_t h_c^T) e^{G_t} + sum_{s<=t} dA_ts k_s e^{G_t - G_s}
  dk_s     = (v_s dh_c^T) e^{G_L - G_s} + sum_{t>=s} dA_ts q_t e^{G_t - G_s}
  dg_t     = sum_{t'>=t} (q dq - k dk^intra)_t' + e^{G_L} rowsum(h_c dh_c) + sum_{s<t} (k dk^inter)_s
(summed over K for scalar gates). Every exponent is <= 0: decays are taken relative to a later
row. The vector-gate scores, which need e^{G_t - G_s} per channel inside a matmul, are tiled in
BC-row sub-chunks: earlier sub-chunks are factored through a row between them (exponents <= 0
on both sides), the diagonal sub-chunk is summed elementwise.

The state kernel walks chunks forward (h) or backward (dh, REV) and may fuse the per-chunk
output into the walk (o forward: the single-pass Lightning-Attention-2 form; dv backward);
chunk_out_kernel is the chunk-parallel output of the two-pass form.

Pointers: rows are token ids (int64, from bos) times H plus the head, times the row length; each
kernel forms its row offsets once (rk = (tok * H + i_h) * K etc.).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..triton_utils import (chunk_program, chunk_slot_base, exact_precision, seq_bounds,
                           state_tile)
from . import constants

NO_GATE = tl.constexpr(constants.NO_GATE)
SCALAR_GATE = tl.constexpr(constants.SCALAR_GATE)
GAMMA_GATE = tl.constexpr(constants.GAMMA_GATE)
VECTOR_GATE = tl.constexpr(constants.VECTOR_GATE)

# Per-token log decays below -GATE_FLOOR count as -GATE_FLOOR in the chunk kernels: decays are
# differences of chunk cumsums here (e^{G_t - G_s}), so a -inf gate (a reset) would give
# -inf - -inf = NaN and one huge gate would swamp the small ones after it by cancellation.
# e^-104 rounds to exactly 0 in fp32 (below half the smallest subnormal), so a floored gate is
# still an exact reset, and it costs at most ~104 * eps_fp32 of relative error in the later
# decays of its chunk. Gates above the floor are untouched; the floored ones get gradient 0
# (the launchers mask them: zero_floored in chunk/triton.py).
GATE_FLOOR = tl.constexpr(constants.GATE_FLOOR)
# fp32-accurate products whatever the input dtype (triton_utils.exact_precision: 3xTF32 on the
# GPU, exact in the interpreter; read at import, after TRITON_INTERPRET is set)
EXACT_PREC = tl.constexpr(exact_precision())


@triton.jit
def _gates(gc, gamma, i_h, bos, r0, T_n, o_t, m_t, o_k, m_k,
           H: tl.constexpr, K: tl.constexpr, C: tl.constexpr, GATE: tl.constexpr):
    """(G, G_L) of the chunk starting at local row r0: scalar gates give G [C] and a scalar G_L,
    vector gates G [C, BK] and G_L [BK] for columns o_k; NO_GATE gives zeros."""
    last = tl.minimum(T_n - r0, C) - 1
    tok_last = bos + r0 + tl.maximum(last, 0)
    if GATE == SCALAR_GATE:
        G = tl.load(gc + (bos + r0 + o_t) * H + i_h, mask=m_t, other=0.)
        G_L = tl.load(gc + tok_last * H + i_h, mask=last >= 0, other=0.)
    elif GATE == GAMMA_GATE:
        gm = tl.load(gamma + i_h).to(tl.float32)
        G = gm * (o_t + 1).to(tl.float32)
        G_L = gm * (last + 1).to(tl.float32)
    elif GATE == VECTOR_GATE:
        rk = ((bos + r0 + o_t) * H + i_h) * K
        G = tl.load(gc + rk[:, None] + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.)
        # (vector & scalar masks are rejected by the interpreter: compare a vector)
        G_L = tl.load(gc + (tok_last * H + i_h) * K + o_k, mask=m_k & (o_k * 0 + last >= 0),
                      other=0.)
    else:
        G = tl.zeros([C], dtype=tl.float32)
        G_L = tl.sum(G, axis=0)
    return G, G_L


@triton.jit
def _row_decay(G, G_L, m_t, FROM_LAST: tl.constexpr, GATE: tl.constexpr):
    """Per-row factor broadcastable to [C, BK]: e^{G_L - G} (FROM_LAST) or e^{G}; 0 on rows past
    the sequence end (their exponent is meaningless and could overflow, so it is not taken)."""
    if GATE == VECTOR_GATE:
        if FROM_LAST:
            e = G_L[None, :] - G
        else:
            e = G
        f = tl.where(m_t[:, None], tl.exp(tl.where(m_t[:, None], e, 0.)), 0.)
    else:
        if FROM_LAST:
            e = G_L - G
        else:
            e = G
        f = tl.where(m_t, tl.exp(tl.where(m_t, e, 0.)), 0.)[:, None]
    return f


@triton.jit
def _intra_mask(Sraw, G, m_t, o_t, scale, REV: tl.constexpr, GATE: tl.constexpr):
    """Causal, decayed, scaled intra-chunk scores from raw dot products (scalar gates or none).
    Forward: M[t, s] = scale Sraw[t, s] e^{G_t - G_s}, s <= t. REV: M[s, t], the transpose."""
    if REV:
        keep = (o_t[None, :] >= o_t[:, None]) & m_t[:, None] & m_t[None, :]
    else:
        keep = (o_t[:, None] >= o_t[None, :]) & m_t[:, None] & m_t[None, :]
    if GATE == SCALAR_GATE or GATE == GAMMA_GATE:
        if REV:
            e = G[None, :] - G[:, None]
        else:
            e = G[:, None] - G[None, :]
        Sraw = Sraw * tl.exp(tl.where(keep, e, 0.))
    return tl.where(keep, Sraw * scale, 0.)


@triton.jit
def _load_A(A, tok, i_h, m_t, o_t, H: tl.constexpr, C: tl.constexpr, REV: tl.constexpr):
    """The precomputed vector-gate scores of a chunk, A[t, s] (or its transpose for REV); only
    the causal part is read (the rest is never written)."""
    rc = (tok * H + i_h) * C
    if REV:
        keep = (o_t[None, :] >= o_t[:, None]) & m_t[:, None] & m_t[None, :]
        p = A + rc[None, :] + o_t[:, None]
    else:
        keep = (o_t[:, None] >= o_t[None, :]) & m_t[:, None] & m_t[None, :]
        p = A + rc[:, None] + o_t[None, :]
    return tl.load(p, mask=keep, other=0.)


@triton.jit(do_not_specialize=["T", "NT"])
def chunk_cumsum_kernel(g, gamma, gc, cu_seqlens, chunk_indices, T, NT,
                        H: tl.constexpr, D: tl.constexpr, C: tl.constexpr, BD: tl.constexpr,
                        HAS_GAMMA: tl.constexpr, IS_VARLEN: tl.constexpr):
    """gc = chunk-local inclusive cumsum of max(g + g_gamma, -GATE_FLOOR) in fp32; g is
    [tokens, H, D]."""
    i_d, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_n, i_c, gid, bos, T_n = chunk_program(i_t, i_b, cu_seqlens, chunk_indices, T, NT, IS_VARLEN)
    o_t = tl.arange(0, C)
    o_d = i_d * BD + tl.arange(0, BD)
    mask = ((i_c * C + o_t) < T_n)[:, None] & (o_d < D)[None, :]
    p = ((bos + i_c * C + o_t) * H + i_h)[:, None] * D + o_d[None, :]
    x = tl.load(g + p, mask=mask, other=0.).to(tl.float32)
    if HAS_GAMMA:
        x += tl.load(gamma + i_h).to(tl.float32)
    x = tl.where(x < -GATE_FLOOR, -GATE_FLOOR, x)  # keeps NaN (NaN < c is false)
    tl.store(gc + p, tl.cumsum(x, axis=0), mask=mask)


@triton.jit(do_not_specialize=["T"])
def seq_revcumsum_kernel(x, add, out, cu_seqlens, T,
                         H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                         HAS_ADD: tl.constexpr, IS_VARLEN: tl.constexpr):
    """out_t = sum_{t' >= t in its sequence} x_t' (+ add[n]); x, out [tokens, H, D] fp32."""
    i_nh, i_d = tl.program_id(0), tl.program_id(1)  # (sequence x head) on x: no 65535 cap
    i_n, i_h = i_nh // H, i_nh % H
    bos, T_n = seq_bounds(i_n, cu_seqlens, T, IS_VARLEN)
    o_t = tl.arange(0, BT)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    if HAS_ADD:
        carry = tl.load(add + (i_n * H + i_h).to(tl.int64) * D + o_d, mask=m_d, other=0.)
    else:
        carry = tl.zeros([BD], dtype=tl.float32)
    n_b = tl.cdiv(T_n, BT)
    for j in range(0, n_b):
        r0 = (n_b - 1 - j) * BT
        mask = ((r0 + o_t) < T_n)[:, None] & m_d[None, :]
        p = ((bos + r0 + o_t) * H + i_h)[:, None] * D + o_d[None, :]
        xt = tl.load(x + p, mask=mask, other=0.)
        y = tl.cumsum(xt, axis=0, reverse=True) + carry[None, :]
        tl.store(out + p, y.to(out.dtype.element_ty), mask=mask)
        carry += tl.sum(xt, axis=0)


@triton.jit(do_not_specialize=["T", "NT"])
def chunk_state_kernel(
    x, y, z, gc, gamma, A, hs, h0, ht, out,
    cu_seqlens, chunk_offsets, scale, T, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr, REV: tl.constexpr,
    USE_H0: tl.constexpr, STORE_HT: tl.constexpr, STORE_HS: tl.constexpr,
    FUSE_OUT: tl.constexpr, IS_VARLEN: tl.constexpr,
    DT: tl.constexpr, DT_S: tl.constexpr, PREC: tl.constexpr,
):
    """One program per (K block, V block, sequence x head) walks the chunks of its sequence with
    the fp32 state in registers.

    Forward (x=k, y=v): h <- e^{G_L} h + (k e^{G_L - G})^T v, from h0, to ht.
    REV (x=q, y=do): dh <- e^{G_L} dh + scale (q e^{G})^T do, from dht, to dh0.
    STORE_HS writes the state met at each chunk (h_c, or dh after chunk c) for chunk-parallel
    kernels. FUSE_OUT (needs BK >= K) also writes the chunk's output from the register state:
    forward z=q gives o (single-pass forward); REV z=k gives dv."""
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos, T_n = seq_bounds(i_n, cu_seqlens, T, IS_VARLEN)
    n_c = tl.cdiv(T_n, C)
    base = chunk_slot_base(i_n, chunk_offsets, NT, IS_VARLEN)
    o_t = tl.arange(0, C)
    o_k, o_v, m_k, m_v, m_kv, kv = state_tile(i_k, i_v, K, V, BK, BV)
    head = (i_n * H + i_h).to(tl.int64) * K * V
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        S += tl.load(h0 + head + kv, mask=m_kv, other=0.).to(tl.float32)
    for j in range(0, n_c):
        if REV:
            i_c = n_c - 1 - j
        else:
            i_c = j
        r0 = i_c * C
        if STORE_HS:
            tl.store(hs + ((base + i_c) * H + i_h) * K * V + kv, S.to(hs.dtype.element_ty),
                     mask=m_kv)
        tok = bos + r0 + o_t
        m_t = (r0 + o_t) < T_n
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        rk = ((tok * H + i_h) * K)[:, None] + o_k[None, :]
        rv = ((tok * H + i_h) * V)[:, None] + o_v[None, :]
        xt = tl.load(x + rk, mask=m_tk, other=0.).to(tl.float32)
        yt = tl.load(y + rv, mask=m_tv, other=0.).to(tl.float32)
        G, G_L = _gates(gc, gamma, i_h, bos, r0, T_n, o_t, m_t, o_k, m_k, H, K, C, GATE)
        if FUSE_OUT:
            zt = tl.load(z + rk, mask=m_tk, other=0.).to(tl.float32)
            if GATE == NO_GATE:
                zs = zt
            else:
                zs = zt * _row_decay(G, G_L, m_t, REV, GATE)
            acc = tl.dot(zs.to(DT_S), S.to(DT_S), input_precision=PREC)
            if REV == 0:
                acc = acc * scale
            if GATE == VECTOR_GATE:
                M = _load_A(A, tok, i_h, m_t, o_t, H, C, REV)
            else:
                Sraw = tl.dot(zt.to(DT), tl.trans(xt).to(DT), input_precision=PREC)
                M = _intra_mask(Sraw, G, m_t, o_t, scale, REV, GATE)
            acc += tl.dot(M.to(DT), yt.to(DT), input_precision=PREC)
            tl.store(out + rv, acc.to(out.dtype.element_ty), mask=m_tv)
        if GATE == NO_GATE:
            xs = xt
        else:
            if REV:
                xs = xt * _row_decay(G, G_L, m_t, False, GATE)
            else:
                xs = xt * _row_decay(G, G_L, m_t, True, GATE)
            if GATE == VECTOR_GATE:
                S = S * tl.exp(G_L)[:, None]
            else:
                S = S * tl.exp(G_L)
        upd = tl.dot(tl.trans(xs).to(DT), yt.to(DT), input_precision=PREC)
        if REV:
            upd = upd * scale
        S += upd
    if STORE_HT:
        tl.store(ht + head + kv, S.to(ht.dtype.element_ty), mask=m_kv)


@triton.jit(do_not_specialize=["T", "NT"])
def chunk_out_kernel(
    z, x, y, gc, gamma, A, hs, out,
    cu_seqlens, chunk_indices, scale, T, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr, REV: tl.constexpr,
    IS_VARLEN: tl.constexpr, DT: tl.constexpr, DT_S: tl.constexpr, PREC: tl.constexpr,
):
    """Chunk-parallel output of one (V block, chunk, batch x head) from the stored states.
    Forward (z=q, x=k, y=v, hs=h): o = scale (q e^{G}) h_c + A v.
    REV (z=k, x=q, y=do, hs=dh): dv = (k e^{G_L - G}) dh_c + A^T do."""
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_n, i_c, gid, bos, T_n = chunk_program(i_t, i_b, cu_seqlens, chunk_indices, T, NT, IS_VARLEN)
    r0 = i_c * C
    o_t = tl.arange(0, C)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    tok = bos + r0 + o_t
    m_t = (r0 + o_t) < T_n
    m_tv = m_t[:, None] & m_v[None, :]
    rk = (tok * H + i_h) * K
    rv = ((tok * H + i_h) * V)[:, None] + o_v[None, :]
    state = hs + (gid * H + i_h) * K * V
    if GATE != VECTOR_GATE:
        o_k0 = tl.arange(0, BK)
        G, G_L = _gates(gc, gamma, i_h, bos, r0, T_n, o_t, m_t, o_k0, o_k0 < K, H, K, C, GATE)
    acc = tl.zeros([C, BV], dtype=tl.float32)
    Sraw = tl.zeros([C, C], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        # spare programs of a packed batch (r0 >= T_n) read no state: it was never written
        m_k = (o_k < K) & ((o_k * 0 + r0) < T_n)
        m_tk = m_t[:, None] & m_k[None, :]
        zt = tl.load(z + rk[:, None] + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
        Sb = tl.load(state + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :],
                     other=0.).to(tl.float32)
        if GATE == VECTOR_GATE:
            Gk, GkL = _gates(gc, gamma, i_h, bos, r0, T_n, o_t, m_t, o_k, m_k, H, K, C, GATE)
            zs = zt * _row_decay(Gk, GkL, m_t, REV, GATE)
        else:
            zs = zt
            xt = tl.load(x + rk[:, None] + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
            Sraw += tl.dot(zt.to(DT), tl.trans(xt).to(DT), input_precision=PREC)
        acc += tl.dot(zs.to(DT_S), Sb.to(DT_S), input_precision=PREC)
    if GATE == SCALAR_GATE or GATE == GAMMA_GATE:
        acc = acc * _row_decay(G, G_L, m_t, REV, GATE)
    if REV == 0:
        acc = acc * scale
    if GATE == VECTOR_GATE:
        M = _load_A(A, tok, i_h, m_t, o_t, H, C, REV)
    else:
        M = _intra_mask(Sraw, G, m_t, o_t, scale, REV, GATE)
    yt = tl.load(y + rv, mask=m_tv, other=0.).to(tl.float32)
    acc += tl.dot(M.to(DT), yt.to(DT), input_precision=PREC)
    tl.store(out + rv, acc.to(out.dtype.element_ty), mask=m_tv)


@triton.jit(do_not_specialize=["T", "NT"])
def chunk_scores_kernel(
    x, y, gc, A, cu_seqlens, chunk_indices, scale, T, NT,
    H: tl.constexpr, D: tl.constexpr, C: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr,
    GATED: tl.constexpr, IS_VARLEN: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    """A[t, s] = scale sum_d x_td y_sd (e^{G_td - G_sd} if GATED), s <= t in one chunk, stored
    [tokens, H, C] fp32; one program per (chunk, sub-chunk i of BC rows, batch x head) writes
    the columns s <= the end of sub-chunk i (the rest is never written: readers mask it).
    GATED (vector gates): the columns before sub-chunk i are factored through its first row n,
    (x e^{G - G_n}) (y e^{G_n - G})^T, both exponents <= 0; the diagonal block is summed
    elementwise over [BC, BC, BD] products. Ungated use: BC = C."""
    i_t, i_i, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_n, i_c, gid, bos, T_n = chunk_program(i_t, i_b, cu_seqlens, chunk_indices, T, NT, IS_VARLEN)
    o_c = tl.arange(0, BC)
    o_C = tl.arange(0, C)
    rn = i_c * C + i_i * BC  # first row of sub-chunk i
    if rn < T_n:  # a sub-chunk past the sequence end has nothing to write
        m_i = (rn + o_c) < T_n
        ri = (bos + rn + o_c) * H + i_h                   # rows of sub-chunk i
        rc = (bos + i_c * C + o_C) * H + i_h              # rows of the whole chunk
        before = (o_C < i_i * BC) & ((i_c * C + o_C) < T_n)  # rows of earlier sub-chunks
        acc = tl.zeros([BC, C], dtype=tl.float32)
        accd = tl.zeros([BC, BC], dtype=tl.float32)
        for i_d in range(0, tl.cdiv(D, BD)):
            o_d = i_d * BD + tl.arange(0, BD)
            m_d = o_d < D
            m_id = m_i[:, None] & m_d[None, :]
            pi = ri[:, None] * D + o_d[None, :]
            xi = tl.load(x + pi, mask=m_id, other=0.).to(tl.float32)
            yi = tl.load(y + pi, mask=m_id, other=0.).to(tl.float32)
            if GATED:
                Gi = tl.load(gc + pi, mask=m_id, other=0.)
                if i_i > 0:
                    m_cd = before[:, None] & m_d[None, :]
                    pc = rc[:, None] * D + o_d[None, :]
                    Gn = tl.load(gc + ((bos + rn) * H + i_h) * D + o_d, mask=m_d, other=0.)
                    yc = tl.load(y + pc, mask=m_cd, other=0.).to(tl.float32)
                    Gc = tl.load(gc + pc, mask=m_cd, other=0.)
                    ys = yc * tl.where(before[:, None], tl.exp(Gn[None, :] - Gc), 0.)
                    xs = xi * tl.exp(tl.where(m_i[:, None], Gi - Gn[None, :], float("-inf")))
                    acc += tl.dot(xs.to(DT), tl.trans(ys).to(DT), input_precision=PREC)
                # [t, s, d] products with e^{G_t - G_s} for s <= t only (the others would grow)
                keep = (o_c[:, None] >= o_c[None, :]) & m_i[:, None] & m_i[None, :]
                e = tl.where(keep[:, :, None], Gi[:, None, :] - Gi[None, :, :], float("-inf"))
                accd += tl.sum(xi[:, None, :] * yi[None, :, :] * tl.exp(e), axis=2)
            else:
                accd += tl.dot(xi.to(DT), tl.trans(yi).to(DT), input_precision=PREC)
        rows = A + ri * C
        if GATED:
            tl.store(rows[:, None] + o_C[None, :], acc * scale,
                     mask=m_i[:, None] & before[None, :])
        accd = tl.where(o_c[:, None] >= o_c[None, :], accd, 0.)
        tl.store(rows[:, None] + i_i * BC + o_c[None, :], accd * scale, mask=m_i[:, None])


@triton.jit(do_not_specialize=["T", "NT"])
def chunk_intra_grad_kernel(
    q, k, gc, dA, dq, dk, cu_seqlens, chunk_indices, T, NT,
    H: tl.constexpr, K: tl.constexpr, C: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
    IS_VARLEN: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    """Vector gates, intra-chunk part of dq and dk for one (K block x sub-chunk i, chunk,
    batch x head), fp32 out:
      dq_t = sum_{s<t} dA_ts k_s e^{G_t - G_s},  dk_s = sum_{t>s} dA_ts q_t e^{G_t - G_s}.
    Earlier sub-chunks enter dq through the first row of i, later ones dk through the last
    valid row of i (exponents <= 0 on both sides); the diagonal sub-chunk elementwise. The s == t
    term (dA_tt k_t in dq, dA_tt q_t in dk) is added by chunk_dqkg_kernel after dg is formed
    without it: it cancels exactly in q dq - k dk and would only add rounding error there."""
    NC: tl.constexpr = C // BC
    i_kc, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_k, i_i = i_kc // NC, i_kc % NC  # (K block x sub-chunk) on x: chunks alone on y
    i_b, i_h = i_bh // H, i_bh % H
    i_n, i_c, gid, bos, T_n = chunk_program(i_t, i_b, cu_seqlens, chunk_indices, T, NT, IS_VARLEN)
    o_c = tl.arange(0, BC)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    r0 = i_c * C + i_i * BC  # first row of sub-chunk i
    if r0 < T_n:  # a sub-chunk past the sequence end has nothing to write
        m_i = (r0 + o_c) < T_n
        ri = (bos + r0 + o_c) * H + i_h
        m_ik = m_i[:, None] & m_k[None, :]
        pi = ri[:, None] * K + o_k[None, :]
        Gi = tl.load(gc + pi, mask=m_ik, other=0.)
        dA_i = dA + ri * C  # dA rows of sub-chunk i

        dq_acc = tl.zeros([BC, BK], dtype=tl.float32)
        Gn = tl.load(gc + ((bos + r0) * H + i_h) * K + o_k, mask=m_k, other=0.)
        for j in range(0, i_i):  # earlier sub-chunks: all rows valid
            pj = ((bos + i_c * C + j * BC + o_c) * H + i_h)[:, None] * K + o_k[None, :]
            kj = tl.load(k + pj, mask=m_k[None, :], other=0.).to(tl.float32)
            Gj = tl.load(gc + pj, mask=m_k[None, :], other=0.)
            dAij = tl.load(dA_i[:, None] + j * BC + o_c[None, :], mask=m_i[:, None], other=0.)
            kj = kj * tl.exp(Gn[None, :] - Gj)
            dq_acc += tl.dot(dAij.to(DT), kj.to(DT), input_precision=PREC)
        dq_acc *= tl.exp(tl.where(m_i[:, None], Gi - Gn[None, :], float("-inf")))

        dk_acc = tl.zeros([BC, BK], dtype=tl.float32)
        rm = tl.minimum(r0 + BC, T_n) - 1  # last valid row of sub-chunk i
        Gm = tl.load(gc + ((bos + rm) * H + i_h) * K + o_k, mask=m_k, other=0.)
        for j in range(i_i + 1, NC):
            m_j = (i_c * C + j * BC + o_c) < T_n
            rj = (bos + i_c * C + j * BC + o_c) * H + i_h
            m_jk = m_j[:, None] & m_k[None, :]
            pj = rj[:, None] * K + o_k[None, :]
            qj = tl.load(q + pj, mask=m_jk, other=0.).to(tl.float32)
            Gj = tl.load(gc + pj, mask=m_jk, other=0.)
            dAji = tl.load(dA + (rj * C + i_i * BC)[:, None] + o_c[None, :],
                           mask=m_j[:, None] & m_i[None, :], other=0.)
            qj = qj * tl.exp(tl.where(m_j[:, None], Gj - Gm[None, :], float("-inf")))
            dk_acc += tl.dot(tl.trans(dAji).to(DT), qj.to(DT), input_precision=PREC)
        dk_acc *= tl.where(m_i[:, None], tl.exp(Gm[None, :] - Gi), 0.)

        # diagonal sub-chunk: [t, s, k] products with e^{G_t - G_s} for s < t only
        keep = (o_c[:, None] > o_c[None, :]) & m_i[:, None] & m_i[None, :]
        dAii = tl.load(dA_i[:, None] + i_i * BC + o_c[None, :], mask=keep, other=0.)
        qi = tl.load(q + pi, mask=m_ik, other=0.).to(tl.float32)
        ki = tl.load(k + pi, mask=m_ik, other=0.).to(tl.float32)
        E = dAii[:, :, None] * tl.exp(tl.where(keep[:, :, None], Gi[:, None, :] - Gi[None, :, :],
                                               float("-inf")))
        dq_acc += tl.sum(E * ki[None, :, :], axis=1)
        dk_acc += tl.sum(E * qi[:, None, :], axis=0)
        tl.store(dq + pi, dq_acc, mask=m_ik)
        tl.store(dk + pi, dk_acc, mask=m_ik)


@triton.jit(do_not_specialize=["T", "NT", "dg_stride"])
def chunk_dqkg_kernel(
    q, k, v, do, gc, gamma, hs, dhs, dA, dqi, dki, dq, dk, dg,
    cu_seqlens, chunk_indices, scale, T, NT, dg_stride,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr, HAS_DG: tl.constexpr,
    IS_VARLEN: tl.constexpr, DT: tl.constexpr, DT_S: tl.constexpr, PREC: tl.constexpr,
):
    """dq, dk (and dg) of one (K block, chunk, batch x head). The inter-chunk parts come from the
    stored h_c and dh_c, the intra parts from dA = scale do v^T (scalar gates, in registers) or
    from dqi/dki and dA's diagonal (vector gates). dg: vector [tokens, H, K] in g's dtype;
    scalar: fp32 partials [NK, tokens, H] (dg_stride = tokens * H), summed by the launcher."""
    i_k, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_n, i_c, gid, bos, T_n = chunk_program(i_t, i_b, cu_seqlens, chunk_indices, T, NT, IS_VARLEN)
    r0 = i_c * C
    o_t = tl.arange(0, C)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    tok = bos + r0 + o_t
    m_t = (r0 + o_t) < T_n
    m_tk = m_t[:, None] & m_k[None, :]
    m_s = m_k & ((o_k * 0 + r0) < T_n)  # spare programs of a packed batch read no state
    rows = tok * H + i_h
    pk = (rows * K)[:, None] + o_k[None, :]
    G, G_L = _gates(gc, gamma, i_h, bos, r0, T_n, o_t, m_t, o_k, m_k, H, K, C, GATE)
    state = (gid * H + i_h) * K * V
    dq_acc = tl.zeros([C, BK], dtype=tl.float32)
    dk_acc = tl.zeros([C, BK], dtype=tl.float32)
    dAs = tl.zeros([C, C], dtype=tl.float32)
    hdh = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_tv = m_t[:, None] & m_v[None, :]
        pv = (rows * V)[:, None] + o_v[None, :]
        vt = tl.load(v + pv, mask=m_tv, other=0.).to(tl.float32)
        dot_ = tl.load(do + pv, mask=m_tv, other=0.).to(tl.float32)
        kv = o_k[:, None] * V + o_v[None, :]
        m_kv = m_s[:, None] & m_v[None, :]
        h = tl.load(hs + state + kv, mask=m_kv, other=0.).to(tl.float32)
        dh = tl.load(dhs + state + kv, mask=m_kv, other=0.).to(tl.float32)
        dq_acc += tl.dot(dot_.to(DT_S), tl.trans(h).to(DT_S), input_precision=PREC)
        dk_acc += tl.dot(vt.to(DT_S), tl.trans(dh).to(DT_S), input_precision=PREC)
        if HAS_DG:
            hdh += tl.sum(h * dh, axis=1)
        if GATE != VECTOR_GATE:
            dAs += tl.dot(dot_.to(DT), tl.trans(vt).to(DT), input_precision=PREC)
    qt = tl.load(q + pk, mask=m_tk, other=0.).to(tl.float32)
    kt = tl.load(k + pk, mask=m_tk, other=0.).to(tl.float32)
    if GATE == NO_GATE:
        dq_acc = dq_acc * scale
    else:
        dq_acc = dq_acc * (scale * _row_decay(G, G_L, m_t, False, GATE))
        dk_acc = dk_acc * _row_decay(G, G_L, m_t, True, GATE)
    if HAS_DG:
        # dg_s = sum_{t>=s} (q dq - k dk_intra)_t + e^{G_L} sum(h dh) + sum_{t<s} (k dk_inter)_t:
        # the inter k term reaches only the gates after its row (e^{G_L - G_t}), so it is
        # summed over t < s directly, not as the chunk total minus a suffix (that would cancel
        # the O(1) last-row term against itself and leave only its rounding at strong decays)
        kdk_inter = kt * dk_acc
        before = tl.where(o_t[None, :] < o_t[:, None], 1., 0.)  # before[s, t] = t < s
        k_excl = tl.dot(before, kdk_inter, input_precision=EXACT_PREC)
        d_tot = hdh * tl.exp(G_L)
    # the s == t intra term (dA_tt k_t in dq_t, dA_tt q_t in dk_t) is kept apart: it cancels
    # exactly in q dq - k dk, so dg is formed without it
    if GATE == VECTOR_GATE:
        dq_acc += tl.load(dqi + pk, mask=m_tk, other=0.)
        dk_intra = tl.load(dki + pk, mask=m_tk, other=0.)
        d_tt = tl.load(dA + rows * C + o_t, mask=m_t, other=0.)
    else:
        M = _intra_mask(dAs, G, m_t, o_t, scale, False, GATE)
        on_diag = o_t[:, None] == o_t[None, :]
        d_tt = tl.sum(tl.where(on_diag, M, 0.), axis=1)
        M = tl.where(on_diag, 0., M)
        dq_acc += tl.dot(M.to(DT), kt.to(DT), input_precision=PREC)
        dk_intra = tl.dot(tl.trans(M).to(DT), qt.to(DT), input_precision=PREC)
    tl.store(dq + pk, (dq_acc + d_tt[:, None] * kt).to(dq.dtype.element_ty), mask=m_tk)
    tl.store(dk + pk, (dk_acc + dk_intra + d_tt[:, None] * qt).to(dk.dtype.element_ty),
             mask=m_tk)
    if HAS_DG:
        dgt = qt * dq_acc - kt * dk_intra
        if GATE == VECTOR_GATE:
            dgv = tl.cumsum(dgt, axis=0, reverse=True) + d_tot[None, :] + k_excl
            tl.store(dg + pk, dgv.to(dg.dtype.element_ty), mask=m_tk)
        else:
            dgs = tl.cumsum(tl.sum(dgt, axis=1), axis=0, reverse=True) + tl.sum(d_tot, axis=0) \
                + tl.sum(k_excl, axis=1)
            tl.store(dg + i_k.to(tl.int64) * dg_stride + rows, dgs, mask=m_t)

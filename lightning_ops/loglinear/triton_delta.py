"""Triton forward of chunk_log_linear_gated_delta_rule (the "loglinear_delta" family's triton
backend): log-linear attention's Fenwick hierarchy over the gated delta rule.

The math is loglinear/delta.py's chunked form (its module docstring): chunks of C = 2^c tokens
aligned on absolute positions (a sequence starting at offset t0 is front-padded with p = t0 % C
virtual identity tokens: masks only, nothing materialised), the chunk's WY/UT transform, the
level-weighted intra-chunk attention, and chunk-level Fenwick states S_m read at token level
c + 1 + m through the effective query Qe. Two kernels:

  lld_chunk_kernel  one program per (chunk, batch x head), everything that needs only the
                    chunk's own tokens (b the chunk-local prefix sums of g, D_ij = exp(sum of g
                    over (j, i]), a segment sum formed by a cumulative sum along each row of the
                    [C, C] tile, so no difference of two prefix sums is ever taken):
                      Tinv = (I + tril(beta_i (k_i . k_j) D_ij, -1))^-1   forward substitution
                             row by row on the [C, C] tile in registers (C - 1 steps of two
                             reductions: fp32 FMAs, no tl.dot, so the solve is as exact as the
                             inputs whatever their dtype)
                      w  = Tinv (beta exp(b) k)           [tokens, H, K] fp32 scratch
                      u  = Tinv (beta v)                  [tokens, H, V] fp32 scratch
                      P  = [(q_i . k_j) D_ij]_{j <= i},  Qe = q exp(b) - P w   (fp32 scratch)
                      o32 = (Phat * Wl) v,  Phat = P Tinv diag(beta), Wl_ij = lambda_i[lev(i, j)]
                    (the intra-chunk output, unscaled, fp32 scratch); K and V are walked in
                    blocks. For the last chunk of each sequence (with output_final_state) it
                    also keeps Rt = Tinv^T kd ([N H, C, K] fp32): the final state's low slots
                    need the partial chunk's writes by level, kd^T Tinv diag(sel_l beta) v =
                    (Rt diag(sel_l beta))^T v (holding the [C, C] Tinv in the walk instead
                    spilled 1.7 KB per thread at sm_90).
  lld_walk_kernel   one program per (sequence x head, V tile) walks its chunks in order. The
                    n_inter = L - c - 1 chunk-level states live in an fp32 global scratch
                    [N H, n_inter, K, V] (the program owns its V columns); level m is live
                    before chunk a iff bit m of the absolute chunk index a is set. Unlike the
                    scalar-gate walk (loglinear/triton.py, which stores each state once and
                    carries a decay sum), the delta rule's chunk transition
                    Tr = exp(b_last) I - kd^T w (kd = k exp(sum of g over (s, chunk end])) is a
                    K x K matrix: every live level is read and updated at every chunk.
                    Per chunk and live level m, two passes over K blocks: read
                    Qe S_m and X = w S_m (o += lambda[c + 1 + m] Qe S_m), then write
                    S_m <- exp(b_last) S_m - kd^T X (a barrier between: other threads still read
                    the rows being written). Then o = scale (o32 + inter) in v's dtype, and for
                    a complete chunk the Fenwick merge (mu = trailing ones of a): the chunk's
                    own write kd^T u plus the (already transitioned) levels below mu become
                    level mu (dropped when mu >= n_inter: level >= L weighs 0 for every later
                    query). K blocks, levels and slots are runtime loops (as in the scalar walk:
                    unrolled, K = 256 configurations take minutes to compile for sm_90).
  The initial state enters in the walk as in loglinear/triton.py: its slots l >= c + 1 are the
  chunk levels m = l - c - 1 at chunk t0 // C (copied to the scratch at the start); its slots
  1..c are virtual keys at slot r_l = ((p >> (l-1)) << (l-1)) - 1 of the first chunk, read by
  that chunk's queries at level bit_length(r_l xor slot) through Qe, and passed through the
  first chunk by Tr into its merge (Y the sum of those slots: Tr Y = exp(b_last) Y - kd^T (w Y)).
  The final state is written by the walk too (every slot, zeros included): the high slots from
  the levels live at the end, the low ones from the tokens of a trailing partial chunk (and the
  virtual keys, by Tr, when that chunk is the first).
  Every exponent is a sum of gates over exactly its own tokens (<= 0): a -inf gate is an exact
  reset, a huge negative one loses nothing to cancellation.

Memory besides the outputs: w, Qe (fp32, [tokens, H, K] each), u and o32 (fp32, [tokens, H, V]
each), the level scratch N H n_inter K V fp32 and the last chunks' Rt (N H C K fp32), all
from torch.empty: every element read is written first (the tests fill them with NaN).

chunk_size: C = chunk_size clamped to [16, 64] (loglinear/triton.chunk_size_for; the result does
not depend on C). L is a runtime argument; sequence length is never a constexpr. No host sync:
offsets and cu_seqlens are read on the device (the varlen chunk table is loglinear/triton.py's,
built with torch ops). Grouped value heads (H = m G): the kernels read q/k head h // m directly.
use_qk_l2norm_in_kernel: q and k are normalised by torch ops (fp32) before the kernels.

Products: fp32 operands everywhere, at TF32 for 16-bit inputs and 3xTF32 for fp32 ones
(triton_utils.dot_config's PREC): unlike the delta family's kernels, almost every operand here
is a computed fp32 quantity (Qe, w, kd, the level states, Tinv, the weighted scores), which a
16-bit operand dtype would round on top of the inputs' own rounding; bf16 / fp16 q, k, v are
exact in TF32. The k k^T of the WY transform in fp32 operands with exact_precision (its
substitution compounds rounding, as in delta/triton.py); the interpreter computes fp32
throughout. float64 inputs are computed in fp32 and cast back (unforced, the backend choice
sends them to torch). Outputs in v's dtype, states fp32. Non-finite k, v, g or beta:
lightning_ops.nonfinite.NonFiniteGuard around the kernels, as the torch forward (a NaN/Inf at
token t reaches only outputs from t on).

Tiles: K and V in blocks of 32 in both kernels, 8 warps for the chunk kernel at C = 64
(benchmarks/results/sm90_resources.csv, K <= 256, V <= 512, every dtype: at most 131,072 B of
shared memory; spills <= 192 B per thread at 16-bit, ~2.5 KB in the fp32 walk with both states,
where 3xTF32 splits every operand). Work: the chunk kernel O(C^2 (C + K + V)) per chunk; the walk
O(n_live C K BV) per chunk and V tile, n_live <= n_inter the levels set in the chunk index (not
tuned on hardware yet: no GPU was at hand when it was written).

Backward: none in Triton. The op (loglinear/delta.py, _lld_bwd) differentiates by recomputing
the torch chunked forward under autograd (grad_by_recompute), whichever backend ran the forward.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..delta.l2norm import l2norm
from ..nonfinite import NonFiniteGuard
from ..triton_utils import check_grid_yz, dot_config, exact_precision, next_pow2, seq_bounds
from .triton import _bitlen, _chunk_rows, _chunk_table, chunk_size_for

Tensor = torch.Tensor


@triton.jit(do_not_specialize=["T", "L"])
def lld_chunk_kernel(q, k, v, g, beta, lam, offsets, w, qe, u, o32, rt_last, cu_seqlens,
                     chunk_indices, T, L,
                     H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                     C: tl.constexpr, CLOG: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                     HAS_OFF: tl.constexpr, IS_VARLEN: tl.constexpr, STORE_LAST: tl.constexpr,
                     DT: tl.constexpr, PREC: tl.constexpr, PREC_X: tl.constexpr):
    """One absolute-aligned chunk of one (batch, head): Tinv, w, u, Qe and the intra-chunk
    output o32 (unscaled) for the chunk's real rows; for a sequence's last chunk (STORE_LAST)
    Rt = Tinv^T kd to rt_last [N H, C, K] (row j: the chunk's transitions from token j to the
    chunk's end applied to k_j)."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_h = i_bh % H
    i_g = i_h // (H // G)
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + 2 * i_t).to(tl.int64)
        j = tl.load(chunk_indices + 2 * i_t + 1)
    else:
        i_n = (i_bh // H).to(tl.int64)
        j = i_t
    bos, T_n = seq_bounds(i_n, cu_seqlens, T, IS_VARLEN)
    if HAS_OFF:
        p = (tl.load(offsets + i_n) % C).to(tl.int32)
    else:
        p = 0
    o_c = tl.arange(0, C)
    tok, m_t, m_n = _chunk_rows(j, p, bos, T_n, o_c, C)
    rq = (tok * G + i_g) * K
    rh = tok * H + i_h
    # gates: b = prefix sums (inclusive), D = exp(sum of g over (j, i]) for j <= i
    g_t = tl.load(g + rh, mask=m_t, other=0.).to(tl.float32)
    g_n = tl.load(g + (tok + 1) * H + i_h, mask=m_n, other=0.).to(tl.float32)
    eb = tl.where(m_t, tl.exp(tl.cumsum(g_t, axis=0)), 0.)
    causal = (o_c[:, None] >= o_c[None, :]) & m_t[:, None] & m_t[None, :]
    strict = causal & (o_c[None, :] < o_c[:, None])
    e = tl.cumsum(tl.where(strict, g_n[None, :], 0.), axis=1, reverse=True)
    D = tl.where(causal, tl.exp(tl.where(causal, e, 0.)), 0.)
    bt = tl.load(beta + rh, mask=m_t, other=0.).to(tl.float32)
    # the sequence's last chunk (one with real rows), whose Rt the final state needs
    last = (T_n > 0) & (j * C - p < T_n) & ((j + 1) * C - p >= T_n)
    # k k^T (fp32 operands, exact products) and q k^T over K blocks
    KK = tl.zeros([C, C], dtype=tl.float32)
    QK = tl.zeros([C, C], dtype=tl.float32)
    for kb in range(0, K, BK):
        o_k = kb + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        kt = tl.load(k + rq[:, None] + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
        qt = tl.load(q + rq[:, None] + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
        KK += tl.dot(kt, tl.trans(kt), input_precision=PREC_X)
        QK += tl.dot(qt.to(DT), tl.trans(kt).to(DT), input_precision=PREC)
    # Tinv = (I + A)^-1, A = tril(beta_i KK_ij D_ij, -1): M holds -A, then row by row the strict
    # lower part of Tinv: row_i = a + sum_{j<i} a_j row_j with a = -A_i (rows j < i final)
    M = tl.where(strict, -KK * D * bt[:, None], 0.)
    for i in range(1, C):
        sel = o_c[:, None] == i
        a = tl.sum(tl.where(sel, M, 0.), axis=0)
        a = a + tl.sum(a[:, None] * M, axis=0)
        M = tl.where(sel, a[None, :], M)
    Ti = M + tl.where(o_c[:, None] == o_c[None, :], 1., 0.)
    P = QK * D
    # Phat * Wl: Gated DeltaNet's intra-chunk attention weighed by the levels
    Ph = tl.dot(P, Ti, input_precision=PREC) * bt[None, :]
    lev = _bitlen(o_c[:, None] ^ o_c[None, :], CLOG)
    rl = rh * L
    W = tl.zeros([C, C], dtype=tl.float32)
    for lv in tl.static_range(0, CLOG + 1):
        col = tl.load(lam + rl + lv, mask=m_t & (o_c * 0 + lv < L), other=0.).to(tl.float32)
        W = tl.where(lev == lv, col[:, None], W)
    Aw = tl.where(causal, Ph * W, 0.)
    # w = Tinv (beta exp(b) k), Qe = q exp(b) - P w, per K block
    rk = rh * K
    for kb in range(0, K, BK):
        o_k = kb + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        kt = tl.load(k + rq[:, None] + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
        qt = tl.load(q + rq[:, None] + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
        wb = tl.dot(Ti, kt * (bt * eb)[:, None], input_precision=PREC)
        qb = qt * eb[:, None] - tl.dot(P, wb, input_precision=PREC)
        tl.store(w + rk[:, None] + o_k[None, :], wb, mask=m_tk)
        tl.store(qe + rk[:, None] + o_k[None, :], qb, mask=m_tk)
        if STORE_LAST:
            if last:  # Rt = Tinv^T kd, kd = k exp(sum of g over (s, chunk end]), all C rows
                ek = tl.where(m_t, tl.exp(tl.cumsum(g_n, axis=0, reverse=True)), 0.)
                rt = tl.dot(tl.trans(Ti), kt * ek[:, None], input_precision=PREC)
                tl.store(rt_last + (i_n * H + i_h) * C * K + o_c[:, None] * K + o_k[None, :],
                         rt, mask=(o_c[:, None] < C) & (o_k < K)[None, :])
    # u = Tinv (beta v), o32 = (Phat * Wl) v, per V block
    rv = rh * V
    for vb in range(0, V, BV):
        o_v = vb + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        vt = tl.load(v + rv[:, None] + o_v[None, :], mask=m_tv, other=0.).to(tl.float32)
        tl.store(u + rv[:, None] + o_v[None, :],
                 tl.dot(Ti, vt * bt[:, None], input_precision=PREC), mask=m_tv)
        tl.store(o32 + rv[:, None] + o_v[None, :],
                 tl.dot(Aw.to(DT), vt.to(DT), input_precision=PREC), mask=m_tv)


@triton.jit(do_not_specialize=["T", "L", "NI"])
def lld_walk_kernel(q, k, v, g, beta, lam, h0, offsets, w, qe, u, o32, rt_last, o, ht, scr,
                    cu_seqlens, T, L, NI, scale,
                    H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                    C: tl.constexpr, CLOG: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                    LB: tl.constexpr, HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr,
                    IS_VARLEN: tl.constexpr, DT: tl.constexpr, DT_S: tl.constexpr,
                    PREC: tl.constexpr):
    """The chunk walk of one (sequence, head, V tile): every live chunk level read through Qe
    and passed through the chunk's transition, o = scale (o32 + inter) in v's dtype, the
    Fenwick merge, the initial state's slots and the final state (every slot)."""
    i_nh, i_v = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    i_g = i_h // (H // G)
    bos, T_n = seq_bounds(i_n, cu_seqlens, T, IS_VARLEN)
    if HAS_H0:
        t0 = tl.load(offsets + i_n).to(tl.int64)
    else:
        t0 = (i_n * 0).to(tl.int64)
    p = (t0 % C).to(tl.int32)
    a0 = t0 // C
    n_c = tl.where(T_n > 0, tl.cdiv(p + T_n, C), 0)
    o_c = tl.arange(0, C)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    o_m = tl.arange(0, LB)
    head = i_nh.to(tl.int64)
    scr_h = scr + head * NI * K * V
    h0_o = head * L * K * V  # (h0 is None without HAS_H0: read only under HAS_H0)
    if HAS_H0:  # the inherited chunk levels: slot c + 1 + m where bit m of a0 is set
        for m in range(NI):
            if ((a0 >> m) & 1) == 1:
                for kb in range(0, K, BK):
                    o_k = kb + tl.arange(0, BK)
                    kv = o_k[:, None] * V + o_v[None, :]
                    m_kv = (o_k < K)[:, None] & m_v[None, :]
                    x = tl.load(h0 + h0_o + (CLOG + 1 + m) * K * V + kv, mask=m_kv,
                                other=0.).to(tl.float32)
                    tl.store(scr_h + m * K * V + kv, x, mask=m_kv)
        tl.debug_barrier()
    for j in range(0, n_c):
        a = a0 + j
        tok, m_t, m_n = _chunk_rows(j, p, bos, T_n, o_c, C)
        rh = tok * H + i_h
        g_t = tl.load(g + rh, mask=m_t, other=0.).to(tl.float32)
        g_n = tl.load(g + (tok + 1) * H + i_h, mask=m_n, other=0.).to(tl.float32)
        ek = tl.where(m_t, tl.exp(tl.cumsum(g_n, axis=0, reverse=True)), 0.)
        etot = tl.exp(tl.sum(g_t, axis=0))
        rq = (tok * G + i_g) * K
        rk = rh * K
        rl = rh * L
        m_tv = m_t[:, None] & m_v[None, :]
        rv = (rh * V)[:, None] + o_v[None, :]
        acc = tl.load(o32 + rv, mask=m_tv, other=0.)
        for m in range(NI):  # every live level: read through Qe, then passed by Tr
            if ((a >> m) & 1) == 1:
                part = tl.zeros([C, BV], dtype=tl.float32)
                X = tl.zeros([C, BV], dtype=tl.float32)
                for kb in range(0, K, BK):
                    o_k = kb + tl.arange(0, BK)
                    kv = o_k[:, None] * V + o_v[None, :]
                    m_k = o_k < K
                    m_tk = m_t[:, None] & m_k[None, :]
                    Sb = tl.load(scr_h + m * K * V + kv,
                                 mask=m_k[:, None] & m_v[None, :], other=0.).to(DT_S)
                    qb = tl.load(qe + rk[:, None] + o_k[None, :], mask=m_tk, other=0.)
                    wb = tl.load(w + rk[:, None] + o_k[None, :], mask=m_tk, other=0.)
                    part += tl.dot(qb.to(DT_S), Sb, input_precision=PREC)
                    X += tl.dot(wb.to(DT_S), Sb, input_precision=PREC)
                wl = tl.load(lam + rl + CLOG + 1 + m, mask=m_t, other=0.).to(tl.float32)
                acc += wl[:, None] * part
                tl.debug_barrier()  # the rows read above are written below by other threads
                for kb in range(0, K, BK):
                    o_k = kb + tl.arange(0, BK)
                    kv = o_k[:, None] * V + o_v[None, :]
                    m_k = o_k < K
                    m_kv = m_k[:, None] & m_v[None, :]
                    kd = tl.load(k + rq[:, None] + o_k[None, :], mask=m_t[:, None] & m_k[None, :],
                                 other=0.).to(tl.float32) * ek[:, None]
                    ptr = scr_h + m * K * V + kv
                    Sb = tl.load(ptr, mask=m_kv, other=0.)
                    Sb = etot * Sb - tl.dot(tl.trans(kd).to(DT_S), X.to(DT_S),
                                            input_precision=PREC)
                    tl.store(ptr, Sb, mask=m_kv)
                tl.debug_barrier()
        if HAS_H0:
            if j == 0:  # the initial state's low slots: virtual keys at slots r_l < p
                for l in range(1, CLOG + 1):
                    if (l < L) & (((p >> (l - 1)) & 1) == 1):
                        r_l = ((p >> (l - 1)) << (l - 1)) - 1
                        lev = _bitlen(o_c ^ r_l, CLOG)
                        wl = tl.load(lam + rl + lev, mask=m_t & (lev < L), other=0.)
                        part = tl.zeros([C, BV], dtype=tl.float32)
                        for kb in range(0, K, BK):
                            o_k = kb + tl.arange(0, BK)
                            kv = o_k[:, None] * V + o_v[None, :]
                            m_k = o_k < K
                            qb = tl.load(qe + rk[:, None] + o_k[None, :],
                                         mask=m_t[:, None] & m_k[None, :], other=0.)
                            hb = tl.load(h0 + h0_o + l * K * V + kv,
                                         mask=m_k[:, None] & m_v[None, :], other=0.)
                            part += tl.dot(qb.to(DT_S), hb.to(tl.float32).to(DT_S),
                                           input_precision=PREC)
                        acc += wl.to(tl.float32)[:, None] * part
        tl.store(o + rv, (acc * scale).to(o.dtype.element_ty), mask=m_tv)
        if (j + 1) * C - p <= T_n:  # a complete chunk: the Fenwick merge
            # below[m]: m < trailing ones of a (bits 0..m of a all set)
            below = ((a + 1) & ((tl.full([LB], 2, tl.int64) << o_m) - 1)) == 0
            mu = tl.sum((below & (o_m < NI)).to(tl.int32), axis=0)
            if mu < NI:
                uc = tl.load(u + rv, mask=m_tv, other=0.)
                if HAS_H0:
                    if j == 0:  # the virtual keys pass the chunk by Tr: u - w Y, exp(b_last) Y
                        for kb in range(0, K, BK):
                            o_k = kb + tl.arange(0, BK)
                            kv = o_k[:, None] * V + o_v[None, :]
                            m_k = o_k < K
                            m_kv = m_k[:, None] & m_v[None, :]
                            Y = tl.zeros([BK, BV], dtype=tl.float32)
                            for l in range(1, CLOG + 1):
                                if (l < L) & (((p >> (l - 1)) & 1) == 1):
                                    Y += tl.load(h0 + h0_o + l * K * V + kv, mask=m_kv,
                                                 other=0.).to(tl.float32)
                            wb = tl.load(w + rk[:, None] + o_k[None, :],
                                         mask=m_t[:, None] & m_k[None, :], other=0.)
                            uc -= tl.dot(wb.to(DT_S), Y.to(DT_S), input_precision=PREC)
                for kb in range(0, K, BK):
                    o_k = kb + tl.arange(0, BK)
                    kv = o_k[:, None] * V + o_v[None, :]
                    m_k = o_k < K
                    m_kv = m_k[:, None] & m_v[None, :]
                    kd = tl.load(k + rq[:, None] + o_k[None, :], mask=m_t[:, None] & m_k[None, :],
                                 other=0.).to(tl.float32) * ek[:, None]
                    new = tl.dot(tl.trans(kd).to(DT_S), uc.to(DT_S), input_precision=PREC)
                    if HAS_H0:
                        if j == 0:
                            for l in range(1, CLOG + 1):
                                if (l < L) & (((p >> (l - 1)) & 1) == 1):
                                    hb = tl.load(h0 + h0_o + l * K * V + kv, mask=m_kv,
                                                 other=0.)
                                    new += etot * hb.to(tl.float32)
                    for m in range(0, mu):
                        new += tl.load(scr_h + m * K * V + kv, mask=m_kv,
                                       other=0.)
                    tl.store(scr_h + mu * K * V + kv, new, mask=m_kv)
            tl.debug_barrier()  # the level just stored is read by later chunks' other threads
    if STORE_FINAL:
        # the state for query position t_end: levels live at chunk a_fin, and the tokens (and,
        # in the first chunk, the virtual keys passed by Tr) of a trailing partial chunk as the
        # low slots
        t_end = t0 + T_n
        r = (t_end % C).to(tl.int32)
        a_fin = t_end // C
        jf = (a_fin - a0).to(tl.int32)
        tok, m_t, m_n = _chunk_rows(jf, p, bos, T_n, o_c, C)
        rh = tok * H + i_h
        g_t = tl.load(g + rh, mask=m_t, other=0.).to(tl.float32)
        g_n = tl.load(g + (tok + 1) * H + i_h, mask=m_n, other=0.).to(tl.float32)
        ek = tl.where(m_t, tl.exp(tl.cumsum(g_n, axis=0, reverse=True)), 0.)
        etot = tl.exp(tl.sum(g_t, axis=0))
        rq = (tok * G + i_g) * K
        rk = rh * K
        lev_r = _bitlen(o_c ^ r, CLOG)
        m_tv = m_t[:, None] & m_v[None, :]
        bt = tl.load(beta + rh, mask=m_t, other=0.).to(tl.float32)
        has_rows = ((o_c * 0 + T_n) > 0) & ((o_c * 0 + r) != 0)
        ht_h = ht + head * L * K * V
        for kb in range(0, K, BK):  # slot 0 is always zero
            o_k = kb + tl.arange(0, BK)
            kv = o_k[:, None] * V + o_v[None, :]
            m_kv = (o_k < K)[:, None] & m_v[None, :]
            tl.store(ht_h + kv, tl.zeros([BK, BV], dtype=tl.float32),
                     mask=m_kv)
        for l in range(1, CLOG + 1):
            if l < L:
                # the partial chunk's writes at level l: kd^T Tinv diag(sel_l beta) v
                # = (Rt diag(sel_l beta))^T v, Rt = Tinv^T kd from lld_chunk_kernel
                sel = tl.where(m_t & (lev_r == l), bt, 0.)
                vs = tl.load(v + (rh * V)[:, None] + o_v[None, :], mask=m_tv,
                             other=0.).to(tl.float32) * sel[:, None]
                X = tl.zeros([C, BV], dtype=tl.float32)
                if HAS_H0:
                    if jf == 0:  # the virtual keys that reach level l at t_end, by Tr: X = w Y
                        for kb in range(0, K, BK):
                            o_k = kb + tl.arange(0, BK)
                            kv = o_k[:, None] * V + o_v[None, :]
                            m_k = o_k < K
                            m_kv = m_k[:, None] & m_v[None, :]
                            Y = tl.zeros([BK, BV], dtype=tl.float32)
                            for l2 in range(1, CLOG + 1):
                                if (l2 < L) & (((p >> (l2 - 1)) & 1) == 1):
                                    r2 = ((p >> (l2 - 1)) << (l2 - 1)) - 1
                                    if _bitlen(r2 ^ r, CLOG) == l:
                                        Y += tl.load(h0 + h0_o + l2 * K * V + kv,
                                                     mask=m_kv, other=0.).to(tl.float32)
                            wb = tl.load(w + rk[:, None] + o_k[None, :],
                                         mask=m_t[:, None] & m_k[None, :], other=0.)
                            X += tl.dot(wb.to(DT_S), Y.to(DT_S), input_precision=PREC)
                for kb in range(0, K, BK):
                    o_k = kb + tl.arange(0, BK)
                    kv = o_k[:, None] * V + o_v[None, :]
                    m_k = o_k < K
                    m_kv = m_k[:, None] & m_v[None, :]
                    rt = tl.load(rt_last + head * C * K + o_c[:, None] * K + o_k[None, :],
                                 mask=has_rows[:, None] & m_k[None, :], other=0.)
                    x = tl.dot(tl.trans(rt).to(DT_S), vs.to(DT_S), input_precision=PREC)
                    if HAS_H0:
                        if jf == 0:
                            kd = tl.load(k + rq[:, None] + o_k[None, :],
                                         mask=m_t[:, None] & m_k[None, :],
                                         other=0.).to(tl.float32) * ek[:, None]
                            x -= tl.dot(tl.trans(kd).to(DT_S), X.to(DT_S), input_precision=PREC)
                            for l2 in range(1, CLOG + 1):
                                if (l2 < L) & (((p >> (l2 - 1)) & 1) == 1):
                                    r2 = ((p >> (l2 - 1)) << (l2 - 1)) - 1
                                    if _bitlen(r2 ^ r, CLOG) == l:
                                        hb = tl.load(h0 + h0_o + l2 * K * V + kv,
                                                     mask=m_kv, other=0.)
                                        x += etot * hb.to(tl.float32)
                    tl.store(ht_h + l * K * V + kv, x, mask=m_kv)
        for m in range(NI):  # the chunk levels live at a_fin (transitions all applied)
            for kb in range(0, K, BK):
                o_k = kb + tl.arange(0, BK)
                kv = o_k[:, None] * V + o_v[None, :]
                m_kv = (o_k < K)[:, None] & m_v[None, :]
                x = tl.zeros([BK, BV], dtype=tl.float32)
                if ((a_fin >> m) & 1) == 1:
                    x = tl.load(scr_h + m * K * V + kv, mask=m_kv, other=0.)
                tl.store(ht_h + (CLOG + 1 + m) * K * V + kv, x, mask=m_kv)


# ---------------------------------------------------------------------------------------------
# Launcher (backend contract: loglinear/delta.py's forward and _lld_fwd)
# ---------------------------------------------------------------------------------------------
# Tiles (benchmarks/results/sm90_resources.csv, K <= 256, V <= 512): K and V in blocks of 32.
# With blocks of 64 the fp32 walk (3xTF32 products) spilled 4-5 KB per thread at sm_90 and the
# chunk kernel 1.2 KB; with 32, bf16 / fp16 spill nothing and fp32 ~2 KB at most (the walk
# with the initial and final states). Smaller V blocks also give the walk, which is sequential
# over chunks, more programs.
BLOCK_K, BLOCK_V = 32, 32


def _chunk_warps(C: int) -> int:
    """The chunk kernel holds several [C, C] fp32 tiles (Tinv, P, the weighted scores, the
    decays): 8 warps at C = 64 keep them at 16 registers each per thread."""
    return 8 if C >= 64 else 4


def forward(q: Tensor, k: Tensor, v: Tensor, g: Tensor, level_scales: Tensor, beta: Tensor,
            scale: float, h0: Optional[Tensor], offsets: Optional[Tensor],
            output_final_state: bool, cu_seqlens: Optional[Tensor], use_qk_l2norm: bool,
            chunk_size: int = 64):
    """loglinear/delta.forward's contract: q/k [B, T, G, K], v [B, T, H, V], g/beta [B, T, H],
    level_scales [B, T, H, L]; h0 [N, H, L, K, V] with offsets [N] (or None). Returns o
    [B, T, H, V] (v's dtype) and (ht fp32 (float64 for float64 inputs), next offsets) or None.
    No host sync (the NonFiniteGuard's own check aside). Not differentiable (the op's backward
    recomputes the torch forward)."""
    guard = NonFiniteGuard.build(k, v, (g,), (beta,), cu_seqlens=cu_seqlens)
    if guard is not None:
        k, v, (g,), (beta,) = guard.clean(k, v, (g,), (beta,))
    in_dtype, f64 = v.dtype, q.dtype == torch.float64
    if f64:
        q, k, v, g, level_scales, beta = (x.float() for x in (q, k, v, g, level_scales, beta))
    # fp32 operands for every product, at the dtype's precision (3xTF32 for fp32 inputs, TF32
    # for 16-bit ones): the walk's operands (Qe, w, kd, the states) and the chunk kernel's
    # weighted scores are computed fp32 quantities, not inputs, and a 16-bit rounding of each
    # would add error beyond the inputs' own; bf16 q, k, v are exact in TF32
    _, _, PREC = dot_config(q.dtype)
    DT = DT_S = tl.float32
    if use_qk_l2norm:  # in fp32, as the torch forward
        q, k = l2norm(q.float())[0], l2norm(k.float())[0]
    q, k, v, g, beta, lam = (x.contiguous() for x in (q, k, v, g, beta, level_scales))
    B, T, G, K = q.shape
    H, V, L = v.shape[2], v.shape[3], lam.shape[3]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    C = chunk_size_for(chunk_size)
    c = C.bit_length() - 1
    NI = max(L - c - 1, 0)
    LB = next_pow2(NI + 1, 1)
    BK, BV = min(BLOCK_K, next_pow2(K)), min(BLOCK_V, next_pow2(V))
    NV = triton.cdiv(V, BV)
    off = None if h0 is None else offsets.to(device=q.device, dtype=torch.int64).contiguous()
    h0c = None if h0 is None else h0.contiguous()
    varlen = cu_seqlens is not None
    dev = q.device
    f32 = torch.float32
    w = torch.empty(B, T, H, K, dtype=f32, device=dev)
    qe = torch.empty(B, T, H, K, dtype=f32, device=dev)
    u = torch.empty(B, T, H, V, dtype=f32, device=dev)
    o32 = torch.empty(B, T, H, V, dtype=f32, device=dev)
    o = torch.empty(B, T, H, V, dtype=v.dtype, device=dev)
    rt_last = torch.empty(max(N * H * C * K, 1) if output_final_state else 1, dtype=f32,
                          device=dev)
    check_grid_yz(B * H, "batch x heads")
    if varlen:
        table, n_grid = _chunk_table(cu_seqlens, None if off is None else off % C, T, C)
    else:
        table, n_grid = None, triton.cdiv(T + (C - 1 if off is not None else 0), C)
    lld_chunk_kernel[(n_grid, B * H)](
        q, k, v, g, beta, lam, off, w, qe, u, o32, rt_last, cu_seqlens, table, T, L,
        H=H, G=G, K=K, V=V, C=C, CLOG=c, BK=BK, BV=BV, HAS_OFF=off is not None,
        IS_VARLEN=varlen, STORE_LAST=output_final_state, DT=DT, PREC=PREC,
        PREC_X=exact_precision(), num_warps=_chunk_warps(C))
    ht = (torch.empty(N, H, L, K, V, dtype=f32, device=dev) if output_final_state else None)
    scr = torch.empty(max(N * H * NI * K * V, 1), dtype=f32, device=dev)
    lld_walk_kernel[(N * H, NV)](
        q, k, v, g, beta, lam, h0c, off, w, qe, u, o32, rt_last, o, ht, scr, cu_seqlens, T, L,
        NI, float(scale), H=H, G=G, K=K, V=V, C=C, CLOG=c, BK=BK, BV=BV, LB=LB,
        HAS_H0=h0 is not None, STORE_FINAL=output_final_state, IS_VARLEN=varlen, DT=DT,
        DT_S=DT_S, PREC=PREC, num_warps=4)
    final = None
    if output_final_state:
        if cu_seqlens is None:
            lengths = torch.full((N,), T, dtype=torch.int64, device=dev)
        else:
            lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
        nxt = lengths if off is None else off + lengths
        final = (ht, nxt)
    if guard is not None:
        o, flat = guard.poison(o, None if ht is None else ht.reshape(N, H, L * K, V))
        if final is not None:
            final = (flat.reshape(N, H, L, K, V), final[1])
    if f64 and final is not None:
        final = (final[0].double(), final[1])
    return o.to(in_dtype), final

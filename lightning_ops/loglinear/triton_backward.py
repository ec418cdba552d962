"""Triton backward of chunk_log_linear_attn (the "loglinear" family's triton backend).

The math is loglinear/torch.py's `backward` (its spec): chunks of C = 2^c tokens aligned on
absolute positions, intra-chunk level-weighted scores, chunk-level Fenwick states S_m read at
token level c + 1 + m, the initial state's slots read at level bit_length(rep_l xor t). The
initial state is handled on its own (as in torch.backward), so the walks see only the
sequence's own keys. Four kernels, in this order:

  llb_fwd_walk_kernel  per (sequence x head, V tile), chunks in order: recomputes the chunk-level
                       states (fp32 scratch + register vector of decays, as ll_walk_kernel) and
                       gives, per token, the inter part of dq (reads of S_m and of the initial
                       state's slots) and of dlambda (all levels > c, and the initial state's
                       levels); per chunk, gamma_m = <S_m read, its gradient> and the
                       initial-state reads' gate share; the final levels' <S_m, dht> and dh0
                       (reads + dht passed through). Partial over V tiles: [slots, ...] fp32,
                       summed by torch (deterministic, no atomics); one slot per V tile while
                       the slots stay within PARTIAL_MAX_BYTES, else launches of `slots` tiles
                       in turn, each adding to the slots (still in a fixed order).
  llb_rev_walk_kernel  per (sequence x head, V tile), chunks in reverse: one accumulator per
                       chunk level D_m (the gradient of level m's block-run pair: reads of the run
                       decayed back, then handed to the block's chunks), giving dlocal -> the inter
                       part of dk (partial over V tiles) and dv (owned), eta_m = <local, D_m> per
                       chunk, and the final state's low slots (a trailing partial chunk's tokens).
  llb_dtot_kernel      per (sequence x head), scalars only: each chunk's total-gate gradient, the
                       sum over the pairs straddling it: eta prefix sums inside each level's block,
                       gamma suffix sums inside each level's run (the final levels as one more
                       read), later chunks' initial-state read shares, the initial state's
                       pass-through.
  llb_intra_kernel     per (chunk, batch x head): dA = do v^T, A = (q.k) W D; dq, dk from dA W D,
                       dv = A^T do, dlambda's intra levels (per-level row sums of dA (q.k) D), the
                       gate's pair share (per gate, the sum of dA A over the pairs straddling it,
                       as a product with a strict triangle: no difference of cumulative sums);
                       adds the walks' parts and forms dg = pairs + in-chunk suffix of q.dq_inter
                       + in-chunk exclusive prefix of k.dk_inter + the chunk's total gradient.

Every exponent is a sum of gates over exactly its own tokens (<= 0); a -inf gate is an exact
reset (no -inf - -inf). The gate gradient is summed only over the terms whose decay holds each
gate (scalar products of bounded states and state gradients, never a difference of large sums).

Memory besides the outputs (fp32): partial dq and dk, slots x [B, T, H, K] each; partial
dlambda slots x [B, T, H, L] (slots <= the V tiles, bounded by PARTIAL_MAX_BYTES); dv_inter
[B, T, H, V]; the level scratch N H n_inter K V; per-chunk scalars O(slots H T / C L).
16-bit inputs: tl.dot on 16-bit operands (dot_config); fp32 inputs 3xTF32; the interpreter
computes fp32. float64 inputs are computed in fp32.
No host sync; sequence length is never a constexpr.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..triton_utils import (PARTIAL_MAX_BYTES, check_grid_yz, dot_config, exact_precision,
                            next_pow2, seq_bounds)
from .triton import _bitlen, _chunk_rows, _chunk_table, _level_of, chunk_size_for

Tensor = torch.Tensor


@triton.jit
def _bitlen_upto(x, L):
    """min(bit_length(x), L) of int64 x >= 0 (runtime L)."""
    n = (x * 0).to(tl.int32)
    for b in range(0, L):
        n += ((x >> b) > 0).to(tl.int32)
    return n


@triton.jit
def _col(X, o_l, l):
    """Column l of a [C, LP] register tile."""
    return tl.sum(tl.where(o_l[None, :] == l, X, 0.), axis=1)


@triton.jit
def _seq_start(i_n, offsets, HAS_OFF: tl.constexpr):
    if HAS_OFF:
        t0 = tl.load(offsets + i_n).to(tl.int64)
    else:
        t0 = (i_n * 0).to(tl.int64)
    return t0


@triton.jit(do_not_specialize=["T", "L", "NI", "NCH", "SQ", "SL", "V0"])
def llb_fwd_walk_kernel(q, k, v, g, lam, h0, dht, offsets, do, cstart, cu_seqlens, scr,
                        dq_p, dl_p, gam_p, hs_p, gfin_p, hc_p, dh0, T, L, NI, NCH, SQ, SL, V0, scale,
                        H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                        C: tl.constexpr, CLOG: tl.constexpr, BK: tl.constexpr,
                        BV: tl.constexpr, LB: tl.constexpr, LP: tl.constexpr,
                        HAS_H0: tl.constexpr, HAS_DHT: tl.constexpr, HAS_OFF: tl.constexpr,
                        IS_VARLEN: tl.constexpr, ACC: tl.constexpr, DT: tl.constexpr,
                        DT_S: tl.constexpr, PREC: tl.constexpr):
    """Partial sums go to slot program_id(1) of the partial buffers (added to what an earlier
    launch of V tiles left there when ACC); the V tile is V0 + program_id(1)."""
    part = tl.program_id(1).to(tl.int64)
    i_nh, i_v = tl.program_id(0), tl.program_id(1) + V0
    i_n, i_h = i_nh // H, i_nh % H
    i_g = i_h // (H // G)
    bos, T_n = seq_bounds(i_n, cu_seqlens, T, IS_VARLEN)
    t0 = _seq_start(i_n, offsets, HAS_OFF)
    p = (t0 % C).to(tl.int32)
    a0 = t0 // C
    n_c = tl.where(T_n > 0, tl.cdiv(p + T_n, C), 0)
    cb = tl.load(cstart + i_n).to(tl.int64)
    o_c = tl.arange(0, C)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    o_m = tl.arange(0, LB)
    o_l = tl.arange(0, LP)
    head = i_nh.to(tl.int64)
    scr_h = scr + head * NI * K * V
    h0_h = head * L * K * V
    if HAS_H0:  # dh0 starts at zero (every slot, absent ones included)
        for l in range(0, L):
            for kb in range(0, K, BK):
                o_k = kb + tl.arange(0, BK)
                m_kv = (o_k < K)[:, None] & m_v[None, :]
                tl.store(dh0 + h0_h + (l * K + o_k[:, None]) * V + o_v[None, :],
                         tl.zeros([BK, BV], dtype=tl.float32), mask=m_kv)
    dec = tl.zeros([LB], dtype=tl.float32)
    fil = tl.zeros([LB], dtype=tl.int32)  # levels stored at least once (no initial levels here)
    P = tl.sum(dec, axis=0)  # the sequence's gates before the chunk
    for j in range(0, n_c):
        a = a0 + j
        tok, m_t, m_n = _chunk_rows(j, p, bos, T_n, o_c, C)
        g_t = tl.load(g + tok * H + i_h, mask=m_t, other=0.).to(tl.float32)
        g_n = tl.load(g + (tok + 1) * H + i_h, mask=m_n, other=0.).to(tl.float32)
        b = tl.cumsum(g_t, axis=0)
        sfx = tl.cumsum(g_n, axis=0, reverse=True)
        tot = tl.sum(g_t, axis=0)
        rq = (tok * G + i_g) * K
        rl = (tok * H + i_h) * L
        m_tv = m_t[:, None] & m_v[None, :]
        rv = ((tok * H + i_h) * V)[:, None] + o_v[None, :]
        dot_ = tl.load(do + rv, mask=m_tv, other=0.).to(tl.float32) * scale
        dl_acc = tl.zeros([C, LP], dtype=tl.float32)
        gam = tl.zeros([LB], dtype=tl.float32)
        s_h = tl.zeros([C], dtype=tl.float32)
        if HAS_H0:  # the initial state's slots: level and weight per token
            pos = t0 + (j * C + o_c - p).to(tl.int64)
            E = tl.where(m_t, tl.exp(P + b), 0.)
            LEVT = tl.zeros([C, LP], dtype=tl.int32)
            W0T = tl.zeros([C, LP], dtype=tl.float32)
            for l in range(1, L):
                if ((t0 >> (l - 1)) & 1) == 1:
                    rep = ((t0 >> (l - 1)) << (l - 1)) - 1
                    lev0 = _bitlen_upto(rep ^ pos, L)
                    w0 = tl.load(lam + rl + lev0, mask=m_t & (lev0 < L), other=0.)
                    LEVT = tl.where(o_l[None, :] == l, lev0[:, None], LEVT)
                    W0T = tl.where(o_l[None, :] == l, (w0.to(tl.float32) * E)[:, None], W0T)
            Racc = tl.zeros([C, LP], dtype=tl.float32)
        for kb in range(0, K, BK):
            o_k = kb + tl.arange(0, BK)
            m_k = o_k < K
            m_kv = m_k[:, None] & m_v[None, :]
            qb = tl.load(q + rq[:, None] + o_k[None, :], mask=m_t[:, None] & m_k[None, :],
                         other=0.).to(tl.float32)
            dqb = tl.zeros([C, BK], dtype=tl.float32)
            for m in range(NI):  # reads of the live chunk levels
                if (((a >> m) & 1) == 1) & (_level_of(fil.to(tl.float32), o_m, m) > 0):
                    dm = _level_of(dec, o_m, m)
                    e = tl.where(m_t, tl.exp(b + dm), 0.)
                    w = tl.load(lam + rl + CLOG + 1 + m, mask=m_t, other=0.).to(tl.float32)
                    Sb = tl.load(scr_h + (m * K + o_k[:, None]) * V + o_v[None, :], mask=m_kv,
                                 other=0.)
                    X = tl.dot(dot_.to(DT_S), tl.trans(Sb).to(DT_S), input_precision=PREC)
                    dqb += (w * e)[:, None] * X
                    r = e * tl.sum(qb * X, axis=1)
                    dl_acc += tl.where(o_l[None, :] == CLOG + 1 + m, r[:, None], 0.)
                    gam += tl.where(o_m == m, tl.sum(w * r, axis=0), 0.)
            if HAS_H0:
                for l in range(1, L):
                    if ((t0 >> (l - 1)) & 1) == 1:
                        w0 = _col(W0T, o_l, l)
                        hp = h0 + h0_h + (l * K + o_k[:, None]) * V + o_v[None, :]
                        hb = tl.load(hp, mask=m_kv, other=0.).to(tl.float32)
                        X = tl.dot(dot_.to(DT_S), tl.trans(hb).to(DT_S), input_precision=PREC)
                        dqb += w0[:, None] * X
                        Racc += tl.where(o_l[None, :] == l, tl.sum(qb * X, axis=1)[:, None], 0.)
                        dp = dh0 + h0_h + (l * K + o_k[:, None]) * V + o_v[None, :]
                        acc = tl.load(dp, mask=m_kv, other=0.)
                        acc += tl.dot(tl.trans(qb * w0[:, None]).to(DT_S), dot_.to(DT_S),
                                      input_precision=PREC)
                        tl.store(dp, acc, mask=m_kv)
            pq = dq_p + part * SQ + ((tok * H + i_h) * K)[:, None] + o_k[None, :]
            if ACC:
                dqb += tl.load(pq, mask=m_t[:, None] & m_k[None, :], other=0.)
            tl.store(pq, dqb, mask=m_t[:, None] & m_k[None, :])
        if HAS_H0:
            for l in range(1, L):
                if ((t0 >> (l - 1)) & 1) == 1:
                    R = _col(Racc, o_l, l)
                    lev0 = tl.sum(tl.where(o_l[None, :] == l, LEVT, 0), axis=1)
                    dl_acc += tl.where((o_l[None, :] == lev0[:, None]) & (lev0[:, None] < L),
                                       (E * R)[:, None], 0.)
                    s_h += _col(W0T, o_l, l) * R
        pl = dl_p + part * SL + ((tok * H + i_h) * L)[:, None] + o_l[None, :]
        ph = hs_p + (part * H + i_h) * NCH + cb + j
        pg = gam_p + ((part * H + i_h) * NCH + cb + j) * LB + o_m
        hsum = tl.sum(s_h, axis=0)
        if ACC:
            dl_acc += tl.load(pl, mask=m_t[:, None] & (o_l < L)[None, :], other=0.)
            gam += tl.load(pg, mask=o_m < NI, other=0.)
            hsum += tl.load(ph)
        tl.store(pl, dl_acc, mask=m_t[:, None] & (o_l < L)[None, :])
        tl.store(pg, gam, mask=o_m < NI)
        tl.store(ph, hsum)
        # the chunk's decay, then the Fenwick merge of a complete chunk (as ll_walk_kernel)
        dec += tot
        P += tot
        if (j + 1) * C - p <= T_n:
            below = ((a + 1) & ((tl.full([LB], 2, tl.int64) << o_m) - 1)) == 0
            mu = tl.sum((below & (o_m < NI)).to(tl.int32), axis=0)
            if mu < NI:
                wk = tl.where(m_t, tl.exp(sfx), 0.)
                vt = tl.load(v + rv, mask=m_tv, other=0.)
                for kb in range(0, K, BK):
                    o_k = kb + tl.arange(0, BK)
                    m_k = o_k < K
                    m_kv = m_k[:, None] & m_v[None, :]
                    kt = tl.load(k + rq[:, None] + o_k[None, :], mask=m_t[:, None] & m_k[None, :],
                                 other=0.).to(tl.float32)
                    new = tl.dot(tl.trans(kt * wk[:, None]).to(DT), vt.to(DT),
                                 input_precision=PREC)
                    for m in range(0, mu):
                        if _level_of(fil.to(tl.float32), o_m, m) > 0:
                            Sb = tl.load(scr_h + (m * K + o_k[:, None]) * V + o_v[None, :],
                                         mask=m_kv, other=0.)
                            new += tl.exp(_level_of(dec, o_m, m)) * Sb
                    tl.store(scr_h + (mu * K + o_k[:, None]) * V + o_v[None, :], new, mask=m_kv)
                dec = tl.where(o_m == mu, 0., dec)
                fil = tl.where(o_m < mu, 0, tl.where(o_m == mu, 1, fil))
            tl.debug_barrier()
    if HAS_DHT:
        t_end = t0 + T_n
        a_fin = t_end // C
        gf = tl.zeros([LB], dtype=tl.float32)
        for m in range(NI):  # the final levels read what is live at a_fin
            if (((a_fin >> m) & 1) == 1) & (_level_of(fil.to(tl.float32), o_m, m) > 0):
                x = tl.zeros([BK, BV], dtype=tl.float32)
                for kb in range(0, K, BK):
                    o_k = kb + tl.arange(0, BK)
                    m_kv = (o_k < K)[:, None] & m_v[None, :]
                    kv = o_k[:, None] * V + o_v[None, :]
                    Sb = tl.load(scr_h + m * K * V + kv, mask=m_kv, other=0.)
                    Db = tl.load(dht + h0_h + (CLOG + 1 + m) * K * V + kv, mask=m_kv,
                                 other=0.).to(tl.float32)
                    x += Sb * Db
                gf += tl.where(o_m == m, tl.exp(_level_of(dec, o_m, m)) * tl.sum(tl.sum(x, 1), 0),
                               0.)
        pf = gfin_p + (part * tl.num_programs(0) + i_nh) * LB + o_m
        if ACC:
            gf += tl.load(pf, mask=o_m < NI, other=0.)
        tl.store(pf, gf, mask=o_m < NI)
        if HAS_H0:  # slot l of h0 ends at slot bit_length(rep_l xor t_end), decayed by all gates
            hc = tl.zeros([BK, BV], dtype=tl.float32)
            tot_all = tl.exp(P)
            for l in range(1, L):
                if ((t0 >> (l - 1)) & 1) == 1:
                    rep = ((t0 >> (l - 1)) << (l - 1)) - 1
                    le = _bitlen_upto(rep ^ t_end, L)
                    if le < L:
                        for kb in range(0, K, BK):
                            o_k = kb + tl.arange(0, BK)
                            m_kv = (o_k < K)[:, None] & m_v[None, :]
                            kv = o_k[:, None] * V + o_v[None, :]
                            Db = tl.load(dht + h0_h + le * K * V + kv, mask=m_kv,
                                         other=0.).to(tl.float32)
                            hb = tl.load(h0 + h0_h + l * K * V + kv, mask=m_kv,
                                         other=0.).to(tl.float32)
                            acc = tl.load(dh0 + h0_h + l * K * V + kv, mask=m_kv, other=0.)
                            tl.store(dh0 + h0_h + l * K * V + kv, acc + tot_all * Db, mask=m_kv)
                            hc += hb * Db
            hcs = tot_all * tl.sum(tl.sum(hc, 1), 0)
            if ACC:
                hcs += tl.load(hc_p + part * tl.num_programs(0) + i_nh)
            tl.store(hc_p + part * tl.num_programs(0) + i_nh, hcs)


@triton.jit(do_not_specialize=["T", "L", "NI", "NCH", "SQ", "V0"])
def llb_rev_walk_kernel(q, k, v, g, lam, dht, offsets, do, cstart, cu_seqlens, scr, dk_p, dv_o,
                        eta_p, T, L, NI, NCH, SQ, V0, scale,
                        H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                        C: tl.constexpr, CLOG: tl.constexpr, BK: tl.constexpr,
                        BV: tl.constexpr, LB: tl.constexpr, HAS_DHT: tl.constexpr,
                        HAS_OFF: tl.constexpr, IS_VARLEN: tl.constexpr, ACC: tl.constexpr,
                        DT: tl.constexpr, DT_S: tl.constexpr, PREC: tl.constexpr):
    """D_m (scr, fp32, the program's V columns) is the gradient of level m's block-run pair at
    the end of the chunk being walked: inside a run (bit m of the chunk set) it gathers the
    run's reads G = (q exp(prefix))^T (lambda[c+1+m] do) decayed back; inside the block before
    the run (bit m clear) it is what each complete chunk's own state (k exp(suffix))^T v
    receives; it restarts at zero where the walk leaves a block for an earlier run. Partial
    sums as in llb_fwd_walk_kernel (slot program_id(1), V tile V0 + program_id(1))."""
    part = tl.program_id(1).to(tl.int64)
    i_nh, i_v = tl.program_id(0), tl.program_id(1) + V0
    i_n, i_h = i_nh // H, i_nh % H
    i_g = i_h // (H // G)
    bos, T_n = seq_bounds(i_n, cu_seqlens, T, IS_VARLEN)
    t0 = _seq_start(i_n, offsets, HAS_OFF)
    p = (t0 % C).to(tl.int32)
    a0 = t0 // C
    n_c = tl.where(T_n > 0, tl.cdiv(p + T_n, C), 0)
    cb = tl.load(cstart + i_n).to(tl.int64)
    t_end = t0 + T_n
    r = (t_end % C).to(tl.int32)
    a_fin = t_end // C
    o_c = tl.arange(0, C)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    o_m = tl.arange(0, LB)
    head = i_nh.to(tl.int64)
    scr_h = scr + head * NI * K * V
    dht_h = head * L * K * V
    # the final levels read the live levels at a_fin: D_m starts as their dht
    for m in range(NI):
        for kb in range(0, K, BK):
            o_k = kb + tl.arange(0, BK)
            m_kv = (o_k < K)[:, None] & m_v[None, :]
            kv = o_k[:, None] * V + o_v[None, :]
            x = tl.zeros([BK, BV], dtype=tl.float32)
            if HAS_DHT:
                if ((a_fin >> m) & 1) == 1:
                    x = tl.load(dht + dht_h + (CLOG + 1 + m) * K * V + kv, mask=m_kv,
                                other=0.).to(tl.float32)
            tl.store(scr_h + m * K * V + kv, x, mask=m_kv)
    tl.debug_barrier()
    lev_r = _bitlen(o_c ^ r, CLOG)
    for jj in range(0, n_c):
        j = n_c - 1 - jj
        a = a0 + j
        tok, m_t, m_n = _chunk_rows(j, p, bos, T_n, o_c, C)
        g_t = tl.load(g + tok * H + i_h, mask=m_t, other=0.).to(tl.float32)
        g_n = tl.load(g + (tok + 1) * H + i_h, mask=m_n, other=0.).to(tl.float32)
        b = tl.cumsum(g_t, axis=0)
        eq = tl.where(m_t, tl.exp(b), 0.)
        ek = tl.where(m_t, tl.exp(tl.cumsum(g_n, axis=0, reverse=True)), 0.)
        dtot = tl.exp(tl.sum(g_t, axis=0))
        rq = (tok * G + i_g) * K
        rl = (tok * H + i_h) * L
        m_tv = m_t[:, None] & m_v[None, :]
        rv = ((tok * H + i_h) * V)[:, None] + o_v[None, :]
        vt = tl.load(v + rv, mask=m_tv, other=0.).to(tl.float32)
        dot_ = tl.load(do + rv, mask=m_tv, other=0.).to(tl.float32) * scale
        dv_acc = tl.zeros([C, BV], dtype=tl.float32)
        eta = tl.zeros([LB], dtype=tl.float32)
        last_partial = (j == n_c - 1) & (r != 0)
        for kb in range(0, K, BK):
            o_k = kb + tl.arange(0, BK)
            m_k = o_k < K
            m_kv = m_k[:, None] & m_v[None, :]
            kv = o_k[:, None] * V + o_v[None, :]
            m_tk = m_t[:, None] & m_k[None, :]
            kd = tl.load(k + rq[:, None] + o_k[None, :], mask=m_tk, other=0.).to(tl.float32) \
                * ek[:, None]
            qd = tl.load(q + rq[:, None] + o_k[None, :], mask=m_tk, other=0.).to(tl.float32) \
                * eq[:, None]
            dkb = tl.zeros([C, BK], dtype=tl.float32)
            for m in range(NI):
                Db = tl.load(scr_h + m * K * V + kv, mask=m_kv, other=0.)
                if ((a >> m) & 1) == 0:  # a block chunk: its own state feeds level m's run
                    Y = tl.dot(vt.to(DT_S), tl.trans(Db).to(DT_S), input_precision=PREC)
                    dkb += Y
                    dv_acc += tl.dot(kd.to(DT_S), Db.to(DT_S), input_precision=PREC)
                    eta += tl.where(o_m == m, tl.sum(tl.sum(kd * Y, 1), 0), 0.)
                    # the chunk before is in the run before this block: a new pair
                    restart = (a & ((tl.full([1], 2, tl.int64) << m) - 1)) == 0
                    Db = tl.where(restart, 0., dtot * Db)
                else:  # a run chunk: it reads level m
                    w = tl.load(lam + rl + CLOG + 1 + m, mask=m_t, other=0.).to(tl.float32)
                    Db = dtot * Db + tl.dot(tl.trans(qd * w[:, None]).to(DT_S), dot_.to(DT_S),
                                            input_precision=PREC)
                tl.store(scr_h + m * K * V + kv, Db, mask=m_kv)
            if HAS_DHT:
                if last_partial:  # the final state's low slots: this chunk's tokens s < r
                    for l in range(1, CLOG + 1):
                        if l < L:
                            sel = tl.where(m_t & (lev_r == l), 1., 0.)
                            Db = tl.load(dht + dht_h + l * K * V + kv, mask=m_kv,
                                         other=0.).to(tl.float32)
                            Y = tl.dot(vt.to(DT_S), tl.trans(Db).to(DT_S), input_precision=PREC)
                            dkb += sel[:, None] * Y
                            dv_acc += tl.dot((kd * sel[:, None]).to(DT_S), Db.to(DT_S),
                                             input_precision=PREC)
            pk = dk_p + part * SQ + ((tok * H + i_h) * K)[:, None] + o_k[None, :]
            dkb = dkb * ek[:, None]
            if ACC:
                dkb += tl.load(pk, mask=m_tk, other=0.)
            tl.store(pk, dkb, mask=m_tk)
        tl.store(dv_o + rv, dv_acc, mask=m_tv)
        pe = eta_p + ((part * H + i_h) * NCH + cb + j) * LB + o_m
        if ACC:
            eta += tl.load(pe, mask=o_m < NI, other=0.)
        tl.store(pe, eta, mask=o_m < NI)
        tl.debug_barrier()


@triton.jit(do_not_specialize=["T", "NI", "NCH"])
def llb_dtot_kernel(gam, eta, hs, gfin, hc, offsets, cstart, cu_seqlens, dtot, T, NI, NCH,
                    H: tl.constexpr, C: tl.constexpr, LB: tl.constexpr, HAS_H0: tl.constexpr,
                    HAS_DHT: tl.constexpr, HAS_OFF: tl.constexpr, IS_VARLEN: tl.constexpr):
    """dtot[chunk] = the gradient of the chunk's gate total: over each level's block pairs,
    the eta of the block's earlier chunks (keys before it) and the gamma of the run's later
    chunks (reads after it; the final levels read after the last chunk); the initial state's
    reads in later chunks; its pass-through into the final state (every gate of the sequence)."""
    i_nh = tl.program_id(0)
    i_n, i_h = i_nh // H, i_nh % H
    bos, T_n = seq_bounds(i_n, cu_seqlens, T, IS_VARLEN)
    t0 = _seq_start(i_n, offsets, HAS_OFF)
    p = (t0 % C).to(tl.int32)
    a0 = t0 // C
    n_c = tl.where(T_n > 0, tl.cdiv(p + T_n, C), 0)
    cb = tl.load(cstart + i_n).to(tl.int64)
    o_m = tl.arange(0, LB)
    m_m = o_m < NI
    base = i_h.to(tl.int64) * NCH + cb
    acc = tl.zeros([LB], dtype=tl.float32)
    for j in range(0, n_c):  # eta: prefix sums inside each level's block (bit m clear)
        a = a0 + j
        clear = (((a >> o_m) & 1) == 0) & m_m
        e = tl.load(eta + (base + j) * LB + o_m, mask=m_m, other=0.)
        tl.store(dtot + base + j, tl.sum(tl.where(clear, acc, 0.), axis=0))
        acc = tl.where(clear, acc + e, 0.)
    tl.debug_barrier()
    a_fin = (t0 + T_n) // C
    acc = tl.zeros([LB], dtype=tl.float32)
    if HAS_DHT:
        acc = tl.load(gfin + i_nh * LB + o_m, mask=m_m & (((a_fin >> o_m) & 1) == 1), other=0.)
    hacc = tl.sum(acc * 0., axis=0)
    hconst = hacc
    if HAS_H0:
        if HAS_DHT:
            hconst = tl.load(hc + i_nh)
    for jj in range(0, n_c):  # gamma: suffix sums inside each level's run (bit m set)
        j = n_c - 1 - jj
        a = a0 + j
        set_ = (((a >> o_m) & 1) == 1) & m_m
        gm = tl.load(gam + (base + j) * LB + o_m, mask=m_m, other=0.)
        x = tl.load(dtot + base + j)
        x += tl.sum(tl.where(set_, acc, 0.), axis=0) + hconst
        if HAS_H0:
            x += hacc
            hacc += tl.load(hs + base + j)
        tl.store(dtot + base + j, x)
        acc = tl.where(set_, acc + gm, 0.)


@triton.jit(do_not_specialize=["T", "L", "NCH"])
def llb_intra_kernel(q, k, v, g, lam, do, offsets, cu_seqlens, chunk_indices, cstart, dq_i,
                     dk_i, dv_i, dl_w, dtot, dq, dk, dv, dg, dl, T, L, NCH, scale,
                     H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                     C: tl.constexpr, CLOG: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                     LP: tl.constexpr, HAS_OFF: tl.constexpr, IS_VARLEN: tl.constexpr,
                     DT: tl.constexpr, PREC: tl.constexpr, PREC32: tl.constexpr):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_h = i_bh % H
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + 2 * i_t).to(tl.int64)
        j = tl.load(chunk_indices + 2 * i_t + 1)
    else:
        i_n = (i_bh // H).to(tl.int64)
        j = i_t
    bos, T_n = seq_bounds(i_n, cu_seqlens, T, IS_VARLEN)
    t0 = _seq_start(i_n, offsets, HAS_OFF)
    p = (t0 % C).to(tl.int32)
    n_c = tl.where(T_n > 0, tl.cdiv(p + T_n, C), 0)
    o_c = tl.arange(0, C)
    tok, m_t, m_n = _chunk_rows(j, p, bos, T_n, o_c, C)
    rq = (tok * G + i_h // (H // G)) * K
    rk = (tok * H + i_h) * K
    QK = tl.zeros([C, C], dtype=tl.float32)
    for kb in range(0, K, BK):
        o_k = kb + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        qb = tl.load(q + rq[:, None] + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
        kt = tl.load(k + rq[:, None] + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
        QK += tl.dot(qb.to(DT), tl.trans(kt).to(DT), input_precision=PREC)
    dA = tl.zeros([C, C], dtype=tl.float32)
    for vb in range(0, V, BV):
        o_v = vb + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        rv = ((tok * H + i_h) * V)[:, None] + o_v[None, :]
        db = tl.load(do + rv, mask=m_tv, other=0.).to(tl.float32)
        vb_ = tl.load(v + rv, mask=m_tv, other=0.).to(tl.float32)
        dA += tl.dot(db.to(DT), tl.trans(vb_).to(DT), input_precision=PREC)
    dA = dA * scale
    g_t = tl.load(g + tok * H + i_h, mask=m_t, other=0.).to(tl.float32)
    g_n = tl.load(g + (tok + 1) * H + i_h, mask=m_n, other=0.).to(tl.float32)
    causal = (o_c[:, None] >= o_c[None, :]) & m_t[:, None] & m_t[None, :]
    strict = o_c[None, :] < o_c[:, None]
    e = tl.cumsum(tl.where(strict, g_n[None, :], 0.), axis=1, reverse=True)
    Dx = tl.where(causal, tl.exp(tl.where(causal, e, 0.)), 0.)
    lev = _bitlen(o_c[:, None] ^ o_c[None, :], CLOG)
    rl = (tok * H + i_h) * L
    W = tl.zeros([C, C], dtype=tl.float32)
    for lv in tl.static_range(0, CLOG + 1):
        col = tl.load(lam + rl + lv, mask=m_t & (o_c * 0 + lv < L), other=0.).to(tl.float32)
        W = tl.where(lev == lv, col[:, None], W)
    # the [C, C] tiles are formed in an order that lets each die early (register pressure)
    Z = dA * QK * Dx  # d/dW (0 off the causal pairs: Dx is)
    # dlambda: the walks' levels plus the intra levels' row sums
    o_l = tl.arange(0, LP)
    m_tl = m_t[:, None] & (o_l < L)[None, :]
    dlt = tl.load(dl_w + rl[:, None] + o_l[None, :], mask=m_tl, other=0.)
    for lv in tl.static_range(0, CLOG + 1):
        s = tl.sum(tl.where(lev == lv, Z, 0.), axis=1)
        dlt += tl.where(o_l[None, :] == lv, s[:, None], 0.)
    tl.store(dl + rl[:, None] + o_l[None, :], dlt, mask=m_tl)
    # gate: pairs s < r <= t, as (dA A @ strict upper triangle) summed over the rows t >= r
    up = tl.where(o_c[:, None] < o_c[None, :], 1., 0.)
    Rm = tl.dot(Z * W, up, input_precision=PREC32)
    dgv = tl.sum(tl.where(o_c[:, None] >= o_c[None, :], Rm, 0.), axis=0)
    WD = W * Dx
    M = dA * WD          # dQK
    A = QK * WD
    wq = tl.zeros([C], dtype=tl.float32)
    uk = tl.zeros([C], dtype=tl.float32)
    for kb in range(0, K, BK):
        o_k = kb + tl.arange(0, BK)
        m_k = o_k < K
        m_tk = m_t[:, None] & m_k[None, :]
        qb = tl.load(q + rq[:, None] + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
        kt = tl.load(k + rq[:, None] + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
        ro = rk[:, None] + o_k[None, :]
        dqi = tl.load(dq_i + ro, mask=m_tk, other=0.)
        dki = tl.load(dk_i + ro, mask=m_tk, other=0.)
        wq += tl.sum(qb * dqi, axis=1)
        uk += tl.sum(kt * dki, axis=1)
        dqb = tl.dot(M.to(DT), kt.to(DT), input_precision=PREC) + dqi
        dkb = tl.dot(tl.trans(M).to(DT), qb.to(DT), input_precision=PREC) + dki
        tl.store(dq + ro, dqb, mask=m_tk)
        tl.store(dk + ro, dkb, mask=m_tk)
    for vb in range(0, V, BV):
        o_v = vb + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        rv = ((tok * H + i_h) * V)[:, None] + o_v[None, :]
        db = tl.load(do + rv, mask=m_tv, other=0.).to(tl.float32)
        dvi = tl.load(dv_i + rv, mask=m_tv, other=0.)
        dvb = tl.dot(tl.trans(A).to(DT), db.to(DT), input_precision=PREC) * scale + dvi
        tl.store(dv + rv, dvb, mask=m_tv)
    # in-chunk prefixes (query side: r <= t) and suffixes (key side: r > s), as masked sums
    sw = tl.sum(tl.where(o_c[None, :] >= o_c[:, None], wq[None, :], 0.), axis=1)
    pu = tl.sum(tl.where(o_c[None, :] < o_c[:, None], uk[None, :], 0.), axis=1)
    gid = tl.load(cstart + i_n).to(tl.int64) + j
    tt = tl.load(dtot + i_h.to(tl.int64) * NCH + gid, mask=j < n_c, other=0.)
    tl.store(dg + tok * H + i_h, dgv + sw + pu + tt, mask=m_t)


# ---------------------------------------------------------------------------------------------
# Launcher (backend contract: loglinear/torch.backward's signature and returns)
# ---------------------------------------------------------------------------------------------
def _chunk_starts(cu_seqlens: Optional[Tensor], off: Optional[Tensor], B: int, T: int, C: int,
                  dev):
    """Index of each sequence's first chunk in the per-chunk buffers (on the device) and the
    buffers' chunk count (a bound: no host sync)."""
    if cu_seqlens is None:
        per = triton.cdiv(T + (C - 1 if off is not None else 0), C)
        return torch.arange(B, device=dev, dtype=torch.int64) * per, max(B * per, 1)
    cu = cu_seqlens.to(torch.int64)
    N = cu.numel() - 1
    lens = cu[1:] - cu[:-1]
    pad = torch.zeros_like(lens) if off is None else off % C
    n_chunks = torch.where(lens > 0, (pad + lens + C - 1) // C, 0)
    starts = torch.cat([n_chunks.new_zeros(1), n_chunks.cumsum(0)[:-1]])
    return starts.contiguous(), triton.cdiv(T, C) + 2 * N


def backward(q: Tensor, k: Tensor, v: Tensor, g: Tensor, level_scales: Tensor, scale: float,
             h0: Optional[Tensor], offsets: Optional[Tensor], cu_seqlens: Optional[Tensor],
             do: Tensor, dht: Optional[Tensor], chunk_size: int = 64):
    """loglinear/torch.backward's contract: gradients (dq, dk, dv, dg, dlevel_scales, dh0) of
    forward()'s (o, final ht) given (do, dht) (dht None: the final state is not
    differentiated), each in its input's dtype and shape (dq, dk summed over the value heads
    sharing a key head), dh0 None when h0 is. No host sync."""
    in_dt = dict(q=q.dtype, k=k.dtype, v=v.dtype, g=g.dtype, l=level_scales.dtype)
    if q.dtype == torch.float64:
        q, k, v, g, level_scales, do = (x.float() for x in (q, k, v, g, level_scales, do))
    q, k, v, g, lam, do = (x.contiguous() for x in (q, k, v, g, level_scales, do))
    B, T, G, K = q.shape
    H, V, L = v.shape[2], v.shape[3], lam.shape[3]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    dev = q.device
    C = chunk_size_for(chunk_size)
    c = C.bit_length() - 1
    NI = max(L - c - 1, 0)
    LB = next_pow2(NI + 1, 1)
    LP = next_pow2(L, 2)
    BK, BV = min(64, next_pow2(K)), min(64, next_pow2(V))
    NV = triton.cdiv(V, BV)
    DT, DT_S, PREC = dot_config(q.dtype)
    PREC32 = exact_precision()
    has_h0 = h0 is not None
    off = (offsets.to(device=dev, dtype=torch.int64).contiguous()
           if has_h0 and offsets is not None else None)
    h0c = None if h0 is None else h0.float().contiguous()
    dhtc = None if dht is None else dht.float().contiguous()
    varlen = cu_seqlens is not None
    f32 = dict(dtype=torch.float32, device=dev)
    cstart, NCH = _chunk_starts(cu_seqlens, off, B, T, C, dev)
    SQ, SL = B * T * H * K, B * T * H * L
    # partial sums over V tiles: NP slots (rule 3: at most PARTIAL_MAX_BYTES, or one slot);
    # with more tiles than slots the walks run as launches of NP tiles, each adding to the
    # slots in launch order (deterministic)
    NP = max(1, min(NV, PARTIAL_MAX_BYTES // max(4 * (SQ + SL), 1)))
    groups = [(v0, min(NP, NV - v0)) for v0 in range(0, NV, NP)]
    # num_warps 8 for the walks: at fp32 K = 256 V = 512 ptxas spilled 2.3-2.8 KB per thread
    # with 4 warps, 1.5-1.7 KB with 8 (bf16 K = V = 128: 0.36 KB with 8); run time unmeasured
    scr = torch.empty(max(N * H * NI * K * V, 1), **f32)
    dq_p = torch.empty(NP, B, T, H, K, **f32)
    dl_p = torch.empty(NP, B, T, H, L, **f32)
    gam_p = torch.empty(NP, H, NCH, LB, **f32)
    hs_p = torch.empty(NP, H, NCH, **f32)
    gfin_p = torch.empty(NP, N * H, LB, **f32)
    hc_p = torch.empty(NP, N * H, **f32)
    dh0 = torch.empty(N, H, L, K, V, **f32) if has_h0 else None
    common = dict(H=H, G=G, K=K, V=V, C=C, CLOG=c, BK=BK, BV=BV, LB=LB)
    for v0, nv in groups if N * H else ():
        llb_fwd_walk_kernel[(N * H, nv)](
            q, k, v, g, lam, h0c, dhtc, off, do, cstart, cu_seqlens, scr, dq_p, dl_p, gam_p,
            hs_p, gfin_p, hc_p, dh0, T, L, NI, NCH, SQ, SL, v0, float(scale), LP=LP,
            HAS_H0=has_h0, HAS_DHT=dht is not None, HAS_OFF=off is not None,
            IS_VARLEN=varlen, ACC=v0 > 0, DT=DT, DT_S=DT_S, PREC=PREC, num_warps=8, **common)
    # the slots' partial sums, in a fixed order (deterministic)
    dq_i, dl_w, gam, hs = (x.sum(0) for x in (dq_p, dl_p, gam_p, hs_p))
    gfin, hc = gfin_p.sum(0), hc_p.sum(0)
    del dq_p, dl_p
    dk_p = torch.empty(NP, B, T, H, K, **f32)
    dv_i = torch.empty(B, T, H, V, **f32)
    eta_p = torch.empty(NP, H, NCH, LB, **f32)
    for v0, nv in groups if N * H else ():
        llb_rev_walk_kernel[(N * H, nv)](
            q, k, v, g, lam, dhtc, off, do, cstart, cu_seqlens, scr, dk_p, dv_i, eta_p,
            T, L, NI, NCH, SQ, v0, float(scale), HAS_DHT=dht is not None,
            HAS_OFF=off is not None, IS_VARLEN=varlen, ACC=v0 > 0, DT=DT, DT_S=DT_S,
            PREC=PREC, num_warps=8, **common)
    dk_i, eta = dk_p.sum(0), eta_p.sum(0)
    del dk_p
    dtot = torch.empty(H, NCH, **f32)
    if N * H:
        llb_dtot_kernel[(N * H,)](
            gam, eta, hs, gfin, hc, off, cstart, cu_seqlens, dtot, T, NI, NCH, H=H, C=C, LB=LB,
            HAS_H0=has_h0, HAS_DHT=dht is not None, HAS_OFF=off is not None, IS_VARLEN=varlen)
    dq = torch.empty(B, T, H, K, **f32)
    dk = torch.empty(B, T, H, K, **f32)
    dv = torch.empty(B, T, H, V, **f32)
    dg = torch.empty(B, T, H, **f32)
    dl = torch.empty(B, T, H, L, **f32)
    check_grid_yz(B * H, "batch x heads")
    if varlen:
        table, n_grid = _chunk_table(cu_seqlens, None if off is None else off % C, T, C)
    else:
        table, n_grid = None, triton.cdiv(T + (C - 1 if off is not None else 0), C)
    # rule 4: at C = 64 the program holds ~6 [64, 64] fp32 score tiles; ptxas spilled ~5.7 KB
    # per thread with 4 warps, 1.4 KB with 8 (bf16 K = V = 128, triton 3.9)
    warps = 8 if C >= 64 else 4
    if n_grid and B * H:
        llb_intra_kernel[(n_grid, B * H)](
            q, k, v, g, lam, do, off, cu_seqlens, table, cstart, dq_i, dk_i, dv_i, dl_w, dtot,
            dq, dk, dv, dg, dl, T, L, NCH, float(scale), H=H, G=G, K=K, V=V, C=C, CLOG=c,
            BK=BK, BV=BV, LP=LP, HAS_OFF=off is not None, IS_VARLEN=varlen, DT=DT, PREC=PREC,
            PREC32=PREC32, num_warps=warps)
    rep = H // G
    if rep > 1:
        dq, dk = dq.unflatten(2, (G, rep)).sum(3), dk.unflatten(2, (G, rep)).sum(3)
    return (dq.to(in_dt["q"]), dk.to(in_dt["k"]), dv.to(in_dt["v"]), dg.to(in_dt["g"]),
            dl.to(in_dt["l"]), None if h0 is None else dh0.to(h0.dtype))

"""Triton forward of chunk_log_linear_attn (the "loglinear" family's triton backend).

The math is loglinear/torch.py's: chunks of C = 2^c tokens aligned on absolute positions (a
sequence starting at offset t0 is front-padded with p = t0 % C virtual zero tokens: masks only,
nothing materialised), intra-chunk level-weighted scores, and chunk-level Fenwick states S_m read
at token level c + 1 + m. Two kernels:

  ll_intra_kernel  one program per (V tile, chunk, batch x head): o32 = (masked A) v with
                   A_ts = (q_t . k_s) lambda_t[bit_length(t xor s)] exp(sum_{s<r<=t} g_r) over
                   slots; the level gather is a static loop over the c + 1 intra levels. The
                   decays are segment sums formed by a cumulative sum along each row of the
                   [C, C] tile (no difference of two prefix sums: a -inf gate is an exact reset,
                   strong gates lose nothing to cancellation). o32 is fp32 scratch.
  ll_walk_kernel   one program per (sequence x head, V tile) walks its chunks in order. The
                   chunk-level states live in an fp32 global scratch [N H, n_inter, K, V] (the
                   program owns its V columns), each stored as it was when formed, with a
                   register vector dec[m] = sum of the chunk gate totals since (every exponent a
                   sum of gates over exactly its own tokens, <= 0). Level m holds a bucket
                   before chunk a iff bit m of the absolute chunk index a is set. Per chunk:
                   o = scale (o32 + sum_m lambda[c+1+m] exp(b + dec_m) q S_m) in v's dtype, then
                   the Fenwick merge of complete chunks (mu = trailing ones of a): the chunk's
                   own state (k exp(suffix))^T v and the levels below mu, each times
                   exp(dec), become level mu. K is walked in blocks of <= 64 rows, so no program
                   holds more than a [64, 64] state tile whatever K is. K blocks, levels and
                   slots are runtime loops: unrolled, one K=256 V=512 configuration had not
                   compiled for sm_90 after 4 CPU minutes; as loops each takes 3-12 s.
  The initial state enters in the walk: its slots l >= c + 1 are the chunk levels m = l - c - 1
  at chunk t0 // C (copied to the scratch at the start), its slots 1..c are virtual keys at slot
  r_l = ((p >> (l-1)) << (l-1)) - 1 of the first chunk (read by that chunk's queries at level
  bit_length(r_l xor slot), decayed by exp(prefix), merged with the chunk's own state). The
  final state is written by the walk too (every slot, zeros included): the high slots from the
  levels live at the end, the low ones from the tokens of a trailing partial chunk (and the
  virtual keys when that chunk is the first).

Memory besides the outputs: o32 (fp32, the size of o) and the level scratch, N H n_inter K V
fp32 (as large as the final state), both from torch.empty: every element read is written first.

chunk_size: C = chunk_size clamped to [16, 64] (tl.dot's smallest side; [C, C] score tiles
beyond 64 cost registers for nothing: the result does not depend on C). L (levels) is a
runtime argument; only the register vector of chunk-level decays takes a power-of-two bucket
of n_inter = L - c - 1 as a constexpr. Sequence length is never a constexpr. No host sync:
offsets and cu_seqlens are read on the device (chunk table built with torch ops).

16-bit inputs: tl.dot on 16-bit operands with fp32 accumulation (triton_utils.dot_config);
fp32 inputs use 3xTF32 (exact_precision); the interpreter computes fp32 throughout. float64
inputs are computed in fp32 and cast back. Outputs in v's dtype, states fp32.

Backward: loglinear/triton_backward.py (Triton kernels: intra-chunk gradients, a forward and a
reverse walk over the chunk levels, the gate totals' scan); the op's backward (loglinear/ops.py,
_ll_bwd) runs it after a triton forward.

Not handled here: the NonFiniteGuard of the chunk engines (a NaN/Inf k or v inside a chunk
reaches that chunk's earlier outputs through 0 * inf, as in the torch implementation).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..triton_utils import check_grid_yz, dot_config, next_pow2, seq_bounds

Tensor = torch.Tensor

MIN_CHUNK, MAX_CHUNK = 16, 64


@triton.jit
def _bitlen(x, CLOG: tl.constexpr):
    """bit_length of 0 <= x < 2^(CLOG + 1) (scalars or tensors)."""
    n = (x >= 1).to(tl.int32)
    for b in tl.static_range(1, CLOG + 1):
        n += (x >= (1 << b)).to(tl.int32)
    return n


@triton.jit
def _chunk_rows(j, p, bos, T_n, o_c, C: tl.constexpr):
    """Rows of local chunk j (slots o_c) of a sequence front-padded with p slots: token index
    (int64), validity, and validity of the next row (for the exclusive suffix sums)."""
    i = j * C + o_c - p
    m_t = (i >= 0) & (i < T_n)
    m_n = m_t & (o_c + 1 < C) & (i + 1 < T_n)
    return bos + i.to(tl.int64), m_t, m_n


@triton.jit(do_not_specialize=["T", "L"])
def ll_intra_kernel(q, k, v, g, lam, offsets, o32, cu_seqlens, chunk_indices, T, L,
                    H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                    C: tl.constexpr, CLOG: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                    HAS_OFF: tl.constexpr, IS_VARLEN: tl.constexpr, DT: tl.constexpr,
                    PREC: tl.constexpr):
    """o32[t] = sum_{s <= t in its chunk} (q_t . k_s) lambda_t[lev] exp(sum_{s<r<=t} g_r) v_s
    (unscaled, fp32) for the chunk's real rows."""
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_h = i_bh % H
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
    rq = (tok * G + i_h // (H // G)) * K
    # raw scores over K blocks
    Sqk = tl.zeros([C, C], dtype=tl.float32)
    for kb in range(0, K, BK):
        o_k = kb + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        qb = tl.load(q + rq[:, None] + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
        kt = tl.load(k + rq[:, None] + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
        Sqk += tl.dot(qb.to(DT), tl.trans(kt).to(DT), input_precision=PREC)
    # e[t, s] = sum_{s < r <= t} g_r: reverse cumulative sum along s of g_{s+1} [s + 1 <= t]
    g_n = tl.load(g + (tok + 1) * H + i_h, mask=m_n, other=0.).to(tl.float32)
    causal = (o_c[:, None] >= o_c[None, :]) & m_t[:, None] & m_t[None, :]
    strict = o_c[None, :] < o_c[:, None]
    e = tl.cumsum(tl.where(strict, g_n[None, :], 0.), axis=1, reverse=True)
    # level weights lambda_t[bit_length(t xor s)] (levels >= L weigh 0)
    lev = _bitlen(o_c[:, None] ^ o_c[None, :], CLOG)
    rl = (tok * H + i_h) * L
    W = tl.zeros([C, C], dtype=tl.float32)
    for lv in tl.static_range(0, CLOG + 1):
        col = tl.load(lam + rl + lv, mask=m_t & (o_c * 0 + lv < L), other=0.).to(tl.float32)
        W = tl.where(lev == lv, col[:, None], W)
    A = tl.where(causal, Sqk * W * tl.exp(tl.where(causal, e, 0.)), 0.)
    o_v = i_v * BV + tl.arange(0, BV)
    m_tv = m_t[:, None] & (o_v < V)[None, :]
    rv = ((tok * H + i_h) * V)[:, None] + o_v[None, :]
    vt = tl.load(v + rv, mask=m_tv, other=0.).to(tl.float32)
    out = tl.dot(A.to(DT), vt.to(DT), input_precision=PREC)
    tl.store(o32 + rv, out, mask=m_tv)


@triton.jit
def _level_of(dec, o_m, m):
    """dec[m] of the register vector (a -inf entry stays -inf)."""
    return tl.sum(tl.where(o_m == m, dec, 0.), axis=0)


@triton.jit(do_not_specialize=["T", "L", "NI"])
def ll_walk_kernel(q, k, v, g, lam, h0, offsets, o32, o, ht, scr, cu_seqlens, T, L, NI, scale,
                   H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                   C: tl.constexpr, CLOG: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                   LB: tl.constexpr, HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr,
                   IS_VARLEN: tl.constexpr, DT: tl.constexpr, DT_S: tl.constexpr,
                   PREC: tl.constexpr):
    """The chunk walk of one (sequence, head, V tile): inter-chunk outputs added to o32 and
    written to o (scaled, v's dtype), the chunk-level Fenwick states in scr, the final state."""
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
    h0_o = head * L * K * V  # (h0 is None without HAS_H0: offsets only)
    if HAS_H0:  # the inherited chunk levels: slot c + 1 + m where bit m of a0 is set
        for m in range(NI):
            if ((a0 >> m) & 1) == 1:
                for kb in range(0, K, BK):
                    o_k = kb + tl.arange(0, BK)
                    m_kv = (o_k < K)[:, None] & m_v[None, :]
                    x = tl.load(h0 + h0_o + ((CLOG + 1 + m) * K + o_k[:, None]) * V + o_v[None, :],
                                mask=m_kv, other=0.).to(tl.float32)
                    tl.store(scr_h + (m * K + o_k[:, None]) * V + o_v[None, :], x, mask=m_kv)
        tl.debug_barrier()
    dec = tl.zeros([LB], dtype=tl.float32)
    for j in range(0, n_c):
        a = a0 + j
        tok, m_t, m_n = _chunk_rows(j, p, bos, T_n, o_c, C)
        g_t = tl.load(g + tok * H + i_h, mask=m_t, other=0.).to(tl.float32)
        g_n = tl.load(g + (tok + 1) * H + i_h, mask=m_n, other=0.).to(tl.float32)
        b = tl.cumsum(g_t, axis=0)                    # sum of g over [chunk start, t]
        sfx = tl.cumsum(g_n, axis=0, reverse=True)    # sum of g over (s, chunk end]
        tot = tl.sum(g_t, axis=0)
        rq = (tok * G + i_g) * K
        rl = (tok * H + i_h) * L
        m_tv = m_t[:, None] & m_v[None, :]
        rv = ((tok * H + i_h) * V)[:, None] + o_v[None, :]
        acc = tl.load(o32 + rv, mask=m_tv, other=0.)
        for m in range(NI):  # read the live chunk levels
            if ((a >> m) & 1) == 1:
                dm = _level_of(dec, o_m, m)
                w = tl.load(lam + rl + CLOG + 1 + m, mask=m_t, other=0.).to(tl.float32)
                w = tl.where(m_t, w * tl.exp(b + dm), 0.)
                part = tl.zeros([C, BV], dtype=tl.float32)
                for kb in range(0, K, BK):
                    o_k = kb + tl.arange(0, BK)
                    m_k = o_k < K
                    qb = tl.load(q + rq[:, None] + o_k[None, :], mask=m_t[:, None] & m_k[None, :],
                                 other=0.)
                    Sb = tl.load(scr_h + (m * K + o_k[:, None]) * V + o_v[None, :],
                                 mask=m_k[:, None] & m_v[None, :], other=0.)
                    part += tl.dot(qb.to(DT_S), Sb.to(DT_S), input_precision=PREC)
                acc += w[:, None] * part
        if HAS_H0:
            if j == 0:  # the initial state's low slots: virtual keys at slots r_l < p
                for l in range(1, CLOG + 1):
                    if (l < L) & (((p >> (l - 1)) & 1) == 1):
                        r_l = ((p >> (l - 1)) << (l - 1)) - 1
                        lev = _bitlen(o_c ^ r_l, CLOG)
                        w = tl.load(lam + rl + lev, mask=m_t & (lev < L), other=0.)
                        w = tl.where(m_t, w.to(tl.float32) * tl.exp(b), 0.)
                        part = tl.zeros([C, BV], dtype=tl.float32)
                        for kb in range(0, K, BK):
                            o_k = kb + tl.arange(0, BK)
                            m_k = o_k < K
                            qb = tl.load(q + rq[:, None] + o_k[None, :],
                                         mask=m_t[:, None] & m_k[None, :], other=0.)
                            hb = tl.load(h0 + h0_o + (l * K + o_k[:, None]) * V + o_v[None, :],
                                         mask=m_k[:, None] & m_v[None, :], other=0.)
                            part += tl.dot(qb.to(DT_S), hb.to(tl.float32).to(DT_S),
                                           input_precision=PREC)
                        acc += w[:, None] * part
        tl.store(o + rv, (acc * scale).to(o.dtype.element_ty), mask=m_tv)
        dec += tot
        if (j + 1) * C - p <= T_n:  # a complete chunk: the Fenwick merge
            # below[m]: m < trailing ones of a (bits 0..m of a all set)
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
                    if HAS_H0:
                        if j == 0:
                            for l in range(1, CLOG + 1):
                                if (l < L) & (((p >> (l - 1)) & 1) == 1):
                                    hb = tl.load(h0 + h0_o + (l * K + o_k[:, None]) * V
                                                 + o_v[None, :], mask=m_kv, other=0.)
                                    hb = hb.to(tl.float32)
                                    new += tl.exp(tot) * hb
                    for m in range(0, mu):
                        Sb = tl.load(scr_h + (m * K + o_k[:, None]) * V + o_v[None, :],
                                     mask=m_kv, other=0.)
                        new += tl.exp(_level_of(dec, o_m, m)) * Sb
                    tl.store(scr_h + (mu * K + o_k[:, None]) * V + o_v[None, :], new, mask=m_kv)
                dec = tl.where(o_m == mu, 0., dec)
            tl.debug_barrier()  # the level just stored is read by later chunks' other threads
    if STORE_FINAL:
        # the state for query position t_end: levels live at chunk a_fin, and the tokens (and,
        # in the first chunk, the virtual keys) of a trailing partial chunk as the low slots
        t_end = t0 + T_n
        r = (t_end % C).to(tl.int32)
        a_fin = t_end // C
        jf = (a_fin - a0).to(tl.int32)
        tok, m_t, m_n = _chunk_rows(jf, p, bos, T_n, o_c, C)
        g_t = tl.load(g + tok * H + i_h, mask=m_t, other=0.).to(tl.float32)
        g_n = tl.load(g + (tok + 1) * H + i_h, mask=m_n, other=0.).to(tl.float32)
        sfx = tl.cumsum(g_n, axis=0, reverse=True)
        tot = tl.sum(g_t, axis=0)
        wk = tl.where(m_t, tl.exp(sfx), 0.)
        lev_r = _bitlen(o_c ^ r, CLOG)
        rq = (tok * G + i_g) * K
        rv = ((tok * H + i_h) * V)[:, None] + o_v[None, :]
        vt = tl.load(v + rv, mask=m_t[:, None] & m_v[None, :], other=0.)
        ht_h = ht + head * L * K * V
        for kb in range(0, K, BK):
            o_k = kb + tl.arange(0, BK)
            m_k = o_k < K
            m_kv = m_k[:, None] & m_v[None, :]
            kv = o_k[:, None] * V + o_v[None, :]
            kd = tl.load(k + rq[:, None] + o_k[None, :], mask=m_t[:, None] & m_k[None, :],
                         other=0.).to(tl.float32) * wk[:, None]
            tl.store(ht_h + kv, tl.zeros([BK, BV], dtype=tl.float32), mask=m_kv)
            for l in range(1, CLOG + 1):
                if l < L:
                    sel = tl.where(m_t & (lev_r == l), 1., 0.)
                    x = tl.dot(tl.trans(kd * sel[:, None]).to(DT), vt.to(DT),
                               input_precision=PREC)
                    if HAS_H0:
                        if jf == 0:
                            for l2 in range(1, CLOG + 1):
                                if (l2 < L) & (((p >> (l2 - 1)) & 1) == 1):
                                    r2 = ((p >> (l2 - 1)) << (l2 - 1)) - 1
                                    if _bitlen(r2 ^ r, CLOG) == l:
                                        hb = tl.load(h0 + h0_o + l2 * K * V + kv, mask=m_kv,
                                                     other=0.).to(tl.float32)
                                        x += tl.exp(tot) * hb
                    tl.store(ht_h + l * K * V + kv, x, mask=m_kv)
            for m in range(NI):
                x = tl.zeros([BK, BV], dtype=tl.float32)
                if ((a_fin >> m) & 1) == 1:
                    Sb = tl.load(scr_h + m * K * V + kv, mask=m_kv, other=0.)
                    x = tl.exp(_level_of(dec, o_m, m)) * Sb
                tl.store(ht_h + (CLOG + 1 + m) * K * V + kv, x, mask=m_kv)


# ---------------------------------------------------------------------------------------------
# Launcher (backend contract: loglinear/ops.py's _ll_fwd)
# ---------------------------------------------------------------------------------------------
def _chunk_table(cu_seqlens: Tensor, p: Optional[Tensor], T: int, C: int):
    """Varlen chunk table on the device: indices[gid] = (sequence, local chunk), sequence n
    having cdiv(p_n + len_n, C) chunks (0 when empty). The grid takes the bound
    cdiv(T, C) + 2 N >= that sum; ids past the real count get a local chunk past their
    sequence's end, so their rows are all masked."""
    cu = cu_seqlens.to(torch.int64)
    N = cu.numel() - 1
    lens = cu[1:] - cu[:-1]
    pad = torch.zeros_like(lens) if p is None else p
    n_chunks = torch.where(lens > 0, (pad + lens + C - 1) // C, 0)
    starts = torch.cat([n_chunks.new_zeros(1), n_chunks.cumsum(0)])
    bound = triton.cdiv(T, C) + 2 * N
    gid = torch.arange(bound, device=cu.device)
    seq = torch.searchsorted(starts[1:].contiguous(), gid, right=True).clamp_(max=N - 1)
    return torch.stack([seq, gid - starts[seq]], 1).to(torch.int32).contiguous(), bound


def chunk_size_for(chunk_size: int) -> int:
    return min(max(int(chunk_size), MIN_CHUNK), MAX_CHUNK)


def forward(q: Tensor, k: Tensor, v: Tensor, g: Tensor, level_scales: Tensor, scale: float,
            h0: Optional[Tensor], offsets: Optional[Tensor], output_final_state: bool,
            cu_seqlens: Optional[Tensor], chunk_size: int = 64):
    """loglinear/torch.forward's contract: q/k [B, T, G, K], v [B, T, H, V], g [B, T, H],
    level_scales [B, T, H, L]; h0 [N, H, L, K, V] with offsets [N] (or None). Returns o
    [B, T, H, V] (v's dtype) and (ht fp32 (float64 for float64 inputs), next offsets) or None.
    No host sync. Not differentiable (the op's backward: loglinear/triton_backward.py)."""
    in_dtype, f64 = v.dtype, q.dtype == torch.float64
    if f64:
        q, k, v, g, level_scales = (x.float() for x in (q, k, v, g, level_scales))
    q, k, v, g, lam = (x.contiguous() for x in (q, k, v, g, level_scales))
    B, T, G, K = q.shape
    H, V, L = v.shape[2], v.shape[3], lam.shape[3]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    C = chunk_size_for(chunk_size)
    c = C.bit_length() - 1
    NI = max(L - c - 1, 0)
    LB = next_pow2(NI + 1, 1)
    BK, BV = min(64, next_pow2(K)), min(64, next_pow2(V))
    NV = triton.cdiv(V, BV)
    DT, DT_S, PREC = dot_config(q.dtype)
    off = None if h0 is None else offsets.to(device=q.device, dtype=torch.int64).contiguous()
    h0c = None if h0 is None else h0.contiguous()
    varlen = cu_seqlens is not None
    dev = q.device
    o32 = torch.empty(B, T, H, V, dtype=torch.float32, device=dev)
    o = torch.empty(B, T, H, V, dtype=v.dtype, device=dev)
    check_grid_yz(B * H, "batch x heads")
    if varlen:
        table, n_grid = _chunk_table(cu_seqlens, None if off is None else off % C, T, C)
    else:
        table, n_grid = None, triton.cdiv(T + (C - 1 if off is not None else 0), C)
    check_grid_yz(n_grid, f"chunks per sequence (T / {C})")
    ll_intra_kernel[(NV, n_grid, B * H)](
        q, k, v, g, lam, off, o32, cu_seqlens, table, T, L,
        H=H, G=G, K=K, V=V, C=C, CLOG=c, BK=BK, BV=BV, HAS_OFF=off is not None,
        IS_VARLEN=varlen, DT=DT, PREC=PREC)
    ht = (torch.empty(N, H, L, K, V, dtype=torch.float32, device=dev) if output_final_state
          else None)
    scr = torch.empty(max(N * H * NI * K * V, 1), dtype=torch.float32, device=dev)
    ll_walk_kernel[(N * H, NV)](
        q, k, v, g, lam, h0c, off, o32, o, ht, scr, cu_seqlens, T, L, NI, float(scale),
        H=H, G=G, K=K, V=V, C=C, CLOG=c, BK=BK, BV=BV, LB=LB, HAS_H0=h0 is not None,
        STORE_FINAL=output_final_state, IS_VARLEN=varlen, DT=DT, DT_S=DT_S, PREC=PREC)
    final = None
    if output_final_state:
        if cu_seqlens is None:
            lengths = torch.full((N,), T, dtype=torch.int64, device=dev)
        else:
            lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
        nxt = lengths if off is None else off + lengths
        final = (ht.double() if f64 else ht, nxt)
    return o.to(in_dtype), final

"""Chunked PyTorch log-linear attention over the scalar gate (log-linear Mamba-2 / simple GLA).

    o_t = scale * sum_{s <= t} lambda_t[lev(s, t)] exp(sum_{s<r<=t} g_r) (q_t . k_s) v_s,
    lev(t, t) = 0, lev(s, t) = bit_length(s xor t) for s < t (absolute positions),

i.e. the keys before t are cut into the Fenwick buckets of [0, t] (sizes 1, 2, 4, ... nearest
first) and bucket l is weighed by lambda_t[l] (level_scales[..., l]; levels >= L weigh 0).

Chunks of C = 2^c tokens aligned on absolute positions (a sequence that starts at offset t0 is
front-padded with t0 % C zero tokens: gates 0, keys/values/weights 0). Then for a pair in one
chunk the level is bit_length(i xor j) of the slots (<= c), and for a pair in different chunks it
is c + 1 + bit_length(chunk(s) xor chunk(t)) - 1: a function of the two chunks only. So
  intra  A_ij = (q_i . k_j) lambda_i[lev(i, j)] exp(sum_{j<r<=i} g_r)   (masked [C, C] scores)
  inter  o_i += sum_m lambda_i[c + 1 + m] (q_i exp(sum_{r<=i} g_r)) @ S_m
with S_m the chunk-level Fenwick states (one K x V state per level m, O(log(T/C)) of them) passed
along chunks: after chunk a every state decays by exp(sum_chunk g), and with mu = trailing ones of
a the levels < mu and the chunk's own state (sum_s exp(sum_{r>s} g_r) k_s v_s^T) merge into
level mu. This is the paper's chunkwise algorithm (and fla's kernel); nothing T x T is formed and
the cost is O(T C (K + V) + T log(T/C) K V).

Why not compose the public chunk_simple_gla over per-level masked inputs: an inter-chunk level
is a set of whole chunks that changes with the query chunk (the Fenwick buckets), which a single
causal scan does not express; it would take one full simple-GLA pass per level with the level's
keys gated in and out (O(log T) passes over q, k, v, each with its own state), against one pass
here with O(log T) small states. A measurement of that composition was not done.

Every decay is exp of a sum of gates over exactly its own tokens (chunk.torch's causal_decays,
prefix and suffix sums): exponents <= 0 and a gate of -inf is an exact reset. An initial state
(ht [N, H, L, K, V], offsets [N]) enters as its own term: slot l (bucket l of query t0) holds
keys whose level for query t is bit_length(rep_l xor t), rep_l = ((t0 >> (l-1)) << (l-1)) - 1.

The forward's chunk loop runs in Python (one step per chunk, O(log) small matmuls each).

Backward: `backward` is hand-written (no autograd, nothing T x T; see its docstring): the intra
pieces for all chunks at once, and the inter-chunk levels one level at a time (level m pairs
each aligned block of 2^m chunks with the run of 2^m chunks after it), so no Python loop runs
per chunk and the states it holds are one per block pair.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from ..chunk.constants import TORCH_CHUNK
from ..chunk.torch import (causal_decays, pair_gate_grad, prefix_sum, prefix_sum_exclusive,
                           suffix_sum, suffix_sum_exclusive)
from ..precision import accumulation_dtype

Tensor = torch.Tensor


def _bitlen(x: int) -> int:
    return int(x).bit_length()


def _trailing_ones(a: int) -> int:
    m = 0
    while (a >> m) & 1:
        m += 1
    return m


def merge_levels(S: List[Optional[Tensor]], local: Tensor, position: int, n_inter: int) -> None:
    """The Fenwick merge after chunk `position` (in place): the levels below mu (the trailing
    ones of the position) and the chunk's own state fold into level mu; they become empty."""
    mu = _trailing_ones(position)
    merged = local
    for m in range(min(mu, n_inter)):
        if S[m] is not None:
            merged = merged + S[m]
        S[m] = None
    if mu < n_inter:
        S[mu] = merged


def _intra_levels(C: int, L: int, device) -> Tuple[Tensor, Tensor]:
    """lev[i, j] of slots i >= j of an aligned chunk (clamped to L: weight 0), causal mask."""
    i = torch.arange(C, device=device)
    x = i[:, None] ^ i[None, :]
    lev = torch.zeros(C, C, dtype=torch.int64, device=device)
    for b in range(C.bit_length()):
        lev += (x >= (1 << b)).to(torch.int64)  # bit_length(x)
    causal = i[:, None] >= i[None, :]
    return lev.clamp(max=L).masked_fill(~causal, L), causal


def _levels_of(rep: List[int], pos: List[int], L: int) -> List[List[int]]:
    return [[min(_bitlen(r ^ t), L) if r >= 0 else L for r in rep] for t in pos]


def _segments(B: int, N: int, offs: List[int], cu_seqlens: Optional[Tensor]):
    """The groups the chunk walk runs at once, as (sequence ids, token span or None): dense rows
    that share an offset are batched (the levels depend on absolute positions); varlen runs one
    sequence at a time. Reads cu_seqlens on the host."""
    if cu_seqlens is None:
        if len(set(offs)) <= 1:
            return [(list(range(B)), None)]
        return [([b for b in range(B) if offs[b] == o0], None) for o0 in sorted(set(offs))]
    bounds = cu_seqlens.tolist()
    return [([n], (bounds[n], bounds[n + 1])) for n in range(N)]


def _group_inputs(xs, ids: List[int], span) -> List[Tensor]:
    """The rows (dense) or the token span (varlen) of each [B, T, ...] tensor of xs."""
    if span is None:
        sel = torch.tensor(ids, device=xs[0].device)
        return [x.index_select(0, sel) for x in xs]
    return [x[:, span[0]:span[1]] for x in xs]


def _group_chunk(chunk_size: int, t0: int, n: int) -> int:
    """The chunk of a group: chunk_size, or the smallest power of two covering a short one."""
    return min(chunk_size, 1 << max(0, (t0 % chunk_size + n - 1).bit_length()))


def _chunk_grid(t0: int, n: int, C: int) -> Tuple[int, int]:
    """(front padding p = t0 % C, number of chunks NC) of n tokens starting at offset t0."""
    p = t0 % C
    return p, -(-(p + n) // C)


def _chunked(x: Tensor, p: int, NC: int, C: int) -> Tensor:
    """[B, n, H, *] -> [B, H, NC, C, *], zero-padded by p tokens in front and to NC * C."""
    n = x.shape[1]
    x = x.movedim(1, -1)  # [B, H, *, n]
    x = torch.nn.functional.pad(x, (p, NC * C - p - n))
    return x.reshape(*x.shape[:-1], NC, C).movedim(-2, 2).movedim(-1, 3)


def _chunked_contiguous(x: Tensor, p: int, NC: int, C: int) -> Tensor:
    """_chunked's values laid out contiguously (the backward's matmuls then copy nothing)."""
    B, n, H = x.shape[:3]
    x = torch.nn.functional.pad(x.transpose(1, 2), [0, 0] * (x.dim() - 3) + [p, NC * C - p - n])
    return x.reshape(B, H, NC, C, *x.shape[3:])


def _unchunk(x: Tensor, p: int, n: int) -> Tensor:
    """[B, H, NC, C, *] -> [B, n, H, *]: the inverse of _chunked."""
    B, H, NC, C = x.shape[:4]
    return x.reshape(B, H, NC * C, *x.shape[4:])[:, :, p:p + n].transpose(1, 2)


def _intra_factors(lc: Tensor, gc: Tensor, L: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(causal [C, C], level weights W = lambda_i[lev(i, j)], decays D = exp(sum_{j<r<=i} g))
    of the chunks (lc [B, H, NC, C, L], gc [B, H, NC, C]); W and D are 0 above the diagonal."""
    B, H, NC, C = gc.shape
    lev, causal = _intra_levels(C, L, gc.device)
    lam_pad = torch.cat([lc, lc.new_zeros(*lc.shape[:-1], 1)], -1)
    W = lam_pad.gather(-1, lev.expand(B, H, NC, C, C))
    return causal, W, causal_decays(gc)


def _h0_reps(t0: int, L: int) -> List[int]:
    """A key position standing for each slot of the initial state at offset t0 (its bucket's
    last key; -1 for the slots that do not exist there: level L, weight 0)."""
    return [((t0 >> (l - 1)) << (l - 1)) - 1 if l and (t0 >> (l - 1)) & 1 else -1
            for l in range(L)]


def _group(q, k, v, g, lam, h0, t0: int, C: int, scale: float, want_final: bool):
    """One group of sequences sharing offset t0 and length n: q/k/v [B, n, H, *] (q/k already per
    value head), g [B, n, H], lam [B, n, H, L], h0 [B, H, L, K, V] or None; all in the compute
    dtype. Returns o [B, n, H, V] and the final ht [B, H, L, K, V] (or None)."""
    B, n, H, K = q.shape
    V, L = v.shape[-1], lam.shape[-1]
    dev, dt = q.device, q.dtype
    o = v.new_zeros(B, n, H, V)
    ht = None
    if want_final:
        ht = torch.zeros(B, H, L, K, V, dtype=dt, device=dev)
    t_end = t0 + n
    c = C.bit_length() - 1
    n_inter = max(L - (c + 1), 0)  # chunk levels m with token level c + 1 + m < L
    if n > 0:
        p, NC = _chunk_grid(t0, n, C)
        qc, kc, vc, lc = (_chunked(x, p, NC, C) for x in (q, k, v, lam))
        gc = _chunked(g, p, NC, C)  # [B, H, NC, C]
        # intra-chunk: masked, decayed, level-weighted scores
        causal, W, D = _intra_factors(lc, gc, L)
        A = (qc @ kc.transpose(-1, -2)).masked_fill(~causal, 0) * W * D
        oc = A @ vc  # [B, H, NC, C, V]
        # inter-chunk: chunk-level Fenwick states
        pre = prefix_sum(gc[..., None], 3)  # [B, H, NC, C, 1]
        qd = qc * pre.exp()
        kd = kc * suffix_sum_exclusive(gc[..., None], 3).exp()
        decay = pre[:, :, :, -1:, :].exp()  # [B, H, NC, 1, 1]
        need_states = n_inter > 0 or want_final
        a0 = (t0 - p) // C
        S: List[Optional[Tensor]] = [None] * n_inter
        inter_out = []
        last_pre_merge = None
        if need_states:
            local = kd.transpose(-1, -2) @ vc  # [B, H, NC, K, V]
            for j in range(NC):
                terms = [lc[:, :, j, :, c + 1 + m, None] * (qd[:, :, j] @ S[m])
                         for m in range(n_inter) if S[m] is not None]
                inter_out.append(sum(terms) if terms else None)
                S = [None if s is None else s * decay[:, :, j] for s in S]
                if j == NC - 1:
                    last_pre_merge = list(S)
                merge_levels(S, local[:, :, j], a0 + j, n_inter)
            if n_inter > 0:
                zero = oc.new_zeros(B, H, C, V)
                oc = oc + torch.stack([zero if x is None else x for x in inter_out], 2)
        o = _unchunk(oc, p, n)
        if want_final:
            r = t_end % C
            src = S if r == 0 else last_pre_merge
            slots = [None] * L
            for m in range(n_inter):
                if src[m] is not None:
                    slots[c + 1 + m] = src[m]
            if r:  # tokens of the last (partial) chunk: low levels of t_end
                levs = torch.tensor([min(_bitlen(jj ^ r), L) if jj < r else L for jj in range(C)],
                                    device=dev)
                onehot = torch.nn.functional.one_hot(levs, L + 1)[:, :L].to(dt)  # [C, L]
                low = torch.einsum("bhck,bhcv,cl->bhlkv", kd[:, :, -1], vc[:, :, -1], onehot)
                for l in range(1, min(c + 1, L)):
                    slots[l] = low[:, :, l] if slots[l] is None else slots[l] + low[:, :, l]
            zero = torch.zeros(B, H, K, V, dtype=dt, device=dev)
            ht = torch.stack([zero if s is None else s for s in slots], 2)
    if h0 is not None:  # the initial hierarchy, each slot at its level for every query
        reps = _h0_reps(t0, L)
        if n > 0:
            lev0 = torch.tensor(_levels_of(reps, list(range(t0, t_end)), L), device=dev)  # [n, L]
            lam_pad = torch.cat([lam, lam.new_zeros(B, n, H, 1)], -1)
            W0 = lam_pad.gather(-1, lev0[None, :, None, :].expand(B, n, H, L))
            W0 = W0 * prefix_sum(g, 1).exp()[..., None]  # [B, n, H, L]
            o = o + torch.einsum("bthl,bthk,bhlkv->bthv", W0, q, h0)
        if want_final:
            end = _levels_of(reps, [t_end], L)[0]
            total = g.sum(1).exp() if n > 0 else torch.ones(B, H, dtype=dt, device=dev)
            onehot = torch.nn.functional.one_hot(torch.tensor(end, device=dev), L + 1)[:, :L].to(dt)
            ht = ht + torch.einsum("bh,lm,bhlkv->bhmkv", total, onehot, h0)
    return o * scale, ht


def _compute_inputs(q, k, v, g, level_scales):
    """(compute dtype, q, k repeated to the value heads, v, g, level_scales), all in it."""
    dt = accumulation_dtype(q)
    rep = v.shape[2] // q.shape[2]
    qx = q.to(dt).repeat_interleave(rep, 2) if rep > 1 else q.to(dt)
    kx = k.to(dt).repeat_interleave(rep, 2) if rep > 1 else k.to(dt)
    return dt, qx, kx, v.to(dt), g.to(dt), level_scales.to(dt)


def forward(q: Tensor, k: Tensor, v: Tensor, g: Tensor, level_scales: Tensor, scale: float,
            h0: Optional[Tensor], offsets: Optional[Tensor], output_final_state: bool,
            cu_seqlens: Optional[Tensor], chunk_size: int = TORCH_CHUNK):
    """q/k [B, T, G, K], v [B, T, H, V], g [B, T, H], level_scales [B, T, H, L]; h0 [N, H, L, K,
    V] with offsets [N] (or None). Returns o [B, T, H, V] (v's dtype) and (ht, offsets) or None.
    Differentiable by autograd. Reads cu_seqlens and offsets on the host."""
    B, T, G, K = q.shape
    H, V, L = v.shape[2], v.shape[-1], level_scales.shape[-1]
    dt, qx, kx, vx, gx, lx = _compute_inputs(q, k, v, g, level_scales)
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    offs = [0] * N if offsets is None else [int(x) for x in offsets.reshape(-1).tolist()]
    h0x = None if h0 is None else h0.to(dt)
    segs = _segments(B, N, offs, cu_seqlens)
    hts = [None] * N
    pieces = []
    for ids, span in segs:
        if not ids:
            continue
        t0 = offs[ids[0]]
        args = _group_inputs((qx, kx, vx, gx, lx), ids, span)
        hg = None if h0x is None else h0x[ids]
        C = _group_chunk(chunk_size, t0, args[0].shape[1])
        og, hg_out = _group(*args, hg, t0, C, scale, output_final_state)
        pieces.append((ids, span, og))
        if output_final_state:
            for i, n in enumerate(ids):
                hts[n] = hg_out[i]
    if cu_seqlens is None:
        if len(pieces) == 1:
            o = pieces[0][2]
        else:
            order = [n for ids, _, _ in pieces for n in ids]
            inv = torch.empty(B, dtype=torch.int64)
            inv[torch.tensor(order)] = torch.arange(B)
            o = torch.cat([p[2] for p in pieces], 0).index_select(0, inv.to(q.device))
    else:
        o = torch.cat([p[2] for p in pieces], 1) if pieces else vx.new_zeros(1, 0, H, V)
    final = None
    if output_final_state:
        ht = torch.stack(hts, 0) if N else vx.new_zeros(0, H, L, K, V)
        lengths = [T] * N if cu_seqlens is None else [b - a for _, (a, b) in segs]
        final = (ht.float() if dt == torch.float32 else ht,
                 torch.tensor([offs[n] + lengths[n] for n in range(N)], dtype=torch.int64,
                              device=q.device))
    return o.to(v.dtype), final


# ---------------------------------------------------------------------------------------------
# Backward (hand-written): the forward's pieces run in reverse, nothing recomputed by autograd.
# ---------------------------------------------------------------------------------------------
def _level_sums(Z: Tensor, nlev: int) -> Tensor:
    """[.., C, C] -> [.., C, nlev]: for each row i, the sum of Z[i, j] over the keys j of each
    intra-chunk level l < nlev. Level l >= 1 of row i is the lower-left quadrant of the aligned
    2^l block holding i, so each is a plain sum over a block view (no mask, no cumsum
    difference)."""
    *lead, C, _ = Z.shape
    Z = Z.contiguous()
    out = Z.new_zeros(*lead, nlev, C)
    out[..., 0, :] = Z.diagonal(0, -2, -1)
    for l in range(1, nlev):
        h = 1 << (l - 1)
        nb = C // (2 * h)
        # the diagonal 2^l blocks: [.., 2, h, 2, h, nb]
        blocks = Z.view(*lead, nb, 2, h, nb, 2, h).diagonal(dim1=-6, dim2=-3)
        quad = blocks[..., 1, :, 0, :, :].sum(-2)  # rows of the second half: [.., h, nb]
        out[..., l, :].view(*lead, nb, 2, h)[..., 1, :] = quad.transpose(-1, -2)
    return out.transpose(-1, -2)


def _segment_scan(x: Tensor, segs: List[int], suffix: bool) -> Tensor:
    """Exclusive prefix (or suffix) sums of x [B, H, n] within runs of equal segs (n host ints,
    non-decreasing): each run is laid out as a zero-padded row and scanned on its own, so no
    sum is ever the difference of two longer ones (exact with -inf)."""
    pos, row, width = [], -1, 0
    for i, s in enumerate(segs):
        if i == 0 or s != segs[i - 1]:
            row, col = row + 1, 0
        pos.append((row, col))
        col += 1
        width = max(width, col)
    idx = torch.tensor([r * width + c for r, c in pos], device=x.device)
    B, H = x.shape[:2]
    buf = x.new_zeros(B, H, (row + 1) * width).index_copy_(2, idx, x).view(B, H, row + 1, width)
    scan = suffix_sum_exclusive(buf, 3) if suffix else prefix_sum_exclusive(buf, 3)
    return scan.view(B, H, -1).index_select(2, idx)


def _inter_levels(qd: Tensor, doc: Tensor, lam: Tensor, local: Tensor, log_total: Tensor,
                  a0: int, dht: Optional[Tensor], r: int):
    """Gradients of the inter-chunk terms o_i += lambda_i[c+1+m] qd_i S_m^(j) (lam [B, H, NC, C,
    M]: those weights; local [B, H, NC, K, V] = kd^T v; log_total [B, H, NC]: each chunk's gate
    sum) and of the final levels c+1+m (dht [B, H, M, K, V] or None; r = the tokens of a partial
    last chunk). Returns (dqd, dlambda [B, H, NC, C, M], dlocal, dlog_total [B, H, NC]).

    Level m pairs the aligned blocks of 2^m chunks (absolute indices a0 + j): for a chunk j whose
    bit m is set (the query run), S_m^(j) = rho_j Shat_u, Shat_u = sum_a sigma_a local_a over the
    chunks a of the block just before the run (bit m clear, same bits above m), sigma_a = exp(the
    block's gates after a), rho_j = exp(the run's gates before j). This is the forward's
    chunk walk (its merges move exactly such a block into level m, and out after the run), so
    one pass per level covers every chunk: nothing walks chunk by chunk, and the states held are
    one per block pair (O(NC K V) over all levels). In reverse, dShat_u = sum_j rho_j G_j over
    the run (G_j = qd_j^T (lambda[c+1+m] do_j), plus the final state's gradient where it reads
    level m), dlocal_a = sigma_a dShat_u; the log-gradients of rho_j (<S_m^(j), G_j>) and of
    sigma_a (<sigma_a local_a, dShat_u>) reach the chunk totals they sum, within the run or
    block."""
    B, H, NC, C, K = qd.shape
    M, V = lam.shape[-1], doc.shape[-1]
    dev = qd.device
    dqd, dlocal = torch.zeros_like(qd), torch.zeros_like(local)
    dl = qd.new_zeros(B, H, M, NC, C)
    dtot = torch.zeros_like(log_total)
    log_ext = torch.cat([log_total, log_total.new_zeros(B, H, 1)], 2)  # the end: chunk NC
    lam = lam.movedim(-1, 2)  # [B, H, M, NC, C]
    for m in range(M):
        pair = [(a0 + j) >> (m + 1) for j in range(NC + 1)]
        keys = [j for j in range(NC) if not (a0 + j) >> m & 1]
        reads = [j for j in range(NC) if (a0 + j) >> m & 1]
        # the final state after a whole last chunk is what a chunk NC would read
        end = dht is not None and r == 0 and bool((a0 + NC) >> m & 1)
        if end:
            reads.append(NC)
        ku, ru = {pair[j] for j in keys}, {pair[j] for j in reads}
        keys = [j for j in keys if pair[j] in ru]
        reads = [j for j in reads if pair[j] in ku]
        if not keys:
            continue
        rank = {u: i for i, u in enumerate(sorted(ku & ru))}
        kseg, rseg = [rank[pair[j]] for j in keys], [rank[pair[j]] for j in reads]
        real = reads[:-1] if reads[-1] == NC else reads
        kI, kS, rS = (torch.tensor(x, device=dev) for x in (keys, kseg, rseg))
        rI = torch.tensor(real, device=dev)
        sigma = _segment_scan(log_total.index_select(2, kI), kseg, True).exp()[..., None, None]
        rho = _segment_scan(log_ext.index_select(2, torch.tensor(reads, device=dev)), rseg,
                            False).exp()[..., None, None]
        wk = local.index_select(2, kI).mul_(sigma)  # sigma_a local_a
        Shat = local.new_zeros(B, H, len(rank), K, V).index_add_(2, kS, wk)
        Sread = Shat.index_select(2, rS).mul_(rho)  # S_m^(j), [B, H, nR, K, V]
        nr = len(real)
        if nr:
            qJ, doJ = qd.index_select(2, rI), doc.index_select(2, rI)  # [B, H, nr, C, *]
            lJ = lam[:, :, m].index_select(2, rI)[..., None]  # [B, H, nr, C, 1]
            X = doJ @ Sread[:, :, :nr].transpose(-1, -2)  # do_i S_m^T
            dl[:, :, m].index_copy_(2, rI, (X * qJ).sum(-1))
            dqd.index_add_(2, rI, X.mul_(lJ))
            G = qJ.transpose(-1, -2) @ doJ.mul_(lJ)  # [B, H, nr, K, V]
        else:
            G = Sread.new_zeros(B, H, 0, K, V)
        if end:
            G = torch.cat([G, dht[:, :, m, None]], 2)
        elif dht is not None and r and real and real[-1] == NC - 1:
            # a partial last chunk: the final level is its read state times its decay
            dn = log_total[:, :, NC - 1].exp()[..., None, None]
            G[:, :, -1].addcmul_(dht[:, :, m], dn)
            dtot[:, :, NC - 1] += (Sread[:, :, -1] * dht[:, :, m]).sum((-1, -2)) * dn[..., 0, 0]
        gamma = (Sread * G).sum((-1, -2))  # [B, H, nR]: log-gradients of rho
        dShat = Shat.new_zeros(B, H, len(rank), K, V).index_add_(2, rS, G.mul_(rho))
        dSk = dShat.index_select(2, kS)
        eta = (wk * dSk).sum((-1, -2))  # log-gradients of sigma
        dlocal.index_add_(2, kI, dSk.mul_(sigma))
        if nr:  # rho_j holds the run's totals before j; sigma_a the block's totals after a
            dtot.index_add_(2, rI, _segment_scan(gamma, rseg, True)[..., :nr])
        dtot.index_add_(2, kI, _segment_scan(eta, kseg, False))
    return dqd, dl.permute(0, 1, 3, 4, 2), dlocal, dtot


def _bitlens(x: Tensor) -> Tensor:
    """bit_length of every element of a non-negative int64 tensor."""
    out = torch.zeros_like(x)
    for b in range(max(int(x.max()), 0).bit_length() if x.numel() else 0):
        out += x >= (1 << b)
    return out


def _group_backward(q, k, v, g, lam, do, h0, dht, t0: int, C: int):
    """Gradients of one group of _group (same shapes, compute dtype, do already times scale):
    (dq, dk, dv, dg, dlam) [B, n, H, *] per value head and dh0 [B, H, L, K, V] (or None).
    dht [B, H, L, K, V] or None (then the final state is not differentiated)."""
    B, n, H, K = q.shape
    V, L = v.shape[-1], lam.shape[-1]
    dev, dt = q.device, q.dtype
    t_end = t0 + n
    c = C.bit_length() - 1
    M = max(L - (c + 1), 0)
    dh0 = None if h0 is None else torch.zeros_like(h0)
    if n == 0:
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        dg, dlam = torch.zeros_like(g), torch.zeros_like(lam)
    else:
        p, NC = _chunk_grid(t0, n, C)
        qc, kc, vc, lc, doc, gc = (_chunked_contiguous(x, p, NC, C)
                                   for x in (q, k, v, lam, do, g))
        # intra: A = QK * W * D (QK the causal q.k, W the level weights, D the pair decays)
        causal, W, D = _intra_factors(lc, gc, L)
        QK = (qc @ kc.transpose(-1, -2)).masked_fill_(~causal, 0)
        E = (doc @ vc.transpose(-1, -2)).mul_(D)  # dA * D (dA = do v^T)
        Z = E * QK  # gradient w.r.t. W
        dQK = E.mul_(W)  # zero above the diagonal (W and D are)
        A = QK.mul_(W).mul_(D)
        dqc, dkc, dvc = dQK @ kc, dQK.transpose(-1, -2) @ qc, A.transpose(-1, -2) @ doc
        dlc = torch.zeros_like(lc)
        nlev = min(c + 1, L)
        dlc[..., :nlev] = _level_sums(Z, nlev)
        # the pair decays' log-gradient dA * A = Z * W reaches g_r for the pairs j < r <= i
        dgc = pair_gate_grad(Z.mul_(W))
        del QK, E, Z, W, D
        r = t_end % C
        if M > 0 or (dht is not None and r):
            # inter: qd = q exp(prefix), kd = k exp(suffix), chunk decay exp(total)
            pre = prefix_sum(gc[..., None], 3)  # [B, H, NC, C, 1]
            eq = pre.exp()
            ek = suffix_sum_exclusive(gc[..., None], 3).exp()
            qd, kd = qc * eq, kc * ek
            dqd, dlocal, from_total = torch.zeros_like(qd), None, None
            if M > 0:
                local = kd.transpose(-1, -2) @ vc  # [B, H, NC, K, V]
                dqd, dl_inter, dlocal, from_total = _inter_levels(
                    qd, doc, lc[..., c + 1:], local, pre[:, :, :, -1, 0], (t0 - p) // C,
                    None if dht is None else dht[:, :, c + 1:], r)
                dlc[..., c + 1:] = dl_inter
            dkd = vc @ dlocal.transpose(-1, -2) if dlocal is not None else torch.zeros_like(kd)
            if dlocal is not None:
                dvc = dvc + kd @ dlocal
            if dht is not None and r:  # the last chunk's tokens j < r, at low levels of t_end
                levs = torch.tensor([min(_bitlen(jj ^ r), L) if jj < r else L
                                     for jj in range(C)], device=dev)
                onehot = torch.nn.functional.one_hot(levs, L + 1)[:, :L].to(dt)[..., None]
                # v_j dht_l^T and kd_j dht_l for every level l at once, then token j's level
                dkd[:, :, -1] += ((vc[:, :, -1] @ dht.reshape(B, H, L * K, V).transpose(-1, -2))
                                  .view(B, H, C, L, K) * onehot).sum(-2)
                dht_kv = dht.transpose(2, 3).reshape(B, H, K, L * V)
                dvc[:, :, -1] += ((kd[:, :, -1] @ dht_kv).view(B, H, C, L, V) * onehot).sum(-2)
            dqc = dqc + dqd * eq
            dkc = dkc + dkd * ek
            # prefix_i reaches g_r for r <= i, the suffix of s for r > s (within the chunk)
            dgc = dgc + suffix_sum((qd * dqd).sum(-1), 3) + \
                prefix_sum_exclusive((kd * dkd).sum(-1), 3)
            if from_total is not None:
                dgc = dgc + from_total[..., None]
        dq, dk, dv = _unchunk(dqc, p, n), _unchunk(dkc, p, n), _unchunk(dvc, p, n)
        dg, dlam = _unchunk(dgc, p, n), _unchunk(dlc, p, n)
    if h0 is not None:
        reps = _h0_reps(t0, L)
        # only the slots that exist at t0 (bit l-1 set) and that some query reads (level < L)
        # carry anything: the others weigh 0 for every query
        # the slots read at all: they exist at t0 and the first query has them below level L
        # (a key's level only grows with the query position)
        slots = [l for l in range(L) if reps[l] >= 0 and n > 0 and _bitlen(reps[l] ^ t0) < L]
        if slots:  # o_t += sum_l lambda_t[lev0(t, l)] exp(sum_{t0<=r<=t} g_r) q_t h0_l
            P = len(slots)
            sl = torch.tensor(slots, device=dev)
            lev0 = _bitlens(torch.tensor([reps[l] for l in slots], device=dev)[None, :] ^
                            torch.arange(t0, t_end, device=dev)[:, None]).clamp_(max=L)  # [n, P]
            idx = lev0[None, :, None, :].expand(B, n, H, P)
            lam_pad = torch.cat([lam, lam.new_zeros(B, n, H, 1)], -1)
            Et = prefix_sum(g, 1).exp()  # [B, n, H]
            W0 = lam_pad.gather(-1, idx) * Et[..., None]  # [B, n, H, P]
            h0s = h0.index_select(2, sl)  # [B, H, P, K, V]
            h0kv = h0s.permute(0, 1, 3, 2, 4).reshape(B, H, K, P * V)  # [B, H, K, (P V)]
            qt, dot = q.transpose(1, 2), do.transpose(1, 2)  # [B, H, n, *]
            qh = (qt @ h0kv).view(B, H, n, P, V)  # q_t h0_l
            R = (qh * dot[:, :, :, None, :]).sum(-1).transpose(1, 2)  # [B, n, H, P]
            dl_pad = torch.zeros_like(lam_pad).scatter_add_(-1, idx, Et[..., None] * R)
            dlam = dlam + dl_pad[..., :L]
            dg = dg + suffix_sum((W0 * R).sum(-1), 1)
            Wdo = W0.transpose(1, 2)[..., None] * dot[:, :, :, None, :]  # [B, H, n, P, V]
            dq = dq + (Wdo.reshape(B, H, n, P * V) @ h0kv.transpose(-1, -2)).transpose(1, 2)
            Wq = W0.permute(0, 2, 3, 1)[..., None] * qt[:, :, None]  # [B, H, P, n, K]
            dh0.index_add_(2, sl, Wq.transpose(-1, -2) @ dot[:, :, None])
        if dht is not None:  # slot l of h0 ends at slot end[l] of the final state
            end = _levels_of(reps, [t_end], L)[0]
            onehot = torch.nn.functional.one_hot(torch.tensor(end, device=dev), L + 1)[:, :L]
            dht_at = torch.einsum("lm,bhmkv->bhlkv", onehot.to(dt), dht)
            total = g.sum(1).exp() if n > 0 else torch.ones(B, H, dtype=dt, device=dev)
            dh0 = dh0 + total[..., None, None, None] * dht_at
            if n > 0:
                dg = dg + (total * (h0 * dht_at).sum((2, 3, 4)))[:, None, :]
    return dq, dk, dv, dg, dlam, dh0


def backward(q: Tensor, k: Tensor, v: Tensor, g: Tensor, level_scales: Tensor, scale: float,
             h0: Optional[Tensor], offsets: Optional[Tensor], cu_seqlens: Optional[Tensor],
             do: Tensor, dht: Optional[Tensor], chunk_size: int = TORCH_CHUNK):
    """Gradients of forward() for (o, final ht) given (do, dht) (dht None: the final state is
    not differentiated): returns (dq, dk, dv, dg, dlevel_scales, dh0), each in its input's
    dtype and shape (dq, dk summed over the value heads sharing a key head), dh0 None when h0
    is. Same groups and chunks as forward(); reads cu_seqlens and offsets on the host.

    Per chunk, with do' = scale do: intra, dA = do' v^T and A = (q.k) W D give dq, dk from
    dA W D, dv = A^T do', dlambda from the per-level row sums of dA (q.k) D and the gate's
    share from the pair log-gradients dA A (pair_gate_grad). Inter (_inter_levels), per chunk
    level m: the states S_m each chunk reads (the block of chunks before its run, decayed),
    giving dq and dlambda[c+1+m] (do' . qd S_m); each run's qd^T (lambda[c+1+m] do'), decayed
    back to its block, gives that block's chunks' own-state gradient (dk, dv); the final
    levels' dht enter as one more read. The gates' gradient is summed only over the terms
    whose decay holds each gate: the pairs straddling it, the chunk prefixes and suffixes
    holding it, the chunk totals inside a run or block, and the initial state's prefixes and
    total. O(T C (K + V) + T L K V); nothing T x T."""
    B, T, G, K = q.shape
    H, V, L = v.shape[2], v.shape[-1], level_scales.shape[-1]
    dt, qx, kx, vx, gx, lx = _compute_inputs(q, k, v, g, level_scales)
    dox = do.to(dt) * scale
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    offs = [0] * N if offsets is None else [int(x) for x in offsets.reshape(-1).tolist()]
    h0x = None if h0 is None else h0.to(dt)
    dhtx = None if dht is None else dht.to(dt)
    segs = [(ids, span) for ids, span in _segments(B, N, offs, cu_seqlens) if ids]
    dh0 = None if h0x is None else torch.zeros_like(h0x)
    outs = None
    for ids, span in segs:
        t0 = offs[ids[0]]
        xs = (qx, kx, vx, gx, lx, dox)
        args = xs if len(segs) == 1 and span is None else _group_inputs(xs, ids, span)
        hg = None if h0x is None else h0x[ids]
        dhg = None if dhtx is None else dhtx[ids]
        C = _group_chunk(chunk_size, t0, args[0].shape[1])
        grads = _group_backward(*args, hg, dhg, t0, C)
        if dh0 is not None:
            dh0[ids] = grads[5]
        if len(segs) == 1 and (span is None or span == (0, T)):
            outs = grads[:5]  # one group: its gradients are the whole ones
            break
        if outs is None:  # each row (dense) or token span (varlen) lies in exactly one group
            outs = [x.new_zeros(shape) for x, shape in
                    zip(grads, ((B, T, H, K), (B, T, H, K), vx.shape, gx.shape, lx.shape))]
        if span is None:
            sel = torch.tensor(ids, device=q.device)
            for out, x in zip(outs, grads):
                out.index_copy_(0, sel, x)
        else:
            for out, x in zip(outs, grads):
                out[:, span[0]:span[1]] = x
    if outs is None:  # no group (no rows): nothing flows
        outs = [x.new_zeros(shape) for x, shape in
                zip((qx, kx, vx, gx, lx), ((B, T, H, K), (B, T, H, K), vx.shape, gx.shape,
                                           lx.shape))]
    dq, dk, dv, dg, dl = outs
    rep = H // G
    if rep > 1:
        dq, dk = dq.unflatten(2, (G, rep)).sum(3), dk.unflatten(2, (G, rep)).sum(3)
    return (_dense(dq, q.dtype), _dense(dk, k.dtype), _dense(dv, v.dtype), _dense(dg, g.dtype),
            _dense(dl, level_scales.dtype), None if h0 is None else _dense(dh0, h0.dtype))


def _dense(x: Tensor, dtype: torch.dtype) -> Tensor:
    """x in dtype, contiguous (a group's gradients are strided views of its chunk layout)."""
    return x.to(dtype, memory_format=torch.contiguous_format)

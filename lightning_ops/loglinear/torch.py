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

Every decay is exp of a sum of gates over exactly its own tokens (chunk.torch's segment_sums, prefix
and suffix sums): exponents <= 0 and a gate of -inf is an exact reset. An initial state
(ht [N, H, L, K, V], offsets [N]) enters as its own term: slot l (bucket l of query t0) holds
keys whose level for query t is bit_length(rep_l xor t), rep_l = ((t0 >> (l-1)) << (l-1)) - 1.

Backward: torch autograd through this forward (the DESIGN's allowance for the torch backend).
The chunk loop runs in Python (one step per chunk, O(log) small matmuls each).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from ..chunk.constants import TORCH_CHUNK
from ..chunk.torch import prefix_sum, segment_sums, suffix_sum_exclusive
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
        p = t0 % C
        NC = -(-(p + n) // C)
        pad = (p, NC * C - p - n)

        def chunked(x):  # [B, n, H, *] -> [B, H, NC, C, *]
            x = x.movedim(1, -1)  # [B, H, *, n]
            x = torch.nn.functional.pad(x, pad)
            x = x.reshape(*x.shape[:-1], NC, C).movedim(-2, 2).movedim(-1, 3)
            return x

        qc, kc, vc, lc = chunked(q), chunked(k), chunked(v), chunked(lam)
        gc = chunked(g)  # [B, H, NC, C]
        # intra-chunk: masked, decayed, level-weighted scores
        lev, causal = _intra_levels(C, L, dev)
        lam_pad = torch.cat([lc, lc.new_zeros(*lc.shape[:-1], 1)], -1)
        W = lam_pad.gather(-1, lev.expand(B, H, NC, C, C))
        D = segment_sums(gc).exp()
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
        o = oc.reshape(B, H, NC * C, V)[:, :, p:p + n].transpose(1, 2)
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
        reps = [((t0 >> (l - 1)) << (l - 1)) - 1 if l and (t0 >> (l - 1)) & 1 else -1
                for l in range(L)]
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


def forward(q: Tensor, k: Tensor, v: Tensor, g: Tensor, level_scales: Tensor, scale: float,
            h0: Optional[Tensor], offsets: Optional[Tensor], output_final_state: bool,
            cu_seqlens: Optional[Tensor], chunk_size: int = TORCH_CHUNK):
    """q/k [B, T, G, K], v [B, T, H, V], g [B, T, H], level_scales [B, T, H, L]; h0 [N, H, L, K,
    V] with offsets [N] (or None). Returns o [B, T, H, V] (v's dtype) and (ht, offsets) or None.
    Differentiable by autograd. Reads cu_seqlens and offsets on the host."""
    B, T, G, K = q.shape
    H, V, L = v.shape[2], v.shape[-1], level_scales.shape[-1]
    dt = accumulation_dtype(q)
    rep = H // G
    qx = q.to(dt).repeat_interleave(rep, 2) if rep > 1 else q.to(dt)
    kx = k.to(dt).repeat_interleave(rep, 2) if rep > 1 else k.to(dt)
    vx, gx, lx = v.to(dt), g.to(dt), level_scales.to(dt)
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    offs = [0] * N if offsets is None else [int(x) for x in offsets.reshape(-1).tolist()]
    h0x = None if h0 is None else h0.to(dt)
    if cu_seqlens is None:
        segs = [(list(range(B)), None) for _ in [0]] if len(set(offs)) <= 1 else \
            [([b for b in range(B) if offs[b] == o0], None) for o0 in sorted(set(offs))]
    else:
        bounds = cu_seqlens.tolist()
        segs = [([n], (bounds[n], bounds[n + 1])) for n in range(N)]
    hts = [None] * N
    pieces = []
    for ids, span in segs:
        if not ids:
            continue
        t0 = offs[ids[0]]
        if span is None:
            sel = torch.tensor(ids, device=q.device)
            args = [x.index_select(0, sel) for x in (qx, kx, vx, gx, lx)]
        else:
            args = [x[:, span[0]:span[1]] for x in (qx, kx, vx, gx, lx)]
        hg = None if h0x is None else h0x[ids]
        C = min(chunk_size, 1 << max(0, (t0 % chunk_size + args[0].shape[1] - 1).bit_length()))
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

"""The chunked PyTorch engine: the CPU default of every family and the executable spec of the
Triton kernels. It is the GLA family's torch backend as is (`forward` / `backward` below); the
delta-rule, SSD, log-linear and LION code build on its pieces.

One engine serves every gate kind of `S_t = decay_t * S_{t-1} + k_t v_t^T, o_t = scale S_t^T q_t`
(kinds: chunk/constants.py):

  kind         decay_t            gate tensor in the engine
  NO_GATE      1                  None
  SCALAR_GATE  exp(g_t [+ gamma]) g [NC, H, C]      (data-dependent g and/or constant g_gamma)
  VECTOR_GATE  diag(exp(g_t))     g [NC, H, C, K]

Tokens are regrouped into a *chunk stream* of C-token chunks ([NC, H, C, *], see ChunkLayout).
Inside a chunk, with the per-token log decays g_s <= 0:

  intra   A_ij = sum_k q_ik k_jk exp(sum_{j<s<=i} g_sk)  (j <= i)      o  = A v
  inter   o += (q * exp(sum_{s<=t} g)) @ H_n                         (H_n: state before chunk n)
  state   H_{n+1} = exp(sum_chunk g) * H_n + (k * exp(sum_{s>t} g))^T v

Every decay is exp of a sum of gates over exactly its own tokens, accumulated directly (prefix,
suffix and segment sums; see "Gates"), never as a difference of two cumulative sums: exponents are
<= 0, a reset gate of -inf gives decay 0 exactly, and the accuracy of a decay does not depend on
the size of any other gate. For vector gates, A is built from secondary sub-chunks: each chunk is
halved recursively down to c tokens; the off-diagonal (lower-left) quadrant of every block is one
plain matmul of q_i * exp(sum_{m<=s<=i} g) and k_j * exp(sum_{j<s<m} g) (m the block's middle,
both factors <= 1), and only the c x c diagonal blocks pay the element-wise [c, c, K] cost.
Nothing T x T is ever formed, and the forward and backward walk the stream a group of chunks
at a time (GROUP_BYTES, "Chunk groups" below): the chunk-stream intermediates ([n, H, C, K],
[n, H, C, C], per-chunk states [n, H, K, V]) exist for one group of n chunks, not for all NC, so
forward memory is the output plus one group's work whatever T; only the backward keeps the
states before every chunk between its two passes (and the delta rule its WY pieces).

Varlen (cu_seqlens) reads the segment lengths on the host to build the chunk layout: a device
sync on GPU, acceptable for this path (the Triton backend builds its indices on the device).
mode "recurrent" (decode, short T) runs the same engine: with chunks no longer than the sequence
(C = 1 at T = 1, which is exactly the token step) it measured as fast as or faster than a literal
token loop for every T in 1..64 on CPU, and gives the same result. Non-finite inputs go through
lightning_ops.nonfinite.NonFiniteGuard (causality: tokens before a bad one stay exact).

Backward is hand-written (recomputing the cheap forward pieces): the same intra/inter split run
in reverse. The gate gradient sums, for every g_s, only the terms whose decay contains g_s
(gate_grad, pair_gate_grad): no large terms added and cancelled, so it is accurate relative to
its own size at strong decays.

Reusable API (for the delta-rule, SSD, log-linear and LION code):
  ChunkLayout.build(B, T, cu_seqlens, chunk_size, device)   where tokens live in the chunk stream
  layout.pack(x, dtype) / layout.unpack(y, dtype)             [B,T,H,*] <-> [NC,H,C,*]
  layout.groups(n) / pack(x, dtype, grp) / unpack_into(out, y, grp)   the same, a group at a time
  gate_factors(g)                          exp(sum_{s<=t} g), exp(sum_{s>t} g), exp(sum_chunk g)
  segment_sums(g)                          the log causal decay mask, [.., C, C]
  causal_decays(g) / causal_decay_mask(g, C, like)   its exp (the decay mask), 0 above the diagonal
  gate_grad / pair_gate_grad               gate gradients from the decays' log-gradients
  causal_scores(x, y, M)                   (x y^T) * M, exact zeros above the diagonal
  intra_chunk_scores(q, k, g) -> A                            decayed causal scores per chunk
  intra_chunk_scores_backward(dA, q, k, g) -> (dq, dk, A, dg)
  scan_chunks(layout, h0, step) / scan_chunks_reverse(layout, dht, step)   generic state loops
  scan_group / scan_group_reverse           the same over one group, resumable
  state_passing(layout, h0, chunk_decay, local_states)        GLA inter-chunk recurrence
  state_passing_backward(layout, chunk_decay, q_states, dht)
  chunk_output(q_inter, states, A, v)                         o = q_inter @ H + A @ v
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch

from ..nonfinite import NonFiniteGuard
from ..precision import accumulation_dtype
from .constants import (GROUP_BYTES, SCALAR_GATE, TORCH_CHUNK, TORCH_SUB_CHUNK, VECTOR_GATE,
                        gate_kind)

Tensor = torch.Tensor


# ------------------------------------------------------------------------------------------------
# Layout: where every token lives in the chunk stream
# ------------------------------------------------------------------------------------------------
@dataclass
class ChunkLayout:
    """Sequences cut into chunks of C tokens, laid out *step-major*: all sequences' chunk 0, then
    all chunk 1, ... Sequences are ordered by chunk count (descending), so the sequences still
    running at step j are a prefix 0..n_j-1 and step j's chunks a contiguous slice of the stream:
    the state loops touch only slices. The last chunk of a sequence is zero-padded.

    Fields: C; N sequences; NC chunks; steps [(base_j, n_j)]; valid [NC, 1, C] (1 for real
    tokens, 0 for padding). Varlen only (None when dense): order [N] (stream rank -> sequence),
    inv_order (sequence -> rank), chunk_of / slot_of [T] (each token's chunk and slot)."""
    C: int
    N: int
    NC: int
    B: int
    T: int
    steps: List[Tuple[int, int]]
    valid: Tensor
    dense: bool  # no cu_seqlens: B rows of T tokens, chunk (j, b) at stream index j*B + b
    order: Optional[Tensor] = None
    inv_order: Optional[Tensor] = None
    chunk_of: Optional[Tensor] = None
    slot_of: Optional[Tensor] = None
    # varlen, for packing a range of chunks: the tokens in stream order, their chunks and
    # slots, and (host ints) how many real tokens come before each chunk of the stream
    tokens: Optional[Tensor] = None
    token_chunk: Optional[Tensor] = None
    token_slot: Optional[Tensor] = None
    token_start: Optional[List[int]] = None

    @staticmethod
    def build(B: int, T: int, cu_seqlens: Optional[Tensor], chunk_size: int,
              device) -> "ChunkLayout":
        """Without cu_seqlens the B rows are N=B sequences of length T; with it (B == 1) the
        sequences are cu_seqlens' segments. Reads cu_seqlens on the host (a device sync on GPU):
        acceptable for this reference-grade torch path; the Triton path builds indices on device."""
        if cu_seqlens is None:
            return _dense_layout(B, T, chunk_size, torch.device(device))
        return _varlen_layout(cu_seqlens.to("cpu", torch.int64), T, chunk_size, device)

    def groups(self, chunks: int) -> List["ChunkGroup"]:
        """The steps cut into consecutive groups of at most `chunks` chunks (one step at least):
        the loops that walk the stream a group at a time keep only one group's intermediates."""
        out, j, J = [], 0, len(self.steps)
        while j < J:
            base, e = self.steps[j][0], j + 1
            while e < J and self.steps[e][0] + self.steps[e][1] - base <= chunks:
                e += 1
            out.append(ChunkGroup(j, e, base, self.steps[e - 1][0] + self.steps[e - 1][1]))
            j = e
        return out

    def whole(self) -> "ChunkGroup":
        """The whole stream as one group."""
        return ChunkGroup(0, len(self.steps), 0, self.NC)

    def pack(self, x: Tensor, dtype: torch.dtype, grp: Optional["ChunkGroup"] = None) -> Tensor:
        """[B, T, H, *] -> [NC, H, C, *] in `dtype`, zero in padding slots; with `grp` only that
        group's chunks, [grp.s1 - grp.s0, H, C, *]."""
        rest = x.shape[2:]
        grp = grp or self.whole()
        out = torch.empty(grp.s1 - grp.s0, rest[0], self.C, *rest[1:], dtype=dtype,
                          device=x.device)
        if self.dense:  # chunk (j, b) is rows [j*C, (j+1)*C) of batch row b: strided copies
            B, C = self.B, self.C
            t0, t1 = grp.j0 * C, min(grp.j1 * C, self.T)
            full = (t1 - t0) // C
            view = out.view(-1, B, *out.shape[1:]).transpose(2, 3).transpose(0, 1)  # [B,n,C,H,*]
            view[:, :full] = x[:, t0:t0 + full * C].view(B, full, C, *rest)
            if full < view.shape[1]:  # the ragged last chunk
                view[:, full].zero_()
                view[:, full, :t1 - t0 - full * C] = x[:, t0 + full * C:t1]
            return out
        out.zero_()
        flat = x.reshape(self.B * self.T, *rest)
        if grp.s0 == 0 and grp.s1 == self.NC:
            out.transpose(1, 2)[self.chunk_of, self.slot_of] = flat.to(dtype)
            return out
        a, b = self.token_start[grp.s0], self.token_start[grp.s1]
        out.transpose(1, 2)[self.token_chunk[a:b] - grp.s0, self.token_slot[a:b]] = \
            flat[self.tokens[a:b]].to(dtype)
        return out

    def unpack(self, y: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
        """[NC, H, C, *] -> [B, T, H, *] in `dtype` (default y's), dropping the padding."""
        rest = (y.shape[1],) + y.shape[3:]
        if self.dense:
            out = torch.empty(self.B, self.T, *rest, dtype=dtype or y.dtype, device=y.device)
            self.unpack_into(out, y, self.whole())
            return out
        flat = y.transpose(1, 2)[self.chunk_of, self.slot_of]
        return flat.reshape(self.B, self.T, *rest).to(dtype or y.dtype)

    def unpack_into(self, out: Tensor, y: Tensor, grp: "ChunkGroup") -> None:
        """Write the tokens of group `grp` ([grp.s1 - grp.s0, H, C, *]) into their places in
        out [B, T, H, *] (converted to out's dtype), dropping the padding."""
        rest = (y.shape[1],) + y.shape[3:]
        if self.dense:
            B, C = self.B, self.C
            t0, t1 = grp.j0 * C, min(grp.j1 * C, self.T)
            full = (t1 - t0) // C
            view = y.view(-1, B, *y.shape[1:]).transpose(2, 3).transpose(0, 1)  # [B,n,C,H,*]
            out[:, t0:t0 + full * C].view(B, full, C, *rest).copy_(view[:, :full])
            if full < view.shape[1]:
                out[:, t0 + full * C:t1] = view[:, full, :t1 - t0 - full * C]
            return
        a, b = self.token_start[grp.s0], self.token_start[grp.s1]
        flat = y.transpose(1, 2)[self.token_chunk[a:b] - grp.s0, self.token_slot[a:b]]
        out.view(self.B * self.T, *rest)[self.tokens[a:b]] = flat.to(out.dtype)

    def to_stream_order(self, states: Tensor) -> Tensor:
        """Per-sequence tensor [N, ...] in sequence order -> stream (rank) order."""
        return states if self.order is None else states[self.order]

    def to_sequence_order(self, states: Tensor) -> Tensor:
        return states if self.inv_order is None else states[self.inv_order]


@dataclass(frozen=True)
class ChunkGroup:
    """Steps j0..j1-1 of a ChunkLayout: the stream slice s0..s1-1 (see ChunkLayout.groups)."""
    j0: int
    j1: int
    s0: int
    s1: int


@functools.lru_cache(maxsize=32)
def _dense_layout(B: int, T: int, C: int, device: torch.device) -> ChunkLayout:
    """B rows of T tokens: every sequence has ceil(T / C) chunks, the identity order."""
    NT = -(-T // C)
    valid = (torch.arange(NT)[:, None] * C + torch.arange(C) < T).repeat_interleave(B, 0)
    return ChunkLayout(C=C, N=B, NC=NT * B, B=B, T=T, steps=[(j * B, B) for j in range(NT)],
                       valid=valid[:, None, :].to(device), dense=True)


def _varlen_layout(cu: Tensor, T: int, C: int, device) -> ChunkLayout:
    """Packed segments cu[n]:cu[n+1] of one row (cu on the host)."""
    starts, lengths = cu[:-1], cu[1:] - cu[:-1]
    N = lengths.numel()
    n_chunks = (lengths + C - 1) // C
    order = torch.argsort(-n_chunks, stable=True)
    inv_order = torch.empty_like(order)
    inv_order[order] = torch.arange(N)
    J = int(n_chunks.max())
    # n_j = number of sequences with more than j chunks (a prefix in stream order)
    n_per_step = (n_chunks[None, :] > torch.arange(J)[:, None]).sum(1)
    bases = torch.cumsum(n_per_step, 0) - n_per_step
    NC = int(n_per_step.sum())
    step_of_chunk = torch.repeat_interleave(torch.arange(J), n_per_step)
    seq_of_chunk = order[torch.arange(NC) - bases[step_of_chunk]]
    first_token = starts[seq_of_chunk] + step_of_chunk * C
    n_valid = (lengths[seq_of_chunk] - step_of_chunk * C).clamp(max=C)
    slots = torch.arange(C)
    valid = slots[None, :] < n_valid[:, None]  # [NC, C]
    tokens = (first_token[:, None] + slots)[valid]  # packed token index, in stream order
    pos = torch.nonzero(valid.reshape(-1)).squeeze(1)  # its stream position
    chunk_of = torch.empty(T, dtype=torch.int64)
    slot_of = torch.empty(T, dtype=torch.int64)
    chunk_of[tokens], slot_of[tokens] = pos // C, pos % C
    token_start = [0] + torch.cumsum(valid.sum(1), 0).tolist()
    return ChunkLayout(
        C=C, N=N, NC=NC, B=1, T=T, steps=list(zip(bases.tolist(), n_per_step.tolist())),
        valid=valid[:, None, :].to(device), dense=False,
        order=order.to(device), inv_order=inv_order.to(device),
        chunk_of=chunk_of.to(device), slot_of=slot_of.to(device),
        tokens=tokens.to(device), token_chunk=(pos // C).to(device),
        token_slot=(pos % C).to(device), token_start=token_start)


# ------------------------------------------------------------------------------------------------
# Gates
#
# Every decay the engine uses is exp of a sum of consecutive per-token log decays g_s <= 0, and
# every such sum is accumulated directly over its own tokens: prefix sums (s <= t), suffix sums
# (s > t) and segment sums (j < s <= i). No decay is formed as the difference of two cumulative
# sums, so a reset gate (g = -inf) gives decay exactly 0 instead of NaN (-inf - -inf), and one
# huge negative gate cannot swamp the small gates after it by cancellation.
# ------------------------------------------------------------------------------------------------
def prefix_sum(x: Tensor, dim: int = 2) -> Tensor:
    """sum_{s <= t} x_s along dim."""
    return x.cumsum(dim)


def suffix_sum(x: Tensor, dim: int = 2) -> Tensor:
    """sum_{s >= t} x_s along dim (summed from the end, never total minus prefix)."""
    return x.flip(dim).cumsum(dim).flip(dim)


def _shift(x: Tensor, dim: int, forward: bool) -> Tensor:
    """x moved one step along dim (towards higher indices if forward), a zero filling the gap."""
    n = x.shape[dim]
    zero = torch.zeros_like(x.narrow(dim, 0, min(n, 1)))
    if forward:
        return torch.cat([zero, x.narrow(dim, 0, n - 1)], dim) if n else x
    return torch.cat([x.narrow(dim, 1, n - 1), zero], dim) if n else x


def prefix_sum_exclusive(x: Tensor, dim: int = 2) -> Tensor:
    """sum_{s < t} x_s along dim."""
    return _shift(x.cumsum(dim), dim, forward=True)


def suffix_sum_exclusive(x: Tensor, dim: int = 2) -> Tensor:
    """sum_{s > t} x_s along dim."""
    return _shift(suffix_sum(x, dim), dim, forward=False)


def gate_factors(g: Optional[Tensor]):
    """(q_decay, k_decay, chunk_decay) = exp(sum_{s<=t} g), exp(sum_{s>t} g), exp(sum_chunk g),
    all <= 1, from the per-token gates g of each chunk ([NC, H, C] scalar, [NC, H, C, K] vector;
    zero in padding slots). Shapes broadcast against [NC, H, C, K] / [NC, H, K, V]: scalar gates
    give [NC, H, C, 1] and [NC, H, 1, 1], vector gates [NC, H, C, K] and [NC, H, K, 1]."""
    if g is None:
        return None, None, None
    gk = g[..., None] if g.dim() == 3 else g  # [NC, H, C, 1 | K]
    b = prefix_sum(gk)
    return b.exp(), suffix_sum_exclusive(gk).exp(), b[:, :, -1:, :].transpose(-1, -2).exp()


_STRICT_LOWER: dict = {}


def _strict_lower(C: int, device: torch.device) -> Tensor:
    """[C, C] bool, s > j (cached: built once per size and device)."""
    key = (C, device)
    if key not in _STRICT_LOWER:
        _STRICT_LOWER[key] = torch.ones(C, C, dtype=torch.bool, device=device).tril(-1)
    return _STRICT_LOWER[key]


def segment_sums(g: Tensor) -> Tensor:
    """S_ij = sum_{j < s <= i} g_s for j <= i, -inf above the diagonal: [.., C, C] from g [.., C].
    Accumulated column by column over i (never b_i - b_j), so -inf gates and huge gates are
    exact; exp(S) is the causal decay mask."""
    C = g.shape[-1]
    seg = torch.where(_strict_lower(C, g.device), g[..., :, None], 0).cumsum(-2)
    return seg.masked_fill(_strict_lower(C, g.device).T, float("-inf"))


def causal_decays(g: Tensor) -> Tensor:
    """exp(segment_sums(g)): M_ij = exp(sum_{j < s <= i} g_s) for j <= i, exact 0 above the
    diagonal, [.., C, C] from g [.., C]. The same column-wise sums; the upper triangle (sums of
    nothing) is zeroed after the exp by selection, which costs less than filling it with -inf."""
    C = g.shape[-1]
    M = torch.where(_strict_lower(C, g.device), g[..., :, None], 0).cumsum_(-2).exp_()
    return M.tril() if M.requires_grad else M.tril_()  # under autograd exp_'s saved output stays


def mul_if(x: Tensor, factor: Optional[Tensor]) -> Tensor:
    """x * factor, or x when there is no factor (no gate)."""
    return x if factor is None else x * factor


def gate_grad(through_prefix: Optional[Tensor], through_suffix: Optional[Tensor],
              through_total: Optional[Tensor], intra: Optional[Tensor]) -> Tensor:
    """d g_s of a chunk from the gradients w.r.t. the logs of the decays it enters, each summed
    only over the terms that really contain g_s (no add-then-cancel, so gradients at strong decay
    stay accurate relative to their own size):
      through_prefix_t  (log of exp(sum_{s<=t} g))  reaches g_s for s <= t
      through_suffix_t  (log of exp(sum_{s>t} g))   reaches g_s for s > t
      through_total     (log of exp(sum_chunk g))   reaches every g_s  ([NC, H] or [NC, H, K])
      intra             the intra-chunk pair terms, already per g_s.
    Tensors are [NC, H, C] (scalar) or [NC, H, C, K] (vector)."""
    dg = intra
    for part in (None if through_prefix is None else suffix_sum(through_prefix),
                 None if through_suffix is None else prefix_sum_exclusive(through_suffix),
                 None if through_total is None else through_total.unsqueeze(2)):
        if part is not None:
            dg = part if dg is None else dg + part
    return dg


def pair_gate_grad(P: Tensor) -> Tensor:
    """Scalar gates: d g_s = sum over pairs i >= s > j of P_ij, where P = dA * A [.., C, C] are
    the gradients w.r.t. the log pair decays sum_{j<s<=i} g_s. Only pairs that straddle s are
    summed: prefix sums over j, then suffix sums over i, read on the sub-diagonal."""
    R = suffix_sum(P.cumsum(-1), -2)  # R[i, s-1] summed over i' >= i: pairs (i' >= i, j <= s-1)
    sub = R.diagonal(-1, -2, -1)  # [.., C-1]: s = 1..C-1
    return torch.cat([torch.zeros_like(R[..., :1, 0]), sub], -1)  # s = 0 straddles no pair


# ------------------------------------------------------------------------------------------------
# Intra-chunk scores
# ------------------------------------------------------------------------------------------------
def causal_decay_mask(g: Optional[Tensor], C: int, like: Tensor) -> Tensor:
    """M_ij = exp(sum_{j<s<=i} g_s) for j <= i, else 0: [NC, H, C, C] (scalar gates), or the 0/1
    causal mask [C, C] without a gate."""
    if g is None:
        return torch.ones(C, C, dtype=like.dtype, device=like.device).tril()
    return causal_decays(g)


def causal_scores(x: Tensor, y: Tensor, M: Tensor) -> Tensor:
    """(x @ y^T) * M with exact zeros above the diagonal: masked by selection, not by multiplying
    with 0, so a non-finite y_j never reaches rows i < j."""
    return (x @ y.transpose(-1, -2)).tril_().mul_(M)


def _halves(x: Tensor, size: int) -> Tensor:
    """[NC, H, C, *] -> view [NC, H, C/size, 2, size/2, *]: the two halves of every size-block."""
    return x.view(*x.shape[:2], x.shape[2] // size, 2, size // 2, *x.shape[3:])


def _lower_quadrants(A: Tensor, size: int) -> Tensor:
    """View [NC, H, C/size, size/2, size/2] of the lower-left quadrant (rows of the second
    half, columns of the first) of every diagonal size x size block of A [NC, H, C, C]."""
    *lead, C, _ = A.shape
    nb, h = C // size, size // 2
    v = A.view(*lead, nb, 2, h, nb, 2, h).diagonal(dim1=-6, dim2=-3)  # [.., 2, h, 2, h, nb]
    return v[..., 1, :, 0, :, :].movedim(-1, -3)


def _diag_blocks(x: Tensor, c: int) -> Tensor:
    """[..., C, C] -> view [..., C/c, c, c] of its diagonal c x c blocks."""
    *lead, C, _ = x.shape
    ns = C // c
    return x.view(*lead, ns, c, ns, c).diagonal(dim1=-4, dim2=-2).movedim(-1, -3)


def _sub_blocks(x: Tensor, c: int) -> Tensor:
    """[NC, H, C, K] -> view [NC, H, C/c, c, K]."""
    return x.view(*x.shape[:2], x.shape[2] // c, c, x.shape[3])


def _quadrant_factors(q: Tensor, k: Tensor, g: Tensor, size: int):
    """For every size-block, its second half's queries (tokens m..) against its first half's
    keys: q_i * exp(sum_{m<=s<=i} g) and k_j * exp(sum_{j<s<m} g), whose product carries
    exp(sum_{j<s<=i} g) and where each factor is <= 1 and summed over its own half only.
    Returns (q factor, k factor, q scaled, k scaled), each [NC, H, C/size, size/2, K]."""
    qh, kh, gh = _halves(q, size), _halves(k, size), _halves(g, size)
    eq = prefix_sum(gh[..., 1, :, :], -2).exp()
    ek = suffix_sum_exclusive(gh[..., 0, :, :], -2).exp()
    return eq, ek, qh[..., 1, :, :] * eq, kh[..., 0, :, :] * ek


def _diag_size(C: int, sub_chunk: Optional[int]) -> int:
    return min(sub_chunk or TORCH_SUB_CHUNK, C)


def _sub_diagonal_logs(gb: Tensor, c: int):
    """Yield (d, sum_{j<s<=j+d} g_s) for d = 1..c-1 over the sub-blocks gb [.., c, K]: the log
    decays of sub-diagonal d, each [.., c-d, K], built by adding one gate per step."""
    seg = None
    for d in range(1, c):
        seg = gb[..., d:, :] if seg is None else seg[..., :c - d, :] + gb[..., d:, :]
        yield d, seg


def intra_chunk_scores(q: Tensor, k: Tensor, g: Optional[Tensor],
                       sub_chunk: Optional[int] = None) -> Tensor:
    """A [NC, H, C, C]: A_ij = sum_k q_ik k_jk exp(sum_{j<s<=i} g_sk) for j <= i (0 above the
    diagonal). q, k [NC, H, C, K]; g None, [NC, H, C] or [NC, H, C, K] (per-token gates).

    Vector gates: the chunk is halved recursively down to sub-chunks of c = sub_chunk tokens;
    the lower-left quadrant of every block is one plain matmul of pre-decayed q and k, and only
    the c x c diagonal blocks are built element-wise (one sub-diagonal at a time)."""
    C = q.shape[2]
    if gate_kind(g) != VECTOR_GATE:
        return causal_scores(q, k, causal_decay_mask(g, C, q))
    q, k, g = q.contiguous(), k.contiguous(), g.contiguous()  # the block views below need it
    c = _diag_size(C, sub_chunk)
    A = q.new_zeros(*q.shape[:3], C)
    size = C
    while size > c:
        _, _, qs, ks = _quadrant_factors(q, k, g, size)
        _lower_quadrants(A, size).copy_(qs @ ks.transpose(-1, -2))
        size //= 2
    Ad, qb, kb, gb = _diag_blocks(A, c), _sub_blocks(q, c), _sub_blocks(k, c), _sub_blocks(g, c)
    Ad.diagonal(0, -2, -1).copy_((qb * kb).sum(-1))
    for d, seg in _sub_diagonal_logs(gb, c):
        Ad.diagonal(-d, -2, -1).copy_((qb[..., d:, :] * kb[..., :c - d, :] * seg.exp()).sum(-1))
    return A


def intra_chunk_scores_backward(dA: Tensor, q: Tensor, k: Tensor, g: Optional[Tensor],
                                sub_chunk: Optional[int] = None, need_dg: bool = True
                                ) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Gradients of intra_chunk_scores given dA [NC, H, C, C] (its upper triangle is ignored).
    Returns (dq, dk, A, dg): A is recomputed on the way (it shares every decay factor with the
    gradients, and the caller needs it for dv = A^T do); dg is the gates' share through the
    scores (None without a gate or need_dg), [NC, H, C] or [NC, H, C, K]."""
    C = q.shape[2]
    kind = gate_kind(g)
    if kind != VECTOR_GATE:
        M = causal_decay_mask(g, C, q)
        dS = dA * M
        A = causal_scores(q, k, M)
        dg = pair_gate_grad(dA * A) if kind == SCALAR_GATE and need_dg else None
        return dS @ k, dS.transpose(-1, -2) @ q, A, dg
    dA, q, k, g = dA.contiguous(), q.contiguous(), k.contiguous(), g.contiguous()
    c = _diag_size(C, sub_chunk)
    A = q.new_zeros(*q.shape[:3], C)
    dq, dk, dg = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(g)
    size = C
    while size > c:
        eq, ek, qs, ks = _quadrant_factors(q, k, g, size)
        dAq = _lower_quadrants(dA, size)
        _lower_quadrants(A, size).copy_(qs @ ks.transpose(-1, -2))
        dqs, dks = dAq @ ks, dAq.transpose(-1, -2) @ qs  # gradients w.r.t. qs, ks
        _halves(dq, size)[..., 1, :, :].addcmul_(dqs, eq)
        _halves(dk, size)[..., 0, :, :].addcmul_(dks, ek)
        # log eq_i reaches g_s for m <= s <= i; log ek_j reaches g_s for j < s < m
        dgh = _halves(dg, size)
        dgh[..., 1, :, :] += suffix_sum(qs * dqs, -2)
        dgh[..., 0, :, :] += prefix_sum_exclusive(ks * dks, -2)
        size //= 2
    Ad, dAd = _diag_blocks(A, c), _diag_blocks(dA, c)
    qb, kb, gb = _sub_blocks(q, c), _sub_blocks(k, c), _sub_blocks(g, c)
    dqb, dkb, dgb = _sub_blocks(dq, c), _sub_blocks(dk, c), _sub_blocks(dg, c)
    w = dAd.diagonal(0, -2, -1)[..., None]
    Ad.diagonal(0, -2, -1).copy_((qb * kb).sum(-1))
    dkb.addcmul_(w, qb)
    dqb.addcmul_(w, kb)
    for d, seg in _sub_diagonal_logs(gb, c):  # sub-diagonal d = i - j of every diagonal block
        w = dAd.diagonal(-d, -2, -1)[..., None]  # dA_{i, i-d}: [.., c-d, 1]
        decay = seg.exp()  # exp(sum_{j<s<=i} g_s) <= 1
        qe = qb[..., d:, :] * decay  # q_i exp(..)
        ke = decay.mul_(kb[..., :c - d, :])  # k_j exp(..)
        P = qe * kb[..., :c - d, :]
        Ad.diagonal(-d, -2, -1).copy_(P.sum(-1))
        dkb[..., :c - d, :].addcmul_(w, qe)
        dqb[..., d:, :].addcmul_(w, ke)
        P.mul_(w)  # gradient w.r.t. the pair's log decay: reaches g_s for j < s <= i
        for e in range(1, d + 1):
            dgb[..., e:e + c - d, :] += P
    return dq, dk, A, dg


# ------------------------------------------------------------------------------------------------
# Inter-chunk state passing
# ------------------------------------------------------------------------------------------------
Step = Callable[[slice, Tensor], Tensor]


def scan_chunks(layout: ChunkLayout, h0: Tensor, step: Step) -> Tuple[Tensor, Tensor]:
    """Run a per-chunk state recurrence along every sequence.

    h0: [N, H, K, V] initial states in sequence order. step(sl, h) gets the stream slice `sl` of
    one step's chunks (chunk i of sl belongs to the sequence of stream rank i) and their states
    h [n, H, K, V] before those chunks; it returns the states after them.
    Returns (states [NC, H, K, V]: the state before each chunk, final [N, H, K, V] in sequence
    order; a sequence with no tokens keeps its h0)."""
    states, h = scan_group(layout, layout.whole(), layout.to_stream_order(h0).clone(), step)
    return states, layout.to_sequence_order(h)


def scan_group(layout: ChunkLayout, grp: "ChunkGroup", h: Tensor, step: Step
               ) -> Tuple[Tensor, Tensor]:
    """scan_chunks over the steps of one group, resumable: h [n, H, K, V] are the states before
    the group in stream order (updated in place or replaced), step(sl, h) gets slices relative
    to the group (grp.s0 is index 0). Returns (states before each of the group's chunks, h after
    the group, still in stream order)."""
    states = torch.empty(grp.s1 - grp.s0, *h.shape[1:], dtype=h.dtype, device=h.device)
    for base, n in layout.steps[grp.j0:grp.j1]:
        sl = slice(base - grp.s0, base - grp.s0 + n)
        states[sl] = h[:n]
        if n == h.shape[0]:
            h = step(sl, h)
        else:  # sequences n.. have ended: keep their final states
            h[:n] = step(sl, h[:n])
    return states, h


def scan_chunks_reverse(layout: ChunkLayout, dht: Tensor, step: Step) -> Tuple[Tensor, Tensor]:
    """The adjoint loop of scan_chunks: from the final-state gradients dht [N, H, K, V]
    (sequence order) backwards over the chunks. step(sl, dh) gets the gradients w.r.t. the states
    *after* chunks sl and returns those w.r.t. the states before them.
    Returns (d_after [NC, H, K, V]: gradient w.r.t. the state after each chunk, dh0 [N, ...])."""
    d_after, dh = scan_group_reverse(layout, layout.whole(),
                                     layout.to_stream_order(dht).clone(), step)
    return d_after, layout.to_sequence_order(dh)


def scan_group_reverse(layout: ChunkLayout, grp: "ChunkGroup", dh: Tensor, step: Step
                       ) -> Tuple[Tensor, Tensor]:
    """scan_chunks_reverse over one group (see scan_group): dh are the gradients w.r.t. the
    states after the group, stream order. Returns (d_after of the group's chunks, dh before)."""
    d_after = torch.empty(grp.s1 - grp.s0, *dh.shape[1:], dtype=dh.dtype, device=dh.device)
    for base, n in reversed(layout.steps[grp.j0:grp.j1]):
        sl = slice(base - grp.s0, base - grp.s0 + n)
        d_after[sl] = dh[:n]
        if n == dh.shape[0]:
            dh = step(sl, dh)
        else:
            dh[:n] = step(sl, dh[:n])
    return d_after, dh


def state_passing(layout: ChunkLayout, h0: Tensor, chunk_decay: Optional[Tensor],
                  local_states: Tensor) -> Tuple[Tensor, Tensor]:
    """H_{n+1} = chunk_decay_n * H_n + local_states_n along each sequence.
    chunk_decay: None or [NC, H, 1 | K, 1] (exp(b_last)); local_states [NC, H, K, V]
    ((k * exp(b_last - b))^T v). Returns (states before each chunk [NC, ...], final [N, ...])."""
    return scan_chunks(layout, h0, passing_step(chunk_decay, local_states))


def passing_step(chunk_decay: Optional[Tensor], add: Tensor) -> Step:
    """The step h -> chunk_decay * h + add of state_passing (and, with the outputs' pull for
    `add`, of its adjoint); slices index chunk_decay and add."""
    def step(sl, h):
        if chunk_decay is None:
            return add[sl] + h
        return torch.addcmul(add[sl], chunk_decay[sl], h)
    return step


def state_passing_backward(layout: ChunkLayout, chunk_decay: Optional[Tensor],
                           q_states: Tensor, dht: Tensor) -> Tuple[Tensor, Tensor]:
    """Adjoint of state_passing with the outputs' pull on each state: dH_n = chunk_decay_n *
    dE_n + q_states_n, where q_states_n = (q * exp(b))^T do of chunk n ([NC, H, K, V]).
    Returns (dE [NC, ...]: gradient w.r.t. the state after each chunk, dh0 [N, ...])."""
    return scan_chunks_reverse(layout, dht, passing_step(chunk_decay, q_states))


def chunk_output(q_inter: Tensor, states: Tensor, A: Tensor, v: Tensor) -> Tensor:
    """o = q_inter @ H_n + A @ v per chunk: [NC, H, C, V]. q_inter = scaled q * exp(b)."""
    return torch.baddbmm(
        (A.flatten(0, 1) @ v.flatten(0, 1)), q_inter.flatten(0, 1), states.flatten(0, 1)
    ).view(v.shape)


# ------------------------------------------------------------------------------------------------
# The engine
# ------------------------------------------------------------------------------------------------
def longest(T: int, cu_seqlens: Optional[Tensor]) -> int:
    """The longest sequence's length: T, or read from cu_seqlens on the host (as
    ChunkLayout.build does)."""
    if cu_seqlens is None:
        return T
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0


def chunk_size_for(max_len: int, limit: int = TORCH_CHUNK) -> int:
    """`limit`, or the longest sequence's length rounded up to a power of two if shorter."""
    C = 1
    while C < min(max_len, limit):
        C *= 2
    return C


# Chunk groups. The engine walks the chunk stream a group of consecutive steps at a time, so
# the chunk-stream intermediates (packed inputs, decays, scores, per-chunk states) exist for one
# group only, not for the whole sequence: forward memory is the output plus one group's work,
# whatever T. Every chunk's arithmetic is the same as over the whole stream (element-wise ops,
# per-chunk matmuls and sums within a chunk), so the grouping changes no bit. About GROUP_BYTES
# per [chunks, H, C, max(K, V, C)] intermediate keeps them well under glibc's mmap threshold
# (32 MiB at most): freed blocks are reused from the heap by the next group instead of being
# unmapped and freshly faulted in on every call (which at T=32K cost 12-18 minor page faults per
# token and ~45 % system time), and one group's work stays in the last-level cache.
# (GROUP_BYTES lives with the other sizes in chunk/constants.py.)


def group_chunks(H: int, C: int, K: int, V: int, dtype: torch.dtype) -> int:
    """How many chunks one group holds (see GROUP_BYTES)."""
    per_chunk = H * max(C * K, C * V, K * V, C * C) * torch.finfo(dtype).bits // 8
    return max(1, GROUP_BYTES // max(per_chunk, 1))


@dataclass
class _Chunked:
    """One group's inputs in the chunk stream, in the compute dtype (q already times scale;
    None where a pass does not need it)."""
    q: Optional[Tensor]
    k: Tensor
    v: Tensor
    g: Optional[Tensor]  # per-token log decays, 0 in padding: [n, H, C] or [n, H, C, K]


def _setup(q, v, initial_state, cu_seqlens):
    """(layout, compute dtype, groups, h0 [N, H, K, V] in sequence order)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    layout = ChunkLayout.build(B, T, cu_seqlens, chunk_size_for(longest(T, cu_seqlens)),
                               q.device)
    dt = accumulation_dtype(q)
    h0 = (q.new_zeros(layout.N, H, K, V, dtype=dt) if initial_state is None
          else initial_state.to(dt))
    return layout, dt, layout.groups(group_chunks(H, layout.C, K, V, dt)), h0


def _pack_group(layout: ChunkLayout, grp: ChunkGroup, dt, q, k, v, g, g_gamma, scale,
                with_q: bool = True) -> _Chunked:
    gc = None if g is None else layout.pack(g, dt, grp)
    if g_gamma is not None:  # constant decay on real tokens only (padding must stay 0)
        gamma = g_gamma.to(dt)[None, :, None] * layout.valid[grp.s0:grp.s1].to(dt)
        gc = gamma if gc is None else gc + gamma
    qc = layout.pack(q, dt, grp).mul_(scale) if with_q else None  # a fresh tensor: scaled in place
    return _Chunked(qc, layout.pack(k, dt, grp), layout.pack(v, dt, grp), gc)


@dataclass
class _Inter:
    """The inter-chunk pieces of one group (see gate_factors and state_passing)."""
    q_decay: Optional[Tensor]
    k_decay: Optional[Tensor]
    chunk_decay: Optional[Tensor]
    q_inter: Optional[Tensor]  # q * exp(sum_{s<=t} g)   [n, H, C, K]
    k_inter: Tensor  # k * exp(sum_{s>t} g)    [n, H, C, K]
    states: Optional[Tensor]  # state before each chunk [n, H, K, V]


def _decays(x: _Chunked) -> _Inter:
    q_decay, k_decay, chunk_decay = gate_factors(x.g)
    return _Inter(q_decay, k_decay, chunk_decay, None if x.q is None else mul_if(x.q, q_decay),
                  mul_if(x.k, k_decay), None)


def _inter_group(layout: ChunkLayout, grp: ChunkGroup, x: _Chunked, h: Tensor
                 ) -> Tuple[_Inter, Tensor]:
    """The group's decays and states; h: the states before the group (stream order) -> after."""
    r = _decays(x)
    local = r.k_inter.transpose(-1, -2) @ x.v  # [n, H, K, V]
    r.states, h = scan_group(layout, grp, h, passing_step(r.chunk_decay, local))
    return r, h


def forward(q, k, v, g, g_gamma, scale, initial_state, output_final_state, cu_seqlens, mode):
    """GLA backend contract (lightning_ops.gla.ops) -> (o in v's dtype, final state fp32/fp64 or
    None). Both modes run the chunk engine (see the module docstring), a group at a time."""
    guard = NonFiniteGuard.build(k, v, (g,), cu_seqlens=cu_seqlens)
    if guard is not None:
        k, v, (g,) = guard.clean(k, v, (g,))
    layout, dt, groups, h0 = _setup(q, v, initial_state, cu_seqlens)
    o = v.new_empty(v.shape)
    h = layout.to_stream_order(h0).clone()
    for grp in groups:
        x = _pack_group(layout, grp, dt, q, k, v, g, g_gamma, scale)
        r, h = _inter_group(layout, grp, x, h)
        A = intra_chunk_scores(x.q, x.k, x.g)
        layout.unpack_into(o, chunk_output(r.q_inter, r.states, A, x.v), grp)
        del x, r, A
    final = layout.to_sequence_order(h) if output_final_state else None
    return (o, final) if guard is None else guard.poison(o, final)


def backward(q, k, v, g, g_gamma, scale, initial_state, cu_seqlens, mode, do, dht):
    """-> (dq, dk, dv, dg or None, dh0 or None), each in its input's dtype; dht may be None.
    Two passes over the groups: forward for the state before every chunk (recomputed: cheaper
    than saving them in the forward), then backward group by group from the last one (whose
    forward pieces the first pass left in place)."""
    guard = NonFiniteGuard.build(k, v, (g,), cu_seqlens=cu_seqlens)
    if guard is not None:
        k, v, (g,) = guard.clean(k, v, (g,))
        do, dht = guard.clean_grads(do, dht)
    layout, dt, groups, h0 = _setup(q, v, initial_state, cu_seqlens)
    h = layout.to_stream_order(h0).clone()
    states = []
    for i, grp in enumerate(groups):
        x = _pack_group(layout, grp, dt, q, k, v, g, g_gamma, scale,
                        with_q=i == len(groups) - 1)
        r, h = _inter_group(layout, grp, x, h)
        states.append(r.states)
    del h
    dht = torch.zeros_like(h0) if dht is None else dht.to(dt)
    dh = layout.to_stream_order(dht).clone()
    dq_all, dk_all, dv_all = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
    dg_all = None if g is None else g.new_empty(g.shape)
    for grp in reversed(groups):
        if grp is not groups[-1]:
            x = _pack_group(layout, grp, dt, q, k, v, g, g_gamma, scale)
            r = _decays(x)
        r.states = states.pop()
        doc = layout.pack(do, dt, grp)
        dE, dh = scan_group_reverse(layout, grp, dh,
                                    passing_step(r.chunk_decay,
                                                 r.q_inter.transpose(-1, -2) @ doc))
        dq, dk, A, dg_intra = intra_chunk_scores_backward(doc @ x.v.transpose(-1, -2), x.q, x.k,
                                                          x.g, need_dg=g is not None)
        dq_inter = doc @ r.states.transpose(-1, -2)  # w.r.t. q_inter
        dk_inter = x.v @ dE.transpose(-1, -2)  # w.r.t. k_inter
        dq += mul_if(dq_inter, r.q_decay)
        dk += mul_if(dk_inter, r.k_decay)
        layout.unpack_into(dv_all, A.transpose(-1, -2) @ doc + r.k_inter @ dE, grp)
        layout.unpack_into(dq_all, dq.mul_(scale), grp)
        layout.unpack_into(dk_all, dk, grp)
        if g is not None:
            # The gates enter through exp(prefix) in q_inter, exp(suffix) in k_inter, exp(total)
            # on the carried state and the pair decays of the scores (dg_intra).
            from_q, from_k = r.q_inter * dq_inter, r.k_inter * dk_inter  # [n, H, C, K]
            from_total = (r.states * r.chunk_decay * dE).sum(-1)  # [n, H, K]
            if x.g.dim() == 3:  # scalar gate: one decay per head
                from_q, from_k, from_total = from_q.sum(-1), from_k.sum(-1), from_total.sum(-1)
            layout.unpack_into(dg_all, gate_grad(from_q, from_k, from_total, dg_intra), grp)
        del x, r, doc, dE, dq, dk, A, dg_intra, dq_inter, dk_inter
    dh0 = layout.to_sequence_order(dh)
    return (dq_all, dk_all, dv_all, dg_all,
            None if initial_state is None else dh0.to(initial_state.dtype))

"""Chunked PyTorch engine of the gated-linear-attention family: the CPU default and the
executable spec of the Triton kernels.

One engine serves every gate kind of `S_t = decay_t * S_{t-1} + k_t v_t^T, o_t = scale S_t^T q_t`:

  kind      decay_t            gate tensor in the engine
  "none"    1                  None
  "scalar"  exp(g_t [+ gamma]) b [NC, H, C]      (data-dependent g and/or constant g_gamma)
  "vector"  diag(exp(g_t))     b [NC, H, C, K]

Tokens are regrouped into a *chunk stream* of C-token chunks ([NC, H, C, *], see ChunkLayout).
Inside a chunk, with b the chunk-local cumulative log decay (b_t = sum of g up to and including
t, all <= 0) and b_last its value at the chunk's last token:

  intra   A_ij = sum_k q_ik k_jk exp(b_ik - b_jk)  (j <= i)      o  = A v
  inter   o += (q * exp(b)) @ H_n                                (H_n: state before chunk n)
  state   H_{n+1} = exp(b_last) * H_n + (k * exp(b_last - b))^T v

Every exponent is <= 0, so gates down to -20 per token over any T stay finite. For vector gates,
A is built from secondary sub-chunks: each chunk is halved recursively down to c tokens; the
off-diagonal (lower-left) quadrant of every block is one plain matmul of q * exp(b_i - r) and
k * exp(r - b_j) (r = b at the block's second half's first token, so both factors are <= 1), and
only the c x c diagonal blocks pay the element-wise [c, c, K] cost. Nothing T x T is ever formed:
the largest intermediates are [NC, H, C, C] (T * C per head).

Varlen (cu_seqlens) reads the segment lengths on the host to build the chunk layout: a device
sync on GPU, acceptable for this path (the Triton backend builds its indices on the device).
mode "recurrent" (decode, short T) runs the same engine: with chunks no longer than the sequence
(C = 1 at T = 1, which is exactly the token step) it measured as fast as or faster than a literal
token loop for every T in 1..64 on CPU, and gives the same result.

Backward is hand-written (recomputing the cheap forward pieces): the same intra/inter split run
in reverse, plus the gate gradient from the identity  d b_t = q_t * dq_t - k_t * dk_t  (chunk-local,
reverse-cumsummed) and  d b_last = sum_V (E_n * dE_n)  with E_n the state after chunk n.

Reusable API (for the delta-rule and SSD engines):
  ChunkLayout.build(B, T, cu_seqlens, chunk_size, device)   where tokens live in the chunk stream
  layout.pack(x, dtype) / layout.unpack(y, dtype)             [B,T,H,*] <-> [NC,H,C,*]
  chunk_local_cumsum(g)                                       b from per-token log decays
  gate_factors(b)                                             exp(b), exp(b_last - b), exp(b_last)
  intra_chunk_scores(q, k, b) -> A                            decayed causal scores per chunk
  intra_chunk_scores_backward(dA, q, k, b) -> (dq, dk, A)
  scan_chunks(layout, h0, step) / scan_chunks_reverse(layout, dht, step)   generic state loops
  state_passing(layout, h0, chunk_decay, local_states)        GLA inter-chunk recurrence
  state_passing_backward(layout, chunk_decay, q_states, dht)
  chunk_output(q_inter, states, A, v)                         o = q_inter @ H + A @ v
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch

Tensor = torch.Tensor

# Chunk and sub-chunk sizes, picked by measurement on CPU (2 cores, fp32, H=4, K=V=64,
# T=4096/16384 forward+backward): C=32 and 64 tie, 128 is ~3x slower, 64 halves the Python loop
# of the state passing. For vector gates c=4 beat c=8 by ~10% and c=16 by ~20% (the diagonal
# blocks' element-wise work grows with c, the quadrant matmuls shrink with it).
CHUNK_SIZE = 64
SUB_CHUNK = 4


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

    @staticmethod
    def build(B: int, T: int, cu_seqlens: Optional[Tensor], chunk_size: int,
              device) -> "ChunkLayout":
        """Without cu_seqlens the B rows are N=B sequences of length T; with it (B == 1) the
        sequences are cu_seqlens' segments. Reads cu_seqlens on the host (a device sync on GPU):
        acceptable for this reference-grade torch path; the Triton path builds indices on device."""
        if cu_seqlens is None:
            return _dense_layout(B, T, chunk_size, torch.device(device))
        return _varlen_layout(cu_seqlens.to("cpu", torch.int64), T, chunk_size, device)

    def pack(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        """[B, T, H, *] -> [NC, H, C, *] in `dtype`, zero in padding slots."""
        rest = x.shape[2:]
        out = torch.empty(self.NC, rest[0], self.C, *rest[1:], dtype=dtype, device=x.device)
        if self.dense:  # chunk (j, b) is rows [j*C, (j+1)*C) of batch row b: strided copies
            B, C, full = self.B, self.C, self.T // self.C
            view = out.view(-1, B, *out.shape[1:]).transpose(2, 3).transpose(0, 1)  # [B,NT,C,H,*]
            view[:, :full] = x[:, :full * C].view(B, full, C, *rest)
            if full < view.shape[1]:  # the ragged last chunk
                view[:, full].zero_()
                view[:, full, :self.T - full * C] = x[:, full * C:]
            return out
        out.zero_()
        flat = x.reshape(self.B * self.T, *rest)
        out.transpose(1, 2)[self.chunk_of, self.slot_of] = flat.to(dtype)
        return out

    def unpack(self, y: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
        """[NC, H, C, *] -> [B, T, H, *] in `dtype` (default y's), dropping the padding."""
        rest = (y.shape[1],) + y.shape[3:]
        if self.dense:
            B, C, full = self.B, self.C, self.T // self.C
            out = torch.empty(B, self.T, *rest, dtype=dtype or y.dtype, device=y.device)
            view = y.view(-1, B, *y.shape[1:]).transpose(2, 3).transpose(0, 1)  # [B,NT,C,H,*]
            out[:, :full * C].view(B, full, C, *rest).copy_(view[:, :full])
            if full < view.shape[1]:
                out[:, full * C:] = view[:, full, :self.T - full * C]
            return out
        flat = y.transpose(1, 2)[self.chunk_of, self.slot_of]
        return flat.reshape(self.B, self.T, *rest).to(dtype or y.dtype)

    def to_stream_order(self, states: Tensor) -> Tensor:
        """Per-sequence tensor [N, ...] in sequence order -> stream (rank) order."""
        return states if self.order is None else states[self.order]

    def to_sequence_order(self, states: Tensor) -> Tensor:
        return states if self.inv_order is None else states[self.inv_order]


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
    return ChunkLayout(
        C=C, N=N, NC=NC, B=1, T=T, steps=list(zip(bases.tolist(), n_per_step.tolist())),
        valid=valid[:, None, :].to(device), dense=False,
        order=order.to(device), inv_order=inv_order.to(device),
        chunk_of=chunk_of.to(device), slot_of=slot_of.to(device))


# ------------------------------------------------------------------------------------------------
# Gates
# ------------------------------------------------------------------------------------------------
def chunk_local_cumsum(g: Optional[Tensor]) -> Optional[Tensor]:
    """b_t = sum_{s <= t} g_s inside each chunk. g: [NC, H, C] (scalar) or [NC, H, C, K]
    (vector), zero in padding slots so b_last equals b at the chunk's last real token."""
    if g is None:
        return None
    return g.cumsum(2)


def gate_kind(b: Optional[Tensor]) -> str:
    return "none" if b is None else ("scalar" if b.dim() == 3 else "vector")


def gate_factors(b: Optional[Tensor]):
    """(q_decay, k_decay, chunk_decay) = exp(b), exp(b_last - b), exp(b_last): all <= 1.
    Shapes broadcast against [NC, H, C, K] / [NC, H, K, V]: scalar gates give [NC, H, C, 1] and
    [NC, H, 1, 1], vector gates [NC, H, C, K] and [NC, H, K, 1]. None for kind "none"."""
    if b is None:
        return None, None, None
    bk = b[..., None] if b.dim() == 3 else b  # [NC, H, C, 1 | K]
    b_last = bk[:, :, -1:, :]  # [NC, H, 1, 1 | K]
    return bk.exp(), (b_last - bk).exp(), b_last.transpose(-1, -2).exp()


def _mul(x: Tensor, factor: Optional[Tensor]) -> Tensor:
    return x if factor is None else x * factor


# ------------------------------------------------------------------------------------------------
# Intra-chunk scores
# ------------------------------------------------------------------------------------------------
def _causal_decay_mask(b: Optional[Tensor], C: int, like: Tensor) -> Tensor:
    """M_ij = exp(b_i - b_j) for j <= i, else 0: [NC, H, C, C] (scalar) or [C, C] (no gate).
    Masking before exp keeps every exponent <= 0."""
    tril = torch.ones(C, C, dtype=torch.bool, device=like.device).tril()
    if b is None:
        return tril.to(like.dtype)
    diff = b[..., :, None] - b[..., None, :]
    return diff.masked_fill(~tril, float("-inf")).exp()


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


def _quadrant_factors(q: Tensor, k: Tensor, b: Tensor, size: int):
    """For every size-block, its second half's queries against its first half's keys:
    q * exp(b_i - r) and k * exp(r - b_j) with r = b at the second half's first token, so both
    exponents are <= 0 and exp(b_i - b_j) = product of the two. Returns (q factor, k factor,
    q scaled, k scaled), each [NC, H, C/size, size/2, K]."""
    qh, kh, bh = _halves(q, size), _halves(k, size), _halves(b, size)
    r = bh[..., 1, :1, :]
    eq = (bh[..., 1, :, :] - r).exp()
    ek = (r - bh[..., 0, :, :]).exp()
    return eq, ek, qh[..., 1, :, :] * eq, kh[..., 0, :, :] * ek


def _diag_size(C: int, sub_chunk: Optional[int]) -> int:
    return min(sub_chunk or SUB_CHUNK, C)


def intra_chunk_scores(q: Tensor, k: Tensor, b: Optional[Tensor], sub_chunk: Optional[int] = None
                       ) -> Tensor:
    """A [NC, H, C, C]: A_ij = sum_k q_ik k_jk exp(b_ik - b_jk) for j <= i (0 above the
    diagonal). q, k [NC, H, C, K]; b None, [NC, H, C] or [NC, H, C, K] (chunk-local cumsum).

    Vector gates: the chunk is halved recursively down to sub-chunks of c = sub_chunk tokens;
    the lower-left quadrant of every block is one plain matmul of pre-decayed q and k, and only
    the c x c diagonal blocks are built element-wise (one sub-diagonal at a time)."""
    C = q.shape[2]
    if gate_kind(b) != "vector":
        return (q @ k.transpose(-1, -2)) * _causal_decay_mask(b, C, q)
    q, k, b = q.contiguous(), k.contiguous(), b.contiguous()  # the block views below need it
    c = _diag_size(C, sub_chunk)
    A = q.new_zeros(*q.shape[:3], C)
    size = C
    while size > c:
        _, _, qs, ks = _quadrant_factors(q, k, b, size)
        _lower_quadrants(A, size).copy_(qs @ ks.transpose(-1, -2))
        size //= 2
    Ad, qb, kb, bb = _diag_blocks(A, c), _sub_blocks(q, c), _sub_blocks(k, c), _sub_blocks(b, c)
    for d in range(c):  # sub-diagonal d = i - j of every diagonal block
        qk = qb[..., d:, :] * kb[..., :c - d, :]
        if d:
            qk.mul_(torch.sub(bb[..., d:, :], bb[..., :c - d, :]).exp_())  # exp(b_i - b_j) <= 1
        Ad.diagonal(-d, -2, -1).copy_(qk.sum(-1))
    return A


def intra_chunk_scores_backward(dA: Tensor, q: Tensor, k: Tensor, b: Optional[Tensor],
                                sub_chunk: Optional[int] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of intra_chunk_scores given dA [NC, H, C, C] (its upper triangle is ignored).
    Returns (dq, dk, A): A is recomputed on the way (it shares every decay factor with the
    gradients, and the caller needs it for dv = A^T do). The gate's share is recovered later
    from q*dq - k*dk."""
    C = q.shape[2]
    if gate_kind(b) != "vector":
        M = _causal_decay_mask(b, C, q)
        dS = dA * M
        return dS @ k, dS.transpose(-1, -2) @ q, (q @ k.transpose(-1, -2)) * M
    dA, q, k, b = dA.contiguous(), q.contiguous(), k.contiguous(), b.contiguous()
    c = _diag_size(C, sub_chunk)
    A = q.new_zeros(*q.shape[:3], C)
    dq, dk = torch.zeros_like(q), torch.zeros_like(k)
    size = C
    while size > c:
        eq, ek, qs, ks = _quadrant_factors(q, k, b, size)
        dAq = _lower_quadrants(dA, size)
        _lower_quadrants(A, size).copy_(qs @ ks.transpose(-1, -2))
        _halves(dq, size)[..., 1, :, :].addcmul_(dAq @ ks, eq)
        _halves(dk, size)[..., 0, :, :].addcmul_(dAq.transpose(-1, -2) @ qs, ek)
        size //= 2
    Ad, dAd = _diag_blocks(A, c), _diag_blocks(dA, c)
    qb, kb, bb = _sub_blocks(q, c), _sub_blocks(k, c), _sub_blocks(b, c)
    dqb, dkb = _sub_blocks(dq, c), _sub_blocks(dk, c)
    for d in range(c):  # sub-diagonal d = i - j of every diagonal block
        w = dAd.diagonal(-d, -2, -1)[..., None]  # dA_{i, i-d}: [.., c-d, 1]
        qe, ke = qb[..., d:, :], kb[..., :c - d, :]
        if d:
            decay = torch.sub(bb[..., d:, :], bb[..., :c - d, :]).exp_()  # exp(b_i - b_j) <= 1
            qe = qe * decay  # q_i exp(b_i - b_j)
            ke = decay.mul_(ke)  # k_j exp(b_i - b_j)
        Ad.diagonal(-d, -2, -1).copy_((qe * kb[..., :c - d, :]).sum(-1))
        dkb[..., :c - d, :].addcmul_(w, qe)
        dqb[..., d:, :].addcmul_(w, ke)
    return dq, dk, A


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
    h = layout.to_stream_order(h0).clone()
    states = torch.empty(layout.NC, *h.shape[1:], dtype=h.dtype, device=h.device)
    for base, n in layout.steps:
        sl = slice(base, base + n)
        states[sl] = h[:n]
        if n == h.shape[0]:
            h = step(sl, h)
        else:  # sequences n.. have ended: keep their final states
            h[:n] = step(sl, h[:n])
    return states, layout.to_sequence_order(h)


def scan_chunks_reverse(layout: ChunkLayout, dht: Tensor, step: Step) -> Tuple[Tensor, Tensor]:
    """The adjoint loop of scan_chunks: from the final-state gradients dht [N, H, K, V]
    (sequence order) backwards over the chunks. step(sl, dh) gets the gradients w.r.t. the states
    *after* chunks sl and returns those w.r.t. the states before them.
    Returns (d_after [NC, H, K, V]: gradient w.r.t. the state after each chunk, dh0 [N, ...])."""
    dh = layout.to_stream_order(dht).clone()
    d_after = torch.empty(layout.NC, *dh.shape[1:], dtype=dh.dtype, device=dh.device)
    for base, n in reversed(layout.steps):
        sl = slice(base, base + n)
        d_after[sl] = dh[:n]
        if n == dh.shape[0]:
            dh = step(sl, dh)
        else:
            dh[:n] = step(sl, dh[:n])
    return d_after, layout.to_sequence_order(dh)


def state_passing(layout: ChunkLayout, h0: Tensor, chunk_decay: Optional[Tensor],
                  local_states: Tensor) -> Tuple[Tensor, Tensor]:
    """H_{n+1} = chunk_decay_n * H_n + local_states_n along each sequence.
    chunk_decay: None or [NC, H, 1 | K, 1] (exp(b_last)); local_states [NC, H, K, V]
    ((k * exp(b_last - b))^T v). Returns (states before each chunk [NC, ...], final [N, ...])."""
    def step(sl, h):
        if chunk_decay is None:
            return local_states[sl] + h
        return torch.addcmul(local_states[sl], chunk_decay[sl], h)
    return scan_chunks(layout, h0, step)


def state_passing_backward(layout: ChunkLayout, chunk_decay: Optional[Tensor],
                           q_states: Tensor, dht: Tensor) -> Tuple[Tensor, Tensor]:
    """Adjoint of state_passing with the outputs' pull on each state: dH_n = chunk_decay_n *
    dE_n + q_states_n, where q_states_n = (q * exp(b))^T do of chunk n ([NC, H, K, V]).
    Returns (dE [NC, ...]: gradient w.r.t. the state after each chunk, dh0 [N, ...])."""
    def step(sl, dh):
        if chunk_decay is None:
            return q_states[sl] + dh
        return torch.addcmul(q_states[sl], chunk_decay[sl], dh)
    return scan_chunks_reverse(layout, dht, step)


def chunk_output(q_inter: Tensor, states: Tensor, A: Tensor, v: Tensor) -> Tensor:
    """o = q_inter @ H_n + A @ v per chunk: [NC, H, C, V]. q_inter = scaled q * exp(b)."""
    return torch.baddbmm(
        (A.flatten(0, 1) @ v.flatten(0, 1)), q_inter.flatten(0, 1), states.flatten(0, 1)
    ).view(v.shape)


# ------------------------------------------------------------------------------------------------
# The engine
# ------------------------------------------------------------------------------------------------
def _compute_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def chunk_size_for(max_len: int, limit: int = CHUNK_SIZE) -> int:
    """`limit`, or the longest sequence's length rounded up to a power of two if shorter."""
    C = 1
    while C < min(max_len, limit):
        C *= 2
    return C


@dataclass
class _Chunked:
    """The inputs in the chunk stream, in the compute dtype (q already multiplied by scale)."""
    layout: ChunkLayout
    q: Tensor
    k: Tensor
    v: Tensor
    b: Optional[Tensor]
    h0: Tensor


def _prepare(q, k, v, g, g_gamma, scale, initial_state, cu_seqlens) -> _Chunked:
    B, T, H, K = q.shape
    V = v.shape[-1]
    if cu_seqlens is None:
        max_len = T
    else:  # host read of the lengths (see ChunkLayout.build)
        max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
    layout = ChunkLayout.build(B, T, cu_seqlens, chunk_size_for(max_len), q.device)
    dt = _compute_dtype(q)
    gc = None if g is None else layout.pack(g, dt)
    if g_gamma is not None:  # constant decay on real tokens only (padding must stay 0)
        gamma = g_gamma.to(dt)[None, :, None] * layout.valid.to(dt)
        gc = gamma if gc is None else gc + gamma
    h0 = (q.new_zeros(layout.N, H, K, V, dtype=dt) if initial_state is None
          else initial_state.to(dt))
    return _Chunked(layout, layout.pack(q, dt) * scale, layout.pack(k, dt), layout.pack(v, dt),
                    chunk_local_cumsum(gc), h0)


@dataclass
class _Inter:
    """The inter-chunk pieces of one forward pass (see gate_factors and state_passing)."""
    q_decay: Optional[Tensor]
    k_decay: Optional[Tensor]
    chunk_decay: Optional[Tensor]
    q_inter: Tensor  # q * exp(b)            [NC, H, C, K]
    k_inter: Tensor  # k * exp(b_last - b)   [NC, H, C, K]
    local: Tensor  # k_inter^T v             [NC, H, K, V]
    states: Tensor  # state before each chunk [NC, H, K, V]
    final: Tensor  # [N, H, K, V]


def _inter_chunk(x: _Chunked) -> _Inter:
    q_decay, k_decay, chunk_decay = gate_factors(x.b)
    q_inter, k_inter = _mul(x.q, q_decay), _mul(x.k, k_decay)
    local = k_inter.transpose(-1, -2) @ x.v
    states, final = state_passing(x.layout, x.h0, chunk_decay, local)
    return _Inter(q_decay, k_decay, chunk_decay, q_inter, k_inter, local, states, final)


def forward(q, k, v, g, g_gamma, scale, initial_state, output_final_state, cu_seqlens, mode):
    """Backend contract of lightning_ops.gla.ops -> (o in v's dtype, final state fp32/fp64 or
    None). Both modes run the chunk engine (see the module docstring)."""
    x = _prepare(q, k, v, g, g_gamma, scale, initial_state, cu_seqlens)
    r = _inter_chunk(x)
    A = intra_chunk_scores(x.q, x.k, x.b)
    o = x.layout.unpack(chunk_output(r.q_inter, r.states, A, x.v), v.dtype)
    return o, (r.final if output_final_state else None)


def backward(q, k, v, g, g_gamma, scale, initial_state, cu_seqlens, mode, do, dht):
    """-> (dq, dk, dv, dg or None, dh0 or None), each in its input's dtype; dht may be None."""
    x = _prepare(q, k, v, g, g_gamma, scale, initial_state, cu_seqlens)
    layout = x.layout
    r = _inter_chunk(x)  # recomputed: cheaper than saving per-chunk states from the forward
    doc = layout.pack(do, x.q.dtype)
    dht = torch.zeros_like(x.h0) if dht is None else dht.to(x.h0.dtype)

    dE, dh0 = state_passing_backward(layout, r.chunk_decay, r.q_inter.transpose(-1, -2) @ doc,
                                     dht)
    dq, dk, A = intra_chunk_scores_backward(doc @ x.v.transpose(-1, -2), x.q, x.k, x.b)
    dq += _mul(doc @ r.states.transpose(-1, -2), r.q_decay)
    dk += _mul(x.v @ dE.transpose(-1, -2), r.k_decay)
    dv = A.transpose(-1, -2) @ doc + r.k_inter @ dE

    dg = None
    if g is not None:
        # d b_t = q*dq - k*dk (every use of b is through exp(b_i - b_j) pairs); b_last also
        # scales the carried state: d b_last = sum_V E*dE with E the state after the chunk.
        db = x.q * dq - x.k * dk  # [NC, H, C, K]
        E = _mul(r.states, r.chunk_decay) + r.local
        db_last = (E * dE).sum(-1)  # [NC, H, K]
        if x.b.dim() == 3:  # scalar gate: one decay per head
            db, db_last = db.sum(-1), db_last.sum(-1, keepdim=True)
        else:
            db_last = db_last[:, :, None, :]
        dgc = db.flip(2).cumsum(2).flip(2) + db_last  # b_t and b_last are sums of g_s, s <= t
        dg = layout.unpack(dgc, g.dtype)
    return (layout.unpack(dq * scale, q.dtype), layout.unpack(dk, k.dtype),
            layout.unpack(dv, v.dtype), dg,
            None if initial_state is None else dh0.to(initial_state.dtype))

"""Context-parallel wrappers of the public ops (LASP-2: one all-gather of (transition, state)).

Every recurrence here is affine in its state: over one rank's piece of a sequence,
    S_end = M (S_in) + S_local,    o_t = o_local_t + (contribution of S_in at token t),
where S_local / o_local are what the public op gives with a zero incoming state, and M is the
piece's transition. Each rank runs the public op ONCE on its slice (incoming state 0 for the piece
that continues from the previous rank, the user's initial_state for the sequences that start on
it), packs the state and the transition of the piece that crosses into the next rank, and all
ranks all-gather these summaries (one collective, its size independent of T). Each rank then
folds the summaries of the ranks before it into its incoming state and corrects its first piece:

  family              transition M of a piece                   output correction at token t
  linear attention    I                                         scale q_t^T S_in
  simple GLA          exp(sum g) per head (closed form)         scale exp(P_t) q_t^T S_in
  GLA                 diag(exp(sum g)) per channel              scale (q_t * exp(P_t))^T S_in
  delta / gated / KDA K x K matrix, from the op itself (below)  u_t^T S_in
  SSD                 exp(sum dt A) per head                    exp(P_t) (S_in C_t) * silu(z_t)
  causal conv1d       a shift of the W-1 token history          (the op reruns with the halo)
  log-linear          exp(sum g) x the level move (below)       scale sum_l W_tl exp(P_t) q_t^T S_l
  log-linear delta    M (K x K) x the level move                sum_l W_tl u_t^T S_l

P_t is the prefix sum of the log decays from the piece start through t (a running sum of terms
<= 0, never a difference of two sums), so every exp is <= 1.

Delta rule: the transition of a piece is M = prod_t (I - b_t k_t k_t^T) diag(exp g_t), a K x K
matrix per head, and the output correction needs u_t = scale M_t^T q_t (M_t the product through
t). Both come from the public op by linearity: the state's value columns evolve independently, so
running the op with v' = [v, 0_K] and initial_state' = [h0, I_K] (K extra value columns) gives
o' = [o_local, u] and final' = [S_local, M] in the same call, with autograd through the op for
every gradient. Cost: (V + K) / V of one op run (x2 at K = V), plus T K V for the correction;
no second run and no K x K per token in memory. (When V + K exceeds the op's maximum value dim,
the identity columns run as a second call.)

Log-linear attention (chunk_log_linear_attn, chunk_log_linear_gated_delta_rule): the state is a
Fenwick hierarchy of L level states S_l [K, V] (LogLinearAttentionState(ht [N, H, L, K, V],
offsets [N])) and the level of a key depends on ABSOLUTE positions. So the continuing piece runs
the public op with a zero hierarchy at its absolute start P (the user's offset of its sequence
plus the sequence's tokens on earlier ranks): the op then gives the piece's own output and
final hierarchy at their true levels. The incoming hierarchy stays affine: slot l (present iff
bit l-1 of P is set) holds keys ending at rep_l = (P with bits < l-1 cleared) - 1, all read by a
later query t at level bit_length(rep_l xor t), weight W_tl = lambda_t[that level] (0 from level
L on); through the piece the slot moves, whole, to level bit_length(rep_l xor (P + n)) of the
final hierarchy (slots may merge there or fall off), decayed by exp(sum g) (attention) or by the
gated delta rule's K x K transition M (every level passes the same one). The summary of a piece:
its final hierarchy [n, H, L, K, V] and the transition (decay x move [n, H, L, L]; delta form:
M [n, H, K, K] and the move [n, L, L]); the sender computes the move from its own positions.
The delta form's M and u_t = scale M_t^T q_t come from a second public op run on the continuing
piece only: chunk_gated_delta_rule with zero values of width K and an identity initial state
(the identity-columns trick above cannot ride in the log-linear run itself: its extra columns
would come out weighed by one slot's level weight, not the u_t every slot needs). Cost there:
one log-linear run plus one gated-delta run of width K over the first piece, plus T L K V for
the correction (a loop over the L levels).
Positions: the local op needs P before the summaries exist; varlen contexts record it
(CPContext.prior_tokens, from the global cu_seqlens every rank holds), so no extra collective.
Dense contexts assume every rank holds the same length T (P = offset + rank T).

States: initial_state keeps the ops' layout [N, ...] (N = B dense, or the GLOBAL number of
sequences with cu_seqlens); rank r reads the rows of the sequences that START on it (dense: rank
0), and gives the other rows a zero gradient. final_state [N, ...] holds, on each rank, the final
states of the sequences that END on it (dense: the last rank) and zeros in the other rows: a sum
over the ranks (all_reduce) assembles all of them.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..chunk.constants import NO_GATE, SCALAR_GATE, TORCH_CHUNK, VECTOR_GATE
from ..delta import ops as _delta_ops
from ..gla import ops as _gla_ops
from ..loglinear import delta as _ll_delta
from ..loglinear import ops as _ll_ops
from ..loglinear.ops import LogLinearAttentionState as _LLState
from ..ssm import ops as _ssm_ops
from ..ssm.dt import effective_dt
from ..precision import accumulation_dtype
from ..validation import MAX_VALUE_DIM
from .comm import exchange
from .context import CPContext

Tensor = torch.Tensor


def _check_ctx(cp: CPContext, B: int, T: int, name: str) -> None:
    if not isinstance(cp, CPContext):
        raise TypeError(f"cp_context must come from build_cp_context, got {type(cp).__name__}")
    if not cp.dense and B != 1:
        raise ValueError(f"with a varlen CP context the batch size must be 1 (sequences are "
                         f"packed along T), got B={B}")
    cp.check_local_len(name, T)


def _local_h0(cp: CPContext, h0: Optional[Tensor]) -> Optional[Tensor]:
    """The op's initial_state for this rank's pieces: the user's rows for sequences starting
    here, zero for the piece continuing from the previous rank."""
    if h0 is None:
        return None
    if not cp.dense and h0.shape[0] != cp.N:
        raise ValueError(f"initial_state has {h0.shape[0]} rows (shape {list(h0.shape)}), but "
                         f"the CP context's global cu_seqlens packs {cp.N} sequences: pass the "
                         f"global [N, ...] initial states on every rank")
    if cp.dense:
        return h0 if cp.rank == 0 else None
    idx = torch.tensor([n for n, _, _ in cp.pieces], device=h0.device)
    keep = torch.tensor(cp.starts_here, device=h0.device).view(-1, *([1] * (h0.dim() - 1)))
    rows = h0.index_select(0, idx)
    return torch.where(keep, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))


def _first(cp: CPContext, x: Tensor) -> Tensor:
    """Rows (of a [N_local, ...] state) of the first piece."""
    return x if cp.dense else x[:1]


def _first_len(cp: CPContext, T: int) -> int:
    return T if cp.dense else cp.piece_lengths()[0]


def _final_out(cp: CPContext, fin: Tensor) -> Tensor:
    """Local final states [N_local, ...] -> [N, ...]: the sequences ending here, zeros elsewhere."""
    if cp.dense:
        return fin if cp.rank == cp.world - 1 else torch.zeros_like(fin).detach()
    rows = [i for i, e in enumerate(cp.ends_here) if e]
    out = fin.new_zeros((cp.N,) + tuple(fin.shape[1:]))
    if not rows:
        return out
    seq = torch.tensor([cp.pieces[i][0] for i in rows], device=fin.device)
    return out.index_copy(0, seq, fin.index_select(0, torch.tensor(rows, device=fin.device)))


class _Piece:
    """What a family returns for the first (continuing) piece: its transition and the output
    correction as a function of the incoming state."""

    def __init__(self, trans: Tensor, apply: Callable[[Tensor, Tensor], Tensor],
                 correct: Callable[[Tensor], Tensor]):
        self.trans, self.apply, self.correct = trans, apply, correct


def _merge(cp: CPContext, o_loc: Tensor, fin_loc: Tensor, piece: Optional[_Piece],
           trans_shape: Tuple[int, ...], apply: Callable[[Tensor, Tensor], Tensor],
           seq_dim: int = 1) -> Tuple[Tensor, Tensor]:
    """The exchange and the merge, shared by the recurrent families."""
    B = o_loc.shape[0]
    n = cp.n_cross(B)
    state_shape = (n,) + tuple(fin_loc.shape[1:])
    sd = fin_loc.dtype
    if cp.crosses():
        b = fin_loc if cp.dense else fin_loc[-1:]
        A = piece.trans if cp.passes() else fin_loc.new_zeros((n,) + trans_shape)
        summary = torch.cat([b.reshape(-1), A.to(sd).reshape(-1)])
    else:
        summary = fin_loc.new_zeros(n * (fin_loc[0].numel() + _numel(trans_shape)))
    gathered, o_loc, fin_loc = exchange(cp, summary, o_loc, fin_loc)
    chain = cp.chain()
    if not chain:
        return o_loc, fin_loc
    ns = n * fin_loc[0].numel()
    S = None
    for j in chain:
        b_j = gathered[j, :ns].view(state_shape)
        if S is None:
            S = b_j
        else:
            A_j = gathered[j, ns:].view((n,) + trans_shape)
            S = apply(A_j, S) + b_j
    # S: the true state entering this rank's first piece
    L0 = _first_len(cp, o_loc.shape[seq_dim])
    corr = piece.correct(S)
    head = o_loc.narrow(seq_dim, 0, L0)
    head = (head.to(corr.dtype) + corr).to(o_loc.dtype)
    o = torch.cat([head, o_loc.narrow(seq_dim, L0, o_loc.shape[seq_dim] - L0)], dim=seq_dim)
    fin_first = apply(piece.trans, S) + _first(cp, fin_loc)
    fin = fin_first if cp.dense else torch.cat([fin_first, fin_loc[1:]])
    return o, fin


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# ------------------------------------------------------------------------------------------------
# GLA family: linear attention, simple GLA / lightning, GLA
# ------------------------------------------------------------------------------------------------
def _diag_apply(A: Tensor, S: Tensor) -> Tensor:
    return A[..., None] * S  # A [n, H, K|1], S [n, H, K, V]


def _gla_family(q, k, v, g, g_gamma, scale, initial_state, output_final_state, cp, gate):
    B, T, H, K = q.shape
    _check_ctx(cp, B, T, "q")
    cu = None if cp.dense else cp.local_cu_seqlens(q.device)
    o_loc, fin_loc = _gla_ops.gated_linear_attention(
        q, k, v, g, g_gamma, scale, _local_h0(cp, initial_state), True, cu, "chunk", gate)
    sd = fin_loc.dtype
    scale_ = float(K ** -0.5 if scale is None else scale)
    kdim = K if gate == VECTOR_GATE else 1
    piece = None
    if cp.first_cont():
        L0 = _first_len(cp, T)
        logd = q.new_zeros((), dtype=sd).expand(B, L0, H, kdim)
        if g is not None:
            gg = g[:, :L0].to(sd)
            logd = logd + (gg if gate == VECTOR_GATE else gg[..., None])
        if g_gamma is not None:
            logd = logd + g_gamma.to(sd)[:, None]
        P = torch.cumsum(logd, dim=1)  # prefix sums from the piece start: every term <= 0
        trans = torch.exp(P[:, -1]) if L0 else q.new_ones((B, H, kdim), dtype=sd)
        u = scale_ * q[:, :L0].to(sd) * torch.exp(P)
        piece = _Piece(trans, _diag_apply,
                       lambda S: torch.einsum("bthk,bhkv->bthv", u, S))
    o, fin = _merge(cp, o_loc, fin_loc, piece, (H, kdim), _diag_apply)
    return o, (_final_out(cp, fin) if output_final_state else None)


def chunk_linear_attn(q, k, v, scale=None, initial_state=None, output_final_state=False,
                      cu_seqlens=None, cp_context: Optional[CPContext] = None):
    """lightning_ops.chunk_linear_attn over a CP group (cp_context from build_cp_context)."""
    if cp_context is None:
        return _gla_ops.chunk_linear_attn(q, k, v, scale, initial_state, output_final_state,
                                          cu_seqlens)
    _no_cu(cu_seqlens)
    return _gla_family(q, k, v, None, None, scale, initial_state, output_final_state,
                       cp_context, NO_GATE)


def chunk_simple_gla(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None,
                     output_final_state=False, cu_seqlens=None,
                     cp_context: Optional[CPContext] = None):
    """lightning_ops.chunk_simple_gla over a CP group."""
    if cp_context is None:
        return _gla_ops.chunk_simple_gla(q, k, v, g, g_gamma, scale, initial_state,
                                         output_final_state, cu_seqlens)
    _no_cu(cu_seqlens)
    return _gla_family(q, k, v, g, g_gamma, scale, initial_state, output_final_state,
                       cp_context, SCALAR_GATE)


def lightning_attn(q, k, v, slope, scale=None, initial_state=None, output_final_state=False,
                   cu_seqlens=None, cp_context: Optional[CPContext] = None):
    """lightning_ops.lightning_attn over a CP group."""
    if cp_context is None:
        return _gla_ops.lightning_attn(q, k, v, slope, scale, initial_state, output_final_state,
                                       cu_seqlens)
    _no_cu(cu_seqlens)
    return _gla_family(q, k, v, None, -slope, scale, initial_state, output_final_state,
                       cp_context, SCALAR_GATE)


def chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False,
              cu_seqlens=None, cp_context: Optional[CPContext] = None):
    """lightning_ops.chunk_gla over a CP group."""
    if cp_context is None:
        return _gla_ops.chunk_gla(q, k, v, g, scale, initial_state, output_final_state,
                                  cu_seqlens)
    _no_cu(cu_seqlens)
    return _gla_family(q, k, v, g, None, scale, initial_state, output_final_state,
                       cp_context, VECTOR_GATE)


def _no_cu(cu_seqlens) -> None:
    if cu_seqlens is not None:
        raise ValueError("with cp_context, pass the GLOBAL cu_seqlens to build_cp_context, not "
                         "cu_seqlens= to the op (the context gives each rank its local pieces)")


# ------------------------------------------------------------------------------------------------
# Delta-rule family: delta rule, gated delta rule, KDA
# ------------------------------------------------------------------------------------------------
def _matrix_apply(M: Tensor, S: Tensor) -> Tensor:
    return torch.matmul(M, S)  # M [n, HV, K, K], S [n, HV, K, V]


def _delta_family(q, k, v, g, beta, scale, initial_state, output_final_state, l2, cp, gate):
    B, T, H, K = q.shape
    HV, Vd = v.shape[2], v.shape[3]
    _check_ctx(cp, B, T, "q")
    cu = None if cp.dense else cp.local_cu_seqlens(q.device)
    h0 = _local_h0(cp, initial_state)

    def run(v_, h0_):
        return _delta_ops.delta_rule(q, k, v_, g, beta, scale, h0_, True, cu, l2, "chunk", gate)

    piece = None
    if not cp.first_cont():
        o_loc, fin_loc = run(v, h0)
    else:
        Nl = B if cp.dense else cp.n_pieces
        sd = accumulation_dtype(q)
        eye = torch.eye(K, dtype=sd, device=q.device).expand(Nl, HV, K, K)
        if not cp.dense and Nl > 1:  # identity columns on the first piece only
            eye = torch.cat([eye[:1], eye.new_zeros(Nl - 1, HV, K, K)])
        zeros_v = v.new_zeros(B, T, HV, K)
        if Vd + K <= MAX_VALUE_DIM:
            h0_ = torch.cat([h0.to(sd) if h0 is not None else eye.new_zeros(Nl, HV, K, Vd), eye],
                            dim=-1)
            o2, f2 = run(torch.cat([v, zeros_v], dim=-1), h0_)
            o_loc, u, fin_loc, M = o2[..., :Vd], o2[..., Vd:], f2[..., :Vd], f2[..., Vd:]
        else:  # too wide for one call: the identity columns as a second call
            o_loc, fin_loc = run(v, h0)
            u, M = run(zeros_v, eye)
        L0 = _first_len(cp, T)
        uf = u[:, :L0].to(sd)
        piece = _Piece(_first(cp, M), _matrix_apply,
                       lambda S: torch.einsum("bthk,bhkv->bthv", uf, S))
    o, fin = _merge(cp, o_loc, fin_loc, piece, (HV, K, K), _matrix_apply)
    return o, (_final_out(cp, fin) if output_final_state else None)


def chunk_delta_rule(q, k, v, beta, scale=None, initial_state=None, output_final_state=False,
                     cu_seqlens=None, use_qk_l2norm_in_kernel=False,
                     cp_context: Optional[CPContext] = None):
    """lightning_ops.chunk_delta_rule over a CP group."""
    if cp_context is None:
        return _delta_ops.chunk_delta_rule(q, k, v, beta, scale, initial_state,
                                           output_final_state, cu_seqlens,
                                           use_qk_l2norm_in_kernel)
    _no_cu(cu_seqlens)
    return _delta_family(q, k, v, None, beta, scale, initial_state, output_final_state,
                         use_qk_l2norm_in_kernel, cp_context, NO_GATE)


def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None,
                           output_final_state=False, cu_seqlens=None,
                           use_qk_l2norm_in_kernel=False,
                           cp_context: Optional[CPContext] = None):
    """lightning_ops.chunk_gated_delta_rule over a CP group."""
    if cp_context is None:
        return _delta_ops.chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state,
                                                 output_final_state, cu_seqlens,
                                                 use_qk_l2norm_in_kernel)
    _no_cu(cu_seqlens)
    return _delta_family(q, k, v, g, beta, scale, initial_state, output_final_state,
                         use_qk_l2norm_in_kernel, cp_context, SCALAR_GATE)


def chunk_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
              cu_seqlens=None, use_qk_l2norm_in_kernel=False,
              cp_context: Optional[CPContext] = None):
    """lightning_ops.chunk_kda over a CP group."""
    if cp_context is None:
        return _delta_ops.chunk_kda(q, k, v, g, beta, scale, initial_state, output_final_state,
                                    cu_seqlens, use_qk_l2norm_in_kernel)
    _no_cu(cu_seqlens)
    return _delta_family(q, k, v, g, beta, scale, initial_state, output_final_state,
                         use_qk_l2norm_in_kernel, cp_context, VECTOR_GATE)


# ------------------------------------------------------------------------------------------------
# Mamba-2 SSD
# ------------------------------------------------------------------------------------------------
def _scalar_apply(A: Tensor, S: Tensor) -> Tensor:
    return A[..., None, None] * S  # A [n, h], S [n, h, p, n_state]


def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None,
                              initial_states=None, seq_idx=None, cu_seqlens=None,
                              dt_softplus=False, dt_limit=(0.0, float("inf")),
                              return_final_states=False,
                              cp_context: Optional[CPContext] = None):
    """lightning_ops.mamba_chunk_scan_combined over a CP group. With cp_context: seq_idx and
    cu_seqlens are not taken (the context carries the global cu_seqlens); final states [N, h, p,
    n] as described in the module docstring."""
    if cp_context is None:
        return _ssm_ops.mamba_chunk_scan_combined(
            x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens,
            dt_softplus, dt_limit, return_final_states)
    cp = cp_context
    _no_cu(cu_seqlens)
    if seq_idx is not None:
        raise ValueError("seq_idx is not supported with cp_context: pass the global cu_seqlens "
                         "to build_cp_context")
    b, l, h, p = x.shape
    _check_ctx(cp, b, l, "x")
    cu = None if cp.dense else cp.local_cu_seqlens(x.device)
    y_loc, fin_loc = _ssm_ops.mamba_chunk_scan_combined(
        x, dt, A, B, C, chunk_size, D, z, dt_bias, _local_h0(cp, initial_states), None, cu,
        dt_softplus, dt_limit, return_final_states=True)
    sd = fin_loc.dtype
    piece = None
    if cp.first_cont():
        L0 = _first_len(cp, l)
        d = effective_dt(dt[:, :L0], dt_bias, dt_softplus, dt_limit, sd)
        P = torch.cumsum(d * A.to(sd), dim=1)  # [b, L0, h], prefix sums of terms <= 0
        trans = torch.exp(P[:, -1]) if L0 else x.new_ones((b, h), dtype=sd)
        Ch = C[:, :L0].to(sd).repeat_interleave(h // C.shape[2], dim=2)  # [b, L0, h, n]
        zg = None if z is None else F.silu(z[:, :L0].to(sd))

        def correct(S):
            corr = torch.exp(P)[..., None] * torch.einsum("bhpn,bthn->bthp", S, Ch)
            return corr if zg is None else corr * zg

        piece = _Piece(trans, _scalar_apply, correct)
    y, fin = _merge(cp, y_loc, fin_loc, piece, (h,), _scalar_apply)
    return (y, _final_out(cp, fin)) if return_final_states else y


# ------------------------------------------------------------------------------------------------
# Causal conv1d: a halo of W-1 tokens
# ------------------------------------------------------------------------------------------------
def _shift(S: Tensor, L: int) -> Tensor:
    """The history [.., W-1] after L more tokens arrive whose own part is added separately."""
    W1 = S.shape[-1]
    if L >= W1:
        return torch.zeros_like(S)
    return F.pad(S[..., L:], (0, L))


def causal_conv1d_fn(x, weight, bias=None, initial_states=None, return_final_states=False,
                     activation=None, seq_idx=None, cp_context: Optional[CPContext] = None):
    """lightning_ops.causal_conv1d_fn over a CP group: x [B, D, L_r] (the rank's slice of the
    last dim). The incoming W-1 token history (halo) is the fold of the ranks' last W-1 inputs
    (a shift per rank, so a slice shorter than W-1 works too). initial_states / final states:
    [N, D, W-1], N = B (dense) or the global number of sequences (varlen). Dense contexts assume
    every rank holds the same length L_r."""
    if cp_context is None:
        return _ssm_ops.causal_conv1d_fn(x, weight, bias, initial_states, return_final_states,
                                         activation, seq_idx=seq_idx)
    cp = cp_context
    if seq_idx is not None:
        raise ValueError("seq_idx is not supported with cp_context: pass the global cu_seqlens "
                         "to build_cp_context")
    Bsz, Dm, L = x.shape
    W1 = weight.shape[1] - 1
    _check_ctx(cp, Bsz, L, "x")
    h0 = _local_h0(cp, initial_states)
    if cp.dense:
        lens = [L]
        hists = [h0 if h0 is not None else x.new_zeros(Bsz, Dm, W1)]
        xs = [x]
    else:
        lens = cp.piece_lengths()
        offs = [0]
        for n_ in lens:
            offs.append(offs[-1] + n_)
        xs = [x[..., a:b] for a, b in zip(offs, offs[1:])]
        hists = [h0[i:i + 1] if h0 is not None else x.new_zeros(1, Dm, W1)
                 for i in range(len(lens))]
    # summary: the last W-1 inputs of the crossing piece, its own history (zeros if it continues)
    if cp.crosses():
        summary = torch.cat([hists[-1], xs[-1]], dim=-1)[..., -W1:]
    else:
        summary = x.new_zeros(cp.n_cross(Bsz), Dm, W1)
    gathered, x = exchange(cp, summary, x)
    xs = [x] if cp.dense else [x[..., a:b] for a, b in zip(offs, offs[1:])]
    chain = cp.chain()
    if chain:
        S = None
        for j in chain:
            Lj = L if cp.dense else cp.slice_len_all[j]
            S = gathered[j] if S is None else _shift(S, Lj) + gathered[j]
        hists[0] = S.to(x.dtype)
    if cp.dense:
        out = _ssm_ops.causal_conv1d_fn(x, weight, bias, hists[0], False, activation)
    else:  # every piece with its history in front, pieces kept apart by seq_idx
        ext = torch.cat([t for hx in zip(hists, xs) for t in hx], dim=-1)
        sid = torch.cat([torch.full((W1 + n_,), i, dtype=torch.int32, device=x.device)
                         for i, n_ in enumerate(lens)])[None]
        out_ext = _ssm_ops.causal_conv1d_fn(ext, weight, bias, None, False, activation,
                                            seq_idx=sid)
        pos, a = [], 0
        for n_ in lens:
            pos.append(out_ext[..., a + W1:a + W1 + n_])
            a += W1 + n_
        out = torch.cat(pos, dim=-1)
    if not return_final_states:
        return out
    fin = torch.cat([torch.cat([hx, xx], dim=-1)[..., -W1:] for hx, xx in zip(hists, xs)])
    return out, _final_out(cp, fin.to(x.dtype))


# ------------------------------------------------------------------------------------------------
# Log-linear attention: a Fenwick hierarchy of L level states, placed by absolute positions
# ------------------------------------------------------------------------------------------------
def _varlen_prev(cp: CPContext) -> int:
    """Varlen: the tokens of this rank's first piece's sequence on earlier ranks (0 if it starts
    here), from the context's tables (every rank builds them from the same global cu_seqlens)."""
    return cp.prior_tokens


def _ll_levels(P: Tensor, T0: int, L: int) -> Tuple[Tensor, Tensor]:
    """For pieces starting at absolute positions P [n] (int64, on the device) with T0 tokens:
    lev0 [n, T0, L], the level at which each token's query reads slot l of the hierarchy at P
    (L where the slot is absent or its level is >= L: weight 0), and move [n, L, L] (0/1): slot
    l of the hierarchy at P lands in level m of the one at P + T0 (slots may merge; levels >= L
    drop out). Slot l (l >= 1) exists iff bit l-1 of P is set; its keys end at rep_l = P with
    bits < l-1 cleared, minus 1, and all sit at level bit_length(rep_l xor t) for a query t
    (loglinear.torch's rule). Integer arithmetic on the device: no host sync."""
    dev = P.device
    lv = torch.arange(L, device=dev)
    sh = (lv - 1).clamp(min=0)
    Pc = P.to(torch.int64)[:, None]
    exists = (((Pc >> sh) & 1) == 1) & (lv > 0)  # [n, L]
    rep = ((Pc >> sh) << sh) - 1

    def level(t):  # t [n, m] -> [n, m, L]: min(bit_length(rep xor t), L), L if absent
        x = rep[:, None, :] ^ t[..., None]
        lev = torch.zeros_like(x)
        for b in range(L):
            lev += (x >= (1 << b)).to(torch.int64)
        return torch.where(exists[:, None, :], lev, L)

    lev0 = level(Pc + torch.arange(T0, device=dev))
    move = F.one_hot(level(Pc + T0)[:, 0], L + 1)[..., :L]
    return lev0, move


def _ll_weights(lam: Tensor, lev0: Tensor) -> Tensor:
    """lambda_t at each slot's level: lam [n, T0, H, L], lev0 [n, T0, L] -> [n, T0, H, L]."""
    n, T0, H, L = lam.shape
    lam_pad = torch.cat([lam, lam.new_zeros(n, T0, H, 1)], -1)
    return lam_pad.gather(-1, lev0[:, :, None, :].expand(n, T0, H, L))


def _check_dense_lengths(cp: CPContext, T: int) -> None:
    """Dense log-linear pieces start at rank * T (absolute positions), so every rank must hold
    the same T: checked once per context by a host all-gather of the ranks' lengths (every rank
    sees the same list and raises the same error, so none is left waiting in a collective).
    Skipped while compiling (dynamo cannot trace it): make one eager call first to check."""
    if cp.world == 1 or getattr(cp, "_dense_len_checked", None) == T or \
            torch.compiler.is_compiling():
        return
    lens = [None] * cp.world
    dist.all_gather_object(lens, int(T), group=cp.group)
    cp.collectives += 1
    if len(set(lens)) != 1:
        raise ValueError(f"log-linear attention under a dense CP context needs the same number "
                         f"of tokens on every rank (positions are absolute), got {lens}: use "
                         f"a varlen context (build_cp_context(cu_seqlens, bounds=...)) for "
                         f"unequal slices")
    cp._dense_len_checked = T


def _ll_state_in(cp: CPContext, initial_state, B: int, T: int, shape: Tuple[int, ...], sd,
                 device):
    """The op's initial_state on this rank: the user's (ht, offsets) rows for the sequences
    starting here; for the piece continuing from the previous rank a ZERO hierarchy at the
    piece's absolute start (so the local op places the piece's own tokens at their true levels).
    Returns (state or None, P [n_cross]: the continuing piece's start, or None)."""
    h0, off = (None, None) if initial_state is None else initial_state
    N = B if cp.dense else cp.N
    if off is not None and (not isinstance(off, Tensor) or tuple(off.shape) != (N,)
                            or off.is_floating_point()):
        raise ValueError(f"initial_state.offsets must be an integer tensor of shape [{N}] (the "
                         f"global offsets, on every rank), got {list(getattr(off, 'shape', []))}")
    if cp.dense:
        _check_dense_lengths(cp, T)
        if not cp.first_cont():
            return initial_state, None
        # every row continues from the previous rank (dense slices have equal lengths)
        base = off.to(torch.int64) if off is not None else \
            torch.zeros(B, dtype=torch.int64, device=device)
        P = base + cp.rank * T
        return (torch.zeros((B,) + shape, dtype=sd, device=device), P), P
    prev = _varlen_prev(cp)  # on every rank: it may take part in a collective
    if initial_state is None and not cp.first_cont():
        return None, None
    Nl = cp.n_pieces
    dev = device if off is None else off.device
    offs = torch.zeros(Nl, dtype=torch.int64, device=dev) if off is None else \
        off.to(torch.int64).index_select(0, torch.tensor([n_ for n_, _, _ in cp.pieces],
                                                         device=dev))
    ht = None if h0 is None else _local_h0(cp, h0)  # zero rows for the continuing piece
    if not cp.first_cont():
        return (ht, offs), None
    # the continuing piece starts after its sequence's tokens on earlier ranks (and after the
    # user's offset of that sequence)
    shift = torch.zeros(Nl, dtype=torch.int64, device=dev)
    shift[0] = prev
    offs = offs + shift
    if ht is None:
        ht = torch.zeros((Nl,) + shape, dtype=sd, device=device)
    return (ht, offs), offs[:1]


def _ll_correct(W: Tensor, qu: Tensor, S: Tensor) -> Tensor:
    """sum_l W[n, t, h, l] qu[n, t, h, :] . S[n, h, l] -> [n, T0, H, V]: the incoming hierarchy
    read by the continuing piece's tokens (a loop over the L levels keeps memory at [n, T0, H, V]
    instead of a [n, T0, H, L, K or V] intermediate)."""
    out = None
    for l in range(S.shape[2]):
        term = W[..., l, None] * torch.einsum("nthk,nhkv->nthv", qu, S[:, :, l])
        out = term if out is None else out + term
    return out


def _log_linear(cp, q, v, level_scales, initial_state, output_final_state, run, first,
                trans_shape, apply):
    """The CP flow of the log-linear ops. run(state) -> (o, LogLinearAttentionState): the public
    op on this rank's slice; first(L0, lev0, move) -> _Piece: the continuing piece's transition
    and output correction."""
    B, T, _, K = q.shape
    H, Vd, L = v.shape[2], v.shape[3], level_scales.shape[3]
    _check_ctx(cp, B, T, "q")
    sd = accumulation_dtype(q)
    state, P = _ll_state_in(cp, initial_state, B, T, (H, L, K, Vd), sd, q.device)
    o_loc, (ht_loc, off_loc) = run(state)
    piece = None
    if cp.first_cont():
        L0 = _first_len(cp, T)
        lev0, move = _ll_levels(P, L0, L)
        piece = first(L0, lev0, move.to(sd))
    o, ht = _merge(cp, o_loc, ht_loc, piece, trans_shape, apply)
    if not output_final_state:
        return o, None
    return o, _LLState(_final_out(cp, ht), _final_out(cp, off_loc))


def chunk_log_linear_attn(q, k, v, g, level_scales, initial_state=None, output_final_state=False,
                          cu_seqlens=None, *, scale=None, chunk_size=TORCH_CHUNK,
                          cp_context: Optional[CPContext] = None):
    """lightning_ops.chunk_log_linear_attn over a CP group. States: LogLinearAttentionState
    (ht [N, H, L, K, V], offsets [N]) as in the module docstring; final offsets are the absolute
    end positions of the sequences ending on the rank, 0 elsewhere. Dense contexts assume every
    rank holds the same length (positions are absolute)."""
    if cp_context is None:
        return _ll_ops.chunk_log_linear_attn(q, k, v, g, level_scales, initial_state,
                                             output_final_state, cu_seqlens, scale=scale,
                                             chunk_size=chunk_size)
    _no_cu(cu_seqlens)
    cp = cp_context
    cu = None if cp.dense else cp.local_cu_seqlens(q.device)
    H, L = v.shape[2], level_scales.shape[3]
    scale_ = 1.0 if scale is None else float(scale)

    def run(state):
        return _ll_ops.chunk_log_linear_attn(q, k, v, g, level_scales, state, True, cu,
                                             scale=scale, chunk_size=chunk_size)

    def first(L0, lev0, move):
        sd = move.dtype
        pre = torch.cumsum(g[:, :L0].to(sd), dim=1)  # [n, L0, H]: running sums of terms <= 0
        W = _ll_weights(level_scales[:, :L0].to(sd), lev0) * (scale_ * torch.exp(pre))[..., None]
        qf = q[:, :L0].to(sd).repeat_interleave(H // q.shape[2], dim=2)
        decay = torch.exp(g[:, :L0].to(sd).sum(1))  # [n, H] (1 for an empty dense slice)
        trans = decay[..., None, None] * move[:, None]  # [n, H, L, L]
        return _Piece(trans, _level_apply, lambda S: _ll_correct(W, qf, S))

    return _log_linear(cp, q, v, level_scales, initial_state, output_final_state, run, first,
                       (H, L, L), _level_apply)


def hmamba_chunk_scan_combined(x, dt, A, B, C, dl, L, chunk_size=64, D=None, z=None,
                               dt_bias=None, initial_states=None, seq_idx=None,
                               cu_seqlens=None, dt_softplus=False,
                               dt_limit=(0.0, float("inf")), return_final_states=False,
                               cp_context: Optional[CPContext] = None):
    """lightning_ops.loglinear.hmamba_chunk_scan_combined (log-linear Mamba-2's scan) over a CP
    group: chunk_log_linear_attn's wrapper with q = C, k = B, v = x dt, g = A dt, level weights
    softplus(L dl); D x and the silu(z) gate are per token, so they need no exchange. States as
    chunk_log_linear_attn's wrapper. Returns (y, state or None), as the public op."""
    if cp_context is None:
        return _ll_ops.hmamba_chunk_scan_combined(
            x, dt, A, B, C, dl, L, chunk_size, D, z, dt_bias, initial_states, seq_idx,
            cu_seqlens, dt_softplus, dt_limit, return_final_states)
    _no_cu(cu_seqlens)
    if seq_idx is not None:
        raise ValueError("seq_idx is not supported with cp_context: pass the global cu_seqlens "
                         "to build_cp_context")
    if x.dim() != 4:  # the public op's 3-D form is a one-token decode step, not a CP slice
        raise ValueError(f"with cp_context, x must be this rank's slice [b, l, h, p], got shape "
                         f"{list(x.shape)}")
    if B.shape != C.shape:
        raise ValueError(f"B and C must have the same shape, got {list(B.shape)} and "
                         f"{list(C.shape)}")
    # the public op's own parametrisation (loglinear.ops.hmamba_chunk_scan_combined)
    dt = effective_dt(dt, dt_bias, dt_softplus, dt_limit)
    v = (x * dt[..., None]).to(x.dtype)
    lam = F.softplus(L * dl).to(L.dtype)
    y, state = chunk_log_linear_attn(C, B, v, A * dt, lam, initial_states, return_final_states,
                                     chunk_size=chunk_size, cp_context=cp_context)
    if D is not None:
        y = y + x * (D[:, None] if D.dim() == 1 else D)
    if z is not None:
        y = y * F.silu(z)
    return y, state


def _level_apply(A: Tensor, S: Tensor) -> Tensor:
    return torch.einsum("nhlm,nhlkv->nhmkv", A, S)  # A [n, H, L, L] (decay x move)


def chunk_log_linear_gated_delta_rule(q, k, v, g, level_scales, beta, scale=None,
                                      initial_state=None, output_final_state=False,
                                      cu_seqlens=None, use_qk_l2norm_in_kernel=False, *,
                                      chunk_size=TORCH_CHUNK,
                                      cp_context: Optional[CPContext] = None):
    """lightning_ops.chunk_log_linear_gated_delta_rule over a CP group (states as
    chunk_log_linear_attn's wrapper). The continuing piece's K x K transition M and u_t =
    scale M_t^T q_t come from the public chunk_gated_delta_rule on that piece (zero values,
    identity initial state): every level passes the same gated delta transition."""
    if cp_context is None:
        return _ll_delta.chunk_log_linear_gated_delta_rule(
            q, k, v, g, level_scales, beta, scale, initial_state, output_final_state,
            cu_seqlens, use_qk_l2norm_in_kernel, chunk_size=chunk_size)
    _no_cu(cu_seqlens)
    cp = cp_context
    cu = None if cp.dense else cp.local_cu_seqlens(q.device)
    K, H, L = q.shape[3], v.shape[2], level_scales.shape[3]
    scale_ = 1.0 if scale is None else float(scale)
    HKK = H * K * K

    def run(state):
        return _ll_delta.chunk_log_linear_gated_delta_rule(
            q, k, v, g, level_scales, beta, scale, state, True, cu, use_qk_l2norm_in_kernel,
            chunk_size=chunk_size)

    def apply(A, S):  # A [n, H K K + L L]: M and the level move
        n = S.shape[0]
        M, move = A[:, :HKK].reshape(n, H, K, K), A[:, HKK:].reshape(n, L, L)
        return torch.matmul(M[:, :, None], torch.einsum("nlm,nhlkv->nhmkv", move, S))

    def first(L0, lev0, move):
        sd = move.dtype
        n = lev0.shape[0]
        eye = torch.eye(K, dtype=sd, device=q.device).expand(n, H, K, K)
        u, M = _delta_ops.delta_rule(q[:, :L0], k[:, :L0], v.new_zeros(n, L0, H, K), g[:, :L0],
                                     beta[:, :L0], scale_, eye, True, None,
                                     use_qk_l2norm_in_kernel, "chunk", SCALAR_GATE)
        W = _ll_weights(level_scales[:, :L0].to(sd), lev0)
        uf = u.to(sd)
        trans = torch.cat([M.to(sd).reshape(n, -1), move.reshape(n, -1)], dim=1)
        return _Piece(trans, apply, lambda S: _ll_correct(W, uf, S))

    return _log_linear(cp, q, v, level_scales, initial_state, output_final_state, run, first,
                       (HKK + L * L,), apply)

"""Log-linear Gated DeltaNet (Guo et al. 2025, "Log-Linear Attention", sec. 3.3): the gated delta
rule over the Fenwick hierarchy of log-linear attention.

    o, state = chunk_log_linear_gated_delta_rule(q, k, v, g, level_scales, beta, scale=None,
                                                 initial_state=None, output_final_state=False,
                                                 cu_seqlens=None,
                                                 use_qk_l2norm_in_kernel=False)

q, k [B, T, G, K] (G key heads shared by H = m * G value heads), v [B, T, H, V], g [B, T, H] log
decays, level_scales [B, T, H, L] (lambda: the weight of Fenwick level l for each query; levels
>= L weigh 0), beta [B, T, H]. The positional order (q, k, v, g, level_scales, beta) is the
authors' chunk_h_gated_delta_rule(q, k, v, g, l, beta, ...) (fla has no log-linear Gated DeltaNet
op; its chunk_log_linear_attn is the Mamba-2 form, lightning_ops.loglinear.ops). scale defaults
to 1.0 as in chunk_log_linear_attn (the authors divide lambda by scale before the kernel
multiplies by it, so their op computes scale 1 too).

The math (reference.log_linear_gated_delta_rule_ref): one K x V state per Fenwick level; every
token applies the gated delta rule's transition A_t = (I - beta_t k_t k_t^T) exp(g_t) to EVERY
level state, writes beta_t k_t v_t^T as level 0, reads o_t = scale sum_l lambda_t[l] S_l^T q_t,
then merges levels as log-linear attention does. Equivalently

    o_t = scale sum_{s <= t} lambda_t[lev(s, t)] (q_t^T A_t ... A_{s+1} k_s) beta_s v_s,

lev(t, t) = 0, lev(s, t) = bit_length(s xor t) (absolute positions). The levels sum to the Gated
DeltaNet state: with every lambda = 1 (and enough levels) the op is chunk_gated_delta_rule.

State: LogLinearAttentionState(ht [N, H, L, K, V], offsets [N]), the same layout and rules as
chunk_log_linear_attn's (slot l holds the bucket of size 2^(l-1), zero unless bit l-1 of the
offset is set; in a given state such slots are ignored).

The chunked form (this module's torch implementation). Chunks of C = 2^c tokens aligned on
absolute positions (a sequence starting at offset t0 is front-padded with t0 % C tokens whose
transition is the identity: g = 0, k = beta = 0). Per chunk, the WY/UT representation of the
gated delta rule (as lightning_ops.delta.torch: b the chunk-local prefix sums of g, all decays
exp of sums of their own gates via chunk.torch's prefix / suffix / segment sums):

  Tinv = (I + tril(beta_i (k_i . k_j) exp(b_i - b_j), -1))^-1,  u = Tinv beta v,
  w = Tinv beta exp(b) k,  kd = k exp(b_last - b),  P = [(q_i . k_j) exp(b_i - b_j)]_{j <= i}

  intra   o_i = sum_{j <= i} lambda_i[lev(i, j)] Phat_ij v_j,  Phat = P Tinv diag(beta)
          (Phat_ij = q_i^T A_i ... A_{j+1} k_j beta_j: Gated DeltaNet's intra-chunk attention)
  inter   a state S entering the chunk reaches query i as q_i^T A_i ... A_1 S = Qe_i S with the
          effective query Qe = q exp(b) - P w, shared by every level:
          o_i += sum_m lambda_i[c + 1 + m] Qe_i S_m   (S_m the chunk-level Fenwick states)
  states  every level state passes the chunk as S <- Tr S, Tr = exp(b_last) I - kd^T w, the
          chunk's own writes are kd^T u; then the levels merge as in log-linear attention
          (with mu = trailing ones of the chunk index, the levels < mu and the chunk's writes
          become level mu).

An initial state enters as its own terms: slot l passes every chunk by Tr and reaches query t at
level lev(rep_l, t), rep_l = ((t0 >> (l-1)) << (l-1)) - 1. Cost O(T C (C + K + V) + T log(T/C)
K V) (the log(T/C) chunk-level states each pass every chunk by a K x K transition), nothing T x T.

Backend ("loglinear_delta" family): triton (loglinear/triton_delta.py: the forward kernels, the
same chunked math; the default on CUDA, no host sync) or torch (this module; the default on CPU,
and float64 everywhere unless forced). Non-finite inputs: lightning_ops.nonfinite.NonFiniteGuard
on either backend (a NaN/Inf in k, v, g or beta at token t reaches only outputs from t on).
Backward: torch autograd through this module's chunked forward (the torch backend's allowance;
there is no Triton backward), whichever backend ran the forward, wrapped with it as one
torch.library custom op (lightning_ops::log_linear_gated_delta_rule, fake impl + autograd
recomputing the torch forward), so torch.compile(fullgraph=True) traces it. The torch forward
reads varlen and offsets on the host. `fused_recurrent_log_linear_gated_delta_rule` and
`log_linear_gated_delta_rule_step` (one token, on the device, O(log T) states) are the decode
form.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .. import backend as _backend
from .. import validation as Vd
from .._custom_op import (call_op, contiguous, empty_like_none, forbid_double_backward,
                          grad_by_recompute, grad_if_present, is_empty, none_if_empty, own_storage,
                          passthrough_grad, passthrough_state, register_autograd)
from ..chunk.constants import TORCH_CHUNK
from ..chunk.torch import causal_scores, prefix_sum, segment_sums, suffix_sum_exclusive
from ..delta.l2norm import l2norm
from ..nonfinite import NonFiniteGuard
from ..precision import accumulation_dtype
from .ops import (LogLinearAttentionState, _check, _merged_step, _next_offsets, _step_levels,
                  _step_state, needs_grad, token_walk)
from .torch import _bitlen, _intra_levels, _levels_of, merge_levels

Tensor = torch.Tensor

__all__ = ["chunk_log_linear_gated_delta_rule", "fused_recurrent_log_linear_gated_delta_rule",
           "log_linear_gated_delta_rule_step"]


# ---------------------------------------------------------------------------------------------
# The chunked torch implementation
# ---------------------------------------------------------------------------------------------
def _unit_lower_inverse(A: Tensor, beta: Tensor) -> Tensor:
    """(I + tril(beta_i A_ij, -1))^-1, batched (the WY/UT transform's solve, as an inverse: the
    intra-chunk attention needs P Tinv)."""
    Lm = (A * beta[..., None]).tril(-1)
    eye = torch.eye(Lm.shape[-1], dtype=Lm.dtype, device=Lm.device).expand_as(Lm)
    return torch.linalg.solve_triangular(Lm, eye, upper=False, unitriangular=True)


def _group(q, k, v, g, beta, lam, h0, t0: int, C: int, scale: float, want_final: bool):
    """One group of sequences sharing offset t0 and length n: q/k/v [B, n, H, *] (q/k per value
    head), g/beta [B, n, H], lam [B, n, H, L], h0 [B, H, L, K, V] or None; all in the compute
    dtype. Returns o [B, n, H, V] and the final ht [B, H, L, K, V] (or None)."""
    B, n, H, K = q.shape
    V, L = v.shape[-1], lam.shape[-1]
    dev, dt = q.device, q.dtype
    t_end = t0 + n
    c = C.bit_length() - 1
    n_inter = max(L - (c + 1), 0)  # chunk levels m with token level c + 1 + m < L
    reps = [((t0 >> (l - 1)) << (l - 1)) - 1 if l and (t0 >> (l - 1)) & 1 else -1
            for l in range(L)]
    slots0 = [] if h0 is None else [l for l in range(L) if reps[l] >= 0]
    H0 = {l: h0[:, :, l] for l in slots0}  # the initial slots that exist, passed along chunks
    o = v.new_zeros(B, n, H, V)
    slots: List[Optional[Tensor]] = [None] * L
    if n > 0:
        p = t0 % C
        NC = -(-(p + n) // C)
        pad = (p, NC * C - p - n)

        def chunked(x):  # [B, n, H, *] -> [B, H, NC, C, *]
            x = torch.nn.functional.pad(x.movedim(1, -1), pad)
            return x.reshape(*x.shape[:-1], NC, C).movedim(-2, 2).movedim(-1, 3)

        qc, kc, vc, lc, gc, bc = (chunked(x) for x in (q, k, v, lam, g, beta))
        # the WY/UT transform of every chunk
        D = segment_sums(gc).exp()  # [B, H, NC, C, C]: exp(b_i - b_j), j <= i
        Tinv = _unit_lower_inverse(causal_scores(kc, kc, D), bc)
        P = causal_scores(qc, kc, D)
        pre = prefix_sum(gc[..., None], 3)  # [B, H, NC, C, 1]
        q_decay = pre.exp()
        bcol = bc[..., None]
        u = Tinv @ (vc * bcol)
        w = Tinv @ (kc * bcol * q_decay)
        # intra-chunk: Gated DeltaNet's attention weighed by the levels
        lev, _ = _intra_levels(C, L, dev)
        lam_pad = torch.cat([lc, lc.new_zeros(*lc.shape[:-1], 1)], -1)
        Wl = lam_pad.gather(-1, lev.expand(B, H, NC, C, C))
        Phat = (P @ Tinv) * bc[..., None, :]
        oc = (Phat * Wl) @ vc  # [B, H, NC, C, V]
        if n_inter > 0 or want_final or slots0:
            kdT = (kc * suffix_sum_exclusive(gc[..., None], 3).exp()).transpose(-1, -2)
            Qe = qc * q_decay - P @ w  # [B, H, NC, C, K]
            eye = torch.eye(K, dtype=dt, device=dev)
            Tr = pre[:, :, :, -1:, :].exp() * eye - kdT @ w  # [B, H, NC, K, K]
            local = kdT @ u  # [B, H, NC, K, V]
            W0 = None
            if slots0:  # the initial slots' level weights for every token
                lev0 = torch.tensor(_levels_of(reps, list(range(t0, t_end)), L), device=dev)
                lp = torch.cat([lam, lam.new_zeros(B, n, H, 1)], -1)
                W0 = chunked(lp.gather(-1, lev0[None, :, None, :].expand(B, n, H, L)))
            a0 = (t0 - p) // C
            S: List[Optional[Tensor]] = [None] * n_inter
            last_pre_merge: List[Optional[Tensor]] = []
            inter = []
            for j in range(NC):
                Qj, Trj = Qe[:, :, j], Tr[:, :, j]
                terms = [lc[:, :, j, :, c + 1 + m, None] * (Qj @ S[m])
                         for m in range(n_inter) if S[m] is not None]
                terms += [W0[:, :, j, :, l, None] * (Qj @ s) for l, s in H0.items()]
                inter.append(sum(terms) if terms else None)
                S = [None if s is None else Trj @ s for s in S]
                H0 = {l: Trj @ s for l, s in H0.items()}
                if j == NC - 1:
                    last_pre_merge = list(S)
                merge_levels(S, local[:, :, j], a0 + j, n_inter)
            if any(x is not None for x in inter):
                zero = oc.new_zeros(B, H, C, V)
                oc = oc + torch.stack([zero if x is None else x for x in inter], 2)
            if want_final:
                r = t_end % C
                src = S if r == 0 else last_pre_merge
                for m in range(n_inter):
                    slots[c + 1 + m] = src[m]
                if r:  # tokens of the last (partial) chunk: the low levels of t_end
                    levs = torch.tensor([min(_bitlen(jj ^ r), L) if jj < r else L
                                         for jj in range(C)], device=dev)
                    onehot = torch.nn.functional.one_hot(levs, L + 1)[:, :L].to(dt)  # [C, L]
                    M = kdT[:, :, -1] @ Tinv[:, :, -1]  # [B, H, K, C]: Phi(end, j) k_j
                    low = torch.einsum("bhkc,bhc,bhcv,cl->bhlkv", M, bc[:, :, -1], vc[:, :, -1],
                                       onehot)
                    for l in range(1, min(c + 1, L)):
                        slots[l] = low[:, :, l] if slots[l] is None else slots[l] + low[:, :, l]
        o = oc.reshape(B, H, NC * C, V)[:, :, p:p + n].transpose(1, 2)
    ht = None
    if want_final:
        if H0:  # each initial slot at its level for t_end
            end = _levels_of(reps, [t_end], L)[0]
            for l, s in H0.items():
                if end[l] < L:
                    slots[end[l]] = s if slots[end[l]] is None else slots[end[l]] + s
        zero = torch.zeros(B, H, K, V, dtype=dt, device=dev)
        ht = torch.stack([zero if s is None else s for s in slots], 2)
    return o * scale, ht


def forward(q: Tensor, k: Tensor, v: Tensor, g: Tensor, level_scales: Tensor, beta: Tensor,
            scale: float, h0: Optional[Tensor], offsets: Optional[Tensor],
            output_final_state: bool, cu_seqlens: Optional[Tensor], use_qk_l2norm: bool,
            chunk_size: int = TORCH_CHUNK):
    """q/k [B, T, G, K], v [B, T, H, V], g/beta [B, T, H], level_scales [B, T, H, L]; h0
    [N, H, L, K, V] with offsets [N] (or None). Returns o [B, T, H, V] (v's dtype) and
    (ht, offsets) or None. Differentiable by autograd. Reads cu_seqlens and offsets on the
    host."""
    B, T, G, K = q.shape
    H, V, L = v.shape[2], v.shape[-1], level_scales.shape[-1]
    dt = accumulation_dtype(q)
    guard = NonFiniteGuard.build(k, v, (g,), (beta,), cu_seqlens=cu_seqlens)
    if guard is not None:
        k, v, (g,), (beta,) = guard.clean(k, v, (g,), (beta,))
    qx, kx = q.to(dt), k.to(dt)
    if use_qk_l2norm:
        qx, kx = l2norm(qx)[0], l2norm(kx)[0]
    rep = H // G
    if rep > 1:
        qx, kx = qx.repeat_interleave(rep, 2), kx.repeat_interleave(rep, 2)
    ins = (qx, kx, v.to(dt), g.to(dt), beta.to(dt), level_scales.to(dt))
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    offs = [0] * N if offsets is None else [int(x) for x in offsets.reshape(-1).tolist()]
    h0x = None if h0 is None else h0.to(dt)
    if cu_seqlens is None:  # dense rows grouped by offset
        segs = [([b for b in range(B) if offs[b] == o0], None) for o0 in sorted(set(offs))]
    else:
        bounds = cu_seqlens.tolist()
        segs = [([n], (bounds[n], bounds[n + 1])) for n in range(N)]
    hts: List[Optional[Tensor]] = [None] * N
    pieces = []
    for ids, span in segs:
        t0 = offs[ids[0]]
        if span is None:
            args = ins if len(ids) == B else \
                [x.index_select(0, torch.tensor(ids, device=q.device)) for x in ins]
        else:
            args = [x[:, span[0]:span[1]] for x in ins]
        hg = None if h0x is None else h0x[ids]
        n_tok = args[0].shape[1]
        C = min(chunk_size, 1 << max(0, (t0 % chunk_size + n_tok - 1).bit_length()))
        og, hg_out = _group(*args, hg, t0, C, scale, output_final_state)
        pieces.append((ids, og))
        if output_final_state:
            for i, n in enumerate(ids):
                hts[n] = hg_out[i]
    if cu_seqlens is not None:
        o = torch.cat([og for _, og in pieces], 1) if pieces else ins[2].new_zeros(1, 0, H, V)
    elif len(pieces) == 1:
        o = pieces[0][1]
    else:
        order = [n for ids, _ in pieces for n in ids]
        inv = torch.empty(B, dtype=torch.int64)
        inv[torch.tensor(order)] = torch.arange(B)
        o = torch.cat([og for _, og in pieces], 0).index_select(0, inv.to(q.device))
    final = None
    if output_final_state:
        ht = torch.stack(hts, 0) if N else ins[2].new_zeros(0, H, L, K, V)
        lengths = [T] * N if cu_seqlens is None else [b - a for _, (a, b) in segs]
        final = (ht, torch.tensor([offs[n] + lengths[n] for n in range(N)], dtype=torch.int64,
                                  device=q.device))
    o = o.to(v.dtype)
    if guard is not None:
        ht = None if final is None else final[0]
        o, flat = guard.poison(o, None if ht is None else ht.reshape(N, H, L * K, V))
        if final is not None:
            final = (flat.reshape(N, H, L, K, V), final[1])
    return o, final


# ---------------------------------------------------------------------------------------------
# The torch.library custom ops (forward, backward): torch.compile(fullgraph=True) sees one opaque
# node. The forward runs on the resolved backend (`backend`: torch, or triton's
# loglinear/triton_delta.forward); the backward recomputes the torch forward under autograd.
# Absent optional outputs travel as empty tensors (custom ops cannot return None).
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("lightning_ops::log_linear_gated_delta_rule", mutates_args=())
def _lld_fwd(q: Tensor, k: Tensor, v: Tensor, g: Tensor, level_scales: Tensor, beta: Tensor,
             h0: Optional[Tensor], offsets: Optional[Tensor], cu_seqlens: Optional[Tensor],
             scale: float, output_final_state: bool, use_qk_l2norm: bool, chunk_size: int,
             backend: str = "torch") -> Tuple[Tensor, Tensor, Tensor]:
    # value checks here too: under torch.compile only this body sees real tensors
    Vd.check_cu_seqlens_values(cu_seqlens, q.shape[1])
    B, T, G, K = q.shape
    H, V, L = v.shape[2], v.shape[3], level_scales.shape[3]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    acc = accumulation_dtype(q)
    if is_empty(q, v):  # no tokens, heads or features: zeros, states passed through
        if not output_final_state:
            return v.new_zeros(v.shape), q.new_empty(0, dtype=acc), \
                q.new_empty(0, dtype=torch.int64)
        return v.new_zeros(v.shape), passthrough_state(h0, (N, H, L, K, V), q, acc, True), \
            _next_offsets(offsets, cu_seqlens, N, T, q)
    # the triton forward (loglinear/triton_delta.py) builds its NonFiniteGuard as forward does
    run = forward if backend == "torch" else \
        _backend.implementation("loglinear_delta", backend).forward
    o, final = run(q, k, v, g, level_scales, beta, scale, h0, offsets, output_final_state,
                   cu_seqlens, use_qk_l2norm, chunk_size)
    o = o.contiguous()
    if final is None:
        return o, q.new_empty(0, dtype=acc), q.new_empty(0, dtype=torch.int64)
    return (o, *own_storage((final[0].to(acc), final[1])))


@_lld_fwd.register_fake
def _(q, k, v, g, level_scales, beta, h0, offsets, cu_seqlens, scale, output_final_state,
      use_qk_l2norm, chunk_size, backend="torch"):
    B, T, G, K = q.shape
    H, V, L = v.shape[2], v.shape[3], level_scales.shape[3]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    want = output_final_state
    return (v.new_empty(v.shape),
            q.new_empty((N, H, L, K, V) if want else (0,), dtype=accumulation_dtype(q)),
            q.new_empty((N,) if want else (0,), dtype=torch.int64))


def _grad_forward(q, k, v, g, level_scales, beta, h0, offsets, cu_seqlens, scale, want,
                  use_qk_l2norm, chunk_size):
    o, final = forward(q, k, v, g, level_scales, beta, scale, h0, offsets, want, cu_seqlens,
                       use_qk_l2norm, chunk_size)
    ht = None if final is None else final[0]
    if ht is not None and not ht.requires_grad:  # every slot is structurally zero (L = 1):
        ht = None  # a constant, so dht contributes nothing (grad_by_recompute wants a graph)
    return o, ht


@torch.library.custom_op("lightning_ops::log_linear_gated_delta_rule_backward", mutates_args=())
def _lld_bwd(do: Tensor, dht: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, g: Tensor,
             level_scales: Tensor, beta: Tensor, h0: Optional[Tensor], offsets: Optional[Tensor],
             cu_seqlens: Optional[Tensor], scale: float, use_qk_l2norm: bool, chunk_size: int
             ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    if is_empty(q, v):
        return (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v),
                torch.zeros_like(g), torch.zeros_like(level_scales), torch.zeros_like(beta),
                passthrough_grad(dht, h0, q))
    grads = grad_by_recompute(
        lambda *a: _grad_forward(*a, scale, dht is not None, use_qk_l2norm, chunk_size),
        (q, k, v, g, level_scales, beta, h0, offsets, cu_seqlens), (do, dht))
    dq, dk, dv, dg, dl, db, dh0 = grads[:7]
    return (*contiguous(dq, dk, dv, dg, dl, db), empty_like_none(dh0, q))


@_lld_bwd.register_fake
def _(do, dht, q, k, v, g, level_scales, beta, h0, offsets, cu_seqlens, scale, use_qk_l2norm,
      chunk_size):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(g),
            torch.empty_like(level_scales), torch.empty_like(beta),
            q.new_empty(0) if h0 is None else torch.empty_like(h0))


def _setup(ctx, inputs, output):
    q, k, v, g, lam, beta, h0, off, cu, scale, _, use_l2, chunk_size = inputs[:13]
    ctx.save_for_backward(q, k, v, g, lam, beta, h0, off, cu)
    ctx.scale, ctx.use_l2, ctx.chunk_size = scale, use_l2, chunk_size


def _backward(ctx, do, dht, doff):
    q, k, v, g, lam, beta, h0, off, cu = ctx.saved_tensors
    dht = none_if_empty(dht)
    dq, dk, dv, dg, dl, db, dh0 = call_op(_lld_bwd, do.contiguous(), dht, q, k, v, g, lam, beta,
                                          h0, off, cu, ctx.scale, ctx.use_l2, ctx.chunk_size)
    return (dq, dk, dv, dg, dl, db, grad_if_present(dh0, h0), None, None, None, None, None, None,
            None)


_lld_call = register_autograd(_lld_fwd, _backward, _setup)
forbid_double_backward(_lld_bwd, lambda inputs: "chunk_log_linear_gated_delta_rule")


def _check_beta(beta: Tensor, q: Tensor, v: Tensor) -> None:
    Vd.check_float("beta", beta)
    Vd.check_shape("beta", beta, (q.shape[0], q.shape[1], v.shape[2]), "[B, T, H]")
    if beta.device != q.device:
        raise ValueError(f"beta is on {beta.device} but q is on {q.device}")


def chunk_log_linear_gated_delta_rule(
        q: Tensor, k: Tensor, v: Tensor, g: Tensor, level_scales: Tensor, beta: Tensor,
        scale: Optional[float] = None,
        initial_state: Optional[LogLinearAttentionState] = None,
        output_final_state: bool = False, cu_seqlens: Optional[Tensor] = None,
        use_qk_l2norm_in_kernel: bool = False, *, chunk_size: int = TORCH_CHUNK
) -> Tuple[Tensor, Optional[LogLinearAttentionState]]:
    """Log-linear Gated DeltaNet (see the module docstring): q/k [B, T, G, K], v [B, T, H, V],
    g/beta [B, T, H], level_scales [B, T, H, L]; returns (o [B, T, H, V], the final
    LogLinearAttentionState or None). A torch.library custom op
    (lightning_ops::log_linear_gated_delta_rule): torch.compile(fullgraph=True) traces it. The
    forward runs on the chosen backend (triton or torch); the backward recomputes the torch
    forward under autograd."""
    _check(q, k, v, g, level_scales, initial_state, cu_seqlens, scale, chunk_size)
    _check_beta(beta, q, v)
    name = _backend.resolve("loglinear_delta", q.device, q.dtype)  # a forced cuda one raises
    Vd.check_flag("output_final_state", output_final_state)
    Vd.check_flag("use_qk_l2norm_in_kernel", use_qk_l2norm_in_kernel)
    h0, off = (None, None) if initial_state is None else initial_state
    if off is not None:
        off = off.to(torch.int64)
    q, k, v, g, level_scales, beta, h0, off = contiguous(q, k, v, g, level_scales, beta, h0, off)
    o, ht, offsets = _lld_call(q, k, v, g, level_scales, beta, h0, off, cu_seqlens,
                               1.0 if scale is None else float(scale), bool(output_final_state),
                               bool(use_qk_l2norm_in_kernel), int(chunk_size), name)
    return o, (LogLinearAttentionState(ht, offsets) if output_final_state else None)


# ---------------------------------------------------------------------------------------------
# Decode: one token per sequence over the O(log T) level states
# ---------------------------------------------------------------------------------------------
def log_linear_gated_delta_rule_step(q: Tensor, k: Tensor, v: Tensor, g: Tensor,
                                     level_scales: Tensor, beta: Tensor,
                                     state: LogLinearAttentionState,
                                     scale: Optional[float] = None,
                                     use_qk_l2norm_in_kernel: bool = False, *,
                                     inplace_final_state: bool = False
                                     ) -> Tuple[Tensor, LogLinearAttentionState]:
    """One decode token per sequence, on the device (no host sync): q/k [N, G, K], v [N, H, V],
    g/beta [N, H], level_scales [N, H, L]. Returns (o [N, H, V], the next state). O(L K V)
    work per (sequence, head), one new full-size tensor; the slots that do not exist at the
    offsets must be finite; inplace_final_state as in log_linear_attn_step."""
    ht, off = state
    N, H, L, K, V = ht.shape
    dt = accumulation_dtype(q)
    qx, kx = q.to(dt), k.to(dt)
    if use_qk_l2norm_in_kernel:
        qx, kx = l2norm(qx)[0], l2norm(kx)[0]
    rep = H // q.shape[1]
    if rep > 1:
        qx, kx = qx.repeat_interleave(rep, 1), kx.repeat_interleave(rep, 1)
    vx, lam, b = v.to(dt), level_scales.to(dt), beta.to(dt)
    hx, inplace = _step_state(ht, dt, inplace_final_state)
    off = off.to(torch.int64)
    f = _step_levels(off, g.to(dt).exp(), L)
    # q^T h_l and k^T h_l for every level: one batched matmul, one pass over the levels
    qk2 = torch.stack([qx, kx], 2)[:, :, None]  # [N, H, 1, 2, K]
    P = torch.matmul(qk2, hx)  # [N, H, L, 2, V]
    qS, kS = P[..., 0, :], P[..., 1, :]
    # level l after the transition: a [slot l exists] (h_l - b k (k^T h_l)^T); level 0 the write
    bqk = b * (qx * kx).sum(-1)  # [N, H]
    o = torch.einsum("nhl,nhlv->nhv", lam * f.read, qS - bqk[..., None, None] * kS)
    o = o + (lam[..., 0] * bqk)[..., None] * vx
    if scale is not None:
        o = o * scale
    new = _merged_step(hx, f, b[..., None] * kx, vx, kS, inplace)
    return o.to(v.dtype), LogLinearAttentionState(new.to(ht.dtype), off + 1)


def fused_recurrent_log_linear_gated_delta_rule(
        q: Tensor, k: Tensor, v: Tensor, g: Tensor, level_scales: Tensor, beta: Tensor,
        scale: Optional[float] = None,
        initial_state: Optional[LogLinearAttentionState] = None,
        output_final_state: bool = False, cu_seqlens: Optional[Tensor] = None,
        use_qk_l2norm_in_kernel: bool = False
) -> Tuple[Tensor, Optional[LogLinearAttentionState]]:
    """The decode form over a whole sequence: log_linear_gated_delta_rule_step token by token
    (same arguments as chunk_log_linear_gated_delta_rule; differentiable by autograd)."""
    N = _check(q, k, v, g, level_scales, initial_state, cu_seqlens, scale)
    _check_beta(beta, q, v)
    inplace = not needs_grad(q, k, v, g, level_scales, beta, initial_state)

    def step(rows, t, state):
        return log_linear_gated_delta_rule_step(
            q[rows, t], k[rows, t], v[rows, t], g[rows, t], level_scales[rows, t],
            beta[rows, t], state, scale, use_qk_l2norm_in_kernel, inplace_final_state=inplace)
    return token_walk(step, q, v, level_scales.shape[3], N, initial_state, output_final_state,
                      cu_seqlens)

"""Public log-linear attention ops (fla's chunk_log_linear_attn names and layout).

    o, state = chunk_log_linear_attn(q, k, v, g, level_scales, initial_state=None,
                                     output_final_state=False, cu_seqlens=None, *, scale=None)

q, k [B, T, G, K] (G key heads shared by H = m * G value heads; fla's log-linear Mamba-2 has
G = 1), v [B, T, H, V], g [B, T, H] log decays, level_scales [B, T, H, L] (lambda: the weight of
Fenwick level l for each query; levels >= L weigh 0). scale defaults to 1.0 as in fla's op (it has
no scale argument; the library's K**-0.5 default does not apply here).

State: LogLinearAttentionState(ht [N, H, L, K, V] float32, offsets [N] int64): the level states
of the Fenwick hierarchy for the next query position offsets[n] (slot 0 always zero; slot l holds
the bucket of size 2^(l-1), decayed to the last token, and is zero unless bit l-1 of the offset
is set; in a given state such slots are ignored: read as zero, gradient zero; the decode
steps, which multiply them by 0 rather than mask them, need them finite).
Unlike fla's LogLinearAttentionState it carries no previous-chunk inputs: the torch path
needs no chunk alignment with the past. `fused_recurrent_log_linear_attn` and
`log_linear_attn_step` (one token, all on the device) are the decode form.

Backend ("loglinear" family): triton (loglinear/triton.py: the forward kernels; the default on
CUDA) or torch (chunked PyTorch; the default on CPU, and float64 everywhere unless forced).
chunk_log_linear_attn is a torch.library custom op (lightning_ops::log_linear_attn, fake impl +
autograd), so torch.compile(fullgraph=True) traces through it. Its backward runs on the backend
that ran the forward: Triton kernels (loglinear/triton_backward.py) after a triton forward, else
the torch implementation's hand-written one (loglinear.torch.backward); neither uses autograd or
forms anything T x T.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from .. import backend as _backend
from .. import validation as Vd
from .._custom_op import (call_op, contiguous, empty_like_none, forbid_double_backward,
                          grad_if_present, is_empty, none_if_empty, own_storage, passthrough_grad,
                          passthrough_state, register_autograd)
from ..chunk.constants import TORCH_CHUNK
from ..precision import accumulation_dtype
from ..ssm.dt import effective_dt
from . import torch as _impl

Tensor = torch.Tensor


class LogLinearAttentionState(NamedTuple):
    ht: Tensor       # [N, H, L, K, V]
    offsets: Tensor  # [N] int64: position of the next token of each sequence


def _check(q, k, v, g, level_scales, initial_state, cu_seqlens, scale, chunk_size=64):
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g), ("level_scales", level_scales)):
        Vd.check_float(name, x)
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must have shape [B, T, G, K] and match, got {list(q.shape)} "
                         f"and {list(k.shape)}")
    B, T, G, K = q.shape
    if v.dim() != 4 or v.shape[:2] != (B, T):
        raise ValueError(f"v must have shape [B, T, H, V] = [{B}, {T}, H, V], got {list(v.shape)}")
    H, V = v.shape[2], v.shape[3]
    if G == 0 or H % G:
        raise ValueError(f"v's heads H = {H} must be a multiple of q/k's heads G = {G}")
    Vd.check_shape("g", g, (B, T, H), "[B, T, H]")
    if level_scales.dim() != 4 or level_scales.shape[:3] != (B, T, H) or level_scales.shape[3] < 1:
        raise ValueError(f"level_scales must have shape [B, T, H, L] = [{B}, {T}, {H}, L>=1], "
                         f"got {list(level_scales.shape)}")
    for name, x in (("k", k), ("v", v), ("g", g), ("level_scales", level_scales)):
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
    if scale is not None:
        Vd.check_scale(scale)
    Vd.check_power_of_two("chunk_size", chunk_size)
    N = B
    if cu_seqlens is not None:
        N = Vd.check_cu_seqlens(cu_seqlens, B, T, q)
        Vd.check_cu_seqlens_values(cu_seqlens, T)
    if initial_state is not None:
        if not (isinstance(initial_state, tuple) and len(initial_state) == 2):
            raise TypeError("initial_state must be a LogLinearAttentionState(ht, offsets)")
        ht, off = initial_state
        L = level_scales.shape[3]
        if not isinstance(ht, Tensor) or tuple(ht.shape) != (N, H, L, K, V):
            raise ValueError(f"initial_state.ht must have shape [N, H, L, K, V] = "
                             f"{[N, H, L, K, V]}, got {list(getattr(ht, 'shape', []))}")
        if not isinstance(off, Tensor) or off.shape != (N,) or off.is_floating_point():
            raise ValueError(f"initial_state.offsets must be an integer tensor of shape [{N}]")
    return N


# ---------------------------------------------------------------------------------------------
# The torch.library custom ops (forward, backward) around the chunked torch implementation, so
# torch.compile(fullgraph=True) traces chunk_log_linear_attn as one opaque node. The backward is
# the forward backend's: loglinear.triton_backward after triton, loglinear.torch.backward
# (hand-written, chunked) otherwise. Absent optional outputs
# travel as empty tensors (custom ops cannot return None).
# ---------------------------------------------------------------------------------------------
def _next_offsets(offsets: Optional[Tensor], cu_seqlens: Optional[Tensor], N: int, T: int,
                  ref: Tensor) -> Tensor:
    """offsets + each sequence's length (fresh memory, int64, on the device)."""
    if cu_seqlens is None:
        lengths = torch.full((N,), T, dtype=torch.int64, device=ref.device)
    else:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    return lengths if offsets is None else offsets.to(torch.int64) + lengths


@torch.library.custom_op("lightning_ops::log_linear_attn", mutates_args=())
def _ll_fwd(q: Tensor, k: Tensor, v: Tensor, g: Tensor, level_scales: Tensor,
            h0: Optional[Tensor], offsets: Optional[Tensor], cu_seqlens: Optional[Tensor],
            scale: float, output_final_state: bool, chunk_size: int, backend: str = "torch"
            ) -> Tuple[Tensor, Tensor, Tensor]:
    # value checks here too: under torch.compile only this body sees real tensors
    Vd.check_cu_seqlens_values(cu_seqlens, q.shape[1])
    B, T, G, K = q.shape
    H, V, L = v.shape[2], v.shape[3], level_scales.shape[3]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if is_empty(q, v):  # no tokens, heads or features: zeros, states passed through
        if not output_final_state:
            return v.new_zeros(v.shape), q.new_empty(0, dtype=accumulation_dtype(q)), \
                q.new_empty(0, dtype=torch.int64)
        return v.new_zeros(v.shape), passthrough_state(h0, (N, H, L, K, V), q, accumulation_dtype(q),
                                                       True), \
            _next_offsets(offsets, cu_seqlens, N, T, q)
    impl = _impl if backend == "torch" else _backend.implementation("loglinear", backend)
    o, final = impl.forward(q, k, v, g, level_scales, scale, h0, offsets, output_final_state,
                            cu_seqlens, chunk_size)
    o = o.contiguous()  # the fake impl's (dense) layout
    if final is None:
        return o, q.new_empty(0, dtype=accumulation_dtype(q)), q.new_empty(0, dtype=torch.int64)
    return (o, *own_storage(final))


@_ll_fwd.register_fake
def _(q, k, v, g, level_scales, h0, offsets, cu_seqlens, scale, output_final_state, chunk_size,
      backend="torch"):
    B, T, G, K = q.shape
    H, V, L = v.shape[2], v.shape[3], level_scales.shape[3]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    want = output_final_state
    return (v.new_empty(v.shape),
            q.new_empty((N, H, L, K, V) if want else (0,), dtype=accumulation_dtype(q)),
            q.new_empty((N,) if want else (0,), dtype=torch.int64))


@torch.library.custom_op("lightning_ops::log_linear_attn_backward", mutates_args=())
def _ll_bwd(do: Tensor, dht: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, g: Tensor,
            level_scales: Tensor, h0: Optional[Tensor], offsets: Optional[Tensor],
            cu_seqlens: Optional[Tensor], scale: float, chunk_size: int, backend: str = "torch"
            ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    if is_empty(q, v):
        return (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v),
                torch.zeros_like(g), torch.zeros_like(level_scales),
                passthrough_grad(dht, h0, q))
    if backend == "triton":  # the backend that ran the forward runs the backward
        from . import triton_backward as bwd
    else:
        bwd = _impl
    dq, dk, dv, dg, dl, dh0 = bwd.backward(q, k, v, g, level_scales, scale, h0, offsets,
                                           cu_seqlens, do, dht, chunk_size)
    return (*contiguous(dq, dk, dv, dg, dl), empty_like_none(dh0, q))


@_ll_bwd.register_fake
def _(do, dht, q, k, v, g, level_scales, h0, offsets, cu_seqlens, scale, chunk_size,
      backend="torch"):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(g),
            torch.empty_like(level_scales),
            q.new_empty(0) if h0 is None else torch.empty_like(h0))


def _setup(ctx, inputs, output):
    q, k, v, g, lam, h0, off, cu, scale, _, chunk_size = inputs[:11]
    ctx.save_for_backward(q, k, v, g, lam, h0, off, cu)
    ctx.scale, ctx.chunk_size = scale, chunk_size
    ctx.backend = inputs[11] if len(inputs) > 11 else "torch"


def _backward(ctx, do, dht, doff):
    q, k, v, g, lam, h0, off, cu = ctx.saved_tensors
    dht = none_if_empty(dht)
    dq, dk, dv, dg, dl, dh0 = call_op(_ll_bwd, do.contiguous(), dht, q, k, v, g, lam, h0, off,
                                      cu, ctx.scale, ctx.chunk_size, ctx.backend)
    return (dq, dk, dv, dg, dl, grad_if_present(dh0, h0), None, None, None, None, None, None)


_ll_call = register_autograd(_ll_fwd, _backward, _setup)
forbid_double_backward(_ll_bwd, lambda inputs: "chunk_log_linear_attn")


def chunk_log_linear_attn(q: Tensor, k: Tensor, v: Tensor, g: Tensor, level_scales: Tensor,
                          initial_state: Optional[LogLinearAttentionState] = None,
                          output_final_state: bool = False,
                          cu_seqlens: Optional[Tensor] = None, *, scale: Optional[float] = None,
                          chunk_size: int = TORCH_CHUNK
                          ) -> Tuple[Tensor, Optional[LogLinearAttentionState]]:
    """Log-linear attention over the scalar gate (see the module docstring). A torch.library
    custom op (lightning_ops::log_linear_attn, fake impl + autograd): torch.compile traces it.
    The forward and the backward run on the chosen backend (triton or torch)."""
    _check(q, k, v, g, level_scales, initial_state, cu_seqlens, scale, chunk_size)
    name = _backend.resolve("loglinear", q.device, q.dtype)  # a forced unavailable one raises
    Vd.check_flag("output_final_state", output_final_state)
    h0, off = (None, None) if initial_state is None else initial_state
    if off is not None:
        off = off.to(torch.int64)
    q, k, v, g, level_scales, h0, off = contiguous(q, k, v, g, level_scales, h0, off)
    o, ht, offsets = _ll_call(q, k, v, g, level_scales, h0, off, cu_seqlens,
                              1.0 if scale is None else float(scale), bool(output_final_state),
                              int(chunk_size), name)
    return o, (LogLinearAttentionState(ht, offsets) if output_final_state else None)


class _StepLevels(NamedTuple):
    """The per-level factors of one decode step from positions off to off + 1 (all [N, H, L],
    a = exp(g) folded in, 0 for the slots that do not exist at off)."""
    read: Tensor   # a on the existing levels l >= 1: what the query reads after the decay
    keep: Tensor   # a on the existing levels above the merge: what stays in place at off + 1
    merge: Tensor  # a on the existing levels l <= mu (mu = trailing ones of off) when level
    #               mu + 1 < L exists: what the Fenwick merge sums into level mu + 1
    valid: Tensor  # [N, 1, 1] 1 when level mu + 1 < L (else the merged bucket falls off, as it
    #               weighs 0 for every later query)
    rows: Tensor   # [N * H] the row (n H + h) L + min(mu + 1, L - 1) of level mu + 1 in
    #               the [N H L, K V] view of the state (level L - 1 when invalid: then it is a
    #               merged level, written with zeros)


def _step_levels(off: Tensor, a: Tensor, L: int) -> _StepLevels:
    """Level factors for the step from off [N] (int64, on the device: no host sync) with the
    decays a [N, H]: arithmetic on the positions, O(N L)."""
    N, H = a.shape
    lv = torch.arange(L, device=off.device)
    o = off[:, None]
    exists = ((o >> (lv - 1).clamp(min=0)) & 1).bool() & (lv > 0)  # [N, L]: bit l-1 set
    below = ((o + 1) & ((1 << lv) - 1)) == 0  # [N, L]: l <= mu (bits 0..l-1 of off all set)
    mu = below.sum(1) - 1  # min(mu, L - 1)
    valid = mu + 1 < L
    dt = a.dtype
    ex = exists.to(dt)[:, None] * a[..., None]  # [N, H, L]
    keep = ex * (~below).to(dt)[:, None]
    merge = ex * (below & valid[:, None]).to(dt)[:, None]
    target = (mu + 1).clamp(max=L - 1)
    rows = (torch.arange(N * H, device=off.device).view(N, H) * L + target[:, None]).reshape(-1)
    return _StepLevels(ex, keep, merge, valid.to(dt)[:, None, None], rows)


def _merged_step(hx: Tensor, f: _StepLevels, kw: Tensor, vw: Tensor,
                 kS: Optional[Tensor] = None, inplace: bool = False) -> Tensor:
    """The state at off + 1 from the levels hx [N, H, L, K, V] (contiguous) at off: every
    level decayed (the factors f), the token's write kw vw^T ([N, H, K] x [N, H, V]) as level 0,
    then the Fenwick merge. With kS [N, H, L, V] (k^T S_l), each level first takes the delta
    rule's rank-one update S_l - kw kS_l^T. One new full-size tensor (none with inplace: hx
    itself is overwritten), then updated in place: O(L K V) per (sequence, head)."""
    N, H, L, K, V = hx.shape
    # the merged level mu + 1: the write plus the merged levels, by one bmm over the levels
    # (read before hx may be overwritten)
    merged = torch.bmm(f.merge.reshape(N * H, 1, L), hx.view(N * H, L, K * V)).view(N, H, K, V)
    vm = f.valid * vw
    if kS is not None:
        vm = vm - torch.einsum("nhl,nhlv->nhv", f.merge, kS)
    merged.addcmul_(kw[..., :, None], vm[..., None, :])
    keep = f.keep[..., None, None]
    new = hx.mul_(keep) if inplace else hx * keep
    if kS is not None:
        new.addcmul_((f.keep[..., None] * kw[:, :, None, :])[..., None], kS[:, :, :, None, :],
                     value=-1)
    new.view(N * H * L, K * V).index_copy_(0, f.rows, merged.view(N * H, K * V))
    return new


def _step_state(ht: Tensor, dt: torch.dtype, inplace: bool) -> Tuple[Tensor, bool]:
    """The levels as the step reads them (contiguous, dtype dt) and whether it may overwrite
    them: with inplace_final_state, when ht already is such a tensor."""
    hx = ht.to(dt).contiguous()
    return hx, bool(inplace) and hx is ht


def log_linear_attn_step(q: Tensor, k: Tensor, v: Tensor, g: Tensor, level_scales: Tensor,
                         state: LogLinearAttentionState, scale: Optional[float] = None, *,
                         inplace_final_state: bool = False
                         ) -> Tuple[Tensor, LogLinearAttentionState]:
    """One decode token per sequence, on the device (no host sync): q/k [N, G, K], v [N, H, V],
    g [N, H], level_scales [N, H, L]. Returns (o [N, H, V], the next state). O(log T) states,
    O(L K V) work per (sequence, head): the read is one bmm over the levels with the level
    weights folded into the query, the merge follows from the positions (_step_levels), one
    new full-size tensor. The slots that do not exist at the offsets are read as zero by
    multiplying them by 0: they must be finite (the states these ops return hold zeros there).

    inplace_final_state=True writes the next levels over state.ht when it is contiguous and of
    the accumulation dtype (float32 for half inputs), and returns it as the new state's ht: no
    new full-size tensor (on CPU, a fresh one costs more than the step's arithmetic), but the
    old state is gone and no gradient flows through it. Otherwise as without it."""
    ht, off = state
    N, H, L, K, V = ht.shape
    dt = accumulation_dtype(q)
    rep = H // q.shape[1]
    qx, kx = (x.to(dt).repeat_interleave(rep, 1) for x in (q, k))
    vx, lam = v.to(dt), level_scales.to(dt)
    hx, inplace = _step_state(ht, dt, inplace_final_state)
    off = off.to(torch.int64)
    f = _step_levels(off, g.to(dt).exp(), L)
    # o = lam_0 (q.k) v + sum_{l >= 1} lam_l a [slot l exists] q^T h_l
    qw = (lam * f.read)[..., None] * qx[:, :, None, :]  # [N, H, L, K]
    o = torch.bmm(qw.view(N * H, 1, L * K), hx.view(N * H, L * K, V)).view(N, H, V)
    o = o + (lam[..., 0] * (qx * kx).sum(-1))[..., None] * vx
    if scale is not None:
        o = o * scale
    new = _merged_step(hx, f, kx, vx, inplace=inplace)
    return o.to(v.dtype), LogLinearAttentionState(new.to(ht.dtype), off + 1)


def present_levels(ht: Tensor, off: Tensor) -> Tensor:
    """ht [N, H, L, K, V] with the buckets that do not exist at the offsets (slot 0, and slot l
    unless bit l-1 of the offset is set) read as zero."""
    lv = torch.arange(ht.shape[2], device=ht.device)
    exists = ((off[:, None] >> (lv[None, :] - 1).clamp(min=0)) & 1).bool() & (lv[None, :] > 0)
    return torch.where(exists[:, None, :, None, None], ht, 0)


def fused_recurrent_log_linear_attn(q: Tensor, k: Tensor, v: Tensor, g: Tensor,
                                    level_scales: Tensor,
                                    initial_state: Optional[LogLinearAttentionState] = None,
                                    output_final_state: bool = False,
                                    cu_seqlens: Optional[Tensor] = None, *,
                                    scale: Optional[float] = None
                                    ) -> Tuple[Tensor, Optional[LogLinearAttentionState]]:
    """The decode form over a whole sequence: log_linear_attn_step token by token."""
    N = _check(q, k, v, g, level_scales, initial_state, cu_seqlens, scale)
    inplace = not needs_grad(q, k, v, g, level_scales, initial_state)

    def step(rows, t, state):
        return log_linear_attn_step(q[rows, t], k[rows, t], v[rows, t], g[rows, t],
                                    level_scales[rows, t], state, scale,
                                    inplace_final_state=inplace)
    return token_walk(step, q, v, level_scales.shape[3], N, initial_state, output_final_state,
                      cu_seqlens)


def needs_grad(*xs) -> bool:
    """Whether autograd records through any of xs (tensors, tuples of them or None): if not,
    token_walk's steps may update the walk's own level states in place."""
    if not torch.is_grad_enabled():
        return False
    flat = [y for x in xs for y in (x if isinstance(x, tuple) else (x,))]
    return any(isinstance(x, Tensor) and x.requires_grad for x in flat)


def token_walk(step, q: Tensor, v: Tensor, L: int, N: int,
               initial_state: Optional[LogLinearAttentionState], output_final_state: bool,
               cu_seqlens: Optional[Tensor]):
    """The decode forms over whole sequences: step(rows, t, state) -> (o_t, state) token by
    token, per batch (all rows at once) or per packed sequence (row 0, its own tokens). The
    walk's level states are its own (a fresh tensor, never the caller's initial state), so
    steps may update them in place."""
    B, T, _, K = q.shape
    H, V = v.shape[2], v.shape[3]
    st_dt = accumulation_dtype(q)
    if initial_state is None:
        initial_state = LogLinearAttentionState(
            torch.zeros(N, H, L, K, V, dtype=st_dt, device=q.device),
            torch.zeros(N, dtype=torch.int64, device=q.device))
    off = initial_state[1].to(torch.int64)
    ht = present_levels(initial_state[0].to(st_dt), off)  # an empty sequence returns it as is

    def walk(state, lo, hi, rows):
        outs = []
        for t in range(lo, hi):
            o_t, state = step(rows, t, state)
            outs.append(o_t)
        return outs, state

    if cu_seqlens is None:
        outs, state = walk(LogLinearAttentionState(ht, off), 0, T, slice(None))
        o = torch.stack(outs, 1) if outs else v.new_zeros(B, 0, H, V)
        hts, offs = state.ht, state.offsets
    else:
        bounds = cu_seqlens.tolist()
        outs, hl, ol = [], [], []
        for n in range(N):
            part, state = walk(LogLinearAttentionState(ht[n:n + 1], off[n:n + 1]), bounds[n],
                               bounds[n + 1], slice(0, 1))
            outs += part
            hl.append(state.ht)
            ol.append(state.offsets)
        o = torch.stack(outs, 1) if outs else v.new_zeros(1, 0, H, V)
        hts, offs = torch.cat(hl, 0), torch.cat(ol, 0)
    final = LogLinearAttentionState(hts.to(st_dt), offs) if output_final_state else None
    return o, final


def hmamba_chunk_scan_combined(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, dl: Tensor,
                               L: Tensor, chunk_size: int = 64, D: Optional[Tensor] = None,
                               z: Optional[Tensor] = None, dt_bias: Optional[Tensor] = None,
                               initial_states: Optional[LogLinearAttentionState] = None,
                               seq_idx: Optional[Tensor] = None,
                               cu_seqlens: Optional[Tensor] = None, dt_softplus: bool = False,
                               dt_limit=(0.0, float("inf")), return_final_states: bool = False):
    """Log-linear Mamba-2's scan (fla.layers.log_linear_mamba2.hmamba_chunk_scan_combined, same
    arguments): x [b, l, h, p], dt [b, l, h], A [h], B/C [b, l, g, n], dl [b, l, h, ell], L
    [h, ell]. v = x * dt, g = A * dt, level_scales = softplus(L * dl), q = C, k = B, then
    y + D x and y * silu(z). Unlike fla: cu_seqlens, any dt_softplus / dt_limit and any
    power-of-two chunk_size are accepted (seq_idx is not). Returns (y, state)."""
    if seq_idx is not None:
        raise NotImplementedError("seq_idx is not supported: pass cu_seqlens")
    if B.shape != C.shape:
        raise ValueError(f"B and C must have the same shape, got {list(B.shape)} and "
                         f"{list(C.shape)}")
    squeeze = x.dim() == 3
    if squeeze:  # one decode token: [b, h, p]
        x, dt, B, C, dl = x[:, None], dt[:, None], B[:, None], C[:, None], dl[:, None]
        z = None if z is None else z[:, None]
    dt = effective_dt(dt, dt_bias, dt_softplus, dt_limit)
    v = (x * dt[..., None]).to(x.dtype)
    lam = torch.nn.functional.softplus(L * dl).to(L.dtype)
    y, state = chunk_log_linear_attn(C, B, v, A * dt, lam, initial_states, return_final_states,
                                     cu_seqlens, chunk_size=chunk_size)
    if D is not None:
        y = y + x * (D[:, None] if D.dim() == 1 else D)
    if z is not None:
        y = y * torch.nn.functional.silu(z)
    return (y[:, 0] if squeeze else y), state

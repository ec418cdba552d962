"""The spec: naive token-by-token recurrences for every op in lightning_ops.

Each function is the math of one op written as plainly as possible. Tests run these in float64
and compare every backend against them. This file imports nothing from lightning_ops.

Conventions (shared by all ops):
  * q, k: [B, T, H, K]; v: [B, T, H, V]; states: [N, H, K, V] (float32, or float64 for float64
    inputs); outputs in the input dtype.
  * Gates are natural-log decays (g <= 0): the state is multiplied by exp(g) before the update.
  * o_t = scale * S_t^T q_t, scale defaults to K ** -0.5.
  * cu_seqlens (B == 1) packs N sequences; each starts from initial_state[n] and reports its own
    final state. Without cu_seqlens, N == B.
  * Every function returns (output, final_state); final_state is None unless asked for.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .chunk.constants import L2NORM_EPS
from .precision import accumulation_dtype

Tensor = torch.Tensor


def _segments(T: int, B: int, cu_seqlens: Optional[Tensor]):
    """Yield (n, b, start, end): sequence n lives in batch row b, tokens [start, end)."""
    if cu_seqlens is None:
        for b in range(B):
            yield b, b, 0, T
    else:
        bounds = cu_seqlens.tolist()
        for n in range(len(bounds) - 1):
            yield n, 0, bounds[n], bounds[n + 1]


def l2norm(x: Tensor, eps: float = L2NORM_EPS) -> Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim (the in-kernel q/k norm of the delta rule)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


# ------------------------------------------------------------------------------------------------
# Gated linear attention family: S_t = decay_t * S_{t-1} + k_t v_t^T ; o_t = scale * S_t^T q_t
# ------------------------------------------------------------------------------------------------
def gated_linear_attn_ref(
    q: Tensor, k: Tensor, v: Tensor,
    g: Optional[Tensor] = None,
    g_gamma: Optional[Tensor] = None,
    scale: Optional[float] = None,
    initial_state: Optional[Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[Tensor] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """One recurrence for linear attention (no gate), simple GLA (scalar g [B,T,H] and/or
    constant g_gamma [H]) and GLA (vector g [B,T,H,K])."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    dt, out_dtype = accumulation_dtype(q), v.dtype
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    o = torch.zeros(B, T, H, V, dtype=dt, device=q.device)
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    ht = torch.zeros(N, H, K, V, dtype=dt, device=q.device)
    for n, b, bos, eos in _segments(T, B, cu_seqlens):
        S = torch.zeros(H, K, V, dtype=dt, device=q.device)
        if initial_state is not None:
            S = initial_state[n].to(dt).clone()
        for t in range(bos, eos):
            log_decay = torch.zeros(H, K, dtype=dt, device=q.device)
            if g is not None:
                gt = g[b, t].to(dt)
                log_decay = log_decay + (gt if gt.dim() == 2 else gt[:, None])
            if g_gamma is not None:
                log_decay = log_decay + g_gamma.to(dt)[:, None]
            S = S * log_decay.exp()[..., None] + k[b, t][..., None] * v[b, t][:, None, :]
            o[b, t] = scale * torch.einsum("hk,hkv->hv", q[b, t], S)
        ht[n] = S
    return o.to(out_dtype), (ht if output_final_state else None)


def linear_attn_ref(q, k, v, scale=None, initial_state=None, output_final_state=False,
                    cu_seqlens=None):
    return gated_linear_attn_ref(q, k, v, None, None, scale, initial_state, output_final_state,
                                 cu_seqlens)


def simple_gla_ref(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None,
                   output_final_state=False, cu_seqlens=None):
    return gated_linear_attn_ref(q, k, v, g, g_gamma, scale, initial_state, output_final_state,
                                 cu_seqlens)


def lightning_attn_ref(q, k, v, slope, scale=None, initial_state=None, output_final_state=False,
                       cu_seqlens=None):
    """Lightning Attention / TNL: constant per-head decay exp(-slope[h])."""
    return gated_linear_attn_ref(q, k, v, None, -slope, scale, initial_state, output_final_state,
                                 cu_seqlens)


def gla_ref(q, k, v, g, scale=None, initial_state=None, output_final_state=False,
            cu_seqlens=None):
    return gated_linear_attn_ref(q, k, v, g, None, scale, initial_state, output_final_state,
                                 cu_seqlens)


# ------------------------------------------------------------------------------------------------
# Delta rule: S_t = exp(g_t) S_{t-1};  S_t += beta_t k_t (v_t - S_t^T k_t)^T ; o_t = scale S_t^T q_t
# Grouped value heads: v, beta, g may have HV = m * H heads; value head j reads q/k head j // m.
# ------------------------------------------------------------------------------------------------
def gated_delta_rule_ref(
    q: Tensor, k: Tensor, v: Tensor,
    g: Optional[Tensor],
    beta: Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[Tensor] = None,
    use_qk_l2norm_in_kernel: bool = False,
) -> Tuple[Tensor, Optional[Tensor]]:
    B, T, H, K = q.shape
    HV, V = v.shape[-2:]
    scale = K ** -0.5 if scale is None else scale
    dt, out_dtype = accumulation_dtype(q), v.dtype
    q, k, v, beta = q.to(dt), k.to(dt), v.to(dt), beta.to(dt)
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    if HV != H:  # repeat q/k heads for each group of value heads
        q = q.repeat_interleave(HV // H, dim=2)
        k = k.repeat_interleave(HV // H, dim=2)
    o = torch.zeros(B, T, HV, V, dtype=dt, device=q.device)
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    ht = torch.zeros(N, HV, K, V, dtype=dt, device=q.device)
    for n, b, bos, eos in _segments(T, B, cu_seqlens):
        S = torch.zeros(HV, K, V, dtype=dt, device=q.device)
        if initial_state is not None:
            S = initial_state[n].to(dt).clone()
        for t in range(bos, eos):
            if g is not None:  # [HV] scalar decay, or [HV, K] per channel (KDA)
                gt = g[b, t].to(dt).exp()
                S = S * (gt[:, None, None] if gt.dim() == 1 else gt[..., None])
            kt, vt = k[b, t], v[b, t]
            v_err = vt - torch.einsum("hk,hkv->hv", kt, S)
            S = S + beta[b, t][:, None, None] * kt[..., None] * v_err[:, None, :]
            o[b, t] = scale * torch.einsum("hk,hkv->hv", q[b, t], S)
        ht[n] = S
    return o.to(out_dtype), (ht if output_final_state else None)


def delta_rule_ref(q, k, v, beta, scale=None, initial_state=None, output_final_state=False,
                   cu_seqlens=None, use_qk_l2norm_in_kernel=False):
    return gated_delta_rule_ref(q, k, v, None, beta, scale, initial_state, output_final_state,
                                cu_seqlens, use_qk_l2norm_in_kernel)


def kda_ref(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
            cu_seqlens=None, use_qk_l2norm_in_kernel=False):
    """Kimi Delta Attention: the gated delta rule with a per-channel decay g [B, T, HV, K],
    S_t = (I - beta_t k_t k_t^T) diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T."""
    return gated_delta_rule_ref(q, k, v, g, beta, scale, initial_state, output_final_state,
                                cu_seqlens, use_qk_l2norm_in_kernel)


# ------------------------------------------------------------------------------------------------
# Mamba-1 selective scan (mamba-ssm layout): per channel d and state n,
#   h_t = exp(delta_t A[d, n]) h_{t-1} + delta_t B_t[n] u_t ;  y_t = sum_n C_t[n] h_t + D u_t
# A complex A (S4D-style, as mamba-ssm allows) makes h, B and C complex and y_t = 2 Re(C_t . h_t):
# the N complex states stand for their N conjugate pairs.
# ------------------------------------------------------------------------------------------------
def _expand_groups(X: Tensor, D: int) -> Tensor:
    """B/C [b, N, L] or [b, G, N, L] -> [b, D, N, L] (channel d reads group d // (D // G))."""
    if X.dim() == 3:
        X = X[:, None]
    return X.repeat_interleave(D // X.shape[1], dim=1)


def selective_scan_ref(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: Optional[Tensor] = None,
):
    """u, delta, z: [b, D, L]; A: [D, N]; B, C: [b, N, L] or [b, G, N, L]; D, delta_bias: [D];
    initial_state / last state: [b, D, N]. Returns y, or (y, last_state). With a complex A, B, C
    and the states are complex (complex64, or complex128 for float64 u) and y is real."""
    dt = accumulation_dtype(u)
    st = (torch.complex128 if dt == torch.float64 else torch.complex64) if A.is_complex() else dt
    b, Dm, L = u.shape
    uf, deltaf, Af = u.to(dt), delta.to(dt), A.to(st)
    if delta_bias is not None:
        deltaf = deltaf + delta_bias.to(dt)[:, None]
    if delta_softplus:
        deltaf = F.softplus(deltaf)
    Bf, Cf = _expand_groups(B.to(st), Dm), _expand_groups(C.to(st), Dm)
    h = torch.zeros(b, Dm, A.shape[1], dtype=st, device=u.device)
    if initial_state is not None:
        h = initial_state.to(st).clone()
    ys = []
    for t in range(L):
        h = torch.exp(deltaf[:, :, t, None] * Af) * h + (deltaf[:, :, t] * uf[:, :, t])[..., None] * Bf[..., t]
        y_t = (h * Cf[..., t]).sum(-1)
        ys.append(2 * y_t.real if y_t.is_complex() else y_t)
    y = torch.stack(ys, dim=-1) if L > 0 else uf.new_zeros(b, Dm, 0)
    if D is not None:
        y = y + D.to(dt)[:, None] * uf
    if z is not None:
        y = y * F.silu(z.to(dt))
    y = y.to(u.dtype)
    return (y, h) if return_last_state else y


# ------------------------------------------------------------------------------------------------
# Mamba-2 SSD: per head h (state [p, n]), dt_t processed by bias / softplus / clamp, then
#   H_t = exp(dt_t A[h]) H_{t-1} + dt_t x_t B_t^T ;  y_t = H_t C_t + D x_t ; y *= silu(z) if z
# ------------------------------------------------------------------------------------------------
def ssd_ref(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    dt_bias: Optional[Tensor] = None,
    initial_states: Optional[Tensor] = None,
    seq_idx: Optional[Tensor] = None,
    cu_seqlens: Optional[Tensor] = None,
    dt_softplus: bool = False,
    dt_limit: Tuple[float, float] = (0.0, float("inf")),
) -> Tuple[Tensor, Tensor]:
    """x [b,l,h,p], dt [b,l,h], A [h], B/C [b,l,g,n], D [h] or [h,p], z [b,l,h,p], dt_bias [h].
    initial_states / final states: [N, h, p, n] (N = b, or the number of cu_seqlens segments).
    seq_idx [b,l]: the state resets to zero where seq_idx changes. Returns (y, final_states)."""
    acc = accumulation_dtype(x)
    b, l, h, p = x.shape
    ng, n = B.shape[-2:]
    xf, dtf, Af = x.to(acc), dt.to(acc), A.to(acc)
    if dt_bias is not None:
        dtf = dtf + dt_bias.to(acc)
    if dt_softplus:
        dtf = F.softplus(dtf)
    if dt_limit != (0.0, float("inf")):
        dtf = dtf.clamp(dt_limit[0], dt_limit[1])
    Bf = B.to(acc).repeat_interleave(h // ng, dim=2)  # [b, l, h, n]
    Cf = C.to(acc).repeat_interleave(h // ng, dim=2)
    y = torch.zeros(b, l, h, p, dtype=acc, device=x.device)
    N = b if cu_seqlens is None else cu_seqlens.numel() - 1
    final = torch.zeros(N, h, p, n, dtype=acc, device=x.device)
    for s, bi, bos, eos in _segments(l, b, cu_seqlens):
        H = torch.zeros(h, p, n, dtype=acc, device=x.device)
        if initial_states is not None:
            H = initial_states[s].to(acc).clone()
        for t in range(bos, eos):
            if seq_idx is not None and t > bos and seq_idx[bi, t] != seq_idx[bi, t - 1]:
                H = torch.zeros_like(H)
            H = torch.exp(dtf[bi, t] * Af)[:, None, None] * H \
                + (dtf[bi, t][:, None] * xf[bi, t])[..., None] * Bf[bi, t][:, None, :]
            y[bi, t] = torch.einsum("hpn,hn->hp", H, Cf[bi, t])
        final[s] = H
    if D is not None:
        Df = D.to(acc)
        y = y + (Df[:, None] if Df.dim() == 1 else Df) * xf
    if z is not None:
        y = y * F.silu(z.to(acc))
    return y.to(x.dtype), final


# ------------------------------------------------------------------------------------------------
# Causal depthwise conv1d (causal-conv1d layout): x [b, D, L], weight [D, W]
#   out[t] = act(bias + sum_i weight[i] * x[t - W + 1 + i]),  history before t=0 from initial_states
# ------------------------------------------------------------------------------------------------
def _activate(x: Tensor, activation: Optional[str]) -> Tensor:
    if activation in ("silu", "swish"):
        return F.silu(x)
    if activation is None:
        return x
    raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")


def causal_conv1d_ref(
    x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
    initial_states: Optional[Tensor] = None,
    return_final_states: bool = False,
    activation: Optional[str] = None,
):
    """initial_states / final states: [b, D, W-1]. Returns out, or (out, final_states)."""
    acc = accumulation_dtype(x)
    b, Dm, L = x.shape
    W = weight.shape[1]
    hist = x.new_zeros(b, Dm, W - 1, dtype=acc) if initial_states is None \
        else initial_states.to(acc)
    xp = torch.cat([hist, x.to(acc)], dim=-1)  # [b, D, W-1+L]
    out = torch.zeros(b, Dm, L, dtype=acc, device=x.device)
    for i in range(W):
        out = out + weight.to(acc)[:, i, None] * xp[:, :, i:i + L]
    if bias is not None:
        out = out + bias.to(acc)[:, None]
    out = _activate(out, activation).to(x.dtype)
    if return_final_states:
        return out, xp[:, :, xp.shape[-1] - (W - 1):].to(x.dtype)
    return out


def causal_conv1d_update_ref(
    x: Tensor, conv_state: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
    activation: Optional[str] = None,
) -> Tensor:
    """Decode: x [b, D] or [b, D, L]; conv_state [b, D, S] (S >= W-1) holds the last S inputs and
    is shifted in place. Returns out shaped like x."""
    squeeze = x.dim() == 2
    xs = x[..., None] if squeeze else x
    W, S, L = weight.shape[1], conv_state.shape[-1], xs.shape[-1]
    full = torch.cat([conv_state, xs.to(conv_state.dtype)], dim=-1)  # [b, D, S+L]
    out = causal_conv1d_ref(xs, weight, bias, initial_states=full[:, :, S - (W - 1):S],
                            activation=activation)
    conv_state.copy_(full[:, :, L:])
    return out[..., 0] if squeeze else out


# ------------------------------------------------------------------------------------------------
# Selective-state decode step (mamba-ssm layout), state updated in place:
#   state = exp(dt A) state + dt B x ;  out = state C + D x ; out *= silu(z) if z
# ------------------------------------------------------------------------------------------------
def selective_state_update_ref(
    state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
    D: Optional[Tensor] = None, z: Optional[Tensor] = None,
    dt_bias: Optional[Tensor] = None, dt_softplus: bool = False,
) -> Tensor:
    """With heads: state [b,h,p,n], x/dt/z [b,h,p], A [h,p,n], B/C [b,g,n], D/dt_bias [h,p].
    Without heads (Mamba-1): state [b,D,n], x/dt/z [b,D], A [D,n], B/C [b,n], D/dt_bias [D]."""
    if state.dim() == 3:  # Mamba-1 form: one head
        out = selective_state_update_ref(
            state[:, None], x[:, None], dt[:, None], A[None], B[:, None], C[:, None],
            None if D is None else D[None], None if z is None else z[:, None],
            None if dt_bias is None else dt_bias[None], dt_softplus)
        return out[:, 0]
    acc = accumulation_dtype(x)
    h, ng = state.shape[1], B.shape[1]
    dtf = dt.to(acc)
    if dt_bias is not None:
        dtf = dtf + dt_bias.to(acc)
    if dt_softplus:
        dtf = F.softplus(dtf)
    Bf = B.to(acc).repeat_interleave(h // ng, dim=1)  # [b, h, n]
    Cf = C.to(acc).repeat_interleave(h // ng, dim=1)
    new = torch.exp(dtf[..., None] * A.to(acc)) * state.to(acc) \
        + (dtf * x.to(acc))[..., None] * Bf[:, :, None, :]
    out = torch.einsum("bhpn,bhn->bhp", new, Cf)
    if D is not None:
        out = out + D.to(acc) * x.to(acc)
    if z is not None:
        out = out * F.silu(z.to(acc))
    state.copy_(new.to(state.dtype))
    return out.to(x.dtype)


# ------------------------------------------------------------------------------------------------
# LION: bidirectional linear attention with a decay mask, the full masked (T x T) form.
#   o_i = scale * sum_j M_ij (q_i . k_j) v_j over all j of i's sequence,
#   M_ij = exp(sum_{t in [j, i)} g_t) for j <= i,  exp(sum_{t in (i, j]} g_t) for j > i
#   (the key's gate and those between, not the query's: the LION authors' mask),
#   g_t = g[b, t, h] (+ g_gamma[h]); no gate: M = 1 (LION-LIT).
# ------------------------------------------------------------------------------------------------
def lion_mask_log(lg: Tensor) -> Tensor:
    """lg [L, H] log decays -> D [L, L, H], D[i, j] = log M_ij, as running sums of the gates
    (never a difference of two cumulative sums, so -inf gates give exact zeros)."""
    L, H = lg.shape
    i = torch.arange(L, device=lg.device)
    zero = lg.new_zeros(())
    pad = lg.new_zeros(1, L, H)
    # low[i, j] = sum_{j <= t < i} lg_t: an exclusive running sum down the rows
    low = torch.where((i[:, None] >= i[None, :])[..., None], lg[:, None, :], zero).cumsum(0)
    low = torch.cat([pad, low[:-1]], 0)
    # up[i, j] = sum_{i < t <= j} lg_t: an exclusive running sum up the rows
    up = torch.where((i[:, None] <= i[None, :])[..., None], lg[:, None, :], zero)
    up = torch.cat([up.flip(0).cumsum(0).flip(0)[1:], pad], 0)
    return torch.where((i[:, None] >= i[None, :])[..., None], low, up)


def lion_ref(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor] = None,
             g_gamma: Optional[Tensor] = None, scale: Optional[float] = None,
             cu_seqlens: Optional[Tensor] = None) -> Tensor:
    """The full masked form of LION (-LIT: no gate, -D: g_gamma [H], -S: g [B, T, H]).
    Returns o [B, T, H, V] (no state)."""
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    dt, out_dtype = accumulation_dtype(q), v.dtype
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    o = torch.zeros(B, T, H, v.shape[-1], dtype=dt, device=q.device)
    for _, b, bos, eos in _segments(T, B, cu_seqlens):
        if eos == bos:
            continue
        M = lion_mask_log(_lion_gates(g, g_gamma, b, bos, eos, H, dt, q.device)).exp()
        s = torch.einsum("ihk,jhk->ijh", q[b, bos:eos], k[b, bos:eos]) * scale * M
        o[b, bos:eos] = torch.einsum("ijh,jhv->ihv", s, v[b, bos:eos])
    return o.to(out_dtype)


def _lion_gates(g, g_gamma, b, bos, eos, H, dt, device) -> Tensor:
    lg = torch.zeros(eos - bos, H, dtype=dt, device=device)
    if g is not None:
        lg = lg + g[b, bos:eos].to(dt)
    if g_gamma is not None:
        lg = lg + g_gamma.to(dt)
    return lg


def lion_recurrent_ref(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor] = None,
                       g_gamma: Optional[Tensor] = None, scale: Optional[float] = None,
                       cu_seqlens: Optional[Tensor] = None) -> Tensor:
    """LION as a bidirectional RNN (the authors' RNN form): walking forwards the state decays by
    the previous token's gate before adding token t, walking backwards by the next token's;
    o_t = scale q_t^T (S^F_t + S^B_t) minus the diagonal counted twice."""
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    dt, out_dtype = accumulation_dtype(q), v.dtype
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    o = torch.zeros(B, T, H, v.shape[-1], dtype=dt, device=q.device)
    for _, b, bos, eos in _segments(T, B, cu_seqlens):
        lg = _lion_gates(g, g_gamma, b, bos, eos, H, dt, q.device)
        for step, order in ((-1, range(bos, eos)), (1, range(eos - 1, bos - 1, -1))):
            S = torch.zeros(H, K, v.shape[-1], dtype=dt, device=q.device)
            for t in order:
                if bos <= t + step < eos:  # the neighbour already walked past
                    S = S * lg[t + step - bos].exp()[:, None, None]
                S = S + k[b, t][..., None] * v[b, t][:, None, :]
                o[b, t] += scale * torch.einsum("hk,hkv->hv", q[b, t], S)
        for t in range(bos, eos):
            qk = (q[b, t] * k[b, t]).sum(-1)
            o[b, t] -= scale * qk[:, None] * v[b, t]
    return o.to(out_dtype)


# ------------------------------------------------------------------------------------------------
# Log-linear attention (Guo et al. 2025; fla's chunk_log_linear_attn) over the scalar gate:
#   o_t = scale * sum_{s <= t} lambda_t[lev(s, t)] exp(sum_{s<r<=t} g_r) (q_t . k_s) v_s
# with the Fenwick level of key s for query t (absolute positions): lev(t, t) = 0 and, for s < t,
# lev(s, t) = bit_length(s xor t), i.e. the bucket of [0, t] of size 2^(l-1) that holds s.
# Levels >= L (= level_scales.shape[-1]) weigh 0. q/k may have G heads shared by H = m * G value
# heads (head h reads group h // m; fla's Mamba-2 form has G = 1). scale defaults to 1 (fla's op
# has none: the level weights play that role).
# State after tokens [0, t): (ht [N, H, L, K, V], offsets [N]) with ht[:, :, l] the sum of level
# l's bucket for query t, decayed to token t-1; slot 0 is always zero (level 0 is the current
# token), and slot l is zero unless bit l-1 of t is set (given states: such slots are ignored,
# read as zero). The recurrence (token step at position t):
#   ht *= exp(g_t); o_t = scale sum_l lambda_t[l] ht_l^T q_t with ht_0 = k_t v_t^T;
#   then with m = trailing ones of t: ht_{m+1} = sum_{l <= m} ht_l (dropped if m+1 >= L), ht_l = 0
#   for 1 <= l <= m.
# ------------------------------------------------------------------------------------------------
def log_linear_level(s: int, t: int) -> int:
    """Fenwick level of key position s for query position t (s <= t)."""
    return 0 if s == t else (s ^ t).bit_length()


def _ll_inputs(q, k, v, g, level_scales, scale, initial_state, cu_seqlens):
    B, T, G, K = q.shape
    H, V, L = v.shape[2], v.shape[-1], level_scales.shape[-1]
    dt = accumulation_dtype(q)
    rep = H // G
    q = q.to(dt).repeat_interleave(rep, 2)
    k = k.to(dt).repeat_interleave(rep, 2)
    scale = 1.0 if scale is None else scale
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    if initial_state is None:
        h0 = torch.zeros(N, H, L, K, V, dtype=dt, device=q.device)
        off = [0] * N
    else:
        h0 = initial_state[0].to(dt)
        off = [int(x) for x in torch.as_tensor(initial_state[1]).reshape(-1).tolist()]
    return q, k, v.to(dt), g.to(dt), level_scales.to(dt), scale, h0, off, (B, T, H, K, V, L, N, dt)


def log_linear_attn_ref(q: Tensor, k: Tensor, v: Tensor, g: Tensor, level_scales: Tensor,
                        scale: Optional[float] = None, initial_state=None,
                        output_final_state: bool = False, cu_seqlens: Optional[Tensor] = None):
    """Token by token with the O(log T) state hierarchy (the decode form). q/k [B,T,G,K],
    v [B,T,H,V], g [B,T,H], level_scales [B,T,H,L]; initial_state (ht [N,H,L,K,V], offsets [N]).
    Returns (o, (ht, offsets) or None)."""
    q, k, v, g, lam, scale, h0, off, dims = _ll_inputs(q, k, v, g, level_scales, scale,
                                                         initial_state, cu_seqlens)
    B, T, H, K, V, L, N, dt = dims
    o = torch.zeros(B, T, H, V, dtype=dt, device=q.device)
    hts, offs = [], []
    for n, b, bos, eos in _segments(T, B, cu_seqlens):
        t = off[n]
        # slot l exists only if bit l-1 of t is set (slot 0 never): the others read as zero
        S = [h0[n, :, l] if l and (t >> (l - 1)) & 1 else torch.zeros_like(h0[n, :, l])
             for l in range(L)]
        for i in range(bos, eos):
            S = [s * g[b, i].exp()[:, None, None] for s in S]
            S[0] = k[b, i][..., None] * v[b, i][:, None, :]
            for l in range(L):
                o[b, i] += scale * lam[b, i, :, l, None] * torch.einsum("hk,hkv->hv", q[b, i], S[l])
            m = 0
            while (t >> m) & 1:
                m += 1
            merged = sum(S[: m + 1])
            for l in range(min(m + 1, L)):
                S[l] = torch.zeros_like(S[l])
            if m + 1 < L:
                S[m + 1] = merged
            t += 1
        hts.append(torch.stack(S, 1))
        offs.append(t)
    final = None
    if output_final_state:
        final = (torch.stack(hts, 0) if hts else h0[:0].clone(),
                 torch.tensor(offs, dtype=torch.int64, device=q.device))
    return o.to(v.dtype if v.dtype != dt else dt), final


def log_linear_attn_masked_ref(q: Tensor, k: Tensor, v: Tensor, g: Tensor, level_scales: Tensor,
                               scale: Optional[float] = None, initial_state=None,
                               cu_seqlens: Optional[Tensor] = None) -> Tensor:
    """The same op as one masked T x T matrix per sequence (fla's naive form, with the level of
    every pair read from the Fenwick decomposition), plus the initial levels: bucket l of the
    state at offset t0 holds keys whose level for query t is bit_length(((t0 >> (l-1)) << (l-1))
    - 1 xor t). Decays: sums of g over (s, t], accumulated pair by pair (no cumsum differences)."""
    q, k, v, g, lam, scale, h0, off, dims = _ll_inputs(q, k, v, g, level_scales, scale,
                                                         initial_state, cu_seqlens)
    B, T, H, K, V, L, N, dt = dims
    o = torch.zeros(B, T, H, V, dtype=dt, device=q.device)
    for n, b, bos, eos in _segments(T, B, cu_seqlens):
        n_tok, t0 = eos - bos, off[n]
        if n_tok == 0:
            continue
        gs = g[b, bos:eos].transpose(0, 1)  # [H, n]
        seg = torch.full((H, n_tok, n_tok), float("-inf"), dtype=dt, device=q.device)
        for s in range(n_tok):
            seg[:, s, s] = 0
            if s + 1 < n_tok:
                seg[:, s + 1:, s] = gs[:, s + 1:].cumsum(-1)
        lev = torch.tensor([[log_linear_level(t0 + s, t0 + t) if s <= t else L
                             for s in range(n_tok)] for t in range(n_tok)], device=q.device)
        lam_n = lam[b, bos:eos].transpose(0, 1)  # [H, n, L]
        lam_pad = torch.cat([lam_n, torch.zeros_like(lam_n[..., :1])], -1)
        idx = lev.clamp(max=L)[None].expand(H, -1, -1)
        W = torch.gather(lam_pad, 2, idx) * seg.exp().nan_to_num(0.0)
        W = W.masked_fill(lev[None] >= L, 0)
        A = torch.einsum("thk,shk->hts", q[b, bos:eos], k[b, bos:eos]) * W
        o[b, bos:eos] = scale * torch.einsum("hts,shv->thv", A, v[b, bos:eos])
        pre = gs.cumsum(-1)  # [H, n]: sum of g over [t0, t]
        for l in range(1, L):
            if not (t0 >> (l - 1)) & 1:
                continue
            r = ((t0 >> (l - 1)) << (l - 1)) - 1
            for t in range(n_tok):
                lv = log_linear_level(r, t0 + t)
                if lv < L:
                    o[b, bos + t] += scale * (lam_n[:, t, lv] * pre[:, t].exp())[:, None] * \
                        torch.einsum("hk,hkv->hv", q[b, bos + t], h0[n, :, l])
    return o.to(v.dtype if v.dtype != dt else dt)


# ------------------------------------------------------------------------------------------------
# Log-linear Gated DeltaNet (Guo et al. 2025, sec. 3.3; the authors' chunk_h_gated_delta_rule):
# the same Fenwick hierarchy of level states as log_linear_attn_ref, with the gated delta rule's
# transition A_t = (I - beta_t k_t k_t^T) exp(g_t) acting on EVERY level state, and the token's
# write beta_t k_t v_t^T as level 0:
#   ht_l <- (I - beta_t k_t k_t^T) (exp(g_t) ht_l)  for all l;  ht_0 = beta_t k_t v_t^T
#   o_t = scale sum_l lambda_t[l] ht_l^T q_t;  then the Fenwick merge of log_linear_attn_ref.
# The levels sum to the Gated DeltaNet state (gated_delta_rule_ref), so with every lambda = 1 and
# enough levels this is Gated DeltaNet; equivalently o_t = scale sum_{s<=t} lambda_t[lev(s, t)]
# q_t^T A_t ... A_{s+1} beta_s k_s v_s^T. scale defaults to 1 (as log_linear_attn_ref: the level
# weights play that role); use_qk_l2norm_in_kernel normalises q and k first (l2norm above).
# ------------------------------------------------------------------------------------------------
def log_linear_gated_delta_rule_ref(q: Tensor, k: Tensor, v: Tensor, g: Tensor,
                                    level_scales: Tensor, beta: Tensor,
                                    scale: Optional[float] = None, initial_state=None,
                                    output_final_state: bool = False,
                                    cu_seqlens: Optional[Tensor] = None,
                                    use_qk_l2norm_in_kernel: bool = False):
    """Token by token with the O(log T) level states. q/k [B,T,G,K], v [B,T,H,V], g and beta
    [B,T,H], level_scales [B,T,H,L]; initial_state (ht [N,H,L,K,V], offsets [N]). Returns
    (o, (ht, offsets) or None)."""
    q, k, v, g, lam, scale, h0, off, dims = _ll_inputs(q, k, v, g, level_scales, scale,
                                                         initial_state, cu_seqlens)
    B, T, H, K, V, L, N, dt = dims
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    beta = beta.to(dt)
    o = torch.zeros(B, T, H, V, dtype=dt, device=q.device)
    hts, offs = [], []
    for n, b, bos, eos in _segments(T, B, cu_seqlens):
        t = off[n]
        S = [h0[n, :, l] if l and (t >> (l - 1)) & 1 else torch.zeros_like(h0[n, :, l])
             for l in range(L)]
        for i in range(bos, eos):
            kt, bt = k[b, i], beta[b, i][:, None, None]
            S = [s * g[b, i].exp()[:, None, None] for s in S]
            S = [s - bt * kt[..., None] * torch.einsum("hk,hkv->hv", kt, s)[:, None, :]
                 for s in S]
            S[0] = bt * kt[..., None] * v[b, i][:, None, :]
            for l in range(L):
                o[b, i] += scale * lam[b, i, :, l, None] * torch.einsum("hk,hkv->hv", q[b, i], S[l])
            m = 0
            while (t >> m) & 1:
                m += 1
            merged = sum(S[: m + 1])
            for l in range(min(m + 1, L)):
                S[l] = torch.zeros_like(S[l])
            if m + 1 < L:
                S[m + 1] = merged
            t += 1
        hts.append(torch.stack(S, 1))
        offs.append(t)
    final = None
    if output_final_state:
        final = (torch.stack(hts, 0) if hts else h0[:0].clone(),
                 torch.tensor(offs, dtype=torch.int64, device=q.device))
    return o.to(v.dtype if v.dtype != dt else dt), final

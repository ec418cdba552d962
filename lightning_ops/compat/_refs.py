"""The peers' pure-PyTorch reference functions, at the peers' paths with the peers' signatures,
computed by our spec (lightning_ops.reference) plus layout glue.

The peers' own test files import these next to the ops (mamba-ssm's selective_scan_ref,
causal-conv1d's causal_conv1d_ref, fla's fla.ops.<op>.naive functions, ...); a missing name
fails a whole test file at import. They are references, not kernels: token-by-token loops,
slow, for tests. When the peer package is installed, patching never replaces the peer's own
references (see REFERENCES): the peer's ground truth stays the peer's.

Where we differ from the peer's reference on purpose (never in the math):
  * the loops run in float64 for float64 inputs (the peers' upcast to float32 only);
  * input shapes the peer's reference only works for by accident are not narrowed (fla's
    naive_chunk_linear_attn needs T % 64 == 0; ours takes any T);
  * mamba_inner_ref honours delta_softplus (mamba-ssm 2.3.2's ignores it and always applies
    softplus; the default, True, agrees).
mamba-ssm's mamba_inner_ref is not a float reference: it is the fused block written as a
composition of its own causal_conv1d_fn and selective_scan_fn kernels (what test_mamba_inner_fn
checks is the fusion). So is ours: the same composition over our ops as our mamba_inner_fn.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from lightning_ops import reference as spec

from ._common import unsupported
from ._mamba import (_check_activation, _complex_scan, _fixed_bc, _split_conv1d_dims,
                     mamba_inner_fn, selective_scan_fn)

Tensor = torch.Tensor

# names the mirror modules export that are references (never patched over an installed peer)
REFERENCES = frozenset({
    "selective_scan_ref", "mamba_inner_ref", "selective_state_update_ref",
    "mamba_split_conv1d_scan_ref", "ssd_selective_scan", "ssd_chunk_scan_combined_ref",
    "mamba_conv1d_scan_ref",
    "causal_conv1d_ref", "causal_conv1d_update_ref", "causal_conv1d_varlen_states_ref",
    "naive_recurrent_gla", "naive_recurrent_simple_gla", "naive_recurrent_linear_attn",
    "naive_chunk_linear_attn", "delta_rule_recurrence", "naive_recurrent_gated_delta_rule",
    "naive_recurrent_kda", "naive_kda_gate", "naive_kda_lowerbound_gate",
    "naive_parallel_simple_gla", "naive_chunk_kda", "naive_gdn_gate", "naive_log_linear_attn",
    "rms_norm_ref",
})


def _acc(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# =============================================================================================
# causal-conv1d
# =============================================================================================
def _check_activation(activation):
    if activation not in (None, "silu", "swish"):
        raise NotImplementedError("activation must be None, silu, or swish")


def causal_conv1d_ref(x, weight, bias=None, initial_states=None, return_final_states=False,
                      final_states_out=None, activation=None, seq_idx=None):
    """causal_conv1d.causal_conv1d_interface.causal_conv1d_ref: x [b, D, L], weight [D, W],
    bias [D], initial_states / final states [b, D, W-1], seq_idx [b, L] (a window only sums
    inputs of the output's own sequence; the initial states belong to the first token's
    sequence; an output with seq_idx < 0 is zero). Returns out, or (out, final_states), the
    final states written into final_states_out when given."""
    _check_activation(activation)
    if seq_idx is None:
        res = spec.causal_conv1d_ref(x, weight, bias, initial_states, bool(return_final_states),
                                     activation)
        out, final = res if return_final_states else (res, None)
    else:
        b, d, L = x.shape
        W = weight.shape[1]
        if tuple(seq_idx.shape) != (b, L):
            raise ValueError(f"seq_idx must have shape [b, L] = [{b}, {L}], "
                             f"got {list(seq_idx.shape)}")
        acc = _acc(x)
        if initial_states is None:
            hist = x.new_zeros(b, d, W - 1, dtype=acc)
            hist_idx = seq_idx.new_full((b, W - 1), -1)
        else:
            hist = initial_states.to(acc)
            hist_idx = seq_idx[:, :1].expand(b, W - 1)
        xp = torch.cat([hist, x.to(acc)], dim=-1)                 # [b, D, W-1+L]
        sp = torch.cat([hist_idx, seq_idx], dim=-1)               # [b, W-1+L]
        wf = weight.to(acc)
        o = torch.zeros(b, d, L, dtype=acc, device=x.device)
        for i in range(W):
            same = (sp[:, i:i + L] == seq_idx).to(acc)[:, None]  # [b, 1, L]
            o = o + wf[:, i, None] * xp[:, :, i:i + L] * same
        if bias is not None:
            o = o + bias.to(acc)[:, None]
        o = o.masked_fill((seq_idx < 0)[:, None], 0.0)
        out = (F.silu(o) if activation is not None else o).to(x.dtype)
        final = xp[:, :, xp.shape[-1] - (W - 1):].to(x.dtype) if return_final_states else None
    if not return_final_states:
        return out
    if final_states_out is not None:
        final_states_out.copy_(final)
        final = final_states_out
    return out, final


def causal_conv1d_update_ref(x, conv_state, weight, bias=None, activation=None,
                             cache_seqlens=None):
    """causal_conv1d.causal_conv1d_interface.causal_conv1d_update_ref: x [b, D] or [b, D, L],
    conv_state [b, D, S] (S >= W-1) updated in place; cache_seqlens [b] makes it a circular
    buffer whose history of row i ends at cache_seqlens[i] (mod S). Returns out shaped as x."""
    _check_activation(activation)
    if cache_seqlens is None:
        return spec.causal_conv1d_update_ref(x, conv_state, weight, bias, activation)
    squeeze = x.dim() == 2
    xs = x[..., None] if squeeze else x
    b, d, L = xs.shape
    S, W = conv_state.shape[-1], weight.shape[1]
    c = cache_seqlens.to(device=x.device, dtype=torch.long)
    out = torch.empty(b, d, L, dtype=x.dtype, device=x.device)
    for i in range(b):
        ci = int(c[i])
        read = [(ci + j) % S for j in range(-(W - 1), 0)]
        hist = conv_state[i:i + 1, :, read].to(x.dtype)
        out[i:i + 1] = spec.causal_conv1d_ref(xs[i:i + 1], weight, bias, initial_states=hist,
                                              activation=activation)
        for t in range(L):                                          # later writes win
            conv_state[i, :, (ci + t) % S] = xs[i, :, t].to(conv_state.dtype)
    return out[..., 0] if squeeze else out


def _varlen_bounds(x: Tensor, cu_seqlens: Tensor):
    if x.dim() != 2:
        raise ValueError(f"x must have shape [total_tokens, dim], got {list(x.shape)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must have shape [batch + 1], got {list(cu_seqlens.shape)}")
    return [int(v) for v in cu_seqlens.tolist()]


def causal_conv1d_varlen_states(x: Tensor, cu_seqlens: Tensor, state_len: int) -> Tensor:
    """causal_conv1d.causal_conv1d_varlen.causal_conv1d_varlen_states: x [total_tokens, dim]
    packed by cu_seqlens [batch + 1] -> the conv states [batch, dim, state_len] after each
    sequence: its last state_len inputs, right-aligned, zeros where the sequence is shorter
    (memory channel-last, as causal-conv1d allocates it). Forward only."""
    bounds = _varlen_bounds(x, cu_seqlens)
    batch, dim = len(bounds) - 1, x.shape[1]
    states = x.new_zeros(batch, state_len, dim).transpose(1, 2)
    for i in range(batch):
        n = min(bounds[i + 1] - bounds[i], state_len)
        if n > 0:
            states[i, :, state_len - n:] = x[bounds[i + 1] - n:bounds[i + 1]].transpose(0, 1)
    return states


def causal_conv1d_varlen_states_ref(x: Tensor, cu_seqlens: Tensor, state_len: int) -> Tensor:
    """The reference of causal_conv1d_varlen_states: token by token, state slot s of sequence
    i holds input token end_i - state_len + s when that token belongs to sequence i."""
    bounds = _varlen_bounds(x, cu_seqlens)
    batch, dim = len(bounds) - 1, x.shape[1]
    states = x.new_zeros(batch, state_len, dim).transpose(1, 2)
    for i in range(batch):
        for s in range(state_len):
            t = bounds[i + 1] - state_len + s
            if bounds[i] <= t < bounds[i + 1]:
                states[i, :, s] = x[t]
    return states


# =============================================================================================
# mamba-ssm
# =============================================================================================
def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """mamba_ssm.ops.selective_scan_interface.selective_scan_ref: u / delta / z [b, D, L],
    A [D, N], B / C [b, N, L], [b, G, N, L] or input-independent [D, N], D / delta_bias
    [D]. Returns out [b, D, L] (u's dtype), or (out, last_state [b, D, N], float32 / float64).
    A complex A as mamba-ssm: variable B / C real [b, N, 2L] with (real, imag) pairs
    interleaved along L, y = 2 Re(C . h), a complex last_state."""
    if A.is_complex():
        return _complex_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                             return_last_state)
    return spec.selective_scan_ref(u, delta, A, _fixed_bc("B", B, u), _fixed_bc("C", C, u), D, z,
                                   delta_bias, bool(delta_softplus), bool(return_last_state))


def mamba_inner_ref(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                    out_proj_weight, out_proj_bias, A, B=None, C=None, D=None, delta_bias=None,
                    B_proj_bias=None, C_proj_bias=None, delta_softplus=True):
    """mamba_ssm.ops.selective_scan_interface.mamba_inner_ref: Mamba-1's block (conv1d + silu,
    x_proj, dt_proj, selective scan gated by silu(z), out_proj) composed of the served
    causal_conv1d_fn and selective_scan_fn, as mamba-ssm composes its kernels (see the module
    docstring). xz [b, 2*D, L] -> [b, L, d_model]. B / C None: projected from x (plus
    B/C_proj_bias); a complex A takes (real, imag) column pairs."""
    return mamba_inner_fn(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                          out_proj_weight, out_proj_bias, A, B, C, D, delta_bias, B_proj_bias,
                          C_proj_bias, delta_softplus)


def ssd_selective_scan(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                       dt_limit=(0.0, float("inf"))):
    """mamba_ssm.ops.triton.ssd_combined.ssd_selective_scan: the SSD written as Mamba-1's
    selective scan over the h * p channels, over the served selective_scan_fn (as mamba-ssm's
    over its own). x [b, l, h, p]; dt [b, l, h] or [b, l, h, p]; A [h] or [h * p, n]; B / C
    [b, l, g, n]; D [h] or [h, p]; z x's shape; dt_bias [h] or [h, p]. A dt_limit other than
    (0, inf) is applied to dt (bias, softplus, clamp) before the scan. Returns [b, l, h, p]."""
    b, l, h, p = x.shape
    n = B.shape[-1]

    def per_channel(t):                              # [h] or [h, p] -> [h * p]
        return t[:, None].expand(h, p).reshape(h * p) if t.dim() == 1 else t.reshape(h * p)

    u = x.reshape(b, l, h * p).transpose(1, 2)
    delta = (dt[..., None].expand(b, l, h, p) if dt.dim() == 3 else dt)
    delta = delta.reshape(b, l, h * p).transpose(1, 2)
    A2 = (A[:, None, None].expand(h, p, n).reshape(h * p, n) if A.dim() == 1 else A).float()
    bias = None if dt_bias is None else per_channel(dt_bias)
    softplus = bool(dt_softplus)
    if tuple(dt_limit) != (0.0, float("inf")):
        if bias is not None:
            delta = delta + bias[:, None]
        if softplus:
            delta = F.softplus(delta)
        delta = delta.clamp(min=dt_limit[0], max=dt_limit[1]).to(x.dtype)
        bias, softplus = None, False
    out = selective_scan_fn(u, delta, A2, B.permute(0, 2, 3, 1), C.permute(0, 2, 3, 1),
                            None if D is None else per_channel(D),
                            None if z is None else z.reshape(b, l, h * p).transpose(1, 2),
                            bias, softplus)
    return out.transpose(1, 2).reshape(b, l, h, p)


def ssd_chunk_scan_combined_ref(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None,
                                dt_softplus=False):
    """mamba_ssm.ops.triton.ssd_combined.ssd_chunk_scan_combined_ref: the SSD over the spec's
    token loop (chunk_size: unused, the spec has no chunks). Returns out [b, l, h, p]."""
    return spec.ssd_ref(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias,
                        dt_softplus=bool(dt_softplus))[0]


def mamba_conv1d_scan_ref(xBC, conv1d_weight, conv1d_bias, dt, A, chunk_size, D=None, z=None,
                          dt_bias=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
                          activation="silu", headdim=None, ngroups=1):
    """mamba_ssm.ops.triton.ssd_combined.mamba_conv1d_scan_ref: the causal conv of xBC
    [b, l, dim + 2 ngroups dstate], split into x, B, C, then the SSD, over the spec. z
    [b, l, dim] (or None: then D [h, p], or D [h] with headdim); dt [b, l, h]. Returns
    [b, l, dim]."""
    _check_activation(activation)
    h = A.shape[0]
    if z is not None:
        dim = z.shape[-1]
    else:
        if D is None or (D.dim() == 1 and headdim is None):
            raise ValueError("mamba_conv1d_scan_ref: without z, pass D [h, p] or headdim")
        dim = h * (D.shape[1] if D.dim() == 2 else headdim)
    b, l, _ = xBC.shape
    xBC = spec.causal_conv1d_ref(xBC.transpose(1, 2), conv1d_weight, conv1d_bias,
                                 activation=activation).transpose(1, 2)
    n = (xBC.shape[-1] - dim) // ngroups // 2
    x, B, C = torch.split(xBC, [dim, ngroups * n, ngroups * n], dim=-1)
    p = dim // h
    y, _ = spec.ssd_ref(x.reshape(b, l, h, p), dt, A, B.reshape(b, l, ngroups, n),
                        C.reshape(b, l, ngroups, n), D=D,
                        z=None if z is None else z.reshape(b, l, h, p), dt_bias=dt_bias,
                        dt_softplus=bool(dt_softplus), dt_limit=tuple(dt_limit))
    return y.reshape(b, l, dim)


def mamba_split_conv1d_scan_ref(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size,
                                dt_limit=(0.0, float("inf")), activation="silu",
                                rmsnorm_weight=None, rmsnorm_eps=1e-6, outproj_weight=None,
                                outproj_bias=None, headdim=None, ngroups=1,
                                norm_before_gate=True):
    """mamba_ssm.ops.triton.ssd_combined.mamba_split_conv1d_scan_ref: Mamba-2's block after
    in_proj over the spec (the conv, the SSD token loop, a gated RMSNorm written out), no zx0
    part (d_nonssm = 0), as mamba-ssm's reference; like it, the RMSNorm spans all of dim even
    with ngroups > 1 (the fused function normalises each group on its own). chunk_size: unused
    (the spec has no chunks). Returns out [batch, seqlen, dim or out_dim]."""
    from .mamba_ssm.ops.triton.layernorm_gated import rms_norm_ref
    _check_activation(activation)
    h, p, n, d_nonssm = _split_conv1d_dims(zxbcdt, conv1d_weight, dt_bias, A, D, headdim,
                                           ngroups)
    if d_nonssm:
        raise ValueError(f"mamba_split_conv1d_scan_ref: zxbcdt must have shape [batch, seqlen, "
                         f"2 * dim + 2 * ngroups * dstate + nheads] (no d_nonssm part), got "
                         f"{list(zxbcdt.shape)}")
    dim = h * p
    z, xBC, dt = torch.split(zxbcdt, [dim, dim + 2 * ngroups * n, h], dim=-1)
    y = mamba_conv1d_scan_ref(xBC, conv1d_weight, conv1d_bias, dt, A, chunk_size, D,
                              z if rmsnorm_weight is None else None, dt_bias, True, dt_limit,
                              activation, p, ngroups)
    if rmsnorm_weight is not None:  # over all of dim, as mamba-ssm's reference (its fused
        # function and Mamba2 normalise each group of dim / ngroups channels on its own)
        y = rms_norm_ref(y, rmsnorm_weight, None, z, rmsnorm_eps, None, norm_before_gate)
    if outproj_weight is not None:
        y = F.linear(y, outproj_weight, outproj_bias)
    return y


def selective_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None,
                               dt_softplus=False):
    """mamba_ssm.ops.triton.selective_state_update.selective_state_update_ref: state
    [b, D, N] or [b, h, p, N] updated in place; x / dt / z [b, D] or [b, h, p]; A [D, N] or
    [h, p, N]; B / C [b, N] or [b, g, N]; D / dt_bias [D] or [h, p]. Returns out [b, D] or
    [b, h, p]."""
    heads = state.dim() > 3

    def up(t, dims, at=1):
        return t if t is None or t.dim() != dims else t.unsqueeze(at)

    out = spec.selective_state_update_ref(
        up(state, 3), up(x, 2), up(dt, 2), up(A, 2, 0), up(B, 2), up(C, 2), up(D, 1, 0),
        up(z, 2), up(dt_bias, 1, 0), bool(dt_softplus))
    return out if heads else out.squeeze(1)


# =============================================================================================
# fla naive references (layout [B, T, H, ...] unless said otherwise)
# =============================================================================================
def _h0(state, q, v):
    """fla's references add initial_state onto a zero [B, HV, K, V] state (`S += h0`), so any
    shape that broadcasts to it is accepted: fla's own varlen tests pass one sequence's
    [HV, K, V] row. Expanded here to the [B, HV, K, V] our spec takes."""
    if state is None or isinstance(state, tuple):
        return state
    full = (q.shape[0], v.shape[2], q.shape[-1], v.shape[-1])
    return state if tuple(state.shape) == full else state.expand(full)


def naive_recurrent_gla(q, k, v, gk, initial_state=None, output_final_state=False):
    """fla.ops.gla.naive.naive_recurrent_gla: scale K**-0.5, vector gate gk [B, T, H, K];
    returns (o in q's dtype, final state [B, H, K, V] or None)."""
    o, ht = spec.gla_ref(q, k, v, gk, None, _h0(initial_state, q, v), bool(output_final_state))
    return o.to(q.dtype), ht


def naive_recurrent_simple_gla(q, k, v, g, scale=None, initial_state=None,
                               output_final_state=True):
    """fla.ops.simple_gla.naive.naive_recurrent_simple_gla: scalar gate g [B, T, H]; note fla's
    default output_final_state=True."""
    o, ht = spec.simple_gla_ref(q, k, v, g, None, scale, _h0(initial_state, q, v),
                                bool(output_final_state))
    return o.to(q.dtype), ht


def _normalizer(q, k, scale, z_init):
    """fla's linear-attention normalizer: q_t . (z_init + sum_{s<=t} k_s) * scale + 1e-10."""
    acc = _acc(q)
    k_cum = k.to(acc).cumsum(1)
    if z_init is not None:
        k_cum = k_cum + z_init.to(acc)
    return (q.to(acc) * scale * k_cum).sum(-1, keepdim=True) + 1e-10, k_cum


def naive_recurrent_linear_attn(q, k, v, scale=None, initial_state=None,
                                output_final_state=False, normalize=False):
    """fla.ops.linear_attn.naive.naive_recurrent_linear_attn. normalize: o divided by
    q . (running key sum) * scale (+1e-10); initial_state may then be (kv, z) and the final
    state is (kv, z [B, 1, H, K]) — or None without output_final_state."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kv_init, z_init = initial_state, None
    if normalize and isinstance(initial_state, tuple):
        kv_init, z_init = initial_state
    o, ht = spec.linear_attn_ref(q, k, v, scale, _h0(kv_init, q, v),
                                bool(output_final_state))
    if not normalize:
        return o.to(q.dtype), ht
    den, k_cum = _normalizer(q, k, scale, z_init)
    o = (o.to(den.dtype) / den).to(q.dtype)
    return o, ((ht, k_cum[:, -1:]) if output_final_state else None)


def naive_chunk_linear_attn(q, k, v, scale=None, normalize=False):
    """fla.ops.linear_attn.naive.naive_chunk_linear_attn: causal linear attention from a zero
    state, returns o only (any T: fla's needs T % 64 == 0)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    o, _ = spec.linear_attn_ref(q, k, v, scale)
    if normalize:
        den, _ = _normalizer(q, k, scale, None)
        o = o.to(den.dtype) / den
    return o.to(q.dtype)


def delta_rule_recurrence(q, k, v, beta, initial_state=None, output_final_state=True):
    """fla.ops.delta_rule.naive.delta_rule_recurrence, head-first layout: q / k [B, H, T, K],
    v [B, H, T, V], beta [B, H, T] (or [B, H, T, V]: a per-value-channel beta is not
    supported); scale K**-0.5. Returns (o [B, H, T, V], final state or None)."""
    if beta.dim() == v.dim():
        raise unsupported("delta_rule_recurrence", "beta", "a per-channel beta [B, H, T, V] "
                          "is not supported; pass [B, H, T]")
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    o, ht = spec.delta_rule_ref(q, k, v, beta.transpose(1, 2), None, _h0(initial_state, q, v),
                                output_final_state is not False)
    return o.transpose(1, 2).to(q.dtype), ht


def naive_recurrent_gated_delta_rule(q, k, v, beta, g, scale=None, initial_state=None,
                                     output_final_state=False):
    """fla.ops.gated_delta_rule.naive.naive_recurrent_gated_delta_rule (note fla's order:
    beta before g): g [B, T, H] log decay, beta [B, T, H]."""
    return spec.gated_delta_rule_ref(q, k, v, g, beta, scale, _h0(initial_state, q, v),
                                     bool(output_final_state))


def naive_recurrent_kda(q, k, v, g, beta, scale=None, initial_state=None,
                        output_final_state=False):
    """fla.ops.kda.naive.naive_recurrent_kda: per-channel log decay g [B, T, HV, K], v / beta
    with HV = m * H value heads. Returns (o in v's dtype, final state [B, HV, K, V] or None)."""
    return spec.kda_ref(q, k, v, g, beta, scale, _h0(initial_state, q, v),
                        bool(output_final_state))


def naive_kda_gate(g, A_log, dt_bias=None, output_dtype=torch.float32):
    """fla.ops.kda.gate.naive_kda_gate: -exp(A_log[h]) * softplus(g + dt_bias) over g
    [..., H, K] (dt_bias [H * K])."""
    H = g.shape[-2]
    acc = _acc(g)
    x = g.to(acc)
    if dt_bias is not None:
        x = x + dt_bias.to(acc).view(H, -1)
    return (-A_log.to(acc).view(H, 1).exp() * F.softplus(x)).to(output_dtype)


def naive_kda_lowerbound_gate(g, A_log=None, dt_bias=None, lower_bound=-5.0,
                              output_dtype=torch.float32):
    """fla.ops.kda.gate.naive_kda_lowerbound_gate: lower_bound * sigmoid(exp(A_log[h]) *
    (g + dt_bias)) (without A_log: lower_bound * sigmoid(g + dt_bias))."""
    H = g.shape[-2]
    acc = _acc(g)
    x = g.to(acc)
    if dt_bias is not None:
        x = x + dt_bias.to(acc).view(H, -1)
    if A_log is not None:
        x = A_log.to(acc).view(H, 1).exp() * x
    return (lower_bound * torch.sigmoid(x)).to(output_dtype)


def naive_parallel_simple_gla(q, k, v, g, scale=None):
    """fla.ops.simple_gla.naive.naive_parallel_simple_gla: the parallel (attention-matrix) form
    of simple GLA from a zero state. Returns (o [B, T, H, V], A [B, H, T, T]) with
    A[t, s] = scale q_t . k_s exp(sum_{s < r <= t} g_r) for s <= t, 0 above the diagonal; both
    in float32 (float64 for float64 inputs), as fla's are float32. g None: no decay."""
    acc = _acc(q)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qf, kf, vf = (x.to(acc).transpose(1, 2) for x in (q, k, v))      # [B, H, T, D]
    A = qf @ kf.transpose(-1, -2) * scale
    T = q.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    if g is not None:
        gc = g.to(acc).transpose(1, 2).cumsum(-1)                     # [B, H, T]
        # masked to -inf before exp: the upper triangle would overflow (positive sums)
        seg = (gc[..., :, None] - gc[..., None, :]).masked_fill(~causal, float("-inf"))
        A = A * seg.exp()
    else:
        A = A.masked_fill(~causal, 0.0)
    return (A @ vf).transpose(1, 2), A


def naive_chunk_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                    chunk_size=64):
    """fla.ops.kda.naive.naive_chunk_kda: KDA in chunked (WY) form. Served by lightning_ops'
    chunked PyTorch engine (the torch backend, forced: the executable spec of the kernels), so
    fla's test of it against naive_recurrent_kda checks our chunk engine against our
    token-by-token spec. chunk_size: a power of 2 (tiling only; the result does not depend on
    it; any T, where fla's needs T % chunk_size == 0). Returns (o in v's dtype, final state
    [B, HV, K, V] float32 / float64, or None)."""
    import lightning_ops as lo

    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1 or \
            chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a positive power of 2, got {chunk_size!r}")
    acc = _acc(q)
    with lo.use_backend("torch"):
        o, ht = lo.chunk_kda(q.to(acc), k.to(acc), v.to(acc), g.to(acc), beta.to(acc),
                             scale=scale, initial_state=initial_state,
                             output_final_state=bool(output_final_state))
    return o.to(v.dtype), ht


def naive_gdn_gate(g, A_log, dt_bias=None, output_dtype=torch.float32):
    """fla.ops.gated_delta_rule.gate.naive_gdn_gate: -exp(A_log[h]) * softplus(g + dt_bias[h])
    over g [..., HV] (the Gated DeltaNet / Mamba-2 gate), computed in float32 (float64 for
    float64 inputs)."""
    acc = _acc(g)
    x = g.to(acc)
    if dt_bias is not None:
        x = x + dt_bias.to(acc)
    return (-A_log.to(acc).exp() * F.softplus(x)).to(output_dtype)


def naive_log_linear_attn(q, k, v, g, level_scales, scale=1.0):
    """fla.ops.log_linear_attn.naive.naive_log_linear_attn: log-linear attention as one masked
    T x T matrix per sequence (the Fenwick level of each (query, key) pair weighted by
    level_scales), from a zero state. q / k [B, T, G, K], v [B, T, H, V] (H a multiple of G),
    g [B, T, H], level_scales [B, T, H, L]. scale: fla's default 1.0; None means K**-0.5.
    Returns o in v's dtype (float64 for float64 inputs)."""
    if v.shape[2] % k.shape[2] != 0:
        raise ValueError("The number of value heads must be divisible by the number of "
                         "query/key heads.")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return spec.log_linear_attn_masked_ref(q, k, v, g, level_scales, scale).to(v.dtype)

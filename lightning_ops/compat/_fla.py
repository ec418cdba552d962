"""fla (flash-linear-attention 0.6.0) signatures over lightning_ops' public ops.

Every function takes fla's arguments in fla's positional order with fla's defaults and returns
what fla returns; the work is done by lightning_ops' public ops plus cheap torch glue (gate
activations, transposes, time reversal, dtype promotion). Arguments we cannot honour exactly
raise `UnsupportedArgumentError` (a NotImplementedError) naming them.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

import lightning_ops as lo

from ._common import (
    check_bool,
    check_chunk_size,
    flip_time,
    promote,
    reverse_index,
    state_v_first_alias,
    take_kwargs,
    transpose_state,
    unsupported,
    NotServed,
)

Tensor = torch.Tensor

# Served in alias mode only (fla not installed); an installed fla keeps its own: its testing
# helpers, device flags and cache mode describe its own kernels, and its chunk_log_linear_attn
# carries a state object of its own (the previous chunk's inputs) that its layers pass back in.
KEEP_PEER_MODULES = frozenset({"fla.utils", "fla.ops.utils", "fla.ops.utils.cache"})
# fused_recurrent_kda_fwd: fla's decode entry also serves speculative decoding, which ours
# refuses; an installed fla's callers (vLLM-style) keep the complete one.
KEEP_PEER_NAMES = frozenset({"chunk_log_linear_attn", "fused_recurrent_kda_fwd"})


# ---------------------------------------------------------------------------------------------
# shared glue
# ---------------------------------------------------------------------------------------------
def _call(op, q, k, v, extra: dict, scale, initial_state, output_final_state, cu_seqlens,
          reverse: bool = False, state_v_first: bool = False, out_dtype=None, time_args=()):
    """Run `op(q, k, v, **extra, ...)` with fla's layout options applied around it:
    state_v_first transposes states, reverse flips time (per sequence), mixed float dtypes
    are promoted; `time_args` names the entries of `extra` that have a time axis."""
    out_dtype = out_dtype or v.dtype
    q, k, v = promote(q, k, v)
    idx = reverse_index(q.shape[1], cu_seqlens, q.device) if reverse else None
    if idx is not None:
        q, k, v = flip_time(q, idx), flip_time(k, idx), flip_time(v, idx)
        extra = {n: (flip_time(t, idx) if n in time_args else t) for n, t in extra.items()}
    h0 = transpose_state(initial_state, state_v_first)
    o, ht = op(q, k, v, **extra, scale=scale, initial_state=h0,
               output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    o = flip_time(o, idx)
    return o.to(out_dtype), transpose_state(ht, state_v_first)


def _normalize(o, q, k, scale, z_init, reverse, cu_seqlens, recurrent):
    """fla's normalised linear attention: o_t / (scale q_t . z_t + 1e-10), z_t the running sum
    of keys (plus z_init [N, 1, H, K]). The denominator is itself linear attention with a value
    of ones, so it runs through our own op: exact for varlen, reverse and initial states, no
    difference of large cumulative sums. Returns (o, z_state [N, 1, H, K] in k's dtype)."""
    kdt = k.dtype
    q, k = promote(q, k)
    ones = q.new_ones(q.shape[:3] + (1,))
    h0 = None if z_init is None else z_init.squeeze(1).unsqueeze(-1)
    op = lo.fused_recurrent_linear_attn if recurrent else lo.chunk_linear_attn
    den, z = _call(op, q, k, ones, {}, scale, h0, True, cu_seqlens, reverse=reverse)
    o = (o / (den + 1e-10)).to(o.dtype)
    return o, z.squeeze(-1).unsqueeze(1).to(kdt)


def _linear_attn(fn, q, k, v, scale, initial_state, output_final_state, normalize, cu_seqlens,
                 reverse, recurrent):
    check_bool(fn, "normalize", normalize)
    if normalize and isinstance(initial_state, tuple):
        kv_init, z_init = initial_state
    else:
        kv_init, z_init = initial_state, None
    if scale is None:
        scale = k.shape[-1] ** -0.5
    op = lo.fused_recurrent_linear_attn if recurrent else lo.chunk_linear_attn
    o, ht = _call(op, q, k, v, {}, scale, kv_init, output_final_state, cu_seqlens,
                  reverse=reverse)
    if normalize:
        o, z = _normalize(o, q, k, scale, z_init, reverse, cu_seqlens, recurrent)
        return o, (ht, z)
    return o, ht


def _gdn_gate(fn, g: Optional[Tensor], A_log: Optional[Tensor], dt_bias: Optional[Tensor]):
    """The GDN / Mamba-2 gate fla computes in-kernel: -exp(A_log) * softplus(g + dt_bias), in
    fp32 (fp64 for fp64 inputs)."""
    if A_log is None:
        raise ValueError("`A_log` must be provided when `use_gate_in_kernel=True`.")
    if g is None:
        raise ValueError("`g` (raw pre-activation) must be provided when "
                         "`use_gate_in_kernel=True`.")
    acc = torch.float64 if g.dtype == torch.float64 else torch.float32
    x = g.to(acc)
    if dt_bias is not None:
        x = x + dt_bias.to(acc)
    return -A_log.to(acc).exp() * F.softplus(x)


def _beta(beta: Tensor, use_sigmoid: bool, allow_neg_eigval: bool) -> Tensor:
    if allow_neg_eigval and not use_sigmoid:
        raise ValueError("`allow_neg_eigval=True` requires `use_beta_sigmoid_in_kernel=True`.")
    if not use_sigmoid:
        return beta
    # kept in fp32 (fp64 for fp64): fla applies the sigmoid in-kernel and never rounds the
    # result back to beta's dtype (an fp16 round trip costs ~1e-4 relative in o and ht)
    acc = torch.float64 if beta.dtype == torch.float64 else torch.float32
    b = torch.sigmoid(beta.to(acc))
    return 2.0 * b if allow_neg_eigval else b


def _reject_cp(fn, cp_context):
    if cp_context is not None:
        raise unsupported(fn, "cp_context", "context parallelism is not implemented; pass "
                          "cp_context=None (one device per sequence)")


# ---------------------------------------------------------------------------------------------
# linear attention
# ---------------------------------------------------------------------------------------------
def chunk_linear_attn(q, k, v, scale: Optional[float] = None, initial_state=None,
                      output_final_state: bool = False, normalize: bool = True,
                      cu_seqlens: Optional[Tensor] = None):
    """fla.ops.linear_attn.chunk_linear_attn. normalize=True (fla's default) divides by the
    running normaliser and returns (o, (final_state, z_state)); initial_state may then be a
    (kv_state [N,H,K,V], z_state [N,1,H,K]) tuple."""
    return _linear_attn("chunk_linear_attn", q, k, v, scale, initial_state, output_final_state,
                        normalize, cu_seqlens, False, recurrent=False)


def fused_chunk_linear_attn(q, k, v, scale: Optional[float] = None, initial_state=None,
                            output_final_state: bool = False, normalize: bool = True,
                            cu_seqlens: Optional[Tensor] = None):
    """fla.ops.linear_attn.fused_chunk_linear_attn (same math as chunk_linear_attn)."""
    return _linear_attn("fused_chunk_linear_attn", q, k, v, scale, initial_state,
                        output_final_state, normalize, cu_seqlens, False, recurrent=False)


def fused_recurrent_linear_attn(q, k, v, scale: Optional[float] = None, initial_state=None,
                                output_final_state: bool = False, reverse: bool = False,
                                normalize: bool = False, cu_seqlens: Optional[Tensor] = None):
    """fla.ops.linear_attn.fused_recurrent_linear_attn (normalize defaults to False here, as
    in fla)."""
    check_bool("fused_recurrent_linear_attn", "reverse", reverse)
    return _linear_attn("fused_recurrent_linear_attn", q, k, v, scale, initial_state,
                        output_final_state, normalize, cu_seqlens, reverse, recurrent=True)


# ---------------------------------------------------------------------------------------------
# simple GLA
# ---------------------------------------------------------------------------------------------
def chunk_simple_gla(q, k, v, g: Optional[Tensor] = None, g_gamma: Optional[Tensor] = None,
                     scale: Optional[float] = None, initial_state: Optional[Tensor] = None,
                     output_final_state: bool = False, state_v_first: bool = False,
                     cu_seqlens: Optional[Tensor] = None,
                     cu_seqlens_cpu: Optional[Tensor] = None, **kwargs):
    """fla.ops.simple_gla.chunk_simple_gla. kwargs: chunk_size (a power of 2; tiling only),
    chunk_indices (derived from cu_seqlens; ignored)."""
    kw = take_kwargs("chunk_simple_gla", kwargs, ("chunk_size", "chunk_indices"))
    check_chunk_size("chunk_simple_gla", kw.get("chunk_size"))
    check_bool("chunk_simple_gla", "state_v_first", state_v_first)
    return _call(lo.chunk_simple_gla, q, k, v, {"g": g, "g_gamma": g_gamma}, scale,
                 initial_state, output_final_state, cu_seqlens, state_v_first=state_v_first)


def fused_chunk_simple_gla(q, k, v, g: Optional[Tensor] = None,
                           g_gamma: Optional[Tensor] = None, scale: Optional[float] = None,
                           initial_state: Optional[Tensor] = None,
                           output_final_state: bool = False,
                           cu_seqlens: Optional[Tensor] = None):
    """fla.ops.simple_gla.fused_chunk_simple_gla (same math as chunk_simple_gla)."""
    return _call(lo.chunk_simple_gla, q, k, v, {"g": g, "g_gamma": g_gamma}, scale,
                 initial_state, output_final_state, cu_seqlens)


def fused_recurrent_simple_gla(q, k, v, g: Optional[Tensor] = None,
                               g_gamma: Optional[Tensor] = None, scale: Optional[float] = None,
                               initial_state: Optional[Tensor] = None,
                               output_final_state: bool = False, reverse: bool = False,
                               state_v_first: bool = False,
                               cu_seqlens: Optional[Tensor] = None, **kwargs):
    """fla.ops.simple_gla.fused_recurrent_simple_gla."""
    kw = take_kwargs("fused_recurrent_simple_gla", kwargs, ("transpose_state_layout",))
    state_v_first = state_v_first_alias("fused_recurrent_simple_gla", state_v_first, kw)
    check_bool("fused_recurrent_simple_gla", "reverse", reverse)
    return _call(lo.fused_recurrent_simple_gla, q, k, v, {"g": g, "g_gamma": g_gamma}, scale,
                 initial_state, output_final_state, cu_seqlens, reverse=reverse,
                 state_v_first=state_v_first, time_args=("g",))


# ---------------------------------------------------------------------------------------------
# GLA
# ---------------------------------------------------------------------------------------------
def chunk_gla(q, k, v, g: Tensor, scale: Optional[float] = None,
              initial_state: Optional[Tensor] = None, output_final_state: bool = False,
              state_v_first: bool = False, cu_seqlens: Optional[Tensor] = None,
              cu_seqlens_cpu: Optional[Tensor] = None):
    """fla.ops.gla.chunk_gla (g [B, T, H, K] log decays)."""
    check_bool("chunk_gla", "state_v_first", state_v_first)
    return _call(lo.chunk_gla, q, k, v, {"g": g}, scale, initial_state, output_final_state,
                 cu_seqlens, state_v_first=state_v_first)


def fused_chunk_gla(**kwargs):
    """Deprecated in fla, which raises the same error."""
    raise NotImplementedError("`fused_chunk_gla` is deprecated. Please use `chunk_gla` instead.")


def fused_recurrent_gla(q, k, v, gk: Optional[Tensor] = None, gv: Optional[Tensor] = None,
                        scale: Optional[float] = None, initial_state: Optional[Tensor] = None,
                        output_final_state: bool = False, reverse: bool = False,
                        state_v_first: bool = False, cu_seqlens: Optional[Tensor] = None,
                        **kwargs):
    """fla.ops.gla.fused_recurrent_gla: gk [B, T, H, K] key-side gate; no gate at all is plain
    linear attention. The value-side gate gv is not supported."""
    fn = "fused_recurrent_gla"
    kw = take_kwargs(fn, kwargs, ("transpose_state_layout",))
    state_v_first = state_v_first_alias(fn, state_v_first, kw)
    check_bool(fn, "reverse", reverse)
    if gv is not None:
        raise unsupported(fn, "gv", "the value-side gate (decay over V) has no counterpart in "
                          "lightning_ops' chunk engine; pass gk only")
    if gk is None:
        return _call(lo.fused_recurrent_linear_attn, q, k, v, {}, scale, initial_state,
                     output_final_state, cu_seqlens, reverse=reverse,
                     state_v_first=state_v_first)
    return _call(lo.fused_recurrent_gla, q, k, v, {"g": gk}, scale, initial_state,
                 output_final_state, cu_seqlens, reverse=reverse, state_v_first=state_v_first,
                 time_args=("g",))


# ---------------------------------------------------------------------------------------------
# Lightning Attention (fla: per-layer slopes from layer_idx / num_layers)
# ---------------------------------------------------------------------------------------------
def lightning_g_gamma(H: int, layer_idx: int, num_layers: int, device=None) -> Tensor:
    """fla's per-head log decay for layer `layer_idx` of `num_layers`:
    g_gamma[h] = -(8 / H) * (1 - layer_idx / num_layers) * h  (float32; head 0 never decays)."""
    for name, val in (("layer_idx", layer_idx), ("num_layers", num_layers)):
        if isinstance(val, bool) or not isinstance(val, int):
            raise TypeError(f"{name} must be a Python int, got {val!r}")
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    return -(8 / H * (1 - layer_idx / num_layers)) * torch.arange(H, dtype=torch.float32,
                                                                   device=device)


def chunk_lightning_attn(q, k, v, layer_idx: int, num_layers: int,
                         scale: Optional[float] = None, initial_state: Optional[Tensor] = None,
                         output_final_state: bool = False,
                         cu_seqlens: Optional[Tensor] = None, **kwargs):
    """fla.ops.lightning_attn.chunk_lightning_attn. kwargs: chunk_size (tiling only)."""
    kw = take_kwargs("chunk_lightning_attn", kwargs, ("chunk_size",))
    check_chunk_size("chunk_lightning_attn", kw.get("chunk_size"))
    g_gamma = lightning_g_gamma(q.shape[2], layer_idx, num_layers, q.device)
    return _call(lo.chunk_simple_gla, q, k, v, {"g_gamma": g_gamma}, scale, initial_state,
                 output_final_state, cu_seqlens)


def fused_recurrent_lightning_attn(q, k, v, layer_idx: int, num_layers: int,
                                   scale: Optional[float] = None,
                                   initial_state: Optional[Tensor] = None,
                                   output_final_state: bool = False, reverse: bool = False,
                                   cu_seqlens: Optional[Tensor] = None):
    """fla.ops.lightning_attn.fused_recurrent_lightning_attn (no **kwargs, as in fla)."""
    check_bool("fused_recurrent_lightning_attn", "reverse", reverse)
    g_gamma = lightning_g_gamma(q.shape[2], layer_idx, num_layers, q.device)
    return _call(lo.fused_recurrent_simple_gla, q, k, v, {"g_gamma": g_gamma}, scale,
                 initial_state, output_final_state, cu_seqlens, reverse=reverse)


# ---------------------------------------------------------------------------------------------
# delta rule
# ---------------------------------------------------------------------------------------------
def chunk_delta_rule(q, k, v, beta: Tensor, scale: Optional[float] = None,
                     initial_state: Optional[Tensor] = None, output_final_state: bool = False,
                     use_qk_l2norm_in_kernel: bool = False,
                     cu_seqlens: Optional[Tensor] = None,
                     cu_seqlens_cpu: Optional[Tensor] = None, **kwargs):
    """fla.ops.delta_rule.chunk_delta_rule (note fla's order: use_qk_l2norm_in_kernel comes
    before cu_seqlens). kwargs: chunk_size in (16, 32, 64) (tiling only). Unlike fla, float32
    inputs are accepted."""
    kw = take_kwargs("chunk_delta_rule", kwargs, ("chunk_size", "chunk_indices"))
    check_chunk_size("chunk_delta_rule", kw.get("chunk_size"), (16, 32, 64))
    if beta is None or beta.dim() != 3:
        raise AssertionError("beta must be of shape (batch size, num of head, seq len).")
    return _call(lambda q, k, v, **a: lo.chunk_delta_rule(
        q, k, v, beta, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, **a),
        q, k, v, {}, scale, initial_state, output_final_state, cu_seqlens)


def fused_recurrent_delta_rule(q, k, v, beta: Optional[Tensor] = None,
                               scale: Optional[float] = None,
                               initial_state: Optional[Tensor] = None,
                               output_final_state: bool = False,
                               use_qk_l2norm_in_kernel: bool = False,
                               cu_seqlens: Optional[Tensor] = None):
    """fla.ops.delta_rule.fused_recurrent_delta_rule (beta defaults to ones)."""
    if scale is not None and not scale > 0:
        raise AssertionError("scale must be positive")
    if beta is None:
        beta = torch.ones_like(q[..., 0])
    return _call(lambda q, k, v, **a: lo.fused_recurrent_delta_rule(
        q, k, v, beta, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, **a),
        q, k, v, {}, scale, initial_state, output_final_state, cu_seqlens)


def chunk_gated_delta_rule(q, k, v, g: Tensor, beta: Tensor, scale: Optional[float] = None,
                           initial_state: Optional[Tensor] = None,
                           output_final_state: bool = False,
                           use_qk_l2norm_in_kernel: bool = False,
                           use_beta_sigmoid_in_kernel: bool = False,
                           allow_neg_eigval: bool = False, state_v_first: bool = False,
                           cu_seqlens: Optional[Tensor] = None,
                           cu_seqlens_cpu: Optional[Tensor] = None,
                           chunk_indices: Optional[Tensor] = None, cp_context=None, **kwargs):
    """fla.ops.gated_delta_rule.chunk_gated_delta_rule. kwargs: use_gate_in_kernel, A_log,
    dt_bias (g is then the raw input of -exp(A_log) * softplus(g + dt_bias)), chunk_size in
    (16, 32, 64) (tiling only). Output in q's dtype, as fla."""
    fn = "chunk_gated_delta_rule"
    kw = take_kwargs(fn, kwargs, ("use_gate_in_kernel", "A_log", "dt_bias", "chunk_size",
                                  "transpose_state_layout"))
    state_v_first = state_v_first_alias(fn, state_v_first, kw)
    check_chunk_size(fn, kw.get("chunk_size", 64), (16, 32, 64), " for Gated Delta Rule")
    _reject_cp(fn, cp_context)
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must have the same number of heads, but got "
                         f"q.shape[2]={q.shape[2]} and k.shape[2]={k.shape[2]}")
    if kw.get("use_gate_in_kernel", False):
        g = _gdn_gate(fn, g, kw.get("A_log"), kw.get("dt_bias"))
    beta = _beta(beta, check_bool(fn, "use_beta_sigmoid_in_kernel", use_beta_sigmoid_in_kernel),
                 check_bool(fn, "allow_neg_eigval", allow_neg_eigval))
    return _call(lambda q, k, v, **a: lo.chunk_gated_delta_rule(
        q, k, v, g, beta, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, **a),
        q, k, v, {}, scale, initial_state, output_final_state, cu_seqlens,
        state_v_first=state_v_first, out_dtype=q.dtype)


def fused_recurrent_gated_delta_rule(q, k, v, g: Optional[Tensor] = None,
                                     gk: Optional[Tensor] = None, gv: Optional[Tensor] = None,
                                     beta: Optional[Tensor] = None,
                                     scale: Optional[float] = None,
                                     initial_state: Optional[Tensor] = None,
                                     output_final_state: bool = False,
                                     use_qk_l2norm_in_kernel: bool = False,
                                     use_gate_in_kernel: bool = False,
                                     A_log: Optional[Tensor] = None,
                                     dt_bias: Optional[Tensor] = None,
                                     use_beta_sigmoid_in_kernel: bool = False,
                                     allow_neg_eigval: bool = False,
                                     state_v_first: bool = False,
                                     cu_seqlens: Optional[Tensor] = None, **kwargs):
    """fla.ops.gated_delta_rule.fused_recurrent_gated_delta_rule: g [B, T, HV] (None: the
    ungated delta rule) or a per-key gate gk [B, T, HV, K] (KDA), beta defaults to ones.
    Per-value gates gv are not supported."""
    fn = "fused_recurrent_gated_delta_rule"
    kw = take_kwargs(fn, kwargs, ("transpose_state_layout",))
    state_v_first = state_v_first_alias(fn, state_v_first, kw)
    if gv is not None:
        raise unsupported(fn, "gv", "per-value gates in the delta rule have no counterpart in "
                          "lightning_ops; pass the scalar gate g or the per-key gate gk")
    if gk is not None and g is not None:
        raise unsupported(fn, "gk", "both g and gk given; fold the scalar gate into gk")
    if beta is None:
        beta = torch.ones_like(q[..., 0])
    if check_bool(fn, "use_gate_in_kernel", use_gate_in_kernel):
        g = _gdn_gate(fn, g, A_log, dt_bias)
    beta = _beta(beta, check_bool(fn, "use_beta_sigmoid_in_kernel", use_beta_sigmoid_in_kernel),
                 check_bool(fn, "allow_neg_eigval", allow_neg_eigval))
    if gk is not None:  # a per-key gate: KDA
        op = (lambda q, k, v, **a: lo.fused_recurrent_kda(
            q, k, v, gk, beta, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, **a))
    elif g is None:
        op = (lambda q, k, v, **a: lo.fused_recurrent_delta_rule(
            q, k, v, beta, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, **a))
    else:
        op = (lambda q, k, v, **a: lo.fused_recurrent_gated_delta_rule(
            q, k, v, g, beta, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, **a))
    return _call(op, q, k, v, {}, scale, initial_state, output_final_state, cu_seqlens,
                 state_v_first=state_v_first)


def fused_chunk_delta_rule(**kwargs):
    """Deprecated in fla, which raises the same error."""
    raise NotImplementedError("fused_chunk_delta_rule is deprecated. Please use "
                              "chunk_delta_rule instead.")


chunk_gdn = chunk_gated_delta_rule
fused_recurrent_gdn = fused_recurrent_gated_delta_rule


# ---------------------------------------------------------------------------------------------
# KDA (Kimi Delta Attention): the gated delta rule with a per-channel decay g [B, T, HV, K]
# ---------------------------------------------------------------------------------------------
def _kda_gate(fn, g: Tensor, A_log: Optional[Tensor], dt_bias: Optional[Tensor],
              lower_bound: Optional[float]) -> Tensor:
    """The KDA gate fla computes in-kernel from the raw g [B, T, HV, K]:
    -exp(A_log[h]) * softplus(g + dt_bias), or with lower_bound:
    lower_bound * sigmoid(exp(A_log[h]) * (g + dt_bias)) (A_log may then be None: factor 1).
    dt_bias: [HV * K] (per channel) or [HV]. fp32 (fp64 for fp64 inputs)."""
    if A_log is None and lower_bound is None:
        raise ValueError("`A_log` must be provided when `use_gate_in_kernel=True` and "
                         "`lower_bound` is not set.")
    HV, K = g.shape[2], g.shape[3]
    acc = torch.float64 if g.dtype == torch.float64 else torch.float32
    x = g.to(acc)
    if dt_bias is not None:
        x = x + (dt_bias.to(acc).view(HV, K) if dt_bias.numel() == HV * K
                 else dt_bias.to(acc).view(HV, 1))
    a = None if A_log is None else A_log.to(acc).exp().view(HV, 1)
    if lower_bound is not None:
        return lower_bound * torch.sigmoid(x if a is None else a * x)
    return -a * F.softplus(x)


def _kda(fn, recurrent, q, k, v, g, beta, scale, initial_state, output_final_state,
         use_qk_l2norm_in_kernel, use_gate_in_kernel, use_beta_sigmoid_in_kernel,
         allow_neg_eigval, lower_bound, state_v_first, cu_seqlens, A_log, dt_bias,
         chunk_states: bool = False):
    if check_bool(fn, "use_gate_in_kernel", use_gate_in_kernel):
        g = _kda_gate(fn, g, A_log, dt_bias, lower_bound)
    beta = _beta(beta, check_bool(fn, "use_beta_sigmoid_in_kernel", use_beta_sigmoid_in_kernel),
                 check_bool(fn, "allow_neg_eigval", allow_neg_eigval))
    op = lo.fused_recurrent_kda if recurrent else lo.chunk_kda

    def run(q, k, v, g, beta, h0, final, cu):
        return _call(lambda q, k, v, **a: op(
            q, k, v, g, beta, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, **a),
            q, k, v, {}, scale, h0, final, cu,
            state_v_first=state_v_first, out_dtype=q.dtype if not recurrent else v.dtype)

    if chunk_states:
        return _with_chunk_states(run, q, k, v, g, beta, initial_state, output_final_state,
                                  cu_seqlens, state_v_first)
    return run(q, k, v, g, beta, initial_state, output_final_state, cu_seqlens)


def _with_chunk_states(run, q, k, v, g, beta, initial_state, output_final_state, cu_seqlens,
                       state_v_first, chunk: int = 64):
    """fla's return_intermediate_states: also the state at the start of every 64-token chunk
    of every sequence (the first one is the initial state), [B, NT, HV, K, V] (varlen: [1,
    total chunks, HV, K, V], sequence by sequence) in k's dtype, as fla. The op runs chunk by
    chunk, each piece starting from the previous piece's final state (the same recurrence;
    an inference feature, so one call per chunk is acceptable). Varlen reads the sequence
    bounds on the host, as fla's chunk indices do."""
    B, T, HV = q.shape[0], q.shape[1], v.shape[2]
    shape = (HV, v.shape[-1], q.shape[-1]) if state_v_first else (HV, q.shape[-1], v.shape[-1])
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is None:
        initial_state = q.new_zeros((N,) + shape, dtype=torch.float32)
    if cu_seqlens is None:
        segments = [(slice(None), 0, T, initial_state)]
    else:
        bounds = [int(x) for x in cu_seqlens.tolist()]
        segments = [(slice(0, 1), bounds[n], bounds[n + 1], initial_state[n:n + 1])
                    for n in range(N)]
    o = torch.empty_like(v, dtype=q.dtype)
    states, finals = [], []
    for rows, bos, eos, h in segments:
        seq_states = []
        for s in range(bos, eos, chunk):
            e = min(s + chunk, eos)
            seq_states.append(h)
            piece = (slice(None) if cu_seqlens is None else rows, slice(s, e))
            o[piece], h = run(q[piece], k[piece], v[piece], g[piece], beta[piece], h, True, None)
        states.append(torch.stack(seq_states, 1) if seq_states else
                      h.new_zeros((h.shape[0], 0) + shape))
        finals.append(h)
    hs = torch.cat(states, 1).to(k.dtype)
    final = torch.cat(finals, 0) if output_final_state else None
    return o, final, hs


def chunk_kda(q, k, v, g: Tensor, beta: Tensor, scale: Optional[float] = None,
              initial_state: Optional[Tensor] = None, output_final_state: bool = False,
              use_qk_l2norm_in_kernel: bool = False, use_gate_in_kernel: bool = False,
              use_beta_sigmoid_in_kernel: bool = False, allow_neg_eigval: bool = False,
              safe_gate: bool = False, lower_bound: Optional[float] = None,
              disable_recompute: bool = False, return_intermediate_states: bool = False,
              state_v_first: bool = False, cu_seqlens: Optional[Tensor] = None,
              cu_seqlens_cpu: Optional[Tensor] = None, cp_context=None,
              use_graph: bool = False, max_num_seqs: Optional[int] = None, **kwargs):
    """fla.ops.kda.chunk_kda. kwargs: A_log [HV], dt_bias [HV * K] (with use_gate_in_kernel),
    chunk_size in (32, 64) (tiling only). safe_gate / disable_recompute / use_graph change only
    speed in fla and are accepted. return_intermediate_states=True returns (o, final_state,
    h) with h the state at the start of every 64-token chunk (see _with_chunk_states)."""
    fn = "chunk_kda"
    kw = take_kwargs(fn, kwargs, ("A_log", "dt_bias", "chunk_size", "transpose_state_layout"))
    state_v_first = state_v_first_alias(fn, state_v_first, kw)
    check_chunk_size(fn, kw.get("chunk_size", 64), (32, 64), " for KDA")
    _reject_cp(fn, cp_context)
    if safe_gate and use_gate_in_kernel:
        if lower_bound is None:
            raise ValueError("`lower_bound` must be specified when `safe_gate=True` and "
                             "`use_gate_in_kernel=True`.")
        if not -5 <= lower_bound < 0:
            raise ValueError(f"`lower_bound` must be in the safe range [-5, 0), got "
                             f"{lower_bound}.")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape, got q={tuple(q.shape)} vs "
                         f"k={tuple(k.shape)}")
    return _kda(fn, False, q, k, v, g, beta, scale, initial_state, output_final_state,
                use_qk_l2norm_in_kernel, use_gate_in_kernel, use_beta_sigmoid_in_kernel,
                allow_neg_eigval, lower_bound, state_v_first, cu_seqlens, kw.get("A_log"),
                kw.get("dt_bias"), check_bool(fn, "return_intermediate_states",
                                              return_intermediate_states))


def fused_recurrent_kda(q, k, v, g: Tensor, beta: Tensor, A_log: Optional[Tensor] = None,
                        dt_bias: Optional[Tensor] = None, scale: Optional[float] = None,
                        initial_state: Optional[Tensor] = None,
                        output_final_state: bool = False,
                        use_qk_l2norm_in_kernel: bool = False,
                        use_gate_in_kernel: bool = False,
                        use_beta_sigmoid_in_kernel: bool = False,
                        allow_neg_eigval: bool = False, lower_bound: Optional[float] = None,
                        state_v_first: bool = False, cu_seqlens: Optional[Tensor] = None,
                        **kwargs):
    """fla.ops.kda.fused_recurrent_kda (A_log and dt_bias positional, as in fla)."""
    fn = "fused_recurrent_kda"
    kw = take_kwargs(fn, kwargs, ("transpose_state_layout",))
    state_v_first = state_v_first_alias(fn, state_v_first, kw)
    return _kda(fn, True, q, k, v, g, beta, scale, initial_state, output_final_state,
                use_qk_l2norm_in_kernel, use_gate_in_kernel, use_beta_sigmoid_in_kernel,
                allow_neg_eigval, lower_bound, state_v_first, cu_seqlens, A_log, dt_bias)


def fused_kda_gate(g: Tensor, A_log: Optional[Tensor] = None,
                   dt_bias: Optional[Tensor] = None, lower_bound: Optional[float] = None,
                   output_dtype: torch.dtype = torch.float32) -> Tensor:
    """fla.ops.kda.gate.fused_kda_gate: the KDA gate from its raw input, g [..., HV, K].
    A_log may be None only with lower_bound (then lower_bound * sigmoid(g + dt_bias)), as fla."""
    shaped = g if g.dim() == 4 else g.view(1, -1, *g.shape[-2:])
    return _kda_gate("fused_kda_gate", shaped, A_log, dt_bias, lower_bound).view(
        g.shape).to(output_dtype)

# ---------------------------------------------------------------------------------------------
# the parallel (attention-matrix) form of simple GLA
# ---------------------------------------------------------------------------------------------
def parallel_simple_gla(q, k, v, g: Optional[Tensor] = None, scale: Optional[float] = None,
                        output_attentions: bool = False, cu_seqlens: Optional[Tensor] = None,
                        cu_seqlens_cpu: Optional[Tensor] = None):
    """fla.ops.simple_gla.parallel.parallel_simple_gla: the same math as chunk_simple_gla from a
    zero state; returns (o, attn) where attn [B, H, T, T] (q's dtype) is the decayed, scaled
    causal score matrix when output_attentions=True, else None."""
    fn = "parallel_simple_gla"
    check_bool(fn, "output_attentions", output_attentions)
    if cu_seqlens is not None and q.shape[0] != 1:
        raise ValueError(f"The batch size is expected to be 1 rather than {q.shape[0]} when "
                         f"using `cu_seqlens`. Please flatten variable-length inputs before "
                         f"processing.")
    if output_attentions and cu_seqlens is not None:
        raise AssertionError("output_attentions=True is not supported with variable-length "
                             "sequences")
    if scale is None:
        scale = k.shape[-1] ** -0.5
    o, _ = _call(lo.chunk_simple_gla, q, k, v, {"g": g}, scale, None, False, cu_seqlens)
    if not output_attentions:
        return o, None
    from ._refs import naive_parallel_simple_gla
    _, attn = naive_parallel_simple_gla(q, k, v, g, scale)
    return o, attn.to(q.dtype)


# ---------------------------------------------------------------------------------------------
# gates and kernel-level entry points fla's tests import
# ---------------------------------------------------------------------------------------------
def fused_gdn_gate(g: Tensor, A_log: Tensor, dt_bias: Optional[Tensor] = None,
                   output_dtype: torch.dtype = torch.float32) -> Tensor:
    """fla.ops.gated_delta_rule.gate.fused_gdn_gate: -exp(A_log[h]) * softplus(g + dt_bias[h])
    over g [..., HV], differentiable in g, A_log and dt_bias (fp32; fp64 for fp64 inputs)."""
    return _gdn_gate("fused_gdn_gate", g, A_log, dt_bias).to(output_dtype)


def fused_recurrent_kda_fwd(q, k, v, g, beta, A_log: Optional[Tensor] = None,
                            dt_bias: Optional[Tensor] = None,
                            initial_state: Optional[Tensor] = None,
                            scale: Optional[float] = None, output_final_state: bool = False,
                            inplace_final_state: bool = True, state_v_first: bool = False,
                            cu_seqlens: Optional[Tensor] = None,
                            ssm_state_indices: Optional[Tensor] = None,
                            num_accepted_tokens: Optional[Tensor] = None,
                            use_qk_l2norm_in_kernel: bool = False,
                            use_gate_in_kernel: bool = False,
                            use_beta_sigmoid_in_kernel: bool = False,
                            allow_neg_eigval: bool = False, lower_bound: Optional[float] = None,
                            out: Optional[Tensor] = None, **kwargs):
    """fla.ops.kda.fused_recurrent.fused_recurrent_kda_fwd, the decode entry point (vLLM):
    with inplace_final_state=True (fla's default) initial_state is a state pool and sequence n
    reads and writes row ssm_state_indices[n] in place; otherwise (o, final state or None) as
    fused_recurrent_kda. Forward only (no autograd graph), as fla's. Speculative decoding
    (2-D ssm_state_indices, num_accepted_tokens) is not supported."""
    fn = "fused_recurrent_kda_fwd"
    take_kwargs(fn, kwargs, ())
    if num_accepted_tokens is not None:
        raise unsupported(fn, "num_accepted_tokens", "speculative decoding (per-token state "
                          "slots) is not implemented")
    if ssm_state_indices is not None and ssm_state_indices.dim() != 1:
        raise unsupported(fn, "ssm_state_indices", "2-D indices (speculative decoding) are "
                          "not implemented; pass one state row per sequence [N]")
    if check_bool(fn, "inplace_final_state", inplace_final_state):
        if initial_state is None:
            raise AssertionError("inplace_final_state=True needs initial_state (the pool)")
        if ssm_state_indices is None:
            raise unsupported(fn, "inplace_final_state", "without ssm_state_indices fla "
                              "stores per-token states; pass ssm_state_indices (one pool row "
                              "per sequence) or inplace_final_state=False")
    idx = None if ssm_state_indices is None else ssm_state_indices.to(
        device=q.device, dtype=torch.long)
    h0 = initial_state if idx is None or initial_state is None else         initial_state.index_select(0, idx)
    with torch.no_grad():
        o, ht = fused_recurrent_kda(
            q, k, v, g, beta, A_log, dt_bias, scale, h0,
            bool(output_final_state) or bool(inplace_final_state), use_qk_l2norm_in_kernel,
            use_gate_in_kernel, use_beta_sigmoid_in_kernel, allow_neg_eigval, lower_bound,
            state_v_first, cu_seqlens)
        if out is not None:
            out.copy_(o)
            o = out
        if inplace_final_state:
            initial_state.index_copy_(0, idx, ht.to(initial_state.dtype))
            return o, initial_state
    return o, (ht if output_final_state else None)


_WY_WHY = ("a chunk-internal step of fla's Triton Gated DeltaNet (fla's per-chunk A layout and "
           "exp2 gates); lightning_ops' chunk engine has its own internals. Test the public "
           "ops (chunk_gated_delta_rule) instead")
recompute_w_u_fwd = NotServed("fla.ops.gated_delta_rule.wy_fast", "recompute_w_u_fwd", _WY_WHY)
prepare_wy_repr_bwd = NotServed("fla.ops.gated_delta_rule.wy_fast", "prepare_wy_repr_bwd",
                                _WY_WHY)


# ---------------------------------------------------------------------------------------------
# log-linear attention
# ---------------------------------------------------------------------------------------------
def chunk_log_linear_attn(q, k, v, g: Tensor, level_scales: Tensor, initial_state=None,
                          output_final_state: bool = False,
                          cu_seqlens: Optional[Tensor] = None, scale: Optional[float] = 1.0):
    """fla.ops.log_linear_attn.chunk_log_linear_attn: q / k [B, T, G, K], v [B, T, H, V],
    g [B, T, H], level_scales [B, T, H, L]; scale defaults to 1.0 (None: K**-0.5), as fla.
    The state is lightning_ops' LogLinearAttentionState (ht [N, H, L, K, V], offsets [N]);
    fla's state object (which also carries the previous chunk's inputs) is not accepted."""
    fn = "chunk_log_linear_attn"
    if initial_state is not None and not isinstance(initial_state, lo.LogLinearAttentionState):
        raise unsupported(fn, "initial_state", "pass lightning_ops.LogLinearAttentionState "
                          "(ht [N, H, L, K, V], offsets [N]) as returned with "
                          "output_final_state=True; fla's state object is not accepted")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return lo.chunk_log_linear_attn(q, k, v, g, level_scales, initial_state,
                                    check_bool(fn, "output_final_state", output_final_state),
                                    cu_seqlens, scale=scale)


chunkwise_bwd_kernel_dkg = NotServed(
    "fla.ops.log_linear_attn.chunk", "chunkwise_bwd_kernel_dkg",
    "a Triton kernel of fla's log-linear backward, launched with fla's own buffers; "
    "lightning_ops' backward is its own. Test chunk_log_linear_attn's gradients instead")


__all__ = [
    "parallel_simple_gla", "fused_gdn_gate", "fused_recurrent_kda_fwd", "recompute_w_u_fwd",
    "prepare_wy_repr_bwd", "chunk_log_linear_attn", "chunkwise_bwd_kernel_dkg",
    "chunk_linear_attn", "fused_chunk_linear_attn", "fused_recurrent_linear_attn",
    "chunk_simple_gla", "fused_chunk_simple_gla", "fused_recurrent_simple_gla",
    "chunk_gla", "fused_chunk_gla", "fused_recurrent_gla",
    "chunk_lightning_attn", "fused_recurrent_lightning_attn",
    "chunk_delta_rule", "fused_chunk_delta_rule", "fused_recurrent_delta_rule",
    "chunk_gated_delta_rule", "chunk_gdn", "fused_recurrent_gated_delta_rule",
    "fused_recurrent_gdn", "chunk_kda", "fused_recurrent_kda", "fused_kda_gate",
]

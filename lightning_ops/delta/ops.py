"""Public ops of the delta-rule family (DeltaNet, Gated DeltaNet): validation, backend dispatch
and the torch.library custom ops around one engine.

Every op here is `S_t = exp(g_t) S_{t-1}; S_t += beta_t k_t (v_t - S_t^T k_t)^T;
o_t = scale * S_t^T q_t`, with g absent for the plain delta rule. One pair of custom ops
(forward, backward) serves both; the backend module gets g (or None) as given.

Grouped value heads: v, beta and g may have HV = m * H heads (H the q/k heads); value head j
reads q/k head j // m and the states are [N, HV, K, V].

Backend module contract (lightning_ops.delta.torch / .triton):
  forward(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
          use_qk_l2norm_in_kernel, mode) -> (o, final_state or None)
  backward(q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm_in_kernel, mode,
           do, dht) -> (dq, dk, dv, dg or None, dbeta, dh0 or None)
mode is "chunk" or "recurrent"; dht may be None (no gradient flows into the final state).
Calls with no tokens (B, T or H = 0) never reach a backend: the custom-op bodies answer them
(zero outputs, the initial state passed through).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import backend as _backend
from .. import validation as V
from ..chunk.constants import NO_GATE, SCALAR_GATE, VECTOR_GATE
from ..precision import accumulation_dtype
from .._custom_op import (call_op, contiguous, empty_like_none,
                          forbid_double_backward, grad_if_present, is_empty, none_if_empty,
                          passthrough_grad, passthrough_state, register_autograd, zeros_or_empty)

Tensor = torch.Tensor


@torch.library.custom_op("lightning_ops::gated_delta_rule", mutates_args=())
def _delta_fwd(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], beta: Tensor,
               initial_state: Optional[Tensor], cu_seqlens: Optional[Tensor], scale: float,
               output_final_state: bool, use_qk_l2norm_in_kernel: bool, mode: str,
               backend: str) -> Tuple[Tensor, Tensor]:
    # value checks here too: under torch.compile only this body sees real tensors
    V.check_cu_seqlens_values(cu_seqlens, q.shape[1])
    if is_empty(q, v):
        B, T, H, K = q.shape
        N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
        return v.new_zeros(v.shape), passthrough_state(
            initial_state, (N, v.shape[2], K, v.shape[-1]), q, accumulation_dtype(q),
            output_final_state)
    impl = _backend.implementation("delta", backend)
    o, ht = impl.forward(q, k, v, g, beta, scale, initial_state, output_final_state,
                         cu_seqlens, use_qk_l2norm_in_kernel, mode)
    return o, empty_like_none(ht, q, accumulation_dtype(q))


@_delta_fwd.register_fake
def _(q, k, v, g, beta, initial_state, cu_seqlens, scale, output_final_state,
      use_qk_l2norm_in_kernel, mode, backend):
    B, T, H, K = q.shape
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    o = v.new_empty(v.shape)
    ht = q.new_empty((N, v.shape[2], K, v.shape[-1]) if output_final_state else (0,),
                     dtype=accumulation_dtype(q))
    return o, ht


@torch.library.custom_op("lightning_ops::gated_delta_rule_backward", mutates_args=())
def _delta_bwd(do: Tensor, dht: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor,
               g: Optional[Tensor], beta: Tensor, initial_state: Optional[Tensor],
               cu_seqlens: Optional[Tensor], scale: float, use_qk_l2norm_in_kernel: bool,
               mode: str, backend: str
               ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    if is_empty(q, v):
        return (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v),
                zeros_or_empty(g, q), torch.zeros_like(beta),
                passthrough_grad(dht, initial_state, q))
    impl = _backend.implementation("delta", backend)
    dq, dk, dv, dg, dbeta, dh0 = impl.backward(q, k, v, g, beta, scale, initial_state,
                                               cu_seqlens, use_qk_l2norm_in_kernel, mode,
                                               do, dht)
    return contiguous(dq, dk, dv, empty_like_none(dg, q), dbeta, empty_like_none(dh0, q))


@_delta_bwd.register_fake
def _(do, dht, q, k, v, g, beta, initial_state, cu_seqlens, scale, use_qk_l2norm_in_kernel,
      mode, backend):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            q.new_empty(0) if g is None else torch.empty_like(g),
            torch.empty_like(beta),
            q.new_empty(0) if initial_state is None else torch.empty_like(initial_state))


def _setup(ctx, inputs, output):
    q, k, v, g, beta, h0, cu, scale, _, l2, mode, backend = inputs
    ctx.save_for_backward(q, k, v, g, beta, h0, cu)
    ctx.scale, ctx.l2, ctx.mode, ctx.backend = scale, l2, mode, backend


def _backward(ctx, do, dht):
    q, k, v, g, beta, h0, cu = ctx.saved_tensors
    dht = none_if_empty(dht)
    dq, dk, dv, dg, dbeta, dh0 = call_op(_delta_bwd, do.contiguous(), dht, q, k, v, g, beta,
                                         h0, cu, ctx.scale, ctx.l2, ctx.mode, ctx.backend)
    return (dq, dk, dv, grad_if_present(dg, g), dbeta,
            grad_if_present(dh0, h0), None, None, None, None, None, None)


_delta_call = register_autograd(_delta_fwd, _backward, _setup)


def _public_name(inputs) -> str:
    """The public op a gated_delta_rule_backward call serves (for error messages)."""
    g, mode = inputs[5], inputs[11]
    kind = "delta_rule" if g is None else "gated_delta_rule" if g.dim() == 3 else "kda"
    return f"{'chunk' if mode == 'chunk' else 'fused_recurrent'}_{kind}"


forbid_double_backward(_delta_bwd, _public_name)


def delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
               use_qk_l2norm_in_kernel, mode: str, gate: int):
    """Validate, pick the backend, call the custom op: every public op of the family (and the
    context-parallel wrappers) in one. gate (chunk/constants.py): NO_GATE (DeltaNet),
    SCALAR_GATE (Gated DeltaNet: a decay per head) or VECTOR_GATE (KDA: a decay per key
    channel)."""
    B, T, H, K, Vd = V.qkv_dims(q, k, v, v_heads_multiple=True)
    HV = v.shape[2]
    if beta is None:
        raise ValueError(f"beta is required: the delta-rule write strength, shape [B, T, H] = "
                         f"[{B}, {T}, {HV}]")
    V.check_tensor("beta", beta, (B, T, HV), "[B, T, H]", q)
    if gate == VECTOR_GATE:
        if g is None:
            raise ValueError(f"g is required: KDA's per-channel log decay, shape "
                             f"[B, T, H, K] = [{B}, {T}, {HV}, {K}]")
        V.check_tensor("g", g, (B, T, HV, K), "[B, T, H, K]", q)
    elif gate == SCALAR_GATE:
        if g is None:
            raise ValueError(f"g is required: the gated delta rule's log decay, shape "
                             f"[B, T, H] = [{B}, {T}, {HV}]")
        V.check_tensor("g", g, (B, T, HV), "[B, T, H]", q)
    V.check_scale(scale)
    V.check_flag("output_final_state", output_final_state)
    V.check_flag("use_qk_l2norm_in_kernel", use_qk_l2norm_in_kernel)
    N = V.check_cu_seqlens(cu_seqlens, B, T, q)
    V.check_state("initial_state", initial_state, (N, HV, K, Vd), "[N, H, K, V]", q)
    scale = float(K ** -0.5 if scale is None else scale)
    name = _backend.resolve("delta", q.device, q.dtype)
    q, k, v, g, beta, initial_state = contiguous(q, k, v, g, beta, initial_state)
    g = None if gate == NO_GATE else g
    o, ht = _delta_call(q, k, v, g, beta, initial_state, cu_seqlens,
                        scale, output_final_state, use_qk_l2norm_in_kernel, mode, name)
    return o, (ht if output_final_state else None)


# ---------------------------------------------------------------------------------------------
# Public API (signatures as in fla)
# ---------------------------------------------------------------------------------------------
def chunk_delta_rule(q: Tensor, k: Tensor, v: Tensor, beta: Tensor,
                     scale: Optional[float] = None, initial_state: Optional[Tensor] = None,
                     output_final_state: bool = False, cu_seqlens: Optional[Tensor] = None,
                     use_qk_l2norm_in_kernel: bool = False):
    """DeltaNet: S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T, chunked (WY/UT form).
    q, k [B,T,H,K]; v [B,T,HV,V]; beta [B,T,HV]; states [N,HV,K,V]. Returns (o, final_state)."""
    return delta_rule(q, k, v, None, beta, scale, initial_state, output_final_state, cu_seqlens,
                use_qk_l2norm_in_kernel, "chunk", NO_GATE)


def chunk_gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
                           scale: Optional[float] = None, initial_state: Optional[Tensor] = None,
                           output_final_state: bool = False, cu_seqlens: Optional[Tensor] = None,
                           use_qk_l2norm_in_kernel: bool = False):
    """Gated DeltaNet: the delta rule after decaying the state by exp(g [B,T,HV]), chunked."""
    return delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                use_qk_l2norm_in_kernel, "chunk", SCALAR_GATE)


def fused_recurrent_delta_rule(q: Tensor, k: Tensor, v: Tensor, beta: Tensor,
                               scale: Optional[float] = None,
                               initial_state: Optional[Tensor] = None,
                               output_final_state: bool = False,
                               cu_seqlens: Optional[Tensor] = None,
                               use_qk_l2norm_in_kernel: bool = False):
    """Token-by-token form of chunk_delta_rule (decode, short T)."""
    return delta_rule(q, k, v, None, beta, scale, initial_state, output_final_state, cu_seqlens,
                use_qk_l2norm_in_kernel, "recurrent", NO_GATE)


def fused_recurrent_gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
                                     scale: Optional[float] = None,
                                     initial_state: Optional[Tensor] = None,
                                     output_final_state: bool = False,
                                     cu_seqlens: Optional[Tensor] = None,
                                     use_qk_l2norm_in_kernel: bool = False):
    """Token-by-token form of chunk_gated_delta_rule (decode, short T)."""
    return delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                use_qk_l2norm_in_kernel, "recurrent", SCALAR_GATE)


def chunk_kda(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
              scale: Optional[float] = None, initial_state: Optional[Tensor] = None,
              output_final_state: bool = False, cu_seqlens: Optional[Tensor] = None,
              use_qk_l2norm_in_kernel: bool = False):
    """Kimi Delta Attention: the gated delta rule with a per-channel decay g [B,T,HV,K] (log
    space), S_t = (I - beta_t k_t k_t^T) diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T, chunked.
    q, k [B,T,H,K]; v [B,T,HV,V] (HV a multiple of H); beta [B,T,HV]; states [N,HV,K,V].
    fla's in-kernel gate and beta options live in lightning_ops.compat.fla.ops.kda."""
    return delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                use_qk_l2norm_in_kernel, "chunk", VECTOR_GATE)


def fused_recurrent_kda(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
                        scale: Optional[float] = None, initial_state: Optional[Tensor] = None,
                        output_final_state: bool = False, cu_seqlens: Optional[Tensor] = None,
                        use_qk_l2norm_in_kernel: bool = False):
    """Token-by-token form of chunk_kda (decode, short T)."""
    return delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                use_qk_l2norm_in_kernel, "recurrent", VECTOR_GATE)

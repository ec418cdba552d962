"""Public ops of the gated-linear-attention family (linear attention, simple GLA / Lightning /
RetNet, GLA): validation, backend dispatch and the torch.library custom ops around one engine.

Every op here is `S_t = decay_t * S_{t-1} + k_t v_t^T, o_t = scale * S_t^T q_t` with decay none,
scalar (g [B,T,H] and/or constant g_gamma [H]) or vector (g [B,T,H,K]). One pair of custom ops
(forward, backward) serves all of them; the backend module gets the gate tensors as they are.

Backend module contract (the chunk engine: lightning_ops.chunk.torch / .triton):
  forward(q, k, v, g, g_gamma, scale, initial_state, output_final_state, cu_seqlens, mode)
      -> (o, final_state or None)
  backward(q, k, v, g, g_gamma, scale, initial_state, cu_seqlens, mode, do, dht)
      -> (dq, dk, dv, dg or None, dh0 or None)
mode is "chunk" or "recurrent". Backends never see g_gamma that needs a gradient: the wrappers
fold a g_gamma (or lightning slope) that requires grad into a dense gate g + g_gamma, so autograd
sums its gradient from dg. Calls with no tokens (B, T or H = 0) never reach a backend either: the
custom-op bodies answer them (zero outputs, the initial state passed through).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import backend as _backend
from .. import validation as V
from ..chunk.constants import NO_GATE, SCALAR_GATE, VECTOR_GATE
from ..precision import accumulation_dtype
from .._custom_op import (call_op, contiguous, empty_like_none, forbid_double_backward,
                          grad_if_present, is_empty, none_if_empty, passthrough_grad,
                          passthrough_state, register_autograd, zeros_or_empty)

Tensor = torch.Tensor


@torch.library.custom_op("lightning_ops::gated_linear_attn", mutates_args=())
def _gla_fwd(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], g_gamma: Optional[Tensor],
             initial_state: Optional[Tensor], cu_seqlens: Optional[Tensor], scale: float,
             output_final_state: bool, mode: str, backend: str) -> Tuple[Tensor, Tensor]:
    # value checks here too: under torch.compile only this body sees real tensors
    V.check_cu_seqlens_values(cu_seqlens, q.shape[1])
    if is_empty(q, v):
        B, T, H, K = q.shape
        N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
        return v.new_zeros(v.shape), passthrough_state(
            initial_state, (N, H, K, v.shape[-1]), q, accumulation_dtype(q), output_final_state)
    impl = _backend.implementation("gla", backend)
    o, ht = impl.forward(q, k, v, g, g_gamma, scale, initial_state, output_final_state,
                         cu_seqlens, mode)
    return o, empty_like_none(ht, q, accumulation_dtype(q))


@_gla_fwd.register_fake
def _(q, k, v, g, g_gamma, initial_state, cu_seqlens, scale, output_final_state, mode, backend):
    B, T, H, K = q.shape
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    o = v.new_empty(v.shape)
    ht = q.new_empty((N, H, K, v.shape[-1]) if output_final_state else (0,),
                     dtype=accumulation_dtype(q))
    return o, ht


@torch.library.custom_op("lightning_ops::gated_linear_attn_backward", mutates_args=())
def _gla_bwd(do: Tensor, dht: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor,
             g: Optional[Tensor], g_gamma: Optional[Tensor], initial_state: Optional[Tensor],
             cu_seqlens: Optional[Tensor], scale: float, mode: str, backend: str
             ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    if is_empty(q, v):
        return (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v),
                zeros_or_empty(g, q), passthrough_grad(dht, initial_state, q))
    impl = _backend.implementation("gla", backend)
    dq, dk, dv, dg, dh0 = impl.backward(q, k, v, g, g_gamma, scale, initial_state, cu_seqlens,
                                        mode, do, dht)
    return contiguous(dq, dk, dv, empty_like_none(dg, q), empty_like_none(dh0, q))


@_gla_bwd.register_fake
def _(do, dht, q, k, v, g, g_gamma, initial_state, cu_seqlens, scale, mode, backend):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            q.new_empty(0) if g is None else torch.empty_like(g),
            q.new_empty(0) if initial_state is None else torch.empty_like(initial_state))


def _setup(ctx, inputs, output):
    q, k, v, g, g_gamma, h0, cu, scale, _, mode, backend = inputs
    ctx.save_for_backward(q, k, v, g, g_gamma, h0, cu)
    ctx.scale, ctx.mode, ctx.backend = scale, mode, backend


def _backward(ctx, do, dht):
    q, k, v, g, g_gamma, h0, cu = ctx.saved_tensors
    dht = none_if_empty(dht)
    dq, dk, dv, dg, dh0 = call_op(_gla_bwd, do.contiguous(), dht, q, k, v, g, g_gamma, h0,
                                  cu, ctx.scale, ctx.mode, ctx.backend)
    return (dq, dk, dv, grad_if_present(dg, g), None,
            grad_if_present(dh0, h0), None, None, None, None, None)


_gla_call = register_autograd(_gla_fwd, _backward, _setup)


def _public_name(inputs) -> str:
    """The public op a gated_linear_attn_backward call serves (for error messages)."""
    g, g_gamma, mode = inputs[5], inputs[6], inputs[10]
    prefix = "chunk" if mode == "chunk" else "fused_recurrent"
    if g is not None and g.dim() == 4:
        return f"{prefix}_gla"
    if g is None and g_gamma is None:
        return f"{prefix}_linear_attn"
    return f"{prefix}_simple_gla / {prefix}_lightning_attn"


forbid_double_backward(_gla_bwd, _public_name)


def gated_linear_attention(q, k, v, g, g_gamma, scale, initial_state, output_final_state,
                           cu_seqlens, mode: str, gate: int):
    """Validate, pick the backend, call the custom op: every public op of the family (and the
    context-parallel wrappers) in one. gate: NO_GATE, SCALAR_GATE or VECTOR_GATE
    (chunk/constants.py); the final state comes back whatever output_final_state says."""
    B, T, H, K, Vd = V.qkv_dims(q, k, v, max_key=V.MAX_GLA_KEY_DIM)
    if gate == SCALAR_GATE:
        V.check_tensor("g", g, (B, T, H), "[B, T, H]", q)
        V.check_tensor("g_gamma", g_gamma, (H,), "[H]", q)
        if g_gamma is not None and g_gamma.requires_grad and torch.is_grad_enabled():
            # a learnable per-head decay: fold it into a dense gate, autograd sums its gradient
            # from dg (the constant path, cheaper, stays for a fixed g_gamma)
            g = g_gamma.expand(B, T, H) if g is None else g + g_gamma
            g_gamma = None
    elif gate == VECTOR_GATE:
        if g is None:
            raise ValueError("g is required: the GLA gate must have shape [B, T, H, K]")
        V.check_tensor("g", g, (B, T, H, K), "[B, T, H, K]", q)
    V.check_scale(scale)
    V.check_flag("output_final_state", output_final_state)
    N = V.check_cu_seqlens(cu_seqlens, B, T, q)
    V.check_state("initial_state", initial_state, (N, H, K, Vd), "[N, H, K, V]", q)
    scale = float(K ** -0.5 if scale is None else scale)
    name = _backend.resolve("gla", q.device, q.dtype)
    q, k, v, g, g_gamma, initial_state = contiguous(q, k, v, g, g_gamma, initial_state)
    o, ht = _gla_call(q, k, v, g, g_gamma, initial_state, cu_seqlens, scale,
                      output_final_state, mode, name)
    return o, (ht if output_final_state else None)


# ---------------------------------------------------------------------------------------------
# Public API (signatures as in fla)
# ---------------------------------------------------------------------------------------------
def chunk_linear_attn(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None,
                      initial_state: Optional[Tensor] = None, output_final_state: bool = False,
                      cu_seqlens: Optional[Tensor] = None):
    """Linear attention S_t = S_{t-1} + k_t v_t^T, chunked. Returns (o, final_state)."""
    return gated_linear_attention(q, k, v, None, None, scale, initial_state, output_final_state,
                                  cu_seqlens, "chunk", NO_GATE)


def chunk_simple_gla(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor] = None,
                     g_gamma: Optional[Tensor] = None, scale: Optional[float] = None,
                     initial_state: Optional[Tensor] = None, output_final_state: bool = False,
                     cu_seqlens: Optional[Tensor] = None):
    """Scalar-gated linear attention: decay exp(g [B,T,H]) and/or exp(g_gamma [H]) per head.
    g_gamma takes a gradient when it requires one (a learnable per-head decay)."""
    return gated_linear_attention(q, k, v, g, g_gamma, scale, initial_state, output_final_state,
                                  cu_seqlens, "chunk", SCALAR_GATE)


def lightning_attn(q: Tensor, k: Tensor, v: Tensor, slope: Tensor, scale: Optional[float] = None,
                   initial_state: Optional[Tensor] = None, output_final_state: bool = False,
                   cu_seqlens: Optional[Tensor] = None):
    """Lightning Attention (TNL): constant per-head decay exp(-slope[h]). slope takes a gradient
    when it requires one (a learnable decay)."""
    B, T, H, K, _ = V.qkv_dims(q, k, v, max_key=V.MAX_GLA_KEY_DIM)
    V.check_tensor("slope", slope, (H,), "[H]", q)
    return gated_linear_attention(q, k, v, None, -slope, scale, initial_state, output_final_state,
                                  cu_seqlens, "chunk", SCALAR_GATE)


def chunk_gla(q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: Optional[float] = None,
              initial_state: Optional[Tensor] = None, output_final_state: bool = False,
              cu_seqlens: Optional[Tensor] = None):
    """Gated linear attention with a vector gate g [B,T,H,K] (log decays, <= 0)."""
    return gated_linear_attention(q, k, v, g, None, scale, initial_state, output_final_state,
                                  cu_seqlens, "chunk", VECTOR_GATE)


def fused_recurrent_linear_attn(q, k, v, scale=None, initial_state=None,
                                output_final_state=False, cu_seqlens=None):
    """Token-by-token form of chunk_linear_attn (decode, short T)."""
    return gated_linear_attention(q, k, v, None, None, scale, initial_state, output_final_state,
                                  cu_seqlens, "recurrent", NO_GATE)


def fused_recurrent_simple_gla(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None,
                               output_final_state=False, cu_seqlens=None):
    """Token-by-token form of chunk_simple_gla (decode, short T)."""
    return gated_linear_attention(q, k, v, g, g_gamma, scale, initial_state, output_final_state,
                                  cu_seqlens, "recurrent", SCALAR_GATE)


def fused_recurrent_lightning_attn(q, k, v, slope, scale=None, initial_state=None,
                                   output_final_state=False, cu_seqlens=None):
    """Token-by-token form of lightning_attn (decode, short T)."""
    B, T, H, K, _ = V.qkv_dims(q, k, v, max_key=V.MAX_GLA_KEY_DIM)
    V.check_tensor("slope", slope, (H,), "[H]", q)
    return gated_linear_attention(q, k, v, None, -slope, scale, initial_state, output_final_state,
                                  cu_seqlens, "recurrent", SCALAR_GATE)


def fused_recurrent_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False,
                        cu_seqlens=None):
    """Token-by-token form of chunk_gla (decode, short T)."""
    return gated_linear_attention(q, k, v, g, None, scale, initial_state, output_final_state,
                                  cu_seqlens, "recurrent", VECTOR_GATE)

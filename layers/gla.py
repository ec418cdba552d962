"""Gated Linear Attention (Yang et al., 2024) and TNL-style Lightning Attention layers."""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import FlaMixer, MixerStep, check_mode, warn_ignored
from .conv import ShortConvolution
from .norm import RMSNorm
from .utils import (activation_fn, apply_mask, compute_dtype, head_dims, init_linear, kv_groups,
                    kv_heads, split_heads)

Tensor = torch.Tensor


class GatedLinearAttention(FlaMixer):
    """Gated Linear Attention (GLA): `S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T`, with a
    data-dependent vector forget gate from a low-rank projection, as fla's
    `GatedLinearAttention`: same arguments (and positional order), defaults, parameter names
    and forward contract (`FlaMixer.forward`).

    Args:
        mode: 'chunk', 'fused_chunk' (same math as 'chunk') or 'fused_recurrent'; inputs of
            <= 64 tokens outside training take the recurrent (decode) path.
        hidden_size: model width.
        expand_k, expand_v: key / value width as a multiple of hidden_size (split over heads).
        num_heads: query heads.
        num_kv_heads: key/value (and forget-gate) heads, shared by groups of query heads
            (default num_heads).
        feature_map: activation applied to q and k (fla's ACT2FN names), default none.
        use_short_conv, conv_size, conv_bias: causal depthwise convs (SiLU) on q, k, v.
        use_output_gate: gate the normed output with gate_fn(g_proj(x)).
        gate_fn: activation of the output gate ('swish', 'sigmoid', ...).
        elementwise_affine, norm_eps: the per-head output RMSNorm.
        gate_logit_normalizer: the forget gate is logsigmoid(gk_proj(x)) / this (16 in the
            paper), so per-token decays stay close to 1.
        gate_low_rank_dim: rank of the forget-gate projection.
        clamp_min: optional lower clamp of the log forget gate.
        fuse_norm: as fla, only decides the norm's parameter name (`g_norm_swish_gate` when
            fused, i.e. gate_fn 'swish' with an output gate; else `g_norm`); same math.
        layer_idx: the layer's slot in a cache (`past_key_values`).
    """

    supports_cp = True

    def __init__(self, mode: str = "chunk", hidden_size: int = 1024, expand_k: float = 0.5,
                 expand_v: float = 1.0, num_heads: int = 4, num_kv_heads: Optional[int] = None,
                 feature_map: Optional[str] = None, use_short_conv: bool = False,
                 conv_size: int = 4, conv_bias: bool = False, use_output_gate: bool = True,
                 gate_fn: str = "swish", elementwise_affine: Optional[bool] = True,
                 norm_eps: float = 1e-5, gate_logit_normalizer: float = 16,
                 gate_low_rank_dim: int = 16, clamp_min: Optional[float] = None,
                 fuse_norm: bool = True, layer_idx: Optional[int] = None, device=None,
                 dtype=None, **kwargs):
        super().__init__()
        warn_ignored("GatedLinearAttention", kwargs)
        kw = dict(device=device, dtype=dtype)
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.num_kv_heads, self.num_kv_groups = kv_groups(num_heads, num_kv_heads)
        self.mode = check_mode(mode, fused_chunk=True)
        self.expand_k, self.expand_v = expand_k, expand_v
        self.key_dim, self.value_dim = head_dims(hidden_size, num_heads, expand_k, expand_v)
        self.head_k_dim, self.head_v_dim = self.key_dim // num_heads, self.value_dim // num_heads
        self.key_dim_per_group = self.key_dim // self.num_kv_groups
        self.value_dim_per_group = self.value_dim // self.num_kv_groups
        self.feature_map = feature_map
        self.feature_map_fn = None if feature_map is None else activation_fn(feature_map)
        self.use_short_conv, self.use_output_gate = use_short_conv, use_output_gate
        self.conv_size, self.conv_bias = conv_size, conv_bias
        self.gate_logit_normalizer, self.clamp_min = gate_logit_normalizer, clamp_min
        self.layer_idx = layer_idx
        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False, **kw)
        self.k_proj = nn.Linear(hidden_size, self.key_dim_per_group, bias=False, **kw)
        self.v_proj = nn.Linear(hidden_size, self.value_dim_per_group, bias=False, **kw)
        if use_output_gate:
            self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False, **kw)
        if use_short_conv:
            self.q_conv1d = ShortConvolution(self.key_dim, conv_size, conv_bias, "silu", **kw)
            self.k_conv1d = ShortConvolution(self.key_dim_per_group, conv_size, conv_bias,
                                             "silu", **kw)
            self.v_conv1d = ShortConvolution(self.value_dim_per_group, conv_size, conv_bias,
                                             "silu", **kw)
        self.gk_proj = nn.Sequential(
            nn.Linear(hidden_size, gate_low_rank_dim, bias=False, **kw),
            nn.Linear(gate_low_rank_dim, self.key_dim_per_group, bias=True, **kw))
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False, **kw)
        activation_fn(gate_fn)  # validate early
        self.gate_fn = gate_fn
        norm = RMSNorm(self.head_v_dim, norm_eps, bool(elementwise_affine), gate_fn=gate_fn,
                       **kw)
        self.fuse_norm_and_gate = gate_fn == "swish" and fuse_norm and use_output_gate
        self._norm_name = "g_norm_swish_gate" if self.fuse_norm_and_gate else "g_norm"
        self.add_module(self._norm_name, norm)
        init_linear(self)

    def state_shape(self) -> Tuple[int, ...]:
        return (self.num_heads, self.head_k_dim, self.head_v_dim)

    def conv_layers(self) -> List[ShortConvolution]:
        return [self.q_conv1d, self.k_conv1d, self.v_conv1d] if self.use_short_conv else []

    def _heads(self, x: Tensor, d: int) -> Tensor:
        """[..., kv_heads * d] -> [..., num_heads, d], each kv head repeated for its group."""
        return kv_heads(x, d, self.num_kv_groups)

    def _mix(self, x: Tensor, step: MixerStep):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.use_short_conv:
            q, k, v = step.conv(self.q_conv1d, q), step.conv(self.k_conv1d, k), \
                step.conv(self.v_conv1d, v)
        cd = compute_dtype(x)
        gk = F.logsigmoid(self.gk_proj(x).to(cd)) / self.gate_logit_normalizer
        if self.clamp_min is not None:
            gk = gk.clamp_min(self.clamp_min)
        if self.feature_map_fn is not None:
            q, k = self.feature_map_fn(q), self.feature_map_fn(k)
        # padding: no write (k = v = 0) and no decay (log gate 0)
        k, v, gk = apply_mask(k, step.mask), apply_mask(v, step.mask), apply_mask(gk, step.mask)
        q = split_heads(q, self.num_heads)
        k, gk, v = self._heads(k, self.head_k_dim), self._heads(gk, self.head_k_dim), \
            self._heads(v, self.head_v_dim)
        fn = step.op(self, x, "chunk_gla", "fused_recurrent_gla")
        o, state = fn(q, k, v, gk, initial_state=step.state,
                      output_final_state=step.want_state, cu_seqlens=step.cu_seqlens)
        g = split_heads(self.g_proj(x), self.num_heads) if self.use_output_gate else None
        o = getattr(self, self._norm_name)(o, g).reshape(*x.shape[:2], self.value_dim)
        return apply_mask(self.o_proj(o), step.mask), state


def alibi_slopes(num_heads: int) -> Tensor:
    """ALiBi / TNL head slopes: a geometric sequence 2^(-8 i / n), interleaved for n not a
    power of two (Press et al.)."""
    def pow2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]
    if math.log2(num_heads).is_integer():
        s = pow2(num_heads)
    else:
        p = 2 ** math.floor(math.log2(num_heads))
        s = pow2(p) + pow2(2 * p)[0::2][:num_heads - p]
    return torch.tensor(s, dtype=torch.float32)


class LightningAttention(FlaMixer):
    """TNL-style linear attention (TransNormerLLM / Lightning Attention-2): SiLU feature maps
    on q and k, a constant per-head decay `exp(-slope_h)` with ALiBi-like slopes scaled down
    for deeper layers (so the last layer barely forgets), a per-head RMSNorm of the output and
    an output gate.

    Args:
        hidden_size: model width.
        num_heads: heads.
        expand_k, expand_v: key / value width as a multiple of hidden_size.
        mode: 'chunk' or 'fused_recurrent' (eval inputs <= 64 tokens take the recurrent path).
        use_output_gate, gate_fn: output gate act(g_proj(x)) after the norm.
        elementwise_affine, norm_eps: the output RMSNorm.
        layer_idx, num_layers: position in the model; slope_h = alibi_h * (1 - layer_idx /
            (num_layers - 1) + 1e-5), as TNL does (plain ALiBi slopes for a 1-layer model).
            layer_idx is also the layer's cache slot.
    The slopes are a buffer (in the state dict, no gradient). fla has no Lightning layer, only
    the ops; the forward follows fla's layer contract (`FlaMixer.forward`).
    """

    supports_cp = True

    def __init__(self, hidden_size: int = 1024, num_heads: int = 8, expand_k: float = 1.0,
                 expand_v: float = 1.0, mode: str = "chunk", use_output_gate: bool = True,
                 gate_fn: str = "swish", elementwise_affine: bool = True,
                 norm_eps: float = 1e-5, layer_idx: int = 0, num_layers: int = 1,
                 device=None, dtype=None, **kwargs):
        super().__init__()
        warn_ignored("LightningAttention", kwargs)
        kw = dict(device=device, dtype=dtype)
        if not 0 <= layer_idx < max(num_layers, 1):
            raise ValueError(f"layer_idx must be in [0, num_layers={num_layers}), "
                             f"got {layer_idx}")
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.mode = check_mode(mode)
        self.key_dim, self.value_dim = head_dims(hidden_size, num_heads, expand_k, expand_v)
        self.head_k_dim, self.head_v_dim = self.key_dim // num_heads, self.value_dim // num_heads
        self.use_output_gate, self.layer_idx = use_output_gate, layer_idx
        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False, **kw)
        self.k_proj = nn.Linear(hidden_size, self.key_dim, bias=False, **kw)
        self.v_proj = nn.Linear(hidden_size, self.value_dim, bias=False, **kw)
        if use_output_gate:
            self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False, **kw)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False, **kw)
        self.g_norm = RMSNorm(self.head_v_dim, norm_eps, elementwise_affine, gate_fn=gate_fn,
                              **kw)
        depth = 1.0 if num_layers <= 1 else 1 - layer_idx / (num_layers - 1) + 1e-5
        self.register_buffer("slope", (alibi_slopes(num_heads) * depth).to(device))
        init_linear(self)

    def state_shape(self) -> Tuple[int, ...]:
        return (self.num_heads, self.head_k_dim, self.head_v_dim)

    def _mix(self, x: Tensor, step: MixerStep):
        H = self.num_heads
        q = split_heads(F.silu(self.q_proj(x)), H)
        k = split_heads(apply_mask(F.silu(self.k_proj(x)), step.mask), H)
        v = split_heads(apply_mask(self.v_proj(x), step.mask), H)
        common = dict(initial_state=step.state, output_final_state=step.want_state,
                      cu_seqlens=step.cu_seqlens)
        slope = self.slope.to(compute_dtype(x))
        if step.mask is None:
            fn = step.op(self, x, "lightning_attn", "fused_recurrent_lightning_attn")
            o, state = fn(q, k, v, slope, **common)
        else:
            # a constant decay would still decay the state over padding: use the data-dependent
            # scalar gate form with log-decay 0 at padded positions
            g = apply_mask(-slope.expand(*x.shape[:2], H), step.mask)
            fn = step.op(self, x, "chunk_simple_gla", "fused_recurrent_simple_gla")
            o, state = fn(q, k, v, g=g, **common)
        g = split_heads(self.g_proj(x), H) if self.use_output_gate else None
        o = self.g_norm(o, g).reshape(*x.shape[:2], self.value_dim)
        return apply_mask(self.o_proj(o), step.mask), state

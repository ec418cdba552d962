"""Gated Linear Attention (Yang et al., 2024) and TNL-style Lightning Attention layers."""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _ops
from .base import MixerStep, RecurrentMixer
from .conv import ShortConvolution
from .norm import RMSNorm
from .utils import activation_fn, apply_mask

Tensor = torch.Tensor


def _split_heads(x: Tensor, n: int) -> Tensor:
    return x.view(*x.shape[:-1], n, x.shape[-1] // n)


def _init_linear(module: nn.Module) -> None:
    """fla's init of linear-attention layers: Xavier uniform with gain 2^-2.5, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight, gain=2 ** -2.5)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _check_mode(mode: str) -> str:
    if mode not in ("chunk", "fused_recurrent"):
        raise ValueError(f"mode must be 'chunk' or 'fused_recurrent', got {mode!r}")
    return mode


def _dims(hidden_size: int, num_heads: int, expand_k: float, expand_v: float):
    key_dim, value_dim = int(hidden_size * expand_k), int(hidden_size * expand_v)
    if key_dim % num_heads or value_dim % num_heads:
        raise ValueError(f"key_dim {key_dim} (hidden_size * expand_k) and value_dim {value_dim} "
                         f"(hidden_size * expand_v) must be divisible by num_heads {num_heads}")
    return key_dim, value_dim


class GatedLinearAttention(RecurrentMixer):
    """Gated Linear Attention (GLA): `S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T`, with a
    data-dependent vector forget gate from a low-rank projection, as in fla's
    `GatedLinearAttention` (same argument names, defaults and parameter names).

    Args:
        hidden_size: model width.
        num_heads: attention heads.
        expand_k, expand_v: key / value width as a multiple of hidden_size (split over heads).
        mode: 'chunk' (training, long inputs) or 'fused_recurrent'; in eval mode inputs of
            <= 64 tokens always take the recurrent (decode) path.
        use_short_conv, conv_size, conv_bias: causal depthwise convs (SiLU) on q, k, v.
        use_output_gate: gate the normed output with act(g_proj(x)).
        gate_fn: activation of the output gate ('swish' or 'sigmoid').
        elementwise_affine, norm_eps: the per-head output RMSNorm.
        gate_logit_normalizer: the forget gate is logsigmoid(gk_proj(x)) / this (16 in the
            paper), so per-token decays stay close to 1.
        gate_low_rank_dim: rank of the forget-gate projection.
        clamp_min: optional lower clamp of the log forget gate.
        layer_idx: index of the layer in a model (informational).
    """

    def __init__(self, hidden_size: int = 1024, num_heads: int = 4, expand_k: float = 0.5,
                 expand_v: float = 1.0, mode: str = "chunk", use_short_conv: bool = False,
                 conv_size: int = 4, conv_bias: bool = False, use_output_gate: bool = True,
                 gate_fn: str = "swish", elementwise_affine: bool = True,
                 norm_eps: float = 1e-5, gate_logit_normalizer: float = 16,
                 gate_low_rank_dim: int = 16, clamp_min: Optional[float] = None,
                 layer_idx: Optional[int] = None, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.mode = _check_mode(mode)
        self.key_dim, self.value_dim = _dims(hidden_size, num_heads, expand_k, expand_v)
        self.head_k_dim, self.head_v_dim = self.key_dim // num_heads, self.value_dim // num_heads
        self.use_short_conv, self.use_output_gate = use_short_conv, use_output_gate
        self.gate_logit_normalizer, self.clamp_min = gate_logit_normalizer, clamp_min
        self.layer_idx = layer_idx
        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False, **kw)
        self.k_proj = nn.Linear(hidden_size, self.key_dim, bias=False, **kw)
        self.v_proj = nn.Linear(hidden_size, self.value_dim, bias=False, **kw)
        if use_output_gate:
            self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False, **kw)
        if use_short_conv:
            self.q_conv1d = ShortConvolution(self.key_dim, conv_size, conv_bias, "silu", **kw)
            self.k_conv1d = ShortConvolution(self.key_dim, conv_size, conv_bias, "silu", **kw)
            self.v_conv1d = ShortConvolution(self.value_dim, conv_size, conv_bias, "silu", **kw)
        self.gk_proj = nn.Sequential(
            nn.Linear(hidden_size, gate_low_rank_dim, bias=False, **kw),
            nn.Linear(gate_low_rank_dim, self.key_dim, bias=True, **kw))
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False, **kw)
        self.g_norm = RMSNorm(self.head_v_dim, norm_eps, elementwise_affine, gate_fn=gate_fn,
                              **kw)
        activation_fn(gate_fn)  # validate early
        _init_linear(self)

    def state_shape(self) -> Tuple[int, ...]:
        return (self.num_heads, self.head_k_dim, self.head_v_dim)

    def conv_layers(self) -> List[ShortConvolution]:
        return [self.q_conv1d, self.k_conv1d, self.v_conv1d] if self.use_short_conv else []

    def _mix(self, x: Tensor, step: MixerStep):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.use_short_conv:
            q, k, v = step.conv(self.q_conv1d, q), step.conv(self.k_conv1d, k), \
                step.conv(self.v_conv1d, v)
        gk = F.logsigmoid(self.gk_proj(x).float()) / self.gate_logit_normalizer
        if self.clamp_min is not None:
            gk = gk.clamp_min(self.clamp_min)
        # padding: no write (k = v = 0) and no decay (log gate 0)
        k, v, gk = apply_mask(k, step.mask), apply_mask(v, step.mask), apply_mask(gk, step.mask)
        H = self.num_heads
        fn = _ops.fused_recurrent_gla if _recurrent(self, x) else _ops.chunk_gla
        o, state = fn(_split_heads(q, H), _split_heads(k, H), _split_heads(v, H),
                      _split_heads(gk, H), initial_state=step.state,
                      output_final_state=step.want_state, cu_seqlens=step.cu_seqlens)
        g = _split_heads(self.g_proj(x), H) if self.use_output_gate else None
        o = self.g_norm(o, g).reshape(*x.shape[:2], self.value_dim)
        return apply_mask(self.o_proj(o), step.mask), state


def _recurrent(layer: nn.Module, x: Tensor) -> bool:
    """fla's rule: short inputs outside training (decode steps) take the recurrent kernels."""
    return layer.mode == "fused_recurrent" or (not layer.training and x.shape[1] <= 64)


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


class LightningAttention(RecurrentMixer):
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
    The slopes are a buffer (in the state dict, no gradient).
    """

    def __init__(self, hidden_size: int = 1024, num_heads: int = 8, expand_k: float = 1.0,
                 expand_v: float = 1.0, mode: str = "chunk", use_output_gate: bool = True,
                 gate_fn: str = "swish", elementwise_affine: bool = True,
                 norm_eps: float = 1e-5, layer_idx: int = 0, num_layers: int = 1,
                 device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        if not 0 <= layer_idx < max(num_layers, 1):
            raise ValueError(f"layer_idx must be in [0, num_layers={num_layers}), "
                             f"got {layer_idx}")
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.mode = _check_mode(mode)
        self.key_dim, self.value_dim = _dims(hidden_size, num_heads, expand_k, expand_v)
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
        _init_linear(self)

    def state_shape(self) -> Tuple[int, ...]:
        return (self.num_heads, self.head_k_dim, self.head_v_dim)

    def _mix(self, x: Tensor, step: MixerStep):
        H = self.num_heads
        q = _split_heads(F.silu(self.q_proj(x)), H)
        k = _split_heads(apply_mask(F.silu(self.k_proj(x)), step.mask), H)
        v = _split_heads(apply_mask(self.v_proj(x), step.mask), H)
        rec = _recurrent(self, x)
        common = dict(initial_state=step.state, output_final_state=step.want_state,
                      cu_seqlens=step.cu_seqlens)
        slope = self.slope.float()
        if step.mask is None:
            fn = _ops.fused_recurrent_lightning_attn if rec else _ops.lightning_attn
            o, state = fn(q, k, v, slope, **common)
        else:
            # a constant decay would still decay the state over padding: use the data-dependent
            # scalar gate form with log-decay 0 at padded positions
            g = apply_mask(-slope.expand(*x.shape[:2], H), step.mask)
            fn = _ops.fused_recurrent_simple_gla if rec else _ops.chunk_simple_gla
            o, state = fn(q, k, v, g=g, **common)
        g = _split_heads(self.g_proj(x), H) if self.use_output_gate else None
        o = self.g_norm(o, g).reshape(*x.shape[:2], self.value_dim)
        return apply_mask(self.o_proj(o), step.mask), state

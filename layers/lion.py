"""LION (Afzal et al., 2025): bidirectional linear attention as an encoder mixer (no cache)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import lightning_ops as lo

from .base import FlaMixer, MixerStep, warn_ignored
from .utils import apply_mask, compute_dtype, split_heads

Tensor = torch.Tensor

_MASKS = {"lit": "lit", "decay": "decay", "d": "decay", "selective": "selective",
          "s": "selective"}


def silu_shifted(x: Tensor, silunorm: bool = True) -> Tensor:
    """LION's feature map: silu(x) + 0.5 (> 0), L2-normalised over the head dim if silunorm."""
    y = F.silu(x) + 0.5
    return y / torch.linalg.vector_norm(y, dim=-1, keepdim=True) if silunorm else y


def elu_shifted(x: Tensor) -> Tensor:
    """LION-LIT's feature map: elu(x) + 1 (> 0)."""
    return F.elu(x) + 1


class LION(FlaMixer):
    """LION attention: `o_i = sum_j M_ij phi(q_i).phi(k_j) v_j / sum_j M_ij phi(q_i).phi(k_j)`
    over the whole sequence (bidirectional), computed in linear time by `lightninglo.lion_attn`
    (no T x T matrix). The parameters and math of the authors' `Lion_Attention` (ViT code):

    Args:
        hidden_size: model width (`dim`).
        num_heads: heads.
        mask_type: 'lit' (no decay, elu+1 features), 'decay' / 'd' (a learned per-head decay
            lambda_h = sigmoid(a_i[h]), LION-D) or 'selective' / 's' (per token and head,
            lambda_t = 1 - sigmoid(a_i(x_t)), LION-S). The authors' 'Lit' / 'Decay' /
            'Selective' spellings work too.
        qkv_bias: bias of the fused q/k/v projection `qkv`.
        qk_scale: the q.k scale (default head_dim ** -0.5; it cancels in the normalisation up
            to eps).
        silunorm: L2-normalise the shifted-SiLU features (LION-D / -S).
        normalize: divide by the masked attention row sums (the LION "scaling"); False gives the
            unnormalised masked linear attention.
        eps: added to the row sums (1e-6, as the authors').
        layer_idx: accepted for the fla contract; LION keeps no cache.
    Parameter names are the authors' (`qkv`, `proj`, `a_i`), init as their ViT (truncated
    normal std 0.02, zero biases; a_i ~ N(0, 1) for LION-D). The forward follows fla's contract
    (`(o, None, past_key_values)`, attention_mask / cu_seqlens: each sequence is bidirectional
    on its own and padding is invisible); `use_cache=True` is an error (nothing to decode).
    """

    def __init__(self, hidden_size: int = 1024, num_heads: int = 8,
                 mask_type: str = "selective", qkv_bias: bool = False,
                 qk_scale: Optional[float] = None, silunorm: bool = True,
                 normalize: bool = True, eps: float = 1e-6, layer_idx: Optional[int] = None,
                 device=None, dtype=None, **kwargs):
        super().__init__()
        warn_ignored("LION", kwargs)
        kind = _MASKS.get(str(mask_type).lower())
        if kind is None:
            raise ValueError(f"mask_type must be 'lit', 'decay' or 'selective', got {mask_type!r}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} must be divisible by num_heads "
                             f"{num_heads}")
        kw = dict(device=device, dtype=dtype)
        self.hidden_size, self.num_heads, self.mask_type = hidden_size, num_heads, kind
        self.head_dim = hidden_size // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.silunorm, self.normalize, self.eps = silunorm, normalize, eps
        self.layer_idx = layer_idx
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=qkv_bias, **kw)
        self.proj = nn.Linear(hidden_size, hidden_size, **kw)
        if kind == "decay":
            self.a_i = nn.Parameter(torch.randn(num_heads, **kw))
        elif kind == "selective":
            self.a_i = nn.Linear(hidden_size, num_heads, **kw)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def state_shape(self):
        raise NotImplementedError("LION is bidirectional: it keeps no recurrent state")

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None,
                past_key_values=None, use_cache: Optional[bool] = False,
                output_attentions: Optional[bool] = False, **kwargs):
        """hidden_states [B, T, hidden_size] -> (o, None, past_key_values); see FlaMixer."""
        if use_cache:
            raise ValueError("LION is a bidirectional (encoder) mixer: every output reads the "
                             "whole sequence, so there is no cache to continue from; call it "
                             "with use_cache=False")
        cu_seqlens = kwargs.get("cu_seqlens")
        mask = attention_mask if cu_seqlens is None else None
        o, _ = self.mix(hidden_states, mask, cu_seqlens, None, False,
                        cp_context=kwargs.get("cp_context"))
        return o, None, past_key_values

    def _cp_note(self) -> str:
        return "; LION is bidirectional: every output reads the whole sequence"

    def _mix(self, x: Tensor, step: MixerStep):
        H, D = self.num_heads, self.head_dim
        q, k, v = split_heads(self.qkv(x), 3 * H).split(H, dim=2)
        if self.mask_type == "lit":
            q, k = elu_shifted(q), elu_shifted(k)
        else:
            q, k = silu_shifted(q, self.silunorm), silu_shifted(k, self.silunorm)
        cd = compute_dtype(x)
        g = g_gamma = None
        if self.mask_type == "selective":  # log(1 - sigmoid(z)) = logsigmoid(-z)
            g = apply_mask(F.logsigmoid(-self.a_i(x).to(cd)), step.mask)
        elif self.mask_type == "decay":
            g_gamma = F.logsigmoid(self.a_i.to(cd))
        if self.normalize:  # the row sums ride along as a value column of ones
            v = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)
        # padding (at the front after left alignment) neither writes nor decays
        k, v = apply_mask(k, step.mask), apply_mask(v, step.mask)
        o = lo.lion_attn(q, k, v, g=g, g_gamma=g_gamma, scale=self.scale,
                         cu_seqlens=step.cu_seqlens)
        if self.normalize:
            o = (o[..., :D].to(cd) / (o[..., D:].to(cd) + self.eps)).to(x.dtype)
        o = self.proj(o.reshape(*x.shape[:2], H * D))
        return apply_mask(o, step.mask), None

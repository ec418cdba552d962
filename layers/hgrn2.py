"""HGRN-2 (Qin et al., 2024): a gated linear RNN with state expansion, on the GLA engine."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import FlaMixer, MixerStep, check_mode, warn_ignored
from .conv import ShortConvolution
from .norm import RMSNorm
from .utils import apply_mask, compute_dtype, split_heads

Tensor = torch.Tensor


class HGRN2Attention(FlaMixer):
    """HGRN-2: `S_t = diag(f_t) S_{t-1} + (1 - f_t) i_t^T`, `o_t = S_t^T swish(q_t) / sqrt(K)`,
    with the forget gate f_t = sigmoid(f_proj(x_t)) per (head, state channel) and its complement
    as the input gate (the key), i.e. `chunk_gla(swish(q), 1 - f, i, log f)`; then an RMSNorm over
    the whole width and o_proj. As fla's `HGRN2Attention`: same arguments (and positional order),
    defaults, parameter names and forward contract (`FlaMixer.forward`; fla's `lower_bound`
    keyword too: f = lower_bound + (1 - lower_bound) * f for layer_idx > 0).

    Args:
        mode: 'chunk', 'fused_chunk' (same math) or 'fused_recurrent'; eval inputs of <= 64
            tokens take the recurrent path.
        hidden_size: model width (= the input / value width).
        num_heads: heads; ignored when expand_ratio is given (num_heads = hidden_size //
            expand_ratio, fla's rule).
        expand_ratio: the per-head state expansion (forget / key dim per head), default 128.
        use_short_conv, conv_size, conv_bias: causal depthwise convs (no activation) on q, f, i.
        elementwise_affine, norm_eps: the output RMSNorm.
        layer_idx: the layer's cache slot (and lower_bound is skipped for layer 0).
    Linear layers keep PyTorch's default init (fla's layer sets none; its models re-init).
    """

    supports_cp = True

    def __init__(self, mode: str = "chunk", hidden_size: int = 1024,
                 num_heads: Optional[int] = None, expand_ratio: Optional[int] = 128,
                 use_short_conv: bool = False, conv_size: int = 4, conv_bias: bool = False,
                 elementwise_affine: Optional[bool] = True, norm_eps: float = 1e-5,
                 layer_idx: Optional[int] = None, device=None, dtype=None, **kwargs):
        super().__init__()
        warn_ignored("HGRN2Attention", kwargs)
        kw = dict(device=device, dtype=dtype)
        if expand_ratio is not None:
            num_heads = hidden_size // expand_ratio
        elif num_heads is not None:
            expand_ratio = hidden_size // num_heads
        else:
            raise ValueError("HGRN2Attention: one of expand_ratio or num_heads must be given")
        if num_heads < 1:
            raise ValueError(f"HGRN2Attention: expand_ratio {expand_ratio} is larger than "
                             f"hidden_size {hidden_size} (num_heads = hidden_size // expand_ratio "
                             f"would be 0); pass a smaller expand_ratio or num_heads")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} must be divisible by num_heads "
                             f"{num_heads} (hidden_size // expand_ratio)")
        self.mode = check_mode(mode, fused_chunk=True)
        self.hidden_size, self.num_heads, self.expand_ratio = hidden_size, num_heads, expand_ratio
        self.use_short_conv, self.conv_size, self.conv_bias = use_short_conv, conv_size, conv_bias
        self.forget_dim, self.input_dim = num_heads * expand_ratio, hidden_size
        self.head_f_dim, self.head_i_dim = expand_ratio, hidden_size // num_heads
        self.layer_idx = layer_idx
        self.q_proj = nn.Linear(hidden_size, self.forget_dim, bias=False, **kw)
        self.f_proj = nn.Linear(hidden_size, self.forget_dim, bias=False, **kw)
        self.i_proj = nn.Linear(hidden_size, self.input_dim, bias=False, **kw)
        if use_short_conv:
            self.q_conv1d = ShortConvolution(self.forget_dim, conv_size, conv_bias, None, **kw)
            self.f_conv1d = ShortConvolution(self.forget_dim, conv_size, conv_bias, None, **kw)
            self.i_conv1d = ShortConvolution(self.input_dim, conv_size, conv_bias, None, **kw)
        self.g_norm = RMSNorm(hidden_size, norm_eps, bool(elementwise_affine), **kw)
        self.o_proj = nn.Linear(self.input_dim, hidden_size, bias=False, **kw)
        self._lower_bound: Optional[Tensor] = None

    def state_shape(self) -> Tuple[int, ...]:
        return (self.num_heads, self.head_f_dim, self.head_i_dim)

    def conv_layers(self) -> List[ShortConvolution]:
        return [self.q_conv1d, self.f_conv1d, self.i_conv1d] if self.use_short_conv else []

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None,
                past_key_values=None, use_cache: Optional[bool] = False,
                output_attentions: Optional[bool] = False,
                lower_bound: Optional[Tensor] = None, **kwargs):
        """fla's contract (see FlaMixer.forward), plus fla's `lower_bound` (a scalar or
        [forget_dim] tensor in [0, 1)) on the forget gate."""
        self._lower_bound = lower_bound
        try:
            return super().forward(hidden_states, attention_mask, past_key_values, use_cache,
                                   output_attentions, **kwargs)
        finally:
            self._lower_bound = None

    def _mix(self, x: Tensor, step: MixerStep):
        q, f, i = self.q_proj(x), self.f_proj(x), self.i_proj(x)
        if self.use_short_conv:
            q, f, i = step.conv(self.q_conv1d, q), step.conv(self.f_conv1d, f), \
                step.conv(self.i_conv1d, i)
        cd = compute_dtype(x)
        q = F.silu(q)
        g = F.logsigmoid(f.to(cd))
        lb = self._lower_bound
        if lb is not None and (self.layer_idx or 0) > 0:
            lb = torch.as_tensor(lb, device=x.device).to(cd)
            g = torch.logaddexp(lb.log(), torch.log1p(-lb) + g)
        k = (-torch.expm1(g)).to(i.dtype)  # 1 - f, exact for f near 1
        # padding: no write (k = i = 0) and no decay (log gate 0)
        k, i, g = apply_mask(k, step.mask), apply_mask(i, step.mask), apply_mask(g, step.mask)
        H = self.num_heads
        q, k, g, i = (split_heads(t, H) for t in (q, k, g, i))
        fn = step.op(self, x, "chunk_gla", "fused_recurrent_gla")
        o, state = fn(q, k, i, g, initial_state=step.state, output_final_state=step.want_state,
                      cu_seqlens=step.cu_seqlens)
        o = self.o_proj(self.g_norm(o.reshape(*x.shape[:2], self.input_dim)))
        return apply_mask(o, step.mask), state

"""DeltaNet (Yang et al., 2024), Gated DeltaNet (Yang, Kautz & Hatamizadeh, 2025) and Kimi Delta
Attention (Kimi Team, 2025) layers."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import FlaMixer, MixerStep, check_mode, warn_ignored
from .conv import ShortConvolution
from .norm import RMSNorm
from .utils import (apply_mask, compute_dtype, decay_gate, head_dims, init_dt_bias, init_linear,
                    no_weight_decay, split_heads)

Tensor = torch.Tensor

_QK_ACTIVATIONS = ("silu", "relu", "elu", "identity")


def _sum_norm(x: Tensor, heads: int) -> Tensor:
    """x / sum(x) over each head's channels of x [..., heads * d]."""
    y = split_heads(x, heads)
    return (y / y.sum(-1, keepdim=True)).reshape(x.shape)


class _DeltaRuleMixer(FlaMixer):
    """Shared structure of DeltaNet, Gated DeltaNet and KDA: q/k/v projections with short
    convs, a sigmoid write strength beta, the delta-rule op, a per-head (gated) RMSNorm, o_proj.
    Subclasses name their ops (`_chunk_op`, `_recurrent_op`: names in lightning_ops, and in
    lightning_ops.cp for the chunked one), set
    `b_proj` and, when gated, implement `_gate`."""

    _chunk_op = "chunk_delta_rule"
    _recurrent_op = "fused_recurrent_delta_rule"
    supports_cp = True

    def _build(self, hidden_size, num_heads, num_v_heads, head_k_dim, head_v_dim, mode,
               use_gate, use_short_conv, conv_size, conv_bias, allow_neg_eigval, qk_activation,
               norm_eps, layer_idx, kw):
        if qk_activation not in _QK_ACTIVATIONS:
            raise ValueError(f"qk_activation must be one of {_QK_ACTIVATIONS}, "
                             f"got {qk_activation!r}")
        if num_v_heads % num_heads:
            raise ValueError(f"num_v_heads {num_v_heads} must be a multiple of num_heads "
                             f"{num_heads} (each group of value heads shares one q/k head)")
        self.hidden_size, self.num_heads, self.num_v_heads = hidden_size, num_heads, num_v_heads
        self.head_k_dim, self.head_v_dim = head_k_dim, head_v_dim
        self.key_dim, self.value_dim = num_heads * head_k_dim, num_v_heads * head_v_dim
        if mode == "fused_chunk":
            raise ValueError("mode 'fused_chunk' is deprecated in fla for the delta rule; use "
                             "'chunk'")
        self.mode = check_mode(mode)
        self.use_gate, self.use_short_conv = use_gate, use_short_conv
        self.conv_size, self.conv_bias = conv_size, conv_bias
        self.allow_neg_eigval, self.qk_activation = allow_neg_eigval, qk_activation
        self.layer_idx = layer_idx
        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False, **kw)
        self.k_proj = nn.Linear(hidden_size, self.key_dim, bias=False, **kw)
        self.v_proj = nn.Linear(hidden_size, self.value_dim, bias=False, **kw)
        if use_short_conv:
            qk_act = "silu" if qk_activation == "silu" else None
            self.q_conv1d = ShortConvolution(self.key_dim, conv_size, conv_bias, qk_act, **kw)
            self.k_conv1d = ShortConvolution(self.key_dim, conv_size, conv_bias, qk_act, **kw)
            self.v_conv1d = ShortConvolution(self.value_dim, conv_size, conv_bias, "silu", **kw)
        if use_gate:
            self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False, **kw)
        self.o_norm = RMSNorm(self.head_v_dim, norm_eps, gate_fn="swish", **kw)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False, **kw)

    def _build_by_head_dim(self, hidden_size, head_dim, expand_v, num_heads, num_v_heads, mode,
                           use_gate, use_short_conv, conv_size, conv_bias, allow_neg_eigval,
                           norm_eps, layer_idx, kw) -> int:
        """_build from fla's head_dim / expand_v / num_v_heads arguments (Gated DeltaNet,
        KDA); returns the number of value heads."""
        num_v_heads = num_heads if num_v_heads is None else num_v_heads
        head_v_dim = int(head_dim * expand_v)
        if head_v_dim != head_dim * expand_v:
            raise ValueError(f"head_dim * expand_v = {head_dim * expand_v} must be an integer "
                             f"(the value head dim)")
        self._build(hidden_size, num_heads, num_v_heads, head_dim, head_v_dim, mode, use_gate,
                    use_short_conv, conv_size, conv_bias, allow_neg_eigval, "silu", norm_eps,
                    layer_idx, kw)
        self.head_dim, self.expand_v = head_dim, expand_v
        return num_v_heads

    def state_shape(self) -> Tuple[int, ...]:
        return (self.num_v_heads, self.head_k_dim, self.head_v_dim)

    def conv_layers(self) -> List[ShortConvolution]:
        return [self.q_conv1d, self.k_conv1d, self.v_conv1d] if self.use_short_conv else []

    def _qkv(self, x: Tensor, step: MixerStep):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.use_short_conv:
            q, k, v = step.conv(self.q_conv1d, q), step.conv(self.k_conv1d, k), \
                step.conv(self.v_conv1d, v)
        else:
            v = F.silu(v)
            if self.qk_activation == "silu":
                q, k = F.silu(q), F.silu(k)
        if self.qk_activation == "relu":
            q, k = F.relu(q), F.relu(k)
        elif self.qk_activation == "elu":  # elu + 1, a positive feature map
            q, k = F.elu(q) + 1, F.elu(k) + 1
        if getattr(self, "qk_norm", "l2") == "sum":  # fla's sum_norm: q / sum(q) per head
            q, k = _sum_norm(q, self.num_heads), _sum_norm(k, self.num_heads)
        # after every activation, so padded tokens write nothing (k = v = 0)
        k, v = apply_mask(k, step.mask), apply_mask(v, step.mask)
        return (split_heads(q, self.num_heads), split_heads(k, self.num_heads),
                split_heads(v, self.num_v_heads))

    def _gate(self, x: Tensor, step: MixerStep) -> Optional[Tensor]:
        """The log decay the op takes (None: the ungated delta rule)."""
        return None

    def _beta(self, x: Tensor, step: MixerStep) -> Tensor:
        cd = compute_dtype(x)
        beta = torch.sigmoid(self.b_proj(x).to(cd)) if self.b_proj is not None else \
            x.new_ones(*x.shape[:2], self.num_v_heads, dtype=cd)
        if self.allow_neg_eigval:  # beta in (0, 2): eigenvalues of (I - beta k k^T) in (-1, 1)
            beta = beta * 2
        return apply_mask(beta, step.mask)

    def _mix(self, x: Tensor, step: MixerStep):
        q, k, v = self._qkv(x, step)
        gate = self._gate(x, step)
        fn = step.op(self, x, self._chunk_op, self._recurrent_op)
        o, state = fn(q, k, v, *(() if gate is None else (gate,)),
                      self._beta(x, step).to(q.dtype), initial_state=step.state,
                      output_final_state=step.want_state, cu_seqlens=step.cu_seqlens,
                      use_qk_l2norm_in_kernel=getattr(self, "qk_norm", "l2") == "l2")
        return self._out(o, x, step), state

    def _out(self, o: Tensor, x: Tensor, step: MixerStep) -> Tensor:
        g = split_heads(self.g_proj(x), self.num_v_heads) if self.use_gate else None
        o = self.o_norm(o, g).reshape(*x.shape[:2], self.value_dim)
        return apply_mask(self.o_proj(o), step.mask)


class DeltaNet(_DeltaRuleMixer):
    """DeltaNet: `S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T`, `o_t = S_t^T q_t / sqrt(K)`,
    with L2-normalised q/k (in the kernel), as in fla's `DeltaNet` (same argument names,
    defaults and parameter names).

    Args:
        hidden_size (alias d_model): model width.
        num_heads: heads.
        expand_k, expand_v: key / value width as a multiple of hidden_size.
        mode: 'chunk' or 'fused_recurrent' (eval inputs <= 64 tokens take the recurrent path).
        use_beta: learn beta = sigmoid(b_proj(x)) per head (else beta = 1).
        use_gate: gate the normed output with swish(g_proj(x)).
        use_short_conv, conv_size, conv_bias: causal depthwise convs on q, k (SiLU when
            qk_activation is 'silu') and v (SiLU).
        allow_neg_eigval: beta in (0, 2) instead of (0, 1).
        qk_activation: 'silu', 'relu', 'elu' (elu + 1) or 'identity'.
        qk_norm: 'l2' (normalise q and k, in the kernel), 'sum' (divide by their sum per
            head) or None.
        norm_eps: eps of the output RMSNorm.
        layer_idx: the layer's slot in a cache (`past_key_values`).
    Arguments (and their positional order), defaults, parameter names and the forward
    contract (`FlaMixer.forward`) are fla's.
    """

    def __init__(self, mode: str = "chunk", d_model: Optional[int] = None,
                 hidden_size: int = 1024, expand_k: float = 1.0, expand_v: float = 1.0,
                 num_heads: int = 4, use_beta: bool = True, use_gate: bool = False,
                 use_short_conv: bool = True, conv_size: int = 4, conv_bias: bool = False,
                 allow_neg_eigval: bool = False, layer_idx: Optional[int] = None,
                 qk_activation: str = "silu", qk_norm: Optional[str] = "l2",
                 norm_eps: float = 1e-5, device=None, dtype=None, **kwargs):
        warn_ignored("DeltaNet", kwargs)
        super().__init__()
        hidden_size = d_model if d_model is not None else hidden_size
        if qk_norm not in ("l2", "sum", None):
            raise ValueError(f"qk_norm must be 'l2', 'sum' or None, got {qk_norm!r}")
        key_dim, value_dim = head_dims(hidden_size, num_heads, expand_k, expand_v)
        kw = dict(device=device, dtype=dtype)
        self._build(hidden_size, num_heads, num_heads, key_dim // num_heads,
                    value_dim // num_heads, mode, use_gate, use_short_conv, conv_size,
                    conv_bias, allow_neg_eigval, qk_activation, norm_eps, layer_idx, kw)
        self.expand_k, self.expand_v = expand_k, expand_v
        self.use_beta, self.qk_norm = use_beta, qk_norm
        self.b_proj = nn.Linear(hidden_size, num_heads, bias=False, **kw) if use_beta else None
        init_linear(self)


class GatedDeltaNet(_DeltaRuleMixer):
    """Gated DeltaNet: `S_t = exp(g_t) S_{t-1}` then the delta update, with Mamba-2's gate
    `g_t = -exp(A_log) * softplus(a_proj(x_t) + dt_bias)` per value head, as in fla's
    `GatedDeltaNet` (same argument names, defaults and parameter names).

    Args:
        hidden_size (alias d_model): model width.
        expand_v: value head dim = head_dim * expand_v.
        head_dim: q/k head dim.
        num_heads: q/k heads.
        num_v_heads: value heads (a multiple of num_heads; groups of value heads share one
            q/k head, as in Qwen3-Next); default num_heads.
        mode: 'chunk' or 'fused_recurrent' (eval inputs <= 64 tokens take the recurrent path).
        use_gate: gate the normed output with swish(g_proj(x)).
        use_short_conv, conv_size, conv_bias: causal depthwise convs (SiLU) on q, k, v.
        allow_neg_eigval: beta in (0, 2) instead of (0, 1).
        norm_eps: eps of the output RMSNorm.
        output_gate_activation: activation of the output gate, 'swish' (default) / 'silu' or
            'sigmoid' (fla 0.6's argument).
        dt_min, dt_max, dt_init_floor: init of dt_bias (softplus(dt_bias) log-uniform in
            [dt_min, dt_max]); A_log = log(U(0, 16)). Both float32, no weight decay.
        layer_idx: the layer's slot in a cache (`past_key_values`).
    Arguments (and their positional order; dt_* and d_model are extras), defaults, parameter
    names and the forward contract (`FlaMixer.forward`) are fla's.
    """

    _chunk_op = "chunk_gated_delta_rule"
    _recurrent_op = "fused_recurrent_gated_delta_rule"

    def __init__(self, hidden_size: int = 2048, expand_v: float = 2, head_dim: int = 256,
                 num_heads: int = 6, num_v_heads: Optional[int] = None, mode: str = "chunk",
                 use_gate: bool = True, use_short_conv: bool = True,
                 allow_neg_eigval: bool = False, conv_size: int = 4, conv_bias: bool = False,
                 layer_idx: Optional[int] = None, norm_eps: float = 1e-5,
                 output_gate_activation: str = "swish",
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4,
                 d_model: Optional[int] = None, device=None, dtype=None, **kwargs):
        super().__init__()
        warn_ignored("GatedDeltaNet", kwargs)
        if output_gate_activation not in ("swish", "silu", "sigmoid"):
            raise ValueError(f"output_gate_activation must be 'swish', 'silu' or 'sigmoid' "
                             f"(as fla's FusedRMSNormGated), got {output_gate_activation!r}")
        hidden_size = d_model if d_model is not None else hidden_size
        kw = dict(device=device, dtype=dtype)
        num_v_heads = self._build_by_head_dim(hidden_size, head_dim, expand_v, num_heads,
                                              num_v_heads, mode, use_gate, use_short_conv,
                                              conv_size, conv_bias, allow_neg_eigval, norm_eps,
                                              layer_idx, kw)
        self.output_gate_activation = output_gate_activation
        if output_gate_activation != "swish":
            self.o_norm = RMSNorm(self.head_v_dim, norm_eps, gate_fn=output_gate_activation,
                                  **kw)
        self.a_proj = nn.Linear(hidden_size, num_v_heads, bias=False, **kw)
        self.b_proj = nn.Linear(hidden_size, num_v_heads, bias=False, **kw)
        init_linear(self)
        A = torch.empty(num_v_heads, dtype=torch.float32, device=device).uniform_(0, 16)
        self.A_log = nn.Parameter(torch.log(A))
        self.dt_bias = nn.Parameter(init_dt_bias(num_v_heads, dt_min, dt_max, dt_init_floor,
                                                 device))
        no_weight_decay(self.A_log, self.dt_bias)

    def _gate(self, x: Tensor, step: MixerStep) -> Tensor:
        g = decay_gate(self.A_log, self.a_proj(x), self.dt_bias, compute_dtype(x))
        return apply_mask(g, step.mask)  # log-decay 0 (no decay) over padding


class KimiDeltaAttention(_DeltaRuleMixer):
    """Kimi Delta Attention (KDA): Gated DeltaNet with a per-channel decay,
    `S_t = (I - beta_t k_t k_t^T) diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T`, with the gate
    `g_t = -exp(A_log) * softplus(f_proj(x_t) + dt_bias)` per (value head, key channel), as in
    fla 0.6's `KimiDeltaAttention` (same argument names and positional order, defaults,
    parameter names and shapes, init).

    Args:
        hidden_size (alias d_model): model width.
        expand_v: value head dim = head_dim * expand_v.
        head_dim: q/k head dim.
        num_heads: q/k heads.
        num_v_heads: value heads (a multiple of num_heads; each group of value heads shares a
            q/k head, GVA); the gate, beta, A_log and dt_bias are per value head, as in fla;
            default num_heads.
        mode: 'chunk' or 'fused_recurrent' (eval inputs <= 64 tokens take the recurrent path).
        use_short_conv, conv_size, conv_bias: causal depthwise convs (SiLU) on q, k, v.
        allow_neg_eigval: beta in (0, 2) instead of (0, 1).
        safe_gate: fla's flag for its bounded-gate TensorCore kernels; needs lower_bound. Here
            it changes only the init (A_log = 0, as in fla) and checks lower_bound's range.
        lower_bound: a bounded gate `g = lower_bound * sigmoid(exp(A_log) * (f_proj(x) +
            dt_bias))` in [lower_bound, 0) instead of the softplus one (fla: -5 recommended;
            with safe_gate it must lie in [-5, 0)).
        norm_eps: eps of the output RMSNorm (gated by sigmoid(g_proj(x))).
        layer_idx: the layer's slot in a cache (`past_key_values`).
    f_proj and g_proj are low-rank (hidden -> head_v_dim -> num_v_heads * head_dim / value
    dim). Init as fla's: A_log = log(U(1, 16)) per value head (0 with safe_gate); dt_bias per
    (value head, key channel) with softplus(dt_bias) log-uniform in [1e-3, 1e-1] (floor 1e-4),
    as Mamba's / Gated DeltaNet's; both float32 without weight decay.
    """

    _chunk_op = "chunk_kda"
    _recurrent_op = "fused_recurrent_kda"

    def __init__(self, hidden_size: int = 2048, expand_v: float = 1, head_dim: int = 128,
                 num_heads: int = 16, num_v_heads: Optional[int] = None, mode: str = "chunk",
                 use_short_conv: bool = True, allow_neg_eigval: bool = False,
                 safe_gate: bool = False, lower_bound: Optional[float] = None,
                 conv_size: int = 4, conv_bias: bool = False, layer_idx: Optional[int] = None,
                 norm_eps: float = 1e-5, d_model: Optional[int] = None, device=None,
                 dtype=None, **kwargs):
        super().__init__()
        warn_ignored("KimiDeltaAttention", kwargs)
        hidden_size = d_model if d_model is not None else hidden_size
        if safe_gate and lower_bound is None:
            raise ValueError("safe_gate=True needs lower_bound (fla recommends -5)")
        if lower_bound is not None:
            lower_bound = float(lower_bound)
            if not lower_bound < 0:
                raise ValueError(f"lower_bound must be < 0 (a log decay), got {lower_bound}")
            if safe_gate and not -5 <= lower_bound:
                raise ValueError(f"with safe_gate, lower_bound must be in [-5, 0), got "
                                 f"{lower_bound}")
        self.safe_gate, self.lower_bound = bool(safe_gate), lower_bound
        kw = dict(device=device, dtype=dtype)
        num_v_heads = self._build_by_head_dim(hidden_size, head_dim, expand_v, num_heads,
                                              num_v_heads, mode, True, use_short_conv,
                                              conv_size, conv_bias, allow_neg_eigval, norm_eps,
                                              layer_idx, kw)
        head_v_dim = self.head_v_dim
        self.gate_dim = num_v_heads * head_dim  # one decay per (value head, key channel)
        self.f_proj = nn.Sequential(nn.Linear(hidden_size, head_v_dim, bias=False, **kw),
                                    nn.Linear(head_v_dim, self.gate_dim, bias=False, **kw))
        self.b_proj = nn.Linear(hidden_size, num_v_heads, bias=False, **kw)
        self.g_proj = nn.Sequential(nn.Linear(hidden_size, head_v_dim, bias=False, **kw),
                                    nn.Linear(head_v_dim, self.value_dim, bias=True, **kw))
        self.o_norm = RMSNorm(head_v_dim, norm_eps, gate_fn="sigmoid", **kw)
        init_linear(self)
        if safe_gate:
            A_log = torch.zeros(num_v_heads, dtype=torch.float32, device=device)
        else:
            A_log = torch.empty(num_v_heads, dtype=torch.float32, device=device).uniform_(1, 16)
            A_log = torch.log(A_log)
        self.A_log = nn.Parameter(A_log)
        self.dt_bias = nn.Parameter(init_dt_bias(self.gate_dim, device=device))
        no_weight_decay(self.A_log, self.dt_bias)

    def _gate(self, x: Tensor, step: MixerStep) -> Tensor:
        HV, cd = self.num_v_heads, compute_dtype(x)
        f = split_heads(self.f_proj(x), HV)
        dt_bias = split_heads(self.dt_bias, HV)  # A_log per value head, dt_bias per channel
        if self.lower_bound is None:
            g = decay_gate(self.A_log[:, None], f, dt_bias, cd)
        else:  # fla's bounded gate: lower_bound * sigmoid(exp(A_log) * (f + dt_bias))
            a = self.A_log.to(cd).exp()[:, None]
            g = self.lower_bound * torch.sigmoid(a * (f.to(cd) + dt_bias.to(cd)))
        return apply_mask(g, step.mask)  # no decay over padding

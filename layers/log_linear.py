"""Log-linear Mamba-2 (Guo et al. 2025), as fla's `fla.layers.log_linear_mamba2.LogLinearMamba2`:
the Mamba-2 block whose SSD scan is replaced by log-linear attention over a Fenwick hierarchy of
O(log T) states per sequence (`lightning_ops.loglinear.hmamba_chunk_scan_combined`).

    gate, xBC, dt, dl = in_proj(u);  x, B, C = silu(conv1d(xBC))
    y = hmamba(x, dt, A = -exp(A_log), B, C, dl, L, D, dt_bias, softplus)
      = log-linear attention with q = C, k = B, v = x dt, g = A dt, level weights softplus(L dl),
        plus D x
    y = norm(y, gate) (gated RMSNorm) or y * silu(gate);  out = out_proj(y)

fla's names, arguments, defaults, parameter names and shapes (its state_dict loads strictly) and
its forward contract (`FlaMixer`: hidden_states, attention_mask, past_key_values, use_cache).

Cache: `recurrent_state` is the tuple (ht [N, H, L, state_size, head_dim], offsets [N] int64):
the level states of the hierarchy and each sequence's next position (what
`lightning_ops.loglinear.LogLinearAttentionState` holds, as a plain tuple so the cache's
clone / index_select / reorder work on it); `conv_state` the usual ([N, conv_dim, W],).
A one-token continuation (decode) is `log_linear_attn_step`: on the device, O(log T) states.

Differences from fla (each one a case fla does not handle): the layer runs on any device (fla's
raises NotImplementedError off CUDA); an attention_mask in any arrangement gives each row's real
tokens the positions 0, 1, ... of their own sequence, as unpadding would (fla runs padded rows
as they are, so left padding shifts the Fenwick positions of the real tokens); packed sequences
(cu_seqlens), multi-token continuations of a cache and a non-default dt_limit are supported.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import lightning_ops as lo
from lightning_ops.loglinear import hmamba_chunk_scan_combined, log_linear_attn_step

from .base import FlaMixer, HierarchyStateMixin, MixerStep, warn_ignored
from .conv import ShortConvolution
from .norm import RMSNorm
from .utils import (apply_mask, compute_dtype, decay_rate, init_dt_bias, no_weight_decay,
                    reuse_decode_state, softplus_dt, split_xbc)

Tensor = torch.Tensor

MAX_SEQUENCE_LENGTH = 2048 * 8
LAMBDA_LEVEL_BASE = 2


def get_num_levels(length: int, base: int) -> int:
    """Levels of a Fenwick hierarchy over `length` tokens (fla's: ceil(log_base(length)) + 1)."""
    return math.ceil(math.log(length, base)) + 1


MAX_NUM_LEVELS = get_num_levels(MAX_SEQUENCE_LENGTH, LAMBDA_LEVEL_BASE)  # 15, as fla


class LogLinearMamba2(HierarchyStateMixin, FlaMixer):
    """Log-linear Mamba-2 mixer (fla's `LogLinearMamba2`, same arguments and defaults).

    Args:
        num_heads: SSM heads H (num_heads * head_dim must equal expand * hidden_size).
        head_dim: head dim P.
        hidden_size: model width.
        state_size: state size N per head (the size of B and C per group).
        expand: intermediate_size = expand * hidden_size.
        n_groups: groups of heads sharing B and C.
        conv_kernel: width of the causal depthwise conv on xBC (2..4).
        conv_init: init conv1d.weight uniform in +-conv_init.
        use_conv_bias: bias in conv1d.
        hidden_act: 'silu' / 'swish' (conv activation and the gate when rmsnorm=False).
        rmsnorm: gated RMSNorm of y (else y * silu(gate)).
        D_has_hdim: D per channel [intermediate_size] instead of per head [num_heads].
        norm_before_gate: norm(y) * silu(gate) instead of norm(y * silu(gate)).
        chunk_size: chunk length of the scan (a power of two).
        dt_limit: clamp of dt after the softplus.
        dt_min, dt_max, dt_init_floor: softplus(dt_bias) log-uniform in [dt_min, dt_max].
        use_bias: biases of in_proj and out_proj.
        norm_eps: RMSNorm epsilon.
        layer_idx: the layer's slot in the cache.
        backend: accepted ('cuda' / 'triton', fla's conv backend); the public ops dispatch.
        num_levels (keyword only, an extra): levels L of the hierarchy (default fla's 15, which
            covers 16K tokens; keys further than 2^(L-2) tokens back weigh 0).
    Parameters (fla's names): in_proj, conv1d, dt_bias [H], A_log [H] (log(1..H)), L [H, levels]
    (ones), norm.weight, D, out_proj; dt_bias, A_log, L and D carry `_no_weight_decay`.
    """

    supports_cp = True

    def __init__(self, num_heads: int, head_dim: int = 64, hidden_size: int = 2048,
                 state_size: int = 128, expand: int = 2, n_groups: int = 1, conv_kernel: int = 4,
                 conv_init: Optional[float] = None, use_conv_bias: bool = False,
                 hidden_act: str = "silu", rmsnorm: bool = True, D_has_hdim: bool = False,
                 norm_before_gate: bool = False, chunk_size: int = 64,
                 dt_limit: Tuple[float, float] = (0.0, float("inf")), dt_min: float = 0.001,
                 dt_max: float = 0.1, dt_init_floor: float = 1e-4, use_bias: bool = True,
                 norm_eps: float = 1e-5, layer_idx: Optional[int] = None, backend: str = "cuda",
                 *, num_levels: Optional[int] = None, device=None, dtype=None, **kwargs):
        super().__init__()
        warn_ignored("LogLinearMamba2", kwargs)
        kw = dict(device=device, dtype=dtype)
        if hidden_act not in ("silu", "swish"):
            raise ValueError(f"LogLinearMamba2: hidden_act must be 'silu' or 'swish' (as fla), "
                             f"got {hidden_act!r}")
        if backend not in ("cuda", "triton"):
            raise ValueError(f"LogLinearMamba2: backend must be 'cuda' or 'triton' (fla's conv "
                             f"backends), got {backend!r}")
        self.num_heads, self.head_dim, self.hidden_size = num_heads, head_dim, hidden_size
        self.ssm_state_size, self.conv_kernel_size, self.conv_init = state_size, conv_kernel, \
            conv_init
        self.intermediate_size = int(expand * hidden_size)
        if num_heads * head_dim != self.intermediate_size:
            raise ValueError(f"LogLinearMamba2: num_heads * head_dim = {num_heads} * {head_dim} "
                             f"must equal expand * hidden_size = {self.intermediate_size}")
        if num_heads % n_groups:
            raise ValueError(f"LogLinearMamba2: n_groups {n_groups} must divide num_heads "
                             f"{num_heads}")
        if chunk_size < 1 or chunk_size & (chunk_size - 1):
            raise ValueError(f"LogLinearMamba2: chunk_size must be a power of two, got "
                             f"{chunk_size}")
        self.layer_idx, self.use_conv_bias, self.activation = layer_idx, use_conv_bias, hidden_act
        self.layer_norm_epsilon, self.rmsnorm, self.D_has_hdim = norm_eps, rmsnorm, D_has_hdim
        self.norm_before_gate, self.n_groups, self.chunk_size = norm_before_gate, n_groups, \
            chunk_size
        self.dt_limit, self.dt_min, self.dt_max = tuple(dt_limit), dt_min, dt_max
        self.use_bias, self.backend = use_bias, backend
        self.num_lambda_dims = MAX_NUM_LEVELS if num_levels is None else int(num_levels)
        if self.num_lambda_dims < 1:
            raise ValueError(f"LogLinearMamba2: num_levels must be >= 1, got {num_levels}")
        self.lambda_mode = "positive"
        self.conv_dim = self.intermediate_size + 2 * n_groups * state_size
        self.conv1d = ShortConvolution(self.conv_dim, conv_kernel, use_conv_bias, "silu", **kw)
        if conv_init is not None:
            nn.init.uniform_(self.conv1d.weight, -conv_init, conv_init)
        projection_size = self.intermediate_size + self.conv_dim + \
            num_heads * (self.num_lambda_dims + 1)
        self.in_proj = nn.Linear(hidden_size, projection_size, bias=use_bias, **kw)
        self.dt_bias = nn.Parameter(init_dt_bias(num_heads, dt_min, dt_max, dt_init_floor,
                                                 device))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, num_heads + 1, dtype=torch.float32,
                                                         device=device)))
        self.L = nn.Parameter(torch.ones(num_heads, self.num_lambda_dims, device=device))
        self.norm = None
        if rmsnorm:
            self.norm = RMSNorm(self.intermediate_size, norm_eps,
                                group_size=self.intermediate_size // n_groups, gate_fn="silu",
                                norm_before_gate=norm_before_gate, **kw)
        self.D = nn.Parameter(torch.ones(self.intermediate_size if D_has_hdim else num_heads,
                                         device=device))
        no_weight_decay(self.dt_bias, self.A_log, self.L, self.D)
        self.out_proj = nn.Linear(self.intermediate_size, hidden_size, bias=use_bias, **kw)

    # -- contract hooks ----------------------------------------------------------------------
    def state_shape(self) -> Tuple[int, ...]:
        """Shape of one sequence's level states ht (the offsets ride along in the tuple)."""
        return (self.num_heads, self.num_lambda_dims, self.ssm_state_size, self.head_dim)

    def conv_layers(self) -> List[ShortConvolution]:
        return [self.conv1d]

    def _get_D(self) -> Tensor:
        return self.D.view(self.num_heads, self.head_dim) if self.D_has_hdim else self.D

    # -- the mixer -----------------------------------------------------------------------------
    def _mix(self, u: Tensor, step: MixerStep):
        b, l, _ = u.shape
        h, p, g, n, lv = self.num_heads, self.head_dim, self.n_groups, self.ssm_state_size, \
            self.num_lambda_dims
        gate, xBC, dt, dl = self.in_proj(u).split(
            [self.intermediate_size, self.conv_dim, h, h * lv], dim=-1)
        x, B, C = split_xbc(step.conv(self.conv1d, xBC), h, p, g, n)
        dl = dl.reshape(b, l, h, lv)
        cd = compute_dtype(u)
        A = decay_rate(self.A_log, cd)
        D = self._get_D().to(cd)
        Lp = self.L.to(cd)
        z = gate.reshape(b, l, h, p)
        rec = step.state
        if step.is_decode(l):
            y, state = self._decode(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], dl[:, 0], Lp, D,
                                    None if self.rmsnorm else z[:, 0], rec, step.mask)
            y = y[:, None]
        else:
            y, state = self._scan(x, dt, A, B, C, dl, Lp, D, None if self.rmsnorm else z, rec,
                                  step)
        y = y.reshape(b, l, self.intermediate_size)
        if self.rmsnorm:
            y = self.norm(y, gate)
        return apply_mask(self.out_proj(y), step.mask), state

    def _scan(self, x, dt, A, B, C, dl, Lp, D, z, rec, step: MixerStep):
        """The chunked scan. A padding mask (left-aligned by `mix`) becomes packing: row b is
        two packed sequences, its padding and its real tokens, so the real tokens start at
        their own offset (0, or the cache's) and get their own state (fixed shapes)."""
        b, l = x.shape[:2]
        kw = dict(chunk_size=self.chunk_size, D=D, dt_bias=self.dt_bias.to(A.dtype),
                  dt_softplus=True, dt_limit=self.dt_limit, return_final_states=step.want_state)
        init = None if rec is None else tuple(rec)
        if step.cp_context is not None:  # (mix refuses masks and states under CP)
            y, _ = lo.cp.hmamba_chunk_scan_combined(x, dt, A, B, C, dl, Lp, z=z,
                                                    cp_context=step.cp_context, **kw)
            return y, None
        if step.mask is None or step.cu_seqlens is not None:
            y, st = hmamba_chunk_scan_combined(x, dt, A, B, C, dl, Lp, z=z, initial_states=init,
                                               cu_seqlens=step.cu_seqlens, **kw)
            return y, (None if st is None else (st.ht, st.offsets))
        cu, init = self.mask_as_packing(step.mask, init)

        def flat(t):
            return None if t is None else t.reshape(1, b * l, *t.shape[2:])
        y, st = hmamba_chunk_scan_combined(flat(x), flat(dt), A, flat(B), flat(C), flat(dl), Lp,
                                           z=flat(z), initial_states=init, cu_seqlens=cu, **kw)
        y = y.reshape(b, l, *y.shape[2:])
        return y, (None if st is None else (st.ht[1::2], st.offsets[1::2]))

    def _decode(self, x, dt, A, B, C, dl, Lp, D, z, rec, mask):
        """One token per sequence from the cached hierarchy (log_linear_attn_step, on the
        device). x [b, h, p], dt [b, h], B/C [b, g, n], dl [b, h, L]."""
        cd = A.dtype
        dt = softplus_dt(dt, self.dt_bias, cd, self.dt_limit)
        v = (x * dt[..., None]).to(x.dtype)
        lam = F.softplus(Lp * dl.to(cd))
        ht, off = rec
        # the cache's levels are rewritten in place when nothing needs them afterwards (no
        # padding rows to restore, no autograd): a fresh full-size state per step costs ~10x
        o, new = log_linear_attn_step(C, B, v, A * dt, lam, (ht, off),
                                      inplace_final_state=reuse_decode_state(mask))
        y = o + x * (D[:, None] if D.dim() == 1 else D)
        if z is not None:
            y = y * F.silu(z)
        return y, self.keep_padded_rows(mask, (new.ht, new.offsets), (ht, off))

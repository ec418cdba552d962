"""Log-linear Gated DeltaNet (Guo et al. 2025), as the authors' `HGatedDeltaNet`: Gated DeltaNet
whose delta-rule recurrence runs over a Fenwick hierarchy of O(log T) states per sequence
(`lightning_ops.loglinear.chunk_log_linear_gated_delta_rule`), each level weighed per token.

    q, k, v = silu(conv(proj(x))), beta = sigmoid(b_proj(x)),
    g = -exp(A_log) softplus(a_proj(x) + dt_bias)                      (GatedDeltaNet's)
    lambda = softplus(L * l_proj(x))                                   [B, T, HV, num_levels]
    o = log-linear gated delta rule(q, k, v, g, lambda, beta), q/k l2-normalised in the op
    o = o_norm(o, g_proj(x)) (gated RMSNorm per head);  out = o_proj(o)

Everything of GatedDeltaNet (layers/delta.py: arguments, defaults, parameter names, grouped value
heads) plus the authors' level parameters: `l_proj` (hidden -> num_v_heads * num_levels, no
bias) and `L` [num_v_heads, num_levels] (ones, no weight decay), lambda_mode "positive". The op
computes with scale 1, as the authors' op does (their chunk_h_gated_delta_rule divides lambda by
the scale its kernel multiplies by).

Cache: `recurrent_state` is the tuple (ht [N, HV, L, head_k_dim, head_v_dim], offsets [N] int64)
(what `lightning_ops.loglinear.LogLinearAttentionState` holds, as a plain tuple so the cache's
clone / index_select / reorder work on it), as layers/log_linear.py's LogLinearMamba2;
`conv_state` the three short-conv states, as GatedDeltaNet. A one-token continuation (decode) is
`log_linear_gated_delta_rule_step`: on the device, O(log T) states.

Differences from the authors' layer (each a case theirs does not handle): any device and dtype;
an attention_mask in any arrangement gives each row's real tokens the positions 0, 1, ... of
their own sequence (as unpadding would); packed sequences (cu_seqlens), initial states and
multi-token continuations of a cache; num_v_heads (grouped value heads, lambda per value head).
No matrix router (matrix_router=True raises).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import lightning_ops as lo
from lightning_ops.loglinear import (chunk_log_linear_gated_delta_rule,
                                     fused_recurrent_log_linear_gated_delta_rule,
                                     log_linear_gated_delta_rule_step)

from .base import HierarchyStateMixin, MixerStep, warn_ignored
from .delta import GatedDeltaNet
from .log_linear import MAX_NUM_LEVELS
from .utils import (apply_mask, compute_dtype, init_linear, no_weight_decay, reuse_decode_state,
                    split_heads)

Tensor = torch.Tensor


class LogLinearGatedDeltaNet(HierarchyStateMixin, GatedDeltaNet):
    """Log-linear Gated DeltaNet mixer (the authors' `HGatedDeltaNet`; GatedDeltaNet's
    arguments, defaults and parameters plus the level weights).

    Args (beyond GatedDeltaNet's, see layers.GatedDeltaNet):
        max_position_embeddings: the context the hierarchy covers: num_levels =
            max(15, bit_length(max_position_embeddings - 1) + 1), as the authors (15 levels
            cover 16K tokens; keys further than 2^(L-2) tokens back weigh 0).
        num_levels (keyword only, an extra): levels L, overriding the above.
        matrix_router: the authors' experimental router; only False is supported.
    Parameters: GatedDeltaNet's, l_proj [num_v_heads * num_levels, hidden_size], L
    [num_v_heads, num_levels] (ones, `_no_weight_decay`).
    """

    supports_cp = True

    def __init__(self, hidden_size: int = 2048, expand_v: float = 2, head_dim: int = 256,
                 num_heads: int = 6, num_v_heads: Optional[int] = None, mode: str = "chunk",
                 use_gate: bool = True, use_short_conv: bool = True,
                 allow_neg_eigval: bool = False, conv_size: int = 4, conv_bias: bool = False,
                 layer_idx: Optional[int] = None, norm_eps: float = 1e-5,
                 matrix_router: bool = False, max_position_embeddings: int = 16384,
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4,
                 d_model: Optional[int] = None, *, num_levels: Optional[int] = None,
                 device=None, dtype=None, **kwargs):
        warn_ignored("LogLinearGatedDeltaNet", kwargs)
        if matrix_router:
            raise NotImplementedError("LogLinearGatedDeltaNet: matrix_router is not supported "
                                      "(the per-level weights lambda = softplus(L l_proj(x)))")
        super().__init__(hidden_size=hidden_size, expand_v=expand_v, head_dim=head_dim,
                         num_heads=num_heads, num_v_heads=num_v_heads, mode=mode,
                         use_gate=use_gate, use_short_conv=use_short_conv,
                         allow_neg_eigval=allow_neg_eigval, conv_size=conv_size,
                         conv_bias=conv_bias, layer_idx=layer_idx, norm_eps=norm_eps,
                         dt_min=dt_min, dt_max=dt_max, dt_init_floor=dt_init_floor,
                         d_model=d_model, device=device, dtype=dtype)
        if num_levels is None:
            num_levels = max(MAX_NUM_LEVELS, (int(max_position_embeddings) - 1).bit_length() + 1)
        if int(num_levels) < 1:
            raise ValueError(f"LogLinearGatedDeltaNet: num_levels must be >= 1, got {num_levels}")
        self.num_levels = int(num_levels)
        self.max_position_embeddings = max_position_embeddings
        self.matrix_router = False
        self.lambda_mode = "positive"
        self.lambdas_dim = self.num_v_heads * self.num_levels
        self.l_proj = nn.Linear(self.hidden_size, self.lambdas_dim, bias=False, device=device,
                                dtype=dtype)
        init_linear(self.l_proj)
        self.L = nn.Parameter(torch.ones(self.num_v_heads, self.num_levels, device=device))
        no_weight_decay(self.L)

    # -- contract hooks ----------------------------------------------------------------------
    def state_shape(self):
        """Shape of one sequence's level states ht (the offsets ride along in the tuple)."""
        return (self.num_v_heads, self.num_levels, self.head_k_dim, self.head_v_dim)

    # -- the mixer -----------------------------------------------------------------------------
    def _lambda(self, x: Tensor, step: MixerStep) -> Tensor:
        cd = compute_dtype(x)
        dl = split_heads(self.l_proj(x), self.num_v_heads).to(cd)  # [B, T, HV, L]
        return apply_mask(F.softplus(self.L.to(cd) * dl), step.mask)

    def _mix(self, x: Tensor, step: MixerStep):
        q, k, v = self._qkv(x, step)
        g = self._gate(x, step)
        beta = self._beta(x, step).to(q.dtype)
        lam = self._lambda(x, step)
        rec = None if step.state is None else tuple(step.state)
        if step.is_decode(x.shape[1]):
            o, state = self._decode(q[:, 0], k[:, 0], v[:, 0], g[:, 0], lam[:, 0], beta[:, 0],
                                    rec, step.mask)
            o = o[:, None]
        else:
            o, state = self._scan(q, k, v, g, lam, beta, rec, step)
        return self._out(o, x, step), state

    def _scan(self, q, k, v, g, lam, beta, rec, step: MixerStep):
        """The chunked op. A padding mask (left-aligned by `mix`) becomes packing: row b is two
        packed sequences, its padding and its real tokens, so the real tokens start at their own
        offset (0, or the cache's) and get their own state (fixed shapes, no host sync here)."""
        kw = dict(output_final_state=step.want_state, use_qk_l2norm_in_kernel=True)
        if step.cp_context is not None:  # the chunked form, whatever the mode (as the others)
            return lo.cp.chunk_log_linear_gated_delta_rule(
                q, k, v, g, lam, beta, cp_context=step.cp_context, **kw)[0], None
        fn = fused_recurrent_log_linear_gated_delta_rule if self.mode == "fused_recurrent" \
            else chunk_log_linear_gated_delta_rule
        if step.mask is None or step.cu_seqlens is not None:
            o, st = fn(q, k, v, g, lam, beta, initial_state=rec, cu_seqlens=step.cu_seqlens,
                       **kw)
            return o, (None if st is None else (st.ht, st.offsets))
        b, l = q.shape[:2]
        cu, init = self.mask_as_packing(step.mask, rec)

        def flat(t):
            return t.reshape(1, b * l, *t.shape[2:])
        o, st = fn(flat(q), flat(k), flat(v), flat(g), flat(lam), flat(beta), initial_state=init,
                   cu_seqlens=cu, **kw)
        o = o.reshape(b, l, *o.shape[2:])
        return o, (None if st is None else (st.ht[1::2], st.offsets[1::2]))

    def _decode(self, q, k, v, g, lam, beta, rec, mask):
        """One token per sequence from the cached hierarchy (on the device). q/k [b, H, K],
        v [b, HV, V], g/beta [b, HV], lam [b, HV, L]."""
        ht, off = rec
        o, new = log_linear_gated_delta_rule_step(q, k, v, g, lam, beta, (ht, off),
                                                  use_qk_l2norm_in_kernel=True,
                                                  inplace_final_state=reuse_decode_state(mask))
        return o, self.keep_padded_rows(mask, (new.ht, new.offsets), (ht, off))

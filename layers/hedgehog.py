"""Hedgehog (Zhang et al., 2024): linear attention with a learnable spiky feature map that mimics
softmax attention, and the attention-distillation loss used to convert softmax models."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn

from .base import FlaMixer, MixerStep, check_mode, warn_ignored
from .norm import RMSNorm
from .utils import apply_mask, compute_dtype, head_dims, kv_groups, kv_heads, split_heads

Tensor = torch.Tensor


class HedgehogFeatureMap(nn.Module):
    """phi(x) = softmax([2 W x, -2 W x]) over the 2 * head_dim features (fla's
    `HedgehogFeatureMap`, joint=True), or the paper's [softmax(W x), softmax(-W x)] (joint=False).
    `layer` = Linear(head_dim, head_dim) initialised to the identity with a zero bias."""

    def __init__(self, head_dim: int, joint: bool = True, device=None, dtype=None):
        super().__init__()
        self.head_dim, self.joint = head_dim, joint
        self.layer = nn.Linear(head_dim, head_dim, device=device, dtype=dtype)
        self.init_weights_()

    def init_weights_(self) -> None:
        with torch.no_grad():
            nn.init.eye_(self.layer.weight)
            nn.init.zeros_(self.layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer(x)
        if self.joint:
            return torch.cat([2 * x, -2 * x], dim=-1).softmax(-1)
        return torch.cat([x.softmax(-1), (-x).softmax(-1)], dim=-1)


def hedgehog_attention_weights(phi_q: Tensor, phi_k: Tensor, causal: bool = True,
                               eps: float = 1e-12) -> Tensor:
    """The student's attention weights [B, H, T, T]: phi(q_i).phi(k_j) / sum_j (masked causal)."""
    a = torch.einsum("bihd,bjhd->bhij", phi_q, phi_k)
    if causal:
        T = a.shape[-1]
        a = a.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=a.device).tril(), 0.0)
    return a / (a.sum(-1, keepdim=True) + eps)


def hedgehog_distillation_loss(q: Tensor, k: Tensor, feature_map_q: nn.Module,
                               feature_map_k: Optional[nn.Module] = None, causal: bool = True,
                               scale: Optional[float] = None,
                               attention_mask: Optional[Tensor] = None,
                               eps: float = 1e-9) -> Tensor:
    """Hedgehog's attention distillation: the soft-label cross entropy between the teacher's
    softmax attention weights softmax(q k^T * scale) and the student's normalised linear
    attention weights phi(q) phi(k)^T / row sum, averaged over queries (the teacher is
    detached: only the feature maps learn).

    q, k: [B, T, H, D] before the feature maps (the softmax model's queries and keys).
    attention_mask: [B, T] 0/1 padding mask (padded keys and queries are left out).
    Quadratic in T: a conversion-time helper on short sequences, not a kernel."""
    feature_map_k = feature_map_q if feature_map_k is None else feature_map_k
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    cd = compute_dtype(q)
    s = torch.einsum("bihd,bjhd->bhij", q.to(cd), k.to(cd)) * scale
    T = s.shape[-1]
    allowed = torch.ones(T, T, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed.tril()
    allowed = allowed[None, None]
    keys = torch.ones(1, 1, 1, T, dtype=torch.bool, device=q.device)
    if attention_mask is not None:
        keys = attention_mask.bool()[:, None, None, :]
        allowed = allowed & keys
    teacher = s.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0).detach()
    phi_q, phi_k = feature_map_q(q).to(cd), feature_map_k(k).to(cd)
    if attention_mask is not None:
        phi_k = phi_k * attention_mask.to(cd)[:, :, None, None]
    student = hedgehog_attention_weights(phi_q, phi_k, causal)
    ce = -(teacher * torch.log(student + eps)).sum(-1)  # [B, H, T]
    if attention_mask is None:
        return ce.mean()
    w = attention_mask.to(cd)[:, None, :].expand_as(ce)
    return (ce * w).sum() / w.sum().clamp_min(1)


class HedgehogAttention(FlaMixer):
    """Hedgehog linear attention: `o_t = sum_{s<=t} phi(q_t).phi(k_s) v_s / sum_{s<=t}
    phi(q_t).phi(k_s)` with learnable Hedgehog feature maps on q and k, an output RMSNorm per
    head and o_proj. fla's `LinearAttention(feature_map='hedgehog')`: same arguments, parameter
    names (`feature_map_q.layer`, `feature_map_k.layer`, `norm`), and the fla layer contract with
    a cache (`FlaMixer.forward`).

    Args:
        mode: 'chunk', 'fused_chunk' (same math) or 'fused_recurrent'.
        hidden_size, expand_k, expand_v, num_heads, num_kv_heads: as fla's LinearAttention.
        tie_feature_map_qk: one feature map for q and k.
        output_norm: 'rmsnorm' or 'identity'.
        norm_q, norm_k: divide q / k features by their sum (+1e-4), as fla.
        do_feature_map_norm: the normalised (attention-like) form above; default True here, as
            the Hedgehog paper (fla defaults to False: the unnormalised sum, scaled by K^-0.5).
            The row sums ride along as a value column of ones (one op call; the cache state is
            [N, H, 2 * head_k_dim, head_v_dim + 1], its last column the running sum of phi(k)).
        joint_softmax: fla's feature map (one softmax over [2Wx, -2Wx]) or the paper's two.
        elementwise_affine, norm_eps: the output RMSNorm.
        layer_idx: the layer's cache slot.
    `attention_distillation_loss(x)` is Hedgehog's conversion loss on this layer's own q / k.
    """

    supports_cp = True

    def __init__(self, mode: str = "chunk", hidden_size: int = 1024, expand_k: float = 1.0,
                 expand_v: float = 1.0, num_heads: int = 8, num_kv_heads: Optional[int] = None,
                 tie_feature_map_qk: bool = False, output_norm: str = "rmsnorm",
                 norm_q: bool = False, norm_k: bool = False, do_feature_map_norm: bool = True,
                 elementwise_affine: bool = True, norm_eps: float = 1e-5,
                 joint_softmax: bool = True, eps: float = 1e-12,
                 layer_idx: Optional[int] = None, device=None, dtype=None, **kwargs):
        super().__init__()
        kwargs.pop("feature_map", None) if kwargs.get("feature_map") == "hedgehog" else None
        warn_ignored("HedgehogAttention", kwargs)
        kw = dict(device=device, dtype=dtype)
        self.mode = check_mode(mode, fused_chunk=True)
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.num_kv_heads, self.num_kv_groups = kv_groups(num_heads, num_kv_heads)
        self.key_dim, self.value_dim = head_dims(hidden_size, num_heads, expand_k, expand_v)
        self.head_k_dim, self.head_v_dim = self.key_dim // num_heads, self.value_dim // num_heads
        self.norm_q, self.norm_k = norm_q, norm_k
        self.do_feature_map_norm, self.eps = do_feature_map_norm, eps
        self.layer_idx = layer_idx
        self.feature_map_q = HedgehogFeatureMap(self.head_k_dim, joint_softmax, **kw)
        self.feature_map_k = self.feature_map_q if tie_feature_map_qk else \
            HedgehogFeatureMap(self.head_k_dim, joint_softmax, **kw)
        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False, **kw)
        self.k_proj = nn.Linear(hidden_size, self.key_dim // self.num_kv_groups, bias=False, **kw)
        self.v_proj = nn.Linear(hidden_size, self.value_dim // self.num_kv_groups, bias=False,
                                **kw)
        if output_norm == "rmsnorm":
            self.norm = RMSNorm(self.head_v_dim, norm_eps, elementwise_affine, **kw)
        elif output_norm == "identity":
            self.norm = nn.Identity()
        else:
            raise ValueError(f"output_norm must be 'rmsnorm' or 'identity', got {output_norm!r}")
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False, **kw)

    def state_shape(self) -> Tuple[int, ...]:
        return (self.num_heads, 2 * self.head_k_dim,
                self.head_v_dim + int(self.do_feature_map_norm))

    def _heads(self, x: Tensor, d: int) -> Tensor:
        return kv_heads(x, d, self.num_kv_groups)

    def _qk(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """Heads of q and k before the feature maps."""
        return split_heads(self.q_proj(x), self.num_heads), \
            self._heads(self.k_proj(x), self.head_k_dim)

    def _mix(self, x: Tensor, step: MixerStep):
        q, k = self._qk(x)
        v = self._heads(self.v_proj(x), self.head_v_dim)
        q, k = self.feature_map_q(q), self.feature_map_k(k)
        if self.norm_q:
            q = q / (q.sum(-1, keepdim=True) + 1e-4)
        if self.norm_k:
            k = k / (k.sum(-1, keepdim=True) + 1e-4)
        V = self.head_v_dim
        if self.do_feature_map_norm:
            v = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)
        k, v = apply_mask(k, step.mask), apply_mask(v, step.mask)
        fn = step.op(self, x, "chunk_linear_attn", "fused_recurrent_linear_attn")
        o, state = fn(q, k, v, initial_state=step.state, output_final_state=step.want_state,
                      cu_seqlens=step.cu_seqlens)
        if self.do_feature_map_norm:
            cd = compute_dtype(x)
            o = (o[..., :V].to(cd) / (o[..., V:].to(cd) + self.eps)).to(x.dtype)
        o = self.norm(o).reshape(*x.shape[:2], self.value_dim)
        return apply_mask(self.o_proj(o), step.mask), state

    def attention_distillation_loss(self, hidden_states: Tensor,
                                    attention_mask: Optional[Tensor] = None) -> Tensor:
        """Hedgehog's conversion loss on this layer's q / k projections (copied from the softmax
        model being converted): the student's normalised weights against the causal softmax
        weights softmax(q k^T / sqrt(head_k_dim)); q and k are detached, so only the feature maps
        get a gradient (the paper's first stage). Quadratic in T: use short sequences."""
        q, k = (t.detach() for t in self._qk(hidden_states))  # the backbone stays frozen
        return hedgehog_distillation_loss(q, k, self.feature_map_q, self.feature_map_k,
                                          causal=True, attention_mask=attention_mask)

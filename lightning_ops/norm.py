"""Gated LayerNorm / RMSNorm over the last dim, or over groups of it: the one implementation
behind lightning_ops.layers.RMSNorm (the output norm of the GLA / DeltaNet / Mamba-2 layers)
and the compat layer's mamba_ssm.ops.triton.layernorm_gated.

An element-wise op with one reduction per group, so plain PyTorch: autograd gives the
gradients of x, weight, bias and the gate, and torch.compile fuses it.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

__all__ = ["gated_norm"]


def _check(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], gate: Optional[Tensor],
           group_size: Optional[int]) -> int:
    """Validate the shapes; return the group size."""
    if x.dim() < 1:
        raise ValueError(f"x must have at least one dim (the normalised one), got shape "
                         f"{list(x.shape)}")
    n = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (n,):
            raise ValueError(f"{name} must have shape [{n}] (x's last dim), got "
                             f"{list(t.shape)}")
    if gate is not None:
        try:
            ok = torch.broadcast_shapes(gate.shape, x.shape) == x.shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"the gate z must have x's shape {list(x.shape)} (or broadcast "
                             f"to it), got {list(gate.shape)}")
    if group_size is None:
        return n
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int or None, got {group_size!r}")
    if n % group_size:
        raise ValueError(f"group_size {group_size} must divide x's last dim {n}")
    return group_size


def gated_norm(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               gate: Optional[Tensor] = None, eps: float = 1e-6,
               group_size: Optional[int] = None, norm_before_gate: bool = True,
               is_rms_norm: bool = True, activation: Callable[[Tensor], Tensor] = F.silu,
               compute_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Normalise x over its last dim, each run of `group_size` channels on its own (all of them
    when None), then scale by `weight` and shift by `bias` (both [N], optional):

        RMSNorm:   x / sqrt(mean(x^2) + eps)
        LayerNorm: (x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps)   (biased variance)

    With a gate (x's shape, or one that broadcasts to it): `norm_before_gate=True` returns
    norm(x) * activation(gate); False gates first, norm(x * activation(gate)). Everything
    (statistics, the weight, the bias and the gate) is computed in `compute_dtype`, by default
    float32 for 16-bit and float32 inputs and float64 for float64; the result is in x's dtype.
    Gradients come back in each input's own dtype.
    """
    g = _check(x, weight, bias, gate, group_size)
    cd = compute_dtype or torch.promote_types(x.dtype, torch.float32)
    h = x.to(cd)
    act = activation(gate.to(cd)) if gate is not None else None
    if act is not None and not norm_before_gate:
        h = h * act
    shape = h.shape
    hg = h.reshape(*shape[:-1], shape[-1] // g if g else 0, g)
    if not is_rms_norm:
        hg = hg - hg.mean(-1, keepdim=True)
    hg = hg * torch.rsqrt(hg.pow(2).mean(-1, keepdim=True) + eps)
    h = hg.reshape(shape)
    if weight is not None:
        h = h * weight.to(cd)
    if bias is not None:
        h = h + bias.to(cd)
    if act is not None and norm_before_gate:
        h = h * act
    return h.to(x.dtype)

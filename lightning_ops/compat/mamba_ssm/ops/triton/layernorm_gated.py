"""Mirror of `mamba_ssm.ops.triton.layernorm_gated` (lightning_ops.compat): the gated LayerNorm /
RMSNorm that mamba-ssm's Mamba2 imports as RMSNormGated, with mamba-ssm's names, signatures and
parameter names (`weight`, `bias`: its checkpoints load), computed by lightning_ops.norm.gated_norm
(the same function as lightning_ops.layers.RMSNorm).

Semantics as mamba-ssm's kernel: the gate z enters as silu(z), after the norm
(norm_before_gate=True: norm(x) * silu(z)) or before it (norm(x * silu(z))); group_size
normalises each run of that many channels of the last dim on its own; statistics, the gate,
the weight and the bias in float32, the output in x's dtype; gradients of x, weight, bias and
z in their own dtypes. Where we differ on purpose: float64 inputs are computed in float64 (the
kernel's arithmetic is float32 for every dtype); no 64 KB limit on the group size; weight may
be None; shape errors are ValueErrors naming the tensor (the kernel asserts).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_ops.compat._common import check_bool
from lightning_ops.norm import gated_norm

__all__ = ["layernorm_fn", "rmsnorm_fn", "rms_norm_ref", "LayerNorm", "RMSNorm"]


def layernorm_fn(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True,
                 is_rms_norm=False):
    """mamba_ssm.ops.triton.layernorm_gated.layernorm_fn: LayerNorm (RMSNorm when is_rms_norm)
    of x [..., N] over the last dim or its groups of group_size, times weight [N] plus bias [N]
    (or None), gated by silu(z) (z: x's shape, or None) after the norm when norm_before_gate,
    else before it. Returns a tensor of x's shape and dtype."""
    check_bool("layernorm_fn", "norm_before_gate", norm_before_gate)
    check_bool("layernorm_fn", "is_rms_norm", is_rms_norm)
    return gated_norm(x, weight, bias, z, eps, group_size, norm_before_gate, is_rms_norm)


def rmsnorm_fn(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
    """mamba_ssm.ops.triton.layernorm_gated.rmsnorm_fn: layernorm_fn with is_rms_norm=True."""
    return layernorm_fn(x, weight, bias, z, eps, group_size, norm_before_gate, True)


def rms_norm_ref(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True,
                 upcast=True):
    """mamba_ssm.ops.triton.layernorm_gated.rms_norm_ref, the reference of mamba-ssm's test,
    written out group by group (independent of gated_norm, so that test is no tautology).
    upcast=True computes x and z in float32 (float64 for float64 x); upcast=False keeps them in
    their own dtype: the "plain PyTorch in that dtype" baseline mamba-ssm's test measures
    against. The weight and bias are float32 (float64) either way, as mamba-ssm's."""
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    out_dtype = x.dtype
    if upcast:
        x = x.to(wide)
        z = None if z is None else z.to(wide)
    if z is not None and not norm_before_gate:
        x = x * F.silu(z)
    width = x.shape[-1] if group_size is None else group_size
    pieces = []
    for part in torch.split(x, width, dim=-1):
        mean_square = (part * part).sum(-1, keepdim=True) / part.shape[-1]
        pieces.append(part / torch.sqrt(mean_square + eps))
    y = torch.cat(pieces, dim=-1) * weight.to(wide)
    if bias is not None:
        y = y + bias.to(wide)
    if z is not None and norm_before_gate:
        y = y * F.silu(z)
    return y.to(out_dtype)


class _GatedNorm(nn.Module):
    """LayerNorm / RMSNorm with mamba-ssm's constructor: weight [hidden_size] (init 1) and, for
    LayerNorm, bias [hidden_size] (init 0); group_size=None is one group of hidden_size."""

    _rms = False

    def __init__(self, hidden_size, eps=1e-5, group_size=None, norm_before_gate=True,
                 device=None, dtype=None):
        super().__init__()
        if group_size is not None and (isinstance(group_size, bool)
                                       or not isinstance(group_size, int) or group_size <= 0
                                       or hidden_size % group_size):
            raise ValueError(f"group_size must be None or a positive divisor of hidden_size "
                             f"{hidden_size}, got {group_size!r}")
        factory = {"device": device, "dtype": dtype}
        self.eps = eps
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.weight = nn.Parameter(torch.empty(hidden_size, **factory))
        if self._rms:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(torch.empty(hidden_size, **factory))
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x, z=None):
        """norm(x) * silu(z) if norm_before_gate, else norm(x * silu(z)); plain norm(x)
        without z. x and z: [..., hidden_size]."""
        return layernorm_fn(x, self.weight, self.bias, z, self.eps, self.group_size,
                            self.norm_before_gate, self._rms)

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[0]}, eps={self.eps}, group_size={self.group_size}, "
                f"norm_before_gate={self.norm_before_gate}")


class LayerNorm(_GatedNorm):
    """mamba_ssm.ops.triton.layernorm_gated.LayerNorm: gated LayerNorm (GroupNorm over groups
    of group_size channels), parameters weight and bias."""

    _rms = False


class RMSNorm(_GatedNorm):
    """mamba_ssm.ops.triton.layernorm_gated.RMSNorm (Mamba2's RMSNormGated): gated RMSNorm,
    parameter weight (bias registered as None, as mamba-ssm)."""

    _rms = True

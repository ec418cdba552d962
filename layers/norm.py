"""RMSNorm, optionally gated (fla's FusedRMSNormGated, Mamba-2's RMSNormGated), in float32."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from lightning_ops.norm import gated_norm

from .utils import activation_fn

Tensor = torch.Tensor


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight over the last dim (or over groups of `group_size` channels).

    With a gate: `norm_before_gate=True` gives norm(x) * act(gate) (fla's output norm of GLA and
    Gated DeltaNet); `norm_before_gate=False` gives norm(x * act(gate)) (Mamba-2). Math in
    float32 (float64 for float64 inputs), output in x's dtype: lightning_ops.norm.gated_norm,
    which also serves mamba-ssm's gated LayerNorm / RMSNorm in lightning_ops.compat.

    Args:
        hidden_size: size of the normalised (last) dim.
        eps: added to the mean square.
        elementwise_affine: learn a per-channel weight (init 1).
        group_size: normalise each group of this many channels separately (default: all).
        gate_fn: activation of the gate ('swish', 'sigmoid', ...), used when a gate is passed.
        norm_before_gate: see above.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, elementwise_affine: bool = True,
                 group_size: Optional[int] = None, gate_fn: str = "swish",
                 norm_before_gate: bool = True, device=None, dtype=None):
        super().__init__()
        group_size = hidden_size if group_size is None else group_size
        if hidden_size % group_size:
            raise ValueError(f"group_size {group_size} must divide hidden_size {hidden_size}")
        self.hidden_size, self.eps, self.group_size = hidden_size, eps, group_size
        self.norm_before_gate = norm_before_gate
        self.gate_fn = gate_fn
        self._act = activation_fn(gate_fn)
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype)) \
            if elementwise_affine else None

    def forward(self, x: Tensor, gate: Optional[Tensor] = None) -> Tensor:
        return gated_norm(x, self.weight, None, gate, self.eps, self.group_size,
                          self.norm_before_gate, activation=self._act)

    def extra_repr(self) -> str:
        return (f"{self.hidden_size}, eps={self.eps}, group_size={self.group_size}, "
                f"affine={self.weight is not None}")

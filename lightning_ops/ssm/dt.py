"""Mamba-2's step size, one rule for every SSD path (torch and Triton backends, log-linear
Mamba-2, context parallel): dt (+ dt_bias), softplus if asked, clamped to dt_limit unless it is
the default (0, inf)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
NO_LIMIT = (0.0, float("inf"))


def effective_dt(dt: Tensor, dt_bias: Optional[Tensor], softplus: bool,
                 dt_limit: Tuple[float, float] = NO_LIMIT,
                 dtype: Optional[torch.dtype] = None) -> Tensor:
    """The step size the recurrence uses. dtype: compute in it (dt and dt_bias cast first);
    None keeps torch's type promotion of dt + dt_bias."""
    d = dt if dtype is None else dt.to(dtype)
    if dt_bias is not None:
        d = d + (dt_bias if dtype is None else dt_bias.to(dtype))
    if softplus:
        d = F.softplus(d)
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    if (lo, hi) != NO_LIMIT:
        d = d.clamp(lo, hi)
    return d

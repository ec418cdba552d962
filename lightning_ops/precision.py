"""The library's one accumulation-dtype rule: float64 inputs are computed (and their states kept)
in float64, every other dtype in float32."""
from __future__ import annotations

import torch


def accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32

"""The delta rule's in-kernel l2 normalisation of q and k (use_qk_l2norm_in_kernel), shared by
the torch and Triton backends: y = x / sqrt(|x|^2 + eps) over the last dim (reference.l2norm)."""
from __future__ import annotations

import torch

from ..chunk.constants import L2NORM_EPS

Tensor = torch.Tensor


def l2norm(x: Tensor):
    """(y, r) with r = 1 / sqrt(|x|^2 + eps), computed in x's dtype; r is kept for the backward."""
    r = torch.rsqrt((x * x).sum(-1, keepdim=True) + L2NORM_EPS)
    return x * r, r


def l2norm_backward(dy: Tensor, y: Tensor, r: Tensor) -> Tensor:
    """dx of y = x * r: dy/dx = r (I - y y^T)."""
    return r * (dy - y * (y * dy).sum(-1, keepdim=True))

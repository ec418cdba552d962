"""Small helpers shared by the torch.library custom-op wrappers of every family.

Custom ops cannot return None, so an absent optional output (a final state nobody asked for, the
gradient of an absent input) travels as an empty tensor; `none_if_empty` turns it back."""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch

Tensor = torch.Tensor


def empty_like_none(x: Optional[Tensor], ref: Tensor, dtype=None) -> Tensor:
    return ref.new_empty(0, dtype=dtype or ref.dtype) if x is None else x


def none_if_empty(x: Optional[Tensor]) -> Optional[Tensor]:
    return None if x is None or x.numel() == 0 and x.dim() == 1 else x


def grad_by_recompute(forward: Callable[..., Sequence[Optional[Tensor]]],
                      inputs: Sequence[Optional[Tensor]],
                      grads: Sequence[Optional[Tensor]]) -> Tuple[Optional[Tensor], ...]:
    """Gradients of forward(*inputs) w.r.t. every float input, by re-running it under autograd.
    The backward of backends that have no hand-written one (the torch path may recompute)."""
    detached = [x.detach().requires_grad_(x.is_floating_point())
                if isinstance(x, torch.Tensor) else x for x in inputs]
    with torch.enable_grad():
        outs = forward(*detached)
        pairs = [(o, g) for o, g in zip(outs, grads)
                 if o is not None and g is not None and o.requires_grad]
        wrt = [x for x in detached if isinstance(x, torch.Tensor) and x.requires_grad]
        got = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs],
                                  allow_unused=True) if pairs else [None] * len(wrt)
    it = iter(got)
    result = []
    for x in detached:
        if isinstance(x, torch.Tensor) and x.requires_grad:
            gx = next(it)
            result.append(torch.zeros_like(x) if gx is None else gx)
        else:
            result.append(None)
    return tuple(result)

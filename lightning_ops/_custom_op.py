"""Small helpers shared by the torch.library custom-op wrappers of every family.

Custom ops cannot return None, so an absent optional output (a final state nobody asked for, the
gradient of an absent input) travels as an empty tensor; `none_if_empty` turns it back."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, Sequence, Tuple

import torch

Tensor = torch.Tensor


def empty_like_none(x: Optional[Tensor], ref: Tensor, dtype=None) -> Tensor:
    return ref.new_empty(0, dtype=dtype or ref.dtype) if x is None else x


def contiguous(*xs: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
    """Dense copies (no-ops for dense inputs) of the tensors a custom op takes: kernels index
    dense memory, and the backward fakes (empty_like) must match the real, dense gradients."""
    return tuple(None if x is None else x.contiguous() for x in xs)


def none_if_empty(x: Optional[Tensor]) -> Optional[Tensor]:
    return None if x is None or x.numel() == 0 and x.dim() == 1 else x


@contextlib.contextmanager
def autograd_enabled() -> Iterator[None]:
    """Custom-op implementations run below the Autograd dispatch key, where even
    torch.enable_grad() records nothing. Re-admit the autograd keys for a backward that
    differentiates a recomputed forward."""
    include = torch._C._dispatch_tls_local_include_set()
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.AutogradOther,
                torch._C.DispatchKey.AutogradNestedTensor):
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(include, exclude), torch.enable_grad():
        yield


def own_storage(ts: Sequence[Optional[Tensor]]) -> Tuple[Optional[Tensor], ...]:
    """Custom-op outputs may neither alias each other nor be views (the fake impls return fresh
    tensors): copy views, e.g. two slices of one concatenation's gradient."""
    def owns(t):
        return t._base is None and t.storage_offset() == 0 and \
            t.untyped_storage().nbytes() == t.numel() * t.element_size()
    return tuple(t if t is None or owns(t) else t.clone() for t in ts)


def grad_by_recompute(forward: Callable[..., Sequence[Optional[Tensor]]],
                      inputs: Sequence[Optional[Tensor]],
                      grads: Sequence[Optional[Tensor]]) -> Tuple[Optional[Tensor], ...]:
    """Gradients of forward(*inputs) w.r.t. every float input, by re-running it under autograd.
    The backward of backends that have no hand-written one (the torch path may recompute)."""
    detached = [x.detach().requires_grad_(x.is_floating_point())
                if isinstance(x, torch.Tensor) else x for x in inputs]
    with autograd_enabled():
        outs = forward(*detached)
        pairs = [(o, g) for o, g in zip(outs, grads) if o is not None and g is not None]
        if any(not o.requires_grad for o, _ in pairs):  # never hand back silent zeros
            raise RuntimeError("grad_by_recompute: the recomputed forward recorded no graph")
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
    return own_storage(result)

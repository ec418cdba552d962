"""Small helpers shared by the torch.library custom-op wrappers of every family.

Custom ops cannot return None, so an absent optional output (a final state nobody asked for, the
gradient of an absent input) travels as an empty tensor; `none_if_empty` turns it back."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, Sequence, Tuple

import torch

Tensor = torch.Tensor


PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def plain_eager(tensors: Sequence[object]) -> bool:
    """Plain eager mode: not compiling, no dispatch or function mode (fake tensors, make_fx,
    selective checkpointing), no functorch transform (vmap, torch.func.grad), and every tensor a
    plain CPU/CUDA tensor (no subclass such as DTensor, no meta tensor)."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() or \
            torch._C._is_torch_function_mode_enabled() or \
            torch._C._functorch.maybe_current_level() is not None:
        return False
    for t in tensors:
        if isinstance(t, torch.Tensor) and (type(t) not in PLAIN_TENSORS or t.is_meta):
            return False
    return True


def eager_direct(tensors: Sequence[Optional[Tensor]]) -> bool:
    """May an op call its implementation directly instead of through its custom op (whose
    dispatch costs more than a small step on the CPU)? Only in plain eager mode (plain_eager)
    with no tensor needing autograd. Everything else (torch.compile, fake tensors, subclasses,
    gradients) takes the custom op."""
    if not plain_eager(tensors):
        return False
    if torch.is_grad_enabled():
        for t in tensors:
            if t is not None and t.requires_grad:
                return False
    return True


def autocast_device(tensors: Sequence[Tensor]) -> Optional[str]:
    """The device type whose autocast is on for these tensors, or None (the common case)."""
    if not tensors:
        return None
    dev = tensors[0].device.type
    try:
        return dev if torch.is_autocast_enabled(dev) else None
    except RuntimeError:  # a device type without autocast (meta)
        return None


def without_autocast(dev: str, fn, *args):
    """fn(*args) with autocast off: an op computes in its inputs' dtypes and its own
    accumulation dtype (the numerics contract), as the peers' kernels do; autocast would lower
    the matmuls inside a torch-backend body to 16 bits."""
    with torch.autocast(dev, enabled=False):
        return fn(*args)


def autocast_off(tensors: Sequence[Tensor], fn, *args):
    """fn(*args), under without_autocast when autocast is on for these tensors' device."""
    dev = autocast_device(tensors)
    return fn(*args) if dev is None else without_autocast(dev, fn, *args)


def call_op(op, *args):
    """op(*args) for a custom op without autograd of its own (a backward op): its Python body
    directly in plain eager mode when nothing needs a gradient (eager_direct), else through the
    dispatcher (torch.compile, fake tensors, and double backward, which then meets
    forbid_double_backward's error)."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    return autocast_off(tensors, op._init_fn if eager_direct(tensors) else op, *args)


def register_autograd(op, backward: Callable, setup_context: Callable) -> Callable:
    """op.register_autograd(backward, setup_context) and return the caller the public functions
    use instead of op: in plain eager mode (plain_eager) it runs op's Python body directly,
    wrapped in a torch.autograd.Function built from the same setup_context and backward when a
    tensor needs a gradient. torch.library's dispatch of a custom op (defaults filled in,
    redispatch, its generated autograd node) costs several hundred microseconds per forward and
    backward on the CPU, as much as a whole small op; torch.compile, fake tensors, tensor
    subclasses and functorch transforms still see the custom op, so the two paths compute the
    same thing with the same code. Either way the op runs with autocast off (without_autocast).
    Arguments are positional (all of them)."""
    op.register_autograd(backward, setup_context=setup_context)
    body = op._init_fn

    def forward(ctx, *args):
        # the ctx-taking form: Function.apply binds a separate setup_context's arguments with
        # inspect.signature on every call (~0.1 ms); functorch, which needs that form, takes
        # the custom op instead
        out = body(*args)
        setup_context(ctx, args, out)
        return out

    eager_fn = type(f"{body.__name__}_eager", (torch.autograd.Function,), {
        "forward": staticmethod(forward), "backward": staticmethod(backward)})

    def call(*args):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if not plain_eager(tensors):
            fn = op
        elif torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            fn = eager_fn.apply
        else:
            fn = body
        return autocast_off(tensors, fn, *args)
    return call


def empty_like_none(x: Optional[Tensor], ref: Tensor, dtype=None) -> Tensor:
    return ref.new_empty(0, dtype=dtype or ref.dtype) if x is None else x


def contiguous(*xs: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
    """Dense copies (no-ops for dense inputs) of the tensors a custom op takes: kernels index
    dense memory, and the backward fakes (empty_like) must match the real, dense gradients."""
    return tuple(None if x is None else x.contiguous() for x in xs)


def none_if_empty(x: Optional[Tensor]) -> Optional[Tensor]:
    return None if x is None or x.numel() == 0 and x.dim() == 1 else x


def grad_if_present(grad: Optional[Tensor], x: Optional[Tensor]) -> Optional[Tensor]:
    """The gradient of an optional input: None when the input was absent (the placeholder),
    else the gradient as computed, even when empty (an input with a zero dim, e.g. D [0] for
    H = 0, gets its [0] gradient; none_if_empty would take it for the placeholder)."""
    return None if x is None else grad


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


def is_empty(*xs: Optional[Tensor]) -> bool:
    """Whether any given tensor has no elements (a zero batch, head or length dim). The custom-op
    bodies answer such calls themselves (zeros, states passed through), so no backend ever sees
    an empty launch. Runs on real tensors (op bodies), so the sizes are plain ints."""
    return any(x is not None and x.numel() == 0 for x in xs)


def passthrough_state(initial_state: Optional[Tensor], shape, ref: Tensor, dtype,
                      want: bool) -> Tensor:
    """The final state of a call with no tokens: the initial state (as the state dtype, in fresh
    memory: custom-op outputs must not alias inputs), or zeros; an empty tensor if not wanted."""
    if not want:
        return ref.new_empty(0, dtype=dtype)
    if initial_state is None:
        return ref.new_zeros(shape, dtype=dtype)
    return initial_state.to(dtype=dtype, copy=True)


def passthrough_grad(dfinal: Optional[Tensor], initial_state: Optional[Tensor],
                     ref: Tensor) -> Tensor:
    """d initial_state of a call with no tokens: d final_state (or zeros), in initial_state's
    dtype; an empty tensor when there is no initial state."""
    if initial_state is None:
        return ref.new_empty(0)
    if dfinal is None or dfinal.numel() == 0:
        return torch.zeros_like(initial_state)
    return dfinal.to(dtype=initial_state.dtype, copy=True)


def zeros_or_empty(x: Optional[Tensor], ref: Tensor) -> Tensor:
    """The zero gradient of x, or the empty placeholder when x is absent."""
    return ref.new_empty(0) if x is None else torch.zeros_like(x)


class DoubleBackwardError(NotImplementedError):
    """A gradient of a gradient was asked of an op whose backward is not differentiable."""


def forbid_double_backward(backward_op, describe: Callable[[Sequence], str]) -> None:
    """Give a backward custom op an autograd formula that raises a clear error: double backward
    (torch.autograd.grad(..., create_graph=True), then a gradient of that gradient) is not
    supported. describe(inputs of the backward op) names the public op. Without this, PyTorch
    says only that no autograd formula was registered for an internal op."""
    def setup(ctx, inputs, output):
        ctx.op_name = describe(inputs)

    def backward(ctx, *grads):
        raise DoubleBackwardError(
            f"{ctx.op_name}: double backward is not supported (a gradient of a gradient, e.g. "
            f"torch.autograd.grad(..., create_graph=True) and then differentiating that "
            f"gradient). First-order gradients work; compute second-order terms another way.")

    backward_op.register_autograd(backward, setup_context=setup)

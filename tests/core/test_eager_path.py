"""The plain-eager path of the custom ops (_custom_op.register_autograd / call_op): in plain eager
mode a public op runs its custom op's Python body directly (an autograd.Function when a gradient
is needed), skipping torch.library's dispatch; anything else (a torch-function or dispatch mode,
torch.compile, functorch) takes the custom op. Both paths run the same code: outputs and every
gradient are bitwise equal, double backward still raises the op's own error."""
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch._library.custom_ops import CustomOpDef

import lightning_ops as lo
from lightning_ops._custom_op import DoubleBackwardError
from test_all_ops_custom import CASES as ALL_CASES, _leaves, _outputs


def _extra_cases():
    g = torch.Generator().manual_seed(1)
    B, T, H, K, V, L = 1, 21, 2, 8, 6, 5

    def r(*s, neg=False):
        x = torch.randn(*s, generator=g, dtype=torch.float64)
        return -x.abs() * 0.3 if neg else x
    q, k, v = r(B, T, H, K), r(B, T, H, K), r(B, T, H, V)
    return {
        "chunk_simple_gla": (lo.chunk_simple_gla, (q, k, v),
                             dict(g=r(B, T, H, neg=True), initial_state=r(B, H, K, V),
                                  output_final_state=True), True),
        "lightning_attn": (lo.lightning_attn, (q, k, v, torch.rand(H, dtype=torch.float64)),
                           dict(output_final_state=True), True),
        "chunk_log_linear_attn": (lo.chunk_log_linear_attn,
                                  (q, k, v, r(B, T, H, neg=True), r(B, T, H, L).abs()),
                                  dict(output_final_state=True), True),
        "chunk_log_linear_gated_delta_rule": (
            lo.chunk_log_linear_gated_delta_rule,
            (q, k, v, r(B, T, H, neg=True), r(B, T, H, L).abs(),
             torch.rand(B, T, H, generator=g, dtype=torch.float64)),
            dict(output_final_state=True), True),
    }


CASES = {**{n: c for n, c in ALL_CASES.items() if c[3]}, **_extra_cases()}


class _Passthrough(TorchFunctionMode):
    """A torch-function mode that changes nothing but makes the ops take their custom ops."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.fixture
def op_calls(monkeypatch):
    """Counts calls of any torch.library custom op (CustomOpDef.__call__)."""
    calls = []
    orig = CustomOpDef.__call__

    def counting(self, *args, **kwargs):
        calls.append(self._qualname)
        return orig(self, *args, **kwargs)
    monkeypatch.setattr(CustomOpDef, "__call__", counting)
    return calls


def _run(name, mode=None, dtype=None):
    fn, args, kwargs, _ = CASES[name]
    if dtype is not None:
        args = [x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                for x in args]
        kwargs = {n: x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                  for n, x in kwargs.items()}
    a, kw = _leaves(args, kwargs, True)
    ctx = mode if mode is not None else torch.autograd.graph.saved_tensors_hooks(
        lambda t: t, lambda t: t)  # a no-op context: plain eager
    with ctx:
        outs = [t for o in _outputs(fn(*a, **kw))
                for t in (o if isinstance(o, tuple) else (o,))]  # a state tuple: its tensors
        loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum()
                   for o in outs if o.is_floating_point())
        loss.backward()
    grads = [x.grad for x in list(a) + list(kw.values())
             if isinstance(x, torch.Tensor) and x.grad is not None]
    return [o.detach() for o in outs], grads


@pytest.mark.parametrize("name", sorted(CASES))
def test_eager_path_equals_custom_op_path(name, op_calls):
    outs, grads = _run(name)
    assert not op_calls, f"{name}: plain eager mode went through custom ops {op_calls}"
    outs_c, grads_c = _run(name, _Passthrough())
    assert op_calls, f"{name}: under a torch-function mode no custom op was called"
    assert len(outs) == len(outs_c) and len(grads) == len(grads_c) and grads
    for i, (a, b) in enumerate(zip(outs + grads, outs_c + grads_c)):
        assert torch.equal(a, b), f"{name}[{i}]: eager and custom-op paths differ"


@pytest.mark.parametrize("name", ["chunk_simple_gla", "selective_scan_fn",
                                  "chunk_gated_delta_rule"])
def test_eager_path_double_backward_raises(name):
    fn, args, kwargs, _ = CASES[name]
    a, kw = _leaves(args, kwargs, True)
    outs = _outputs(fn(*a, **kw))
    x = a[0]
    (gx,) = torch.autograd.grad(outs[0].square().sum(), x, create_graph=True)
    with pytest.raises(DoubleBackwardError, match="double backward"):
        gx.sum().backward()


def test_eager_inference_calls_no_custom_op(op_calls):
    x = torch.randn(2, 4, 9)
    w = torch.randn(4, 4)
    with torch.no_grad():
        lo.causal_conv1d_fn(x, w, activation="silu")
    lo.chunk_simple_gla(torch.randn(1, 5, 2, 8), torch.randn(1, 5, 2, 8), torch.randn(1, 5, 2, 4),
                        g=-torch.rand(1, 5, 2))
    assert not op_calls


def test_meta_tensors_take_the_custom_op(op_calls):
    y = lo.causal_conv1d_fn(torch.empty(2, 4, 9, device="meta"),
                            torch.empty(4, 4, device="meta"), activation="silu")
    assert y.shape == (2, 4, 9) and y.device.type == "meta"
    assert op_calls == ["lightning_ops::causal_conv1d"]


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("path", ["eager", "custom_op"])
def test_autocast_does_not_lower_the_ops_precision(name, path):
    """Under torch.autocast an op still computes in its inputs' dtypes (the peers' kernels ignore
    autocast too): outputs and gradients equal those of a run without autocast. float32 inputs
    (autocast leaves float64 alone): it would round the torch bodies' matmuls to bfloat16."""
    mode = _Passthrough() if path == "custom_op" else None
    plain = _run(name, mode, torch.float32)

    class _Autocast(torch.autocast):
        def __init__(self):
            super().__init__("cpu", dtype=torch.bfloat16)

        def __enter__(self):
            super().__enter__()
            if mode is not None:
                mode.__enter__()

        def __exit__(self, *exc):
            if mode is not None:
                mode.__exit__(*exc)
            return super().__exit__(*exc)
    cast = _run(name, _Autocast(), torch.float32)
    for i, (a, b) in enumerate(zip(plain[0] + plain[1], cast[0] + cast[1])):
        assert torch.equal(a, b), f"{name}[{i}]: autocast changed the result"


def test_autocast_leaves_the_decode_steps_alone():
    """The in-place decode steps (their own fast paths) under autocast: same output and state."""
    g = torch.Generator().manual_seed(3)
    b, h, p, n = 2, 3, 16, 32
    state, x = torch.randn(b, h, p, n, generator=g), torch.randn(b, h, p, generator=g)
    dt, A = torch.rand(b, h, p, generator=g), -torch.rand(h, p, n, generator=g)
    B, C, D = (torch.randn(*s, generator=g) for s in ((b, 1, n), (b, 1, n), (h, p)))
    xc, cs, w = (torch.randn(*s, generator=g) for s in ((2, 8), (2, 8, 3), (8, 4)))
    outs = []
    for cast in (False, True):
        s, c = state.clone(), cs.clone()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cast):
            outs.append((lo.selective_state_update(s, x, dt, A, B, C, D=D), s,
                         lo.causal_conv1d_update(xc, c, w, None, "silu"), c))
    for a, c in zip(*outs):
        assert torch.equal(a, c)


def test_conv_eager_path_is_autograd_of_the_conv():
    """causal_conv1d_fn in plain eager mode (torch backend) is autograd through F.conv1d and
    SiLU (as causal-conv1d's reference): gradients equal the custom op's, and a second-order
    gradient (which the custom op refuses) equals the reference composite's."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, 11, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(6, 4, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True)
    y = lo.causal_conv1d_fn(x, w, b, activation="silu")
    assert "Silu" in type(y.grad_fn).__name__
    ref = torch.nn.functional.silu(
        torch.nn.functional.conv1d(x, w[:, None, :], b, padding=3, groups=6)[..., :11])
    for out in (y, ref):
        (gx,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        out._g2 = torch.autograd.grad(gx.square().sum(), (x, w, b))
    for a, c in zip(y._g2, ref._g2):
        assert torch.allclose(a, c, rtol=1e-12, atol=1e-12)

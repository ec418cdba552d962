"""Every public op of every family: the custom ops it calls pass torch.library.opcheck, and
torch.compile(fullgraph=True) runs it forward and backward (no graph break) matching eager."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lightning_ops as lo
from helpers import assert_close


def _r(g, *shape, neg=False):
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    return -x.abs() * 0.3 if neg else x


def _cases():
    """name -> (fn, args (leaves that take grad are float tensors marked below), kwargs,
    names of grad-taking args, differentiable?)."""
    g = torch.Generator().manual_seed(0)
    B, T, H, K, V = 1, 13, 2, 8, 6
    q, k, v = _r(g, B, T, H, K), _r(g, B, T, H, K), _r(g, B, T, H, V)
    beta = torch.rand(B, T, H, generator=g, dtype=torch.float64)
    gs = _r(g, B, T, H, neg=True)
    h0 = _r(g, B, H, K, V)
    b, d, L, n = 2, 4, 11, 3
    u, delta = _r(g, b, d, L), torch.rand(b, d, L, generator=g, dtype=torch.float64)
    A = _r(g, d, n, neg=True)
    Bm, Cm = _r(g, b, n, L), _r(g, b, n, L)
    l, h, p, ng, sn = 12, 2, 4, 1, 3
    x, dt = _r(g, b, l, h, p), torch.rand(b, l, h, generator=g, dtype=torch.float64)
    Ah = _r(g, h, neg=True)
    Bs, Cs = _r(g, b, l, ng, sn), _r(g, b, l, ng, sn)
    xc, w = _r(g, b, d, L), _r(g, d, 4)
    state = _r(g, b, h, p, sn)
    conv_state = _r(g, b, d, 3)
    return {
        "chunk_gla": (lo.chunk_gla, (q, k, v, _r(g, B, T, H, K, neg=True)),
                      dict(initial_state=h0, output_final_state=True), True),
        "chunk_delta_rule": (lo.chunk_delta_rule, (q, k, v, beta),
                             dict(initial_state=h0, output_final_state=True,
                                  use_qk_l2norm_in_kernel=True), True),
        "chunk_gated_delta_rule": (lo.chunk_gated_delta_rule, (q, k, v, gs, beta),
                                   dict(initial_state=h0, output_final_state=True), True),
        "chunk_kda": (lo.chunk_kda, (q, k, v, _r(g, B, T, H, K, neg=True), beta),
                      dict(initial_state=h0, output_final_state=True,
                           use_qk_l2norm_in_kernel=True), True),
        "fused_recurrent_kda": (lo.fused_recurrent_kda,
                                (q, k, v, _r(g, B, T, H, K, neg=True), beta),
                                dict(initial_state=h0, output_final_state=True), True),
        "fused_recurrent_delta_rule": (lo.fused_recurrent_delta_rule, (q, k, v, beta),
                                       dict(initial_state=h0, output_final_state=True), True),
        "fused_recurrent_gated_delta_rule": (lo.fused_recurrent_gated_delta_rule,
                                             (q, k, v, gs, beta),
                                             dict(initial_state=h0, output_final_state=True),
                                             True),
        "selective_scan_fn": (lo.selective_scan_fn, (u, delta, A, Bm, Cm),
                              dict(D=_r(g, d), z=_r(g, b, d, L), delta_bias=_r(g, d),
                                   delta_softplus=True, return_last_state=True), True),
        "mamba_chunk_scan_combined": (lo.mamba_chunk_scan_combined, (x, dt, Ah, Bs, Cs, 4),
                                      dict(D=_r(g, h), dt_bias=_r(g, h), dt_softplus=True,
                                           initial_states=_r(g, b, h, p, sn),
                                           return_final_states=True), True),
        "causal_conv1d_fn": (lo.causal_conv1d_fn, (xc, w),
                             dict(bias=_r(g, d), initial_states=_r(g, b, d, 3),
                                  return_final_states=True, activation="silu"), True),
        "selective_state_update": (lo.selective_state_update,
                                   (state, _r(g, b, h, p), torch.rand(b, h, p, dtype=torch.float64),
                                    _r(g, h, p, sn, neg=True), _r(g, b, ng, sn), _r(g, b, ng, sn)),
                                   dict(D=_r(g, h, p), dt_softplus=True), False),
        "causal_conv1d_update": (lo.causal_conv1d_update, (_r(g, b, d), conv_state, w),
                                 dict(activation="silu"), False),
    }


CASES = _cases()


class _Recorder(TorchDispatchMode):
    """Records every lightning_ops custom-op call (op overload, args, kwargs)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "lightning_ops":
            self.calls.append((func, args, kwargs or {}))
        return func(*args, **(kwargs or {}))


def _leaves(args, kwargs, differentiable):
    def leaf(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t.detach().clone().requires_grad_(differentiable)
        return t
    return [leaf(a) for a in args], {n: leaf(t) for n, t in kwargs.items()}


def _outputs(res):
    return [t for t in (res if isinstance(res, tuple) else (res,)) if t is not None]


@pytest.mark.parametrize("name", sorted(CASES))
def test_opcheck(name):
    fn, args, kwargs, diff = CASES[name]
    a, kw = _leaves(args, kwargs, diff)
    with _Recorder() as rec:
        fn(*a, **kw)
    assert rec.calls, f"{name} called no lightning_ops custom op"
    for op, cargs, ckw in rec.calls:
        cargs = [x.detach().clone().requires_grad_(x.requires_grad)
                 if isinstance(x, torch.Tensor) else x for x in cargs]
        torch.library.opcheck(op, cargs, ckw)


@pytest.mark.parametrize("name", sorted(CASES))
def test_compile_fullgraph(name):
    fn, args, kwargs, diff = CASES[name]
    torch._dynamo.reset()

    def run(f):
        a, kw = _leaves(args, kwargs, diff)
        outs = _outputs(f(*a, **kw))
        res = [o.detach() for o in outs]
        if diff:
            sum(o.square().sum() for o in outs).backward()
            res += [x.grad for x in list(a) + list(kw.values())
                    if isinstance(x, torch.Tensor) and x.grad is not None]
        else:  # in-place decode ops: the mutated state is an output too
            res += [x.detach() for x in a if isinstance(x, torch.Tensor) and x.dim() >= 3]
        return res

    eager = run(fn)
    compiled = run(torch.compile(lambda *a, **kw: fn(*a, **kw), fullgraph=True,
                                 backend="aot_eager"))
    assert len(compiled) == len(eager)
    for i, (c, e) in enumerate(zip(compiled, eager)):
        assert_close(f"{name}[{i}]", c, e, 1e-10)


@pytest.mark.parametrize("name", ["chunk_gated_delta_rule", "mamba_chunk_scan_combined",
                                  "selective_scan_fn", "causal_conv1d_fn", "chunk_gla"])
def test_compile_with_non_contiguous_inputs(name):
    """Transposed-but-dense inputs (a common result of projections + rearrange) must compile:
    the backward fakes and the real gradients agree on strides."""
    fn, args, kwargs, _ = CASES[name]
    torch._dynamo.reset()

    def strided(t):  # same values, dense but not contiguous ([B,H,T,K] -> [B,T,H,K] style)
        if not isinstance(t, torch.Tensor) or t.dim() < 2:
            return t
        d = 1 if t.dim() >= 3 else 0
        return t.transpose(d, d + 1).contiguous().transpose(d, d + 1).detach().requires_grad_()

    def run(f):
        a, kw = _leaves(args, kwargs, True)
        a, kw = [strided(x) for x in a], {n: strided(t) for n, t in kw.items()}
        assert any(isinstance(x, torch.Tensor) and not x.is_contiguous() for x in a)
        outs = _outputs(f(*a, **kw))
        sum(o.square().sum() for o in outs).backward()
        return [o.detach() for o in outs] + [x.grad for x in a
                                             if isinstance(x, torch.Tensor) and x.grad is not None]

    eager = run(fn)
    # inductor: it asserts the strides the fakes promise (aot_eager does not)
    compiled = run(torch.compile(lambda *a, **kw: fn(*a, **kw), fullgraph=True))
    for i, (c, e) in enumerate(zip(compiled, eager)):
        assert_close(f"{name}[{i}]", c, e, 1e-8)

"""Every public op is a torch.library custom op: opcheck passes, and torch.compile(fullgraph=True)
runs forward and backward with no graph break, matching eager."""
import pytest
import torch

import lightning_ops as lo
from helpers import assert_close, leaf_copies

B, T, H, K, V = 1, 19, 2, 8, 6


def _gla_family_cases():
    g = torch.Generator().manual_seed(0)

    def r(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    q, k, v = r(B, T, H, K), r(B, T, H, K), r(B, T, H, V)
    gs = -torch.rand(B, T, H, generator=g, dtype=torch.float64)
    gv = -torch.rand(B, T, H, K, generator=g, dtype=torch.float64)
    h0 = r(B, H, K, V)
    slope = torch.rand(H, generator=g, dtype=torch.float64)
    return {
        "chunk_linear_attn": (lo.chunk_linear_attn, (q, k, v), {}),
        "chunk_simple_gla": (lo.chunk_simple_gla, (q, k, v), {"g": gs, "g_gamma": -slope}),
        "lightning_attn": (lo.lightning_attn, (q, k, v, slope), {}),
        "chunk_gla": (lo.chunk_gla, (q, k, v, gv), {}),
        "fused_recurrent_linear_attn": (lo.fused_recurrent_linear_attn, (q, k, v), {}),
        "fused_recurrent_simple_gla": (lo.fused_recurrent_simple_gla, (q, k, v), {"g": gs}),
        "fused_recurrent_lightning_attn": (lo.fused_recurrent_lightning_attn, (q, k, v, slope), {}),
        "fused_recurrent_gla": (lo.fused_recurrent_gla, (q, k, v, gv), {}),
    }, h0


GLA_CASES, _ = _gla_family_cases()


def _grad_inputs(args, kwargs, h0):
    """Leaf copies of the float inputs that take gradients (slope / g_gamma do not)."""
    args = [a.detach().clone().requires_grad_(i < 3 or a.dim() == 4 or a.dim() == 3)
            for i, a in enumerate(args)]
    kwargs = {n: (t.detach().clone().requires_grad_(n == "g")) for n, t in kwargs.items()}
    return args, kwargs, h0.detach().clone().requires_grad_()


@pytest.mark.parametrize("name", sorted(GLA_CASES))
def test_gla_family_compiles_fullgraph_fwd_bwd(name):
    fn, args, kwargs = GLA_CASES[name]
    _, h0 = _gla_family_cases()
    torch._dynamo.reset()

    def run(f):
        a, kw, s0 = _grad_inputs(args, kwargs, h0)
        o, ht = f(*a, initial_state=s0, output_final_state=True, **kw)
        (o.square().sum() + ht.sum()).backward()
        leaves = [x for x in list(a) + list(kw.values()) + [s0] if x.requires_grad]
        return [o, ht] + [x.grad for x in leaves]

    eager = run(fn)
    compiled = run(torch.compile(lambda *a, **kw: fn(*a, **kw), fullgraph=True, backend="aot_eager"))
    for i, (c, e) in enumerate(zip(compiled, eager)):
        assert_close(f"{name}[{i}]", c, e, 1e-12)


def test_gla_family_opcheck():
    from lightning_ops.gla.ops import _gla_fwd
    cases, h0 = _gla_family_cases()
    q, k, v = cases["chunk_gla"][1][:3]
    gv = cases["chunk_gla"][1][3]
    gs = cases["chunk_simple_gla"][2]["g"]
    gamma = cases["chunk_simple_gla"][2]["g_gamma"]
    cu = torch.tensor([0, 5, 6, 19], dtype=torch.int64)
    h0n = torch.randn(3, H, K, V, dtype=torch.float64)
    for args in [
        (*leaf_copies([q, k, v]), None, None, None, None, 0.5, False, "chunk", "torch"),
        (*leaf_copies([q, k, v, gv]), None, *leaf_copies([h0]), None, 0.3, True, "chunk",
         "torch"),
        (*leaf_copies([q, k, v, gs]), gamma, *leaf_copies([h0n]), cu, 0.3, True, "recurrent",
         "torch"),
    ]:
        torch.library.opcheck(_gla_fwd, args)


def test_inductor_compiles_chunk_gla():
    """The default torch.compile backend (inductor) too, not only aot_eager."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 11, 2, 8, generator=g, requires_grad=True) for _ in range(3))
    gate = (-torch.rand(1, 11, 2, 8, generator=g)).requires_grad_()
    f = torch.compile(lambda *a: lo.chunk_gla(*a)[0], fullgraph=True)
    o = f(q, k, v, gate)
    o.sum().backward()
    ref = lo.chunk_gla(q, k, v, gate)[0]
    assert_close("o", o.detach(), ref.detach(), 1e-5)
    assert q.grad is not None and gate.grad is not None

"""chunk_log_linear_attn is a torch.library custom op (lightning_ops::log_linear_attn, fake impl +
autograd): opcheck passes (schema, fake tensors, autograd registration) with and without states,
varlen and empty inputs; torch.compile(fullgraph=True) runs forward and backward with no graph
break and matches eager bit for bit; hmamba_chunk_scan_combined compiles through it too."""
import pytest
import torch

from lightning_ops.loglinear import chunk_log_linear_attn, hmamba_chunk_scan_combined
from lightning_ops.loglinear.ops import _ll_bwd, _ll_fwd

F64 = torch.float64


def _args(B=2, T=9, G=1, H=2, K=3, V=4, L=5, offsets=(0, 5), cu=None, seed=0, grad=True):
    gen = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=gen, dtype=F64)  # noqa: E731
    N = B if cu is None else len(cu) - 1
    q, k, v = rn(B, T, G, K), rn(B, T, G, K), rn(B, T, H, V)
    g = -0.5 * torch.rand(B, T, H, generator=gen, dtype=F64)
    lam = torch.rand(B, T, H, L, generator=gen, dtype=F64)
    h0 = off = None
    if offsets is not None:
        h0, off = rn(N, H, L, K, V), torch.tensor(offsets, dtype=torch.int64)
    xs = [q, k, v, g, lam, h0]
    if grad:
        xs = [None if x is None else x.requires_grad_() for x in xs]
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int64)
    return (*xs, off, cu)


OPCHECK = {
    "states": dict(),
    "no-state": dict(offsets=None),
    "gqa": dict(G=1, H=3, offsets=(3, 0)),
    "varlen": dict(B=1, T=9, cu=[0, 4, 4, 9], offsets=(0, 2, 7)),
    "empty-T": dict(T=0),
    "empty-H": dict(H=0, G=0, offsets=None),
}


@pytest.mark.parametrize("case", list(OPCHECK))
@pytest.mark.parametrize("want", [True, False], ids=["final", "no-final"])
def test_opcheck(case, want):
    kw = OPCHECK[case]
    if case == "empty-H":  # G = 0 is rejected by the wrapper; the op itself answers H = 0
        args = _args(**{**kw, "G": 1})
        q, k, v, g, lam = args[:5]
        v, g, lam = (x.detach()[:, :, :0].requires_grad_() for x in (v, g, lam))
        q, k = (x.detach()[:, :, :0].requires_grad_() for x in (q, k))
        args = (q, k, v, g, lam, *args[5:])
    else:
        args = _args(**kw)
    torch.library.opcheck(_ll_fwd, (*args, 1.0, want, 4))


def test_opcheck_backward_op():
    q, k, v, g, lam, h0, off, cu = _args(grad=False)
    do = torch.randn_like(v)
    dht = torch.randn(2, 2, 5, 3, 4, dtype=F64)
    torch.library.opcheck(_ll_bwd, (do, dht, q, k, v, g, lam, h0, off, cu, 0.5, 4),
                          test_utils=("test_schema", "test_faketensor"))


def _fwd_bwd(fn, args):
    q, k, v, g, lam, h0, off, cu = [None if x is None else
                                    (x.detach().clone().requires_grad_()
                                     if x.is_floating_point() else x.clone()) for x in args]
    o, (ht, offsets) = fn(q, k, v, g, lam, h0, off, cu)
    gen = torch.Generator().manual_seed(7)
    ((o * torch.randn(o.shape, generator=gen, dtype=F64)).sum()
     + (ht * torch.randn(ht.shape, generator=gen, dtype=F64)).sum()).backward()
    return [o, ht, offsets] + [x.grad for x in (q, k, v, g, lam, h0)]


@pytest.mark.parametrize("case", ["states", "varlen"])
def test_compile_fullgraph_forward_backward_matches_eager(case):
    torch._dynamo.reset()
    args = _args(**OPCHECK[case])

    def f(q, k, v, g, lam, h0, off, cu):
        return chunk_log_linear_attn(q, k, v, g, lam, (h0, off), True, cu, scale=0.5,
                                     chunk_size=4)

    eager = _fwd_bwd(f, args)
    comp = _fwd_bwd(torch.compile(f, fullgraph=True, backend="aot_eager"), args)
    for i, (a, b) in enumerate(zip(eager, comp)):
        assert torch.equal(a, b), i


def test_compile_fullgraph_hmamba_scan():
    """The log-linear Mamba-2 scan (the layer's op) compiles with no graph break."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(3)
    b, l, h, p, gr, n, L = 2, 7, 2, 3, 1, 4, 5
    x = torch.randn(b, l, h, p, generator=gen, dtype=F64)
    dt = torch.randn(b, l, h, generator=gen, dtype=F64)
    A = -torch.rand(h, generator=gen, dtype=F64)
    B = torch.randn(b, l, gr, n, generator=gen, dtype=F64)
    C = torch.randn(b, l, gr, n, generator=gen, dtype=F64)
    dl = torch.randn(b, l, h, L, generator=gen, dtype=F64)
    Lp = torch.randn(h, L, generator=gen, dtype=F64)

    def f(x, dt, A, B, C, dl, Lp):
        y, st = hmamba_chunk_scan_combined(x, dt, A, B, C, dl, Lp, chunk_size=4, D=A,
                                           dt_softplus=True, return_final_states=True)
        return y, st.ht, st.offsets

    def run(fn):
        xs = [t.detach().clone().requires_grad_() for t in (x, dt, A, B, C, dl, Lp)]
        y, ht, off = fn(*xs)
        (y.square().sum() + ht.sum()).backward()
        return [y, ht, off] + [t.grad for t in xs]

    eager = run(f)
    comp = run(torch.compile(f, fullgraph=True, backend="aot_eager"))
    for i, (a, b_) in enumerate(zip(eager, comp)):
        assert torch.equal(a, b_), i

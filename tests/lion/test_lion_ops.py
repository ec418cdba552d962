"""lion_attn (bidirectional LION-LIT / -D / -S) against its full masked float64 form
(reference.lion_ref): o and every gradient (q, k, v, g, g_gamma) from one probe backward, on the
torch backend (float64 to 1e-10, fp32 to 1e-5) and Triton under the interpreter (fp32, 1e-5);
odd T, T = 1, T across chunks, K != V, varlen with length-1 and empty segments, -inf / huge /
strong gates, per-sequence isolation, T = 2048, compile and opcheck, empty and bad input."""
from __future__ import annotations

import pytest
import torch

import lightning_ops as lo
from lightning_ops import reference as R
from helpers import (INTERPRET, backward_probe, cu_seqlens_from_lengths, grads_of, rel_rms)

INF = float("inf")
TRITON = pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()),
                            reason="Triton needs a GPU or TRITON_INTERPRET=1")
BACKENDS = [pytest.param("torch", torch.float64, 1e-10, id="torch-f64"),
            pytest.param("torch", torch.float32, 1e-5, id="torch-f32"),
            pytest.param("triton", torch.float32, 1e-5, id="triton-f32", marks=TRITON)]
VARIANTS = ["lit", "d", "s", "s+d"]


def _inputs(variant, B, T, H, K, V, lengths=None, fill=None, seed=0, low=-0.5):
    gen = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    x = dict(q=rn(B, T, H, K), k=rn(B, T, H, K), v=rn(B, T, H, V), g=None, g_gamma=None)
    if variant in ("s", "s+d"):
        x["g"] = low * torch.rand(B, T, H, generator=gen, dtype=torch.float64)
        if fill is not None:
            fill(x["g"])
    if variant in ("d", "s+d"):
        x["g_gamma"] = -(0.02 + 0.3 * torch.rand(H, generator=gen, dtype=torch.float64))
    x["cu"] = None if lengths is None else cu_seqlens_from_lengths(lengths)
    return x


def _run(x, dtype, backend=None, grad=True):
    """o and the gradients of every float input; backend None: the float64 reference."""
    leaves = {n: (None if t is None else t.detach().to(torch.float64 if backend is None else
                                                        dtype).requires_grad_(grad))
              for n, t in x.items() if n != "cu"}
    args = (leaves["q"], leaves["k"], leaves["v"])
    kw = dict(g=leaves["g"], g_gamma=leaves["g_gamma"], cu_seqlens=x["cu"])
    if backend is None:
        if kw["g"] is None and kw["g_gamma"] is not None:
            # a zero gate leaf: its gradient is dg_gamma's per-token terms (their size is the
            # scale dg_gamma, a sum with cancellation, is compared on)
            leaves["g"] = kw["g"] = torch.zeros(args[0].shape[:3], dtype=torch.float64,
                                                requires_grad=grad)
        o = R.lion_ref(*args, **kw)
    else:
        with lo.use_backend(backend):
            o = lo.lion_attn(*args, **kw)
    if not grad:
        return o, {}
    names = [n for n, t in leaves.items() if t is not None]
    gs = grads_of(backward_probe([o]), [leaves[n] for n in names])
    return o, dict(zip(names, gs))


def _compare(x, backend, dtype, tol, grad=True):
    o, gs = _run(x, dtype, backend, grad)
    ro, rgs = _run(x, dtype, None, grad)
    assert o.dtype == dtype
    for what, a, e in [("o", o, ro)] + [("d" + n, gs[n], rgs[n]) for n in gs]:
        assert a.shape == e.shape, what
        assert torch.isfinite(a).all(), f"{what}: non-finite values"
        err = rel_rms(a, e)
        if what == "dg_gamma":
            # a sum over every token of terms of both signs: accurate relative to the size of
            # its terms (the per-token dg), as any reduction is
            terms = rgs["g"].abs().sum((0, 1))
            err = ((a.double() - e).abs() / (e.abs() + terms).clamp_min(1e-30)).max().item()
        assert err <= tol, f"{what}: relative RMS error {err:.2e} > {tol:.0e}"


# -- the reference itself ---------------------------------------------------------------------
def test_reference_forms_agree():
    """The full masked form equals the paper's bidirectional RNN (forward + backward
    recurrence - diagonal), and LION-D's mask is lambda^|i - j|."""
    for variant in VARIANTS:
        x = _inputs(variant, 2, 9, 2, 4, 3, seed=1)
        args = (x["q"], x["k"], x["v"], x["g"], x["g_gamma"])
        assert rel_rms(R.lion_recurrent_ref(*args), R.lion_ref(*args)) < 1e-13
    # the authors' mask for gates lambda = (2, 3, 5, 7) (values > 1 only to make products
    # readable): a key is decayed by its own gate and those between, not the query's
    lam = torch.tensor([2.0, 3.0, 5.0, 7.0], dtype=torch.float64)
    expect = torch.tensor([[1, 3, 15, 105], [2, 1, 5, 35], [6, 3, 1, 7], [30, 15, 5, 1]],
                          dtype=torch.float64)
    assert torch.allclose(R.lion_mask_log(lam.log()[:, None]).exp()[..., 0], expect)
    gamma = torch.tensor([-0.3, -1.0], dtype=torch.float64)
    M = R.lion_mask_log(gamma.expand(7, 2)).exp()
    i = torch.arange(7)
    expect = gamma.exp()[None, None, :] ** (i[:, None] - i[None, :]).abs()[..., None]
    assert torch.allclose(M, expect, rtol=1e-14, atol=0)


# -- parity ---------------------------------------------------------------------------------
SHAPES = [  # B, T, H, K, V, lengths
    pytest.param(2, 13, 2, 8, 5, None, id="odd-T"),
    pytest.param(1, 1, 1, 16, 16, None, id="T=1"),
    pytest.param(1, 70, 2, 16, 32, None, id="T>chunk"),
    pytest.param(1, 83, 1, 8, 8, [1, 0, 9, 64, 9], id="varlen"),
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("B,T,H,K,V,lengths", SHAPES)
@pytest.mark.parametrize("backend,dtype,tol", BACKENDS[:2])
def test_parity_torch(variant, B, T, H, K, V, lengths, backend, dtype, tol):
    _compare(_inputs(variant, B, T, H, K, V, lengths), backend, dtype, tol)


@TRITON
@pytest.mark.parametrize("variant", ["lit", "s+d"])
@pytest.mark.parametrize("B,T,H,K,V,lengths", [SHAPES[0], SHAPES[3]])
def test_parity_triton(variant, B, T, H, K, V, lengths):
    _compare(_inputs(variant, B, T, H, K, V, lengths), "triton", torch.float32, 1e-5)


def test_learnable_g_gamma_gradient():
    """A g_gamma that requires grad (LION-D's learnable decay) gets its gradient."""
    x = _inputs("d", 1, 21, 2, 8, 4)
    _compare(x, "torch", torch.float64, 1e-10)


# -- extreme gates ----------------------------------------------------------------------------
def _resets(g):
    g[:, [0, 5, 40, 64, 65, 99]] = -INF


def _huge(g):
    g[:, [3, 70]] = -1e30


def _strong(g):
    g.fill_(-20.0)


@pytest.mark.parametrize("fill", [_resets, _huge, _strong], ids=["-inf", "-1e30", "-20"])
@pytest.mark.parametrize("backend,dtype,tol", BACKENDS)
def test_extreme_gates(fill, backend, dtype, tol):
    """-inf gates cut the sequence exactly (in both directions), a huge gate inside a chunk is
    exact, and at strong decays every gradient (dg too) is accurate relative to its size."""
    lengths = [100, 30] if backend == "torch" else None
    T = 130 if backend == "torch" else 100
    _compare(_inputs("s", 1, T, 2, 8, 4, lengths, fill=fill), backend, dtype, tol)


def test_reset_gate_is_a_wall():
    """A -inf gate at token r: every other query equals the sequence cut into [0, r), [r] and
    (r, T) (no token sees r's key or across r), while r itself reads both sides (the authors'
    mask: a key is decayed by its own gate, never by the query's)."""
    r, T = 12, 30
    x = _inputs("s", 1, T, 2, 8, 4)
    x["g"][:, r] = -INF
    o, _ = _run(x, torch.float64, "torch", grad=False)
    y = dict(x, cu=cu_seqlens_from_lengths([r, 1, T - r - 1]))
    o2, _ = _run(y, torch.float64, "torch", grad=False)
    others = [t for t in range(T) if t != r]
    assert rel_rms(o[:, others], o2[:, others]) < 1e-13
    assert not torch.allclose(o[:, r], o2[:, r])  # r reads both sides
    assert torch.isfinite(o).all()


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=TRITON)])
def test_packed_sequences_are_isolated(backend):
    """A NaN / Inf in one packed sequence reaches all of that sequence (bidirectional) and
    nothing of the others."""
    x = _inputs("s", 1, 40, 2, 8, 4, lengths=[15, 1, 24])
    x["v"][0, 20] = float("nan")
    x["k"][0, 30] = INF
    o, _ = _run(x, torch.float32, backend, grad=False)
    ro, _ = _run({n: t for n, t in x.items()}, torch.float32, None, grad=False)
    assert torch.isfinite(o[:, :16]).all()
    assert rel_rms(o[:, :16], ro[:, :16]) < 1e-5
    # the third sequence is all non-finite (every query sees the bad keys/values)
    assert not torch.isfinite(o[:, 16:]).any(dim=(2, 3)).any()


# -- long T ---------------------------------------------------------------------------------
def test_equals_full_masked_form_at_T_2048():
    x = _inputs("s+d", 1, 2048, 1, 8, 8, low=-0.05)
    o, _ = _run(x, torch.float64, "torch", grad=False)
    ro, _ = _run(x, torch.float64, None, grad=False)
    assert rel_rms(o, ro) < 1e-10
    x = _inputs("lit", 1, 2048, 1, 8, 8)
    x["q"], x["k"] = x["q"].abs(), x["k"].abs()  # positive features: no cancellation
    o, _ = _run(x, torch.float32, "torch", grad=False)
    ro, _ = _run(x, torch.float32, None, grad=False)
    assert rel_rms(o, ro) < 1e-5


# -- custom op, compile, determinism, edges -----------------------------------------------------
def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    x = _inputs("s+d", 1, 19, 2, 8, 6, lengths=[5, 1, 13])

    def run(f):
        q, k, v, g = (x[n].detach().clone().requires_grad_() for n in ("q", "k", "v", "g"))
        o = f(q, k, v, g, x["g_gamma"], x["cu"])
        o.square().sum().backward()
        return [o, q.grad, k.grad, v.grad, g.grad]

    fn = lambda q, k, v, g, gg, cu: lo.lion_attn(q, k, v, g=g, g_gamma=gg,  # noqa: E731
                                                 cu_seqlens=cu)
    eager = run(fn)
    compiled = run(torch.compile(fn, fullgraph=True, backend="aot_eager"))
    for a, b in zip(compiled, eager):
        assert rel_rms(a, b) < 1e-12


def test_opcheck_on_the_stacked_causal_call():
    """The custom op lion_attn runs on (both directions stacked, reversed packed sequences
    appended) passes opcheck."""
    from lightning_ops.gla.ops import _gla_fwd
    x = _inputs("s", 1, 11, 2, 8, 4, lengths=[4, 7])
    req = lambda t: t.detach().clone().requires_grad_()  # noqa: E731
    cu2 = torch.cat([x["cu"], x["cu"][1:] + 11])
    cat = lambda t: torch.cat([t, t.flip(1)], 1)  # noqa: E731
    args = (req(cat(x["q"])), req(cat(x["k"])), req(cat(x["v"])), req(cat(x["g"])), None, None,
            cu2, 0.35, False, "chunk", "torch")
    torch.library.opcheck(_gla_fwd, args)


def test_deterministic():
    x = _inputs("s+d", 2, 37, 2, 8, 4)
    a, ga = _run(x, torch.float32, "torch")
    b, gb = _run(x, torch.float32, "torch")
    assert torch.equal(a, b) and all(torch.equal(ga[n], gb[n]) for n in ga)


@pytest.mark.parametrize("shape", [(0, 5), (2, 0)], ids=["B=0", "T=0"])
def test_empty(shape):
    B, T = shape
    q = torch.randn(B, T, 2, 8, requires_grad=True)
    g = torch.zeros(B, T, 2, requires_grad=True)
    o = lo.lion_attn(q, q, torch.randn(B, T, 2, 4), g=g)
    assert o.shape == (B, T, 2, 4)
    o.sum().backward()
    assert q.grad.shape == q.shape


def test_bad_input_names_the_tensor():
    q = torch.randn(1, 6, 2, 8)
    with pytest.raises(ValueError, match="g must have shape"):
        lo.lion_attn(q, q, q, g=torch.zeros(1, 6, 3))
    with pytest.raises(ValueError, match="g_gamma must have shape"):
        lo.lion_attn(q, q, q, g_gamma=torch.zeros(3))
    with pytest.raises(ValueError, match="cu_seqlens"):
        lo.lion_attn(q.expand(2, -1, -1, -1), q.expand(2, -1, -1, -1), q.expand(2, -1, -1, -1),
                     cu_seqlens=torch.tensor([0, 6], dtype=torch.int32))

"""Never silently wrong at the edges: reset gates (-inf), one huge gate per chunk, strong decays
with gradients checked relative to their own size, and non-finite tokens (causality: outputs
before a bad token stay exact). Every gated op, on the torch backend (float64 against the float64
reference, and fp32) and on Triton under the interpreter (fp32).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lightning_ops as lo
from lightning_ops import reference as R
from helpers import (INTERPRET, assert_close, backward_probe, cu_seqlens_from_lengths,
                     grads_of, rel_rms)

INF = float("inf")

# name: (op, reference, gate kind)
OPS = {
    "chunk_gla": (lo.chunk_gla, R.gla_ref, "vector"),
    "fused_recurrent_gla": (lo.fused_recurrent_gla, R.gla_ref, "vector"),
    "chunk_simple_gla": (lo.chunk_simple_gla, R.simple_gla_ref, "scalar"),
    "fused_recurrent_simple_gla": (lo.fused_recurrent_simple_gla, R.simple_gla_ref, "scalar"),
    "chunk_gated_delta_rule": (lo.chunk_gated_delta_rule, R.gated_delta_rule_ref, "delta"),
    "fused_recurrent_gated_delta_rule": (lo.fused_recurrent_gated_delta_rule,
                                         R.gated_delta_rule_ref, "delta"),
    "chunk_kda": (lo.chunk_kda, R.kda_ref, "kda"),
    "fused_recurrent_kda": (lo.fused_recurrent_kda, R.kda_ref, "kda"),
}
CHUNK_OPS = [n for n in OPS if n.startswith("chunk")]

# (backend, dtype, tolerance on relative RMS against the float64 reference)
BACKENDS = [
    pytest.param("torch", torch.float64, 1e-10, id="torch-f64"),
    pytest.param("torch", torch.float32, 1e-5, id="torch-f32"),
    pytest.param("triton", torch.float32, 1e-5, id="triton-f32",
                 marks=pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()),
                                          reason="Triton needs a GPU or TRITON_INTERPRET=1")),
]



def _op_backends(backends=BACKENDS):
    """(name, backend, dtype, tol) params. The Triton interpreter is slow: it runs the chunk ops
    only (its token-walk kernels are causal and exact by construction, and are covered by
    tests/gla and tests/delta)."""
    out = []
    for p in backends:
        backend = p.values[0]
        for name in OPS:
            if backend == "triton" and name not in CHUNK_OPS:
                continue
            out.append(pytest.param(name, *p.values, id=f"{name}-{p.id}", marks=p.marks))
    return out


def _inputs(kind, T, fill, dtype, B=1, H=2, K=16, V=8, seed=0, lengths=None):
    """Random inputs with gates -0.05..0 everywhere, then fill(g) writes the extreme ones."""
    gen = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v = rn(B, T, H, K), rn(B, T, H, K), rn(B, T, H, V)
    g = -0.05 * torch.rand(*((B, T, H, K) if kind in ("vector", "kda") else (B, T, H)),
                           generator=gen, dtype=torch.float64)
    fill(g)
    x = dict(q=q, k=k, v=v, g=g, h0=rn(B if lengths is None else len(lengths), H, K, V))
    if kind in ("delta", "kda"):
        x["q"], x["k"] = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        x["beta"] = torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    x = {n: t.to(dtype) for n, t in x.items()}
    x["cu"] = None if lengths is None else cu_seqlens_from_lengths(lengths)
    return x


def _run(name, x, backend=None, grad=True):
    """(o, ht) and the gradients of every float input from one probe backward."""
    op, ref, kind = OPS[name]
    leaves = {n: t.detach().clone().requires_grad_(grad) for n, t in x.items() if n != "cu"}
    args = [leaves["q"], leaves["k"], leaves["v"], leaves["g"]]
    if kind in ("delta", "kda"):
        args.append(leaves["beta"])
    kw = dict(initial_state=leaves["h0"], output_final_state=True, cu_seqlens=x["cu"])
    if backend is None:
        o, ht = ref(*args, **kw)
    else:
        with lo.use_backend(backend):
            o, ht = op(*args, **kw)
    if not grad:
        return o, ht, {}
    names = list(leaves)
    gs = grads_of(backward_probe([o, ht]), [leaves[n] for n in names])
    return o, ht, dict(zip(names, gs))


def _compare(name, x, backend, tol, grad=True):
    o, ht, gs = _run(name, x, backend, grad)
    ro, rht, rgs = _run(name, {n: (t if n == "cu" or t is None else t.double())
                               for n, t in x.items()}, None, grad)
    for what, a, e in [("o", o, ro), ("final state", ht, rht)] + \
            [("d" + n, gs[n], rgs[n]) for n in gs]:
        assert_close(f"{name} {what}", a, e, tol, metric=rel_rms)


def _resets(g):  # the first token, one inside a chunk, one on a chunk boundary
    g[:, [0, 70, 128]] = -INF


def _many_resets(g):  # several in one chunk (the torch engine is exact for any number)
    g[:, [0, 1, 5, 30, 64, 65, 70, 100]] = -INF


def _huge(value):
    def fill(g):
        g[:, [3, 70, 130]] = value  # one per chunk of 64
    return fill


@pytest.mark.parametrize("name,backend,dtype,tol", _op_backends())
def test_reset_gates_are_exact(name, backend, dtype, tol):
    _compare(name, _inputs(OPS[name][2], 150, _resets, dtype), backend, tol)


@pytest.mark.parametrize("name,backend,dtype,tol", _op_backends(BACKENDS[:2]))
def test_many_reset_gates_per_chunk_are_exact(name, backend, dtype, tol):
    """(Triton floors gates at -104 in its chunk kernels: k floored gates in one chunk cost
    ~k * 104 * eps_fp32 of relative error in that chunk's later decays; see README Numerics.)"""
    _compare(name, _inputs(OPS[name][2], 150, _many_resets, dtype), backend, tol)


@pytest.mark.parametrize("name,backend,dtype,tol", _op_backends())
@pytest.mark.parametrize("value", [-1e30, -1e4])
def test_one_huge_gate_per_chunk(name, value, backend, dtype, tol):
    _compare(name, _inputs(OPS[name][2], 150, _huge(value), dtype), backend, tol)


@pytest.mark.parametrize("name,backend,dtype,tol", _op_backends())
@pytest.mark.parametrize("strength", [5.0, 20.0])
def test_strong_decay_gradients_relative_to_their_size(name, strength, backend, dtype, tol):
    """Gates of -strength per token: every gradient (dg included, which is tiny there) within
    tol of the reference relative to its own norm."""
    def fill(g):
        g.fill_(-strength)
    _compare(name, _inputs(OPS[name][2], 130, fill, dtype), backend, tol)


@pytest.mark.parametrize("name,backend", [p.values[:2] for p in _op_backends(BACKENDS[1:])])
@pytest.mark.parametrize("bad", ["k", "v", "g", "beta", "v_col"])
@pytest.mark.parametrize("value", [float("nan"), INF])
def test_non_finite_token_never_reaches_earlier_outputs(name, bad, value, backend):
    kind = OPS[name][2]
    if bad == "beta" and kind not in ("delta", "kda"):
        pytest.skip("no beta")
    T, t, seg = 200, 150, [120, 80]  # packed: the bad token is in the second sequence
    x = _inputs(kind, T, lambda g: None, torch.float32, lengths=seg)
    if bad == "v_col":
        x["v"][0, t, 0, 0] = value
    elif bad == "g":
        x["g"][0, t] = value
    else:
        x[bad][0, t] = value
    o, ht, _ = _run(name, x, backend, grad=False)
    ro, _, _ = _run(name, {n: (t_ if n == "cu" else t_.double()) for n, t_ in x.items()},
                    None, grad=False)
    bos = 0 if t < seg[0] else seg[0]
    before = o[:, bos:t]
    assert torch.isfinite(before).all(), f"{name}: bad {bad} at {t} reached earlier tokens"
    assert rel_rms(before, ro[:, bos:t]) <= 1e-5
    assert not torch.isfinite(o[:, t]).all(), "the bad token's own output must not look valid"
    # the other packed sequence is untouched, and so is its final state
    other = slice(seg[0], T) if t < seg[0] else slice(0, seg[0])
    assert torch.isfinite(o[:, other]).all()
    assert rel_rms(o[:, other], ro[:, other]) <= 1e-5
    hit = 0 if t < seg[0] else 1
    assert not torch.isfinite(ht[hit]).all() and torch.isfinite(ht[1 - hit]).all()
    if bad == "v_col":  # value columns are independent: the others stay exact
        assert torch.isfinite(o[:, t:, :, 1:]).all()
        assert rel_rms(o[:, t:, :, 1:], ro[:, t:, :, 1:]) <= 1e-5


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=BACKENDS[2].marks)])
@pytest.mark.parametrize("name", CHUNK_OPS)
def test_non_finite_backward_stays_finite_before_the_bad_token(name, backend):
    """The gradients of the tokens before a bad one, from outputs before it, stay finite."""
    kind = OPS[name][2]
    x = _inputs(kind, 100, lambda g: None, torch.float32)
    x["v"][0, 70] = INF
    leaves = {n: t.detach().clone().requires_grad_() for n, t in x.items() if n != "cu"}
    op = OPS[name][0]
    args = [leaves["q"], leaves["k"], leaves["v"], leaves["g"]]
    if kind in ("delta", "kda"):
        args.append(leaves["beta"])
    with lo.use_backend(backend):
        o, _ = op(*args, initial_state=leaves["h0"])
    o[:, :70].sum().backward()
    for n in ("q", "k", "v"):
        assert torch.isfinite(leaves[n].grad[:, :70]).all(), f"d{n} before the bad token"


# --- Mamba-2 SSD: dt * A is the log decay --------------------------------------------------
def _ssd_inputs(dtype, T=150, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    b, h, p, n = 1, 2, 8, 16
    x = dict(x=rn(b, T, h, p), dt=0.05 + 0.1 * torch.rand(b, T, h, generator=gen,
                                                          dtype=torch.float64),
             A=-torch.tensor([0.5, 2.0], dtype=torch.float64), B=rn(b, T, 1, n),
             C=rn(b, T, 1, n), h0=rn(b, h, p, n))
    return {k: v.to(dtype) for k, v in x.items()}


def _ssd(x, backend):
    leaves = {k: t.detach().clone().requires_grad_() for k, t in x.items()}
    args = (leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"])
    if backend is None:
        y, ht = R.ssd_ref(*args, initial_states=leaves["h0"])
    else:
        with lo.use_backend(backend):
            y, ht = lo.mamba_chunk_scan_combined(*args, 64, initial_states=leaves["h0"],
                                                 return_final_states=True)
    gs = grads_of(backward_probe([y, ht]), list(leaves.values()))
    return [y, ht] + gs


@pytest.mark.parametrize("backend,dtype,tol", BACKENDS)
@pytest.mark.parametrize("case", ["strong", "huge"])
def test_ssd_extreme_decays(case, backend, dtype, tol):
    """dt * A of -10 per token (dA relative to its own size), and one dt * A of -1e30."""
    x = _ssd_inputs(dtype)
    if case == "strong":
        x["A"] = torch.tensor([-10.0, -20.0], dtype=dtype)
        x["dt"] = torch.ones_like(x["dt"])
    else:
        x["dt"][0, 70, 0] = 1e30
        x["x"][0, 70, 0] = 1e-30  # keep dt * x (the token's own input) of order one
    got = _ssd(x, backend)
    exp = _ssd({k: v.double() for k, v in x.items()}, None)
    for what, a, e in zip(["y", "final", "dx", "ddt", "dA", "dB", "dC", "dh0"], got, exp):
        # d dt at the 1e30 token is a product of 1e30 and 1e-30 sized terms: judged elsewhere
        assert_close(what, a, e, max(tol, 1e-6) if case == "huge" and what == "ddt" else tol,
                     metric=rel_rms)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=BACKENDS[2].marks)])
@pytest.mark.parametrize("bad", ["x", "dt", "B"])
def test_ssd_non_finite_token_never_reaches_earlier_outputs(bad, backend):
    x = _ssd_inputs(torch.float32, T=130)
    x[bad][0, 100] = float("nan")
    args = (x["x"], x["dt"], x["A"], x["B"], x["C"])
    with lo.use_backend(backend):
        y, ht = lo.mamba_chunk_scan_combined(*args, 64, initial_states=x["h0"],
                                             return_final_states=True)
    ry, _ = R.ssd_ref(*(a.double() for a in args), initial_states=x["h0"].double())
    assert torch.isfinite(y[:, :100]).all(), f"bad {bad} at 100 reached earlier tokens"
    assert rel_rms(y[:, :100], ry[:, :100]) <= 1e-5
    assert not torch.isfinite(y[:, 100]).all() and not torch.isfinite(ht).all()


@pytest.mark.parametrize("with_state", [False, True])
def test_causal_conv1d_empty_length(with_state):
    """L = 0: empty output, the history passes through as the final state, gradients flow."""
    x = torch.randn(2, 4, 0, requires_grad=True)
    w = torch.randn(4, 4, requires_grad=True)
    h0 = torch.randn(2, 4, 3, requires_grad=True) if with_state else None
    out, final = lo.causal_conv1d_fn(x, w, initial_states=h0, return_final_states=True,
                                     activation="silu")
    assert out.shape == (2, 4, 0) and final.shape == (2, 4, 3)
    if with_state:
        assert torch.equal(final, h0)
        final.sum().backward()
        assert torch.equal(h0.grad, torch.ones_like(h0)) and torch.equal(w.grad, torch.zeros_like(w))
    else:
        assert torch.equal(final, torch.zeros(2, 4, 3))

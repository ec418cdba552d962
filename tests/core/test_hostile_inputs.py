"""Hostile inputs at the op layer (issue 11, items 5-9 and 12), on the torch backend and on the
Triton backend (under TRITON_INTERPRET=1 on CPU): compiled calls reject what eager rejects,
empty batches give empty outputs and gradients, the dt_limit check traces with dynamic shapes,
use_backend() is local to a thread, learnable decays (g_gamma, slope) get gradients, and bad
input gets an error that blames the right tensor, before anything is mutated. Shapes are tiny."""
from __future__ import annotations

import math
import re
import threading

import pytest
import torch

import lightning_ops as lo
from lightning_ops import backend as lo_backend
from lightning_ops import reference as R
from helpers import INTERPRET, assert_close, requires_triton

F64 = torch.float64
BACKENDS = ["torch", pytest.param("triton", marks=requires_triton)]
DEV = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"


def _dtype(backend):
    """The reference-comparable dtype a backend computes in (the kernels compute in fp32)."""
    return F64 if backend == "torch" else torch.float32


# ---------------------------------------------------------------------------------------------
# The 12 GLA / delta-rule ops: name -> call(q, k, v, gates, **kw); gates built by _gates
# ---------------------------------------------------------------------------------------------
GLA_DELTA = {
    "chunk_linear_attn": lambda q, k, v, G, **kw: lo.chunk_linear_attn(q, k, v, **kw),
    "chunk_simple_gla": lambda q, k, v, G, **kw: lo.chunk_simple_gla(q, k, v, g=G["gs"], **kw),
    "lightning_attn": lambda q, k, v, G, **kw: lo.lightning_attn(q, k, v, G["slope"], **kw),
    "chunk_gla": lambda q, k, v, G, **kw: lo.chunk_gla(q, k, v, G["gv"], **kw),
    "fused_recurrent_linear_attn":
        lambda q, k, v, G, **kw: lo.fused_recurrent_linear_attn(q, k, v, **kw),
    "fused_recurrent_simple_gla":
        lambda q, k, v, G, **kw: lo.fused_recurrent_simple_gla(q, k, v, g=G["gs"], **kw),
    "fused_recurrent_lightning_attn":
        lambda q, k, v, G, **kw: lo.fused_recurrent_lightning_attn(q, k, v, G["slope"], **kw),
    "fused_recurrent_gla": lambda q, k, v, G, **kw: lo.fused_recurrent_gla(q, k, v, G["gv"], **kw),
    "chunk_delta_rule": lambda q, k, v, G, **kw: lo.chunk_delta_rule(q, k, v, G["beta"], **kw),
    "chunk_gated_delta_rule":
        lambda q, k, v, G, **kw: lo.chunk_gated_delta_rule(q, k, v, G["gs"], G["beta"], **kw),
    "fused_recurrent_delta_rule":
        lambda q, k, v, G, **kw: lo.fused_recurrent_delta_rule(q, k, v, G["beta"], **kw),
    "fused_recurrent_gated_delta_rule":
        lambda q, k, v, G, **kw: lo.fused_recurrent_gated_delta_rule(q, k, v, G["gs"],
                                                                       G["beta"], **kw),
}


def _inputs(B, T, H, K=4, V=3, dtype=F64, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)

    def r(*s, neg=False):
        x = torch.randn(*s, generator=g, dtype=F64)
        x = -x.abs() * 0.3 if neg else x
        return x.to(dtype=dtype, device=DEV).requires_grad_(grad)

    q, k, v = r(B, T, H, K), r(B, T, H, K), r(B, T, H, V)
    G = {"gs": r(B, T, H, neg=True), "gv": r(B, T, H, K, neg=True),
         "beta": torch.rand(B, T, H, generator=g, dtype=F64).to(dtype=dtype, device=DEV)
         .requires_grad_(grad),
         "slope": torch.rand(H, generator=g, dtype=F64).to(dtype=dtype, device=DEV)}
    return q, k, v, G


# =============================================================================================
# 5. Compiled calls reject what eager rejects (cu_seqlens values), with the same error
# =============================================================================================
def _compiled(fn):
    torch._dynamo.reset()
    return torch.compile(lambda *a, **kw: fn(*a, **kw), fullgraph=True, backend="aot_eager")


def _error_of(fn, *a, **kw):
    with pytest.raises((ValueError, TypeError)) as info:
        fn(*a, **kw)
    return type(info.value), str(info.value)


BAD_CU = {"unsorted": [0, 6, 3, 10], "short": [0, 3, 7], "late_start": [2, 6, 10]}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", sorted(BAD_CU))
@pytest.mark.parametrize("name", ["chunk_gla", "chunk_gated_delta_rule",
                                  "fused_recurrent_simple_gla"])
def test_compiled_rejects_bad_cu_seqlens_like_eager(name, bad, backend):
    q, k, v, G = _inputs(1, 10, 2, dtype=_dtype(backend))
    cu = torch.tensor(BAD_CU[bad], dtype=torch.int32, device=DEV)
    fn = GLA_DELTA[name]
    with lo.use_backend(backend):
        eager = _error_of(fn, q, k, v, G, cu_seqlens=cu)
        compiled = _error_of(_compiled(fn), q, k, v, G, cu_seqlens=cu)
    assert eager[0] is ValueError and "cu_seqlens must start at 0" in eager[1]
    assert compiled == eager


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", sorted(BAD_CU))
def test_compiled_ssd_rejects_bad_cu_seqlens_like_eager(bad, backend):
    dtype = _dtype(backend)
    x, dt, A, Bm, Cm = _ssd_inputs(1, 10, 2, dtype=dtype)
    cu = torch.tensor(BAD_CU[bad], dtype=torch.int32, device=DEV)

    def fn(*a, **kw):
        return lo.mamba_chunk_scan_combined(*a, 4, **kw)
    with lo.use_backend(backend):
        eager = _error_of(fn, x, dt, A, Bm, Cm, cu_seqlens=cu)
        compiled = _error_of(_compiled(fn), x, dt, A, Bm, Cm, cu_seqlens=cu)
    assert eager[0] is ValueError and "cu_seqlens must start at 0" in eager[1]
    assert compiled == eager


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_accepts_good_cu_seqlens(backend):
    q, k, v, G = _inputs(1, 10, 2, dtype=_dtype(backend))
    cu = torch.tensor([0, 3, 3, 10], dtype=torch.int32, device=DEV)
    with lo.use_backend(backend):
        want = lo.chunk_gla(q, k, v, G["gv"], cu_seqlens=cu, output_final_state=True)
        got = _compiled(lo.chunk_gla)(q, k, v, G["gv"], cu_seqlens=cu, output_final_state=True)
    for a, b in zip(got, want):
        assert_close("compiled varlen", a, b, 1e-6)


# =============================================================================================
# 6. Empty batches: B = 0, H = 0 (and T = 0): empty out, states and gradients of the right shape
# =============================================================================================
EMPTY_SHAPES = {"B0": (0, 5, 2), "H0": (2, 5, 0), "T0": (2, 0, 2)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", sorted(EMPTY_SHAPES))
@pytest.mark.parametrize("name", sorted(GLA_DELTA))
def test_empty_batch_gla_delta(name, shape, backend):
    B, T, H = EMPTY_SHAPES[shape]
    dtype = _dtype(backend)
    q, k, v, G = _inputs(B, T, H, dtype=dtype, grad=True)
    h0 = torch.randn(B, H, 4, 3, dtype=dtype, device=DEV, requires_grad=True)
    with lo.use_backend(backend):
        o, ht = GLA_DELTA[name](q, k, v, G, initial_state=h0, output_final_state=True)
        o2, none = GLA_DELTA[name](q, k, v, G)
    assert o.shape == v.shape and o.dtype == v.dtype and o2.shape == v.shape and none is None
    state_dtype = F64 if dtype == F64 else torch.float32
    assert ht.shape == h0.shape and ht.dtype == state_dtype
    assert torch.equal(ht, h0.detach().to(state_dtype))  # no tokens: the state passes through
    dht = torch.randn_like(ht)
    leaves = [q, k, v, h0] + [t for t in G.values() if t.requires_grad]
    with lo.use_backend(backend):
        grads = torch.autograd.grad((o.sum() + (ht * dht).sum()), leaves, allow_unused=True)
    for x, gx in zip(leaves[:3], grads[:3]):
        assert gx is not None and gx.shape == x.shape
    assert torch.equal(grads[3], dht.to(h0.dtype))


def _ssd_inputs(b, l, h, p=4, n=3, dtype=F64, grad=False):
    gen = torch.Generator().manual_seed(0)

    def r(*s):
        return torch.randn(*s, generator=gen, dtype=F64).to(dtype=dtype, device=DEV) \
            .requires_grad_(grad)
    dt = torch.rand(b, l, h, generator=gen, dtype=F64).to(dtype=dtype, device=DEV)
    A = -torch.rand(h, generator=gen, dtype=F64).to(dtype=dtype, device=DEV)
    return r(b, l, h, p), dt.requires_grad_(grad), A.requires_grad_(grad), r(b, l, 1, n), \
        r(b, l, 1, n)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", sorted(EMPTY_SHAPES))
def test_empty_batch_mamba_chunk_scan_combined(shape, backend):
    b, l, h = EMPTY_SHAPES[shape]
    dtype = _dtype(backend)
    x, dt, A, Bm, Cm = _ssd_inputs(b, l, h, dtype=dtype, grad=True)
    D = torch.randn(h, dtype=dtype, device=DEV, requires_grad=True)
    h0 = torch.randn(b, h, 4, 3, dtype=dtype, device=DEV, requires_grad=True)
    with lo.use_backend(backend):
        y, hT = lo.mamba_chunk_scan_combined(x, dt, A, Bm, Cm, 4, D=D, initial_states=h0,
                                             dt_softplus=True, return_final_states=True)
    assert y.shape == x.shape and y.dtype == x.dtype and hT.shape == h0.shape
    assert torch.equal(hT, h0.detach().to(hT.dtype))
    leaves = [x, dt, A, Bm, Cm, D, h0]
    with lo.use_backend(backend):
        grads = torch.autograd.grad(y.sum() + hT.sum(), leaves, allow_unused=True)
    for t, gt in zip(leaves, grads):
        assert gt is not None and gt.shape == t.shape


# =============================================================================================
# 7. torch.compile(fullgraph=True, dynamic=True) of mamba_chunk_scan_combined, default dt_limit
# =============================================================================================
@pytest.mark.parametrize("backend", BACKENDS)
def test_dynamic_compile_ssd_default_dt_limit(backend):
    x, dt, A, Bm, Cm = _ssd_inputs(1, 6, 2, dtype=_dtype(backend))
    torch._dynamo.reset()
    f = torch.compile(lambda *a: lo.mamba_chunk_scan_combined(*a, 4, dt_softplus=True),
                      fullgraph=True, dynamic=True, backend="aot_eager")
    with lo.use_backend(backend):
        got, want = f(x, dt, A, Bm, Cm), lo.mamba_chunk_scan_combined(x, dt, A, Bm, Cm, 4,
                                                                      dt_softplus=True)
    assert_close("y", got, want, 1e-6)


def test_dt_limit_still_rejects_nan_and_inverted():
    x, dt, A, Bm, Cm = _ssd_inputs(1, 6, 2)
    for lim in ((float("nan"), 1.0), (0.0, float("nan")), (2.0, 1.0)):
        with pytest.raises(ValueError, match="dt_limit must satisfy min <= max"):
            lo.mamba_chunk_scan_combined(x, dt, A, Bm, Cm, 4, dt_limit=lim)


# =============================================================================================
# 8. use_backend() is local to the thread (and task) that enters it
# =============================================================================================
def test_use_backend_is_thread_local(monkeypatch):
    monkeypatch.delenv("LIGHTNING_OPS_BACKEND", raising=False)
    inside, done = threading.Event(), threading.Event()
    seen = {}

    def forcing():
        with lo.use_backend("cuda"):
            seen["forcing"] = lo_backend.requested()
            inside.set()
            done.wait(10)
        seen["forcing_after"] = lo_backend.requested()

    def other():
        inside.wait(10)
        seen["other"] = lo_backend.requested()
        seen["other_resolved"] = lo_backend.resolve("gla", torch.device("cpu"))
        done.set()

    threads = [threading.Thread(target=forcing), threading.Thread(target=other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert seen == {"forcing": "cuda", "other": None, "other_resolved": "torch",
                    "forcing_after": None}


@pytest.mark.parametrize("backend", BACKENDS)
def test_use_backend_thread_local_under_compile(backend, monkeypatch):
    """A compiled function reads the calling thread's choice (and recompiles for another)."""
    monkeypatch.delenv("LIGHTNING_OPS_BACKEND", raising=False)
    torch._dynamo.reset()
    f = torch.compile(lambda: lo_backend.requested(), fullgraph=True, backend="eager")
    seen = []
    with lo.use_backend(backend):
        seen.append(f())
        t = threading.Thread(target=lambda: seen.append(f()))
        t.start()
        t.join(60)
    seen.append(f())
    assert seen == [backend, None, None]


# =============================================================================================
# 9. A learnable per-head decay (g_gamma, lightning slope) gets its gradient
# =============================================================================================
DECAY_OPS = {
    "chunk_simple_gla_gamma": (lambda q, k, v, g, d, **kw: lo.chunk_simple_gla(
        q, k, v, g_gamma=d, **kw), lambda q, k, v, g, d, **kw: R.simple_gla_ref(
        q, k, v, g_gamma=d, **kw)),
    "chunk_simple_gla_g_and_gamma": (lambda q, k, v, g, d, **kw: lo.chunk_simple_gla(
        q, k, v, g=g, g_gamma=d, **kw), lambda q, k, v, g, d, **kw: R.simple_gla_ref(
        q, k, v, g=g, g_gamma=d, **kw)),
    "fused_recurrent_simple_gla_gamma": (lambda q, k, v, g, d, **kw: lo.fused_recurrent_simple_gla(
        q, k, v, g_gamma=d, **kw), lambda q, k, v, g, d, **kw: R.simple_gla_ref(
        q, k, v, g_gamma=d, **kw)),
    "lightning_attn": (lambda q, k, v, g, d, **kw: lo.lightning_attn(q, k, v, -d, **kw),
                       lambda q, k, v, g, d, **kw: R.lightning_attn_ref(q, k, v, -d, **kw)),
    "fused_recurrent_lightning_attn": (
        lambda q, k, v, g, d, **kw: lo.fused_recurrent_lightning_attn(q, k, v, -d, **kw),
        lambda q, k, v, g, d, **kw: R.lightning_attn_ref(q, k, v, -d, **kw)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(DECAY_OPS))
def test_learnable_decay_gets_gradient(name, backend):
    """d g_gamma (slope: d slope = -d g_gamma) against the float64 reference, with varlen."""
    dtype = _dtype(backend)
    q, k, v, G = _inputs(1, 11, 2, dtype=F64, seed=3)
    decay = -torch.rand(2, dtype=F64) * 0.5 - 0.05
    h0 = torch.randn(2, 2, 4, 3, dtype=F64)
    cu = torch.tensor([0, 4, 11], dtype=torch.int32)
    do, dht = torch.randn(1, 11, 2, 3, dtype=F64), torch.randn(2, 2, 4, 3, dtype=F64)

    def grads(fn, dt, **extra):
        xs = [t.detach().to(dtype=dt, device=DEV).requires_grad_() for t in
              (q, k, v, G["gs"], decay, h0)]
        o, ht = fn(*xs[:5], initial_state=xs[5], output_final_state=True,
                   cu_seqlens=cu.to(DEV), **extra)
        loss = (o * do.to(o)).sum() + (ht * dht.to(ht)).sum()
        wrt = xs[:3] + xs[4:] + ([xs[3]] if "g_and" in name else [])
        return [o, ht] + list(torch.autograd.grad(loss, wrt))

    ours, ref = DECAY_OPS[name]
    with lo.use_backend(backend):
        got = grads(ours, dtype)
    want = grads(ref, F64)
    tol = 1e-10 if dtype == F64 else 1e-5
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close(f"{name}[{i}]", a, b, tol)
    assert got[5].abs().max() > 0  # the decay's gradient (index 5: after o, ht, dq, dk, dv)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fixed_decay_keeps_constant_path(backend):
    """g_gamma without requires_grad: same numbers, and no dense gate is built."""
    q, k, v, G = _inputs(1, 7, 2, dtype=_dtype(backend))
    gamma = -G["slope"]
    with lo.use_backend(backend):
        a, _ = lo.chunk_simple_gla(q, k, v, g_gamma=gamma)
        b, _ = lo.chunk_simple_gla(q, k, v, g_gamma=gamma.clone().requires_grad_())
    assert_close("o", a, b.detach(), 1e-6)


# =============================================================================================
# 12. Errors that blame the right tensor; double backward; in-place states; scale
# =============================================================================================
@pytest.mark.parametrize("dim, label", [(0, "batch size B"), (1, "sequence length T"),
                                        (2, "heads")])
@pytest.mark.parametrize("name", sorted(GLA_DELTA))
def test_wrong_q_blames_q(name, dim, label):
    q, k, v, G = _inputs(2, 5, 2)
    shape = list(q.shape)
    shape[dim] += 1
    bad_q = torch.randn(shape, dtype=F64)
    with pytest.raises(ValueError) as info:
        GLA_DELTA[name](bad_q, k, v, G)
    msg = str(info.value)
    assert msg.startswith(f"q has {label}" if dim < 2 else "q has 3 heads"), msg
    assert str(shape) in msg and str(list(k.shape)) in msg, msg  # both shapes shown


@pytest.mark.parametrize("dim", [0, 1])
def test_wrong_k_or_v_still_blamed(dim):
    q, k, v, G = _inputs(2, 5, 2)
    for bad in ("k", "v"):
        xs = {"q": q, "k": k, "v": v}
        shape = list(xs[bad].shape)
        shape[dim] += 1
        xs[bad] = torch.randn(shape, dtype=F64)
        with pytest.raises(ValueError, match=f"^{bad} has "):
            lo.chunk_gla(xs["q"], xs["k"], xs["v"], G["gv"])


def test_wrong_q_dtype_and_device_blame_q():
    q, k, v, G = _inputs(2, 5, 2)
    with pytest.raises(TypeError, match=r"^q has dtype torch.float32 but k has torch.float64"):
        lo.chunk_linear_attn(q.float(), k, v)
    with pytest.raises(ValueError, match=r"^q is on meta but the inputs are on cpu"):
        lo.chunk_linear_attn(q.to("meta"), k, v)


def test_grouped_value_heads_zero_q_heads_is_a_value_error():
    q, k, v, G = _inputs(1, 3, 0)
    v2 = torch.randn(1, 3, 2, 3, dtype=F64)
    with pytest.raises(ValueError, match="v must have shape"):
        lo.chunk_delta_rule(q, k, v2, torch.rand(1, 3, 2, dtype=F64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["chunk_gla", "fused_recurrent_simple_gla",
                                  "chunk_gated_delta_rule", "fused_recurrent_delta_rule"])
def test_double_backward_is_a_clear_error(name, backend):
    q, k, v, G = _inputs(1, 5, 1, dtype=_dtype(backend), grad=True)
    with lo.use_backend(backend):
        o, _ = GLA_DELTA[name](q, k, v, G)
        (dq,) = torch.autograd.grad(o.square().sum(), q, create_graph=True)
        with pytest.raises(NotImplementedError,
                           match=f"{name}.*double backward is not supported"):
            torch.autograd.grad(dq.sum(), q)


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_ssm_ops(backend):
    dtype = _dtype(backend)
    x, dt, A, Bm, Cm = _ssd_inputs(1, 6, 2, dtype=dtype, grad=True)
    with lo.use_backend(backend):
        y = lo.mamba_chunk_scan_combined(x, dt, A, Bm, Cm, 4)
        (dx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        with pytest.raises(NotImplementedError, match="mamba_chunk_scan_combined: double"):
            torch.autograd.grad(dx.sum(), x)
        u = torch.randn(1, 2, 5, dtype=dtype, device=DEV, requires_grad=True)
        w = torch.randn(2, 3, dtype=dtype, device=DEV)
        out = lo.causal_conv1d_fn(u, w)
        (du,) = torch.autograd.grad(out.square().sum(), u, create_graph=True)
        if backend == "torch":  # the eager torch path is autograd of F.conv1d: it has one
            (ddu,) = torch.autograd.grad(du.sum(), u)
            assert ddu.shape == u.shape and torch.isfinite(ddu).all()
        else:
            with pytest.raises(NotImplementedError, match="causal_conv1d_fn: double"):
                torch.autograd.grad(du.sum(), u)


def _decode_args(b=2, h=2, p=3, n=4, dtype=F64):
    g = torch.Generator().manual_seed(0)

    def r(*s):
        return torch.randn(*s, generator=g, dtype=F64).to(dtype=dtype, device=DEV)
    return (r(b, h, p), r(b, h, p).abs(), -r(h, p, n).abs(), r(b, 1, n), r(b, 1, n))


@pytest.mark.parametrize("backend", BACKENDS)
def test_expanded_state_rejected_before_mutation(backend):
    dtype = _dtype(backend)
    base = torch.randn(1, 2, 3, 4, dtype=dtype, device=DEV)
    before = base.clone()
    state = base.expand(2, 2, 3, 4)
    with lo.use_backend(backend), pytest.raises(ValueError, match=r"^state is updated in place"
                                                ".*share memory.*strides \[0, 12, 4, 1\]"):
        lo.selective_state_update(state, *_decode_args(dtype=dtype))
    assert torch.equal(base, before)
    # the Mamba-1 form too
    s3 = torch.randn(1, 3, 4, dtype=dtype, device=DEV).expand(2, 3, 4)
    x, dt = torch.randn(2, 3, dtype=dtype, device=DEV), torch.rand(2, 3, dtype=dtype, device=DEV)
    A, Bv = -torch.rand(3, 4, dtype=dtype, device=DEV), torch.randn(2, 4, dtype=dtype, device=DEV)
    with lo.use_backend(backend), pytest.raises(ValueError, match="^state is updated in place"):
        lo.selective_state_update(s3, x, dt, A, Bv, Bv)


@pytest.mark.parametrize("backend", BACKENDS)
def test_expanded_conv_state_rejected_before_mutation(backend):
    dtype = _dtype(backend)
    base = torch.randn(1, 2, 3, dtype=dtype, device=DEV)
    before = base.clone()
    with lo.use_backend(backend), pytest.raises(ValueError, match="^conv_state is updated"):
        lo.causal_conv1d_update(torch.randn(2, 2, dtype=dtype, device=DEV), base.expand(2, 2, 3),
                                torch.randn(2, 4, dtype=dtype, device=DEV))
    assert torch.equal(base, before)


def test_inference_state_rejected_outside_inference_mode():
    with torch.inference_mode():
        state = torch.randn(2, 2, 3, 4, dtype=F64)
    with pytest.raises(ValueError, match="^state is updated in place, but it is an inference"):
        lo.selective_state_update(state, *_decode_args())
    with torch.inference_mode():  # inside inference mode it is fine
        lo.selective_state_update(state, *_decode_args())


@pytest.mark.parametrize("scale, err, match", [
    (True, TypeError, "scale must be a Python float or None, got bool"),
    (False, TypeError, "scale must be a Python float or None, got bool"),
    (float("nan"), ValueError, "scale must be a finite float, got nan"),
    (float("inf"), ValueError, "scale must be a finite float, got inf"),
    (-math.inf, ValueError, "scale must be a finite float, got -inf"),
])
@pytest.mark.parametrize("name", ["chunk_gla", "chunk_simple_gla", "fused_recurrent_gla",
                                  "chunk_delta_rule", "fused_recurrent_gated_delta_rule"])
def test_bad_scale_rejected(name, scale, err, match):
    q, k, v, G = _inputs(1, 4, 1)
    h0 = torch.randn(1, 1, 4, 3, dtype=F64)
    before = h0.clone()
    with pytest.raises(err, match=match):
        GLA_DELTA[name](q, k, v, G, scale=scale, initial_state=h0)
    assert torch.equal(h0, before)


def test_head_dim_maxima():
    from lightning_ops import validation
    assert (validation.MAX_KEY_DIM, validation.MAX_VALUE_DIM, validation.MAX_GLA_KEY_DIM) == \
        (256, 512, 512)
    q = torch.randn(1, 2, 1, 8)
    with pytest.raises(ValueError, match="v \\(V\\) head dim is 513, over the supported "
                                         "maximum of 512"):
        lo.chunk_linear_attn(q, q, torch.randn(1, 2, 1, 513))
    q, k, v, G = _inputs(1, 2, 1, K=513, V=8)
    for name in ("chunk_linear_attn", "chunk_gla", "fused_recurrent_simple_gla"):
        with pytest.raises(ValueError, match="head dim is 513, over the supported maximum of "
                                             "512"):
            GLA_DELTA[name](q, k, v, G)
    q, k, v, G = _inputs(1, 2, 1, K=257, V=8)  # the delta rule's WY inverse holds whole-K tiles
    for name in ("chunk_delta_rule", "fused_recurrent_gated_delta_rule"):
        with pytest.raises(ValueError, match="head dim is 257, over the supported maximum of "
                                             "256"):
            GLA_DELTA[name](q, k, v, G)


def test_value_head_dim_512_runs_on_torch():
    q, k = torch.randn(1, 3, 1, 4, dtype=F64), torch.randn(1, 3, 1, 4, dtype=F64)
    v = torch.randn(1, 3, 1, 512, dtype=F64)
    with lo.use_backend("torch"):
        o, _ = lo.chunk_linear_attn(q, k, v)
    assert_close("o", o, R.linear_attn_ref(q, k, v)[0], 1e-10)


@pytest.mark.parametrize("dim, label", [(0, "batch size b"), (1, "length l"), (2, "heads h")])
def test_wrong_x_blames_x_in_ssd(dim, label):
    x, dt, A, Bm, Cm = _ssd_inputs(2, 5, 2)
    shape = list(x.shape)
    shape[dim] += 1
    with pytest.raises(ValueError, match=rf"^x has {label} {shape[dim]} but .*got {re.escape(str(shape))}"):
        lo.mamba_chunk_scan_combined(torch.randn(shape, dtype=F64), dt, A, Bm, Cm, 4)
    with pytest.raises(ValueError, match=r"^dt must have shape"):  # a wrong dt is still dt's
        lo.mamba_chunk_scan_combined(x, dt[:1], A, Bm, Cm, 4)


@pytest.mark.parametrize("dim, label", [(0, "batch size B"), (1, "channels D"), (2, "length L")])
def test_wrong_u_blames_u_in_selective_scan(dim, label):
    u, delta = torch.randn(2, 3, 5, dtype=F64), torch.rand(2, 3, 5, dtype=F64)
    A, Bm, Cm = -torch.rand(3, 4, dtype=F64), torch.randn(2, 4, 5, dtype=F64), \
        torch.randn(2, 4, 5, dtype=F64)
    shape = list(u.shape)
    shape[dim] += 1
    with pytest.raises(ValueError, match=rf"^u has {label} {shape[dim]} but .*got {re.escape(str(shape))}"):
        lo.selective_scan_fn(torch.randn(shape, dtype=F64), delta, A, Bm, Cm)

"""Triton backend of the GLA family (lightning_ops/chunk/triton.py) against the float64 reference.

CPU: under TRITON_INTERPRET=1 in fp32 (1e-5 relative RMS on o, the final state and every
gradient, from one (o*do).sum() + (ht*dht).sum() backward), through the public API with the
triton backend forced and every torch.empty NaN-filled. The interpreter is slow: shapes stay
small (T <= ~130, a few cases at K/V 128/256 with T <= 5).
GPU (@pytest.mark.gpu): fp32 at larger shapes, bf16/fp16 parity (within 2x of the reference run
in that dtype: helpers.lowp_bound), torch.compile(fullgraph=True), determinism and extreme gates
at long T. Inputs, runs and the reference: gla_cases.py; the sm_90 compile: sm90_compile.py.
"""
from __future__ import annotations

import pytest
import torch

import lightning_ops as lo
from lightning_ops import reference
from gla_cases import GRAD_NAMES, make_inputs, reference_run, run, run_op, with_grad
from helpers import (assert_lowp_parity, cu_seqlens_from_lengths, nan_filled_empty, rel_rms,
                     requires_gpu, requires_triton, triton_device)
from sm90_compile import build, compile_in_subprocess

pytestmark = requires_triton

TOL = 1e-5
DEV = triton_device()

# the ops under test (gla_cases.OPS): gates none, scalar g, g_gamma, both, slope, vector g
OPS = ("linear", "simple_g", "simple_gamma", "simple_both", "lightning", "gla")


def _inputs(op, B, T, H, K, V, lengths=None, h0=True, low=-0.5, dtype=torch.float32, seed=0,
            device=DEV):
    """This file's inputs: log decays in (low, 0), g_gamma in (-0.22, -0.02), g_gamma and the
    initial state in fp32 whatever dtype is."""
    return make_inputs(op, B, T, H, K, V, lengths=lengths, h0=h0, low=low, gamma=(0.02, 0.2),
                       dtype=dtype, state_dtype=torch.float32, device=device, seed=seed)


def _call(op, mode, x, output_final_state=True, scale=None):
    """The public op for (op, mode) on inputs x."""
    return run_op(op, mode, x, scale=scale, output_final_state=output_final_state)


def _errors(got, want):
    (o, ht, dg), (o_r, ht_r, dg_r) = got, want
    errs = {"o": rel_rms(o, o_r)}
    assert o.dtype == o_r.dtype or o_r.dtype == torch.float64
    assert (ht is None) == (ht_r is None)
    if ht is not None:
        assert ht.dtype == torch.float32 or ht_r.dtype == ht.dtype
        errs["ht"] = rel_rms(ht, ht_r)
    for n in GRAD_NAMES:
        assert (dg[n] is None) == (dg_r[n] is None), n
        if dg[n] is not None:
            errs["d" + n] = rel_rms(dg[n], dg_r[n])
    for name, t in [("o", o), ("ht", ht)] + [("d" + n, dg[n]) for n in GRAD_NAMES]:
        if t is not None:
            assert torch.isfinite(t).all(), f"{name}: non-finite values"
    return errs


def check(op, mode, B, T, H, K, V, lengths=None, h0=True, output_final_state=True,
          low=-0.5, scale=None, tol=TOL, tols=None, seed=0):
    x = _inputs(op, B, T, H, K, V, lengths, h0, low, seed=seed)
    want = reference_run(x, output_final_state, scale)
    t = with_grad(x)
    with lo.use_backend("triton"):
        got = run(t, lambda t: _call(op, mode, t, output_final_state, scale))
    errs = _errors(got, want)
    bad = {n: e for n, e in errs.items() if e > (tols or {}).get(n, tol)}
    assert not bad, f"relative RMS over {tol:g}: {bad} (all: {errs})"
    return errs


@pytest.fixture
def nan_empty(monkeypatch):
    nan_filled_empty(monkeypatch)


@pytest.fixture(params=["single", "two"])
def fwd_path(request, monkeypatch):
    """Force the single-pass (Lightning-Attention-2) or the two-pass chunk form."""
    monkeypatch.setenv("LIGHTNING_OPS_GLA_SINGLE_PASS", "1" if request.param == "single" else "0")
    return request.param


# ---------------------------------------------------------------------------------------------
# Chunk mode, both forward forms
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op,B,T,H,K,V", [
    ("linear", 2, 70, 2, 16, 32),        # ragged second chunk, K != V
    ("simple_g", 1, 130, 1, 20, 12),     # three chunks, non-power-of-two K and V
    ("simple_both", 2, 33, 2, 16, 16),   # g + g_gamma, T < chunk
    ("gla", 1, 70, 2, 20, 12),           # vector gates, ragged, non-power-of-two
    ("gla", 1, 130, 1, 32, 16),          # vector gates over three chunks
])
def test_chunk(op, B, T, H, K, V, fwd_path, nan_empty):
    check(op, "chunk", B, T, H, K, V)


@pytest.mark.parametrize("op,B,T,H,K,V,kw", [
    ("simple_gamma", 1, 100, 2, 16, 16, dict(h0=False)),
    ("lightning", 2, 50, 1, 16, 24, dict(scale=0.3)),
    ("linear", 1, 1, 1, 16, 16, {}),                            # T = 1
    ("gla", 2, 1, 1, 16, 8, dict(output_final_state=False)),    # T = 1, no dht
    ("gla", 1, 17, 1, 16, 16, dict(h0=False)),                  # T < chunk
    ("simple_g", 1, 64, 1, 16, 16, dict(output_final_state=False)),  # T == chunk
])
def test_chunk_odd(op, B, T, H, K, V, kw, nan_empty):
    check(op, "chunk", B, T, H, K, V, **kw)


@pytest.mark.parametrize("op,lengths", [
    ("gla", [1, 40, 0, 33, 1]),          # length-1 and empty segments, a chunk boundary crossed
    ("simple_both", [65, 1, 9]),
    ("linear", [1, 1, 70, 3]),
])
def test_chunk_varlen(op, lengths, fwd_path, nan_empty):
    check(op, "chunk", 1, sum(lengths), 1, 20, 12, lengths=lengths)


@pytest.mark.parametrize("op,T,K,V,path", [
    ("gla", 3, 256, 256, "two"),
    ("gla", 2, 128, 256, "single"),
    ("simple_g", 5, 128, 256, "single"),
    ("linear", 4, 100, 200, "two"),
    ("gla", 3, 512, 40, "two"),  # K up to 512 for this family, as in fla (its tests run 320, 512)
    ("simple_g", 2, 320, 24, "two"),
])
def test_chunk_large_head_dims(op, T, K, V, path, monkeypatch, nan_empty):
    monkeypatch.setenv("LIGHTNING_OPS_GLA_SINGLE_PASS", "1" if path == "single" else "0")
    check(op, "chunk", 1, T, 1, K, V)


@pytest.mark.parametrize("op", ["gla", "simple_g"])
def test_chunk_extreme_gates(op, nan_empty):
    """Gates down to -20 per token: finite everywhere. dg gets a looser bound: chunk-local
    cumulative gates reach ~-1300 in fp32 (ulp ~1e-4), and dg is a difference of such sums."""
    check(op, "chunk", 1, 100, 1, 32, 32, low=-20.0, tols={"dg": 3e-5})


# ---------------------------------------------------------------------------------------------
# Recurrent (decode) mode
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op,B,T,H,K,V,kw", [
    ("gla", 1, 30, 2, 20, 12, dict(lengths=[1, 20, 0, 8, 1])),
    ("simple_both", 2, 17, 2, 16, 24, {}),
    ("simple_gamma", 1, 9, 1, 16, 16, dict(output_final_state=False)),
    ("lightning", 1, 5, 2, 16, 16, dict(h0=False)),
    ("linear", 2, 1, 1, 16, 200, {}),
    ("simple_g", 1, 12, 1, 16, 16, dict(lengths=[1, 11])),
    ("gla", 1, 3, 1, 256, 256, {}),
    ("simple_g", 1, 3, 1, 512, 20, {}),
    ("gla", 1, 40, 1, 16, 16, dict(low=-20.0)),
])
def test_recurrent(op, B, T, H, K, V, kw, nan_empty):
    check(op, "recurrent", B, T, H, K, V, **kw)


@pytest.mark.parametrize("op,B,T,lengths", [
    ("gla", 2, 20, None), ("gla", 1, 30, [1, 17, 0, 12]),
    ("simple_g", 2, 20, None), ("simple_g", 1, 30, [12, 1, 17]),
])
def test_recurrent_strong_gates_dht(op, B, T, lengths, nan_empty):
    """Gates in (-11, -9) per token with a final-state cotangent: S_T ~ k_T v_T^T, so forming dg
    from rowsum(S_T * dht) - k_T dk_T cancels two large terms in fp32 (rel. error ~2e-3 here,
    garbage at -30); the kernels must avoid that cancellation, per sequence under varlen."""
    x = _inputs(op, B, T, 2, 16, 8, lengths)
    gen = torch.Generator().manual_seed(3)
    x["g"] = (-9.0 - 2.0 * torch.rand(x["g"].shape, generator=gen)).to(x["g"])
    want = reference_run(x)
    with lo.use_backend("triton"):
        got = run(with_grad(x), lambda t: _call(op, "recurrent", t))
    errs = _errors(got, want)
    assert max(errs.values()) <= TOL, f"dg {errs['dg']:.2e}, all: {errs}"


# ---------------------------------------------------------------------------------------------
# Contract details
# ---------------------------------------------------------------------------------------------
def test_float64_inputs_compute_in_fp32():
    """float64 inputs run in fp32 and come back as float64 (state included)."""
    x = _inputs("gla", 1, 20, 1, 16, 16, dtype=torch.float64)
    want = reference_run(x)
    with lo.use_backend("triton"):
        got = run(with_grad(x), lambda t: _call("gla", "chunk", t))
    assert got[0].dtype == torch.float64 and got[1].dtype == torch.float64
    assert all(got[2][n].dtype == torch.float64 for n in ("q", "k", "v", "g"))
    assert got[2]["h0"].dtype == x["h0"].dtype  # dh0 in initial_state's dtype
    errs = _errors(got, want)
    assert max(errs.values()) <= TOL, errs


def test_deterministic():
    x = _inputs("gla", 1, 70, 1, 16, 16, lengths=[30, 40])
    outs = []
    for _ in range(2):
        with lo.use_backend("triton"):
            o, ht, grads = run(with_grad(x), lambda t: _call("gla", "chunk", t))
        outs.append([o, ht] + [grads[n] for n in GRAD_NAMES])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_low_precision_initial_state():
    """initial_state in bf16 is used as fp32; dh0 comes back in its dtype."""
    x = _inputs("simple_g", 1, 10, 1, 16, 16)
    x["h0"] = x["h0"].to(torch.bfloat16)
    want = reference_run(x)
    with lo.use_backend("triton"):
        got = run(with_grad(x), lambda t: _call("simple_g", "chunk", t))
    assert got[2]["h0"].dtype == torch.bfloat16
    got[2]["h0"] = got[2]["h0"].float()
    errs = _errors(got, want)
    errs.pop("dh0")  # rounded to bf16 on the way out
    assert max(errs.values()) <= TOL, errs


@pytest.mark.parametrize("op", ["simple_both", "gla"])
def test_bf16_inputs_chunk(op):
    """bf16 q/k/v/g on the chunk path: close to the float64 reference on the same (bf16-rounded)
    values. Under the interpreter this once gave garbage (relative errors ~1e9): bf16 tl.dot is
    wrong there, so dot_config must keep interpreted products in fp32."""
    x = _inputs(op, 1, 40, 2, 16, 12)
    for n in ("q", "k", "v", "g"):
        x[n] = x[n].to(torch.bfloat16).float()  # the reference sees exactly the bf16 inputs
    want = reference_run(x)
    with lo.use_backend("triton"):
        got = run(with_grad(x, torch.bfloat16), lambda t: _call(op, "chunk", t))
    assert got[0].dtype == torch.bfloat16 and got[2]["q"].dtype == torch.bfloat16
    errs = _errors(got, want)
    assert max(errs.values()) <= 2e-2, errs


def test_chunk_tables():
    """Varlen chunk tables: built with torch ops, sized by an upper bound, slack ids masked."""
    from lightning_ops.triton_utils import ChunkMeta
    cu = cu_seqlens_from_lengths([1, 64, 0, 65, 3])
    m = ChunkMeta(cu, 1, 133, 64)
    assert m.offsets.tolist() == [0, 1, 2, 2, 4, 5]
    assert m.grid_t == 3 + 5
    real = [tuple(r) for r in m.indices.tolist()[:5]]
    assert real == [(0, 0), (1, 0), (3, 0), (3, 1), (4, 0)]
    # slack ids point past the end of the last sequence (all their rows masked)
    assert all(n == 4 and c >= 1 for n, c in m.indices.tolist()[5:])


def test_single_pass_choice(monkeypatch):
    """The fused single-pass form only where its tiles fit (K <= 128; fp32 on a GPU K <= 64);
    the env override cannot force it elsewhere."""
    from lightning_ops.chunk.triton import _single_pass
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setenv("LIGHTNING_OPS_GLA_SINGLE_PASS", "1")
    assert _single_pass(1, 1, 128, 128, torch.bfloat16, cuda)
    assert not _single_pass(1, 1, 256, 64, torch.bfloat16, cuda)
    assert not _single_pass(1, 1, 128, 64, torch.float32, cuda)
    assert _single_pass(1, 1, 64, 64, torch.float32, cuda)
    assert _single_pass(1, 1, 128, 64, torch.float32, cpu)
    monkeypatch.setenv("LIGHTNING_OPS_GLA_SINGLE_PASS", "0")
    assert not _single_pass(64, 16, 128, 128, torch.bfloat16, cpu)


def test_compile_fullgraph_interpreter():
    """torch.compile(fullgraph=True) traces the triton path (custom ops); on CPU the aot_eager
    backend (inductor also works here but spends ~1 min compiling C++ on the CPU)."""
    x = _inputs("gla", 1, 20, 1, 16, 16)

    def f(q, k, v, g, h0):
        with lo.use_backend("triton"):
            o, ht = lo.chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True)
        return o, ht

    backend = "inductor" if DEV == "cuda" else "aot_eager"
    cf = torch.compile(f, fullgraph=True, backend=backend)
    eager = run(with_grad(x), lambda t: f(t["q"], t["k"], t["v"], t["g"], t["h0"]))
    comp = run(with_grad(x), lambda t: cf(t["q"], t["k"], t["v"], t["g"], t["h0"]))
    assert torch.equal(eager[0], comp[0]) and torch.equal(eager[1], comp[1])
    for n in GRAD_NAMES:
        if eager[2][n] is not None:
            assert torch.equal(eager[2][n], comp[2][n]), n


def _sm90_configs():
    """Representative kernel configs, compiled for sm_90 by sm90_compile.build (in the
    subprocess of test_kernels_compile_for_sm90)."""
    import triton.language as tl
    from lightning_ops.chunk import triton_kernels as C, triton_recurrent as R
    from lightning_ops.chunk.constants import SCALAR_GATE, VECTOR_GATE

    bf, i32 = "*bf16", "*i32"
    ints = dict(cu_seqlens=i32, chunk_indices=i32, chunk_offsets=i32, scale="fp32", T="i32",
                NT="i32", dg_stride="i64", part_stride="i64")
    dt = dict(DT=tl.bfloat16, DT_S=tl.bfloat16, PREC="tf32")
    io = dict(ints, x=bf, y=bf, z=bf, out=bf, q=bf, k=bf, v=bf, do=bf, dq=bf, dk=bf, dv=bf, g=bf)
    build(C.chunk_state_kernel, io, dict(H=4, K=128, V=128, C=64, BK=128, BV=32,
          GATE=VECTOR_GATE, REV=True, USE_H0=True, STORE_HT=True, STORE_HS=True, FUSE_OUT=True,
          IS_VARLEN=True, **dt), "state(fused, vector, rev)")
    build(C.chunk_out_kernel, io, dict(H=4, K=100, V=128, C=64, BK=64, BV=64, GATE=SCALAR_GATE,
          REV=False, IS_VARLEN=False, **dt), "out(scalar)")
    build(C.chunk_scores_kernel, io, dict(H=4, D=128, C=64, BC=16, BD=32, GATED=True,
          IS_VARLEN=True, **{n: dt[n] for n in ("DT", "PREC")}), "scores(vector)")
    build(C.chunk_intra_grad_kernel, io, dict(H=4, K=128, C=64, BC=16, BK=32, IS_VARLEN=False,
          **{n: dt[n] for n in ("DT", "PREC")}), "intra_grad")
    build(C.chunk_dqkg_kernel, dict(io, dg=bf), dict(H=4, K=128, V=128, C=64, BK=64, BV=64,
          GATE=VECTOR_GATE, HAS_DG=True, IS_VARLEN=True, **dt), "dqkg(vector)")
    build(R.recurrent_fwd_kernel, io, dict(H=4, K=128, V=128, BK=128, BV=64, GATE=VECTOR_GATE,
          HAS_GAMMA=True, USE_H0=True, STORE_FIN=True, BWD=True, IS_VARLEN=True),
          "recurrent_fwd(bwd walk)")
    build(R.recurrent_bwd_kernel, io, dict(H=4, K=128, V=128, BK=128, BV=64, GATE=SCALAR_GATE,
          HAS_GAMMA=False, USE_DHT=True, STORE_DH0=True, IS_VARLEN=False), "recurrent_bwd")


def test_kernels_compile_for_sm90():
    """The interpreter runs code the compiler would reject (and ignores shared-memory limits):
    compile the main configs for an H100 target on the CPU, in a subprocess without
    TRITON_INTERPRET."""
    compile_in_subprocess(__file__, "_sm90_configs", 7)


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("path", ["single", "two"])
def test_gpu_fp32(op, path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_OPS_GLA_SINGLE_PASS", "1" if path == "single" else "0")
    nan_filled_empty(monkeypatch)
    check(op, "chunk", 2, 300, 2, 128, 64, lengths=None)
    check(op, "chunk", 1, 300, 2, 64, 100, lengths=[1, 130, 0, 169])


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("op", ["gla", "simple_both"])
def test_gpu_recurrent_fp32(op):
    check(op, "recurrent", 2, 64, 2, 128, 128)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op,mode,path", [
    ("gla", "chunk", "single"), ("gla", "chunk", "two"), ("simple_both", "chunk", "single"),
    ("simple_g", "chunk", "two"), ("linear", "chunk", "two"), ("gla", "recurrent", None),
])
def test_gpu_low_precision_parity(op, mode, path, dtype, monkeypatch):
    """Against the fp32-input float64 truth, the triton path in bf16/fp16 is within 2x of the
    reference run on the same low-precision inputs (plain PyTorch in that dtype)."""
    if path is not None:
        monkeypatch.setenv("LIGHTNING_OPS_GLA_SINGLE_PASS", "1" if path == "single" else "0")
    x = _inputs(op, 2, 200, 2, 64, 64, device="cuda")
    truth = reference_run(x)
    low = with_grad(x, dtype)

    def ref_low(t):
        return reference.gated_linear_attn_ref(t["q"], t["k"], t["v"], t["g"], t["gamma"], None,
                                               t["h0"], True, t["cu"])

    base = _errors(run(low, ref_low), truth)
    with lo.use_backend("triton"):
        ours = _errors(run(with_grad(x, dtype), lambda t: _call(op, mode, t)), truth)
    assert_lowp_parity(ours, base, what=f"{op}/{mode} {dtype}")


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("op", ["gla", "simple_both"])
def test_gpu_compile_fullgraph(op):
    x = _inputs(op, 2, 256, 4, 64, 64, device="cuda", dtype=torch.bfloat16)

    def f(t):
        with lo.use_backend("triton"):
            return _call(op, "chunk", t)

    cf = torch.compile(f, fullgraph=True)
    eager = run(with_grad(x), f)
    comp = run(with_grad(x), cf)
    assert torch.equal(eager[0], comp[0]) and torch.equal(eager[1], comp[1])
    for n in GRAD_NAMES:
        if eager[2][n] is not None:
            assert torch.equal(eager[2][n], comp[2][n]), n


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("op", ["gla", "simple_g"])
def test_gpu_long_extreme_gates_finite(op):
    """Gates down to -20 per token over 8K tokens: outputs and gradients stay finite."""
    x = _inputs(op, 1, 8192, 2, 64, 64, low=-20.0, device="cuda", dtype=torch.bfloat16)
    with lo.use_backend("triton"):
        o, ht, grads = run(with_grad(x), lambda t: _call(op, "chunk", t))
    for t in [o, ht] + [grads[n] for n in GRAD_NAMES if grads[n] is not None]:
        assert torch.isfinite(t).all()


@pytest.mark.gpu
@requires_gpu
def test_gpu_varlen_no_host_sync():
    """Varlen forward + backward with CUDA sync debugging set to error on any host sync."""
    x = _inputs("gla", 1, 300, 2, 64, 64, lengths=[1, 130, 0, 169], device="cuda",
                dtype=torch.bfloat16)
    t = with_grad(x)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with lo.use_backend("triton"):
            o, ht = _call("gla", "chunk", t)
            (o.float().sum() + ht.sum()).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@requires_gpu
def test_gpu_deterministic():
    x = _inputs("gla", 2, 1000, 4, 128, 128, device="cuda", dtype=torch.bfloat16,
                lengths=None)
    outs = []
    for _ in range(2):
        with lo.use_backend("triton"):
            o, ht, grads = run(with_grad(x), lambda t: _call("gla", "chunk", t))
        outs.append([o, ht] + [grads[n] for n in GRAD_NAMES if grads[n] is not None])
    for a, b in zip(*outs):
        assert torch.equal(a, b)

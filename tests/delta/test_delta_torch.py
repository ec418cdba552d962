"""Delta-rule family on the torch backend: the chunked WY engine against reference.py (float64,
<= 1e-10 relative), dtypes, stability, bad input; GPU dtype parity under @pytest.mark.gpu
(within 2x of plain PyTorch's own bf16 / fp16 error: helpers.lowp_bound)."""
import pytest
import torch

import lightning_ops as lo
from delta_cases import (CASES, KDA_CASES, Case, compare, make_inputs, outputs_and_grads,
                         run_op, run_ref)
from helpers import (assert_close, assert_lowp_parity, nan_filled_empty, rel_err, rel_rms,
                     requires_gpu)
from lightning_ops import reference
from lightning_ops.delta import torch as delta_torch


@pytest.mark.parametrize("case", CASES + KDA_CASES, ids=lambda c: c.id)
def test_matches_reference_float64(case, monkeypatch):
    inputs, cu = make_inputs(case)
    want = outputs_and_grads(*run_ref(case, inputs, cu))
    nan_filled_empty(monkeypatch)  # anything the engine forgets to write is NaN
    with lo.use_backend("torch"):
        got = outputs_and_grads(*run_op(case, inputs, cu))
    compare(case, got, want, 1e-10, rel_err)


def test_small_chunks_cross_many_chunk_boundaries(monkeypatch):
    """C=4: varlen segments straddle many chunks, and a 1-token segment sits mid-stream."""
    monkeypatch.setattr(delta_torch, "TORCH_CHUNK", 4)
    case = Case(T=30, H=2, HV=4, K=8, V=8, lengths=[13, 1, 16], l2=True)
    inputs, cu = make_inputs(case, seed=3)
    want = outputs_and_grads(*run_ref(case, inputs, cu))
    with lo.use_backend("torch"):
        got = outputs_and_grads(*run_op(case, inputs, cu))
    compare(case, got, want, 1e-10, rel_err)


def test_strong_gates_stay_exact():
    """Gates down to -20 per token: the chunk engine's masked exponents stay finite."""
    case = Case(T=130, H=2, K=16, V=16, l2=True)
    (q, k, v, g, beta, h0), _ = make_inputs(case)
    g = g * 20.0
    with lo.use_backend("torch"):
        o, ht = lo.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0,
                                          output_final_state=True, use_qk_l2norm_in_kernel=True)
    ro, rht = reference.gated_delta_rule_ref(q, k, v, g, beta, None, h0, True, None, True)
    assert_close("o", o, ro, 1e-10)
    assert_close("ht", ht, rht, 1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype):
    """fp32/fp16/bf16 inputs (fla rejects fp32 here; we don't): o and grads in the input dtype,
    states fp32, a bf16 initial_state used as fp32. Against the fp64 reference on the same
    (rounded) inputs the error is the fp32 compute plus rounding the results to `dtype`."""
    case = Case(B=2, T=80, H=2, HV=4, K=32, V=16, l2=True)
    inputs, cu = make_inputs(case)
    low = [x.to(dtype) for x in inputs[:5]] + [inputs[5].to(torch.bfloat16)]
    want = outputs_and_grads(*run_ref(case, [x.double() for x in low], cu))
    with lo.use_backend("torch"):
        outs, leaves = run_op(case, low, cu)
    assert outs[0].dtype == dtype and outs[1].dtype == torch.float32
    got = outputs_and_grads(outs, leaves)
    for name, leaf in zip(["dq", "dk", "dv", "dg", "dbeta", "dinitial_state"], leaves):
        assert got[name].dtype == leaf.dtype, name
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}[dtype]
    for name in want:  # d initial_state comes back in its (bf16) dtype
        assert_close(name, got[name], want[name],
                     1.5e-2 if name == "dinitial_state" else tol, rel_rms)


def test_stability_long_sequence_fp32():
    """T=8192 in fp32: beta in (0, 2), unnormalised keys through the in-kernel l2 norm, gates
    with -20 spikes. Finite everywhere and within fp32 tolerance of the fp64 reference."""
    gen = torch.Generator().manual_seed(7)
    B, T, H, K, V = 1, 8192, 1, 16, 16
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v = r(B, T, H, K) * 3, r(B, T, H, K) * 5 + 1, r(B, T, H, V)
    beta = torch.rand(B, T, H, generator=gen, dtype=torch.float64) * 1.98 + 0.01
    g = torch.nn.functional.logsigmoid(r(B, T, H) * 2 + 4)
    g = torch.where(torch.rand(B, T, H, generator=gen, dtype=torch.float64) < 0.01, -20.0, g)
    h0 = r(B, H, K, V)
    inputs = [q, k, v, g, beta, h0]
    case = Case(T=T, K=K, V=V, l2=True)
    want = outputs_and_grads(*run_ref(case, inputs, None))
    with lo.use_backend("torch"):
        got = outputs_and_grads(*run_op(case, [x.float() for x in inputs], None))
    for name in want:
        assert_close(name, got[name], want[name], 2e-5, rel_rms)


def test_deterministic():
    case = Case(T=100, H=2, K=16, V=16, l2=True)
    inputs, cu = make_inputs(case)
    with lo.use_backend("torch"):
        a = outputs_and_grads(*run_op(case, [x.float() for x in inputs], cu))
        b = outputs_and_grads(*run_op(case, [x.float() for x in inputs], cu))
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ------------------------------------------------------------------------------------------------
# Bad input: clear errors before any compute, nothing mutated
# ------------------------------------------------------------------------------------------------
def _good(HV=4):
    q = torch.randn(1, 5, 2, 8)
    return dict(q=q, k=torch.randn(1, 5, 2, 8), v=torch.randn(1, 5, HV, 4),
                g=-torch.rand(1, 5, HV), beta=torch.rand(1, 5, HV))


@pytest.mark.parametrize("change, exc, words", [
    (dict(beta=torch.rand(1, 5, 2)), ValueError, ["beta", "[1, 5, 4]", "[1, 5, 2]"]),
    (dict(g=torch.rand(1, 5, 4, 8)), ValueError, ["g", "[1, 5, 4]", "[1, 5, 4, 8]"]),
    (dict(g=None), ValueError, ["g is required"]),
    (dict(v=torch.randn(1, 5, 3, 4)), ValueError, ["v", "multiple"]),
    (dict(k=torch.randn(1, 5, 2, 8, dtype=torch.float64)), TypeError, ["k", "float64"]),
    (dict(beta=torch.ones(1, 5, 4, dtype=torch.int32)), TypeError, ["beta", "int32"]),
    (dict(initial_state=torch.zeros(1, 2, 8, 4)), ValueError, ["initial_state", "[1, 4, 8, 4]"]),
    (dict(use_qk_l2norm_in_kernel=1), TypeError, ["use_qk_l2norm_in_kernel", "bool"]),
    (dict(cu_seqlens=torch.tensor([0, 3, 4])), ValueError, ["cu_seqlens", "T=5"]),
])
def test_bad_input(change, exc, words):
    kw = _good()
    kw.update(change)
    snapshot = {n: t.clone() for n, t in kw.items() if isinstance(t, torch.Tensor)}
    with pytest.raises(exc) as info:
        lo.chunk_gated_delta_rule(**kw)
    for w in words:
        assert w in str(info.value), (w, str(info.value))
    for n, t in snapshot.items():
        assert torch.equal(kw[n], t), f"{n} was mutated"


def test_beta_is_required_for_the_plain_delta_rule():
    kw = _good(HV=2)
    with pytest.raises(ValueError, match="beta is required"):
        lo.chunk_delta_rule(kw["q"], kw["k"], kw["v"], None)


# ------------------------------------------------------------------------------------------------
# GPU: bf16 / fp16 parity (skipped without CUDA)
# ------------------------------------------------------------------------------------------------
def _plain_lowp(q, k, v, g, beta, h0, dtype):
    """The naive recurrence with every tensor (state included) in `dtype`: the error plain
    PyTorch gets at that precision."""
    scale = q.shape[-1] ** -0.5
    q, k = reference.l2norm(q.to(dtype)), reference.l2norm(k.to(dtype))
    v, g, beta, S = v.to(dtype), g.to(dtype), beta.to(dtype), h0.to(dtype).clone()
    o = torch.empty_like(v)
    for t in range(q.shape[1]):
        decay = g[:, t].exp()
        S = S * (decay[..., None] if g.dim() == 4 else decay[..., None, None])
        err = v[:, t] - torch.einsum("bhk,bhkv->bhv", k[:, t], S)
        S = S + beta[:, t, :, None, None] * k[:, t, ..., None] * err[..., None, :]
        o[:, t] = scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S)
    return o, S


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("vector", [False, True], ids=["gdn", "kda"])
def test_gpu_low_precision_parity(dtype, backend, vector):
    case = Case(B=2, T=300, H=4, K=64, V=64, l2=True, vector=vector)
    inputs, _ = make_inputs(case, torch.float32, "cuda")
    q, k, v, g, beta, h0 = inputs
    want_o, want_h = reference.gated_delta_rule_ref(q, k, v, g, beta, None, h0, True, None, True)
    base_o, base_h = _plain_lowp(q, k, v, g, beta, h0, dtype)
    with lo.use_backend(backend):
        fn = lo.chunk_kda if vector else lo.chunk_gated_delta_rule
        o, ht = fn(*[x.to(dtype) for x in (q, k, v, g, beta)],
                                          initial_state=h0, output_final_state=True,
                                          use_qk_l2norm_in_kernel=True)
    assert o.dtype == dtype and torch.isfinite(o).all()
    assert_lowp_parity({"o": rel_rms(o, want_o), "ht": rel_rms(ht, want_h)},
                       {"o": rel_rms(base_o, want_o), "ht": rel_rms(base_h, want_h)},
                       floor=1e-6, what=f"{backend} {dtype}")

"""GPU: every family at the largest supported head dims (K = V = 256, and V = 512; K = 512 for
gated linear attention, as fla's own tests run chunk_gla), where the
sm_90 shared-memory limit bites (see benchmarks/results/sm90_resources.csv): bf16 and fp32
outputs and gradients against the float64 reference spec, through the public API on the
default (Triton) backend. Inputs and references come from the benchmark registry."""
from __future__ import annotations

import pytest
import torch

from helpers import rel_rms, requires_gpu

# (op, B, T, H, K, V): registry layouts (SSD: n = K states, head dim p = min(V, 64);
# the scan: D = H * V channels, N = 16 states)
CASES = [(op, K, V) for op in ("chunk_linear_attn", "chunk_simple_gla", "lightning_attn",
                               "chunk_gla", "chunk_delta_rule", "chunk_gated_delta_rule",
                               "chunk_kda")
         for K, V in ((256, 256), (128, 512), (256, 512))]
CASES += [("chunk_gla", 512, 64), ("chunk_simple_gla", 512, 512)]
CASES += [("mamba_chunk_scan_combined", 256, 64), ("selective_scan_fn", 16, 256)]
# the log-linear Gated DeltaNet: Triton forward (loglinear/triton_delta.py), torch recompute
# backward
CASES += [("chunk_log_linear_gated_delta_rule", K, V) for K, V in ((128, 128), (256, 512))]
TOL = {torch.float32: (1e-4, 1e-3), torch.bfloat16: (2e-2, 5e-2)}  # (output, gradients)


def _run(op_name, K, V, dtype):
    from benchmarks.registry import OPS, Config, main_output, provider_function
    op = OPS[op_name]
    cfg = Config(B=2, T=160, H=2, K=K, V=V, ssd_chunk=64)
    d = op.dims(cfg)
    kw = op.kwargs(d)
    inp = op.make_inputs(cfg, dtype, "cuda", seed=3, grad=True)
    ref_in = {k: v.detach().double().requires_grad_(v.requires_grad) for k, v in inp.items()}
    out = main_output(provider_function("ours-triton", op)(inp, kw))
    ref = main_output(op.reference(ref_in, kw))
    do = torch.randn_like(ref)
    leaves = [k for k, v in inp.items() if v.requires_grad]
    got_g = torch.autograd.grad(out, [inp[k] for k in leaves], do.to(out.dtype), allow_unused=True)
    ref_g = torch.autograd.grad(ref, [ref_in[k] for k in leaves], do, allow_unused=True)
    return out, ref, dict(zip(leaves, got_g)), dict(zip(leaves, ref_g))


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("op_name,K,V", CASES)
def test_largest_head_dims(op_name, K, V, dtype):
    out, ref, g, rg = _run(op_name, K, V, dtype)
    tol_o, tol_g = TOL[dtype]
    assert out.dtype == dtype
    e = rel_rms(out, ref)
    assert e <= tol_o, f"{op_name} K={K} V={V} {dtype}: output rel RMS {e:.3g}"
    for name, gr in g.items():
        if rg[name] is None:
            continue
        assert gr is not None, f"{op_name}: no gradient for {name}"
        e = rel_rms(gr, rg[name])
        assert e <= tol_g, f"{op_name} K={K} V={V} {dtype}: d{name} rel RMS {e:.3g}"


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("K,V", [(256, 256), (128, 512), (512, 512)])
@pytest.mark.parametrize("op_name", ["fused_recurrent_gla", "fused_recurrent_simple_gla",
                                     "fused_recurrent_gated_delta_rule", "fused_recurrent_kda"])
def test_decode_largest_head_dims(op_name, K, V):
    if K > 256 and ("delta" in op_name or "kda" in op_name):
        pytest.skip("K <= 256 for the delta rule (validation.MAX_KEY_DIM)")
    """One decode step from a state at the largest head dims, bf16 against the fp32 chunk op."""
    import lightning_ops as lo
    B, H = 3, 2
    q, k = (torch.randn(B, 1, H, K, device="cuda") for _ in range(2))
    k = torch.nn.functional.normalize(k, dim=-1)
    v = torch.randn(B, 1, H, V, device="cuda")
    h0 = torch.randn(B, H, K, V, device="cuda")
    vector = op_name in ("fused_recurrent_gla", "fused_recurrent_kda")
    gshape = (B, 1, H, K) if vector else (B, 1, H)
    g = torch.nn.functional.logsigmoid(torch.randn(gshape, device="cuda"))
    delta = "delta" in op_name or "kda" in op_name
    args = [q, k, v, g] + ([torch.rand(B, 1, H, device="cuda")] if delta else [])
    fn = getattr(lo, op_name)
    chunk = getattr(lo, op_name.replace("fused_recurrent", "chunk"))
    o32, h32 = chunk(*args, initial_state=h0, output_final_state=True)
    o, h = fn(*[a.bfloat16() for a in args], initial_state=h0, output_final_state=True)
    assert rel_rms(o.float(), o32) <= 2e-2
    assert rel_rms(h, h32) <= 2e-2

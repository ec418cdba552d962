"""Registry rows of chunk_kda and chunk_log_linear_attn (issue 15): their cost model by hand,
their inputs, and ours-torch against the float64 reference."""
import pytest
import torch

from benchmarks import registry as R
from benchmarks.registry import OPS, Config


def test_kda_counts_by_hand():
    cfg, op = Config(B=1, T=128, H=2, K=16, V=32), OPS["chunk_kda"]
    # fp32: q, k, g (per key channel) 128*2*16*4 = 16384 B each; v, o 32768 B; beta 1024 B
    fwd = 3 * 16384 + 32768 + 1024 + 32768
    assert op.bytes(cfg, torch.float32, "fwd") == fwd
    assert op.bytes(cfg, torch.float32, "bwd") == fwd + (3 * 16384 + 32768 + 1024)
    # the delta-rule count 6*T*K*V + T*C*(3K+2V) + T*C^2/3 per (b, h), C = 64
    f = 2 * (6 * 128 * 16 * 32 + 128 * 64 * (3 * 16 + 2 * 32) + 128 * 64 * 64 // 3)
    assert f == 2970964 and op.flops(cfg, "fwd") == f and op.flops(cfg, "fwd+bwd") == 3 * f
    inp = op.make_inputs(cfg, torch.float32, "cpu")
    assert inp["g"].shape == (1, 128, 2, 16) and (inp["g"] < 0).all()  # per-channel log decay
    assert op.peers == {"fla": ("fla.ops.kda", "chunk_kda")}


def test_log_linear_counts_by_hand():
    cfg, op = Config(B=1, T=256, H=2, K=16, V=32), OPS["chunk_log_linear_attn"]
    d = op.dims(cfg)
    assert d == dict(B=1, T=256, G=1, H=2, K=16, V=32, L=9)  # bit_length(255) + 1 levels
    # fp32: q, k [1, 256, 1, 16] 16384 B each; v, o 65536 B; g 2048 B; level_scales [.., 9]
    fwd = 2 * 16384 + 65536 + 2048 + 256 * 2 * 9 * 4 + 65536
    assert fwd == 184320 and op.bytes(cfg, torch.float32, "fwd") == fwd
    # 4 chunks of 64: chunks 0..3 read popcount(a) = 0 + 1 + 1 + 2 = 4 level states;
    # per (b, h): 2*T*K*V (chunk states) + 2*C*K*V*4 (level reads) + T*C*(K+V) (intra)
    f = 2 * (2 * 256 * 16 * 32 + 2 * 64 * 16 * 32 * 4 + 256 * 64 * 48)
    assert f == 2621440 and op.flops(cfg, "fwd") == f
    assert op.shape_label(cfg) == "B1 T256 G1 H2 K16 V32"  # L follows T: not in the label
    inp = op.make_inputs(cfg, torch.float32, "cpu")
    assert (inp["level_scales"] > 0).all() and (inp["g"] < 0).all()
    assert torch.allclose(inp["k"].norm(dim=-1), torch.ones(1, 256, 1), atol=1e-5)


@pytest.mark.parametrize("T", [1, 2, 40, 64, 65, 256])
def test_log_linear_levels_cover_every_reachable_level(T):
    """L is the number of levels a query at a position < T can reach: no fewer (the row would
    drop keys), no more (it would pay for empty levels)."""
    from lightning_ops.reference import log_linear_level
    L = OPS["chunk_log_linear_attn"].dims(Config(B=1, T=T, H=1, K=4, V=4))["L"]
    assert max(log_linear_level(s, t) for t in range(T) for s in range(t + 1)) == L - 1


def test_log_linear_backends_with_notes():
    """chunk_log_linear_attn and the log-linear Gated DeltaNet: torch anywhere, triton on CUDA
    (a note on CPU), no cuda backend."""
    op, cpu = OPS["chunk_log_linear_attn"], torch.device("cpu")
    assert R.provider_missing("ours-torch", op, cpu) is None
    assert "CUDA only" in R.provider_missing("ours-triton", op, cpu)
    assert "loglinear ops have no cuda backend" in R.provider_missing("ours-cuda", op, cpu)
    delta = OPS["chunk_log_linear_gated_delta_rule"]
    assert R.provider_missing("ours-torch", delta, cpu) is None
    assert "CUDA only" in R.provider_missing("ours-triton", delta, cpu)
    why = R.provider_missing("ours-cuda", delta, cpu)
    assert why and "loglinear_delta ops have no cuda backend" in why
    assert "CUDA" in R.provider_missing("fla", op, cpu)
    assert R.provider_missing("sdpa", op, cpu) is None  # a causal q/k/v op: causal SDPA
    assert R.asked_but_unavailable(["chunk_kda", "chunk_log_linear_attn"], None, cpu) == []


@pytest.mark.parametrize("name", ["chunk_kda", "chunk_log_linear_attn"])
def test_ours_torch_matches_the_reference(name):
    cfg, op = Config(B=1, T=70, H=2, K=8, V=16), OPS[name]
    inp = op.make_inputs(cfg, torch.float64, "cpu")
    got = R.main_output(R.provider_function("ours-torch", op)(inp, op.kwargs(op.dims(cfg))))
    want = R.main_output(op.reference(inp, op.kwargs(op.dims(cfg))))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    cases = R.pytest_cases()
    assert {(name, "ours-torch"), (name, "sdpa")} <= {(c.op, c.provider) for c in cases}

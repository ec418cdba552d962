"""Registry rows of lion_attn (bidirectional): its cost model by hand, and non-causal SDPA as its
baseline (separate from the causal SDPA row of the causal ops)."""
import torch

from benchmarks import registry as R
from benchmarks.registry import OPS, SDPA, SDPA_FULL, Config


def test_lion_counts_by_hand():
    cfg, op = Config(B=1, T=128, H=2, K=16, V=32), OPS["lion_attn"]
    # fp32: q, k 128*2*16*4 = 16384 B each; g [B, T, H] 1024 B; v, o 32768 B each
    assert op.bytes(cfg, torch.float32, "fwd") == 2 * 16384 + 1024 + 32768 + 32768
    assert op.bytes(cfg, torch.float32, "bwd") == (2 * 16384 + 1024 + 32768 + 32768) + (
        2 * 16384 + 1024 + 32768)
    # two directions of the chunked linear-attention count 4*T*K*V + T*C*(K+V), C = 64
    f = 2 * 2 * (4 * 128 * 16 * 32 + 128 * 64 * 48)
    assert op.flops(cfg, "fwd") == f and op.flops(cfg, "fwd+bwd") == 3 * f


def test_non_causal_sdpa_is_lions_baseline():
    cfg = Config(B=1, T=128, H=2, K=16, V=32)
    lion, gla = OPS["lion_attn"], OPS["chunk_gla"]
    assert R.spec_for("sdpa", lion) is SDPA_FULL and R.spec_for("sdpa", gla) is SDPA
    # full T x T attention: 2 T^2 (K + V) per (b, h), twice the causal count; same bytes
    assert SDPA_FULL.flops(cfg, "fwd") == 2 * 2 * 128 * 128 * 48 == 2 * SDPA.flops(cfg, "fwd")
    assert SDPA_FULL.flops(cfg, "fwd+bwd") == 3.5 * SDPA_FULL.flops(cfg, "fwd")
    assert SDPA_FULL.bytes(cfg, torch.float32, "fwd") == SDPA.bytes(cfg, torch.float32, "fwd")
    cpu = torch.device("cpu")
    assert R.provider_missing("sdpa", lion, cpu) is None
    # one measurement per (causality, shape): lion's never shares the causal ops' SDPA row
    k_lion = R.Case("lion_attn", "sdpa", cfg, "fwd", "fp32").key()
    k_gla = R.Case("chunk_gla", "sdpa", cfg, "fwd", "fp32").key()
    assert k_lion != k_gla and k_lion[0] == "sdpa_full"
    # the run function is non-causal and matches the non-causal reference
    inp = SDPA_FULL.make_inputs(Config(B=1, T=12, H=2, K=8, V=16), torch.float64, "cpu")
    got = R.provider_function("sdpa", lion)(inp, {})
    torch.testing.assert_close(got, SDPA_FULL.reference(inp, {}))
    causal = R.provider_function("sdpa", gla)(inp, {})
    assert not torch.allclose(got[..., :-1, :], causal[..., :-1, :])


def test_lion_ours_torch_matches_its_reference():
    cfg, op = Config(B=1, T=40, H=2, K=8, V=16), OPS["lion_attn"]
    assert R.provider_missing("ours-torch", op, torch.device("cpu")) is None
    inp = op.make_inputs(cfg, torch.float64, "cpu")
    got = R.main_output(R.provider_function("ours-torch", op)(inp, {}))
    torch.testing.assert_close(got, op.reference(inp, {}), rtol=1e-10, atol=1e-10)
    cases = R.pytest_cases()
    assert {("lion_attn", "ours-torch"), ("lion_attn", "sdpa")} <= {(c.op, c.provider)
                                                                    for c in cases}

"""The cost model (FLOP and byte counts) against hand counts, and the inputs it describes."""
import math

import pytest
import torch

from benchmarks import registry as R
from benchmarks.registry import OPS, SDPA, Config


def test_chunk_gla_counts_by_hand():
    cfg, op = Config(B=1, T=128, H=2, K=16, V=32), OPS["chunk_gla"]
    # fp32: q, k, g 128*2*16*4 = 16384 B each; v, o 128*2*32*4 = 32768 B each
    assert op.bytes(cfg, torch.float32, "fwd") == 3 * 16384 + 32768 + 32768
    # bwd: the 4 inputs + do, and the 4 gradients
    assert op.bytes(cfg, torch.float32, "bwd") == (81920 + 32768) + 81920
    assert op.bytes(cfg, torch.float32, "fwd+bwd") == 114688 + 196608
    # per (b, h): 4*T*K*V + T*C*(K+V), C = 64
    f = 2 * (4 * 128 * 16 * 32 + 128 * 64 * 48)
    assert f == 1310720
    assert op.flops(cfg, "fwd") == f
    assert op.flops(cfg, "bwd") == 2 * f
    assert op.flops(cfg, "fwd+bwd") == 3 * f


def test_lightning_slope_is_fp32_and_takes_no_gradient():
    cfg, op = Config(B=1, T=128, H=2, K=16, V=32), OPS["lightning_attn"]
    # bf16 q, k 8192 B each, v and o 16384 B; slope [H] fp32 = 8 B
    assert op.bytes(cfg, torch.bfloat16, "fwd") == 2 * 8192 + 16384 + 8 + 16384
    assert op.bytes(cfg, torch.bfloat16, "bwd") == (2 * 8192 + 16384 + 8) + 16384 + 32768
    inp = op.make_inputs(cfg, torch.bfloat16, "cpu", grad=True)
    assert inp["slope"].dtype == torch.float32 and not inp["slope"].requires_grad
    assert inp["q"].dtype == torch.bfloat16 and inp["q"].requires_grad


def test_delta_and_sdpa_flops_by_hand():
    d = Config(B=1, T=64, H=1, K=16, V=16)
    # 6*T*K*V + T*C*(3K+2V) + T*C^2/3 with C = 64
    assert OPS["chunk_delta_rule"].flops(d, "fwd") == 98304 + 327680 + 87381
    s = Config(B=1, T=128, H=2, K=16, V=32)
    # causal: T^2 (K+V) per (b, h); bwd 2.5x
    assert SDPA.flops(s, "fwd") == 2 * 128 * 128 * 48 == 1572864
    assert SDPA.flops(s, "fwd+bwd") == 3.5 * 1572864
    assert SDPA.bytes(s, torch.float32, "fwd") == (2 * 128 * 2 * 16 + 2 * 128 * 2 * 32) * 4


def test_ssm_counts_by_hand():
    ss = OPS["selective_scan_fn"]
    cfg = Config(B=2, T=10, H=2, K=64, V=4)  # D = H*V = 8 channels, N = 16
    assert ss.dims(cfg) == dict(B=2, D=8, N=16, L=10)
    assert ss.flops(cfg, "fwd") == 9 * 2 * 10 * 8 * 16 + 2 * 2 * 8 * 10
    # fp32: u, delta, z 640 B each; A 512; B, C 1280 each; D, delta_bias 32 each; y 640
    assert ss.bytes(cfg, torch.float32, "fwd") == 3 * 640 + 512 + 2 * 1280 + 64 + 640
    # bf16 activations, fp32 parameters (as mamba-ssm requires)
    assert ss.bytes(cfg, torch.bfloat16, "fwd") == 3 * 320 + 512 + 2 * 640 + 64 + 320
    ssd = OPS["mamba_chunk_scan_combined"]
    c2 = Config(B=1, T=256, H=2, K=32, V=128)
    assert ssd.dims(c2) == dict(B=1, L=256, h=4, p=64, n=32, g=1, C=256)
    assert ssd.flops(c2, "fwd") == 4 * (4 * 256 * 32 * 64 + 256 * 256 * 96)
    conv = OPS["causal_conv1d_fn"]
    assert conv.flops(cfg, "fwd") == 2 * 2 * 8 * 10 * 4
    # x 640, weight 8*4*4 = 128, bias 32, y 640
    assert conv.bytes(cfg, torch.float32, "fwd") == 640 + 128 + 32 + 640


@pytest.mark.parametrize("name", list(OPS) + ["sdpa"])
def test_bytes_match_the_real_tensors(name):
    """The byte formula equals the inputs the factory makes (at their stored size: stride-0
    expansions count once) + the output the spec returns + the states it writes."""
    spec = SDPA if name == "sdpa" else OPS[name]
    cfg = Config(B=1, T=12, H=2, K=8, V=16, ssd_chunk=4)
    inp = spec.make_inputs(cfg, torch.float64, "cpu", grad=True)
    nbytes = {n: x.untyped_storage().nbytes() for n, x in inp.items()}
    out = R.main_output(spec.reference(inp, spec.kwargs(spec.dims(cfg))))
    assert tuple(out.shape) == spec.shape_of(spec.output, spec.dims(cfg))
    in_bytes = sum(nbytes.values())
    out_bytes = out.numel() * out.element_size() + sum(nbytes[n] for n in spec.writes)
    assert spec.bytes(cfg, torch.float64, "fwd") == in_bytes + out_bytes
    grads = sum(nbytes[n] for n, x in inp.items() if x.requires_grad)
    assert spec.bytes(cfg, torch.float64, "bwd") == (in_bytes + out_bytes) + grads
    assert spec.tokens(cfg) == 12


def test_inputs_are_realistic_and_never_zero():
    cfg = Config(B=1, T=32, H=2, K=8, V=8)
    g = OPS["chunk_gla"].make_inputs(cfg, torch.float32, "cpu")["g"]
    assert (g < 0).all() and g.min() > -20  # logsigmoid decays
    d = OPS["chunk_gated_delta_rule"].make_inputs(cfg, torch.float32, "cpu")
    assert ((d["beta"] > 0) & (d["beta"] < 1)).all()
    assert torch.allclose(d["k"].norm(dim=-1), torch.ones(1, 32, 2), atol=1e-5)
    for op in OPS.values():
        for name, x in op.make_inputs(cfg, torch.float32, "cpu").items():
            assert (x != 0).all(), f"{op.name}.{name} has zeros"
    a = OPS["chunk_gla"].make_inputs(cfg, torch.float32, "cpu", seed=0)["q"]
    b = OPS["chunk_gla"].make_inputs(cfg, torch.float32, "cpu", seed=1)["q"]
    assert not torch.equal(a, b)  # rotated input sets differ


def test_plan_orders_cheap_first_and_shares_sdpa():
    s = R.suite("cpu")
    cases, notes = R.plan(s, ["chunk_gla", "causal_conv1d_fn"], None, ("fwd", "fwd+bwd"),
                          (1024, 4096), ("fp32",), torch.device("cpu"))
    # (the peers' pure-PyTorch references join when installed: test_bench_peer_refs.py)
    order = list(dict.fromkeys((c.op, c.provider, c.cfg.T) for c in cases
                               if c.provider not in R.PEER_REFS))
    n1024 = sum(1 for o in order if o[2] == 1024)
    assert all(o[2] == 1024 for o in order[:n1024])  # every op at the smallest T first
    # then the headline rows by growing T, then the rest
    assert order[n1024:] == [("chunk_gla", "ours-torch", 4096), ("chunk_gla", "sdpa", 4096),
                             ("chunk_gla", "ours-torch", 16384), ("chunk_gla", "sdpa", 16384),
                             ("causal_conv1d_fn", "ours-torch", 4096)]
    assert not [c for c in cases if c.provider == "reference"]  # only when asked for
    sd = [c for c in cases if c.provider == "sdpa"]
    assert sd and all(c.op == "chunk_gla" for c in sd)  # conv1d has no SDPA baseline
    k1 = R.Case("chunk_gla", "sdpa", s.base, "fwd", "fp32").key()
    k2 = R.Case("chunk_simple_gla", "sdpa", s.base, "fwd", "fp32").key()
    assert k1 == k2  # one SDPA measurement per shape


def test_missing_op_is_a_note_not_a_crash(monkeypatch):
    import lightning_ops
    monkeypatch.delattr(lightning_ops, "chunk_gla")
    why = R.provider_missing("ours-torch", OPS["chunk_gla"], torch.device("cpu"))
    assert why and "no public function chunk_gla" in why
    cases, notes = R.plan(R.suite("quick"), ["chunk_gla"], None, ("fwd",), (64,), ("fp32",),
                          torch.device("cpu"))
    assert all(c.provider != "ours-torch" for c in cases)
    assert any("chunk_gla: ours-torch skipped" in n for n in notes)


def test_peers_are_optional_on_cpu():
    op = OPS["chunk_gla"]
    assert "CUDA" in R.provider_missing("fla", op, torch.device("cpu"))
    assert "CUDA" in R.provider_missing("ours-triton", op, torch.device("cpu"))
    assert R.provider_missing("sdpa", OPS["selective_scan_fn"], torch.device("cpu"))
    assert math.isfinite(op.flops(Config(1, 8, 1, 4, 4), "fwd"))


def test_asked_but_unavailable_providers_are_errors():
    cpu = torch.device("cpu")
    assert R.asked_but_unavailable(list(OPS), None, cpu) == []
    assert R.asked_but_unavailable(["chunk_gla", "causal_conv1d_fn"], ["ours-torch", "sdpa"],
                                   cpu) == []  # sdpa runs for one of them: fine
    (e,) = R.asked_but_unavailable(["chunk_gla"], ["fla"], cpu)
    assert e.startswith("provider fla cannot run here") and "CUDA" in e

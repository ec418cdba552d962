"""The peers' pure-PyTorch references as benchmark providers (issue 18): fla-naive (fla 0.6.0's
naive ops), mamba-ref (mamba-ssm's selective_scan_ref, ssd_minimal_discrete,
selective_state_update_ref), conv1d-ref (causal-conv1d's causal_conv1d_ref and
causal_conv1d_update_ref); the decode-step rows and chunk_log_linear_gated_delta_rule.

The peers are optional (`make peers`): without them each provider is skipped with a note; with
them (in the venv) one small shape of each runs and agrees with our op."""
import sys

import pytest
import torch

from benchmarks import registry as R
from benchmarks import report
from benchmarks.registry import OPS, Config

CPU = torch.device("cpu")
EXPECTED = {
    "fla-naive": {"chunk_gla": "naive_recurrent_gla",
                  "chunk_simple_gla": "naive_chunk_simple_gla",
                  "chunk_linear_attn": "naive_chunk_linear_attn",
                  "lightning_attn": "naive_chunk_simple_gla",
                  "chunk_delta_rule": "delta_rule_chunkwise",
                  "chunk_gated_delta_rule": "naive_chunk_gated_delta_rule",
                  "chunk_kda": "naive_chunk_kda",
                  "chunk_log_linear_attn": "naive_log_linear_attn",
                  "fused_recurrent_gated_delta_rule": "naive_recurrent_gated_delta_rule"},
    "mamba-ref": {"selective_scan_fn": "selective_scan_ref",
                  "mamba_chunk_scan_combined": "ssd_minimal_discrete",
                  "selective_state_update": "selective_state_update_ref"},
    "conv1d-ref": {"causal_conv1d_fn": "causal_conv1d_ref",
                   "causal_conv1d_update": "causal_conv1d_update_ref"},
}
PAIRS = [(op, p) for p, ops in EXPECTED.items() for op in ops]


@pytest.fixture
def fresh_imports():
    """Each test sees the import of the references afresh (the registry caches it)."""
    R._REF_CACHE.clear()
    yield
    R._REF_CACHE.clear()


def test_the_rows_and_providers_exist():
    assert R.PEER_REFS == ("fla-naive", "mamba-ref", "conv1d-ref")
    assert set(R.PEER_REFS) <= set(R.PROVIDERS)
    got = {p: {n: op.peer_refs[p].attr for n, op in OPS.items() if p in op.peer_refs}
           for p in R.PEER_REFS}
    assert got == EXPECTED
    for p, ops in EXPECTED.items():
        pkg = R.PEER_REF_PACKAGES[p][0]
        assert all(OPS[n].peer_refs[p].module.startswith(pkg + ".") for n in ops)
    # on CPU by default; on GPU only when asked for (the fast kernels are the comparison there)
    assert set(R.PEER_REFS) <= set(R.default_providers(CPU))
    assert not set(R.PEER_REFS) & set(R.default_providers(torch.device("cuda")))
    # every row has a plot
    plotted = {o for _, ops in report.FAMILIES.values() for o in ops}
    assert set(OPS) <= plotted


def test_absent_peer_is_a_skip_note(monkeypatch, fresh_imports):
    monkeypatch.setattr(R, "_peer_installed", lambda dist: False)
    for op, p in PAIRS:
        why = R.provider_missing(p, OPS[op], CPU)
        assert why.startswith("not installed: ") and "make peers" in why and ".[peers]" in why
    cases, notes = R.plan(R.suite("quick"), list(OPS), None, ("fwd", "fwd+bwd"), (64,),
                          ("fp32",), CPU)
    assert not [c for c in cases if c.provider in R.PEER_REFS]
    assert "chunk_gla: fla-naive skipped: not installed: fla-core (optional: `make peers`, or " \
           "pip install .[peers])" in notes
    for op, p in PAIRS:
        assert any(n.startswith(f"{op}: {p} skipped: not installed") for n in notes)
    (e,) = R.asked_but_unavailable(["selective_scan_fn"], ["mamba-ref"], CPU)
    assert e.startswith("provider mamba-ref cannot run here: not installed: mamba-ssm")
    assert R.provider_missing("mamba-ref", OPS["chunk_gla"], CPU) == \
        "mamba-ref has no reference of this op"


def test_a_cuda_extension_imported_at_the_top_gets_a_stand_in(tmp_path, monkeypatch,
                                                               fresh_imports):
    """mamba-ssm and causal-conv1d import their CUDA extension in their package's __init__ path:
    on a CPU install the import stands a placeholder in for it, only while importing."""
    (tmp_path / "fakepeer").mkdir()
    (tmp_path / "fakepeer" / "__init__.py").write_text(
        "import fakepeer_cuda_ext\n"
        "def ref(x):\n    return x + 1\n"
        "def fast(x):\n    return fakepeer_cuda_ext.fwd(x)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(R, "_peer_installed", lambda dist: True)
    try:
        fn, why = R._import_peer_ref("fakepeer", "fakepeer", (), "fakepeer", "ref")
        assert fn is None and "fakepeer is installed but fakepeer.ref does not import" in why
        assert "ModuleNotFoundError" in why
        fn, why = R._import_peer_ref("fakepeer", "fakepeer", ("fakepeer_cuda_ext",),
                                     "fakepeer", "ref")
        assert why is None and fn(1) == 2
        assert "fakepeer_cuda_ext" not in sys.modules  # removed after the import
        with pytest.raises(RuntimeError, match="CUDA extension.*not built"):
            sys.modules["fakepeer"].fast(1)
    finally:
        sys.modules.pop("fakepeer", None)


def test_our_own_function_is_not_a_peer(monkeypatch, fresh_imports):
    """With lightning_ops.compat's patch active, a peer's name may hold our function."""
    monkeypatch.setattr(R, "_peer_installed", lambda dist: True)
    fn, why = R._import_peer_ref("fla", "fla-core", (), "lightning_ops.reference", "gla_ref")
    assert fn is None and "lightning_ops' own" in why


def test_quadratic_reference_stops_at_its_max_T(monkeypatch, fresh_imports):
    monkeypatch.setattr(R, "_import_peer_ref", lambda *a: (lambda **kw: None, None))
    cases, notes = R.plan(R.suite("cpu"), ["chunk_log_linear_attn"], ["ours-torch", "fla-naive"],
                          ("fwd",), (512, 1024), ("fp32",), CPU)
    got = {(c.provider, c.cfg.T) for c in cases}
    assert got == {("ours-torch", 512), ("ours-torch", 1024), ("fla-naive", 512)}
    assert "chunk_log_linear_attn: fla-naive skipped: above T=512 (its T x T tensors)" in notes


def test_decode_steps_run_once_at_T1_forward_only():
    cases, _ = R.plan(R.suite("cpu"), list(OPS), ["ours-torch"], ("fwd", "fwd+bwd"),
                      (256, 1024), ("fp32",), CPU)
    steps = [c for c in cases if OPS[c.op].decode]
    assert sorted(c.op for c in steps) == ["causal_conv1d_update",
                                           "fused_recurrent_gated_delta_rule",
                                           "selective_state_update"]
    assert all(c.cfg.T == 1 and c.mode == "fwd" for c in steps)
    n0 = sum(1 for c in cases if c.cfg.T == 256)
    assert set(cases[:n0 + len(steps)]) >= set(steps)  # with the smallest sizes, first


def test_decode_counts_by_hand():
    cfg = Config(B=2, T=1, H=2, K=32, V=128)
    ssu = OPS["selective_state_update"]
    assert ssu.dims(cfg) == dict(B=2, h=4, p=64, n=32, g=1)
    inp = ssu.make_inputs(cfg, torch.float32, "cpu")
    # Mamba2.step's arguments: A, dt, dt_bias, D stride-0 expansions of [h] / [B, h]
    assert inp["A"].shape == (4, 64, 32) and inp["A"].stride() == (1, 0, 0)
    assert inp["dt"].shape == (2, 4, 64) and inp["dt"].stride()[-1] == 0
    assert inp["D"].stride() == (1, 0) and inp["dt_bias"].stride() == (1, 0)
    # state 2*4*64*32*4 B, read and written; x, out 2*4*64*4 B; dt 2*4*4; A, D, dt_bias 4*4
    # each; B, C 2*32*4 each
    st = 2 * 4 * 64 * 32 * 4
    assert ssu.bytes(cfg, torch.float32, "fwd") == st + 2048 + 32 + 3 * 16 + 2 * 256 + 2048 + st
    assert ssu.flops(cfg, "fwd") == 5 * 2 * 4 * 64 * 32
    conv = OPS["causal_conv1d_update"]
    # x, out [2, 256]; conv_state [2, 256, 4] read + written; weight [256, 4]; bias [256]
    assert conv.bytes(cfg, torch.float32, "fwd") == 2048 + 2 * 8192 + 4096 + 1024 + 2048
    assert conv.flops(cfg, "fwd") == 2 * 2 * 256 * 4
    gdn = OPS["fused_recurrent_gated_delta_rule"]
    assert gdn.flops(cfg, "fwd") == 7 * 2 * 2 * 32 * 128
    state = 2 * 2 * 32 * 128 * 4
    # q, k 512 B each, v and o 2048 B each, g, beta 16 B each, the state in and out
    assert gdn.bytes(cfg, torch.float32, "fwd") == 2 * 512 + 2048 + 32 + state + 2048 + state


def test_log_linear_gated_delta_rule_row():
    cfg, op = Config(B=1, T=256, H=2, K=16, V=32), OPS["chunk_log_linear_gated_delta_rule"]
    assert op.family == "loglinear_delta" and not op.peers and not op.peer_refs
    assert op.dims(cfg) == OPS["chunk_log_linear_attn"].dims(cfg)
    inp = op.make_inputs(cfg, torch.float32, "cpu")
    assert ((inp["beta"] > 0) & (inp["beta"] < 1)).all() and inp["q"].shape == (1, 256, 1, 16)
    # the log-linear count + T*C*(2K+V) + T*C^2/3 + T*C*K + 2*T*K^2 + 2*K^2*V*P, P = 4 level
    # states read over the 4 chunks (see test_log_linear_counts_by_hand)
    extra = 256 * 64 * 64 + 256 * 64 * 64 // 3 + 256 * 64 * 16 + 2 * 256 * 256 + 2 * 256 * 32 * 4
    assert op.flops(cfg, "fwd") == OPS["chunk_log_linear_attn"].flops(cfg, "fwd") + 2 * extra
    small = Config(B=1, T=70, H=2, K=8, V=16)
    x = op.make_inputs(small, torch.float64, "cpu")
    got = R.main_output(R.provider_function("ours-torch", op)(x, {}))
    torch.testing.assert_close(got, R.main_output(op.reference(x, {})), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["selective_state_update", "causal_conv1d_update",
                                  "fused_recurrent_gated_delta_rule"])
def test_decode_accuracy_checks_output_and_written_state(name):
    from benchmarks.cli import Accuracy
    cfg = Config(B=2, T=40, H=2, K=16, V=32, ssd_chunk=16)
    op = OPS[name]
    err, note = Accuracy(cfg, CPU)(R.Case(name, "ours-torch", cfg, "fwd", "fp32"),
                                   R.provider_function("ours-torch", op))
    assert note == "" and err < 1e-5


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("op_name,provider", PAIRS, ids=[f"{o}-{p}" for o, p in PAIRS])
def test_installed_peer_reference_agrees_with_our_op(op_name, provider):
    """Runs only where the peer is installed (`make peers`): one small shape with a T that is no
    multiple of the chunk (the adapters pad), the output and any state written in place."""
    op = OPS[op_name]
    why = R.provider_missing(provider, op, CPU)
    if why is not None:
        pytest.skip(f"{provider}: {why}")
    cfg = Config(B=2, T=100, H=2, K=16, V=32, ssd_chunk=32)
    kwargs = op.kwargs(op.dims(cfg))
    ours_in = op.make_inputs(cfg, torch.float32, "cpu", seed=3)
    peer_in = op.make_inputs(cfg, torch.float32, "cpu", seed=3)
    ours = R.main_output(R.provider_function("ours-torch", op)(ours_in, kwargs))
    peer = R.main_output(R.provider_function(provider, op)(peer_in, kwargs))
    assert peer.shape == ours.shape
    assert _rel(peer, ours) < 1e-4
    for n in op.writes:
        assert _rel(peer_in[n], ours_in[n]) < 1e-4

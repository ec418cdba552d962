"""Property-based parity: hypothesis draws shapes, chunk boundaries, gate magnitudes (including
-inf resets and huge negatives) and varlen splits, and every gated op on the torch backend must
match reference.py in float64 (o, final state and every gradient, relative RMS <= 1e-9).
Kept to a few dozen small examples per op so the CPU suite stays fast."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import lightning_ops as lo  # noqa: E402
from lightning_ops import reference as R  # noqa: E402
from helpers import (assert_close, backward_probe, cu_seqlens_from_lengths,  # noqa: E402
                     grads_of, rel_rms)

TOL = 1e-9
SETTINGS = settings(max_examples=15, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# name: (op, reference, gate: None | "scalar" | "vector", has beta)
OPS = {
    "chunk_linear_attn": (lo.chunk_linear_attn, R.linear_attn_ref, None, False),
    "fused_recurrent_linear_attn": (lo.fused_recurrent_linear_attn, R.linear_attn_ref, None,
                                    False),
    "chunk_simple_gla": (lo.chunk_simple_gla, R.simple_gla_ref, "scalar", False),
    "fused_recurrent_simple_gla": (lo.fused_recurrent_simple_gla, R.simple_gla_ref, "scalar",
                                   False),
    "chunk_gla": (lo.chunk_gla, R.gla_ref, "vector", False),
    "fused_recurrent_gla": (lo.fused_recurrent_gla, R.gla_ref, "vector", False),
    "chunk_delta_rule": (lo.chunk_delta_rule, R.delta_rule_ref, None, True),
    "fused_recurrent_delta_rule": (lo.fused_recurrent_delta_rule, R.delta_rule_ref, None, True),
    "chunk_gated_delta_rule": (lo.chunk_gated_delta_rule, R.gated_delta_rule_ref, "scalar",
                               True),
    "fused_recurrent_gated_delta_rule": (lo.fused_recurrent_gated_delta_rule,
                                         R.gated_delta_rule_ref, "scalar", True),
    "chunk_kda": (lo.chunk_kda, R.kda_ref, "vector", True),
    "fused_recurrent_kda": (lo.fused_recurrent_kda, R.kda_ref, "vector", True),
}

# per-token log decays: ordinary, strong, a reset, huge
GATE_VALUES = st.sampled_from([-0.01, -0.3, -2.0, -20.0, float("-inf"), -1e4, -1e30])


@st.composite
def problems(draw, gate):
    lengths = draw(st.lists(st.integers(0, 70), min_size=1, max_size=3))
    varlen = draw(st.booleans()) and sum(lengths) > 0
    if varlen:
        B, T = 1, sum(lengths)
    else:
        B, T, lengths = draw(st.integers(1, 2)), draw(st.integers(1, 140)), None
    H = draw(st.integers(1, 2))
    K = draw(st.sampled_from([4, 16, 24]))
    V = draw(st.sampled_from([3, 16, 32]))
    seed = draw(st.integers(0, 2 ** 16))
    gen = torch.Generator().manual_seed(seed)
    x = {"q": torch.randn(B, T, H, K, generator=gen, dtype=torch.float64),
         "k": torch.randn(B, T, H, K, generator=gen, dtype=torch.float64),
         "v": torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)}
    if gate is not None:
        shape = (B, T, H) if gate == "scalar" else (B, T, H, K)
        g = -0.1 * torch.rand(*shape, generator=gen, dtype=torch.float64)
        for _ in range(draw(st.integers(0, 4))):  # a few extreme tokens anywhere
            if T:
                g[draw(st.integers(0, B - 1)), draw(st.integers(0, T - 1))] = draw(GATE_VALUES)
        x["g"] = g
    if draw(st.booleans()):
        N = B if lengths is None else len(lengths)
        x["h0"] = torch.randn(N, H, K, V, generator=gen, dtype=torch.float64)
    return x, lengths


def _check(name, data):
    op, ref, gate, has_beta = OPS[name]
    x, lengths = data.draw(problems(gate))
    if has_beta:
        x["q"], x["k"] = F.normalize(x["q"], dim=-1), F.normalize(x["k"], dim=-1)
        x["beta"] = torch.rand(x["q"].shape[:3], dtype=torch.float64)
    cu = None if lengths is None else cu_seqlens_from_lengths(lengths)
    names = list(x)

    def run(f):
        leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
        args = [leaves["q"], leaves["k"], leaves["v"]]
        if gate is not None:
            args.append(leaves["g"])
        if has_beta:
            args.append(leaves["beta"])
        o, ht = f(*args, initial_state=leaves.get("h0"), output_final_state=True,
                  cu_seqlens=cu)
        if o.numel() == 0:
            return [o, ht]
        return [o, ht] + grads_of(backward_probe([o, ht]), [leaves[n] for n in names])

    with lo.use_backend("torch"):
        got = run(op)
    exp = run(ref)
    for what, a, e in zip(["o", "ht"] + ["d" + n for n in names], got, exp):
        assert_close(f"{name} {what} (lengths={lengths})", a, e, TOL, metric=rel_rms)


@pytest.mark.parametrize("name", list(OPS))
@SETTINGS
@given(data=st.data())
def test_matches_reference(name, data):
    _check(name, data)

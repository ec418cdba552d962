"""The layers with cp_context= (context parallel, lightning_ops.cp) on 2 gloo CPU ranks: each
rank runs its slice of the tokens, and the output, dL/dx and every parameter gradient (summed
over the ranks) equal the single-process layer on the whole input, in float32 (<= 1e-5
relative); cp.hmamba_chunk_scan_combined against the public op (float64); a layer under
torch.compile(fullgraph=True) with the collective in its graph; the errors raised before any
collective. One spawn for all the rank cases (process start-up dominates on CI)."""
from __future__ import annotations

import pytest
import torch

from cp_harness import make_layer, run_ranks, worker_layers

import lightning_ops.cp as cp

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed is not available")

F32_TOL = 1e-5
# varlen: sequence 1 crosses the rank boundary at 12, sequence 2 is empty
VARLEN = [0, 5, 17, 17, 24]


def test_cp_layers_two_ranks():
    cases = [
        ("gla", 1, 24, VARLEN, F32_TOL),
        ("lightning", 2, 24, None, F32_TOL),
        ("delta", 1, 24, VARLEN, F32_TOL),
        ("gated_delta", 2, 24, None, F32_TOL),
        ("kda", 1, 24, VARLEN, F32_TOL),
        ("hgrn2", 2, 16, None, F32_TOL),
        ("hedgehog", 1, 24, VARLEN, F32_TOL),
        ("mamba2", 1, 24, VARLEN, F32_TOL),
        ("mamba2_mlp", 2, 24, None, F32_TOL),
        ("log_linear_mamba2", 1, 24, VARLEN, F32_TOL),
        ("log_linear_mamba2_gate", 2, 24, None, F32_TOL),
        ("log_linear_gated_delta", 1, 24, VARLEN, F32_TOL),
        ("log_linear_gated_delta_wide", 2, 24, None, F32_TOL),
    ]
    run_ranks(2, worker_layers, cases, ("check_compiled_cp", "check_hmamba_op"), timeout=300)


def _ctx():
    return cp.build_cp_context(torch.tensor([0, 5, 8]), rank=0, world=2)  # rank 0: 4 tokens


def test_cp_layer_errors_before_any_collective():
    import layers as L
    x = torch.randn(1, 4, 16)
    gla = make_layer("gla")
    with pytest.raises(ValueError, match="attention_mask cannot be combined with cp_context"):
        gla(x, attention_mask=torch.ones(1, 4), cp_context=_ctx())
    with pytest.raises(ValueError, match="GLOBAL cu_seqlens"):
        gla(x, cu_seqlens=torch.tensor([0, 4]), cp_context=_ctx())
    with pytest.raises(ValueError, match="cached states"):
        L.GatedLinearAttention(hidden_size=16, num_heads=2, layer_idx=0)(
            x, past_key_values=L.Cache(), use_cache=True, cp_context=_ctx())
    with pytest.raises(ValueError, match="cached states"):
        gla.mix(x, output_final_state=True, cp_context=_ctx())
    with pytest.raises(TypeError, match="build_cp_context"):
        gla(x, cp_context=object())
    with pytest.raises(ValueError, match="context gives this rank"):  # the op's own check
        gla(torch.randn(1, 5, 16), cp_context=_ctx())
    m2 = make_layer("mamba2")
    with pytest.raises(ValueError, match="cached states"):
        m2(x, inference_params=L.InferenceParams(max_seqlen=8, max_batch_size=1),
           cp_context=_ctx())
    with pytest.raises(ValueError, match="seq_idx"):
        m2(x, seq_idx=torch.zeros(1, 4, dtype=torch.int32), cp_context=_ctx())
    # the log-linear layers: the mixer's checks, then the ops' own (no short conv in front of
    # the log-linear Gated DeltaNet's op; the conv's in front of log-linear Mamba-2's scan)
    llm = make_layer("log_linear_mamba2")
    lld = L.LogLinearGatedDeltaNet(hidden_size=16, head_dim=8, num_heads=2, num_levels=4,
                                   use_short_conv=False, layer_idx=0)
    for layer in (llm, lld):
        with pytest.raises(ValueError, match="attention_mask cannot be combined with cp_context"):
            layer(x, attention_mask=torch.ones(1, 4), cp_context=_ctx())
        with pytest.raises(ValueError, match="cached states"):
            layer.mix(x, output_final_state=True, cp_context=_ctx())
        with pytest.raises(ValueError, match="context gives this rank"):
            layer(torch.randn(1, 5, 16), cp_context=_ctx())
    with pytest.raises(ValueError, match="cached states"):
        lld(x, past_key_values=L.Cache(), use_cache=True, cp_context=_ctx())
    xs, dt, A = torch.randn(1, 5, 2, 4), torch.randn(1, 5, 2), -torch.rand(2)
    Bc, dl, lv = torch.randn(1, 5, 1, 4), torch.randn(1, 5, 2, 4), torch.ones(2, 4)
    with pytest.raises(ValueError, match="context gives this rank"):
        cp.hmamba_chunk_scan_combined(xs, dt, A, Bc, Bc, dl, lv, cp_context=_ctx())
    with pytest.raises(ValueError, match="seq_idx"):
        cp.hmamba_chunk_scan_combined(xs, dt, A, Bc, Bc, dl, lv, cp_context=_ctx(),
                                      seq_idx=torch.zeros(1, 5, dtype=torch.int32))
    unsupported = [L.Mamba(d_model=16), L.LION(hidden_size=16, num_heads=2),
                   L.MomAttention(hidden_size=16, head_dim=8, num_heads=2, num_memories=2,
                                  topk=1)]
    for layer in unsupported:
        with pytest.raises(NotImplementedError, match="cp_context"):
            layer(x, cp_context=_ctx())
    conv = L.ShortConvolution(16, 4)
    with pytest.raises(ValueError, match="ShortConvolution: with cp_context"):
        conv(x, None, None, None, True, cp_context=_ctx())

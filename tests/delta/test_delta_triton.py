"""Delta-rule family on the Triton backend, against reference.py: fp32 inputs, the reference in
float64 on the same values, <= 1e-5 relative RMS (TRITON_INTERPRET=1 on CPU, or a GPU)."""
import pytest
import torch

import lightning_ops as lo
from delta_cases import (KDA_CASES, Case, compare, make_inputs, outputs_and_grads, run_op,
                         run_ref)
from helpers import nan_filled_empty, rel_rms, requires_triton, triton_device
from sm90_compile import build, compile_in_subprocess

pytestmark = requires_triton

TRITON_CASES = [
    Case(T=1),                                                         # one token, B=H=1
    Case(B=2, T=37, K=32, V=16, gated=False),                          # T < chunk, K != V
    Case(T=150, K=20, V=12, l2=True),                                  # 3 chunks, odd dims
    Case(T=70, H=2, HV=4, K=16, V=8, l2=True, scale=0.7),              # grouped value heads
    Case(T=100, HV=2, K=16, V=32, lengths=[1, 1, 64, 0, 34], l2=True),  # varlen, 1- and 0-length
    Case(T=67, K=16, V=16, lengths=[65, 1, 1], gated=False, h0=False, final=False),
    Case(T=20, K=128, V=64, l2=True),                                  # large head dims
    Case(T=20, K=256, V=32, gated=False),
    Case(T=9, H=2, HV=4, K=16, V=8, mode="recurrent", l2=True, lengths=[4, 1, 4]),  # decode
    Case(B=2, T=5, K=32, V=16, mode="recurrent", gated=False),
]


def _check(case: Case, monkeypatch, scale_g: float = 1.0, seed: int = 0):
    dev = triton_device()
    inputs, cu = make_inputs(case, torch.float32, dev, seed=seed)
    if inputs[3] is not None:
        inputs[3] = inputs[3] * scale_g
    want = outputs_and_grads(*run_ref(case, [None if x is None else x.double()
                                             for x in inputs], cu))
    nan_filled_empty(monkeypatch)  # anything a kernel forgets to write is NaN
    with lo.use_backend("triton"):
        got = outputs_and_grads(*run_op(case, inputs, cu))
    assert got["o"].dtype == torch.float32
    compare(case, got, want, 1e-5, rel_rms)


@pytest.mark.parametrize("case", TRITON_CASES + KDA_CASES, ids=lambda c: c.id)
def test_matches_reference(case, monkeypatch):
    _check(case, monkeypatch)


@pytest.mark.parametrize("vector", [False, True], ids=["gdn", "kda"])
def test_strong_gates(monkeypatch, vector):
    """Gates down to -20 per token (per channel for KDA): every exponent the kernels take
    stays <= 0."""
    _check(Case(T=130, K=16, V=16, l2=True, vector=vector), monkeypatch, scale_g=20.0, seed=5)


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_bf16_inputs(mode):
    """bf16 inputs: close to the float64 reference on the same (bf16-rounded) values. Under the
    interpreter this once gave garbage (relative errors ~1e10): bf16 tl.dot is wrong there, so
    dot_config must keep interpreted products in fp32."""
    case = Case(T=40, H=1, HV=2, K=16, V=8, l2=True, mode=mode)
    inputs, cu = make_inputs(case, torch.bfloat16, triton_device())
    want = outputs_and_grads(*run_ref(case, [None if x is None else x.double()
                                             for x in inputs], cu))
    with lo.use_backend("triton"):
        got = outputs_and_grads(*run_op(case, inputs, cu))
    assert got["o"].dtype == torch.bfloat16
    compare(case, got, want, 2e-2, rel_rms)


def test_float64_inputs_run_in_fp32():
    """float64 in, float64 out (computed in fp32, the kernels' widest arithmetic)."""
    case = Case(T=40, K=16, V=16)
    inputs, cu = make_inputs(case, torch.float64, triton_device())
    want = outputs_and_grads(*run_ref(case, inputs, cu))
    with lo.use_backend("triton"):
        got = outputs_and_grads(*run_op(case, inputs, cu))
    assert got["o"].dtype == torch.float64 and got["final_state"].dtype == torch.float64
    compare(case, got, want, 1e-5, rel_rms)


def _sm90_state_walks():
    """The state walks (bf16, K=V=128, scalar and vector gates), compiled for sm_90 by
    sm90_compile.build (in the subprocess of test_state_walk_kernels_compile_for_sm90)."""
    import triton.language as tl
    from lightning_ops.chunk.constants import SCALAR_GATE, VECTOR_GATE
    from lightning_ops.delta import triton as D
    bf, i32 = "*bf16", "*i32"
    types = dict(cu_seqlens=i32, chunk_offsets=i32, scale="fp32", T="i32", NT="i32",
                 q=bf, k=bf, do=bf)
    for gate in (SCALAR_GATE, VECTOR_GATE):
        build(D.delta_state_kernel, types, dict(H=4, K=128, V=128, BK=128, BV=32, GATE=gate,
              USE_H0=True, STORE_HT=True, IS_VARLEN=True, DT_S=tl.bfloat16, PREC="tf32"),
              num_warps=8)
        build(D.delta_state_bwd_kernel, types, dict(H=4, K=128, V=128, BK=128, BV=32, GATE=gate,
              USE_DHT=True, STORE_DH0=True, IS_VARLEN=False, DT=tl.bfloat16, DT_S=tl.bfloat16,
              PREC="tf32"), num_warps=8)


def test_state_walk_kernels_compile_for_sm90():
    """The interpreter accepts code the compiler rejects: compile the state walks (bf16,
    K=V=128) for an H100 target on the CPU, in a subprocess without TRITON_INTERPRET."""
    compile_in_subprocess(__file__, "_sm90_state_walks", 4, timeout=600)

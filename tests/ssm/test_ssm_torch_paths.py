"""The torch backend's own code paths in the SSM family (float64 against the reference, <= 1e-10):
the selective scan's time blocks (a block boundary anywhere, one token per block up to the
default), its hand-written backward, causality for non-finite inputs, and the F.conv1d path of
causal_conv1d_fn in every combination of activation, history and final state."""
import pytest
import torch

from helpers import rel_err
from lightning_ops import reference
from lightning_ops.backend import use_backend
from lightning_ops.ssm import torch as ssm_torch
from lightning_ops.ssm.ops import causal_conv1d_fn, selective_scan_fn
from ssm_cases import as_ref, check_parity, conv_inputs, scan_inputs

ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
TOL = 1e-10


@pytest.fixture
def torch_backend():
    with use_backend("torch"):
        yield


@pytest.mark.parametrize("block_bytes", [1, 3 * 8 * 16 * 5, None])  # 8-token blocks, 16, default
@pytest.mark.parametrize("b, d, n, L, groups, full", [
    (2, 6, 5, 37, 3, True),       # grouped, ragged last block
    (1, 4, 16, 64, None, False),  # L a multiple of the block
    (2, 3, 4, 9, 1, True),        # one token in the last block
])
def test_scan_blocks_parity(torch_backend, monkeypatch, block_bytes, b, d, n, L, groups, full):
    if block_bytes is not None:
        monkeypatch.setattr(ssm_torch, "_SCAN_BLOCK_BYTES", block_bytes)
    inp = scan_inputs(b, d, n, L, groups, D=full, z=full, bias=full, seed=L + n)
    ref_in = as_ref(inp)
    y, last = selective_scan_fn(*[inp[k] for k in ARGS], delta_softplus=full,
                                return_last_state=True)
    y_ref, last_ref = reference.selective_scan_ref(*[ref_in[k] for k in ARGS],
                                                   delta_softplus=full, return_last_state=True)
    check_parity(("y", "last_state"), (y, last), (y_ref, last_ref), inp, ref_in, TOL, rel_err)


def test_scan_block_size_is_shape_only():
    """The aux the forward saves is sized from shapes alone (the fake impl calls it)."""
    u, A = torch.empty(2, 1536, 4096), torch.empty(1536, 16)
    T = ssm_torch._scan_block(2, 1536, 16, 4)
    assert ssm_torch.scan_aux_shape(u, A) == (-(-4096 // T), 2, 1536, 16)
    assert ssm_torch._SCAN_BLOCK_MIN <= T <= ssm_torch._SCAN_BLOCK_MAX


def test_scan_backward_runs_no_autograd(torch_backend, monkeypatch):
    """The backward is hand-written: no grad_by_recompute."""
    def boom(*a, **k):
        raise AssertionError("recompute backward used")
    monkeypatch.setattr(ssm_torch, "_recompute_grads", boom)
    inp = scan_inputs(1, 3, 4, 20, None, seed=2)
    selective_scan_fn(*[inp[k] for k in ARGS], delta_softplus=True).sum().backward()
    assert inp["u"].grad is not None


@pytest.mark.parametrize("bad", ["u", "delta", "B", "C"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_scan_non_finite_token_never_reaches_earlier_outputs(torch_backend, monkeypatch, bad,
                                                             value):
    monkeypatch.setattr(ssm_torch, "_SCAN_BLOCK_BYTES", 1)  # 8-token blocks: t mid-block
    inp = {k: None if v is None else v.detach().float()
           for k, v in scan_inputs(1, 4, 3, 40, None, seed=7).items()}
    t = 21
    if bad in ("B", "C"):
        inp[bad][0, 1, t] = value
    else:
        inp[bad][0, 2, t] = value
    y = selective_scan_fn(*[inp[k] for k in ARGS], delta_softplus=True)
    y_ref = reference.selective_scan_ref(*[None if inp[k] is None else inp[k].double()
                                           for k in ARGS], delta_softplus=True)
    assert torch.isfinite(y[..., :t]).all(), f"bad {bad} at {t} reached earlier tokens"
    assert rel_err(y[..., :t], y_ref[..., :t]) <= 1e-5


@pytest.mark.parametrize("W", [2, 3, 4])
@pytest.mark.parametrize("L", [1, 2, 5, 70])
@pytest.mark.parametrize("act", [None, "silu"])
@pytest.mark.parametrize("h0, bias", [(False, False), (True, True), (False, True),
                                      (True, False)])
def test_conv_paths_parity(torch_backend, W, L, act, h0, bias):
    inp = conv_inputs(2, 3, L, W, bias=bias, h0=h0, seed=L * W)
    ref_in = as_ref(inp)
    out, fin = causal_conv1d_fn(inp["x"], inp["weight"], inp["bias"], inp["initial_states"],
                                True, act)
    out_ref, fin_ref = reference.causal_conv1d_ref(ref_in["x"], ref_in["weight"],
                                                   ref_in["bias"], ref_in["initial_states"],
                                                   True, act)
    check_parity(("out", "final_states"), (out, fin), (out_ref, fin_ref), inp, ref_in, TOL,
                 rel_err)


def test_conv_out_only_gradients(torch_backend):
    """Without final states (dfinal absent) the gradients still match."""
    inp = conv_inputs(1, 4, 33, 4, bias=True, h0=True, seed=3)
    ref_in = as_ref(inp)
    out = causal_conv1d_fn(inp["x"], inp["weight"], inp["bias"], inp["initial_states"],
                           activation="silu")
    out_ref = reference.causal_conv1d_ref(ref_in["x"], ref_in["weight"], ref_in["bias"],
                                          ref_in["initial_states"], False, "silu")
    out_ref = out_ref[0] if isinstance(out_ref, tuple) else out_ref
    check_parity(("out",), (out,), (out_ref,), inp, ref_in, TOL, rel_err)

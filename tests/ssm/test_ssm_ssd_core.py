"""The torch backend's SSD paths (float64 against reference.ssd_ref, <= 1e-10): the grouped core
(_SSDCore: C B^T once per group) across many chunks, the engine-contract path (B / C repeated per
head, what the Triton backend runs) with the torch engine standing in, the fallback for
non-finite inputs, and the rule that no backward re-runs a forward (with z the forward hands the
pre-gate output to the backward)."""
import types

import pytest
import torch

from helpers import cu_seqlens_from_lengths, nan_filled_empty, rel_err
from lightning_ops import reference
from lightning_ops.backend import use_backend
from lightning_ops.ssm import torch as ssm_torch
from lightning_ops.ssm.ops import mamba_chunk_scan_combined
from ssm_cases import as_ref, check_parity, ssd_inputs

ARGS = ("x", "dt", "A", "B", "C")
TOL = 1e-10


@pytest.fixture
def torch_backend(monkeypatch):
    nan_filled_empty(monkeypatch)
    with use_backend("torch"):
        yield


def _run(inp, **kw):
    return mamba_chunk_scan_combined(*[inp[k] for k in ARGS], 16, D=inp["D"], z=inp["z"],
                                     dt_bias=inp["dt_bias"],
                                     initial_states=inp["initial_states"],
                                     return_final_states=True, **kw)


def _ref(inp, **kw):
    return reference.ssd_ref(*[inp[k] for k in ARGS], D=inp["D"], z=inp["z"],
                             dt_bias=inp["dt_bias"], initial_states=inp["initial_states"], **kw)


def _check(inp, **kw):
    ref_in = as_ref(inp)
    out = _run(inp, **kw)
    ref_kw = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    check_parity(("y", "final_states"), out, _ref(ref_in, **ref_kw), inp, ref_in, TOL, rel_err)


class _Counting:
    """A chunk-engine stand-in: the torch engine through its forward/backward contract (so
    ssd_forward / ssd_backward take the path the Triton backend takes), counting calls."""

    def __init__(self):
        self.forward_calls = self.backward_calls = 0
        eng = ssm_torch.chunk_engine
        outer = self

        def forward(*a, **k):
            outer.forward_calls += 1
            return eng.forward(*a, **k)

        def backward(*a, **k):
            outer.backward_calls += 1
            return eng.backward(*a, **k)
        self.module = types.SimpleNamespace(forward=forward, backward=backward)


@pytest.mark.parametrize("chunk", [4, 8, 64])
@pytest.mark.parametrize("b, l, h, p, g, n, D, opts", [
    (2, 45, 4, 3, 2, 5, "h", dict(dt_softplus=True)),              # 2 heads per group
    (1, 37, 6, 2, 1, 4, "hp", dict(dt_softplus=True, dt_limit=(0.1, 0.7))),  # 6 heads, 1 group
    (2, 20, 3, 4, 3, 3, None, dict()),                             # one head per group
])
def test_grouped_core_parity(torch_backend, monkeypatch, chunk, b, l, h, p, g, n, D, opts):
    """_SSDCore's chunks (a chunk boundary anywhere, ragged last chunk) with groups, D, z,
    dt_bias and initial states: y, final states and every gradient."""
    monkeypatch.setattr(ssm_torch, "SSD_CHUNK_MAX", chunk)
    inp = ssd_inputs(b, l, h, p, g, n, D=D, z=D is not None, dt_bias=D is not None, h0=True,
                     seed=l + chunk)
    _check(inp, **opts)


@pytest.mark.parametrize("chunk", [4, 64])
def test_grouped_core_varlen_and_seq_idx(torch_backend, monkeypatch, chunk):
    monkeypatch.setattr(ssm_torch, "SSD_CHUNK_MAX", chunk)
    lengths = [9, 1, 0, 14]
    inp = ssd_inputs(1, sum(lengths), 4, 3, 2, 4, h0=True, N=len(lengths), seed=5)
    _check(inp, cu_seqlens=cu_seqlens_from_lengths(lengths), dt_softplus=True)
    inp = ssd_inputs(2, 21, 4, 2, 2, 3, h0=True, seed=6)
    seq_idx = torch.zeros(2, 21, dtype=torch.int64)
    seq_idx[0, 5:], seq_idx[0, 6:], seq_idx[1, 13:] = 1, 2, 3
    _check(inp, seq_idx=seq_idx)


def test_engine_contract_path_parity(torch_backend, monkeypatch):
    """The path other engines take (B / C repeated per head, the engine's own forward /
    backward), run here by the torch engine in float64, against the reference."""
    eng = _Counting()
    fwd, bwd = ssm_torch.ssd_forward, ssm_torch.ssd_backward
    monkeypatch.setattr(ssm_torch, "ssd_forward",
                        lambda *a, **k: fwd(*a, **{**k, "engine": eng.module}))
    monkeypatch.setattr(ssm_torch, "ssd_backward",
                        lambda *a, **k: bwd(*a, **{**k, "engine": eng.module}))
    inp = ssd_inputs(2, 40, 4, 3, 2, 5, D="hp", h0=True, seed=3)
    _check(inp, dt_softplus=True)
    # with z: one engine forward (the op's), one backward; dz from the saved pre-gate output
    assert (eng.forward_calls, eng.backward_calls) == (1, 1)


@pytest.mark.parametrize("z", [False, True])
def test_backward_runs_no_forward(torch_backend, monkeypatch, z):
    """fwd + bwd runs the core's forward once (in the forward): the backward takes dz's
    pre-gate output from the forward and never calls the engine's forward."""
    calls = {"core": 0, "engine": 0}
    core_fwd = ssm_torch._SSDCore.forward

    def counted(self):
        calls["core"] += 1
        return core_fwd(self)

    def engine_forward(*a, **k):
        calls["engine"] += 1
        raise AssertionError("the engine's forward ran: the grouped core should have")
    monkeypatch.setattr(ssm_torch._SSDCore, "forward", counted)
    monkeypatch.setattr(ssm_torch.chunk_engine, "forward", engine_forward)
    inp = ssd_inputs(1, 70, 4, 3, 1, 4, D="h", z=z, h0=True, seed=4)
    y, fin = _run(inp, dt_softplus=True)
    (y.square().sum() + fin.sum()).backward()
    assert calls == {"core": 1, "engine": 0}
    assert all(inp[k].grad is not None for k in inp if inp[k] is not None)


def test_pre_gate_output_only_when_a_gradient_can_be_asked(monkeypatch):
    """need_pre (the forward returns core + D x for dz) is set with z under grad only."""
    seen = []
    fwd = ssm_torch.ssd_forward

    def spy(*a, **k):
        seen.append(k.get("need_pre"))
        out = fwd(*a, **k)
        seen.append(out[2] is not None)
        return out
    monkeypatch.setattr(ssm_torch, "ssd_forward", spy)
    inp = ssd_inputs(1, 10, 2, 3, 1, 4, D="h", seed=1)
    with use_backend("torch"):
        _run(inp)
        with torch.no_grad():
            _run(inp)
        _run({k: None if v is None else v.detach() for k, v in inp.items()})
        _run({**inp, "z": None})
    assert seen == [True, True, False, False, False, False, False, False]


@pytest.mark.parametrize("bad", ["x", "B", "dt"])
def test_non_finite_input_falls_back_to_guarded_engine(torch_backend, bad):
    """A NaN at token t (x, B or dt) never reaches outputs before t: such inputs run on the
    engine, whose guard keeps causality; earlier outputs equal the reference."""
    inp = {k: None if v is None else v.detach()
           for k, v in ssd_inputs(1, 50, 4, 3, 2, 4, D="h", seed=9).items()}
    t = 29
    inp[bad][0, t, 1] = float("nan")
    y, fin = _run(inp)
    y_ref, _ = _ref(inp)
    assert torch.isfinite(y[:, :t]).all(), f"NaN in {bad} at {t} reached earlier tokens"
    assert (y[:, :t] - y_ref[:, :t]).abs().max() <= TOL * y_ref[:, :t].abs().max()

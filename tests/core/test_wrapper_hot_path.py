"""The per-call wrapper cost (issue 18 item 4): backend.resolve reads LIGHTNING_OPS_BACKEND from
os.environ's own dict and parses a value once, backend.implementation answers loaded modules
from sys.modules, and causal_conv1d_update's common eager call is checked in one pass of plain
compares. None of that may change what is chosen, what is computed or what is rejected."""
import os

import pytest
import torch
from torch.overrides import TorchFunctionMode

import lightning_ops as lo
from lightning_ops import backend
from lightning_ops.ssm import ops as ssm_ops


# ---------------------------------------------------------------------------------- backend
def test_env_changes_take_effect_at_once(monkeypatch):
    monkeypatch.delenv("LIGHTNING_OPS_BACKEND", raising=False)
    assert backend.requested() is None
    os.environ["LIGHTNING_OPS_BACKEND"] = "  Torch "
    try:
        assert backend.requested() == "torch"
        os.environ["LIGHTNING_OPS_BACKEND"] = "CUDA"
        assert backend.requested() == "cuda"
        with pytest.raises(lo.BackendUnavailableError, match="cuda backend needs CUDA"):
            backend.resolve("selective_scan", torch.device("cpu"))
        os.environ["LIGHTNING_OPS_BACKEND"] = ""
        assert backend.requested() is None
        os.environ["LIGHTNING_OPS_BACKEND"] = "tpu"
        with pytest.raises(lo.BackendUnavailableError, match="unknown backend 'tpu'"):
            backend.resolve("gla", torch.device("cpu"))
    finally:
        del os.environ["LIGHTNING_OPS_BACKEND"]
    assert backend.requested() is None
    monkeypatch.setenv("LIGHTNING_OPS_BACKEND", "cuda")
    assert backend.requested() == "cuda"
    with lo.use_backend("torch"):
        assert backend.resolve("gla", torch.device("cpu")) == "torch"


def test_env_read_when_os_environ_is_replaced(monkeypatch):
    """A test harness may swap os.environ for a plain dict: read through it then."""
    monkeypatch.setattr(os, "environ", {"LIGHTNING_OPS_BACKEND": "cuda"})
    assert backend.requested() == "cuda"


def test_implementation_follows_the_module_table(monkeypatch):
    """Loaded modules come from sys.modules, still looked up by _MODULES (tools swap it)."""
    from lightning_ops.ssm import torch as ssm_torch
    assert backend.implementation("conv", "torch") is ssm_torch
    monkeypatch.setitem(backend._MODULES, ("conv", "torch"), "lightning_ops.chunk.torch")
    from lightning_ops.chunk import torch as chunk_torch
    assert backend.implementation("conv", "torch") is chunk_torch


# ------------------------------------------------------------------- causal_conv1d_update
def _case(b=2, d=5, W=4, S=3, bias=True, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g).to(dtype)
    state = torch.randn(b, d, S, generator=g).to(dtype)
    w = torch.randn(d, W, generator=g).to(dtype)
    bb = torch.randn(d, generator=g).to(dtype) if bias else None
    return x, state, w, bb


def _boom(name):
    def f(*a, **k):
        raise AssertionError(f"{name} was called")
    return f


def _close(a, b):
    """The general path (the custom op, tokens as [b, D, 1]) sums the taps in another order
    than the one-token step: equal to rounding, not bit for bit (as before this change)."""
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("b, W, S, bias, act, dtype", [
    (1, 4, 3, True, "silu", torch.float32), (3, 2, 5, False, None, torch.float32),
    (2, 3, 2, True, "swish", torch.bfloat16), (1, 4, 3, True, None, torch.float64)])
def test_fast_path_runs_the_backend_step(b, W, S, bias, act, dtype, monkeypatch):
    """Valid eager calls skip every general check and the custom op, and compute exactly what
    the torch backend's step computes (what the direct call computed before)."""
    from lightning_ops.ssm import torch as ssm_torch
    x, state, w, bb = _case(b=b, W=W, S=S, bias=bias, dtype=dtype)
    ref_state, op_state = state.clone(), state.clone()
    ref = ssm_torch.conv_update(x, ref_state, w, bb, ssm_ops._ACTIVATIONS[act])
    via_op = ssm_ops._conv_update(x.unsqueeze(-1), op_state, w, bb, ssm_ops._ACTIVATIONS[act],
                                  "torch").squeeze(-1)
    for name in ("_conv_update_fits", "_conv_update_check", "_conv_update", "_check_inplace"):
        monkeypatch.setattr(ssm_ops, name, _boom(name))
    out = lo.causal_conv1d_update(x, state, w, bb, act)
    assert out.dtype == x.dtype and torch.equal(out, ref) and torch.equal(state, ref_state)
    assert torch.equal(state, op_state)
    if dtype != torch.bfloat16:
        _close(out, via_op)


class _Passthrough(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _spy_general_path(monkeypatch):
    calls = []
    real = ssm_ops._conv_update_fits

    def spy(*a):
        calls.append(1)
        return real(*a)
    monkeypatch.setattr(ssm_ops, "_conv_update_fits", spy)
    return calls


@pytest.mark.parametrize("change", ["tokens", "grad", "strided_state", "inference", "mode",
                                    "forced_torch"])
def test_general_path_when_the_fast_one_does_not_apply(change, monkeypatch):
    x, state, w, bb = _case(seed=3)
    want_state = state.clone()
    want = lo.causal_conv1d_update(x, want_state, w, bb, "silu")
    calls = _spy_general_path(monkeypatch)
    if change == "tokens":  # [b, D, L]: the general path
        out = lo.causal_conv1d_update(x.unsqueeze(-1), state, w, bb, "silu").squeeze(-1)
    elif change == "grad":
        out = lo.causal_conv1d_update(x.clone().requires_grad_(), state, w, bb, "silu")
    elif change == "strided_state":
        big = torch.zeros(state.shape[0], state.shape[1], 2 * state.shape[2])
        st = big[..., ::2]
        st.copy_(state)
        out = lo.causal_conv1d_update(x, st, w, bb, "silu")
        state = st
    elif change == "inference":
        with torch.inference_mode():
            st = state.clone()
            out = lo.causal_conv1d_update(x, st, w, bb, "silu")
        state = st
    elif change == "mode":
        with _Passthrough():
            out = lo.causal_conv1d_update(x, state, w, bb, "silu")
    else:  # a forced torch backend keeps the fast path
        with lo.use_backend("torch"):
            out = lo.causal_conv1d_update(x, state, w, bb, "silu")
        assert not calls
        calls.append(1)
    assert calls
    _close(out.detach(), want)
    assert torch.equal(state, want_state)


def test_inference_state_outside_inference_mode_is_rejected():
    x, state, w, bb = _case()
    with torch.inference_mode():
        st = state.clone()
    with pytest.raises(ValueError, match="inference tensor"):
        lo.causal_conv1d_update(x, st, w, bb, "silu")


@pytest.mark.parametrize("bad, match", [
    (dict(activation="relu"), "activation must be None, 'silu' or 'swish'"),
    (dict(activation=["silu"]), "activation must be None, 'silu' or 'swish'"),
    (dict(bias=torch.zeros(3)), "bias must have shape"),
    (dict(bias=torch.zeros(4, 1)), "bias must have shape"),
    (dict(weight=torch.zeros(4)), "weight must have shape"),
    (dict(weight=torch.zeros(4, 4, dtype=torch.int64)), "weight must be float16"),
    (dict(conv_state=torch.zeros(2, 4, 2)), "S >= W-1 = 3"),
    (dict(conv_state=torch.zeros(2, 4)), "conv_state must have shape"),
    (dict(x=torch.zeros(2, 4, 1, 1)), "x must have shape"),
    (dict(x=torch.zeros(3, 4)), "conv_state must have shape"),
    (dict(x="x"), "x must be a torch.Tensor"),
])
def test_bad_inputs_keep_their_errors(bad, match):
    args = dict(x=torch.zeros(2, 4), conv_state=torch.zeros(2, 4, 3), weight=torch.zeros(4, 4),
                bias=torch.zeros(4), activation="silu")
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        lo.causal_conv1d_update(**args)


def test_compiled_calls_still_validate():
    """Under torch.compile the fast path is off: the wrapper's checks run at trace time."""
    torch._dynamo.reset()
    x, state, w, bb = _case()
    fn = torch.compile(lambda *a: lo.causal_conv1d_update(*a, activation="silu"),
                       fullgraph=True)
    ref_state = state.clone()
    ref = lo.causal_conv1d_update(x, ref_state, w, bb, "silu")
    _close(fn(x, state, w, bb), ref)
    assert torch.equal(state, ref_state)
    with pytest.raises(Exception, match="conv_state must have shape"):
        fn(x, torch.zeros(2, 4, 3), w, bb)

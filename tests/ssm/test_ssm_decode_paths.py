"""The decode steps' own code paths on the torch backend (float64 against the reference,
<= 1e-10): causal_conv1d_update for one row (concatenation + batched matmul) and several rows
(column multiply-adds, flat state shift), state longer than W-1, non-contiguous states;
selective_state_update in both forms at B = 1 and 16, grouped heads, a non-contiguous or
lower-precision state; the direct eager call equals the custom op's result, valid inputs skip
the full checks, and anything that needs the custom op (autograd, torch.compile) still gets it."""
import pytest
import torch

from helpers import rel_err
from lightning_ops import reference
from lightning_ops.backend import use_backend
from lightning_ops.ssm import ops as ssm_ops
from lightning_ops.ssm.ops import causal_conv1d_update, selective_state_update
from ssm_cases import gen

TOL = 1e-10
F64 = torch.float64


@pytest.fixture(autouse=True)
def torch_backend():
    with use_backend("torch"):
        yield


def _close(name, a, e, tol=TOL):
    assert a.shape == e.shape, f"{name}: {tuple(a.shape)} != {tuple(e.shape)}"
    assert rel_err(a, e) <= tol, f"{name}: {rel_err(a, e):.3e}"


# ------------------------------------------------------------------------ causal_conv1d_update
def _conv_case(b, d, W, S, seed, L=None):
    g = gen(seed)
    shape = (b, d) if L is None else (b, d, L)
    return (torch.randn(*shape, generator=g, dtype=F64), torch.randn(b, d, S, generator=g,
                                                                     dtype=F64),
            torch.randn(d, W, generator=g, dtype=F64), torch.randn(d, generator=g, dtype=F64))


@pytest.mark.parametrize("b", [1, 2, 16])
@pytest.mark.parametrize("W, extra", [(2, 0), (3, 1), (4, 0), (4, 3)])  # S = W - 1 + extra
@pytest.mark.parametrize("bias, act", [(True, "silu"), (False, None)])
def test_conv_update_one_token(b, W, extra, bias, act):
    x, state, w, bb = _conv_case(b, 5, W, W - 1 + extra, seed=b * 10 + W + extra)
    bb = bb if bias else None
    state_ref = state.clone()
    for step in range(3):  # several steps: the shifted state feeds the next
        out = causal_conv1d_update(x + step, state, w, bb, act)
        out_ref = reference.causal_conv1d_update_ref(x + step, state_ref, w, bb, act)
        _close("out", out, out_ref)
        _close("state", state, state_ref)


@pytest.mark.parametrize("b, L", [(1, 1), (1, 3), (3, 2)])
def test_conv_update_non_contiguous_state_and_tokens(b, L):
    """A state that is a slice of a larger cache (not contiguous) and x [b, D, L]."""
    x, _, w, bb = _conv_case(b, 4, 4, 3, seed=L, L=L)
    cache = torch.randn(b, 4, 6, dtype=F64, generator=gen(7))
    state = cache[..., 1:4]
    assert not state.is_contiguous()
    state_ref = state.clone()
    out = causal_conv1d_update(x, state, w, bb, "silu")
    out_ref = reference.causal_conv1d_update_ref(x, state_ref, w, bb, "silu")
    _close("out", out, out_ref)
    _close("state", cache[..., 1:4], state_ref)


# ---------------------------------------------------------------------- selective_state_update
def _mamba1_case(b, d, n, seed, full=True):
    g = gen(seed)

    def r(*s, scale=1.0):
        return torch.randn(*s, generator=g, dtype=F64) * scale
    return dict(state=r(b, d, n), x=r(b, d), dt=r(b, d, scale=0.5),
                A=-torch.exp(r(d, n, scale=0.5)), B=r(b, n), C=r(b, n),
                D=r(d) if full else None, z=r(b, d) if full else None,
                dt_bias=r(d, scale=0.3) if full else None)


def _heads_case(b, h, p, n, g_, tied, seed):
    g = gen(seed)

    def r(*s, scale=1.0):
        return torch.randn(*s, generator=g, dtype=F64) * scale
    t = dict(state=r(b, h, p, n), x=r(b, h, p), B=r(b, g_, n), C=r(b, g_, n), D=r(h, p),
             z=r(b, h, p))
    if tied:
        t.update(A=(-torch.exp(r(h, scale=0.5)))[:, None, None].expand(h, p, n),
                 dt=r(b, h, scale=0.5)[..., None].expand(b, h, p),
                 dt_bias=r(h, scale=0.3)[:, None].expand(h, p))
    else:
        t.update(A=-torch.exp(r(h, p, n, scale=0.5)), dt=r(b, h, p, scale=0.5),
                 dt_bias=r(h, p, scale=0.3))
    return t


def _check_ssu(inp, state=None, tol=TOL):
    """Two steps against the reference; state: the tensor ours updates (default inp's)."""
    state = inp["state"] if state is None else state
    ref_state = inp["state"].clone().to(F64)
    for step in range(2):
        kw = {**inp, "state": state, "x": inp["x"] + step}
        out = selective_state_update(**kw, dt_softplus=True)
        out_ref = reference.selective_state_update_ref(
            **{**inp, "state": ref_state, "x": inp["x"] + step}, dt_softplus=True)
        _close("out", out, out_ref, tol)
        _close("state", state, ref_state, tol)


@pytest.mark.parametrize("b", [1, 16])
@pytest.mark.parametrize("full", [True, False])
def test_state_update_mamba1(b, full):
    _check_ssu(_mamba1_case(b, 12, 5, seed=b, full=full))


@pytest.mark.parametrize("b", [1, 16])
@pytest.mark.parametrize("h, g_, tied", [(6, 2, True), (6, 3, False), (4, 1, True)])
def test_state_update_heads_grouped(b, h, g_, tied):
    _check_ssu(_heads_case(b, h, 3, 4, g_, tied, seed=b + h))


def test_state_update_non_contiguous_state():
    inp = _heads_case(2, 4, 3, 5, 2, True, seed=3)
    cache = torch.zeros(2, 4, 3, 8, dtype=F64)
    cache[..., :5] = inp["state"]
    state = cache[..., :5]
    assert not state.is_contiguous()
    _check_ssu(inp, state)


def test_state_update_float32_state_float64_inputs():
    """A state not in the compute dtype: updated out of place, then copied in."""
    inp = _mamba1_case(2, 6, 4, seed=4)
    inp["state"] = inp["state"].float().double()  # representable in float32
    state = inp["state"].float()
    out = selective_state_update(**{**inp, "state": state}, dt_softplus=True)
    ref_state = inp["state"].clone()
    out_ref = reference.selective_state_update_ref(**{**inp, "state": ref_state},
                                                   dt_softplus=True)
    _close("out", out, out_ref)
    _close("state", state.double(), ref_state.float().double())


# ------------------------------------------------------------------ dispatch and validation
def _no(name):
    def boom(*a, **k):
        raise AssertionError(f"{name} was called")
    return boom


def test_valid_inputs_skip_full_checks_and_custom_op(monkeypatch):
    """Valid decode inputs in eager mode: the cheap checks only, the backend function called
    directly (no custom-op dispatch)."""
    for name in ("_ssu_check", "_conv_update_check", "_state_update", "_conv_update"):
        monkeypatch.setattr(ssm_ops, name, _no(name))
    _check_ssu(_mamba1_case(1, 8, 4, seed=1))
    _check_ssu(_heads_case(2, 4, 3, 5, 2, True, seed=2))
    x, state, w, bb = _conv_case(2, 4, 4, 3, seed=3)
    causal_conv1d_update(x, state, w, bb, "silu")


def test_custom_op_path_when_autograd_could_be_asked(monkeypatch):
    """An input that requires grad goes through the custom op (as before: it has no
    autograd formula), with the same result as the direct call."""
    calls = []
    real = ssm_ops._state_update

    def spy(*a):
        calls.append(1)
        return real(*a)
    monkeypatch.setattr(ssm_ops, "_state_update", spy)
    inp = _mamba1_case(2, 6, 4, seed=5)
    direct_state = inp["state"].clone()
    direct = selective_state_update(**{**inp, "state": direct_state}, dt_softplus=True)
    assert not calls
    op_state = inp["state"].clone()
    via_op = selective_state_update(**{**inp, "state": op_state,
                                       "x": inp["x"].clone().requires_grad_()},
                                    dt_softplus=True)
    assert calls and via_op.requires_grad
    _close("out", via_op.detach(), direct, 1e-14)
    _close("state", op_state, direct_state, 1e-14)


@pytest.mark.parametrize("bad, match", [
    (dict(x=torch.zeros(2, 5)), "x must have shape"),
    (dict(dt_softplus=1), "dt_softplus must be a bool"),
    (dict(B=torch.zeros(2, 4, dtype=torch.int64)), "B must be float16"),
    (dict(state=torch.zeros(2, 4, 1).expand(2, 4, 3)), "shares memory|share memory"),
])
def test_state_update_errors_stay_clear(bad, match):
    args = dict(state=torch.zeros(2, 4, 3), x=torch.zeros(2, 4), dt=torch.zeros(2, 4),
                A=torch.zeros(4, 3), B=torch.zeros(2, 3), C=torch.zeros(2, 3))
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        selective_state_update(**args)


@pytest.mark.parametrize("bad, match", [
    (dict(conv_state=torch.zeros(2, 4, 3).expand(2, 4, 3)[:, :1].expand(2, 4, 3)),
     "share memory"),
    (dict(conv_state=torch.zeros(2, 5, 3)), "conv_state must have shape"),
    (dict(weight=torch.zeros(4, 6)), "width W must be 2, 3 or 4"),
    (dict(x=torch.zeros(2, 4, dtype=torch.int32)), "x must be float16"),
])
def test_conv_update_errors_stay_clear(bad, match):
    args = dict(x=torch.zeros(2, 4), conv_state=torch.zeros(2, 4, 3), weight=torch.zeros(4, 4))
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        causal_conv1d_update(**args)

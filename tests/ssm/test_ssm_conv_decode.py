"""causal_conv1d_fn / causal_conv1d_update and selective_state_update against the reference:
outputs, final states, every gradient, and decode steps that reproduce the full recurrences."""
import pytest
import torch

from lightning_ops import reference
from lightning_ops.ssm.ops import (causal_conv1d_fn, causal_conv1d_update,
                                   mamba_chunk_scan_combined, selective_scan_fn,
                                   selective_state_update)
from ssm_cases import as_ref, cfg, check_parity, conv_inputs, gen  # noqa: F401  (cfg: fixture)


# ------------------------------------------------------------------------------------ conv1d
@pytest.mark.parametrize("b, d, L", [(1, 1, 1), (2, 5, 63), (1, 3, 300)])
@pytest.mark.parametrize("W", [2, 3, 4])
@pytest.mark.parametrize("act, h0", [(None, False), ("silu", True)])
def test_conv_parity(cfg, b, d, L, W, act, h0):
    backend, dtype, device, tol, metric = cfg
    inp = conv_inputs(b, d, L, W, bias=h0, h0=h0, dtype=dtype, device=device, seed=L + W)
    ref_in = as_ref(inp)
    out, fin = causal_conv1d_fn(inp["x"], inp["weight"], inp["bias"], inp["initial_states"],
                                True, act)
    out_ref, fin_ref = reference.causal_conv1d_ref(ref_in["x"], ref_in["weight"],
                                                   ref_in["bias"], ref_in["initial_states"],
                                                   True, act)
    check_parity(("out", "final_states"), (out, fin), (out_ref, fin_ref), inp, ref_in, tol,
                 metric)


def test_conv_seq_idx(cfg):
    """With seq_idx no tap crosses a sequence change: equal to running each run on its own
    (the initial states belong to the run at t = 0)."""
    backend, dtype, device, tol, metric = cfg
    inp = conv_inputs(2, 3, 40, 4, h0=True, dtype=dtype, device=device, seed=1)
    ref_in = as_ref(inp)
    seq_idx = torch.zeros(2, 40, dtype=torch.int32)
    seq_idx[0, 10:] = 1
    seq_idx[0, 11:] = 2
    seq_idx[1, 25:] = 7
    out = causal_conv1d_fn(inp["x"], inp["weight"], inp["bias"], inp["initial_states"],
                           activation="silu", seq_idx=seq_idx.to(device))
    pieces = []
    for row, bounds in ((0, [0, 10, 11, 40]), (1, [0, 25, 40])):
        outs = []
        for s, e in zip(bounds[:-1], bounds[1:]):
            h0 = ref_in["initial_states"][row:row + 1] if s == 0 else None
            outs.append(reference.causal_conv1d_ref(ref_in["x"][row:row + 1, :, s:e],
                                                    ref_in["weight"], ref_in["bias"], h0,
                                                    activation="silu"))
        pieces.append(torch.cat(outs, -1))
    check_parity(("out",), (out,), (torch.cat(pieces),), inp, ref_in, tol, metric)


@pytest.mark.parametrize("W, S, L", [(4, 3, 1), (3, 5, 1), (2, 4, 3)])
def test_conv_update(cfg, W, S, L):
    backend, dtype, device, tol, metric = cfg
    g = gen(W + S)
    x = torch.randn(2, 6, L, generator=g, dtype=torch.float64)
    w, bias = torch.randn(6, W, generator=g, dtype=torch.float64), torch.randn(6, generator=g,
                                                                              dtype=torch.float64)
    state = torch.randn(2, 6, S, generator=g, dtype=torch.float64)
    state_ref = state.clone()
    xs = x[..., 0] if L == 1 else x  # the [B, D] form for single steps
    out = causal_conv1d_update(xs.to(device, dtype), st := state.to(device, dtype),
                               w.to(device, dtype), bias.to(device, dtype), "silu")
    out_ref = reference.causal_conv1d_update_ref(xs, state_ref, w, bias, "silu")
    check_parity(("out", "conv_state"), (out, st), (out_ref, state_ref), {}, {}, tol, metric)


def test_conv_update_steps_equal_full_conv(cfg):
    """L single-token updates from a zero state reproduce causal_conv1d_fn."""
    backend, dtype, device, tol, metric = cfg
    inp = conv_inputs(2, 4, 9, 4, dtype=dtype, device=device, seed=2)
    x, w, bias = (inp[k].detach() for k in ("x", "weight", "bias"))
    full, fin = causal_conv1d_fn(x, w, bias, return_final_states=True, activation="silu")
    state = torch.zeros(2, 4, 3, dtype=dtype, device=device)
    steps = torch.stack([causal_conv1d_update(x[..., t], state, w, bias, "silu")
                         for t in range(9)], -1)
    check_parity(("out", "state"), (steps, state), (full, fin), {}, {}, tol, metric)


@pytest.mark.parametrize("bad, match", [
    (dict(weight=torch.zeros(4, 5)), "width W must be 2, 3 or 4"),
    (dict(weight=torch.zeros(3, 4)), "weight must have shape"),
    (dict(activation="relu"), "activation must be"),
    (dict(initial_states=torch.zeros(2, 4, 2)), "initial_states must have shape"),
    (dict(bias=torch.zeros(5)), "bias must have shape"),
    (dict(x=torch.zeros(4, 9)), "x must have shape"),
])
def test_conv_validation(bad, match):
    args = dict(x=torch.zeros(2, 4, 9), weight=torch.zeros(4, 4))
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        causal_conv1d_fn(**args)


def test_conv_update_validation_mutates_nothing():
    state = torch.randn(2, 4, 2)
    before = state.clone()
    with pytest.raises(ValueError, match="S >= W-1"):
        causal_conv1d_update(torch.zeros(2, 4), state, torch.zeros(4, 4))
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d_update(torch.zeros(2, 4), torch.zeros(2, 4, 3), torch.zeros(4, 4),
                             activation="gelu")
    assert torch.equal(state, before)


# ------------------------------------------------------------------- selective_state_update
def _heads_inputs(b, h, p, n, g_, tied, seed, dtype, device):
    """(ours on device/dtype, float64 reference copies). Tied: per-head A / dt / dt_bias
    expanded with stride 0 over p and n, as Mamba-2 passes them."""
    gg = gen(seed)

    def r(*s, scale=1.0):
        return torch.randn(*s, generator=gg, dtype=torch.float64) * scale

    if tied:
        base = dict(A=-torch.exp(r(h, scale=0.5)), dt=r(b, h, scale=0.5), dt_bias=r(h, scale=0.3))
    else:
        base = dict(A=-torch.exp(r(h, p, n, scale=0.5)), dt=r(b, h, p, scale=0.5),
                    dt_bias=r(h, p))
    base.update(state=r(b, h, p, n), x=r(b, h, p), B=r(b, g_, n), C=r(b, g_, n), D=r(h, p),
                z=r(b, h, p))

    def build(conv):
        t = {k: conv(v) for k, v in base.items()}
        if tied:
            t["A"] = t["A"][:, None, None].expand(h, p, n)
            t["dt"] = t["dt"][..., None].expand(b, h, p)
            t["dt_bias"] = t["dt_bias"][:, None].expand(h, p)
        return t
    ours = build(lambda v: v.to(device, dtype, copy=True))
    if tied:
        assert ours["A"].stride() == (1, 0, 0) and ours["dt"].stride()[-1] == 0
    return ours, build(lambda v: v.clone())


@pytest.mark.parametrize("b, h, p, n, g_, tied", [
    (1, 1, 1, 1, 1, False), (2, 4, 8, 16, 2, False), (2, 4, 8, 16, 2, True),
    (3, 6, 5, 7, 3, True)])
def test_state_update_heads(cfg, b, h, p, n, g_, tied):
    backend, dtype, device, tol, metric = cfg
    ours, ref = _heads_inputs(b, h, p, n, g_, tied, b + h + n, dtype, device)
    out = selective_state_update(**ours, dt_softplus=True)
    ref_state = ref["state"].clone()
    out_ref = reference.selective_state_update_ref(**{**ref, "state": ref_state},
                                                   dt_softplus=True)
    check_parity(("out", "state"), (out, ours["state"]), (out_ref, ref_state), {}, {}, tol,
                 metric)


def test_state_update_mamba1_form_steps_equal_scan(cfg):
    """L decode steps of the Mamba-1 form reproduce selective_scan_fn's y and last state."""
    backend, dtype, device, tol, metric = cfg
    gg = gen(4)
    b, d, n, L = 2, 5, 6, 7
    u, delta = torch.randn(b, d, L, generator=gg), torch.randn(b, d, L, generator=gg) * 0.5
    A = -torch.exp(torch.randn(d, n, generator=gg) * 0.5)
    B, C = torch.randn(b, n, L, generator=gg), torch.randn(b, n, L, generator=gg)
    D, z, bias = torch.randn(d, generator=gg), torch.randn(b, d, L, generator=gg), \
        torch.randn(d, generator=gg)
    u, delta, A, B, C, D, z, bias = (t.to(device, dtype) for t in (u, delta, A, B, C, D, z, bias))
    with torch.no_grad():
        y, last = selective_scan_fn(u, delta, A, B, C, D, z, bias, True, True)
    state = torch.zeros(b, d, n, dtype=dtype, device=device)
    ys = [selective_state_update(state, u[..., t], delta[..., t], A, B[..., t], C[..., t], D,
                                 z[..., t], bias, dt_softplus=True) for t in range(L)]
    check_parity(("y", "state"), (torch.stack(ys, -1), state), (y, last.to(dtype)), {}, {},
                 tol, metric)


def test_state_update_heads_steps_equal_ssd(cfg):
    """Decode steps of the heads form (tied A/dt as Mamba-2 passes them) reproduce SSD."""
    backend, dtype, device, tol, metric = cfg
    gg = gen(5)
    b, l, h, p, g_, n = 2, 6, 4, 3, 2, 5

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=gg) * scale).to(device, dtype)
    x, dt, A = r(b, l, h, p), r(b, l, h, scale=0.5), -torch.exp(r(h, scale=0.5))
    B, C, D, dtb, h0 = r(b, l, g_, n), r(b, l, g_, n), r(h), r(h), r(b, h, p, n)
    with torch.no_grad():
        y, fin = mamba_chunk_scan_combined(x, dt, A, B, C, 16, D=D, dt_bias=dtb,
                                           initial_states=h0, dt_softplus=True,
                                           return_final_states=True)
    state = h0.clone()
    ys = [selective_state_update(
        state, x[:, t], dt[:, t, :, None].expand(b, h, p), A[:, None, None].expand(h, p, n),
        B[:, t], C[:, t], D[:, None].expand(h, p), dt_bias=dtb[:, None].expand(h, p),
        dt_softplus=True) for t in range(l)]
    check_parity(("y", "state"), (torch.stack(ys, 1), state), (y, fin.to(dtype)), {}, {}, tol,
                 metric)


@pytest.mark.parametrize("bad, match", [
    (dict(x=torch.zeros(2, 4)), "x must have shape"),
    (dict(A=torch.zeros(4, 3)), "A must have shape"),
    (dict(B=torch.zeros(2, 3, 5), C=torch.zeros(2, 3, 5)), "groups"),
    (dict(D=torch.zeros(4)), "D must have shape"),
    (dict(state=torch.zeros(2, 4, 3, 5, 1)), "state must have shape"),
])
def test_state_update_validation_mutates_nothing(bad, match):
    args = dict(state=torch.randn(2, 4, 3, 5), x=torch.zeros(2, 4, 3), dt=torch.zeros(2, 4, 3),
                A=torch.zeros(4, 3, 5), B=torch.zeros(2, 2, 5), C=torch.zeros(2, 2, 5))
    args.update(bad)
    before = args["state"].clone()
    with pytest.raises((ValueError, TypeError), match=match):
        selective_state_update(**args)
    assert torch.equal(args["state"], before)

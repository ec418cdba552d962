"""The hand-written backward of the chunked torch log-linear attention (lightning_ops.loglinear.
torch.backward) against autograd through the torch forward (float64, every gradient within
1e-10 of its own size) and, where cheap, through the float64 token-by-token reference: T = 1,
T < chunk, T not a multiple of the chunk, many chunk levels, B = H = 1 with K != V, grouped
q/k, varlen with length-1 and empty segments, initial states at odd offsets, dht given or
None, fewer and more levels than the sequence needs, gates of -20 per token and -inf resets.
Also float32 against float64, no autograd in the backward (inference mode), and agreement with
the custom backward op that recomputes under autograd (drop-in for it)."""
from __future__ import annotations

import pytest
import torch

from lightning_ops import reference as R
from lightning_ops.loglinear import torch as LL
from lightning_ops.loglinear.ops import _ll_bwd

F64 = torch.float64
NAMES = ("q", "k", "v", "g", "level_scales", "h0")


def _inputs(B, T, G, H, K, V, L, lengths=None, offsets=None, gate=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=gen, dtype=F64)  # noqa: E731
    cu = None if lengths is None else torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)))
    N = B if cu is None else len(lengths)
    x = dict(q=rn(B, T, G, K), k=rn(B, T, G, K), v=rn(B, T, H, V),
             g=-0.5 * torch.rand(B, T, H, generator=gen, dtype=F64),
             level_scales=torch.rand(B, T, H, L, generator=gen, dtype=F64))
    if gate == "strong":
        x["g"].fill_(-20.0)
    elif gate == "-inf":
        x["g"][:, T // 3] = float("-inf")
        x["g"][:, (2 * T) // 3, 0] = float("-inf")
        x["g"][:, -1, -1] = float("-inf")
    h0 = off = None
    if offsets is not None:  # every slot filled: the absent ones must get zero gradient
        h0, off = rn(N, H, L, K, V), torch.tensor(offsets, dtype=torch.int64)
    do, dht = rn(B, T, H, V), rn(N, H, L, K, V)
    return x, h0, off, cu, do, dht


def _autograd(fwd, x, h0, off, cu, do, dht):
    """Gradients of (o * do).sum() + (ht * dht).sum() (dht None: o only) by autograd."""
    leaves = {n: t.detach().clone().requires_grad_() for n, t in x.items()}
    if h0 is not None:
        leaves["h0"] = h0.detach().clone().requires_grad_()
    o, ht = fwd(leaves, dht is not None)
    loss = (o * do).sum() + ((ht * dht).sum() if dht is not None else 0)
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    out = {n: torch.zeros_like(t) if gr is None else gr
           for (n, t), gr in zip(leaves.items(), grads)}
    out.setdefault("h0", None)
    return out


def _torch_fwd(scale, h0_off, cu, C):
    def fwd(a, want):
        o, fin = LL.forward(a["q"], a["k"], a["v"], a["g"], a["level_scales"], scale,
                            a.get("h0"), h0_off, want, cu, C)
        return o, (fin[0] if fin is not None else None)
    return fwd


def _ref_fwd(scale, h0_off, cu):
    def fwd(a, want):
        init = None if "h0" not in a else (a["h0"], h0_off)
        o, fin = R.log_linear_attn_ref(a["q"], a["k"], a["v"], a["g"], a["level_scales"], scale,
                                       init, want, cu)
        return o, (fin[0] if fin is not None else None)
    return fwd


def _ours(x, h0, off, cu, do, dht, scale, C):
    got = LL.backward(x["q"], x["k"], x["v"], x["g"], x["level_scales"], scale, h0, off, cu,
                      do, dht, C)
    return dict(zip(NAMES, got))


def _assert_close(got, exp, tol=1e-10, elementwise=False):
    for n in NAMES:
        if exp[n] is None:
            assert got[n] is None, n
            continue
        a, e = got[n], exp[n]
        assert a.shape == e.shape and a.dtype == e.dtype, (n, a.shape, e.shape)
        assert torch.isfinite(a).all(), n
        err = (a - e).abs()
        assert err.max() <= tol * e.abs().max().clamp_min(1e-300), (n, err.max().item())
        if elementwise:  # accurate relative to each element's own size, tiny ones included
            assert (err <= tol * e.abs() + 1e-300).all(), (n, (err / e.abs()).nanmax().item())


CASES = [  # B, T, G, H, K, V, L, chunk, lengths, offsets, gate
    pytest.param(1, 1, 1, 1, 2, 3, 4, 8, None, None, None, id="T1"),
    pytest.param(2, 11, 1, 2, 3, 4, 6, 16, None, None, None, id="T-lt-chunk"),
    pytest.param(2, 37, 1, 3, 4, 5, 8, 4, None, None, None, id="T37-C4"),
    pytest.param(1, 45, 1, 1, 7, 3, 8, 8, None, [37], None, id="BH1-K7-V3-off37"),
    pytest.param(1, 300, 1, 2, 6, 5, 12, 16, None, None, None, id="T300-C16-L12"),
    pytest.param(2, 300, 1, 2, 4, 3, 12, 16, None, [5, 37], None, id="T300-offsets-5-37"),
    pytest.param(2, 256, 1, 2, 4, 3, 12, 16, None, [0, 48], None, id="T256-ends-on-chunk"),
    pytest.param(2, 90, 1, 2, 3, 4, 20, 8, None, [4133, 32765], None, id="big-offsets-L20"),
    pytest.param(1, 300, 1, 1, 4, 3, 7, 16, None, [5], None, id="T300-few-levels"),
    pytest.param(2, 70, 1, 2, 5, 3, 3, 16, None, [0, 3], None, id="L3"),
    pytest.param(1, 40, 1, 2, 3, 4, 1, 8, None, [0], None, id="L1"),
    pytest.param(1, 40, 1, 2, 3, 4, 5, 4, None, None, None, id="L5-C4"),
    pytest.param(2, 70, 2, 4, 5, 3, 10, 16, None, [0, 3], None, id="gva"),
    pytest.param(1, 33, 1, 2, 3, 2, 8, 4, [1, 0, 9, 1, 22], [5, 0, 7, 37, 16], None,
                 id="varlen-offsets"),
    pytest.param(1, 20, 1, 2, 3, 2, 6, 4, [1, 1, 18], None, None, id="varlen"),
    pytest.param(2, 100, 1, 2, 4, 3, 12, 8, None, [5, 37], "strong", id="gate-20"),
    pytest.param(2, 100, 1, 2, 4, 3, 12, 8, None, [5, 37], "-inf", id="gate-inf"),
]


@pytest.mark.parametrize("with_dht", [True, False], ids=["dht", "no-dht"])
@pytest.mark.parametrize("B,T,G,H,K,V,L,C,lengths,offsets,gate", CASES)
def test_backward_matches_autograd_f64(B, T, G, H, K, V, L, C, lengths, offsets, gate,
                                       with_dht):
    x, h0, off, cu, do, dht = _inputs(B, T, G, H, K, V, L, lengths, offsets, gate)
    dht = dht if with_dht else None
    got = _ours(x, h0, off, cu, do, dht, 0.7, C)
    exp = _autograd(_torch_fwd(0.7, off, cu, C), x, h0, off, cu, do, dht)
    _assert_close(got, exp, elementwise=gate == "strong")
    if T <= 45:  # the token-by-token spec, cheap at these lengths
        _assert_close(got, _autograd(_ref_fwd(0.7, off, cu), x, h0, off, cu, do, dht))


def test_absent_initial_slots_get_zero_gradient():
    x, h0, off, cu, do, dht = _inputs(2, 21, 1, 2, 3, 4, 7, offsets=[13, 6])
    got = _ours(x, h0, off, cu, do, dht, 1.0, 4)
    for n, t0 in enumerate([13, 6]):
        for lv in range(7):
            present = lv > 0 and (t0 >> (lv - 1)) & 1
            assert (got["h0"][n, :, lv].abs().max() > 0) == bool(present), (n, lv)


def test_no_autograd_inside():
    """The backward runs without recording a graph (inference mode forbids autograd state)."""
    x, h0, off, cu, do, dht = _inputs(2, 50, 1, 2, 4, 3, 9, offsets=[5, 37])
    exp = _ours(x, h0, off, cu, do, dht, 0.7, 8)
    with torch.inference_mode():
        got = _ours(x, h0, off, cu, do, dht, 0.7, 8)
    _assert_close(got, exp, tol=0)


def test_float32_sanity():
    x, h0, off, cu, do, dht = _inputs(2, 200, 1, 2, 16, 8, 11, offsets=[5, 37])
    exp = _ours(x, h0, off, cu, do, dht, 0.5, 16)
    x32 = {n: t.float() for n, t in x.items()}
    got = _ours(x32, h0.float(), off, cu, do.float(), dht.float(), 0.5, 16)
    for n in NAMES:
        assert got[n].dtype == torch.float32, n
        rms = lambda t: t.double().pow(2).mean().sqrt()  # noqa: E731
        assert rms(got[n] - exp[n]) <= 1e-5 * rms(exp[n]), n


def test_half_inputs_float32_state():
    """bf16 inputs with a float32 initial state: gradients in each input's dtype."""
    x, h0, off, cu, do, dht = _inputs(1, 20, 1, 2, 4, 4, 6, offsets=[3])
    xb = {n: t.bfloat16() for n, t in x.items()}
    got = _ours(xb, h0.float(), off, cu, do.bfloat16(), dht.float(), 1.0, 8)
    for n in NAMES:
        exp_dt = torch.float32 if n == "h0" else torch.bfloat16
        assert got[n].dtype == exp_dt and torch.isfinite(got[n].float()).all(), n


@pytest.mark.parametrize("with_dht", [True, False], ids=["dht", "no-dht"])
def test_drop_in_for_the_recompute_op(with_dht):
    """Same arguments as ops._ll_bwd (the custom backward op, recomputing under autograd), same
    gradients: the op may call backward() instead."""
    x, h0, off, cu, do, dht = _inputs(1, 26, 1, 2, 3, 4, 7, [4, 1, 0, 21], [5, 0, 7, 16])
    dht = dht if with_dht else None
    got = _ours(x, h0, off, cu, do, dht, 0.5, 4)
    exp = _ll_bwd(do, dht, x["q"], x["k"], x["v"], x["g"], x["level_scales"], h0, off, cu, 0.5,
                  4)
    _assert_close(got, dict(zip(NAMES, exp)))

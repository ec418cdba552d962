"""The decode steps (log_linear_attn_step, log_linear_gated_delta_rule_step) against the float64
token-by-token references, with positions that differ across the batch: position 0, levels
that empty into the next one, a merge into the last level, merges that fall off the top (the
trailing ones of the position reach L), positions far beyond 2^L; grouped q/k, a scale, a
non-contiguous state, finite garbage in the slots that do not exist, gradients through a few
steps, the zeros the returned states hold where no bucket exists, and inplace_final_state."""
from __future__ import annotations

import pytest
import torch

from lightning_ops import reference as R
from lightning_ops.loglinear import (fused_recurrent_log_linear_attn,
                                     fused_recurrent_log_linear_gated_delta_rule,
                                     log_linear_attn_step, log_linear_gated_delta_rule_step)

F64 = torch.float64
L = 5
# 0 (no bucket); 1 (the token and level 1 merge into level 2); 6 (the token alone becomes
# level 1, levels 2 and 3 stay); 7 (levels 1..3 empty into level 4); 2^(L-2)-1 (a merge into the
# last level); 2^(L-1)-1 and 2^L-1 (the merge falls off the top); 1000 and 2^(L+3)+2^(L+1)-1
# (far beyond 2^L, the latter with more than L trailing ones)
OFFSETS = [0, 1, 6, 7, 2 ** (L - 2) - 1, 2 ** (L - 1) - 1, 2 ** L - 1, 1000,
           2 ** (L + 3) + 2 ** (L + 1) - 1]


def _rel(a, e):
    return ((a.double() - e.double()).abs().max() / e.double().abs().max().clamp_min(1e-30)).item()


def _exists(offsets, L):
    """[N, L] bool: slot l holds a bucket at the offset (l >= 1 and bit l-1 set)."""
    return torch.tensor([[l > 0 and bool((t0 >> (l - 1)) & 1) for l in range(L)]
                         for t0 in offsets])


def _case(delta, T, G=1, H=2, K=3, V=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    N = len(OFFSETS)
    rn = lambda *s: torch.randn(*s, generator=gen, dtype=F64)  # noqa: E731
    x = dict(q=rn(N, T, G, K), k=rn(N, T, G, K), v=rn(N, T, H, V),
             g=-0.5 * torch.rand(N, T, H, generator=gen, dtype=F64),
             level_scales=torch.rand(N, T, H, L, generator=gen, dtype=F64))
    if delta:
        x["beta"] = torch.rand(N, T, H, generator=gen, dtype=F64)
    ht = rn(N, H, L, K, V)
    present = _exists(OFFSETS, L)[:, None, :, None, None]
    garbage = torch.where(present, 0.0, 100.0 * rn(N, H, L, K, V))  # finite, in absent slots
    return x, ht * present, garbage, torch.tensor(OFFSETS, dtype=torch.int64)


def _walk(delta, x, ht, off, scale, kw):
    step = log_linear_gated_delta_rule_step if delta else log_linear_attn_step
    names = ("q", "k", "v", "g", "level_scales") + (("beta",) if delta else ())
    outs, st = [], (ht, off)
    for t in range(x["q"].shape[1]):
        o_t, st = step(*(x[n][:, t] for n in names), st, scale=scale, **kw)
        outs.append(o_t)
    return torch.stack(outs, 1), st


@pytest.mark.parametrize("delta", [False, True])
@pytest.mark.parametrize("G, scale", [(1, None), (2, 0.7)])
def test_steps_at_mixed_positions_match_reference(delta, G, scale):
    T = 6
    x, ht, garbage, off = _case(delta, T, G=G, H=4)
    kw = dict(use_qk_l2norm_in_kernel=True) if delta else {}
    ref = R.log_linear_gated_delta_rule_ref if delta else R.log_linear_attn_ref
    o_r, (ht_r, off_r) = ref(**x, scale=scale, initial_state=(ht, off), output_final_state=True,
                             **kw)
    # the slots that do not exist hold finite garbage: ignored; and a non-contiguous state
    wide = torch.stack([ht + garbage, torch.full_like(ht, float("nan"))], 1)
    o, st = _walk(delta, x, wide[:, 0], off, scale, kw)
    assert not wide[:, 0].is_contiguous()
    assert _rel(o, o_r) <= 1e-12 and _rel(st.ht, ht_r) <= 1e-12
    assert st.offsets.tolist() == off_r.tolist() == [t0 + T for t0 in OFFSETS]
    # what the steps return holds exact zeros where no bucket exists at the new offsets
    absent = ~_exists(st.offsets.tolist(), L)[:, None, :, None, None]
    assert (st.ht.masked_select(absent.expand_as(st.ht)) == 0).all()
    # position by position: one step equals the reference's first token
    o1, st1 = _walk(delta, {n: t[:, :1] for n, t in x.items()}, ht, off, scale, kw)
    o1_r, (ht1_r, _) = ref(**{n: t[:, :1] for n, t in x.items()}, scale=scale,
                           initial_state=(ht, off), output_final_state=True, **kw)
    assert _rel(o1, o1_r) <= 1e-12 and _rel(st1.ht, ht1_r) <= 1e-12


@pytest.mark.parametrize("delta", [False, True])
def test_step_gradients_match_reference(delta):
    """Gradients through three steps from mixed positions (inputs and the initial levels; zero
    for the slots that do not exist) equal the reference's."""
    T = 3
    x, ht, garbage, off = _case(delta, T, seed=1)
    kw = dict(use_qk_l2norm_in_kernel=True) if delta else {}
    ref = R.log_linear_gated_delta_rule_ref if delta else R.log_linear_attn_ref
    gen = torch.Generator().manual_seed(7)

    def grads(fn, h_init):
        leaves = {n: t.detach().clone().requires_grad_() for n, t in x.items()}
        h = h_init.detach().clone().requires_grad_()
        o, (hT, _) = fn(leaves, h)
        do = torch.randn(o.shape, generator=gen.manual_seed(7), dtype=F64)
        dht = torch.randn(hT.shape, generator=gen, dtype=F64)
        ((o * do).sum() + (hT * dht).sum()).backward()
        return {**{n: t.grad for n, t in leaves.items()}, "h0": h.grad}

    g_s = grads(lambda xs, h: _walk(delta, xs, h, off, None, kw), ht + garbage)
    g_r = grads(lambda xs, h: ref(**xs, initial_state=(h, off), output_final_state=True, **kw), ht)
    present = _exists(OFFSETS, L)[:, None, :, None, None]
    assert (g_s["h0"] * ~present == 0).all()
    for n in g_r:
        assert _rel(g_s[n], g_r[n]) <= 1e-11, n


@pytest.mark.parametrize("delta", [False, True])
def test_inplace_final_state(delta):
    """inplace_final_state=True writes the next levels over state.ht (a contiguous state of the
    accumulation dtype) and equals the default exactly; without it, or with a state it cannot
    reuse, the given state is left as it was. fused_recurrent's walk (which may step in place
    when nothing needs a gradient) leaves the caller's initial state alone too."""
    T = 4
    x, ht, garbage, off = _case(delta, T, seed=2)
    kw = dict(use_qk_l2norm_in_kernel=True) if delta else {}
    h_given = ht + garbage
    keep = h_given.clone()
    o, st = _walk(delta, x, h_given, off, None, kw)
    assert torch.equal(h_given, keep)
    h_mine = h_given.clone()
    step = log_linear_gated_delta_rule_step if delta else log_linear_attn_step
    names = ("q", "k", "v", "g", "level_scales") + (("beta",) if delta else ())
    st_i, outs = (h_mine, off), []
    for t in range(T):
        o_t, st_i = step(*(x[n][:, t] for n in names), st_i, inplace_final_state=True, **kw)
        assert st_i.ht is h_mine
        outs.append(o_t)
    assert torch.equal(torch.stack(outs, 1), o) and torch.equal(st_i.ht, st.ht)
    # a state it cannot reuse (another dtype, or not contiguous): a new one, the given one kept
    for h in (h_given.float(), torch.stack([h_given, h_given], 1)[:, 0]):
        before = h.clone()
        o_t, st_t = step(*(x[n][:, 0] for n in names), (h, off), inplace_final_state=True, **kw)
        assert st_t.ht is not h and torch.equal(h, before)
    fn = (fused_recurrent_log_linear_gated_delta_rule if delta
          else fused_recurrent_log_linear_attn)
    with torch.no_grad():
        o_f, st_f = fn(**x, initial_state=(h_given, off), output_final_state=True, **kw)
    assert torch.equal(h_given, keep)
    assert _rel(o_f, o) <= 1e-12 and _rel(st_f.ht, st.ht) <= 1e-12

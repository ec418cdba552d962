"""The log-linear attention spec: the token-by-token O(log T) hierarchy (reference.
log_linear_attn_ref) against the masked T x T form (log_linear_attn_masked_ref) and against fla's
naive level masks (transcribed here), with -inf gates, grouped q/k, varlen, and a sequence split
anywhere with the state (ht, offsets) carried across."""
from __future__ import annotations

import math

import pytest
import torch

from lightning_ops import reference as R

F64 = torch.float64


def _inputs(B, T, G, H, K, V, L, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=gen, dtype=F64)  # noqa: E731
    g = -0.5 * torch.rand(B, T, H, generator=gen, dtype=F64)
    return rn(B, T, G, K), rn(B, T, G, K), rn(B, T, H, V), g, torch.rand(B, T, H, L, generator=gen,
                                                                        dtype=F64)


def _fla_naive(q, k, v, g, lam):
    """fla/ops/log_linear_attn/naive.py's level masks (construct_level_mask), G = H."""
    B, T, H, _ = q.shape
    idx = torch.cartesian_prod(torch.arange(T), torch.arange(T))
    cs = g.permute(0, 2, 1).cumsum(-1)
    causal = torch.ones(T, T).bool().tril()
    seg = (cs[..., :, None] - cs[..., None, :]).masked_fill(~causal, -math.inf)
    A, Hm = seg.exp(), 0
    Lp = lam.permute(0, 2, 3, 1)
    for level in range(math.ceil(math.log2(T)) + 1):
        if level == 0:
            mask = torch.diag_embed(Lp[..., 0, :])
        else:
            t, s = idx[:, 0], idx[:, 1]
            sel = ((t % (1 << level) >= (1 << (level - 1)))
                   & (s + (1 << (level - 1)) >= t - t % (1 << (level - 1)))
                   & (s < t - t % (1 << (level - 1)))).view(T, T)
            mask = torch.where(sel, Lp[..., level, :, None].expand(B, H, T, T), 0)
        Hm = Hm + A * mask
    M = torch.einsum("bhlc,blhn,bchn->bhlc", Hm, q, k)
    return torch.einsum("bhlc,bchp->blhp", M, v)


def test_levels_are_the_fenwick_decomposition():
    for t in range(40):
        buckets = {}
        for s in range(t + 1):
            buckets.setdefault(R.log_linear_level(s, t), []).append(s)
        assert buckets[0] == [t]
        for l, ss in buckets.items():
            if l:
                assert (t >> (l - 1)) & 1 and len(ss) == 1 << (l - 1)
                assert ss[-1] + 1 == (t >> (l - 1)) << (l - 1)


def test_matches_fla_naive():
    B, T, H, K, V = 2, 37, 3, 4, 5
    L = math.ceil(math.log2(T)) + 1
    q, k, v, g, lam = _inputs(B, T, H, H, K, V, L)
    o, _ = R.log_linear_attn_ref(q, k, v, g, lam)
    assert (o - _fla_naive(q, k, v, g, lam)).abs().max() < 1e-12


@pytest.mark.parametrize("L", [3, 8])
def test_recurrent_equals_masked_with_splits(L):
    B, T, G, H, K, V = 2, 37, 1, 3, 4, 5
    q, k, v, g, lam = _inputs(B, T, G, H, K, V, L, seed=1)
    g[0, 5, 1] = -math.inf
    g[1, 20:, 0] = -30.0
    o, _ = R.log_linear_attn_ref(q, k, v, g, lam)
    assert (o - R.log_linear_attn_masked_ref(q, k, v, g, lam)).abs().max() < 1e-12
    for cut in (1, 5, 16, 30):
        cut_ = lambda x, a, b: x[:, a:b]  # noqa: E731
        oa, st = R.log_linear_attn_ref(*(cut_(x, 0, cut) for x in (q, k, v, g, lam)),
                                       output_final_state=True)
        rest = [cut_(x, cut, T) for x in (q, k, v, g, lam)]
        ob, _ = R.log_linear_attn_ref(*rest, initial_state=st)
        oc = R.log_linear_attn_masked_ref(*rest, initial_state=st)
        assert (torch.cat([oa, ob], 1) - o).abs().max() < 1e-12
        assert (oc - ob).abs().max() < 1e-12
        assert st[1].tolist() == [cut, cut]


def test_varlen_is_per_sequence():
    T, G, H, K, V, L = 20, 2, 4, 3, 2, 6
    q, k, v, g, lam = _inputs(1, T, G, H, K, V, L, seed=2)
    cu = torch.tensor([0, 1, 1, 9, 20])
    o, st = R.log_linear_attn_ref(q, k, v, g, lam, output_final_state=True, cu_seqlens=cu)
    om = R.log_linear_attn_masked_ref(q, k, v, g, lam, cu_seqlens=cu)
    assert (o - om).abs().max() < 1e-12
    for n in range(4):
        a, b = cu[n].item(), cu[n + 1].item()
        on, sn = R.log_linear_attn_ref(*(x[:, a:b] for x in (q, k, v, g, lam)),
                                       output_final_state=True)
        assert torch.allclose(on, o[:, a:b], rtol=0, atol=1e-12)
        assert (sn[0][0] - st[0][n]).abs().max() < 1e-12 and st[1][n] == b - a

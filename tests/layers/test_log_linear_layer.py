"""LogLinearMamba2 (layers/log_linear.py) through fla's layer contract: float64 forward and every
gradient against an independent reference (written here from fla's layer equations over the
token-by-token lightning_ops.reference.log_linear_attn_ref), decode (prefill + one-token steps
and multi-token continuations == the full forward, O(log T) cached states), padding masks in any
arrangement and packed sequences (== each sequence alone, states included), fla's state_dict
keys and positional order, empty input and bad caches. Tiny shapes."""
import copy

import pytest
import torch
import torch.nn.functional as F

import layers
from lightning_ops import reference as R

F64 = torch.float64
HID = 16


def make(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(num_heads=4, head_dim=8, hidden_size=HID, state_size=4, n_groups=2,
               chunk_size=4, num_levels=6, layer_idx=0, use_conv_bias=True)
    cfg.update(kw)
    m = layers.LogLinearMamba2(**cfg).double()
    with torch.no_grad():  # non-trivial level weights, D and norm weight
        m.L.copy_(torch.randn_like(m.L))
        m.D.copy_(torch.randn_like(m.D))
        if m.norm is not None:
            m.norm.weight.copy_(1 + 0.3 * torch.randn_like(m.norm.weight))
    return m


def inputs(B, T, seed=1):
    return torch.randn(B, T, HID, generator=torch.Generator().manual_seed(seed), dtype=F64)


def rel(a, e):
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()


# -- the independent reference ------------------------------------------------------------------
def reference(m, u):
    """fla's LogLinearMamba2 forward, written out: in_proj -> causal depthwise conv + SiLU ->
    dt = softplus(dt + dt_bias), v = x dt, g = -exp(A_log) dt, lambda = softplus(L dl) ->
    token-by-token log-linear attention (q = C, k = B) + D x -> gated RMSNorm -> out_proj."""
    b, l, _ = u.shape
    h, p, g, n, lv = m.num_heads, m.head_dim, m.n_groups, m.ssm_state_size, m.num_lambda_dims
    I = m.intermediate_size
    gate, xBC, dt, dl = m.in_proj(u).split([I, m.conv_dim, h, h * lv], dim=-1)
    W = m.conv1d.weight.shape[-1]
    xBC = F.silu(F.conv1d(F.pad(xBC.transpose(1, 2), (W - 1, 0)), m.conv1d.weight,
                          m.conv1d.bias, groups=m.conv_dim)).transpose(1, 2)
    x, B, C = xBC.split([I, g * n, g * n], dim=-1)
    x = x.reshape(b, l, h, p)
    dt = F.softplus(dt + m.dt_bias)
    lam = F.softplus(m.L * dl.reshape(b, l, h, lv))
    y, _ = R.log_linear_attn_ref(C.reshape(b, l, g, n), B.reshape(b, l, g, n),
                                 x * dt[..., None], -m.A_log.exp() * dt, lam)
    y = y + x * (m.D.view(h, p) if m.D_has_hdim else m.D[:, None])
    y = y.reshape(b, l, I)
    if m.rmsnorm:
        y = y * F.silu(gate)
        yg = y.reshape(b, l, g, I // g)
        y = (yg / torch.sqrt(yg.pow(2).mean(-1, keepdim=True) + m.norm.eps)).reshape(b, l, I)
        y = y * m.norm.weight
    else:
        y = y * F.silu(gate)
    return m.out_proj(y)


CASES = {"groups+hdimD": dict(D_has_hdim=True), "no-norm": dict(rmsnorm=False, n_groups=1),
         "few-levels": dict(num_levels=3, chunk_size=2)}


@pytest.mark.parametrize("case", list(CASES))
def test_float64_forward_and_every_gradient_match_reference(case):
    m = make(**CASES[case])
    r = copy.deepcopy(m)
    x = inputs(2, 11).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    out, _, _ = m(x)
    ref = reference(r, xr)
    assert rel(out, ref) <= 1e-10
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    assert rel(x.grad, xr.grad) <= 1e-10, "d hidden_states"
    for (name, p), pr in zip(m.named_parameters(), r.parameters()):
        assert p.grad is not None and rel(p.grad, pr.grad) <= 1e-9, f"d {name}"


def _decode(m, x, split, mask=None):
    cache = layers.Cache()
    kw = {} if mask is None else {"attention_mask": mask[:, :split]}
    outs = [m(x[:, :split], past_key_values=cache, use_cache=True, **kw)[0]]
    for t in range(split, x.shape[1]):
        kw = {} if mask is None else {"attention_mask": mask[:, :t + 1]}
        outs.append(m(x[:, t:t + 1], past_key_values=cache, use_cache=True, **kw)[0])
    return torch.cat(outs, 1), cache


@torch.no_grad()
def test_decode_prefill_plus_steps_equals_full_forward():
    """One-token steps use the O(log T) hierarchy: (ht [N, H, L, N_state, P], offsets)."""
    m = make()
    x = inputs(2, 13)
    full, _, cache_full = m(x, past_key_values=layers.Cache(), use_cache=True)
    for split in (1, 5):
        out, cache = _decode(m, x, split)
        assert rel(out, full) <= 1e-12
        ht, off = cache[0]["recurrent_state"]
        assert ht.shape == (2, 4, 6, 4, 8) and ht.dtype == F64
        assert off.tolist() == [13, 13]
        ht_f, _ = cache_full[0]["recurrent_state"]
        assert rel(ht, ht_f) <= 1e-12
        assert cache.get_seq_length(0) == 13
    # a multi-token continuation of a cache (the chunked path with an initial hierarchy)
    cache = layers.Cache()
    a, _, cache = m(x[:, :6], past_key_values=cache, use_cache=True)
    b, _, cache = m(x[:, 6:], past_key_values=cache, use_cache=True)
    assert rel(torch.cat([a, b], 1), full) <= 1e-12


@torch.no_grad()
def test_padding_mask_any_arrangement_equals_each_row_alone():
    """Each row's real tokens are their own sequence at positions 0, 1, ... (as unpadding),
    also through prefill + decode with a growing HF-style mask."""
    m = make()
    x = inputs(3, 10)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, :3] = 0            # left padding
    mask[1, 7:] = 0            # right padding
    mask[2, [1, 4, 5]] = 0     # gaps
    out, _, cache = m(x, attention_mask=mask, past_key_values=layers.Cache(), use_cache=True)
    for b in range(3):
        keep = mask[b].bool()
        alone, _, c1 = m(x[b:b + 1, keep], past_key_values=layers.Cache(), use_cache=True)
        assert rel(out[b, keep], alone[0]) <= 1e-12
        assert out[b, ~keep].abs().max().item() == 0 if (~keep).any() else True
        ht, off = cache[0]["recurrent_state"]
        assert off[b].item() == int(keep.sum())
        assert rel(ht[b], c1[0]["recurrent_state"][0][0]) <= 1e-12
    # left-padded prompt, then decode steps (one of them padded for row 1)
    x2 = inputs(2, 9, seed=3)
    m2 = torch.ones(2, 9, dtype=torch.long)
    m2[0, :2] = 0
    m2[1, 6] = 0
    dec, cache = _decode(m, x2, 4, m2)
    for b in range(2):
        keep = m2[b].bool()
        alone, _, _ = m(x2[b:b + 1, keep])
        assert rel(dec[b, keep], alone[0]) <= 1e-12
    assert cache[0]["recurrent_state"][1].tolist() == [7, 8]


@torch.no_grad()
def test_packed_sequences_equal_each_sequence_alone_with_states():
    m = make()
    lens = [5, 1, 7]
    x = inputs(1, sum(lens))
    cu = torch.tensor([0, 5, 6, 13])
    out, _, cache = m(x, cu_seqlens=cu, past_key_values=layers.Cache(), use_cache=True)
    ht, off = cache[0]["recurrent_state"]
    assert off.tolist() == lens
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        alone, _, c1 = m(x[:, a:b], past_key_values=layers.Cache(), use_cache=True)
        assert rel(out[:, a:b], alone) <= 1e-12
        assert rel(ht[i], c1[0]["recurrent_state"][0][0]) <= 1e-12
    # continue the packed states with one token each (packed) == per-sequence decode
    y = inputs(1, 3, seed=9)
    step, _, _ = m(y, cu_seqlens=torch.tensor([0, 1, 2, 3]), past_key_values=cache,
                   use_cache=True)
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        c = layers.Cache()
        m(x[:, a:b], past_key_values=c, use_cache=True)
        one, _, _ = m(y[:, i:i + 1], past_key_values=c, use_cache=True)
        assert rel(step[:, i], one[:, 0]) <= 1e-12


def fla_keys(H=4, P=8, hid=16, N=4, G=1, W=4, levels=15):
    """fla.layers.log_linear_mamba2.LogLinearMamba2's parameters (names and shapes), defaults
    use_conv_bias=False, use_bias=True, rmsnorm=True, D per head, 15 levels."""
    I = H * P
    conv_dim = I + 2 * G * N
    return {"in_proj.weight": [I + conv_dim + H * (levels + 1), hid], "in_proj.bias":
            [I + conv_dim + H * (levels + 1)], "conv1d.weight": [conv_dim, 1, W],
            "dt_bias": [H], "A_log": [H], "L": [H, levels], "norm.weight": [I], "D": [H],
            "out_proj.weight": [hid, I], "out_proj.bias": [hid]}


def test_fla_state_dict_keys_positional_order_and_init():
    m = layers.LogLinearMamba2(4, 8, 16, 4)  # num_heads, head_dim, hidden_size, state_size
    got = {k: list(v.shape) for k, v in m.state_dict().items()}
    assert got == fla_keys()
    m.load_state_dict({k: torch.zeros(s) for k, s in fla_keys().items()}, strict=True)
    m = layers.LogLinearMamba2(4, 8, 16, 4)
    assert torch.equal(m.A_log, torch.log(torch.arange(1.0, 5.0)))
    assert torch.equal(m.L, torch.ones(4, 15)) and torch.equal(m.D, torch.ones(4))
    assert all(getattr(p, "_no_weight_decay", False) for p in (m.dt_bias, m.A_log, m.L, m.D))
    dt = F.softplus(m.dt_bias)
    assert (dt >= 1e-4 - 1e-9).all() and (dt <= 0.1 + 1e-6).all()
    out, attn, pkv = m(torch.randn(2, 3, 16))
    assert out.shape == (2, 3, 16) and out.dtype == torch.float32 and attn is None
    with pytest.raises(ValueError, match="num_heads \\* head_dim"):
        layers.LogLinearMamba2(3, 8, 16, 4)


def test_empty_input_and_bad_cache():
    m = make()
    for shape in ((0, 4), (2, 0)):
        x = torch.zeros(*shape, HID, dtype=F64)
        out, _, cache = m(x, past_key_values=layers.Cache(), use_cache=True)
        assert out.shape == x.shape
        ht, off = cache[0]["recurrent_state"]
        assert ht.shape == (shape[0], 4, 6, 4, 8) and off.shape == (shape[0],)
    x = inputs(2, 3)
    _, _, cache = m(x, past_key_values=layers.Cache(), use_cache=True)
    bad = cache.clone()
    bad[0]["recurrent_state"] = bad[0]["recurrent_state"][0]  # a bare tensor, no offsets
    with pytest.raises(TypeError, match="tuple"):
        m(x[:, :1], past_key_values=bad, use_cache=True)
    with pytest.raises(ValueError, match="holds 2 sequences"):
        m(x[:1, :1], past_key_values=cache.clone(), use_cache=True)
    # the cache's clone / index_select work on the (ht, offsets) tuple
    sub = cache.index_select(torch.tensor([1]))
    a, _, _ = m(x[1:, :1], past_key_values=sub, use_cache=True)
    b, _, _ = m(x[:, :1], past_key_values=cache.clone(), use_cache=True)
    assert rel(a[0], b[1]) <= 1e-12

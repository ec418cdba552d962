"""KimiDeltaAttention against fla 0.6's layer (fla/layers/kda.py): parameters per value head,
fla's init (A_log = log U(1, 16) per value head, dt_bias with softplus(dt_bias) log-uniform in
[1e-3, 1e-1] per (value head, key channel); A_log = 0 with safe_gate), the bounded gate of
`lower_bound`, and the layer with its gate switched off (A_log = -inf, so g = 0) equal to
DeltaNet with the same weights and output gate."""
import copy

import pytest
import torch
import torch.nn.functional as F

import layers
from helpers import assert_close
from test_layers import inputs, run

D = 32


def kda(**kw):
    torch.manual_seed(0)
    return layers.KimiDeltaAttention(**{**dict(hidden_size=D, head_dim=8, num_heads=2,
                                               layer_idx=0), **kw})


@pytest.mark.parametrize("nv", [None, 4])
def test_init_is_fla_06(nv):
    m = kda(num_v_heads=nv)
    HV = nv or 2
    assert m.A_log.shape == (HV,) and m.dt_bias.shape == (HV * 8,)
    assert m.b_proj.out_features == HV and m.f_proj[1].out_features == HV * 8
    assert m.A_log.dtype == m.dt_bias.dtype == torch.float32
    A, dt = m.A_log.exp(), F.softplus(m.dt_bias)
    assert (A >= 1).all() and (A <= 16).all()
    assert (dt >= 1e-3 * 0.999).all() and (dt <= 0.1 * 1.001).all()
    assert dt.std() > 0  # drawn, not a constant (the old zeros gave softplus(0) = ln 2)
    assert all(getattr(p, "_no_weight_decay", False) for p in (m.A_log, m.dt_bias))
    # at init the per-token decay keeps most of the state (exp(g) > 0.1 everywhere: at worst
    # -16 * 0.1 plus what the small f_proj adds), not the near-zero of dt_bias = 0
    with torch.no_grad():
        g = m._gate(inputs(2, 16), layers.base.MixerStep(None, None, None, False))
    assert g.shape == (2, 16, HV, 8)
    assert g.min() > -2.5 and g.median() > -0.5


def test_safe_gate_init_and_arguments():
    m = kda(safe_gate=True, lower_bound=-5)
    assert torch.equal(m.A_log, torch.zeros(2)) and m.lower_bound == -5.0
    with pytest.raises(ValueError, match="lower_bound"):
        kda(safe_gate=True)
    with pytest.raises(ValueError, match="lower_bound"):
        kda(safe_gate=True, lower_bound=-6)
    with pytest.raises(ValueError, match="lower_bound"):
        kda(lower_bound=0.0)
    kda(lower_bound=-8.0)  # fla's gate without safe_gate takes any negative bound


def test_lower_bound_gate_is_bounded():
    m = kda(lower_bound=-5.0)
    with torch.no_grad():
        m.dt_bias.normal_(0, 20)  # push the gate to both ends
        g = m._gate(inputs(2, 16), layers.base.MixerStep(None, None, None, False))
    a = m.A_log.exp()[:, None]
    want = -5.0 * torch.sigmoid(a * (m.f_proj(inputs(2, 16)).view(2, 16, 2, 8)
                                     + m.dt_bias.view(2, 8)))
    assert_close("bounded gate", g, want.detach(), 1e-6)
    assert (g >= -5).all() and (g <= 0).all()


def _deltanet_twin(k):
    """DeltaNet with KDA's weights: q/k/v projections and convs, b_proj, o_proj, the low-rank
    g_proj and the sigmoid-gated output norm (KDA's own modules)."""
    dn = layers.DeltaNet(hidden_size=D, num_heads=2, expand_k=0.5, expand_v=0.5, use_gate=True,
                         layer_idx=0)
    sd = {n: p for n, p in k.state_dict().items()
          if n.split(".")[0] in ("q_proj", "k_proj", "v_proj", "q_conv1d", "k_conv1d",
                                 "v_conv1d", "b_proj", "o_proj")}
    missing = dn.load_state_dict(sd, strict=False).missing_keys
    assert sorted(missing) == ["g_proj.weight", "o_norm.weight"]
    dn.g_proj, dn.o_norm = copy.deepcopy(k.g_proj), copy.deepcopy(k.o_norm)
    return dn


@pytest.mark.parametrize("training", [True, False], ids=["chunk", "recurrent"])
def test_zero_gate_equals_deltanet(training):
    """With A_log = -inf the gate is g = -0 * softplus(.) = 0 (no decay): KDA is DeltaNet with
    the same weights, prefill and decode."""
    k = kda()
    with torch.no_grad():
        k.A_log.fill_(float("-inf"))
        k.g_proj[1].bias.normal_()  # a non-trivial output gate
    dn = _deltanet_twin(k)
    k.train(training), dn.train(training)
    x = inputs(2, 9)
    with torch.no_grad():
        ok, ck = run(k, x[:, :7], use_cache=True)
        od, cd = run(dn, x[:, :7], use_cache=True)
        assert_close("prefill", ok, od, 1e-6)
        assert_close("state", ck[0]["recurrent_state"], cd[0]["recurrent_state"], 1e-6)
        for t in (7, 8):
            ok, ck = run(k, x[:, t:t + 1], cache=ck)
            od, cd = run(dn, x[:, t:t + 1], cache=cd)
            assert_close(f"decode {t}", ok, od, 1e-6)
    # and the gate does matter once A_log is finite
    with torch.no_grad():
        k.A_log.fill_(0.0)
        assert (run(k, x)[0] - run(dn, x)[0]).abs().max() > 1e-3


@pytest.mark.parametrize("kw", [dict(num_v_heads=4), dict(num_v_heads=4, lower_bound=-5.0,
                                                          safe_gate=True)],
                         ids=["gva", "bounded"])
def test_causal_lm_decode_equals_forward(kw):
    torch.manual_seed(0)
    lm = layers.CausalLM(32, D, 2, mixer="kda",
                         mixer_kwargs=dict(num_heads=2, head_dim=8, **kw)).eval()
    ids = torch.randint(0, 32, (2, 12))
    with torch.no_grad():
        full, _ = lm(ids)
        logits, cache = lm(ids[:, :5], use_cache=True)
        steps = [logits]
        for t in range(5, 12):
            logits, cache = lm(ids[:, t:t + 1], cache=cache)
            steps.append(logits)
    assert_close("decode", torch.cat(steps, 1), full, 1e-5)

"""The layers against an independent float64 reference (written here from the papers' / peers'
equations over lightning_ops.reference), the peers' checkpoints (state_dicts with exactly their
key names and shapes, taken from fla's and mamba-ssm's layer sources, load strictly), the peers'
positional constructor order, default configurations, and empty inputs."""
import pytest
import torch
import torch.nn.functional as F

import layers
from helpers import assert_close, cu_seqlens_from_lengths
from lightning_ops import reference as R
from test_layers import CONFIGS, D, NAMES, inputs, make, run

F64_TOL = 1e-10


# -- an independent float64 reference forward of each layer ------------------------------------
def conv_ref(conv, x):
    """Causal depthwise conv (+ SiLU) of x [B, T, C] with the module's weights."""
    W = conv.weight.shape[-1]
    y = F.conv1d(F.pad(x.transpose(1, 2), (W - 1, 0)), conv.weight, conv.bias,
                 groups=conv.weight.shape[0])
    return (F.silu(y) if conv.activation else y).transpose(1, 2)


def rms(x, weight, eps, group=None):
    g = group or x.shape[-1]
    xg = x.reshape(*x.shape[:-1], x.shape[-1] // g, g)
    xg = xg / torch.sqrt(xg.pow(2).mean(-1, keepdim=True) + eps)
    return xg.reshape(x.shape) * weight


def heads(x, d):
    return x.reshape(*x.shape[:-1], x.shape[-1] // d, d)


def gla_ref(m, x):
    q, k, v = m.q_proj(x), m.k_proj(x), m.v_proj(x)
    if m.use_short_conv:
        q, k, v = conv_ref(m.q_conv1d, q), conv_ref(m.k_conv1d, k), conv_ref(m.v_conv1d, v)
    gk = F.logsigmoid(m.gk_proj(x)) / m.gate_logit_normalizer
    G = m.num_kv_groups
    q, k, v, gk = heads(q, m.head_k_dim), heads(k, m.head_k_dim), heads(v, m.head_v_dim), \
        heads(gk, m.head_k_dim)
    k, v, gk = (t.repeat_interleave(G, dim=2) for t in (k, v, gk))
    o, _ = R.gla_ref(q, k, v, gk)
    norm = m.g_norm_swish_gate if m.fuse_norm_and_gate else m.g_norm
    o = rms(o, norm.weight, norm.eps) * F.silu(heads(m.g_proj(x), m.head_v_dim))
    return m.o_proj(o.flatten(-2))


def lightning_ref(m, x):
    q, k, v = F.silu(m.q_proj(x)), F.silu(m.k_proj(x)), m.v_proj(x)
    o, _ = R.lightning_attn_ref(heads(q, m.head_k_dim), heads(k, m.head_k_dim),
                                heads(v, m.head_v_dim), m.slope.double())
    o = rms(o, m.g_norm.weight, m.g_norm.eps) * F.silu(heads(m.g_proj(x), m.head_v_dim))
    return m.o_proj(o.flatten(-2))


def delta_ref(m, x, gated):
    q, k, v = m.q_proj(x), m.k_proj(x), m.v_proj(x)
    q, k, v = conv_ref(m.q_conv1d, q), conv_ref(m.k_conv1d, k), conv_ref(m.v_conv1d, v)
    q, k, v = heads(q, m.head_k_dim), heads(k, m.head_k_dim), heads(v, m.head_v_dim)
    beta = torch.sigmoid(m.b_proj(x))
    if gated:
        g = -m.A_log.exp() * F.softplus(m.a_proj(x) + m.dt_bias)
        o, _ = R.gated_delta_rule_ref(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)
    else:
        o, _ = R.delta_rule_ref(q, k, v, beta, use_qk_l2norm_in_kernel=True)
    o = rms(o, m.o_norm.weight, m.o_norm.eps)
    if m.use_gate:
        act = torch.sigmoid if getattr(m, "output_gate_activation", "swish") == "sigmoid" \
            else F.silu
        o = o * act(heads(m.g_proj(x), m.head_v_dim))
    return m.o_proj(o.flatten(-2))


def mamba_ref(m, u):
    x, z = m.in_proj(u).chunk(2, dim=-1)
    x = conv_ref(m.conv1d, x)
    dt, B, C = m.x_proj(x).split([m.dt_rank, m.d_state, m.d_state], dim=-1)
    dt = dt @ m.dt_proj.weight.t()
    t = lambda a: a.transpose(1, 2)  # noqa: E731
    y = R.selective_scan_ref(t(x), t(dt), -m.A_log.exp(), t(B), t(C), m.D, t(z),
                             delta_bias=m.dt_proj.bias, delta_softplus=True)
    return m.out_proj(t(y))


def mamba2_ref(m, u):
    b, l, _ = u.shape
    h, p, g, n = m.nheads, m.headdim, m.ngroups, m.d_state
    z0, x0, z, xBC, dt = m.in_proj(u).split([m.d_mlp, m.d_mlp, m.d_ssm, m.d_ssm + 2 * g * n, h],
                                             dim=-1)
    xBC = conv_ref(m.conv1d, xBC)
    x, B, C = xBC.split([m.d_ssm, g * n, g * n], dim=-1)
    y, _ = R.ssd_ref(x.reshape(b, l, h, p), dt, -m.A_log.exp(), B.reshape(b, l, g, n),
                     C.reshape(b, l, g, n), D=m.D.view(h, p) if m.D_has_hdim else m.D,
                     dt_bias=m.dt_bias, dt_softplus=True)
    y = rms(y.reshape(b, l, m.d_ssm) * F.silu(z), m.norm.weight, 1e-5, m.d_ssm // g)
    if m.d_mlp:
        y = torch.cat([F.silu(z0) * x0, y], dim=-1)
    return m.out_proj(y)


def kda_ref(m, x):
    q, k, v = m.q_proj(x), m.k_proj(x), m.v_proj(x)
    q, k, v = conv_ref(m.q_conv1d, q), conv_ref(m.k_conv1d, k), conv_ref(m.v_conv1d, v)
    q, k, v = heads(q, m.head_k_dim), heads(k, m.head_k_dim), heads(v, m.head_v_dim)
    # fla 0.6: gate, beta, A_log [HV] and dt_bias [HV * K] per value head (q/k shared by
    # each group of value heads inside the op)
    f = heads(m.f_proj(x) + m.dt_bias, m.head_k_dim)
    if m.lower_bound is None:
        g = -m.A_log.exp()[:, None] * F.softplus(f)
    else:
        g = m.lower_bound * torch.sigmoid(m.A_log.exp()[:, None] * f)
    beta = torch.sigmoid(m.b_proj(x)) * (2 if m.allow_neg_eigval else 1)
    o, _ = R.kda_ref(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)
    o = rms(o, m.o_norm.weight, m.o_norm.eps) * torch.sigmoid(heads(m.g_proj(x), m.head_v_dim))
    return m.o_proj(o.flatten(-2))


REFS = {"gla": gla_ref, "lightning": lightning_ref,
        "deltanet": lambda m, x: delta_ref(m, x, False),
        "gated_deltanet": lambda m, x: delta_ref(m, x, True), "kda": kda_ref,
        "mamba": mamba_ref, "mamba2": mamba2_ref}


def reference(name, layer, x):
    """The reference forward in float64 on float64 copies of the layer and input."""
    m = _double_copy(layer)
    with torch.no_grad():
        return REFS[name](m, x.double())


def _double_copy(layer):
    import copy
    return copy.deepcopy(layer).double()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("training", [True, False], ids=["chunk", "recurrent"])
def test_float64_layer_matches_float64_reference(name, training):
    """A .double() layer computes in float64 end to end (norms, gates, convs, softplus): it
    matches the float64 reference to 1e-10; the fp32 layer to fp32 accuracy."""
    layer = make(name).train(training)
    x = inputs(2, 7)
    ref = reference(name, layer, x)
    with torch.no_grad():
        out64, _ = run(_double_copy(layer).train(training), x.double())
        out32, _ = run(layer, x)
    assert out64.dtype == torch.float64
    assert_close(f"{name} float64", out64, ref, F64_TOL)
    assert_close(f"{name} float32", out32, ref, 1e-5)


@pytest.mark.parametrize("name", ["gated_deltanet", "mamba2"])
def test_float64_states_and_decode(name):
    """float64 layers keep float64 states (cache) and decode in float64."""
    layer = _double_copy(make(name)).eval()
    x = inputs(2, 6).double()
    with torch.no_grad():
        full, _ = run(layer, x)
        out, cache = run(layer, x[:, :5], use_cache=True)
        step, _ = run(layer, x[:, 5:], cache=cache)
    assert_close(f"{name} float64 decode", torch.cat([out, step], 1), full, F64_TOL)


# -- peers' checkpoints --------------------------------------------------------------------------
def fla_gla_keys(H=32, nh=2, ek=0.5, ev=1.0, kv_heads=None, conv=4, fused=True):
    kd, vd = int(H * ek), int(H * ev)
    G = nh // (kv_heads or nh)
    keys = {"q_proj.weight": [kd, H], "k_proj.weight": [kd // G, H],
            "v_proj.weight": [vd // G, H], "g_proj.weight": [vd, H],
            "q_conv1d.weight": [kd, 1, conv], "k_conv1d.weight": [kd // G, 1, conv],
            "v_conv1d.weight": [vd // G, 1, conv],
            "gk_proj.0.weight": [16, H], "gk_proj.1.weight": [kd // G, 16],
            "gk_proj.1.bias": [kd // G], "o_proj.weight": [H, vd]}
    keys["g_norm_swish_gate.weight" if fused else "g_norm.weight"] = [vd // nh]
    return keys


def fla_deltanet_keys(H=32, nh=2, conv=4):
    return {"q_proj.weight": [H, H], "k_proj.weight": [H, H], "v_proj.weight": [H, H],
            "b_proj.weight": [nh, H], "q_conv1d.weight": [H, 1, conv],
            "k_conv1d.weight": [H, 1, conv], "v_conv1d.weight": [H, 1, conv],
            "o_norm.weight": [H // nh], "o_proj.weight": [H, H]}


def fla_gdn_keys(H=32, hd=8, nh=2, ev=2, conv=4, nv=None):
    nv = nv or nh
    kd, vd = nh * hd, nv * hd * ev
    return {"q_proj.weight": [kd, H], "k_proj.weight": [kd, H], "v_proj.weight": [vd, H],
            "a_proj.weight": [nv, H], "b_proj.weight": [nv, H], "A_log": [nv], "dt_bias": [nv],
            "q_conv1d.weight": [kd, 1, conv], "k_conv1d.weight": [kd, 1, conv],
            "v_conv1d.weight": [vd, 1, conv], "g_proj.weight": [vd, H],
            "o_norm.weight": [hd * ev], "o_proj.weight": [H, vd]}


def fla_kda_keys(H=32, hd=8, nh=2, ev=1, conv=4, nv=None):
    """fla 0.6's KimiDeltaAttention: f_proj's output, b_proj, A_log and dt_bias per value head
    (gate_dim = num_v_heads * head_dim), q/k per q/k head."""
    nv = nv or nh
    kd, vd, hv, gd = nh * hd, nv * hd * ev, hd * ev, nv * hd
    return {"q_proj.weight": [kd, H], "k_proj.weight": [kd, H], "v_proj.weight": [vd, H],
            "q_conv1d.weight": [kd, 1, conv], "k_conv1d.weight": [kd, 1, conv],
            "v_conv1d.weight": [vd, 1, conv], "f_proj.0.weight": [hv, H],
            "f_proj.1.weight": [gd, hv], "b_proj.weight": [nv, H], "A_log": [nv],
            "dt_bias": [gd], "g_proj.0.weight": [hv, H], "g_proj.1.weight": [vd, hv],
            "g_proj.1.bias": [vd], "o_norm.weight": [hv], "o_proj.weight": [H, vd]}


def mamba_keys(dm=32, ds=4, dc=4, ex=2):
    di, r = ex * dm, -(-dm // 16)
    return {"in_proj.weight": [2 * di, dm], "conv1d.weight": [di, 1, dc], "conv1d.bias": [di],
            "x_proj.weight": [r + 2 * ds, di], "dt_proj.weight": [di, r], "dt_proj.bias": [di],
            "A_log": [di, ds], "D": [di], "out_proj.weight": [dm, di]}


def mamba2_keys(dm=32, ds=8, dc=4, ex=2, hd=8, ng=1, d_ssm=None):
    di = ex * dm
    ssm = d_ssm or di
    nh = ssm // hd
    return {"in_proj.weight": [2 * di + 2 * ng * ds + nh, dm],
            "conv1d.weight": [ssm + 2 * ng * ds, 1, dc], "conv1d.bias": [ssm + 2 * ng * ds],
            "dt_bias": [nh], "A_log": [nh], "D": [nh], "norm.weight": [ssm],
            "out_proj.weight": [dm, di]}


PEERS = {
    "fla GLA": ("gla", lambda: layers.GatedLinearAttention(
        hidden_size=32, num_heads=2, use_short_conv=True), fla_gla_keys()),
    "fla GLA kv_heads, no fuse": ("gla", lambda: layers.GatedLinearAttention(
        hidden_size=32, num_heads=2, num_kv_heads=1, use_short_conv=True, fuse_norm=False),
        fla_gla_keys(kv_heads=1, fused=False)),
    "fla DeltaNet": ("deltanet", lambda: layers.DeltaNet(hidden_size=32, num_heads=2),
                     fla_deltanet_keys()),
    "fla GatedDeltaNet": ("gated_deltanet", lambda: layers.GatedDeltaNet(
        hidden_size=32, head_dim=8, num_heads=2), fla_gdn_keys()),
    "fla GatedDeltaNet sigmoid gate, GVA": ("gated_deltanet", lambda: layers.GatedDeltaNet(
        hidden_size=32, head_dim=8, num_heads=2, num_v_heads=4, expand_v=1,
        output_gate_activation="sigmoid"), fla_gdn_keys(nh=2, ev=1, nv=4)),
    "fla KimiDeltaAttention": ("kda", lambda: layers.KimiDeltaAttention(
        hidden_size=32, head_dim=8, num_heads=2), fla_kda_keys()),
    "fla KimiDeltaAttention GVA": ("kda", lambda: layers.KimiDeltaAttention(
        hidden_size=32, head_dim=8, num_heads=2, num_v_heads=4), fla_kda_keys(nv=4)),
    "fla KimiDeltaAttention lower_bound": ("kda", lambda: layers.KimiDeltaAttention(
        hidden_size=32, head_dim=8, num_heads=2, num_v_heads=4, safe_gate=True,
        lower_bound=-5.0, allow_neg_eigval=True), fla_kda_keys(nv=4)),
    "mamba-ssm Mamba": ("mamba", lambda: layers.Mamba(32, d_state=4), mamba_keys()),
    "mamba-ssm Mamba2": ("mamba2", lambda: layers.Mamba2(32, d_state=8, headdim=8),
                         mamba2_keys()),
    "mamba-ssm Mamba2 d_ssm": ("mamba2", lambda: layers.Mamba2(32, d_state=8, headdim=8,
                                                               d_ssm=32),
                               mamba2_keys(d_ssm=32)),
}


@pytest.mark.parametrize("peer", list(PEERS))
def test_peer_state_dict_loads_strictly(peer):
    """A state_dict with exactly the peer's key names and shapes loads with strict=True, and
    the loaded layer computes the peer's math (the float64 reference)."""
    name, build, keys = PEERS[peer]
    torch.manual_seed(0)
    layer = build()
    assert {k: list(v.shape) for k, v in layer.state_dict().items()} == keys
    g = torch.Generator().manual_seed(1)
    sd = {k: torch.randn(shape, generator=g) * 0.3 for k, shape in keys.items()}
    if "A_log" in sd:
        sd["A_log"] = sd["A_log"].abs().log()  # a plausible decay
    layer.load_state_dict(sd, strict=True)
    x = inputs(2, 6)
    with torch.no_grad():
        out, _ = run(layer.train(), x)
    assert_close(f"{peer} output", out, reference(name, layer, x), 1e-5)


def test_peer_positional_constructor_order():
    """The peers' positional argument order (fla: mode first; DeltaNet: mode, d_model, ...)."""
    gla = layers.GatedLinearAttention("chunk", 32, 0.5, 1.0, 2)
    assert (gla.hidden_size, gla.key_dim, gla.num_heads) == (32, 16, 2)
    dn = layers.DeltaNet("chunk", None, 32, 1.0, 1.0, 2)
    assert (dn.hidden_size, dn.num_heads) == (32, 2)
    gdn = layers.GatedDeltaNet(32, 2, 8, 2)
    assert (gdn.hidden_size, gdn.head_v_dim, gdn.num_heads) == (32, 16, 2)
    m = layers.Mamba(32, 4, 3, 2, "auto", 0.001, 0.1, "random", 1.0, 1e-4, True, False, True, 5)
    assert (m.d_state, m.d_conv, m.layer_idx) == (4, 3, 5)
    m2 = layers.Mamba2(32, 8, 4, None, 2, 8, 32, 1)
    assert (m2.d_state, m2.headdim, m2.d_ssm, m2.nheads) == (8, 8, 32, 4)
    # fla 0.6: hidden_size, expand_v, head_dim, num_heads, num_v_heads, mode, use_short_conv,
    # allow_neg_eigval, safe_gate, lower_bound, conv_size, conv_bias, layer_idx, norm_eps
    kda = layers.KimiDeltaAttention(32, 1, 8, 2, 4, "chunk", True, False, True, -3.0, 3, False,
                                    7, 1e-6)
    assert (kda.num_v_heads, kda.safe_gate, kda.lower_bound, kda.conv_size, kda.layer_idx,
            kda.o_norm.eps) == (4, True, -3.0, 3, 7, 1e-6)


def test_gated_deltanet_output_gate_activation():
    """fla 0.6's output_gate_activation: 'swish' (default, also 'silu') or 'sigmoid'."""
    for act in ("swish", "silu", "sigmoid"):
        m = layers.GatedDeltaNet(hidden_size=32, head_dim=8, num_heads=2,
                                 output_gate_activation=act)
        assert m.o_norm.gate_fn == act and m.output_gate_activation == act
    with pytest.raises(ValueError, match="output_gate_activation"):
        layers.GatedDeltaNet(hidden_size=32, head_dim=8, num_heads=2,
                             output_gate_activation="relu")


def test_gla_feature_map_and_fused_chunk_mode():
    torch.manual_seed(0)
    a = layers.GatedLinearAttention(hidden_size=32, num_heads=2, feature_map="relu",
                                    mode="fused_chunk").train()
    x = inputs(1, 5)
    ref = gla_ref(_double_copy(a), x.double())  # no feature map in gla_ref
    out, _ = run(a, x)
    assert (out - ref).abs().max() > 1e-3, "feature_map must change the math"
    q_relu = torch.relu  # the reference with the feature map applied
    m = _double_copy(a)
    q, k, v = q_relu(m.q_proj(x.double())), q_relu(m.k_proj(x.double())), m.v_proj(x.double())
    gk = F.logsigmoid(m.gk_proj(x.double())) / 16
    o, _ = R.gla_ref(heads(q, 8), heads(k, 8), heads(v, 16), heads(gk, 8))
    o = rms(o, m.g_norm_swish_gate.weight, 1e-5) * F.silu(heads(m.g_proj(x.double()), 16))
    assert_close("gla feature_map", out, m.o_proj(o.flatten(-2)), 1e-5)


def test_mamba2_flat_input_and_seq_idx():
    """mamba-ssm's seqlen (flattened [B * L, d] input) and seq_idx (segments, no state or conv
    tap crosses) equal cu_seqlens packing."""
    layer = make("mamba2").train()
    x = inputs(2, 5)
    with torch.no_grad():
        out = layer(x)
        flat = layer(x.reshape(10, D), seqlen=5)
        assert_close("flat", flat, out.reshape(10, D), 1e-6)
        packed = inputs(1, 7)
        seq_idx = torch.tensor([[0, 0, 0, 1, 1, 1, 1]], dtype=torch.int32)
        a = layer(packed, seq_idx=seq_idx)
        b = layer(packed, cu_seqlens=cu_seqlens_from_lengths([3, 4]))
    assert_close("seq_idx", a, b, 1e-5)


# -- defaults and empty inputs ------------------------------------------------------------------
@pytest.mark.parametrize("cls", [layers.GatedLinearAttention, layers.DeltaNet,
                                 layers.GatedDeltaNet, layers.LightningAttention, layers.Mamba,
                                 layers.Mamba2], ids=lambda c: c.__name__)
def test_default_configuration_runs(cls):
    """Every layer's default configuration (fla's GatedDeltaNet: head_dim 256, expand_v 2, so
    V = 512) runs forward and backward."""
    torch.manual_seed(0)
    layer = cls().train()
    x = torch.randn(1, 3, layer.hidden_size, requires_grad=True)
    out, _ = run(layer, x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_default_causal_lm_runs():
    torch.manual_seed(0)
    model = layers.CausalLM(100)
    ids = torch.randint(0, 100, (1, 4))
    logits, _ = model(ids)
    logits.sum().backward()
    assert logits.shape == (1, 4, 100)
    assert model.generate(ids, 2).shape == (1, 6)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(0, 5), (2, 0)], ids=["B=0", "T=0"])
def test_empty_input(name, shape):
    """B = 0 or T = 0: an empty output of the right shape; backward works (zero gradients for
    the input and every parameter); a cache passes through unchanged (T = 0) or stays empty."""
    layer = make(name).train()
    x = torch.randn(*shape, D, requires_grad=True)
    out, _ = run(layer, x)
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert all(p.grad is not None and not p.grad.any() for p in layer.parameters())
    mask = torch.ones(shape, dtype=torch.long)
    out, _ = run(layer, x.detach(), mask=mask)
    assert out.shape == x.shape
    with torch.no_grad():
        _, cache = run(layer, inputs(shape[0], 3), use_cache=True)
        before = [t.clone() for t in _flat_states(layer, cache)]
        out, cache = run(layer, x.detach(), cache=cache)
    assert out.shape == x.shape
    for a, b in zip(_flat_states(layer, cache), before):
        assert torch.equal(a, b)


def _flat_states(layer, cache):
    from test_layers import states
    rec, convs = states(layer, cache)
    return [rec, *convs]

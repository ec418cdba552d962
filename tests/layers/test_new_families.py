"""LION, HGRN-2, Hedgehog and Mixture-of-Memories layers against independent float64 references
(written here from the papers' / peers' equations over lightning_ops.reference), padding masks and
packing, cached decode == full forward, the peers' parameter names, empty inputs."""
import copy

import pytest
import torch
import torch.nn.functional as F

import layers
from helpers import assert_close, cu_seqlens_from_lengths
from lightning_ops import reference as R

D = 32


def make(name, seed=0, **kw):
    torch.manual_seed(seed)
    build = {
        "lion-lit": lambda: layers.LION(D, 4, "lit", layer_idx=0),
        "lion-d": lambda: layers.LION(D, 4, "Decay", layer_idx=0),
        "lion-s": lambda: layers.LION(D, 4, "selective", qkv_bias=True, layer_idx=0),
        "hgrn2": lambda: layers.HGRN2Attention(hidden_size=D, expand_ratio=8, layer_idx=1),
        "hgrn2-conv": lambda: layers.HGRN2Attention(hidden_size=D, num_heads=2,
                                                    expand_ratio=None, use_short_conv=True,
                                                    layer_idx=0),
        "hedgehog": lambda: layers.HedgehogAttention(hidden_size=D, num_heads=4, layer_idx=0),
        "mom": lambda: layers.MomAttention(hidden_size=D, head_dim=8, num_heads=2, expand_v=1,
                                           num_memories=4, topk=2, layer_idx=0),
        "mom-shared": lambda: layers.MomAttention(hidden_size=D, head_dim=8, num_heads=2,
                                                  num_memories=3, topk=1, shared_mem=True,
                                                  layer_idx=0),
    }[name]
    return build()


NAMES = ["lion-lit", "lion-d", "lion-s", "hgrn2", "hgrn2-conv", "hedgehog", "mom", "mom-shared"]
CAUSAL = [n for n in NAMES if not n.startswith("lion")]


def inputs(B, T, seed=1):
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed))


def run(layer, x, **kw):
    out = layer(x, **kw)
    return out[0], out[2]


# -- float64 references -----------------------------------------------------------------------
def heads(x, d):
    return x.reshape(*x.shape[:-1], x.shape[-1] // d, d)


def rms(x, weight, eps):
    x = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return x if weight is None else x * weight


def conv_ref(conv, x):
    W = conv.weight.shape[-1]
    y = F.conv1d(F.pad(x.transpose(1, 2), (W - 1, 0)), conv.weight, conv.bias,
                 groups=conv.weight.shape[0])
    return (F.silu(y) if conv.activation else y).transpose(1, 2)


def lion_ref(m, x):
    """The authors' parallel (attention) form: (q k^T * scale) * M, row-normalised."""
    H, Dh = m.num_heads, m.head_dim
    q, k, v = heads(m.qkv(x), Dh).split(H, dim=2)  # the authors: reshape(B, T, 3, H, Dh)
    if m.mask_type == "lit":
        q, k = F.elu(q) + 1, F.elu(k) + 1
    else:
        f = lambda t: (F.silu(t) + 0.5) / (F.silu(t) + 0.5).norm(dim=-1, keepdim=True)  # noqa
        q, k = f(q), f(k)
    B, T = x.shape[:2]
    out = torch.zeros(B, T, H, Dh, dtype=x.dtype)
    for b in range(B):
        lg = torch.zeros(T, H, dtype=x.dtype)
        if m.mask_type == "selective":
            lg = torch.log(1 - torch.sigmoid(m.a_i(x[b])))
        elif m.mask_type == "decay":
            lg = torch.log(torch.sigmoid(m.a_i)).expand(T, H)
        M = R.lion_mask_log(lg).exp()                                  # [T, T, H]
        a = torch.einsum("ihd,jhd->ijh", q[b], k[b]) * m.scale * M
        a = a / (a.sum(1, keepdim=True) + m.eps)
        out[b] = torch.einsum("ijh,jhd->ihd", a, v[b])
    return m.proj(out.reshape(B, T, H * Dh))


def hgrn2_ref(m, x):
    q, f, i = m.q_proj(x), m.f_proj(x), m.i_proj(x)
    if m.use_short_conv:
        q, f, i = conv_ref(m.q_conv1d, q), conv_ref(m.f_conv1d, f), conv_ref(m.i_conv1d, i)
    g = F.logsigmoid(f)
    d = m.head_f_dim
    o, _ = R.gla_ref(heads(F.silu(q), d), heads(1 - g.exp(), d), heads(i, m.head_i_dim),
                     heads(g, d))
    o = rms(o.flatten(-2), m.g_norm.weight, m.g_norm.eps)
    return m.o_proj(o)


def hedgehog_ref(m, x):
    """Causal, normalised: sum_{s<=t} phi(q_t).phi(k_s) v_s / sum_{s<=t} phi(q_t).phi(k_s)."""
    q, k = heads(m.q_proj(x), m.head_k_dim), heads(m.k_proj(x), m.head_k_dim)
    v = heads(m.v_proj(x), m.head_v_dim)
    fq, fk = m.feature_map_q(q), m.feature_map_k(k)
    a = torch.einsum("bihd,bjhd->bhij", fq, fk).tril()
    a = a / a.sum(-1, keepdim=True)
    o = torch.einsum("bhij,bjhd->bihd", a, v)
    o = rms(o, m.norm.weight, m.norm.eps)
    return m.o_proj(o.flatten(-2))


def mom_ref(m, x):
    """Per row and memory: the routed tokens' subsequence through the short convs and the gated
    delta rule of that memory; outputs summed with the routing weights."""
    B, T, _ = x.shape
    E, H = m.num_slots_memories, m.num_heads
    w, sel = m.gate(x).softmax(-1).topk(m.topk, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    out = torch.zeros(B, T, H, m.head_v_dim, dtype=x.dtype)
    for b in range(B):
        for e in range(E):
            if e == m.num_memories:  # the shared memory: every token, weight 1
                idx, wt = torch.arange(T), torch.ones(T, dtype=x.dtype)
            else:
                hit = (sel[b] == e)
                idx = hit.any(-1).nonzero()[:, 0]
                wt = (w[b] * hit).sum(-1)[idx]
            if idx.numel() == 0:
                continue
            xe = x[b, idx][None]
            proj = (lambda n: getattr(m, f"shared_{n}")) if e == m.num_memories else \
                (lambda n: getattr(m, f"{n}_proj")[e])
            q, k, v = m.q_proj(xe), proj("k")(xe), proj("v")(xe)
            q, k, v = conv_ref(m.q_conv1d, q), conv_ref(m.k_conv1d, k), conv_ref(m.v_conv1d, v)
            beta = torch.sigmoid(proj("b")(xe))
            g = -m.A_log.exp() * F.softplus(proj("a")(xe) + m.dt_bias)
            o, _ = R.gated_delta_rule_ref(heads(q, m.head_dim), heads(k, m.head_dim),
                                          heads(v, m.head_v_dim), g, beta,
                                          use_qk_l2norm_in_kernel=True)
            out[b, idx] += o[0] * wt[:, None, None]
    o = rms(out, m.o_norm.weight, m.o_norm.eps) * F.silu(heads(m.g_proj(x), m.head_v_dim))
    return m.o_proj(o.flatten(-2))


REFS = {"lion": lion_ref, "hgrn2": hgrn2_ref, "hedgehog": hedgehog_ref, "mom": mom_ref}


@pytest.mark.parametrize("name", NAMES)
def test_matches_float64_reference(name):
    layer = make(name).train()
    x = inputs(2, 7)
    m64 = copy.deepcopy(layer).double()
    with torch.no_grad():
        ref = REFS[name.split("-")[0]](m64, x.double())
        out64, _ = run(m64, x.double())
        out32, _ = run(layer, x)
    assert out64.dtype == torch.float64
    assert_close(f"{name} float64", out64, ref, 1e-10)
    assert_close(f"{name} float32", out32, ref, 1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_padding_and_packing(name):
    """Any 0/1 mask equals running each row's real tokens alone (bidirectional LION included:
    padding is invisible both ways); cu_seqlens packing equals separate rows; padded outputs 0."""
    layer = make(name).train()
    x = inputs(2, 8)
    mask = torch.tensor([[0, 1, 1, 0, 1, 1, 1, 1], [1] * 8])
    with torch.no_grad():
        out, _ = run(layer, x, attention_mask=mask)
        alone, _ = run(layer, x[:1, mask[0].bool()])
        row1, _ = run(layer, x[1:])
        packed, _ = run(layer, torch.cat([x[:1, mask[0].bool()], x[1:]], 1),
                        cu_seqlens=cu_seqlens_from_lengths([6, 8]))
    assert_close("masked row", out[0, mask[0].bool()], alone[0], 1e-5)
    assert (out[0, ~mask[0].bool()] == 0).all()
    assert_close("full row", out[1], row1[0], 1e-5)
    assert_close("packed", packed[0], torch.cat([alone[0], row1[0]]), 1e-5)


@pytest.mark.parametrize("name", CAUSAL)
@pytest.mark.parametrize("training", [True, False], ids=["chunk", "recurrent"])
def test_cached_decode_equals_full_forward(name, training):
    layer = make(name).train(training)
    x = inputs(2, 9)
    with torch.no_grad():
        full, _ = run(layer, x)
        cache = layers.Cache()
        parts = []
        for a, b in [(0, 5), (5, 6), (6, 9)]:
            o, cache = run(layer, x[:, a:b], past_key_values=cache, use_cache=True)
            parts.append(o)
    assert_close(f"{name} decode", torch.cat(parts, 1), full, 1e-5)


def test_lion_has_no_cache_and_backward_flows():
    layer = make("lion-s")
    with pytest.raises(ValueError, match="bidirectional"):
        layer(inputs(1, 4), past_key_values=layers.Cache(), use_cache=True)
    x = inputs(2, 5).requires_grad_()
    run(layer, x)[0].square().sum().backward()
    assert torch.isfinite(x.grad).all() and layer.a_i.weight.grad.abs().sum() > 0
    d = make("lion-d")
    run(d, inputs(1, 5))[0].sum().backward()
    assert d.a_i.grad.abs().sum() > 0


def test_lion_is_bidirectional():
    """Changing the last token changes the first output (and a causal layer's would not)."""
    layer = make("lion-s")
    x = inputs(1, 6)
    y = x.clone()
    y[0, -1] += 1.0
    with torch.no_grad():
        assert (run(layer, x)[0][0, 0] - run(layer, y)[0][0, 0]).abs().max() > 1e-6


def test_peer_parameter_names():
    """fla's HGRN2Attention / MomAttention / LinearAttention(hedgehog) key names and shapes; the
    LION authors' (qkv, proj, a_i)."""
    sd = lambda m: {k: list(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert sd(layers.HGRN2Attention(hidden_size=32, expand_ratio=8, use_short_conv=True)) == {
        "q_proj.weight": [32, 32], "f_proj.weight": [32, 32], "i_proj.weight": [32, 32],
        "q_conv1d.weight": [32, 1, 4], "f_conv1d.weight": [32, 1, 4],
        "i_conv1d.weight": [32, 1, 4], "g_norm.weight": [32], "o_proj.weight": [32, 32]}
    assert sd(layers.HedgehogAttention(hidden_size=32, num_heads=4)) == {
        "feature_map_q.layer.weight": [8, 8], "feature_map_q.layer.bias": [8],
        "feature_map_k.layer.weight": [8, 8], "feature_map_k.layer.bias": [8],
        "q_proj.weight": [32, 32], "k_proj.weight": [32, 32], "v_proj.weight": [32, 32],
        "norm.weight": [8], "o_proj.weight": [32, 32]}
    mom = sd(layers.MomAttention(hidden_size=32, head_dim=8, num_heads=2, num_memories=2,
                                 topk=1))
    want = {"q_proj.weight": [16, 32], "gate.weight": [2, 32], "A_log": [2], "dt_bias": [2],
            "q_conv1d.weight": [16, 1, 4], "k_conv1d.weight": [16, 1, 4],
            "v_conv1d.weight": [32, 1, 4], "g_proj.weight": [32, 32], "o_norm.weight": [16],
            "o_proj.weight": [32, 32]}
    for e in range(2):
        want.update({f"k_proj.{e}.weight": [16, 32], f"v_proj.{e}.weight": [32, 32],
                     f"b_proj.{e}.weight": [2, 32], f"a_proj.{e}.weight": [2, 32]})
    assert mom == want
    assert sd(layers.LION(32, 4, "selective", qkv_bias=True)) == {
        "qkv.weight": [96, 32], "qkv.bias": [96], "proj.weight": [32, 32], "proj.bias": [32],
        "a_i.weight": [4, 32], "a_i.bias": [4]}


def test_hedgehog_distillation_loss():
    """Cross entropy >= the teacher's entropy, a gradient reaches only the feature maps, and a
    few steps of training lower it."""
    layer = make("hedgehog")
    x = inputs(2, 12)
    opt = torch.optim.Adam([p for n, p in layer.named_parameters() if "feature_map" in n],
                           lr=0.05)
    first = None
    for _ in range(15):
        loss = layer.attention_distillation_loss(x)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        assert layer.q_proj.weight.grad is None or not layer.q_proj.weight.grad.any()
        opt.step()
    assert loss.item() < first
    q, k = layer._qk(x)
    s = torch.einsum("bihd,bjhd->bhij", q, k) * q.shape[-1] ** -0.5
    p = s.masked_fill(~torch.ones(12, 12, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    entropy = -(p * p.clamp_min(1e-30).log()).sum(-1).mean()
    assert layer.attention_distillation_loss(x).item() >= entropy.item() - 1e-6


def test_mom_router_outputs_and_balance_loss():
    layer = make("mom")
    x = inputs(2, 5)
    o, _, _, logits = layer(x)
    assert logits.shape == (10, 4)
    loss = layers.load_balancing_loss(logits, 4, 2)
    assert torch.isfinite(loss) and loss.item() >= 0.99  # 1 when balanced, more otherwise
    (o.sum() + loss).backward()
    assert layer.gate.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(0, 5), (2, 0)], ids=["B=0", "T=0"])
def test_empty_input(name, shape):
    layer = make(name).train()
    x = torch.randn(*shape, D, requires_grad=True)
    out, _ = run(layer, x)
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad.shape == x.shape


def test_mom_keeps_no_router_logits_outside_its_forward():
    """Run through CausalLM (mixer.mix) and decode, MoM must not keep the last router logits
    (and their autograd graph) on the module; its own forward still returns them."""
    torch.manual_seed(0)
    mk = dict(num_heads=2, head_dim=8, expand_v=1, num_memories=4, topk=2,
              use_output_gate=False)
    model = layers.CausalLM(32, hidden_size=32, num_layers=1, mixer="mom", mixer_kwargs=mk)
    ids = torch.randint(0, 32, (2, 9))
    out = model(ids)
    (out[0] if isinstance(out, tuple) else out).sum().backward()
    mom = next(m for m in model.modules() if isinstance(m, layers.MomAttention))
    assert mom._router_logits is None
    model.generate(ids[:, :4], max_new_tokens=3)
    assert mom._router_logits is None
    out = mom(torch.randn(2, 5, 32))
    assert out[3].shape == (10, 4) and mom._router_logits is None


def test_hgrn2_expand_ratio_larger_than_hidden_size_says_so():
    with pytest.raises(ValueError, match="expand_ratio 128 is larger than hidden_size 64"):
        layers.HGRN2Attention(hidden_size=64)

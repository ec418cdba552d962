"""Mixer layers: shapes/dtypes, gradients, caches (prefill + steps == full forward), left
padding, packed sequences, torch.compile, state dicts and bad input, for every layer."""
import shutil

import pytest
import torch

import layers
from helpers import assert_close, cu_seqlens_from_lengths, requires_gpu

D = 32  # hidden size

# Small configs exercising the non-default features: short convs in GLA, grouped value heads
# in Gated DeltaNet, groups and per-channel D in Mamba-2, a depth-scaled Lightning slope.
CONFIGS = {
    "gla": lambda: layers.GatedLinearAttention(hidden_size=D, num_heads=2, expand_k=0.5,
                                               use_short_conv=True, conv_size=3),
    "lightning": lambda: layers.LightningAttention(hidden_size=D, num_heads=2, layer_idx=1,
                                                   num_layers=3),
    "deltanet": lambda: layers.DeltaNet(hidden_size=D, num_heads=2, use_gate=True),
    "gated_deltanet": lambda: layers.GatedDeltaNet(hidden_size=D, num_heads=2, head_dim=8,
                                                   expand_v=1.5, num_v_heads=4),
    "mamba": lambda: layers.Mamba(d_model=D, d_state=4, d_conv=4),
    "mamba2": lambda: layers.Mamba2(d_model=D, d_state=8, headdim=8, ngroups=2,
                                    D_has_hdim=True, chunk_size=4),
}
NAMES = list(CONFIGS)
TOL = 1e-5  # fp32, relative to the largest value


def make(name, seed=0, dtype=torch.float32, device="cpu"):
    torch.manual_seed(seed)
    return CONFIGS[name]().to(device=device, dtype=dtype)


def inputs(B, T, seed=1, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, D, generator=g).to(device=device, dtype=dtype)


def assert_cache_close(name, got, want, tol=TOL):
    assert got.layer_type == want.layer_type
    assert_close(f"{name} recurrent_state", got.recurrent_state, want.recurrent_state, tol)
    assert len(got.conv_states) == len(want.conv_states)
    for i, (a, b) in enumerate(zip(got.conv_states, want.conv_states)):
        assert_close(f"{name} conv_state[{i}]", a, b, tol)


# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shape_and_dtype(name, dtype):
    layer = make(name, dtype=dtype)
    x = inputs(2, 7, dtype=dtype)
    out, cache = layer(x)
    assert out.shape == x.shape and out.dtype == dtype and cache is None
    assert torch.isfinite(out).all()
    out, cache = layer(x, use_cache=True)
    assert isinstance(cache, layers.LayerCache) and cache.batch_size == 2
    assert cache.recurrent_state.dtype == torch.float32  # states are fp32 whatever the inputs
    assert cache.seen_tokens == 7


@pytest.mark.parametrize("name", NAMES)
def test_gradient_reaches_every_parameter(name):
    layer = make(name).train()
    out, _ = layer(inputs(2, 9))
    (out * inputs(2, 9, seed=5)).sum().backward()
    for pname, p in layer.named_parameters():
        assert p.grad is not None, f"{name}.{pname}: no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}.{pname}: non-finite gradient"
        assert p.grad.abs().max() > 0, f"{name}.{pname}: zero gradient"


@pytest.mark.parametrize("name", NAMES)
def test_prefill_then_steps_equals_full_forward(name):
    """Prefill 5 tokens (chunked path), continue with a 3-token chunk, then 1-token decode
    steps (recurrent path, eval mode): outputs and final cache equal one full forward."""
    layer, x = make(name), inputs(2, 12)
    with torch.no_grad():
        layer.train()  # train mode: the chunked kernels even for short inputs
        full, full_cache = layer(x, use_cache=True)
        outs = []
        o, cache = layer(x[:, :5], use_cache=True)
        outs.append(o)
        o, cache = layer(x[:, 5:8], cache=cache)
        outs.append(o)
        layer.eval()  # eval mode: decode steps take the recurrent kernels
        for t in range(8, 12):
            o, cache = layer(x[:, t:t + 1], cache=cache)
            outs.append(o)
    assert_close(f"{name} output", torch.cat(outs, 1), full, TOL)
    assert_cache_close(name, cache, full_cache)
    assert cache.seen_tokens == 12


@pytest.mark.parametrize("name", NAMES)
def test_allocated_cache_starts_empty(name):
    """allocate_cache gives zero states: a forward from it equals one with no cache."""
    layer, x = make(name).train(), inputs(2, 6)
    cache = layer.allocate_cache(2)
    with torch.no_grad():
        ref, ref_cache = layer(x, use_cache=True)
        out, got = layer(x, cache=cache)
    assert_close(f"{name} output", out, ref, TOL)
    assert_cache_close(name, got, ref_cache)


@pytest.mark.parametrize("name", NAMES)
def test_left_padding_equals_unpadded(name):
    """Row 0 has 4 pad tokens (filled with junk) on the left: its real tokens' outputs, final
    state and next decode step equal a run on the real tokens alone."""
    layer, x = make(name).eval(), inputs(2, 10)
    pad = 4
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :pad] = 0
    xp = x.clone()
    xp[0, :pad] = 7.0  # junk that must not leak
    nxt = inputs(2, 1, seed=3)
    with torch.no_grad():
        out, cache = layer(xp, attention_mask=mask, use_cache=True)
        refs = [layer(x[b:b + 1, start:], use_cache=True) for b, start in ((0, pad), (1, 0))]
        for b, (ref, ref_cache) in enumerate(refs):  # before decoding updates caches in place
            assert_close(f"{name} row {b} output", out[b:b + 1, pad if b == 0 else 0:], ref,
                         TOL)
            assert_cache_close(name, cache.index_select(torch.tensor([b])), ref_cache)
        step, _ = layer(nxt, cache=cache)
        for b, (_, ref_cache) in enumerate(refs):
            ref_step, _ = layer(nxt[b:b + 1], cache=ref_cache)
            assert_close(f"{name} row {b} step", step[b:b + 1], ref_step, TOL)
    assert (out[0, :pad] == 0).all(), "outputs at padded positions should be zero"


@pytest.mark.parametrize("name", NAMES)
def test_left_padding_after_a_cache(name):
    """A padded chunk continuing a cache: the cached history joins the real tokens directly
    (the short conv sees [history, tokens], not [history, padding, tokens])."""
    layer, x = make(name).train(), inputs(2, 9)
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1, :2] = False
    with torch.no_grad():
        _, cache = layer(x[:, :5], use_cache=True)
        out, cache = layer(x[:, 5:], attention_mask=mask, cache=cache)
        ref0, c0 = layer(x[0:1], use_cache=True)
        ref1, c1 = layer(torch.cat([x[1:2, :5], x[1:2, 7:]], 1), use_cache=True)
    assert_close(f"{name} row 0", out[0:1], ref0[:, 5:], TOL)
    assert_close(f"{name} row 1", out[1:2, 2:], ref1[:, 5:], TOL)
    assert_cache_close(name, cache.index_select(torch.tensor([0])), c0)
    assert_cache_close(name, cache.index_select(torch.tensor([1])), c1)


@pytest.mark.parametrize("name", NAMES)
def test_packed_sequences_equal_separate_runs(name):
    """cu_seqlens packing (lengths 3, 1, 6, incl. a length-1 sequence), with and without a
    cache, then a packed continuation from that cache: all equal separate runs."""
    layer = make(name).train()
    lengths, more = [3, 1, 6], [2, 3, 1]
    seqs = [inputs(1, n, seed=10 + i) for i, n in enumerate(lengths)]
    conts = [inputs(1, n, seed=20 + i) for i, n in enumerate(more)]
    cu, cu2 = cu_seqlens_from_lengths(lengths), cu_seqlens_from_lengths(more)
    with torch.no_grad():
        plain, _ = layer(torch.cat(seqs, 1), cu_seqlens=cu)
        out, cache = layer(torch.cat(seqs, 1), cu_seqlens=cu, use_cache=True)
        # copies: continuing from a cache may update its tensors in place
        rows = [cache.index_select(torch.tensor([i])) for i in range(len(lengths))]
        out2, cache2 = layer(torch.cat(conts, 1), cu_seqlens=cu2, cache=cache)
        refs, refs2 = [], []
        for i, (s, c) in enumerate(zip(seqs, conts)):
            r, rc = layer(s, use_cache=True)
            assert_cache_close(f"{name} seq {i}", rows[i], rc)
            r2, rc2 = layer(c, cache=rc)
            refs.append(r)
            refs2.append(r2)
            assert_cache_close(f"{name} seq {i} cont", cache2.index_select(torch.tensor([i])),
                               rc2)
    assert_close(f"{name} packed (no cache)", plain, torch.cat(refs, 1), TOL)
    assert_close(f"{name} packed", out, torch.cat(refs, 1), TOL)
    assert_close(f"{name} packed continuation", out2, torch.cat(refs2, 1), TOL)


COMPILE_CASES = [(n, "aot_eager") for n in NAMES] + [
    # inductor (the default backend) for one layer: it also re-lays out tensors, which is where
    # strided inputs and the ops' fake gradients must agree; C++ codegen costs ~10 s per layer
    pytest.param("gated_deltanet", "inductor", marks=pytest.mark.skipif(
        shutil.which("g++") is None and shutil.which("c++") is None,
        reason="inductor on CPU needs a C++ compiler"))]


@pytest.mark.parametrize("name,backend", COMPILE_CASES)
def test_torch_compile_fullgraph(name, backend):
    """The whole layer traces into one graph (public ops are custom ops with fake impls);
    compiled forward and backward match eager. aot_eager for every layer checks tracing and
    autograd without inductor's minutes of C++ compilation."""
    torch._dynamo.reset()
    layer = make(name).train()
    x = inputs(2, 6).requires_grad_()
    eager, _ = layer(x)
    g_eager = torch.autograd.grad(eager.square().sum(), [x, *layer.parameters()])
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    out, _ = compiled(x)
    g = torch.autograd.grad(out.square().sum(), [x, *layer.parameters()])
    assert_close(f"{name} compiled output", out, eager, TOL)
    for i, (a, b) in enumerate(zip(g, g_eager)):
        assert_close(f"{name} compiled grad {i}", a, b, TOL)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name):
    src, dst = make(name, seed=0), make(name, seed=123)
    x = inputs(1, 5)
    a, _ = src(x)
    assert not torch.allclose(dst(x)[0], a), "different seeds should give different layers"
    dst.load_state_dict(src.state_dict())
    assert src.state_dict().keys() == dst.state_dict().keys()
    assert torch.equal(dst(x)[0], a)


def test_paper_inits():
    """Mamba: A_log = log(1..N), D = 1, softplus(dt bias) in [dt_min, dt_max]; Mamba-2 and
    Gated DeltaNet: dt in range and A_log from their init ranges; all float32."""
    torch.manual_seed(0)
    m = layers.Mamba(d_model=32, d_state=8, dt_min=0.01, dt_max=0.05)
    assert torch.allclose(m.A_log.exp(), torch.arange(1, 9.).repeat(64, 1))
    assert torch.equal(m.D, torch.ones(64))
    dt = torch.nn.functional.softplus(m.dt_proj.bias)
    assert dt.min() >= 0.01 * (1 - 1e-4) and dt.max() <= 0.05 * (1 + 1e-4)
    m2 = layers.Mamba2(d_model=32, d_state=8, headdim=8, A_init_range=(2, 4), dt_min=0.01,
                       dt_max=0.05, dtype=torch.bfloat16)
    assert m2.A_log.dtype == m2.dt_bias.dtype == m2.D.dtype == torch.float32
    assert m2.in_proj.weight.dtype == torch.bfloat16
    dt2 = torch.nn.functional.softplus(m2.dt_bias)
    assert dt2.min() >= 0.01 * (1 - 1e-4) and dt2.max() <= 0.05 * (1 + 1e-4)
    assert 2 <= m2.A_log.exp().min() and m2.A_log.exp().max() <= 4
    g = layers.GatedDeltaNet(hidden_size=32, num_heads=2, head_dim=8)
    assert g.A_log.exp().max() <= 16 and g.A_log.dtype == torch.float32
    assert all(getattr(p, "_no_weight_decay", False) for p in (m.A_log, m.D, m2.dt_bias))


# -- bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_bad_input(name):
    layer = make(name)
    x = inputs(2, 5)
    with pytest.raises(ValueError, match=r"hidden_states must have shape \[B, T, hidden_size\]"):
        layer(torch.randn(2, 5, D + 1))
    with pytest.raises(ValueError, match="hidden_states must have shape"):
        layer(torch.randn(5, D))
    with pytest.raises(TypeError, match="hidden_states must be float"):
        layer(torch.ones(2, 5, D, dtype=torch.long))
    with pytest.raises(ValueError, match=r"attention_mask must have shape \[B, T\] = \[2, 5\]"):
        layer(x, attention_mask=torch.ones(2, 6))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        layer(x, attention_mask=torch.ones(3, 5))
    with pytest.raises(ValueError, match="not both"):
        layer(x[:1], attention_mask=torch.ones(1, 5), cu_seqlens=torch.tensor([0, 2, 5]))
    with pytest.raises(ValueError, match="batch size must be 1"):
        layer(x, cu_seqlens=torch.tensor([0, 2, 5]))
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        layer(x[:1], cu_seqlens=torch.tensor([0, 2, 4]))
    _, cache = layer(x, use_cache=True)
    with pytest.raises(ValueError, match="holds 2 sequences but the input has 3"):
        layer(inputs(3, 1), cache=cache)
    with pytest.raises(TypeError, match="cache must be a layers.LayerCache"):
        layer(x, cache=(cache.recurrent_state,))
    other = make("mamba" if name != "mamba" else "gla")
    _, foreign = other(x, use_cache=True)
    with pytest.raises(ValueError, match=f"cache was made by a {type(other).__name__} layer"):
        layer(x, cache=foreign)
    bad = layers.LayerCache(cache.layer_type, cache.recurrent_state[..., :1],
                            cache.conv_states, 5)
    with pytest.raises(ValueError, match="differently configured layer"):
        layer(x, cache=bad)
    # HF-style masks covering the cached tokens too are accepted: [B, seen + T]
    out, _ = layer(x[:, :1], attention_mask=torch.ones(2, 6), cache=cache)
    assert out.shape == (2, 1, D)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        layers.GatedLinearAttention(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="multiple of num_heads"):
        layers.GatedDeltaNet(hidden_size=32, num_heads=4, num_v_heads=6, head_dim=8)
    with pytest.raises(ValueError, match="kernel_size"):
        layers.DeltaNet(hidden_size=32, num_heads=2, conv_size=5)
    with pytest.raises(ValueError, match="divisible by headdim"):
        layers.Mamba2(d_model=32, headdim=48)
    with pytest.raises(ValueError, match="mode must be"):
        layers.GatedLinearAttention(hidden_size=32, num_heads=2, mode="parallel")


# -- GPU ----------------------------------------------------------------------------------------
@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("name", NAMES)
def test_bf16_forward_on_gpu(name):
    """bf16 on the GPU kernels: finite, close to the same layer in fp32, and decoding works."""
    ref_layer = make(name, device="cuda")
    layer = make(name, device="cuda", dtype=torch.bfloat16)
    x = inputs(2, 300, device="cuda")
    with torch.no_grad():
        ref, _ = ref_layer(x)
        out, cache = layer(x.bfloat16(), use_cache=True)
        step, _ = layer(x[:, :1].bfloat16(), cache=cache)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all() and torch.isfinite(step).all()
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < 5e-2, f"{name}: bf16 vs fp32 relative RMS {err:.3e}"


# -- the shared short convolution ---------------------------------------------------------------
def _conv_ref(conv, x, h0):
    """Plain F.conv1d over [history, tokens] for one sequence x [L, D], history h0 [D, W-1]."""
    xx = torch.cat([h0, x.t()], 1)[None]
    if x.shape[0] == 0:  # an empty sequence: no output, the history passes through
        return x, h0
    out = torch.nn.functional.conv1d(xx, conv.weight, conv.bias, groups=conv.hidden_size)
    return torch.nn.functional.silu(out)[0].t(), xx[0, :, -(conv.width - 1):]


def test_short_convolution_states_masks_and_packing():
    """Left-padded rows and packed sequences, each with its own initial history, equal F.conv1d
    over [history, real tokens]; final states are each sequence's last W-1 inputs."""
    torch.manual_seed(0)
    conv = layers.ShortConvolution(6, kernel_size=4, bias=True)
    lengths = [5, 1, 2, 0]
    seqs = [torch.randn(n, 6) for n in lengths]
    h0 = torch.randn(len(lengths), 6, 3)
    refs = [_conv_ref(conv, s, h) for s, h in zip(seqs, h0)]
    L = max(lengths)
    padded = torch.stack([torch.cat([torch.full((L - len(s), 6), 9.0), s]) for s in seqs])
    mask = torch.stack([torch.arange(L) >= L - len(s) for s in seqs])
    out, final = conv(padded, mask=mask, initial_state=h0, output_final_state=True)
    packed, pfinal = conv(torch.cat(seqs)[None], cu_seqlens=cu_seqlens_from_lengths(lengths),
                          initial_state=h0, output_final_state=True)
    start = 0
    for i, ((ref, ref_final), s) in enumerate(zip(refs, seqs)):
        n = len(s)
        assert_close(f"row {i}", out[i, L - n:], ref, TOL)
        assert_close(f"row {i} final", final[i], ref_final, TOL)
        assert_close(f"packed {i}", packed[0, start:start + n], ref, TOL)
        assert_close(f"packed {i} final", pfinal[i], ref_final, TOL)
        start += n


def test_right_or_gapped_padding_is_refused():
    """A mask that is not left padding would leave padding in the cached state: clear error."""
    layer = layers.GatedDeltaNet(hidden_size=32, num_heads=2, head_dim=8)
    x = torch.randn(2, 5, 32)
    for bad in ([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], [[0, 1, 0, 1, 1], [1, 1, 1, 1, 1]]):
        with pytest.raises(ValueError, match="attention_mask must be left padding"):
            layer(x, attention_mask=torch.tensor(bad))
    out, _ = layer(x, attention_mask=torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]))
    assert torch.isfinite(out).all()

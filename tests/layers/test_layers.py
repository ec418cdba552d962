"""Mixer layers through their public contracts (fla's for GLA / DeltaNet / GatedDeltaNet /
Lightning, mamba-ssm's for Mamba / Mamba2): shapes/dtypes, gradients, caches (prefill + steps
== full forward), any padding mask, packed sequences, torch.compile, state dicts and bad input,
for every layer."""
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
                                               use_short_conv=True, conv_size=3, layer_idx=0),
    "lightning": lambda: layers.LightningAttention(hidden_size=D, num_heads=2, layer_idx=1,
                                                   num_layers=3),
    "deltanet": lambda: layers.DeltaNet(hidden_size=D, num_heads=2, use_gate=True, layer_idx=0),
    "gated_deltanet": lambda: layers.GatedDeltaNet(hidden_size=D, num_heads=2, head_dim=8,
                                                   expand_v=1.5, num_v_heads=4, layer_idx=0),
    "kda": lambda: layers.KimiDeltaAttention(hidden_size=D, num_heads=2, head_dim=8,
                                             num_v_heads=4, layer_idx=0),
    "mamba": lambda: layers.Mamba(d_model=D, d_state=4, d_conv=4, layer_idx=0),
    "mamba2": lambda: layers.Mamba2(d_model=D, d_state=8, headdim=8, ngroups=2,
                                    D_has_hdim=True, chunk_size=4, layer_idx=0),
}
NAMES = list(CONFIGS)
TOL = 1e-5  # fp32, relative to the largest value


def make(name, seed=0, dtype=torch.float32, device="cpu"):
    torch.manual_seed(seed)
    return CONFIGS[name]().to(device=device, dtype=dtype)


def inputs(B, T, seed=1, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, D, generator=g).to(device=device, dtype=dtype)


# -- the two public contracts, driven alike -----------------------------------------------------
def run(layer, x, mask=None, cu=None, cache=None, use_cache=False):
    """Call a layer through its peer's contract; returns (out, cache). fla layers take a
    layers.Cache as past_key_values; Mamba layers an InferenceParams whose seqlen_offset is
    advanced here, as mamba-ssm's generation loop does."""
    if isinstance(layer, layers.FlaMixer):
        kw = {} if cu is None else {"cu_seqlens": cu}
        if use_cache and cache is None:
            cache = layers.Cache()
        o, attn, cache = layer(x, attention_mask=mask, past_key_values=cache,
                               use_cache=cache is not None, **kw)
        assert attn is None
        return o, cache
    if use_cache and cache is None:
        cache = layers.InferenceParams(max_seqlen=64, max_batch_size=x.shape[0])
    o = layer(x, inference_params=cache, attention_mask=mask, cu_seqlens=cu)
    if cache is not None:
        cache.seqlen_offset += x.shape[1]
    return o, cache


def states(layer, cache):
    """(recurrent state, conv states) of `layer` in either kind of cache."""
    if isinstance(cache, layers.Cache):
        s = cache[layer.layer_idx]
        return s["recurrent_state"], tuple(s["conv_state"] or ())
    conv, ssm = cache.key_value_memory_dict[layer.layer_idx]
    return ssm, (conv,)


def select(layer, cache, rows):
    """A copy of the cache holding `rows` (a list)."""
    idx = torch.tensor(rows)
    if isinstance(cache, layers.Cache):
        return cache.index_select(idx)
    conv, ssm = cache.key_value_memory_dict[layer.layer_idx]
    new = layers.InferenceParams(cache.max_seqlen, len(rows), cache.seqlen_offset)
    new.key_value_memory_dict[layer.layer_idx] = (conv[idx].clone(), ssm[idx].clone())
    return new


def assert_cache_close(name, layer, got, want, tol=TOL):
    (gs, gc), (ws, wc) = states(layer, got), states(layer, want)
    assert_close(f"{name} recurrent_state", gs, ws, tol)
    assert len(gc) == len(wc)
    for i, (a, b) in enumerate(zip(gc, wc)):
        assert_close(f"{name} conv_state[{i}]", a, b, tol)


# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shape_and_dtype(name, dtype):
    layer = make(name, dtype=dtype)
    x = inputs(2, 7, dtype=dtype)
    out, cache = run(layer, x)
    assert out.shape == x.shape and out.dtype == dtype and cache is None
    assert torch.isfinite(out).all()
    out, cache = run(layer, x, use_cache=True)
    rec, convs = states(layer, cache)
    assert rec.shape[0] == 2 and all(c.shape[0] == 2 for c in convs)
    assert rec.dtype == torch.float32  # states are fp32 whatever the inputs
    if isinstance(cache, layers.Cache):
        assert cache.get_seq_length(layer.layer_idx) == 7


def test_fla_contract_details():
    """fla's return triple, past_key_values returned as passed, layer_idx required with a
    cache, output_attentions accepted, unknown forward kwargs ignored as fla does."""
    layer = make("deltanet")
    x = inputs(2, 4)
    o, attn, pkv = layer(x)
    assert attn is None and pkv is None
    o2, _, _ = layer(x, None, None, False, True, position_ids=torch.arange(4))
    assert torch.equal(o, o2)
    cache = layers.Cache()
    _, _, got = layer(x, past_key_values=cache, use_cache=True)
    assert got is cache and len(cache) == 1
    nameless = layers.DeltaNet(hidden_size=D, num_heads=2)
    with pytest.raises(ValueError, match="requires `layer_idx`"):
        nameless(x, past_key_values=layers.Cache(), use_cache=True)


@pytest.mark.parametrize("name", NAMES)
def test_gradient_reaches_every_parameter(name):
    layer = make(name).train()
    out, _ = run(layer, inputs(2, 9))
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
        full, full_cache = run(layer, x, use_cache=True)
        outs = []
        o, cache = run(layer, x[:, :5], use_cache=True)
        outs.append(o)
        o, cache = run(layer, x[:, 5:8], cache=cache)
        outs.append(o)
        layer.eval()  # eval mode: decode steps take the recurrent kernels
        for t in range(8, 12):
            o, cache = run(layer, x[:, t:t + 1], cache=cache)
            outs.append(o)
    assert_close(f"{name} output", torch.cat(outs, 1), full, TOL)
    assert_cache_close(name, layer, cache, full_cache)
    if isinstance(cache, layers.Cache):
        assert cache.get_seq_length(layer.layer_idx) == 12
    else:
        assert cache.seqlen_offset == 12


@pytest.mark.parametrize("name", ["mamba", "mamba2"])
def test_mamba_allocate_inference_cache_and_step(name):
    """mamba-ssm's API: allocate_inference_cache gives zero states of mamba-ssm's shapes
    ([B, D, d_conv] conv, the SSM state); a prefill through inference_params fills them in
    place; `step` continues in place and equals the full forward."""
    layer, x = make(name).eval(), inputs(2, 7)
    conv, ssm = layer.allocate_inference_cache(2, 16)
    assert conv.shape == (2, layer.conv1d.hidden_size, layer.d_conv)
    assert ssm.shape == (2, *layer.state_shape()) and not conv.any() and not ssm.any()
    params = layers.InferenceParams(max_seqlen=16, max_batch_size=2)
    params.key_value_memory_dict[0] = (conv, ssm)
    with torch.no_grad():
        full = layer(x)
        pre = layer(x[:, :5], inference_params=params)
        assert params.key_value_memory_dict[0][0] is conv and ssm.abs().sum() > 0
        outs = [pre]
        for t in (5, 6):
            o, c2, s2 = layer.step(x[:, t:t + 1], conv, ssm)
            assert c2 is conv and s2 is ssm
            outs.append(o)
    assert_close(f"{name} step", torch.cat(outs, 1), full, TOL)


MASKS = {
    "left": [[0, 0, 0, 1, 1, 1, 1, 1], [1] * 8],
    "right": [[1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 0]],
    "gaps": [[0, 1, 1, 0, 1, 0, 1, 1], [1, 0, 0, 1, 1, 1, 1, 0]],
}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", list(MASKS))
def test_padding_mask_equals_unpadded(name, kind):
    """Any 0/1 mask (left, right, gaps), as fla's unpad -> varlen -> pad back: each row's real
    tokens give the outputs, final state and next decode step of a run on those tokens alone;
    junk at padded positions never leaks; padded outputs are 0."""
    layer, x = make(name).eval(), inputs(2, 8)
    mask = torch.tensor(MASKS[kind])
    xp = torch.where(mask[..., None].bool(), x, torch.full_like(x, 7.0))
    nxt = inputs(2, 1, seed=3)
    with torch.no_grad():
        out, cache = run(layer, xp, mask=mask, use_cache=True)
        assert (out[mask == 0] == 0).all(), "outputs at padded positions should be zero"
        refs = []
        for b in range(2):
            keep = mask[b].nonzero()[:, 0]
            ref, ref_cache = run(layer, x[b:b + 1, keep], use_cache=True)
            assert_close(f"{name} row {b} output", out[b:b + 1, keep], ref, TOL)
            assert_cache_close(f"{name} row {b}", layer, select(layer, cache, [b]), ref_cache)
            refs.append(ref_cache)
        step, _ = run(layer, nxt, cache=cache)
        for b, ref_cache in enumerate(refs):
            ref_step, _ = run(layer, nxt[b:b + 1], cache=ref_cache)
            assert_close(f"{name} row {b} step", step[b:b + 1], ref_step, TOL)


@pytest.mark.parametrize("name", NAMES)
def test_padding_after_a_cache(name):
    """A padded chunk (right padding in row 0, a gap in row 1) continuing a cache: the cached
    history joins the real tokens directly (the short conv sees [history, tokens])."""
    layer, x = make(name).train(), inputs(2, 9)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 1]])
    with torch.no_grad():
        _, cache = run(layer, x[:, :5], use_cache=True)
        out, cache = run(layer, x[:, 5:], mask=mask, cache=cache)
        ref0, c0 = run(layer, x[0:1, :7], use_cache=True)
        ref1, c1 = run(layer, torch.cat([x[1:2, :6], x[1:2, 8:]], 1), use_cache=True)
    assert_close(f"{name} row 0", out[0:1, :2], ref0[:, 5:], TOL)
    assert_close(f"{name} row 1", out[1:2, [0, 3]], ref1[:, 5:], TOL)
    assert_cache_close(f"{name} row 0", layer, select(layer, cache, [0]), c0)
    assert_cache_close(f"{name} row 1", layer, select(layer, cache, [1]), c1)


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
        plain, _ = run(layer, torch.cat(seqs, 1), cu=cu)
        out, cache = run(layer, torch.cat(seqs, 1), cu=cu, use_cache=True)
        # copies: continuing from a cache updates it in place
        rows = [select(layer, cache, [i]) for i in range(len(lengths))]
        out2, cache2 = run(layer, torch.cat(conts, 1), cu=cu2, cache=cache)
        refs, refs2 = [], []
        for i, (s, c) in enumerate(zip(seqs, conts)):
            r, rc = run(layer, s, use_cache=True)
            assert_cache_close(f"{name} seq {i}", layer, rows[i], rc)
            r2, rc2 = run(layer, c, cache=rc)
            refs.append(r)
            refs2.append(r2)
            assert_cache_close(f"{name} seq {i} cont", layer, select(layer, cache2, [i]), rc2)
    assert_close(f"{name} packed (no cache)", plain, torch.cat(refs, 1), TOL)
    assert_close(f"{name} packed", out, torch.cat(refs, 1), TOL)
    assert_close(f"{name} packed continuation", out2, torch.cat(refs2, 1), TOL)


def test_fla_cu_seqlens_take_precedence_over_the_mask():
    """fla: explicit cu_seqlens win over attention_mask (a packed batch with a ones mask)."""
    layer = make("gla")
    x, cu = inputs(1, 6), torch.tensor([0, 2, 6])
    a, _, _ = layer(x, cu_seqlens=cu)
    b, _, _ = layer(x, attention_mask=torch.ones(1, 6), cu_seqlens=cu)
    assert torch.equal(a, b)


COMPILE_CASES = [(n, "aot_eager") for n in NAMES] + [
    # inductor (the default backend) for one layer: it also re-lays out tensors, which is where
    # strided inputs and the ops' fake gradients must agree; C++ codegen costs ~10 s per layer
    pytest.param("gated_deltanet", "inductor", marks=pytest.mark.skipif(
        shutil.which("g++") is None and shutil.which("c++") is None,
        reason="inductor on CPU needs a C++ compiler"))]


@pytest.mark.parametrize("name,backend", COMPILE_CASES)
def test_torch_compile_fullgraph(name, backend):
    """The whole layer, with a right-padding mask, traces into one graph (public ops are custom
    ops with fake impls; the mask is handled by fixed-shape gathers, no host sync); compiled
    forward and backward match eager, which accepts the same mask. aot_eager for every layer
    checks tracing and autograd without inductor's minutes of C++ compilation."""
    torch._dynamo.reset()
    layer = make(name).train()
    x = inputs(2, 6).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    eager, _ = run(layer, x, mask=mask)
    g_eager = torch.autograd.grad(eager.square().sum(), [x, *layer.parameters()])
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    out = compiled(x, attention_mask=mask)
    out = out[0] if isinstance(out, tuple) else out
    g = torch.autograd.grad(out.square().sum(), [x, *layer.parameters()])
    assert_close(f"{name} compiled output", out, eager, TOL)
    for i, (a, b) in enumerate(zip(g, g_eager)):
        assert_close(f"{name} compiled grad {i}", a, b, TOL)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name):
    src, dst = make(name, seed=0), make(name, seed=123)
    x = inputs(1, 5)
    a, _ = run(src, x)
    assert not torch.allclose(run(dst, x)[0], a), "different seeds should give different layers"
    dst.load_state_dict(src.state_dict())
    assert src.state_dict().keys() == dst.state_dict().keys()
    assert torch.equal(run(dst, x)[0], a)


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
        run(layer, torch.randn(2, 5, D + 1))
    with pytest.raises(ValueError, match="hidden_states must have shape"):
        run(layer, torch.randn(5, D))
    with pytest.raises(TypeError, match="hidden_states must be float"):
        run(layer, torch.ones(2, 5, D, dtype=torch.long))
    with pytest.raises(ValueError, match=r"attention_mask must have shape \[B, T\] = \[2, 5\]"):
        run(layer, x, mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        run(layer, x, mask=torch.ones(3, 5))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        run(layer, x, mask=torch.ones(2, 5, 5))
    with pytest.raises(ValueError, match="batch size must be 1"):
        run(layer, x, cu=torch.tensor([0, 2, 5]))
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        run(layer, x[:1], cu=torch.tensor([0, 2, 4]))
    _, cache = run(layer, x, use_cache=True)
    with pytest.raises(ValueError, match="holds 2 sequences but the input has 3"):
        run(layer, inputs(3, 1), cache=select(layer, cache, [0, 1]))
    other = make("gated_deltanet" if name != "gated_deltanet" else "gla")
    _, foreign = run(other, x, use_cache=True)
    if isinstance(layer, layers.FlaMixer):
        bad = layers.Cache()
        bad.update(**{k: v for k, v in foreign[other.layer_idx].items() if k != "attn_state"},
                   layer_idx=layer.layer_idx)
        with pytest.raises(ValueError, match="differently configured layer"):
            run(layer, x, cache=bad)
        with pytest.raises(TypeError, match="must be a dict"):
            run(layer, x, cache=[torch.zeros(1)] * 3)
    else:
        conv, ssm = states(layer, cache)[1][0], states(layer, cache)[0]
        cache.key_value_memory_dict[layer.layer_idx] = (conv, ssm[..., :1])
        with pytest.raises(ValueError, match="differently configured layer"):
            run(layer, x, cache=cache)
    # HF-style masks covering the cached tokens too are accepted: [B, seen + T]
    _, cache = run(layer, x, use_cache=True)
    out, _ = run(layer, x[:, :1], mask=torch.ones(2, 6), cache=cache)
    assert out.shape == (2, 1, D)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        layers.GatedLinearAttention(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="num_kv_heads 3 must divide"):
        layers.GatedLinearAttention(hidden_size=32, num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="unknown activation"):
        layers.GatedLinearAttention(hidden_size=32, num_heads=4, feature_map="softmax")
    with pytest.raises(ValueError, match="multiple of num_heads"):
        layers.GatedDeltaNet(hidden_size=32, num_heads=4, num_v_heads=6, head_dim=8)
    with pytest.raises(ValueError, match="must be an integer"):
        layers.GatedDeltaNet(hidden_size=32, num_heads=4, head_dim=8, expand_v=1.3)
    with pytest.raises(ValueError, match="kernel_size"):
        layers.DeltaNet(hidden_size=32, num_heads=2, conv_size=5)
    with pytest.raises(ValueError, match="fused_chunk"):
        layers.DeltaNet(mode="fused_chunk", hidden_size=32, num_heads=2)
    with pytest.raises(ValueError, match="divisible by headdim"):
        layers.Mamba2(d_model=32, headdim=48)
    with pytest.raises(NotImplementedError, match="process_group"):
        layers.Mamba2(d_model=32, headdim=8, process_group=object())
    with pytest.raises(TypeError):
        layers.Mamba(d_model=32, no_such_argument=1)
    with pytest.raises(ValueError, match="mode must be"):
        layers.GatedLinearAttention(hidden_size=32, num_heads=2, mode="parallel")
    with pytest.warns(UserWarning, match="ignoring unknown arguments"):
        layers.GatedDeltaNet(hidden_size=32, num_heads=2, head_dim=8, not_an_fla_arg=3)


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
        ref, _ = run(ref_layer, x)
        out, cache = run(layer, x.bfloat16(), use_cache=True)
        step, _ = run(layer, x[:, :1].bfloat16(), cache=cache)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all() and torch.isfinite(step).all()
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < 5e-2, f"{name}: bf16 vs fp32 relative RMS {err:.3e}"


# -- the shared short convolution ---------------------------------------------------------------
def _conv_ref(conv, x, h0):
    """Plain F.conv1d over [history, tokens] for one sequence x [L, D], history h0 [D, W];
    the final state is the last W inputs."""
    xx = torch.cat([h0, x.t()], 1)[None]
    final = xx[0, :, -conv.width:]
    if x.shape[0] == 0:  # an empty sequence: no output, the history passes through
        return x, final
    out = torch.nn.functional.conv1d(xx[:, :, 1:], conv.weight, conv.bias,
                                     groups=conv.hidden_size)
    return torch.nn.functional.silu(out)[0].t(), final


def test_short_convolution_states_masks_and_packing():
    """Left-padded rows and packed sequences, each with its own initial history [D, W], equal
    F.conv1d over [history, real tokens]; final states are each sequence's last W inputs."""
    torch.manual_seed(0)
    conv = layers.ShortConvolution(6, kernel_size=4, bias=True)
    lengths = [5, 1, 2, 0]
    seqs = [torch.randn(n, 6) for n in lengths]
    h0 = torch.randn(len(lengths), 6, 4)
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

"""The small causal LM: every mixer plugs in, cached generation equals recomputing the whole
prefix, left-padded prompts generate what unpadded ones do; and the MQAR example's data."""
import os
import sys

import pytest
import torch

import layers

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))
import mqar  # noqa: E402

SMALL = {
    "gla": dict(num_heads=2),
    "deltanet": dict(num_heads=2),
    "gated_deltanet": dict(num_heads=2, head_dim=8, expand_v=1),
    "kda": dict(num_heads=2, head_dim=8),
    "mamba": dict(d_state=4),
    "mamba2": dict(d_state=8, headdim=8, chunk_size=8),
    "lightning": dict(num_heads=2),
    "hgrn2": dict(expand_ratio=8),
    "hedgehog": dict(num_heads=2),
    "mom": dict(num_heads=2, head_dim=8, expand_v=1, num_memories=3, topk=2),
    "log_linear_mamba2": dict(num_heads=4, head_dim=8, state_size=8, chunk_size=8,
                              num_levels=6),
    "log_linear_gated_deltanet": dict(num_heads=2, head_dim=8, expand_v=1, num_levels=6),
}
# the log-linear layers: a Fenwick hierarchy of level states per sequence, cached as the tuple
# (ht [N, *state_shape()], offsets [N])
LOG_LINEAR = ["log_linear_mamba2", "log_linear_gated_deltanet"]
# issue 16's mixers (HGRN-2, Hedgehog, Mixture-of-Memories): each has a decoding cache
NEW = ["hgrn2", "hedgehog", "mom"]


def small_lm(mixer, seed=0, **kw):
    torch.manual_seed(seed)
    return layers.CausalLM(vocab_size=23, hidden_size=16, num_layers=2, mixer=mixer,
                           mixer_kwargs=SMALL[mixer], mlp_ratio=2, **kw).eval()


@pytest.mark.parametrize("mixer", sorted(SMALL))
def test_every_mixer_builds_a_model(mixer):
    model = small_lm(mixer)
    ids = torch.randint(0, 23, (2, 5))
    logits, cache = model(ids, use_cache=True)
    assert logits.shape == (2, 5, 23) and logits.dtype == torch.float32
    assert isinstance(cache, layers.Cache) and len(cache) == 2
    for blk, state in zip(model.layers, cache):
        rec = state["recurrent_state"]
        if mixer in LOG_LINEAR:
            rec, offsets = rec
            assert torch.equal(offsets, torch.full((2,), 5))
        assert rec.shape == (2, *blk.mixer.state_shape())
    if mixer == "lightning":  # TNL: deeper layers decay less
        s0, s1 = (b.mixer.slope for b in model.layers)
        assert (s1 < s0).all()


@pytest.mark.parametrize("mixer", ["gated_deltanet", "mamba", "mamba2"] + NEW + LOG_LINEAR)
def test_generate_with_cache_equals_recompute(mixer):
    model = small_lm(mixer)
    ids = torch.randint(1, 23, (2, 6), generator=torch.Generator().manual_seed(0))
    out = model.generate(ids, max_new_tokens=5)
    ref = ids
    with torch.no_grad():
        for _ in range(5):  # no cache: the whole prefix each time
            logits, _ = model(ref)
            ref = torch.cat([ref, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("mixer", ["gated_deltanet"] + NEW + LOG_LINEAR)
def test_generate_left_padded_prompts(mixer):
    model = small_lm(mixer)
    a = torch.tensor([[5, 6, 7, 8, 9, 10]])
    b = torch.tensor([[3, 4, 11]])
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    out = model.generate(batch, max_new_tokens=4, attention_mask=mask)
    assert torch.equal(out[0:1, 6:], model.generate(a, max_new_tokens=4)[:, 6:])
    assert torch.equal(out[1:2, 6:], model.generate(b, max_new_tokens=4)[:, 3:])


@pytest.mark.parametrize("mixer", NEW)
def test_new_mixers_forward_backward(mixer):
    """Built by name through make_mixer / CausalLM; a training step reaches every parameter."""
    mix = layers.make_mixer(mixer, 16, layer_idx=1, num_layers=2, **SMALL[mixer])
    assert isinstance(mix, layers.MIXERS[mixer]) and mix.layer_idx == 1
    model = small_lm(mixer).train()
    ids = torch.randint(0, 23, (3, 9), generator=torch.Generator().manual_seed(1))
    logits, cache = model(ids)
    assert cache is None and logits.shape == (3, 9, 23) and torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for blk in model.layers:  # the mixers' input projections learn (not cut off the graph)
        proj = {"hgrn2": ["q_proj", "f_proj", "i_proj"], "hedgehog": ["q_proj", "k_proj", "v_proj"],
                "mom": ["q_proj", "gate"]}[mixer]
        for n in proj + ["o_proj"]:
            assert getattr(blk.mixer, n).weight.grad.abs().sum() > 0, n
        if mixer == "hedgehog":  # the learnable feature maps too
            assert blk.mixer.feature_map_q.layer.weight.grad.abs().sum() > 0
            assert blk.mixer.feature_map_k.layer.weight.grad.abs().sum() > 0
        if mixer == "mom":  # the routed memories' own projections
            assert sum(m.weight.grad.abs().sum() for m in blk.mixer.k_proj) > 0


@pytest.mark.parametrize("mixer", NEW + LOG_LINEAR)
def test_new_mixers_decode_equals_chunked_forward(mixer):
    """Decoding from the cache, one token at a time (the recurrent kernels), gives the logits
    of one chunked forward over the whole sequence (training mode: the chunk kernels), and
    generate's greedy tokens are the full forward's argmax at every new position; the prompt
    is longer than 64 tokens, so prefill takes the chunk kernels in eval mode too."""
    model = small_lm(mixer)
    ids = torch.randint(1, 23, (2, 70), generator=torch.Generator().manual_seed(2))
    out = model.generate(ids, max_new_tokens=4)
    with torch.no_grad():
        logits, cache = model(out[:, :70], use_cache=True)
        steps = [logits[:, -1]]
        for t in range(70, out.shape[1] - 1):
            logits, cache = model(out[:, t:t + 1], cache=cache)
            steps.append(logits[:, -1])
        full, _ = model.train()(out)
    dec = torch.stack(steps, 1)
    torch.testing.assert_close(dec, full[:, 69:-1], rtol=1e-4, atol=1e-5)
    assert torch.equal(out[:, 70:], full[:, 69:-1].argmax(-1))


def test_mqar_settings_build_every_mixer():
    """The MQAR example's per-mixer settings build a d_model-64 model for each of its mixers,
    and it has settings for every mixer of layers.MIXERS."""
    assert sorted(mqar.ALL_MIXERS) == sorted(layers.MIXERS)
    for name in mqar.ALL_MIXERS:
        model = layers.CausalLM(64, 64, 2, mixer=name, mixer_kwargs=mqar.mixer_kwargs(name, 64))
        assert isinstance(model.layers[1].mixer, layers.MIXERS[name])


def test_generate_sampling_and_eos():
    model = small_lm("mamba")
    ids = torch.randint(1, 23, (3, 4))
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    s1 = model.generate(ids, 6, temperature=1.0, top_k=5, generator=g1)
    s2 = model.generate(ids, 6, temperature=1.0, top_k=5, generator=g2)
    assert torch.equal(s1, s2) and s1.shape == (3, 10)
    greedy = model.generate(ids, 6)
    eos = int(greedy[0, 5])  # row 0 emits it at its second new token
    out = model.generate(ids, 6, eos_token_id=eos)
    assert (out[0, 5:] == eos).all()


def test_model_cache_mismatch():
    model = small_lm("deltanet")
    _, cache = model(torch.randint(0, 23, (2, 3)), use_cache=True)
    with pytest.raises(ValueError, match="cache has 1 layer caches, the model has 2"):
        model(torch.randint(0, 23, (2, 1)),
              cache=layers.Cache.from_legacy_cache(cache.to_legacy_cache()[:1]))
    with pytest.raises(ValueError, match="unknown mixer"):
        layers.CausalLM(10, 16, 1, mixer="transformer")


def test_mqar_data():
    g = torch.Generator().manual_seed(0)
    x, y = mqar.mqar_batch(16, vocab_size=40, num_kv_pairs=5, seq_len=32, generator=g)
    assert x.shape == y.shape == (16, 32)
    for row_x, row_y in zip(x, y):
        keys, values = row_x[0:10:2], row_x[1:10:2]
        assert len(set(keys.tolist())) == 5 and (keys < 20).all() and (values >= 20).all()
        q = (row_y != -100).nonzero()[:, 0]
        assert len(q) == 5 and (q >= 10).all()
        for pos in q:  # the label of a query is the value stored with that key
            k = row_x[pos]
            assert row_y[pos] == values[(keys == k).nonzero()[0, 0]]
        assert (row_x[10:][row_y[10:] == -100] == 0).all()  # only queries in the query region
    with pytest.raises(ValueError, match="too short"):
        mqar.mqar_batch(1, 40, 5, 16, g)


def test_mqar_script_runs():
    rows = mqar.main(["--mixers", "deltanet", "--steps", "2", "--batch-size", "4",
                      "--eval-examples", "8", "--d-model", "32", "--seq-len", "32",
                      "--vocab-size", "32", "--num-kv-pairs", "4"])
    assert len(rows) == 1 and 0 <= rows[0]["acc"] <= 1 and rows[0]["tok_s"] > 0


def test_mqar_mixer_kwargs_override():
    """--mixer-kwargs JSON goes over the built-in settings of the named mixer only."""
    small = ["--steps", "1", "--batch-size", "2", "--eval-examples", "2", "--d-model", "32",
             "--seq-len", "16", "--vocab-size", "16", "--num-kv-pairs", "2", "--log-every", "0",
             "--threads", "1", "--mixers", "mom,hedgehog"]
    base = mqar.main(small)
    over = mqar.main(small + ["--mixer-kwargs", '{"mom": {"num_memories": 2, "topk": 1}}'])
    # k_proj, v_proj [32, 32], b_proj, a_proj [1, 32] and the router's row [1, 32] per memory
    per_memory = 2 * (32 * 32) + 2 * 32 + 32
    assert base[0]["params"] - over[0]["params"] == 2 * 2 * per_memory  # 2 layers, 4 -> 2 memories
    assert base[1]["params"] == over[1]["params"]  # hedgehog untouched
    for bad in ['{"mom": 1}', "not json", '{"gla": {}}']:
        with pytest.raises(SystemExit):
            mqar.main(small + ["--mixer-kwargs", bad])
    with pytest.raises(SystemExit):  # no small-model settings for it in the example
        mqar.main(small[:-1] + ["transformer"])


def test_mqar_kda_settings_and_gate_init_control():
    """KDA's MQAR row has Gated DeltaNet's sizes and the layer's (fla 0.6's) init; --kda-gate-init
    zeros sets only KDA's dt_bias to 0 (fla 0.4's init, a control)."""
    kda, gdn = mqar.mixer_kwargs("kda", 64), mqar.mixer_kwargs("gated_deltanet", 64)
    assert all(kda[k] == gdn[k] for k in ("num_heads", "head_dim", "expand_v"))
    torch.manual_seed(0)
    model = layers.CausalLM(64, 64, 2, mixer="kda", mixer_kwargs=kda)
    before = {n: p.clone() for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        if n.endswith("dt_bias"):  # fla 0.6's init in the model as built
            dt = torch.nn.functional.softplus(p)
            assert ((dt >= 1e-3 * 0.999) & (dt <= 0.1 * 1.001)).all()
    rng = torch.random.get_rng_state()
    assert mqar.zero_dt_bias_init(model) == 2
    assert torch.equal(rng, torch.random.get_rng_state())  # the caller's RNG is untouched
    for n, p in model.named_parameters():
        if n.endswith("dt_bias"):
            assert torch.equal(p, torch.zeros_like(p))
        else:
            assert torch.equal(p, before[n]), n
    small = ["--steps", "1", "--batch-size", "2", "--eval-examples", "2", "--d-model", "32",
             "--seq-len", "16", "--vocab-size", "16", "--num-kv-pairs", "2", "--log-every", "0",
             "--threads", "1"]
    rows = mqar.main(small + ["--mixers", "kda", "--kda-gate-init", "zeros"])
    assert rows[0]["mixer"] == "kda"
    with pytest.raises(SystemExit):  # a KDA option without KDA
        mqar.main(small + ["--mixers", "deltanet", "--kda-gate-init", "zeros"])
    with pytest.raises(SystemExit):
        mqar.main(small + ["--mixers", "deltanet", "--kda-output-gate", "off"])


def test_mqar_kda_output_gate_off():
    """--kda-output-gate off: KDA's output is the ungated norm (g_proj unused, no gradient)."""
    torch.manual_seed(0)
    model = layers.CausalLM(32, 32, 1, mixer="kda",
                            mixer_kwargs=mqar.mixer_kwargs("kda", 32))
    x = torch.randint(0, 32, (2, 8))
    gated = model(x)[0]
    assert mqar.kda_output_gate_off(model) == 1
    logits = model(x)[0]
    assert not torch.allclose(logits, gated)
    logits.sum().backward()
    mixer = model.layers[0].mixer
    assert all(p.grad is None for p in mixer.g_proj.parameters())
    assert mixer.q_proj.weight.grad is not None

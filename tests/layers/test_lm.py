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
}


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
        assert state["recurrent_state"].shape == (2, *blk.mixer.state_shape())
    if mixer == "lightning":  # TNL: deeper layers decay less
        s0, s1 = (b.mixer.slope for b in model.layers)
        assert (s1 < s0).all()


@pytest.mark.parametrize("mixer", ["gated_deltanet", "mamba", "mamba2"])
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


def test_generate_left_padded_prompts():
    model = small_lm("gated_deltanet")
    a = torch.tensor([[5, 6, 7, 8, 9, 10]])
    b = torch.tensor([[3, 4, 11]])
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    out = model.generate(batch, max_new_tokens=4, attention_mask=mask)
    assert torch.equal(out[0:1, 6:], model.generate(a, max_new_tokens=4)[:, 6:])
    assert torch.equal(out[1:2, 6:], model.generate(b, max_new_tokens=4)[:, 3:])


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

"""lightning_ops.models: the Hugging Face models (configs as fla's, Auto* registration,
generate with and without the cache, save / from_pretrained, labels -> loss, Trainer),
checkpoints of fla's config.json shape and of transformers' own Mamba / Mamba-2.

Tiny models (hidden 32, 2 layers, vocab 100), CPU, no network."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import lightning_ops.models as M  # noqa: E402  (registers with the Auto* factories)
from lightning_ops.models.modeling import _CACHE_FIELD  # noqa: E402
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM  # noqa: E402

V = 100
TINY = {
    "gla": dict(hidden_size=32, num_heads=2, use_short_conv=True),
    "delta_net": dict(hidden_size=32, num_heads=2),
    "gated_deltanet": dict(hidden_size=32, num_heads=2, head_dim=16, expand_v=1),
    "kda": dict(hidden_size=32, num_heads=2, head_dim=16, num_v_heads=4),
    "lightning_attention": dict(hidden_size=32, num_heads=2),
    "mamba": dict(hidden_size=32, state_size=8),
    "mamba2": dict(hidden_size=32, state_size=8, head_dim=16, chunk_size=16),
}
NAMES = {
    "gla": ("GLAConfig", "GLAModel", "GLAForCausalLM"),
    "delta_net": ("DeltaNetConfig", "DeltaNetModel", "DeltaNetForCausalLM"),
    "gated_deltanet": ("GatedDeltaNetConfig", "GatedDeltaNetModel", "GatedDeltaNetForCausalLM"),
    "kda": ("KDAConfig", "KDAModel", "KDAForCausalLM"),
    "lightning_attention": ("LightningAttentionConfig", "LightningAttentionModel",
                            "LightningAttentionForCausalLM"),
    "mamba": ("MambaConfig", "MambaModel", "MambaForCausalLM"),
    "mamba2": ("Mamba2Config", "Mamba2Model", "Mamba2ForCausalLM"),
}


def tiny_config(model_type, **kw):
    # a wide init so a random model's greedy choices are not all the same token
    base = dict(vocab_size=V, num_hidden_layers=2, initializer_range=0.3, pad_token_id=0,
                bos_token_id=1, eos_token_id=2)
    return AutoConfig.for_model(model_type, **{**base, **TINY[model_type], **kw})


@pytest.fixture(scope="module", params=sorted(TINY))
def model_type(request):
    return request.param


@pytest.fixture(scope="module")
def lm(model_type):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()


def left_padded(B=2, T=7, pad=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, T), generator=g)
    mask = torch.ones_like(ids)
    ids[0, :pad], mask[0, :pad] = 0, 0
    return ids, mask


def test_import_lightning_ops_does_not_import_transformers():
    code = ("import sys, lightning_ops, lightning_ops.layers, lightning_ops.compat; "
            "assert 'transformers' not in sys.modules, 'transformers was imported'")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=root)


def test_registered_with_auto_classes(model_type):
    conf_name, model_name, lm_name = NAMES[model_type]
    config = tiny_config(model_type)
    assert type(config) is getattr(M, conf_name) and config.model_type == model_type
    assert type(AutoModel.from_config(config)) is getattr(M, model_name)
    assert type(AutoModelForCausalLM.from_config(config)) is getattr(M, lm_name)


def test_registration_coexists_with_fla():
    """fla registers its own 'gla' (exist_ok=True); ours re-registers without a crash and wins
    again (last registration wins, in either order)."""
    class GLAConfig(transformers.PretrainedConfig):  # a stand-in for fla's
        model_type = "gla"

    class GLAForCausalLM(transformers.PreTrainedModel):
        config_class = GLAConfig

    AutoConfig.register("gla", GLAConfig, exist_ok=True)
    AutoModelForCausalLM.register(GLAConfig, GLAForCausalLM, exist_ok=True)
    try:
        assert type(AutoConfig.for_model("gla")) is GLAConfig
        M.register()
        assert type(AutoConfig.for_model("gla")) is M.GLAConfig
        M.register()  # idempotent
    finally:
        M.register()
    assert type(AutoConfig.for_model("gla", **TINY["gla"])) is M.GLAConfig


def test_loss_is_shifted_cross_entropy(lm):
    ids = torch.randint(3, V, (2, 9))
    labels = ids.clone()
    labels[1, :4] = -100
    with torch.no_grad():
        out = lm(ids, labels=labels)
    want = F.cross_entropy(out.logits[:, :-1].reshape(-1, V).float(),
                           labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, want)
    n = (labels[:, 1:] != -100).sum()
    with torch.no_grad():
        summed = lm(ids, labels=labels, num_items_in_batch=n).loss
    torch.testing.assert_close(summed, want)
    tup = lm(ids, labels=labels, return_dict=False, use_cache=False)
    torch.testing.assert_close(tup[0], out.loss)
    torch.testing.assert_close(tup[1], out.logits)


def test_cached_decode_matches_full_forward(lm):
    ids, mask = left_padded(T=10)
    with torch.no_grad():
        full = lm(ids, attention_mask=mask, use_cache=False).logits
        out = lm(ids[:, :6], attention_mask=mask[:, :6], use_cache=True)
        cache = out[_CACHE_FIELD]
        assert isinstance(cache, M.RecurrentCache) and isinstance(cache, transformers.Cache)
        assert cache.get_seq_length() == 6 and len(cache) == 2
        steps = [out.logits]
        for t in range(6, 10):  # the HF way: the mask covers past + new tokens
            step = lm(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache,
                      use_cache=True)
            steps.append(step.logits)
        assert cache.get_seq_length() == 10
    got = torch.cat(steps, dim=1)
    real = mask.bool()
    torch.testing.assert_close(got[real], full[real], rtol=1e-4, atol=1e-4)


def test_generate_greedy_cache_equals_no_cache(lm):
    ids, mask = left_padded()
    with torch.no_grad():
        cached = lm.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        plain = lm.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                            use_cache=False)
    assert cached.shape == (2, 13)
    assert torch.equal(cached, plain)
    assert len(set(cached[:, 7:].flatten().tolist())) > 1  # not a degenerate constant output


def test_generate_sampling_and_beams(lm):
    ids, mask = left_padded()
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=True, top_k=20, top_p=0.9,
              temperature=0.8)
    with torch.no_grad():
        torch.manual_seed(3)
        a = lm.generate(ids, **kw)
        torch.manual_seed(3)
        b = lm.generate(ids, **kw, use_cache=False)
        beams = lm.generate(ids, attention_mask=mask, max_new_tokens=4, num_beams=3,
                            num_return_sequences=2, do_sample=False)
    assert torch.equal(a, b)
    assert beams.shape == (4, 11)
    assert torch.equal(beams[::2, :7], ids)


def test_packed_cu_seqlens_and_logits_to_keep(lm):
    a, b = torch.randint(3, V, (1, 5)), torch.randint(3, V, (1, 3))
    with torch.no_grad():
        packed = lm(torch.cat([a, b], 1), cu_seqlens=torch.tensor([0, 5, 8])).logits
        apart = torch.cat([lm(a).logits, lm(b).logits], 1)
        last2 = lm(torch.cat([a, b], 1), logits_to_keep=2).logits
    torch.testing.assert_close(packed, apart, rtol=1e-4, atol=1e-4)
    assert last2.shape == (1, 2, V)


def test_save_pretrained_round_trip(lm, model_type, tmp_path):
    lm.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == model_type
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(lm)
    ids = torch.randint(3, V, (2, 8))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, lm(ids).logits)
    sd, sd2 = lm.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)


# -- checkpoints: fla's config.json files, fla's module names, transformers' Mamba ------------
FLA_CONFIGS = {  # as fla's save_pretrained writes them (sizes shrunk), with fla-only fields
    "gla": dict(architectures=["GLAForCausalLM"], attn=None, attn_mode="chunk", clamp_min=None,
                conv_size=4, elementwise_affine=True, expand_k=0.5, expand_v=1,
                feature_map=None, fuse_cross_entropy=True, fuse_norm=True, fuse_swiglu=True,
                hidden_act="swish", hidden_ratio=4, hidden_size=32, initializer_range=0.02,
                intermediate_size=None, max_position_embeddings=2048, norm_eps=1e-06,
                num_heads=2, num_hidden_layers=2, num_kv_heads=None, use_gk=True,
                use_gv=False, use_output_gate=True, use_short_conv=False),
    "delta_net": dict(architectures=["DeltaNetForCausalLM"], attn=None, attn_mode="chunk",
                      conv_size=4, expand_k=1, expand_v=1, hidden_act="swish", hidden_ratio=4,
                      hidden_size=32, norm_eps=1e-06, num_heads=2, num_hidden_layers=2,
                      qk_activation="silu", qk_norm="l2", use_beta=True, use_gate=False,
                      use_output_norm=True, use_short_conv=True, allow_neg_eigval=False),
    "gated_deltanet": dict(architectures=["GatedDeltaNetForCausalLM"], attn=None,
                           attn_mode="chunk", conv_size=4, expand_v=2, head_dim=16,
                           hidden_act="swish", hidden_ratio=4, hidden_size=32, norm_eps=1e-06,
                           num_heads=2, num_v_heads=None, num_hidden_layers=2, use_gate=True,
                           use_short_conv=True, allow_neg_eigval=False),
    "mamba": dict(architectures=["MambaForCausalLM"], conv_kernel=4, dt_init_scheme="random",
                  dt_rank="auto", expand=2, hidden_act="silu", hidden_size=32, norm_eps=1e-05,
                  num_hidden_layers=2, residual_in_fp32=False, state_size=8, use_bias=False,
                  use_conv_bias=True, fuse_cross_entropy=True),
    "mamba2": dict(architectures=["Mamba2ForCausalLM"], A_init_range=[1, 16], chunk_size=16,
                   conv_kernel=4, expand=2, head_dim=16, hidden_size=32, n_groups=1,
                   norm_eps=1e-05, num_heads=4, num_hidden_layers=2, residual_in_fp32=True,
                   rmsnorm=True, state_size=8, time_step_limit=[0.0, 1e9]),
}
# fla's module tree above the mixers (each mixer's own parameter names are the layers' tests)
FLA_OUTER = {"model.embeddings.weight", "model.norm.weight", "lm_head.weight"}
FLA_BLOCK = {"attn_norm.weight", "mlp_norm.weight", "mlp.gate_proj.weight",
             "mlp.up_proj.weight", "mlp.down_proj.weight"}
MAMBA_OUTER = {"backbone.embeddings.weight", "backbone.norm_f.weight", "lm_head.weight"}


@pytest.mark.parametrize("model_type", sorted(FLA_CONFIGS))
def test_fla_config_json_loads(model_type, tmp_path):
    raw = dict(FLA_CONFIGS[model_type], model_type=model_type, vocab_size=V, bos_token_id=1,
               eos_token_id=2, tie_word_embeddings=False, transformers_version="4.48.0",
               torch_dtype="float32", use_cache=True)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config).__name__ == NAMES[model_type][0]
    for k, v in raw.items():
        if k not in ("architectures", "transformers_version", "torch_dtype", "A_init_range",
                     "time_step_limit", "dt_rank"):
            assert getattr(config, k) == v, k
    model = AutoModelForCausalLM.from_config(config).eval()
    keys = set(model.state_dict())
    mamba = model_type.startswith("mamba")
    outer, mixer = (MAMBA_OUTER, "mixer.") if mamba else (FLA_OUTER, "attn.")
    prefix = "backbone.layers" if mamba else "model.layers"
    assert outer <= keys
    for i in range(2):
        block = {k[len(f"{prefix}.{i}."):] for k in keys if k.startswith(f"{prefix}.{i}.")}
        assert {k for k in block if not k.startswith(mixer)} == ({"norm.weight"} if mamba
                                                                 else FLA_BLOCK)
    assert keys - outer == {k for k in keys if k.startswith(prefix)}
    if model_type == "mamba2":
        assert config.dt_limit == (0.0, 1e9)  # transformers' time_step_limit, read
    with torch.no_grad():
        assert model(torch.randint(0, V, (1, 5))).logits.shape == (1, 5, V)


@pytest.mark.parametrize("which", ["mamba", "mamba2"])
def test_transformers_mamba_checkpoint_loads(which, tmp_path):
    """A checkpoint saved by transformers' own Mamba / Mamba-2 (its config field names and
    parameter names) loads into ours through AutoModelForCausalLM and gives its logits."""
    torch.manual_seed(0)
    if which == "mamba":
        cfg = transformers.MambaConfig(vocab_size=V, hidden_size=32, state_size=8,
                                       num_hidden_layers=2, initializer_range=0.2)
        ref = transformers.MambaForCausalLM(cfg)
    else:
        cfg = transformers.Mamba2Config(vocab_size=V, hidden_size=32, state_size=8, num_heads=4,
                                        head_dim=16, n_groups=1, chunk_size=16,
                                        num_hidden_layers=2, initializer_range=0.2)
        ref = transformers.Mamba2ForCausalLM(cfg)
    ref.eval().save_pretrained(tmp_path)
    ours = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(ours).__module__.startswith("lightning_ops.models")
    ids = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)


def test_unsupported_fla_options_raise():
    with pytest.raises(NotImplementedError, match="attn"):
        M.GLAForCausalLM(tiny_config("gla", attn={"layers": [1], "num_heads": 2}))
    with pytest.raises(NotImplementedError, match="use_output_norm"):
        M.DeltaNetForCausalLM(tiny_config("delta_net", use_output_norm=False))


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    model = M.GatedDeltaNetForCausalLM(tiny_config("gated_deltanet")).train()
    ids = torch.randint(3, V, (2, 9))

    def grads():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return [p.grad.clone() for p in model.parameters()]
    plain = grads()
    # transformers 5.2x renamed gradient_checkpointing_* to activation_checkpointing_*
    enable = getattr(model, "activation_checkpointing_enable", None) or \
        model.gradient_checkpointing_enable
    enable()
    assert model.model.gradient_checkpointing
    ckpt = grads()
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b)


class _Repeats(torch.utils.data.Dataset):
    """Sequences repeating a short random pattern: learnable in a few steps."""

    def __init__(self, n=32, T=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        pat = torch.randint(3, V, (n, 4), generator=g)
        self.data = pat.repeat(1, T // 4)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return {"input_ids": self.data[i], "labels": self.data[i]}


def test_trainer_loss_decreases(tmp_path):
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments
    torch.manual_seed(0)
    model = M.Mamba2ForCausalLM(tiny_config("mamba2", initializer_range=0.02))
    kw = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, learning_rate=2e-2,
              lr_scheduler_type="constant",
              max_steps=12, logging_steps=1, save_strategy="no", report_to=[],
              disable_tqdm=True, seed=0, dataloader_num_workers=0)
    fields = TrainingArguments.__dataclass_fields__
    kw["use_cpu" if "use_cpu" in fields else "no_cuda"] = True
    trainer = Trainer(model=model, args=TrainingArguments(**kw), train_dataset=_Repeats())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses


def test_generate_with_a_user_cache_and_continuation():
    """A RecurrentCache passed to generate is filled in place; generate continues from the cache
    it returned (HF's multi-turn pattern) with the tokens of one longer generate."""
    torch.manual_seed(0)
    model = M.GLAForCausalLM(tiny_config("gla")).eval()
    ids = torch.randint(3, V, (2, 6))
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=8, do_sample=False)
        cache = M.RecurrentCache()
        first = model.generate(ids, max_new_tokens=5, do_sample=False, **{_CACHE_FIELD: cache})
        assert cache.get_seq_length() == 10  # the prompt and 4 fed-back tokens
        more = model.generate(first, max_new_tokens=3, do_sample=False, **{_CACHE_FIELD: cache})
    assert torch.equal(first, ref[:, :11]) and torch.equal(more, ref)


def test_kda_and_gdn_fla06_fields_and_init():
    """fla 0.6's KDAConfig gate options and GatedDeltaNetConfig output gate reach the layers,
    and the model init is fla 0.6's: KDA's dt_bias with softplus(dt_bias) in [1e-4, 0.1]
    (not zeros: its decays would forget within a token), A_log = 0 with safe_gate."""
    cfg = M.KDAConfig(hidden_size=64, num_heads=2, head_dim=16, num_hidden_layers=1,
                      vocab_size=50)
    m = M.KDAForCausalLM(cfg)
    kda = [mod for mod in m.modules() if type(mod).__name__ == "KimiDeltaAttention"][0]
    dt = F.softplus(kda.dt_bias.detach())
    assert dt.min() >= 1e-4 * 0.999 and dt.max() <= 0.1 * 1.001, (dt.min(), dt.max())
    A = kda.A_log.detach().exp()
    assert A.min() >= 1 and A.max() <= 16
    safe = M.KDAForCausalLM(M.KDAConfig(hidden_size=64, num_heads=2, head_dim=16,
                                        num_hidden_layers=1, vocab_size=50, safe_gate=True,
                                        lower_bound=-5.0))
    kda = [mod for mod in safe.modules() if type(mod).__name__ == "KimiDeltaAttention"][0]
    assert kda.safe_gate and kda.lower_bound == -5.0
    assert torch.equal(kda.A_log.detach(), torch.zeros_like(kda.A_log))
    g = M.GatedDeltaNetForCausalLM(M.GatedDeltaNetConfig(
        hidden_size=64, num_heads=2, head_dim=16, num_hidden_layers=1, vocab_size=50,
        output_gate_activation="sigmoid"))
    gdn = [mod for mod in g.modules() if type(mod).__name__ == "GatedDeltaNet"][0]
    assert gdn.output_gate_activation == "sigmoid"
    with pytest.raises(ValueError, match="output_gate_activation"):
        M.GatedDeltaNetConfig(output_gate_activation="relu")

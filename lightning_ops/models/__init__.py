"""`lightning_ops.models`: Hugging Face `transformers` models over lightning_ops.layers (the
optional extra `pip install lightning_ops[hf]`; `import lightning_ops` never imports
transformers, only this package does).

    import lightning_ops.models                 # registers the classes with the Auto* factories
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gated_deltanet", vocab_size=32000, hidden_size=512,
                                  num_hidden_layers=4, num_heads=4, head_dim=64)
    model = AutoModelForCausalLM.from_config(config)
    out = model.generate(input_ids, max_new_tokens=32, do_sample=True, top_p=0.9)
    model.save_pretrained(path); AutoModelForCausalLM.from_pretrained(path)
    AutoModelForCausalLM.from_pretrained(fla_checkpoint_dir)    # fla's config.json + weights

| mixer          | config (model_type)                               | models                                  |
|----------------|---------------------------------------------------|-----------------------------------------|
| GLA            | GLAConfig ('gla')                                 | GLAModel, GLAForCausalLM                |
| DeltaNet       | DeltaNetConfig ('delta_net')                      | DeltaNetModel, DeltaNetForCausalLM      |
| Gated DeltaNet | GatedDeltaNetConfig ('gated_deltanet')            | GatedDeltaNetModel, ...ForCausalLM      |
| Lightning      | LightningAttentionConfig ('lightning_attention')  | LightningAttentionModel, ...ForCausalLM |
| Mamba          | MambaConfig ('mamba')                             | MambaModel, MambaForCausalLM            |
| Mamba-2        | Mamba2Config ('mamba2')                           | Mamba2Model, Mamba2ForCausalLM          |

Configs, module and parameter names are fla's (fla.models), so fla checkpoints load; the Mamba
ones also take transformers' config field names and parameter layout (state-spaces/*-hf
checkpoints). Registration uses exist_ok=True, as fla does: importing this package makes the
Auto* factories resolve these model types (including transformers' own 'mamba' / 'mamba2') to
these classes; whichever of fla / this package registers last wins. Call `register()` again
to take the types back after importing fla.
"""
try:
    import transformers as _transformers  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("lightning_ops.models needs Hugging Face transformers: "
                      "pip install 'lightning_ops[hf]' (or pip install transformers)") from e

from .cache import RecurrentCache, RecurrentLayerCache
from .configuration import (DeltaNetConfig, GatedDeltaNetConfig, GLAConfig, KDAConfig,
                            LightningAttentionConfig, Mamba2Config, MambaConfig)
from .modeling import (FAMILIES, DeltaNetForCausalLM, DeltaNetModel, GatedDeltaNetForCausalLM,
                       GatedDeltaNetModel, GLAForCausalLM, GLAModel, KDAForCausalLM, KDAModel,
                       LightningAttentionForCausalLM,
                       LightningAttentionModel, LinearPreTrainedModel, Mamba2ForCausalLM,
                       Mamba2Model, MambaForCausalLM, MambaModel, causal_lm_loss)

Cache = RecurrentCache  # fla's name for its model cache


def register(exist_ok: bool = True) -> None:
    """Register every config with AutoConfig and its models with AutoModel /
    AutoModelForCausalLM (done on import). exist_ok=True replaces earlier registrations of
    the same model types (fla's, or transformers' own Mamba / Mamba-2)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    for config_cls, (model_cls, lm_cls) in FAMILIES.items():
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=exist_ok)
        AutoModel.register(config_cls, model_cls, exist_ok=exist_ok)
        AutoModelForCausalLM.register(config_cls, lm_cls, exist_ok=exist_ok)


register()

__all__ = [
    "register", "Cache", "RecurrentCache", "RecurrentLayerCache", "LinearPreTrainedModel",
    "causal_lm_loss",
    "GLAConfig", "GLAModel", "GLAForCausalLM",
    "DeltaNetConfig", "DeltaNetModel", "DeltaNetForCausalLM",
    "GatedDeltaNetConfig", "GatedDeltaNetModel", "GatedDeltaNetForCausalLM",
    "KDAConfig", "KDAModel", "KDAForCausalLM",
    "LightningAttentionConfig", "LightningAttentionModel", "LightningAttentionForCausalLM",
    "MambaConfig", "MambaModel", "MambaForCausalLM",
    "Mamba2Config", "Mamba2Model", "Mamba2ForCausalLM",
]

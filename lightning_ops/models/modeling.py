"""Hugging Face models over lightning_ops.layers: `*Model` (the backbone) and `*ForCausalLM` for
GLA, DeltaNet, Gated DeltaNet, Lightning Attention, Mamba and Mamba-2.

Module and parameter names are fla's (and, for Mamba / Mamba-2, also transformers'), so their
checkpoints load:

    fla style (GLA, DeltaNet, Gated DeltaNet, Lightning):
        model.embeddings, model.layers.{i}.{attn_norm, attn, mlp_norm, mlp.{gate,up,down}_proj},
        model.norm, lm_head
    Mamba style (Mamba, Mamba-2):
        backbone.embeddings, backbone.layers.{i}.{norm, mixer}, backbone.norm_f, lm_head

Forward: `(input_ids | inputs_embeds, attention_mask, past_key_values / cache, labels,
use_cache, output_hidden_states, return_dict, logits_to_keep, **kwargs)`, as HF causal LMs.
`attention_mask` is a 2-D 0/1 padding mask, any arrangement (HF's [B, past + T] form works);
`cu_seqlens` (kwarg) packs sequences into one row, as fla. The cache is a `RecurrentCache`
(made on the first call with use_cache); it is returned under the output field the installed
transformers uses (`cache` from 5.2x, `past_key_values` before), and taken under either name
(and `cache_params`, HF Mamba's). `labels` give the shifted next-token cross entropy (mean
over labels != -100, or sum / num_items_in_batch when the Trainer passes that).
"""
import dataclasses
import math
import warnings
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from lightning_ops import layers as L
from lightning_ops.layers.gla import alibi_slopes
from lightning_ops.layers.lm import GatedMLP
from lightning_ops.layers.norm import RMSNorm
from lightning_ops.layers.utils import init_dt_bias

from .cache import RecurrentCache
from .configuration import (DeltaNetConfig, GatedDeltaNetConfig, GLAConfig, KDAConfig,
                            LightningAttentionConfig, Mamba2Config, MambaConfig)

Tensor = torch.Tensor

# transformers renamed the cache argument / output field `past_key_values` -> `cache` (5.2x)
_CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} \
    else "past_key_values"
_TF5 = int(transformers.__version__.split(".")[0]) >= 5


def _tied(prefix: str):
    key, target = "lm_head.weight", f"{prefix}.embeddings.weight"
    return {key: target} if _TF5 else [key]


def _pick_cache(past_key_values, cache, cache_params):
    given = [c for c in (cache, past_key_values, cache_params) if c is not None]
    if len(given) > 1 and any(c is not given[0] for c in given[1:]):
        raise ValueError("pass the cache once (as `cache` or `past_key_values`), not several")
    return given[0] if given else None


def _as_recurrent_cache(cache) -> RecurrentCache:
    """The cache to run with: ours as is; None, an empty HF cache, a legacy tuple of layer dicts
    or a `lightning_ops.layers.Cache` converted."""
    if cache is None or isinstance(cache, RecurrentCache):
        return RecurrentCache() if cache is None else cache
    if isinstance(cache, (tuple, list)) or hasattr(cache, "states"):
        return RecurrentCache.from_legacy_cache(cache)
    if len(cache) == 0 or (hasattr(cache, "get_seq_length") and cache.get_seq_length() == 0):
        return RecurrentCache()  # e.g. an empty DynamicCache made by the caller
    raise TypeError(f"these models keep recurrent states: pass a `RecurrentCache` (or nothing) as "
                    f"the cache, not a filled {type(cache).__name__}")


def _check_fla_options(config) -> None:
    name = type(config).__name__
    if getattr(config, "attn", None) is not None:
        raise NotImplementedError(f"{name}.attn: hybrid softmax-attention layers are not supported "
                                  f"by lightning_ops models (set attn=None)")
    if getattr(config, "attnres_block_size", None) is not None:
        raise NotImplementedError(f"{name}.attnres_block_size: attention residuals are not "
                                  f"supported (set it to None)")
    if getattr(config, "use_l2warp", False):
        raise NotImplementedError(f"{name}.use_l2warp=True is not supported")
    if getattr(config, "hidden_act", "swish") != "swish":
        raise NotImplementedError(f"{name}.hidden_act={config.hidden_act!r}: only 'swish' "
                                  f"(SwiGLU MLP) is supported")


def _intermediate_size(config) -> int:
    """fla's GatedMLP width: intermediate_size, or 2/3 * hidden_ratio * hidden_size rounded up
    to a multiple of 256."""
    if config.intermediate_size is not None:
        return int(config.intermediate_size)
    ratio = 4 if config.hidden_ratio is None else config.hidden_ratio
    size = int(config.hidden_size * ratio * 2 / 3)
    return 256 * ((size + 255) // 256)


def _run_mixer(mixer, h: Tensor, attention_mask, cache, use_cache: bool, cu_seqlens) -> Tensor:
    """One mixer call through its internal entry point (`RecurrentMixer.mix`, what both public
    contracts use), continuing from / storing into `cache[layer_idx]`."""
    idx = mixer.layer_idx
    state = cache[idx] if cache is not None and len(cache) > idx else None
    store = bool(use_cache) and cache is not None
    out, new = mixer.mix(h, attention_mask, cu_seqlens, state, store)
    if store:
        cache.update(recurrent_state=new["recurrent_state"], conv_state=new["conv_state"],
                     layer_idx=idx, offset=h.shape[1])
    return out


class FlaBlock(nn.Module):
    """fla's block: x + attn(attn_norm(x)), then + mlp(mlp_norm(.)) (SwiGLU)."""

    def __init__(self, config, mixer: nn.Module):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.attn = mixer
        self.mlp_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = GatedMLP(config.hidden_size, _intermediate_size(config))

    def forward(self, hidden_states: Tensor, attention_mask=None, cache=None, use_cache=False,
                cu_seqlens=None) -> Tensor:
        h = _run_mixer(self.attn, self.attn_norm(hidden_states), attention_mask, cache,
                       use_cache, cu_seqlens)
        hidden_states = hidden_states + h
        return hidden_states + self.mlp(self.mlp_norm(hidden_states))


class MambaBlock(nn.Module):
    """Mamba's block: x + mixer(norm(x)) (the residual in float32 with residual_in_fp32)."""

    def __init__(self, config, mixer: nn.Module):
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mixer = mixer

    def forward(self, hidden_states: Tensor, attention_mask=None, cache=None, use_cache=False,
                cu_seqlens=None) -> Tensor:
        dtype = hidden_states.dtype
        residual = hidden_states.float() if self.residual_in_fp32 else hidden_states
        h = _run_mixer(self.mixer, self.norm(hidden_states), attention_mask, cache, use_cache,
                       cu_seqlens)
        return (residual + h).to(dtype)


# -- the mixers, built from a config as fla's blocks do ---------------------------------------
def _gla_mixer(config: GLAConfig, i: int):
    return L.GatedLinearAttention(
        mode=config.attn_mode, hidden_size=config.hidden_size, expand_k=config.expand_k,
        expand_v=config.expand_v, num_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
        feature_map=config.feature_map, use_short_conv=config.use_short_conv,
        conv_size=config.conv_size, use_output_gate=config.use_output_gate,
        gate_fn=config.hidden_act, elementwise_affine=config.elementwise_affine,
        norm_eps=config.norm_eps, clamp_min=config.clamp_min, fuse_norm=config.fuse_norm,
        layer_idx=i)


def _delta_mixer(config: DeltaNetConfig, i: int):
    if not config.use_output_norm:
        raise NotImplementedError("DeltaNetConfig.use_output_norm=False is not supported (the "
                                  "DeltaNet layer always normalises its output)")
    return L.DeltaNet(
        mode=config.attn_mode, hidden_size=config.hidden_size, expand_k=config.expand_k,
        expand_v=config.expand_v, num_heads=config.num_heads, use_gate=config.use_gate,
        use_beta=config.use_beta, use_short_conv=config.use_short_conv,
        allow_neg_eigval=config.allow_neg_eigval, conv_size=config.conv_size,
        qk_norm=config.qk_norm, qk_activation=config.qk_activation, norm_eps=config.norm_eps,
        layer_idx=i)


def _gated_delta_mixer(config: GatedDeltaNetConfig, i: int):
    return L.GatedDeltaNet(
        mode=config.attn_mode, hidden_size=config.hidden_size, expand_v=config.expand_v,
        head_dim=config.head_dim, num_heads=config.num_heads, num_v_heads=config.num_v_heads,
        use_gate=config.use_gate, use_short_conv=config.use_short_conv,
        allow_neg_eigval=config.allow_neg_eigval, conv_size=config.conv_size,
        norm_eps=config.norm_eps, output_gate_activation=config.output_gate_activation,
        layer_idx=i)


def _kda_mixer(config: KDAConfig, i: int):
    return L.KimiDeltaAttention(
        mode=config.attn_mode, hidden_size=config.hidden_size, expand_v=config.expand_v,
        head_dim=config.head_dim, num_heads=config.num_heads, num_v_heads=config.num_v_heads,
        use_short_conv=config.use_short_conv, allow_neg_eigval=config.allow_neg_eigval,
        safe_gate=config.safe_gate, lower_bound=config.lower_bound,
        conv_size=config.conv_size, norm_eps=config.norm_eps, layer_idx=i)


def _lightning_mixer(config: LightningAttentionConfig, i: int):
    return L.LightningAttention(
        hidden_size=config.hidden_size, num_heads=config.num_heads, expand_k=config.expand_k,
        expand_v=config.expand_v, mode=config.attn_mode, use_output_gate=config.use_output_gate,
        gate_fn=config.hidden_act, elementwise_affine=config.elementwise_affine,
        norm_eps=config.norm_eps, layer_idx=i, num_layers=config.num_hidden_layers)


def _check_silu(config) -> None:
    if config.hidden_act not in ("silu", "swish"):
        raise NotImplementedError(f"{type(config).__name__}.hidden_act={config.hidden_act!r}: "
                                  f"the Mamba mixers use SiLU only")


def _mamba_mixer(config: MambaConfig, i: int):
    _check_silu(config)
    return L.Mamba(
        d_model=config.hidden_size, d_state=config.state_size, d_conv=config.conv_kernel,
        expand=config.expand, dt_rank=config.dt_rank, dt_min=config.dt_min, dt_max=config.dt_max,
        dt_init=config.dt_init_scheme, dt_scale=config.dt_scale,
        dt_init_floor=config.dt_init_floor, conv_bias=config.use_conv_bias, bias=config.use_bias,
        layer_idx=i)


def _mamba2_mixer(config: Mamba2Config, i: int):
    _check_silu(config)
    m = L.Mamba2(
        d_model=config.hidden_size, d_state=config.state_size, d_conv=config.conv_kernel,
        conv_init=config.conv_init, expand=config.expand, headdim=config.head_dim,
        ngroups=config.n_groups, A_init_range=tuple(config.A_init_range),
        D_has_hdim=config.D_has_hdim, rmsnorm=config.rmsnorm,
        norm_before_gate=config.norm_before_gate, dt_min=config.dt_min, dt_max=config.dt_max,
        dt_init_floor=config.dt_init_floor, dt_limit=tuple(config.dt_limit),
        bias=config.use_bias, conv_bias=config.use_conv_bias, chunk_size=config.chunk_size,
        layer_idx=i)
    if config.rmsnorm:
        m.norm.eps = config.norm_eps  # fla / HF give the gated norm the model's eps
    return m


# -- shared base classes ------------------------------------------------------------------------
def _fresh(t: Optional[Tensor]) -> bool:
    """Not loaded from a checkpoint (transformers flags loaded tensors)."""
    return t is not None and not getattr(t, "_is_hf_initialized", False)


class LinearPreTrainedModel(PreTrainedModel):
    """Weights init (fla's: normal(initializer_range) linears / convs / embeddings, unit norms,
    and each mixer's own special parameters), and generation settings shared by every model."""

    supports_gradient_checkpointing = True
    _is_stateful = True            # no assisted decoding (recurrent states cannot be cropped)
    _supports_cache_class = True
    _no_split_modules = ["FlaBlock", "MambaBlock"]

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate must not make a DynamicCache: forward makes a RecurrentCache

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv1d)):
            if not getattr(module.weight, "_no_reinit", False):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None and not getattr(module.bias, "_no_reinit", False):
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None and _fresh(module.weight):
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, RMSNorm):
            if module.weight is not None:
                nn.init.ones_(module.weight)
        elif isinstance(module, L.GatedDeltaNet):
            if _fresh(module.A_log):
                module.A_log.copy_(torch.empty_like(module.A_log).uniform_(0, 16).log())
            if _fresh(module.dt_bias):
                module.dt_bias.copy_(init_dt_bias(module.dt_bias.numel(),
                                                  device=module.dt_bias.device))
        elif isinstance(module, L.KimiDeltaAttention):  # as fla 0.6's KDA model
            if _fresh(module.A_log):
                if module.safe_gate:
                    module.A_log.zero_()
                else:
                    module.A_log.copy_(torch.empty_like(module.A_log).uniform_(1, 16).log())
            if _fresh(module.dt_bias):
                module.dt_bias.copy_(init_dt_bias(module.dt_bias.numel(),
                                                  device=module.dt_bias.device))
        elif isinstance(module, L.LightningAttention):
            if _fresh(module.slope):
                n = self.config.num_hidden_layers
                depth = 1.0 if n <= 1 else 1 - module.layer_idx / (n - 1) + 1e-5
                module.slope.copy_(alibi_slopes(module.num_heads) * depth)
        elif isinstance(module, (L.Mamba, L.Mamba2)):
            self._init_mamba(module)

    def _init_mamba(self, module) -> None:
        c = self.config
        if _fresh(module.D):
            module.D.fill_(1.0)
        if isinstance(module, L.Mamba):
            if _fresh(module.A_log):
                A = torch.arange(1, module.d_state + 1, dtype=torch.float32)
                module.A_log.copy_(A.log().expand_as(module.A_log))
            std = module.dt_rank ** -0.5 * c.dt_scale
            if c.dt_init_scheme == "constant":
                nn.init.constant_(module.dt_proj.weight, std)
            else:
                nn.init.uniform_(module.dt_proj.weight, -std, std)
            if _fresh(module.dt_proj.bias):
                module.dt_proj.bias.copy_(init_dt_bias(module.d_inner, c.dt_min, c.dt_max,
                                                       c.dt_init_floor, module.A_log.device))
        else:
            if _fresh(module.A_log):
                module.A_log.copy_(torch.empty_like(module.A_log)
                                   .uniform_(*c.A_init_range).log())
            if _fresh(module.dt_bias):
                module.dt_bias.copy_(init_dt_bias(module.nheads, c.dt_min, c.dt_max,
                                                  c.dt_init_floor, module.dt_bias.device))
            if c.conv_init is not None:
                nn.init.uniform_(module.conv1d.weight, -c.conv_init, c.conv_init)
        if c.rescale_prenorm_residual and _fresh(module.out_proj.weight):
            # GPT-2's scheme: residual output projections scaled by 1/sqrt(num layers)
            nn.init.kaiming_uniform_(module.out_proj.weight, a=math.sqrt(5))
            module.out_proj.weight /= math.sqrt(c.num_hidden_layers)


class _Backbone(LinearPreTrainedModel):
    """embeddings -> blocks -> final norm. Subclasses set `_mixer` (config, layer_idx) ->
    mixer, `_block` and `_norm_name`."""

    _mixer = None
    _block = FlaBlock
    _norm_name = "norm"

    def __init__(self, config):
        super().__init__(config)
        if self._block is FlaBlock:
            _check_fla_options(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        mixer = type(self)._mixer
        self.layers = nn.ModuleList(self._block(config, mixer(config, i))
                                    for i in range(config.num_hidden_layers))
        self.add_module(self._norm_name, RMSNorm(config.hidden_size, config.norm_eps))
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings

    def set_input_embeddings(self, value):
        self.embeddings = value

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                inputs_embeds: Optional[Tensor] = None, past_key_values=None,
                use_cache: Optional[bool] = None, output_attentions: Optional[bool] = None,
                output_hidden_states: Optional[bool] = None, return_dict: Optional[bool] = None,
                cache=None, cache_params=None, cu_seqlens: Optional[Tensor] = None, **kwargs):
        if output_attentions:
            warnings.warn(f"{type(self).__name__} has no attention weights; "
                          f"output_attentions is ignored", stacklevel=2)
        cfg = self.config
        output_hidden_states = output_hidden_states if output_hidden_states is not None \
            else cfg.output_hidden_states
        use_cache = use_cache if use_cache is not None else \
            (cfg.use_cache if not self.training else False)
        return_dict = return_dict if return_dict is not None else getattr(cfg, "return_dict", True)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be a 2-D [batch, length] 0/1 padding mask, got "
                             f"shape {list(attention_mask.shape)}")
        cache = _pick_cache(past_key_values, cache, cache_params)
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if checkpointing and use_cache:
            warnings.warn("use_cache=True is incompatible with gradient checkpointing; "
                          "setting use_cache=False", stacklevel=2)
            use_cache = False
        if use_cache:
            cache = _as_recurrent_cache(cache)
        elif cache is not None and not isinstance(cache, RecurrentCache):
            cache = _as_recurrent_cache(cache)

        hidden = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        all_hidden = () if output_hidden_states else None
        for block in self.layers:
            if output_hidden_states:
                all_hidden += (hidden,)
            if checkpointing:
                hidden = self._gradient_checkpointing_func(block.__call__, hidden,
                                                           attention_mask, None, False,
                                                           cu_seqlens)
            else:
                hidden = block(hidden, attention_mask, cache, use_cache, cu_seqlens)
        hidden = getattr(self, self._norm_name)(hidden)
        if output_hidden_states:
            all_hidden += (hidden,)
        out_cache = cache if use_cache else None
        if not return_dict:
            return tuple(v for v in (hidden, out_cache, all_hidden) if v is not None)
        return BaseModelOutputWithPast(last_hidden_state=hidden, hidden_states=all_hidden,
                                       **{_CACHE_FIELD: out_cache})


def causal_lm_loss(logits: Tensor, labels: Tensor, num_items_in_batch=None,
                   ignore_index: int = -100) -> Tensor:
    """Next-token cross entropy: logits[:, t] predicts labels[:, t + 1] (labels are the inputs,
    unshifted, as HF); mean over labels != ignore_index, or sum / num_items_in_batch."""
    labels = F.pad(labels.to(logits.device), (0, 1), value=ignore_index)[:, 1:]
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=ignore_index, reduction=reduction)
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


class _ForCausalLM(LinearPreTrainedModel, GenerationMixin):
    """backbone -> lm_head, loss, generation. Subclasses set `_backbone_cls` and
    `base_model_prefix` ('model' or 'backbone')."""

    _backbone_cls = None

    def __init__(self, config):
        super().__init__(config)
        self.add_module(self.base_model_prefix, type(self)._backbone_cls(config))
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @property
    def _backbone(self):
        return getattr(self, self.base_model_prefix)

    def get_input_embeddings(self):
        return self._backbone.embeddings

    def set_input_embeddings(self, value):
        self._backbone.embeddings = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def get_decoder(self):
        return self._backbone

    def set_decoder(self, decoder):
        self.add_module(self.base_model_prefix, decoder)

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                inputs_embeds: Optional[Tensor] = None, past_key_values=None,
                labels: Optional[Tensor] = None, use_cache: Optional[bool] = None,
                output_attentions: Optional[bool] = None,
                output_hidden_states: Optional[bool] = None, return_dict: Optional[bool] = None,
                logits_to_keep=0, cache=None, cache_params=None, num_items_in_batch=None,
                **kwargs):
        return_dict = return_dict if return_dict is not None else \
            getattr(self.config, "return_dict", True)
        out = self._backbone(input_ids=input_ids, attention_mask=attention_mask,
                             inputs_embeds=inputs_embeds, past_key_values=past_key_values,
                             use_cache=use_cache, output_attentions=output_attentions,
                             output_hidden_states=output_hidden_states, return_dict=True,
                             cache=cache, cache_params=cache_params,
                             cu_seqlens=kwargs.get("cu_seqlens"))
        hidden = out.last_hidden_state
        if labels is None and isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        elif labels is None and isinstance(logits_to_keep, Tensor):
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels, num_items_in_batch)
        out_cache = out[_CACHE_FIELD] if _CACHE_FIELD in out else None
        if not return_dict:
            rest = tuple(v for v in (out_cache, out.hidden_states) if v is not None)
            return ((loss,) if loss is not None else ()) + (logits,) + rest
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                      **{_CACHE_FIELD: out_cache})


# -- the six families ---------------------------------------------------------------------------
class GLAPreTrainedModel(LinearPreTrainedModel):
    config_class = GLAConfig
    base_model_prefix = "model"


class GLAModel(_Backbone, GLAPreTrainedModel):
    _mixer = staticmethod(_gla_mixer)


class GLAForCausalLM(_ForCausalLM, GLAPreTrainedModel):
    _backbone_cls = GLAModel
    _tied_weights_keys = _tied("model")


class DeltaNetPreTrainedModel(LinearPreTrainedModel):
    config_class = DeltaNetConfig
    base_model_prefix = "model"


class DeltaNetModel(_Backbone, DeltaNetPreTrainedModel):
    _mixer = staticmethod(_delta_mixer)


class DeltaNetForCausalLM(_ForCausalLM, DeltaNetPreTrainedModel):
    _backbone_cls = DeltaNetModel
    _tied_weights_keys = _tied("model")


class GatedDeltaNetPreTrainedModel(LinearPreTrainedModel):
    config_class = GatedDeltaNetConfig
    base_model_prefix = "model"


class GatedDeltaNetModel(_Backbone, GatedDeltaNetPreTrainedModel):
    _mixer = staticmethod(_gated_delta_mixer)


class GatedDeltaNetForCausalLM(_ForCausalLM, GatedDeltaNetPreTrainedModel):
    _backbone_cls = GatedDeltaNetModel
    _tied_weights_keys = _tied("model")


class KDAPreTrainedModel(LinearPreTrainedModel):
    config_class = KDAConfig
    base_model_prefix = "model"


class KDAModel(_Backbone, KDAPreTrainedModel):
    _mixer = staticmethod(_kda_mixer)


class KDAForCausalLM(_ForCausalLM, KDAPreTrainedModel):
    _backbone_cls = KDAModel
    _tied_weights_keys = _tied("model")


class LightningAttentionPreTrainedModel(LinearPreTrainedModel):
    config_class = LightningAttentionConfig
    base_model_prefix = "model"


class LightningAttentionModel(_Backbone, LightningAttentionPreTrainedModel):
    _mixer = staticmethod(_lightning_mixer)


class LightningAttentionForCausalLM(_ForCausalLM, LightningAttentionPreTrainedModel):
    _backbone_cls = LightningAttentionModel
    _tied_weights_keys = _tied("model")


class MambaPreTrainedModel(LinearPreTrainedModel):
    config_class = MambaConfig
    base_model_prefix = "backbone"


class MambaModel(_Backbone, MambaPreTrainedModel):
    _mixer = staticmethod(_mamba_mixer)
    _block = MambaBlock
    _norm_name = "norm_f"


class MambaForCausalLM(_ForCausalLM, MambaPreTrainedModel):
    _backbone_cls = MambaModel
    _tied_weights_keys = _tied("backbone")


class Mamba2PreTrainedModel(LinearPreTrainedModel):
    config_class = Mamba2Config
    base_model_prefix = "backbone"


class Mamba2Model(_Backbone, Mamba2PreTrainedModel):
    _mixer = staticmethod(_mamba2_mixer)
    _block = MambaBlock
    _norm_name = "norm_f"


class Mamba2ForCausalLM(_ForCausalLM, Mamba2PreTrainedModel):
    _backbone_cls = Mamba2Model
    _tied_weights_keys = _tied("backbone")


FAMILIES = {
    # config class: (backbone, causal LM)
    GLAConfig: (GLAModel, GLAForCausalLM),
    DeltaNetConfig: (DeltaNetModel, DeltaNetForCausalLM),
    GatedDeltaNetConfig: (GatedDeltaNetModel, GatedDeltaNetForCausalLM),
    KDAConfig: (KDAModel, KDAForCausalLM),
    LightningAttentionConfig: (LightningAttentionModel, LightningAttentionForCausalLM),
    MambaConfig: (MambaModel, MambaForCausalLM),
    Mamba2Config: (Mamba2Model, Mamba2ForCausalLM),
}

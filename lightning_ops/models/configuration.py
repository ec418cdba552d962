"""Model configurations, named and shaped as fla's (`fla.models.*.configuration_*`), so the
config.json files of fla checkpoints load; the Mamba ones also read transformers' own field
names (`time_step_*`, `layer_norm_epsilon`), so HF Mamba / Mamba-2 checkpoints load too.

Fields fla has for options we do not implement are kept (they round-trip through config.json);
the model constructors reject the values they cannot honour (a hybrid `attn` layer spec,
`attnres_block_size`, `use_l2warp`, ...) instead of silently computing something else. The
fused-kernel switches (`fuse_norm`, `fuse_swiglu`, `fuse_cross_entropy`,
`fuse_linear_cross_entropy`) only pick kernels in fla; the math is the same here.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

try:  # transformers >= 5 (PretrainedConfig is kept as an alias)
    from transformers import PreTrainedConfig as _BaseConfig
except ImportError:  # pragma: no cover - transformers 4.x
    from transformers import PretrainedConfig as _BaseConfig

__all__ = ["GLAConfig", "DeltaNetConfig", "GatedDeltaNetConfig", "LightningAttentionConfig",
           "MambaConfig", "Mamba2Config"]


def _check_ce(fuse_cross_entropy: bool, fuse_linear_cross_entropy: bool) -> None:
    if fuse_cross_entropy and fuse_linear_cross_entropy:
        raise ValueError("`fuse_cross_entropy` and `fuse_linear_cross_entropy` cannot be True at "
                         "the same time.")


def _alias(kwargs: Dict[str, Any], hf_name: str, value, default):
    """transformers' name for a field (e.g. `time_step_min` for `dt_min`): used when the fla
    name was left at its default."""
    if hf_name in kwargs:
        other = kwargs.pop(hf_name)
        if value == default:
            return other
    return value


class _FlaLMConfig(_BaseConfig):
    """Fields every fla linear-attention LM config shares (MLP, norms, loss, special tokens)."""

    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def _common(self, hidden_ratio, intermediate_size, hidden_act, num_hidden_layers, norm_eps,
                attn, use_cache, initializer_range, fuse_norm, fuse_swiglu, fuse_cross_entropy,
                fuse_linear_cross_entropy, use_l2warp, vocab_size, attnres_block_size,
                max_position_embeddings) -> None:
        _check_ce(fuse_cross_entropy, fuse_linear_cross_entropy)
        self.hidden_ratio = hidden_ratio
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.num_hidden_layers = num_hidden_layers
        self.norm_eps = norm_eps
        self.attn = attn
        self.use_cache = use_cache
        self.initializer_range = initializer_range
        self.fuse_norm = fuse_norm
        self.fuse_swiglu = fuse_swiglu
        self.fuse_cross_entropy = fuse_cross_entropy
        self.fuse_linear_cross_entropy = fuse_linear_cross_entropy
        self.use_l2warp = use_l2warp
        self.vocab_size = vocab_size
        self.attnres_block_size = attnres_block_size
        self.max_position_embeddings = max_position_embeddings


class GLAConfig(_FlaLMConfig):
    """Gated Linear Attention LM (fla's `GLAConfig`, model_type 'gla')."""

    model_type = "gla"

    def __init__(self, hidden_size: int = 2048, expand_k: float = 0.5, expand_v: float = 1.0,
                 hidden_ratio: Optional[int] = 4, intermediate_size: Optional[int] = None,
                 num_hidden_layers: int = 24, num_heads: int = 4,
                 num_kv_heads: Optional[int] = None, feature_map: Optional[str] = None,
                 attn_mode: str = "chunk", use_short_conv: bool = False, conv_size: int = 4,
                 use_output_gate: bool = True, clamp_min: Optional[float] = None,
                 hidden_act: str = "swish", max_position_embeddings: int = 2048,
                 elementwise_affine: Optional[bool] = True, norm_eps: float = 1e-6,
                 use_gk: bool = True, use_gv: bool = False, attn: Optional[dict] = None,
                 use_cache: bool = True, pad_token_id: Optional[int] = None,
                 bos_token_id: int = 1, eos_token_id: int = 2, tie_word_embeddings: bool = False,
                 initializer_range: float = 0.02, fuse_norm: bool = True, fuse_swiglu: bool = True,
                 fuse_cross_entropy: bool = True, fuse_linear_cross_entropy: bool = False,
                 use_l2warp: bool = False, vocab_size: int = 32000,
                 attnres_block_size: Optional[int] = None, **kwargs):
        self.hidden_size = hidden_size
        self.expand_k = expand_k
        self.expand_v = expand_v
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.feature_map = feature_map
        self.attn_mode = attn_mode
        self.use_short_conv = use_short_conv
        self.conv_size = conv_size
        self.use_output_gate = use_output_gate
        self.clamp_min = clamp_min
        self.elementwise_affine = elementwise_affine
        self.use_gk = use_gk
        self.use_gv = use_gv
        self._common(hidden_ratio, intermediate_size, hidden_act, num_hidden_layers, norm_eps,
                     attn, use_cache, initializer_range, fuse_norm, fuse_swiglu,
                     fuse_cross_entropy, fuse_linear_cross_entropy, use_l2warp, vocab_size,
                     attnres_block_size, max_position_embeddings)
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, tie_word_embeddings=tie_word_embeddings,
                         **kwargs)


class DeltaNetConfig(_FlaLMConfig):
    """DeltaNet LM (fla's `DeltaNetConfig`, model_type 'delta_net')."""

    model_type = "delta_net"

    def __init__(self, attn_mode: str = "chunk", hidden_size: int = 2048, expand_k: float = 1.0,
                 expand_v: float = 1.0, use_gate: bool = False, use_short_conv: bool = True,
                 allow_neg_eigval: bool = False, conv_size: int = 4, use_beta: bool = True,
                 use_output_norm: bool = True, num_heads: int = 16, qk_norm: str = "l2",
                 qk_activation: str = "silu", max_position_embeddings: int = 2048,
                 hidden_ratio: Optional[int] = 4, intermediate_size: Optional[int] = None,
                 hidden_act: str = "swish", num_hidden_layers: int = 24, norm_eps: float = 1e-6,
                 attn: Optional[dict] = None, use_cache: bool = True,
                 pad_token_id: Optional[int] = None, bos_token_id: int = 1, eos_token_id: int = 2,
                 tie_word_embeddings: bool = False, initializer_range: float = 0.02,
                 fuse_norm: bool = True, fuse_swiglu: bool = True, fuse_cross_entropy: bool = True,
                 fuse_linear_cross_entropy: bool = False, use_l2warp: bool = False,
                 vocab_size: int = 32000, attnres_block_size: Optional[int] = None, **kwargs):
        self.attn_mode = attn_mode
        self.hidden_size = hidden_size
        self.expand_k = expand_k
        self.expand_v = expand_v
        self.use_gate = use_gate
        self.use_short_conv = use_short_conv
        self.allow_neg_eigval = allow_neg_eigval
        self.conv_size = conv_size
        self.use_beta = use_beta
        self.use_output_norm = use_output_norm
        self.num_heads = num_heads
        self.qk_norm = qk_norm
        self.qk_activation = qk_activation
        self._common(hidden_ratio, intermediate_size, hidden_act, num_hidden_layers, norm_eps,
                     attn, use_cache, initializer_range, fuse_norm, fuse_swiglu,
                     fuse_cross_entropy, fuse_linear_cross_entropy, use_l2warp, vocab_size,
                     attnres_block_size, max_position_embeddings)
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, tie_word_embeddings=tie_word_embeddings,
                         **kwargs)


class GatedDeltaNetConfig(_FlaLMConfig):
    """Gated DeltaNet LM (fla's `GatedDeltaNetConfig`, model_type 'gated_deltanet')."""

    model_type = "gated_deltanet"

    def __init__(self, attn_mode: str = "chunk", hidden_size: int = 2048, expand_v: float = 2.0,
                 use_gate: bool = True, use_short_conv: bool = True,
                 allow_neg_eigval: bool = False, conv_size: int = 4, head_dim: int = 256,
                 num_heads: int = 6, num_v_heads: Optional[int] = None,
                 max_position_embeddings: int = 2048, hidden_ratio: Optional[int] = 4,
                 intermediate_size: Optional[int] = None, hidden_act: str = "swish",
                 num_hidden_layers: int = 21, norm_eps: float = 1e-6,
                 attn: Optional[dict] = None, use_cache: bool = True,
                 pad_token_id: Optional[int] = None, bos_token_id: int = 1, eos_token_id: int = 2,
                 tie_word_embeddings: bool = False, initializer_range: float = 0.02,
                 fuse_norm: bool = True, fuse_swiglu: bool = True, fuse_cross_entropy: bool = True,
                 fuse_linear_cross_entropy: bool = False, use_l2warp: bool = False,
                 vocab_size: int = 32000, attnres_block_size: Optional[int] = None,
                 output_gate_activation: str = "swish", **kwargs):
        if output_gate_activation not in ("swish", "silu", "sigmoid"):
            raise ValueError(f"output_gate_activation must be 'swish', 'silu' or 'sigmoid', "
                             f"got {output_gate_activation!r}")
        self.attn_mode = attn_mode
        self.hidden_size = hidden_size
        self.expand_v = expand_v
        self.use_gate = use_gate
        self.use_short_conv = use_short_conv
        self.allow_neg_eigval = allow_neg_eigval
        self.output_gate_activation = output_gate_activation
        self.conv_size = conv_size
        self.head_dim = head_dim
        self.num_heads = num_heads
        self.num_v_heads = num_v_heads
        self._common(hidden_ratio, intermediate_size, hidden_act, num_hidden_layers, norm_eps,
                     attn, use_cache, initializer_range, fuse_norm, fuse_swiglu,
                     fuse_cross_entropy, fuse_linear_cross_entropy, use_l2warp, vocab_size,
                     attnres_block_size, max_position_embeddings)
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, tie_word_embeddings=tie_word_embeddings,
                         **kwargs)


class KDAConfig(_FlaLMConfig):
    """Kimi Delta Attention LM (fla's `KDAConfig`, model_type 'kda')."""

    model_type = "kda"

    def __init__(self, attn_mode: str = "chunk", hidden_size: int = 2048, expand_v: float = 1,
                 use_short_conv: bool = True, allow_neg_eigval: bool = False,
                 safe_gate: bool = False, lower_bound: Optional[float] = None,
                 conv_size: int = 4, head_dim: int = 128, num_heads: int = 16,
                 num_v_heads: Optional[int] = None, max_position_embeddings: int = 2048,
                 hidden_ratio: Optional[int] = 4, intermediate_size: Optional[int] = None,
                 hidden_act: str = "swish", num_hidden_layers: int = 24, norm_eps: float = 1e-6,
                 attn: Optional[dict] = None, use_cache: bool = True,
                 pad_token_id: Optional[int] = None, bos_token_id: int = 1, eos_token_id: int = 2,
                 tie_word_embeddings: bool = False, initializer_range: float = 0.02,
                 fuse_norm: bool = True, fuse_swiglu: bool = True, fuse_cross_entropy: bool = True,
                 fuse_linear_cross_entropy: bool = False, use_l2warp: bool = False,
                 vocab_size: int = 32000, attnres_block_size: Optional[int] = None, **kwargs):
        self.attn_mode = attn_mode
        self.hidden_size = hidden_size
        self.expand_v = expand_v
        self.use_short_conv = use_short_conv
        self.allow_neg_eigval = allow_neg_eigval
        self.safe_gate = safe_gate
        self.lower_bound = lower_bound
        self.conv_size = conv_size
        self.head_dim = head_dim
        self.num_heads = num_heads
        self.num_v_heads = num_v_heads
        self._common(hidden_ratio, intermediate_size, hidden_act, num_hidden_layers, norm_eps,
                     attn, use_cache, initializer_range, fuse_norm, fuse_swiglu,
                     fuse_cross_entropy, fuse_linear_cross_entropy, use_l2warp, vocab_size,
                     attnres_block_size, max_position_embeddings)
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, tie_word_embeddings=tie_word_embeddings,
                         **kwargs)


class LightningAttentionConfig(_FlaLMConfig):
    """TNL-style Lightning Attention LM (model_type 'lightning_attention'; fla has no such
    model, so the fields follow its GLA config's conventions): per layer a
    `LightningAttention(hidden_size, num_heads, expand_k, expand_v, layer_idx, num_layers)`
    mixer and a SwiGLU MLP."""

    model_type = "lightning_attention"

    def __init__(self, hidden_size: int = 2048, expand_k: float = 1.0, expand_v: float = 1.0,
                 hidden_ratio: Optional[int] = 4, intermediate_size: Optional[int] = None,
                 num_hidden_layers: int = 24, num_heads: int = 8, attn_mode: str = "chunk",
                 use_output_gate: bool = True, hidden_act: str = "swish",
                 max_position_embeddings: int = 2048, elementwise_affine: bool = True,
                 norm_eps: float = 1e-6, attn: Optional[dict] = None, use_cache: bool = True,
                 pad_token_id: Optional[int] = None, bos_token_id: int = 1, eos_token_id: int = 2,
                 tie_word_embeddings: bool = False, initializer_range: float = 0.02,
                 fuse_norm: bool = True, fuse_swiglu: bool = True, fuse_cross_entropy: bool = True,
                 fuse_linear_cross_entropy: bool = False, use_l2warp: bool = False,
                 vocab_size: int = 32000, attnres_block_size: Optional[int] = None, **kwargs):
        self.hidden_size = hidden_size
        self.expand_k = expand_k
        self.expand_v = expand_v
        self.num_heads = num_heads
        self.attn_mode = attn_mode
        self.use_output_gate = use_output_gate
        self.elementwise_affine = elementwise_affine
        self._common(hidden_ratio, intermediate_size, hidden_act, num_hidden_layers, norm_eps,
                     attn, use_cache, initializer_range, fuse_norm, fuse_swiglu,
                     fuse_cross_entropy, fuse_linear_cross_entropy, use_l2warp, vocab_size,
                     attnres_block_size, max_position_embeddings)
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, tie_word_embeddings=tie_word_embeddings,
                         **kwargs)


class MambaConfig(_BaseConfig):
    """Mamba-1 LM (fla's `MambaConfig`, model_type 'mamba'). transformers' names are read too:
    layer_norm_epsilon, time_step_rank / _scale / _min / _max / _init_scheme / _floor."""

    model_type = "mamba"
    keys_to_ignore_at_inference = ["past_key_values", "cache", "cache_params"]

    def __init__(self, vocab_size: int = 32000, hidden_size: int = 2048, state_size: int = 16,
                 num_hidden_layers: int = 48, norm_eps: float = 1e-5, pad_token_id: int = 0,
                 bos_token_id: int = 1, eos_token_id: int = 2, expand: int = 2,
                 conv_kernel: int = 4, use_bias: bool = False, use_conv_bias: bool = True,
                 hidden_act: str = "silu", initializer_range: float = 0.02,
                 residual_in_fp32: bool = False, dt_rank="auto", dt_scale: float = 1.0,
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init_scheme: str = "random",
                 dt_init_floor: float = 1e-4, rescale_prenorm_residual: bool = False,
                 use_cache: bool = True, fuse_norm: bool = True, fuse_cross_entropy: bool = True,
                 fuse_linear_cross_entropy: bool = False, use_l2warp: bool = False,
                 tie_word_embeddings: bool = False, **kwargs):
        _check_ce(fuse_cross_entropy, fuse_linear_cross_entropy)
        norm_eps = _alias(kwargs, "layer_norm_epsilon", norm_eps, 1e-5)
        dt_rank = _alias(kwargs, "time_step_rank", dt_rank, "auto")
        dt_scale = _alias(kwargs, "time_step_scale", dt_scale, 1.0)
        dt_min = _alias(kwargs, "time_step_min", dt_min, 0.001)
        dt_max = _alias(kwargs, "time_step_max", dt_max, 0.1)
        dt_init_scheme = _alias(kwargs, "time_step_init_scheme", dt_init_scheme, "random")
        dt_init_floor = _alias(kwargs, "time_step_floor", dt_init_floor, 1e-4)
        for k in ("use_mambapy", "use_associative_scan", "intermediate_size"):
            kwargs.pop(k, None)  # transformers' fields: kernel choices / derived
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.state_size = state_size
        self.num_hidden_layers = num_hidden_layers
        self.norm_eps = norm_eps
        self.conv_kernel = conv_kernel
        self.expand = expand
        self.intermediate_size = int(expand * hidden_size)
        self.use_bias = use_bias
        self.use_conv_bias = use_conv_bias
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.dt_rank = math.ceil(hidden_size / 16) if dt_rank == "auto" else dt_rank
        self.dt_scale = dt_scale
        self.dt_min = dt_min
        self.dt_max = dt_max
        self.dt_init_scheme = dt_init_scheme
        self.dt_init_floor = dt_init_floor
        self.rescale_prenorm_residual = rescale_prenorm_residual
        self.residual_in_fp32 = residual_in_fp32
        self.use_cache = use_cache
        self.fuse_norm = fuse_norm
        self.fuse_cross_entropy = fuse_cross_entropy
        self.fuse_linear_cross_entropy = fuse_linear_cross_entropy
        self.use_l2warp = use_l2warp
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         pad_token_id=pad_token_id, tie_word_embeddings=tie_word_embeddings,
                         **kwargs)


class Mamba2Config(_BaseConfig):
    """Mamba-2 LM (fla's `Mamba2Config`, model_type 'mamba2'). transformers' names are read
    too: layer_norm_epsilon, time_step_min / _max / _floor / _limit (its `num_heads` is derived
    here, as in fla: expand * hidden_size / head_dim)."""

    model_type = "mamba2"
    keys_to_ignore_at_inference = ["past_key_values", "cache", "cache_params"]

    def __init__(self, head_dim: int = 64, vocab_size: int = 32000, hidden_size: int = 2048,
                 state_size: int = 128, num_hidden_layers: int = 48, norm_eps: float = 1e-5,
                 pad_token_id: int = 0, bos_token_id: int = 1, eos_token_id: int = 2,
                 expand: int = 2, conv_kernel: int = 4, n_groups: int = 1,
                 use_bias: bool = False, use_conv_bias: bool = True,
                 conv_init: Optional[float] = None,
                 A_init_range: Tuple[float, float] = (1, 16), D_has_hdim: bool = False,
                 hidden_act: str = "silu", initializer_range: float = 0.02,
                 residual_in_fp32: bool = True, dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4,
                 dt_limit: Tuple[float, float] = (0.0, float("inf")),
                 rescale_prenorm_residual: bool = True, use_cache: bool = True,
                 rmsnorm: bool = True, norm_before_gate: bool = False, chunk_size: int = 256,
                 fuse_norm: bool = True, fuse_cross_entropy: bool = True,
                 fuse_linear_cross_entropy: bool = False, use_l2warp: bool = False,
                 tie_word_embeddings: bool = False, **kwargs):
        _check_ce(fuse_cross_entropy, fuse_linear_cross_entropy)
        norm_eps = _alias(kwargs, "layer_norm_epsilon", norm_eps, 1e-5)
        dt_min = _alias(kwargs, "time_step_min", dt_min, 0.001)
        dt_max = _alias(kwargs, "time_step_max", dt_max, 0.1)
        dt_init_floor = _alias(kwargs, "time_step_floor", dt_init_floor, 1e-4)
        dt_limit = _alias(kwargs, "time_step_limit", dt_limit, (0.0, float("inf")))
        kwargs.pop("time_step_rank", None)  # unused by Mamba-2
        given_heads = kwargs.pop("num_heads", None)
        if len(A_init_range) != 2 or A_init_range[0] <= 0 or A_init_range[0] > A_init_range[1]:
            raise ValueError("`A_init_range` must be a positive (min, max) pair.")
        if dt_min <= 0 or dt_max < dt_min:
            raise ValueError("`dt_min` and `dt_max` must satisfy 0 < dt_min <= dt_max.")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.state_size = state_size
        self.num_hidden_layers = num_hidden_layers
        self.norm_eps = norm_eps
        self.conv_kernel = conv_kernel
        self.conv_init = conv_init
        self.expand = expand
        self.A_init_range = tuple(A_init_range)
        self.use_bias = use_bias
        self.use_conv_bias = use_conv_bias
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.dt_min = dt_min
        self.dt_max = dt_max
        self.dt_init_floor = dt_init_floor
        self.dt_limit = tuple(dt_limit)
        self.rescale_prenorm_residual = rescale_prenorm_residual
        self.residual_in_fp32 = residual_in_fp32
        self.use_cache = use_cache
        self.n_groups = n_groups
        self.head_dim = head_dim
        self.num_heads = int(expand * hidden_size / head_dim)
        if given_heads is not None and int(given_heads) != self.num_heads:
            raise ValueError(f"Mamba2Config: num_heads {given_heads} does not match "
                             f"expand * hidden_size / head_dim = {self.num_heads}")
        self.rmsnorm = rmsnorm
        self.D_has_hdim = D_has_hdim
        self.norm_before_gate = norm_before_gate
        self.chunk_size = chunk_size
        self.fuse_norm = fuse_norm
        self.fuse_cross_entropy = fuse_cross_entropy
        self.fuse_linear_cross_entropy = fuse_linear_cross_entropy
        self.use_l2warp = use_l2warp
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         pad_token_id=pad_token_id, tie_word_embeddings=tie_word_embeddings,
                         **kwargs)

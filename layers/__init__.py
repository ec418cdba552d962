"""nn.Module layers over lightning_ops: GLA, DeltaNet, Gated DeltaNet, Mamba, Mamba-2 and
Lightning Attention mixers, their decoding caches, and a small causal LM to wrap them.

Every mixer is called as `out, cache = layer(hidden_states, attention_mask=None,
cu_seqlens=None, cache=None, use_cache=False)`; see `RecurrentMixer.forward`.
"""
from .base import RecurrentMixer
from .cache import LayerCache
from .conv import ShortConvolution
from .delta import DeltaNet, GatedDeltaNet
from .gla import GatedLinearAttention, LightningAttention
from .lm import MIXERS, CausalLM, make_mixer
from .mamba import Mamba, Mamba2
from .norm import RMSNorm

__all__ = [
    "RecurrentMixer", "LayerCache", "ShortConvolution", "RMSNorm",
    "GatedLinearAttention", "LightningAttention", "DeltaNet", "GatedDeltaNet", "Mamba", "Mamba2",
    "CausalLM", "make_mixer", "MIXERS",
]

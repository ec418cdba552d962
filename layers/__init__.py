"""nn.Module layers over lightning_ops: GLA, DeltaNet, Gated DeltaNet, Mamba, Mamba-2 and
Lightning Attention mixers, their decoding caches, and a small causal LM to wrap them.

Every mixer is called as `out, cache = layer(hidden_states, attention_mask=None,
cu_seqlens=None, cache=None, use_cache=False)`; see `RecurrentMixer.forward`:

    import layers
    mixer = layers.GatedDeltaNet(hidden_size=512, num_heads=4, head_dim=128)
    out, _ = mixer(x)                                      # x [B, T, 512] -> out [B, T, 512]
    out, cache = mixer(prompt, attention_mask=mask, use_cache=True)   # left-padded prefill
    step, cache = mixer(next_token_states, cache=cache)    # one decode step [B, 1, 512]
    out, _ = mixer(packed, cu_seqlens=cu)                  # packed [1, sum(T_i), 512]

    model = layers.CausalLM(vocab_size, hidden_size=256, num_layers=4, mixer="mamba2")
    tokens = model.generate(prompt_ids, max_new_tokens=32, attention_mask=mask)

The layers call only the public lightning_ops functions, so they run on whatever backend
dispatch picks (torch on CPU, Triton / CUDA on GPUs) with no change.
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

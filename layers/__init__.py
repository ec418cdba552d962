"""nn.Module layers over lightning_ops: GLA, DeltaNet, Gated DeltaNet, Mamba, Mamba-2 and
Lightning Attention and Kimi Delta Attention mixers, their decoding caches, and a small causal LM to wrap them.

The mixers follow their peers' contracts, so code written for fla / mamba-ssm runs unchanged
and the peers' state_dicts load strictly:

    import layers
    # fla's contract: GatedLinearAttention, DeltaNet, GatedDeltaNet, LightningAttention
    mixer = layers.GatedDeltaNet(hidden_size=512, num_heads=4, head_dim=128, layer_idx=0)
    o, _, _ = mixer(x)                                     # x [B, T, 512] -> o [B, T, 512]
    cache = layers.Cache()
    o, _, cache = mixer(prompt, attention_mask=mask, past_key_values=cache, use_cache=True)
    o, _, cache = mixer(next_token, past_key_values=cache, use_cache=True)  # decode step
    o, _, _ = mixer(packed, cu_seqlens=cu)                 # packed [1, sum(T_i), 512]

    # mamba-ssm's contract: Mamba, Mamba2
    m = layers.Mamba2(d_model=512, layer_idx=0)
    out = m(x)
    params = layers.InferenceParams(max_seqlen=64, max_batch_size=B)
    out = m(prompt, inference_params=params); params.seqlen_offset += prompt.shape[1]
    out = m(next_token, inference_params=params)           # or m.step(...)

    model = layers.CausalLM(vocab_size, hidden_size=256, num_layers=4, mixer="mamba2")
    tokens = model.generate(prompt_ids, max_new_tokens=32, attention_mask=mask)

    # context parallel (one sequence split over the ranks of a process group): GLA, Lightning,
    # DeltaNet, GatedDeltaNet, KDA, HGRN2, Hedgehog (cp_context=) and Mamba2 (cp_context=)
    ctx = lightning_ops.cp.build_cp_context(global_cu_seqlens, group)   # once per step
    o, _, _ = mixer(my_slice, cp_context=ctx)              # this rank's [1, T_r, 512] tokens

Padding masks may be left, right or arbitrary 0/1 (each row's real tokens form one sequence,
as fla's unpad/pad). The layers call only the public lightning_ops functions (and, with
cp_context, their lightning_ops.cp wrappers), so they run on whatever backend dispatch picks
(torch on CPU, Triton / CUDA on GPUs) with no change.
"""
from .base import FlaMixer, MambaMixer, RecurrentMixer
from .cache import Cache, InferenceParams
from .conv import ShortConvolution
from .delta import DeltaNet, GatedDeltaNet, KimiDeltaAttention
from .gla import GatedLinearAttention, LightningAttention
from .hedgehog import HedgehogAttention, HedgehogFeatureMap, hedgehog_distillation_loss
from .hgrn2 import HGRN2Attention
from .lion import LION
from .lm import MIXERS, CausalLM, make_mixer
from .log_linear import LogLinearMamba2
from .log_linear_delta import LogLinearGatedDeltaNet
from .mamba import Mamba, Mamba2
from .mom import MomAttention, load_balancing_loss
from .norm import RMSNorm

__all__ = [
    "RecurrentMixer", "FlaMixer", "MambaMixer", "Cache", "InferenceParams", "ShortConvolution",
    "RMSNorm", "CausalLM", "make_mixer", "MIXERS",
    "GatedLinearAttention", "LightningAttention", "DeltaNet", "GatedDeltaNet",
    "KimiDeltaAttention", "Mamba", "Mamba2", "LION", "HGRN2Attention", "HedgehogAttention",
    "HedgehogFeatureMap", "hedgehog_distillation_loss", "MomAttention", "load_balancing_loss",
    "LogLinearMamba2", "LogLinearGatedDeltaNet",
]

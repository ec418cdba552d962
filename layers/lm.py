"""A small causal language model around any mixer layer, with cached generation."""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import RecurrentMixer
from .cache import Cache
from .delta import DeltaNet, GatedDeltaNet, KimiDeltaAttention
from .gla import GatedLinearAttention, LightningAttention
from .hedgehog import HedgehogAttention
from .hgrn2 import HGRN2Attention
from .log_linear import LogLinearMamba2
from .log_linear_delta import LogLinearGatedDeltaNet
from .mamba import Mamba, Mamba2
from .mom import MomAttention
from .norm import RMSNorm

Tensor = torch.Tensor

MIXERS: Dict[str, type] = {
    "gla": GatedLinearAttention,
    "deltanet": DeltaNet,
    "gated_deltanet": GatedDeltaNet,
    "kda": KimiDeltaAttention,
    "mamba": Mamba,
    "mamba2": Mamba2,
    "lightning": LightningAttention,
    "hgrn2": HGRN2Attention,
    "hedgehog": HedgehogAttention,
    "mom": MomAttention,
    "log_linear_mamba2": LogLinearMamba2,
    "log_linear_gated_deltanet": LogLinearGatedDeltaNet,
}


def make_mixer(mixer: str, hidden_size: int, layer_idx: int = 0, num_layers: int = 1,
               **kwargs) -> RecurrentMixer:
    """Build a mixer by name ('gla', 'deltanet', 'gated_deltanet', 'kda', 'mamba', 'mamba2',
    'lightning', 'hgrn2', 'hedgehog', 'mom', 'log_linear_mamba2', 'log_linear_gated_deltanet');
    kwargs go to its constructor. Every one of them has a decoding cache (CausalLM.generate
    works with each; the log-linear ones cache a (level states, offsets) tuple); the
    bidirectional `LION` is not a causal mixer and is not listed.

    Note the layers' own defaults are sized for large models: HGRN2Attention's expand_ratio
    (128, num_heads = hidden_size // expand_ratio) needs hidden_size >= 128, and MomAttention's
    head_dim 256 x expand_v 2 x 8 memories is large; pass smaller ones for small models (e.g.
    `expand_ratio=hidden_size // 2`, or `head_dim=32, expand_v=1, num_memories=4`).
    LogLinearMamba2 has no default num_heads (as fla's): pass num_heads and head_dim with
    num_heads * head_dim = expand * hidden_size."""
    if mixer not in MIXERS:
        raise ValueError(f"unknown mixer {mixer!r}; choose one of {sorted(MIXERS)}")
    cls = MIXERS[mixer]
    if cls is LightningAttention:
        kwargs.setdefault("num_layers", num_layers)
    return cls(hidden_size=hidden_size, layer_idx=layer_idx, **kwargs)


class GatedMLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False, **kw)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False, **kw)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False, **kw)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then x + mlp(norm(x)) (no MLP if None)."""

    def __init__(self, mixer: RecurrentMixer, hidden_size: int, intermediate_size: int,
                 norm_eps: float, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.mixer_norm = RMSNorm(hidden_size, norm_eps, **kw)
        self.mixer = mixer
        self.mlp = GatedMLP(hidden_size, intermediate_size, **kw) if intermediate_size else None
        self.mlp_norm = RMSNorm(hidden_size, norm_eps, **kw) if intermediate_size else None

    def forward(self, x, attention_mask=None, cu_seqlens=None, state=None, use_cache=False):
        """-> (x, the mixer's new state dict or None); states as `RecurrentMixer.mix`."""
        h, state = self.mixer.mix(self.mixer_norm(x), attention_mask, cu_seqlens, state,
                                  use_cache)
        x = x + h
        if self.mlp is not None:
            x = x + self.mlp(self.mlp_norm(x))
        return x, state


class CausalLM(nn.Module):
    """embedding -> num_layers x Block(norm, mixer, norm, SwiGLU MLP) -> norm -> lm_head.

    Args:
        vocab_size, hidden_size, num_layers: the usual.
        mixer: a name from MIXERS, or a callable (layer_idx) -> mixer module.
        mixer_kwargs: constructor arguments of a named mixer (hidden_size / layer_idx are set).
        mlp_ratio: MLP width as a multiple of hidden_size (0: no MLP, as Mamba-1 models).
        norm_eps: RMSNorm eps.
        tie_word_embeddings: share the embedding and the output projection.
        initializer_range: std of the embedding (and lm_head, MLP) normal init.
    """

    def __init__(self, vocab_size: int, hidden_size: int = 128, num_layers: int = 2,
                 mixer: Union[str, Callable[[int], nn.Module]] = "gated_deltanet",
                 mixer_kwargs: Optional[dict] = None, mlp_ratio: float = 4.0,
                 norm_eps: float = 1e-5, tie_word_embeddings: bool = False,
                 initializer_range: float = 0.02, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.embeddings = nn.Embedding(vocab_size, hidden_size, **kw)
        inter = int(round(mlp_ratio * hidden_size))

        def build(i):
            if callable(mixer):
                return mixer(i)
            return make_mixer(mixer, hidden_size, i, num_layers, **(mixer_kwargs or {}), **kw)
        self.layers = nn.ModuleList(Block(build(i), hidden_size, inter, norm_eps, **kw)
                                    for i in range(num_layers))
        self.norm = RMSNorm(hidden_size, norm_eps, **kw)
        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False, **kw)
        std = initializer_range
        nn.init.normal_(self.embeddings.weight, std=std)
        for blk in self.layers:
            if blk.mlp is not None:
                for lin in (blk.mlp.gate_proj, blk.mlp.up_proj, blk.mlp.down_proj):
                    nn.init.normal_(lin.weight, std=std)
        if tie_word_embeddings:
            self.lm_head.weight = self.embeddings.weight
        else:
            nn.init.normal_(self.lm_head.weight, std=std)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                cu_seqlens: Optional[Tensor] = None, cache: Optional[Cache] = None,
                use_cache: bool = False) -> Tuple[Tensor, Optional[Cache]]:
        """input_ids [B, T] -> (logits [B, T, vocab] in at least float32, cache or None).

        attention_mask: [B, T] (or [B, seen + T]) 0/1 padding, any arrangement.
        cu_seqlens: [N + 1] packed sequences (B == 1).
        cache: a `layers.Cache` from an earlier call (one slot per layer); the call continues
            from it and updates it in place. use_cache: return a cache (a new one if none was
            passed)."""
        if cache is not None and len(cache) not in (0, len(self.layers)):
            raise ValueError(f"cache has {len(cache)} layer caches, the model has "
                             f"{len(self.layers)} layers")
        want = bool(use_cache) or cache is not None
        if want and cache is None:
            cache = Cache()
        x = self.embeddings(input_ids)
        for i, blk in enumerate(self.layers):
            state = cache[i] if cache is not None and len(cache) > i else None
            x, new = blk(x, attention_mask, cu_seqlens, state, want)
            if want:
                cache.update(recurrent_state=new["recurrent_state"],
                             conv_state=new["conv_state"], layer_idx=i,
                             offset=input_ids.shape[1])
        logits = self.lm_head(self.norm(x))
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return logits, (cache if want else None)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int,
                 attention_mask: Optional[Tensor] = None, temperature: float = 0.0,
                 top_k: Optional[int] = None, eos_token_id: Optional[int] = None,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        """Prefill the (left-padded) prompt once, then decode token by token from the caches.
        temperature 0 is greedy; otherwise sample (optionally from the top_k logits). Rows that
        produced eos_token_id keep emitting it. Returns [B, T + max_new_tokens]."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        out = [input_ids]
        if max_new_tokens == 0:
            return input_ids
        logits, cache = self(input_ids, attention_mask=attention_mask, use_cache=True)
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for i in range(max_new_tokens):
            nxt = self._pick(logits[:, -1], temperature, top_k, generator)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done = done | (nxt == eos_token_id)
            out.append(nxt[:, None])
            if i + 1 < max_new_tokens:
                logits, cache = self(nxt[:, None], cache=cache)
        return torch.cat(out, dim=1)

    @staticmethod
    def _pick(logits: Tensor, temperature: float, top_k: Optional[int], generator) -> Tensor:
        if temperature <= 0:
            return logits.argmax(-1)
        logits = logits / temperature
        if top_k is not None:
            kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]

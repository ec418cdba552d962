"""Decoding caches with the peers' semantics.

- `Cache`: fla's cache protocol (what GLA / DeltaNet / GatedDeltaNet / Lightning take as
  `past_key_values`): one dict per layer, `{'recurrent_state', 'attn_state', 'conv_state',
  'ffn_state'}`, reached as `cache[layer_idx]`, filled by `cache.update(recurrent_state=...,
  conv_state=..., layer_idx=..., offset=T)`. The layers only use `len(cache)`,
  `cache[layer_idx]` and `cache.update(...)`, so fla's own Cache / FLACache objects work too.
- `InferenceParams`: mamba-ssm's (what Mamba / Mamba2 take as `inference_params`):
  `key_value_memory_dict[layer_idx] = (conv_state, ssm_state)`, `seqlen_offset` (0: a prefill
  that starts from zero states; > 0: continue from the cached states). The caller advances
  `seqlen_offset`, as in mamba-ssm's generation loop.

State layouts: recurrent states [N, H, K, V] (GLA / DeltaNet / Lightning), [N, d_inner, d_state]
(Mamba), [N, nheads, headdim, d_state] (Mamba-2); short-conv states [N, D, W], the last W inputs
(fla's and mamba-ssm's layout; only the last W - 1 columns are read).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

Tensor = torch.Tensor

STATE_KEYS = ("recurrent_state", "attn_state", "conv_state", "ffn_state")  # fla's per-layer dict


def map_states(x, fn):
    """fn applied to every tensor of a (nested tuple / list of) state(s)."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, (tuple, list)):
        return type(x)(map_states(t, fn) for t in x)
    return x


class Cache:
    """fla-style cache: a list of per-layer state dicts (see the module doc).

    A layer called with `past_key_values=cache, use_cache=True` continues from
    `cache[layer_idx]` (when present) and stores its new states there. The cache object is
    updated in place; use `clone()` to keep an old one, `index_select` / `reorder_cache` to pick
    or reorder rows (beams).
    """

    def __init__(self, seen_tokens: int = 0):
        self.states: List[Dict[str, Any]] = []
        self._seen_tokens: List[int] = []
        self._start = int(seen_tokens)

    def __getitem__(self, layer_idx: int) -> Dict[str, Any]:
        if layer_idx < len(self.states):
            return self.states[layer_idx]
        raise KeyError(f"Cache only has {len(self)} layers, attempted to access layer with "
                       f"index {layer_idx}")

    def __iter__(self):
        yield from self.states

    def __len__(self) -> int:
        return len(self.states)

    def update(self, recurrent_state=None, attn_state=None, conv_state=None, ffn_state=None,
               layer_idx: int = 0, offset: Optional[int] = 1,
               cache_kwargs: Optional[Dict[str, Any]] = None, **_) -> Dict[str, Any]:
        """Store a layer's new states (None keeps the old value) and count `offset` tokens."""
        if attn_state is not None:
            raise NotImplementedError("layers.Cache holds recurrent and conv states only "
                                      "(no attention key/value states)")
        while len(self.states) <= layer_idx:
            self.states.append(dict.fromkeys(STATE_KEYS))
            self._seen_tokens.append(self._start)
        state = self.states[layer_idx]
        for key, value in (("recurrent_state", recurrent_state), ("conv_state", conv_state),
                           ("ffn_state", ffn_state)):
            if value is not None:
                state[key] = value
        self._seen_tokens[layer_idx] += int(offset or 0)
        return state

    def get_seq_length(self, layer_idx: Optional[int] = 0) -> int:
        """Tokens seen by layer `layer_idx` (0 if it has no state yet)."""
        layer_idx = 0 if layer_idx is None else layer_idx
        return self._seen_tokens[layer_idx] if layer_idx < len(self.states) else 0

    def get_max_cache_shape(self) -> Optional[int]:
        return None

    def reset(self) -> None:
        self.states.clear()
        self._seen_tokens.clear()

    def _copy(self, fn) -> "Cache":
        new = Cache(self._start)
        new.states = [{k: map_states(v, fn) for k, v in s.items()} for s in self.states]
        new._seen_tokens = list(self._seen_tokens)
        return new

    def clone(self) -> "Cache":
        """A copy with its own tensors."""
        return self._copy(lambda t: t.clone())

    def detach(self) -> "Cache":
        """A copy cut from the autograd graph (truncated backprop through time)."""
        return self._copy(lambda t: t.detach())

    def index_select(self, index: Tensor) -> "Cache":
        """A cache holding rows `index` of every state (pick or reorder sequences)."""
        return self._copy(lambda t: t.index_select(0, index.to(t.device)))

    def reorder_cache(self, beam_idx: Tensor) -> None:
        """Reorder the rows in place (HF beam search)."""
        self.states = self.index_select(beam_idx).states

    def to_legacy_cache(self) -> tuple:
        return tuple(self.states)

    @classmethod
    def from_legacy_cache(cls, past_key_values=None, seen_tokens: int = 0) -> "Cache":
        cache = cls(seen_tokens)
        for state in past_key_values or ():
            cache.states.append(dict(state))
            cache._seen_tokens.append(int(seen_tokens))
        return cache

    def __repr__(self) -> str:
        def shape(v):
            if isinstance(v, torch.Tensor):
                return str(list(v.shape))
            if isinstance(v, (tuple, list)):
                return "(" + ", ".join(shape(t) for t in v) + ")"
            return str(v)
        rows = "; ".join(f"{i}: state={shape(s['recurrent_state'])} conv={shape(s['conv_state'])}"
                         for i, s in enumerate(self.states))
        return f"Cache({rows})"


@dataclass
class InferenceParams:
    """mamba-ssm's inference parameters (same fields): the per-layer states live in
    `key_value_memory_dict[layer_idx] = (conv_state, ssm_state)`; `seqlen_offset` tokens have
    been consumed (0: the next call is a prefill from zero states)."""

    max_seqlen: int
    max_batch_size: int
    seqlen_offset: int = 0
    batch_size_offset: int = 0
    key_value_memory_dict: dict = field(default_factory=dict)
    lengths_per_sample: Optional[Tensor] = None

    def reset(self, max_seqlen: int, max_batch_size: int) -> None:
        self.max_seqlen = max_seqlen
        self.max_batch_size = max_batch_size
        self.seqlen_offset = 0
        if self.lengths_per_sample is not None:
            self.lengths_per_sample.zero_()

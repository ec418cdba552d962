"""The decoding cache of the Hugging Face models: a `transformers.Cache` (so `generate` accepts it,
as fla's FLACache) holding, per layer, fla's state dict `{'recurrent_state', 'attn_state',
'conv_state', 'ffn_state'}` and the number of tokens the layer has seen.

The fla protocol (what lightning_ops.layers' fla-style mixers use): `len(cache)`,
`cache[layer_idx]` (the layer's dict), `cache.update(recurrent_state=..., conv_state=...,
layer_idx=..., offset=T)`. The HF protocol (what `generate` uses): `get_seq_length()`,
`reorder_cache(beam_idx)` (beam search), `batch_repeat_interleave` / `batch_select_indices`,
`is_compileable` (False: generate then keeps 2-D padding masks, which the layers take).
Recurrent states cannot be rolled back, so `crop` (assisted decoding) raises.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional

import torch
from transformers.cache_utils import Cache as _HFCache

from ..layers.cache import STATE_KEYS, map_states

Tensor = torch.Tensor


class RecurrentLayerCache:
    """One layer's states (fla's per-layer dict) and its token count. Not a
    `CacheLayerMixin`: it holds no key/value tensors and its rows are sequences."""

    is_compileable = False
    is_sliding = False

    def __init__(self, seen_tokens: int = 0):
        self.state: Optional[Dict[str, Any]] = None
        self._seen_tokens = int(seen_tokens)

    def update(self, recurrent_state=None, attn_state=None, conv_state=None, ffn_state=None,
               offset: Optional[int] = 1, **_) -> Dict[str, Any]:
        if attn_state is not None:
            raise NotImplementedError("lightning_ops models cache recurrent and conv states "
                                      "only (no attention key/value states)")
        if self.state is None:
            self.state = dict.fromkeys(STATE_KEYS)
        for key, value in (("recurrent_state", recurrent_state), ("conv_state", conv_state),
                           ("ffn_state", ffn_state)):
            if value is not None:
                self.state[key] = value
        self._seen_tokens += int(1 if offset is None else offset)
        return self.state

    def get_seq_length(self, *_, **__) -> int:
        return self._seen_tokens

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:
        return -1

    def get_mask_sizes(self, *args, **kwargs):
        return 0, 0

    def _apply(self, fn) -> None:
        if self.state is not None:
            self.state = {k: map_states(v, fn) for k, v in self.state.items()}

    def reorder_cache(self, beam_idx: Tensor) -> None:
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._apply(lambda t: t[indices.to(t.device)] if isinstance(indices, Tensor)
                    else t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("a recurrent state cannot be cropped (rolled back): assisted "
                                  "/ speculative decoding is not supported by these models")

    def reset(self) -> None:
        self.state = None
        self._seen_tokens = 0

    def offload(self) -> None:  # states are small; kept on their device
        pass

    def prefetch(self) -> None:
        pass

    def __repr__(self) -> str:
        shapes = {} if self.state is None else {
            k: (list(v.shape) if isinstance(v, Tensor) else
                [list(t.shape) for t in v] if isinstance(v, (tuple, list)) else v)
            for k, v in self.state.items() if v is not None}
        return f"RecurrentLayerCache(seen={self._seen_tokens}, {shapes})"


class RecurrentCache(_HFCache):
    """The cache of lightning_ops' HF models (see the module doc). `generate` creates none for
    these models (they create their own on the first call with use_cache); passing one in
    (`past_key_values=` / `cache=`) continues from it, in place."""

    is_compileable = False
    is_croppable = False

    def __init__(self, seen_tokens: int = 0, **kwargs):
        try:
            super().__init__(layers=[], **kwargs)
        except TypeError:  # pragma: no cover - older transformers: Cache() takes no layers
            super().__init__()
        self.layers: List[RecurrentLayerCache] = []
        self.layer_class_to_replicate = None
        self.offloading = False
        self._start = int(seen_tokens)

    # -- fla's protocol ----------------------------------------------------------------------
    def __getitem__(self, layer_idx: int) -> Dict[str, Any]:
        if 0 <= layer_idx < len(self.layers) and self.layers[layer_idx].state is not None:
            return self.layers[layer_idx].state
        raise KeyError(f"Cache only has {len(self)} layers, attempted to access layer with "
                       f"index {layer_idx}")

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        for i in range(len(self.layers)):
            yield self[i]

    def __len__(self) -> int:
        return len(self.layers)

    def __contains__(self, layer_idx) -> bool:
        return isinstance(layer_idx, int) and 0 <= layer_idx < len(self.layers)

    def update(self, recurrent_state=None, attn_state=None, conv_state=None, ffn_state=None,
               layer_idx: int = 0, offset: Optional[int] = 1,
               cache_kwargs: Optional[Dict[str, Any]] = None, **kwargs) -> Dict[str, Any]:
        """Store a layer's new states (None keeps the old value) and count `offset` tokens."""
        while len(self.layers) <= layer_idx:
            self.layers.append(RecurrentLayerCache(self._start))
        return self.layers[layer_idx].update(recurrent_state=recurrent_state,
                                             attn_state=attn_state, conv_state=conv_state,
                                             ffn_state=ffn_state, offset=offset)

    # -- HF's protocol -----------------------------------------------------------------------
    def get_seq_length(self, layer_idx: Optional[int] = 0, *args, **kwargs) -> int:
        layer_idx = layer_idx or 0
        if layer_idx >= len(self.layers):
            return 0
        return self.layers[layer_idx].get_seq_length()

    @property
    def seen_tokens(self) -> int:
        return self.get_seq_length()

    def get_max_length(self, layer_idx: Optional[int] = None) -> int:
        return -1

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1

    def get_mask_sizes(self, *args, **kwargs):
        return 0, 0

    @property
    def is_linear(self) -> List[bool]:
        # HF's "linear" layers track no token count; ours do (get_seq_length is exact)
        return [False] * len(self.layers)

    @property
    def is_sliding(self) -> List[bool]:
        return [False] * len(self.layers)

    @property
    def is_dummy(self) -> List[bool]:
        return [False] * len(self.layers)

    @property
    def is_initialized(self) -> bool:
        return len(self.layers) > 0

    @property
    def batch_size(self) -> int:
        for layer in self.layers:
            rec = None if layer.state is None else layer.state.get("recurrent_state")
            if isinstance(rec, Tensor):
                return rec.shape[0]
        return -1

    def early_initialization(self, *args, **kwargs) -> None:
        pass  # states are created by the first forward

    def reorder_cache(self, beam_idx: Tensor) -> None:
        """Reorder the rows (sequences) in place: beam search."""
        for layer in self.layers:
            layer.reorder_cache(beam_idx)

    def batch_select_indices(self, indices: Tensor) -> None:
        for layer in self.layers:
            layer.batch_select_indices(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        for layer in self.layers:
            layer.batch_repeat_interleave(repeats)

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("a recurrent state cannot be cropped (rolled back): assisted "
                                  "/ speculative decoding is not supported by these models")

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()

    def offload(self, *args, **kwargs) -> None:
        pass

    def prefetch(self, *args, **kwargs) -> None:
        pass

    # -- conversions -------------------------------------------------------------------------
    def to_legacy_cache(self) -> tuple:
        return tuple(self.layers[i].state for i in range(len(self.layers)))

    @classmethod
    def from_legacy_cache(cls, past_key_values=None, seen_tokens: int = 0) -> "RecurrentCache":
        """From a tuple of per-layer state dicts (fla's legacy format) or any object with fla's
        protocol (len + [i]), e.g. `lightning_ops.layers.Cache`."""
        cache = cls(seen_tokens)
        if past_key_values is None:
            return cache
        seen = past_key_values.get_seq_length() if hasattr(past_key_values, "get_seq_length") \
            else int(seen_tokens)
        for i in range(len(past_key_values)):
            layer = RecurrentLayerCache(seen)
            layer.state = dict(past_key_values[i])
            cache.layers.append(layer)
        return cache

    def clone(self) -> "RecurrentCache":
        """A copy with its own tensors."""
        new = type(self)(self._start)
        for layer in self.layers:
            copy = RecurrentLayerCache(layer._seen_tokens)
            if layer.state is not None:
                copy.state = {k: map_states(v, lambda t: t.clone()) for k, v in layer.state.items()}
            new.layers.append(copy)
        return new

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layers={self.layers})"

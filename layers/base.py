"""What every mixer layer shares: the forward contract, input and cache checks, cache building."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from lightning_ops import validation as V

from .cache import LayerCache
from .conv import ShortConvolution

Tensor = torch.Tensor


class MixerStep:
    """One forward call's context handed to a layer's `_mix`: the mask, packing, the cache's
    states, and whether final states are wanted. `conv` runs a ShortConvolution with its slot of
    the cache and collects the new conv states in order."""

    def __init__(self, mask: Optional[Tensor], cu_seqlens: Optional[Tensor],
                 cache: Optional[LayerCache], want_state: bool):
        self.mask = mask
        self.cu_seqlens = cu_seqlens
        self.state = None if cache is None else cache.recurrent_state
        self.conv_in = None if cache is None else cache.conv_states
        # a fresh cache (allocate_cache, nothing seen yet) holds zeros: no history to carry
        self.has_history = cache is not None and cache.seen_tokens > 0
        self.want_state = want_state
        self.conv_out: List[Tensor] = []

    def conv(self, module: ShortConvolution, x: Tensor) -> Tensor:
        i = len(self.conv_out)
        h0 = self.conv_in[i] if self.conv_in else None
        out, final = module(x, self.mask, self.cu_seqlens, h0, self.want_state)
        if final is not None:
            self.conv_out.append(final)
        return out


class RecurrentMixer(nn.Module):
    """Base of the mixer layers. Subclasses set `hidden_size`, implement `state_shape()` and
    `_mix(x, step) -> (out, final_state)`, and list their convs in `conv_layers()`."""

    hidden_size: int

    def state_shape(self) -> Tuple[int, ...]:
        """Shape of one sequence's recurrent state (without the batch dim)."""
        raise NotImplementedError

    def conv_layers(self) -> List[ShortConvolution]:
        return []

    def _mix(self, x: Tensor, step: MixerStep) -> Tuple[Tensor, Optional[Tensor]]:
        raise NotImplementedError

    def allocate_cache(self, batch_size: int, device=None, dtype=None) -> LayerCache:
        """An empty (zero) cache for `batch_size` sequences; conv states in `dtype`
        (default: the layer's parameter dtype), the recurrent state in float32."""
        p = next(self.parameters())
        device = p.device if device is None else device
        dtype = p.dtype if dtype is None else dtype
        state = torch.zeros(batch_size, *self.state_shape(), device=device, dtype=torch.float32)
        convs = tuple(torch.zeros(batch_size, *c.state_shape(), device=device, dtype=dtype)
                      for c in self.conv_layers())
        return LayerCache(type(self).__name__, state, convs, 0)

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None,
                cu_seqlens: Optional[Tensor] = None, cache: Optional[LayerCache] = None,
                use_cache: bool = False) -> Tuple[Tensor, Optional[LayerCache]]:
        """hidden_states [B, T, hidden_size] -> (output [B, T, hidden_size], cache or None).

        attention_mask: [B, T] (or [B, seen + T] with a cache, HF style; its last T columns are
            used), 1/True for real tokens, 0/False for LEFT padding. Padded positions never
            change the state (their k/v/x, gates and conv inputs are zeroed); their outputs are 0.
        cu_seqlens: [N + 1] int32/int64 offsets packing N sequences along T (B must be 1); each
            sequence starts from its own state (row n of the cache) and ends in its own.
        cache: a LayerCache from an earlier call of this layer (batch N = B, or the number of
            packed sequences); the call continues from it.
        use_cache: return the updated cache (always done when a cache is passed in).
        """
        mask = self._check_inputs(hidden_states, attention_mask, cu_seqlens, cache)
        want = bool(use_cache) or cache is not None
        step = MixerStep(mask, cu_seqlens, cache, want)
        out, state = self._mix(hidden_states, step)
        if not want:
            return out, None
        seen = (0 if cache is None else cache.seen_tokens) + hidden_states.shape[1]
        return out, LayerCache(type(self).__name__, state, tuple(step.conv_out), seen)

    # -- checks -----------------------------------------------------------------------------
    def _check_inputs(self, x, attention_mask, cu_seqlens, cache) -> Optional[Tensor]:
        name = type(self).__name__
        V.check_float("hidden_states", x)
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"{name}: hidden_states must have shape [B, T, hidden_size] = "
                             f"[*, *, {self.hidden_size}], got {list(x.shape)}")
        B, T = x.shape[:2]
        if T < 1:
            raise ValueError(f"{name}: hidden_states has no tokens (T = 0)")
        if cu_seqlens is not None and attention_mask is not None:
            raise ValueError(f"{name}: pass either attention_mask (padded batch) or cu_seqlens "
                             f"(packed sequences), not both")
        N = V.check_cu_seqlens(cu_seqlens, B, T, x)
        if cache is not None:
            self._check_cache(cache, N, x)
        if attention_mask is None:
            return None
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"{name}: attention_mask must be a torch.Tensor, got "
                            f"{type(attention_mask).__name__}")
        seen = 0 if cache is None else cache.seen_tokens
        ok_len = (T,) if seen == 0 else (T, seen + T)
        if attention_mask.dim() != 2 or attention_mask.shape[0] != B or \
                attention_mask.shape[1] not in ok_len:
            want = " or ".join(f"[{B}, {t}]" for t in ok_len)
            raise ValueError(f"{name}: attention_mask must have shape [B, T] = {want} for "
                             f"hidden_states {list(x.shape)}, got {list(attention_mask.shape)}")
        if attention_mask.device != x.device:
            raise ValueError(f"{name}: attention_mask is on {attention_mask.device} but "
                             f"hidden_states is on {x.device}")
        mask = attention_mask[:, -T:] != 0
        # Only left padding keeps padding out of the carried state; refuse other masks rather
        # than return a silently wrong cache (values read where that costs no device sync).
        if V.may_read_values(mask) and bool((mask[:, 1:] < mask[:, :-1]).any()):
            raise ValueError(f"{name}: attention_mask must be left padding (each row zeros, "
                             f"then ones); got a row with a real token before a padded one")
        return mask

    def _check_cache(self, cache, N: int, x: Tensor) -> None:
        name = type(self).__name__
        if not isinstance(cache, LayerCache):
            raise TypeError(f"{name}: cache must be a layers.LayerCache, got "
                            f"{type(cache).__name__}")
        if cache.layer_type != name:
            raise ValueError(f"{name}: the cache was made by a {cache.layer_type} layer; a "
                             f"cache only fits the layer type that made it")
        if cache.batch_size != N:
            raise ValueError(f"{name}: the cache holds {cache.batch_size} sequences but the "
                             f"input has {N} (batch size, or packed sequences)")
        want = (N, *self.state_shape())
        if tuple(cache.recurrent_state.shape) != want:
            raise ValueError(f"{name}: cache.recurrent_state has shape "
                             f"{list(cache.recurrent_state.shape)}, this layer needs "
                             f"{list(want)} (a cache from a differently configured layer?)")
        convs = self.conv_layers()
        shapes = [list(c.shape) for c in cache.conv_states]
        wants = [[N, *c.state_shape()] for c in convs]
        if shapes != wants:
            raise ValueError(f"{name}: cache.conv_states have shapes {shapes}, this layer "
                             f"needs {wants}")
        for t in (cache.recurrent_state, *cache.conv_states):
            if t.device != x.device:
                raise ValueError(f"{name}: the cache is on {t.device} but hidden_states is on "
                                 f"{x.device}")

"""The per-layer decoding cache: recurrent state + short-conv states."""
from __future__ import annotations

from typing import Tuple

import torch

Tensor = torch.Tensor


class LayerCache:
    """What one mixer layer carries from one forward call to the next.

    Attributes:
        layer_type: class name of the layer that made it (a cache only fits that layer type).
        recurrent_state: float32 state, first dim = batch (or number of packed sequences), e.g.
            [N, H, K, V] for GLA / DeltaNet / Lightning, [N, d_inner, d_state] for Mamba,
            [N, nheads, headdim, d_state] for Mamba-2.
        conv_states: one [N, D, conv_size - 1] tensor per short convolution of the layer (the
            last conv_size - 1 inputs of each sequence), in the activations' dtype.
        seen_tokens: tokens consumed so far per row (padding included; for packed calls, the
            packed length). 0 marks a fresh (all-zero) cache; also lets HF-style [B, seen + T]
            attention masks through.

    A layer returns the updated cache from every call that was given one (or use_cache=True).
    Treat a cache passed in as consumed: one-token decode steps of Mamba / Mamba2 under no_grad
    update its recurrent_state in place (as mamba-ssm's inference cache does); keep a `clone()`
    to hold on to an old state.
    """

    def __init__(self, layer_type: str, recurrent_state: Tensor,
                 conv_states: Tuple[Tensor, ...] = (), seen_tokens: int = 0):
        self.layer_type = layer_type
        self.recurrent_state = recurrent_state
        self.conv_states = tuple(conv_states)
        self.seen_tokens = seen_tokens

    @property
    def batch_size(self) -> int:
        return self.recurrent_state.shape[0]

    def index_select(self, index: Tensor) -> "LayerCache":
        """A cache holding rows `index` (e.g. to reorder beams or drop finished sequences)."""
        return LayerCache(self.layer_type, self.recurrent_state.index_select(0, index),
                          tuple(c.index_select(0, index) for c in self.conv_states),
                          self.seen_tokens)

    def clone(self) -> "LayerCache":
        """A copy with its own tensors."""
        return LayerCache(self.layer_type, self.recurrent_state.clone(),
                          tuple(c.clone() for c in self.conv_states), self.seen_tokens)

    def detach(self) -> "LayerCache":
        """A cache cut from the autograd graph (truncated backprop through time)."""
        return LayerCache(self.layer_type, self.recurrent_state.detach(),
                          tuple(c.detach() for c in self.conv_states), self.seen_tokens)

    def __repr__(self) -> str:
        convs = ", ".join(str(list(c.shape)) for c in self.conv_states)
        return (f"LayerCache({self.layer_type}, state={list(self.recurrent_state.shape)}, "
                f"conv=[{convs}], seen_tokens={self.seen_tokens})")


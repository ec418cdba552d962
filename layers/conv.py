"""The short causal depthwise convolution every layer with a conv uses, and its cache handling.

One implementation for GLA / DeltaNet / Gated DeltaNet (q, k, v convs), Mamba (x conv) and
Mamba-2 (xBC conv), over the public `causal_conv1d_fn`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import lightning_ops as lo

from .utils import apply_mask, left_pad_lengths, repack, segment_ids, unpack_left

Tensor = torch.Tensor


def _swap_td(x: Tensor) -> Tensor:
    """[B, T, D] <-> [B, D, T], contiguous: to the channels-first layout causal-conv1d kernels
    take, and back to the layout the q/k/v and scan ops take. (Strided views here also break
    compiled backward graphs: the ops' fake gradients copy the input strides while the kernels
    return contiguous gradients.)"""
    return x.transpose(1, 2).contiguous()


class ShortConvolution(nn.Conv1d):
    """Depthwise causal conv over [B, T, D] inputs, `out[t] = act(bias + sum_i w[:, i] x[t-W+1+i])`.

    An `nn.Conv1d(D, D, W, groups=D)` underneath, so its weight is [D, 1, W] and its state dict and
    init (PyTorch's default) match fla's ShortConvolution and mamba-ssm's `conv1d`. States are
    [N, D, W], the last W inputs of each sequence (fla's and mamba-ssm's cache layout).

    Args:
        hidden_size: channels D.
        kernel_size: width W (2, 3 or 4, as causal-conv1d supports).
        bias: learn a bias.
        activation: None or 'silu' / 'swish', applied after the conv.
        backend: accepted for fla compatibility ('triton' / 'cuda'); the public ops dispatch.
    """

    def __init__(self, hidden_size: int, kernel_size: int = 4, bias: bool = False,
                 activation: Optional[str] = "silu", backend: Optional[str] = None,
                 device=None, dtype=None, **kwargs):
        if not 2 <= kernel_size <= 4:
            raise ValueError(f"conv kernel_size (conv_size / d_conv) must be 2, 3 or 4, "
                             f"got {kernel_size}")
        if activation not in (None, "silu", "swish"):
            raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
        if backend not in (None, "triton", "cuda"):
            raise ValueError(f"backend must be 'triton' or 'cuda' (fla's names), got {backend!r}")
        unknown = set(kwargs) - {"use_fast_conv1d"}
        if unknown:
            raise TypeError(f"ShortConvolution got unexpected arguments {sorted(unknown)}")
        super().__init__(hidden_size, hidden_size, kernel_size, groups=hidden_size,
                         padding=kernel_size - 1, bias=bias, device=device, dtype=dtype)
        self.hidden_size = hidden_size
        self.activation = activation

    @property
    def width(self) -> int:
        return self.kernel_size[0]

    def state_shape(self) -> Tuple[int, int]:
        """Shape of one sequence's conv state: [D, W]."""
        return (self.hidden_size, self.width)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None,
                cu_seqlens: Optional[Tensor] = None, initial_state: Optional[Tensor] = None,
                output_final_state: bool = False, seq_idx: Optional[Tensor] = None,
                cp_context=None) -> Tuple[Tensor, Optional[Tensor]]:
        """x [B, T, D] -> (out [B, T, D], final state [N, D, W] or None).

        mask [B, T] (bool, LEFT padding): padded inputs are zeroed, and an initial state is
        placed right before each row's first real token, so padding never enters the state.
        cu_seqlens [N + 1] (B == 1): packed sequences; no tap reaches across a boundary.
        initial_state [N, D, W]: the inputs before the first token (zeros if None).
        seq_idx [B, T] int32: mamba-ssm's segment ids (taps stop where the id changes); only
        without mask, cu_seqlens and states.
        cp_context: a `lightning_ops.cp.build_cp_context` context: x is this rank's slice of
        the sequence dim (of the packed tokens of the context's global cu_seqlens, or of every
        row when dense) and the W-1 inputs before it come from the previous ranks (one
        all-gather, `lightning_ops.cp.causal_conv1d_fn`); without the arguments above.
        """
        if cp_context is not None:
            if mask is not None or cu_seqlens is not None or initial_state is not None or \
                    output_final_state or seq_idx is not None:
                raise ValueError("ShortConvolution: with cp_context, pass no mask, cu_seqlens, "
                                 "seq_idx or states (the context carries the global "
                                 "cu_seqlens; each rank passes its slice of the tokens)")
            out = lo.cp.causal_conv1d_fn(_swap_td(x), self.weight[:, 0], self.bias,
                                         activation=self.activation, cp_context=cp_context)
            return _swap_td(out), None
        x = apply_mask(x, mask)
        if seq_idx is not None:
            if mask is not None or cu_seqlens is not None or initial_state is not None or \
                    output_final_state:
                raise ValueError("seq_idx cannot be combined with a mask, cu_seqlens or "
                                 "conv states")
            return self._conv(x, seq_idx), None
        if cu_seqlens is None:
            lengths = None if mask is None else left_pad_lengths(mask)
            return self._rows(x, lengths, initial_state, output_final_state)
        if initial_state is None and not output_final_state:
            # the common packed training case: one call, seq_idx stops taps at boundaries
            return self._conv(x, segment_ids(cu_seqlens, x.shape[1])[None]), None
        # per-sequence states: run the sequences as left-padded rows
        rows, row_mask, index = unpack_left(x, cu_seqlens)
        out, final = self._rows(rows, left_pad_lengths(row_mask), initial_state,
                                output_final_state)
        return repack(out, index), final

    def _conv(self, x: Tensor, seq_idx: Optional[Tensor] = None) -> Tensor:
        """The op on x [B, T, D] from zero history (taps stop where seq_idx changes)."""
        out = lo.causal_conv1d_fn(_swap_td(x), self.weight[:, 0], self.bias,
                                  activation=self.activation, seq_idx=seq_idx)
        return _swap_td(out)

    def _rows(self, x: Tensor, lengths: Optional[Tensor], initial_state: Optional[Tensor],
              output_final_state: bool) -> Tuple[Tensor, Optional[Tensor]]:
        """x [N, L, D] rows whose real tokens are the last `lengths` (all when None)."""
        W = self.width
        if initial_state is None and not output_final_state:
            return self._conv(x), None
        N, L, D = x.shape
        hist = x.new_zeros(N, D, W) if initial_state is None else initial_state.to(x.dtype)
        xc = x.transpose(1, 2)
        if lengths is None:
            ext = torch.cat([hist, xc], dim=2)                            # [N, D, W + L]
        else:
            # [zeros, history, tokens]: the W history columns sit right before each row's
            # first real token (the padded inputs under them are zero), then convolve from zero
            j = torch.arange(L + W, device=x.device)
            pos = j[None, :] - (L - lengths.to(j.dtype))[:, None]        # [N, L + W]
            valid = (pos >= 0) & (pos < W)
            placed = hist.gather(2, pos.clamp(0, W - 1)[:, None, :].expand(N, D, L + W))
            ext = F.pad(xc, (W, 0)) + placed * valid[:, None, :].to(x.dtype)
        out = lo.causal_conv1d_fn(ext.contiguous(), self.weight[:, 0], self.bias,
                                  activation=self.activation)
        final = ext[:, :, L:].contiguous() if output_final_state else None
        return _swap_td(out[:, :, W:]), final

    def extra_repr(self) -> str:
        return super().extra_repr() + f", activation={self.activation}"

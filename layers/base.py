"""What every mixer layer shares: the internal `mix` call (masks, packing, states, context
parallelism), input and state checks, and the two public forward contracts built on it: fla's
(GLA, DeltaNet, GatedDeltaNet, Lightning) and mamba-ssm's (Mamba, Mamba2)."""
from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

import lightning_ops as lo
from lightning_ops import validation as V

from .conv import ShortConvolution
from .utils import compute_dtype, gather_tokens, left_align

Tensor = torch.Tensor
State = Dict[str, Any]  # {'recurrent_state': Tensor, 'conv_state': tuple of Tensors or None}


class MixerStep:
    """One call's context handed to a layer's `_mix`: the (left-padding) mask, packing, the
    incoming states, whether final states are wanted, the context-parallel context. `conv` runs
    a ShortConvolution with its slot of the incoming conv states and collects the new conv
    states in order; `op` picks the public op a layer calls."""

    def __init__(self, mask: Optional[Tensor], cu_seqlens: Optional[Tensor],
                 state: Optional[State], want_state: bool, seq_idx: Optional[Tensor] = None,
                 cp_context=None):
        self.mask = mask
        self.cu_seqlens = cu_seqlens
        self.seq_idx = seq_idx
        self.cp_context = cp_context
        self.state = None if state is None else state.get("recurrent_state")
        self.conv_in = None if state is None else state.get("conv_state")
        # no incoming state: a fresh start from zeros (no history to carry)
        self.has_history = self.state is not None
        self.want_state = want_state
        self.conv_out: List[Tensor] = []

    def is_decode(self, length: int) -> bool:
        """A one-token continuation of dense rows from a cached state (a decode step)."""
        return self.has_history and length == 1 and self.cu_seqlens is None

    def op(self, layer: nn.Module, x: Tensor, chunk: str,
           recurrent: Optional[str] = None) -> Callable:
        """The lightning_ops function a layer calls, by name: with a context-parallel context,
        lightning_ops.cp's wrapper of the chunked op `chunk` with the context bound (the
        wrappers take the public ops' arguments); else the public `recurrent` op where fla's
        rule picks it (`use_recurrent`), or `chunk`."""
        if self.cp_context is not None:
            return functools.partial(getattr(lo.cp, chunk), cp_context=self.cp_context)
        if recurrent is not None and use_recurrent(layer, x):
            return getattr(lo, recurrent)
        return getattr(lo, chunk)

    def conv(self, module: ShortConvolution, x: Tensor) -> Tensor:
        i = len(self.conv_out)
        h0 = self.conv_in[i] if self.conv_in else None
        out, final = module(x, self.mask, self.cu_seqlens, h0, self.want_state, self.seq_idx,
                            self.cp_context)
        if final is not None:
            self.conv_out.append(final)
        return out


def check_mode(mode: str, fused_chunk: bool = False) -> str:
    """'chunk' or 'fused_recurrent' (and fla's 'fused_chunk' where fla has it: the chunked
    math, so it runs as 'chunk')."""
    if fused_chunk and mode == "fused_chunk":
        return "chunk"
    ok = ("chunk", "fused_recurrent") + (("fused_chunk",) if fused_chunk else ())
    if mode not in ok:
        raise ValueError(f"mode must be one of {ok}, got {mode!r}")
    return mode


def use_recurrent(layer: nn.Module, x: Tensor) -> bool:
    """fla's rule: short inputs outside training (decode steps) take the recurrent kernels."""
    return layer.mode == "fused_recurrent" or (not layer.training and x.shape[1] <= 64)


class RecurrentMixer(nn.Module):
    """Base of the mixer layers. Subclasses set `hidden_size`, implement `state_shape()` and
    `_mix(x, step) -> (out, final_state)`, and list their convs in `conv_layers()`.

    `mix` is the one internal entry point both public contracts (and `CausalLM`) call.
    Layers whose ops all have context-parallel wrappers in lightning_ops.cp set `supports_cp`
    and route their op calls through `MixerStep.op` / `MixerStep.conv`. The class that defines
    the `_mix` that runs must set it itself: a subclass with its own `_mix` (other ops) does not
    inherit it."""

    hidden_size: int
    supports_cp: bool = False

    def state_shape(self) -> Tuple[int, ...]:
        """Shape of one sequence's recurrent state (without the batch dim)."""
        raise NotImplementedError

    def conv_layers(self) -> List[ShortConvolution]:
        return []

    def _mix(self, x: Tensor, step: MixerStep) -> Tuple[Tensor, Optional[Tensor]]:
        raise NotImplementedError

    def mix(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None,
            cu_seqlens: Optional[Tensor] = None, state: Optional[State] = None,
            output_final_state: bool = False, seq_idx: Optional[Tensor] = None,
            cp_context=None) -> Tuple[Tensor, Optional[State]]:
        """hidden_states [B, T, hidden_size] -> (output [B, T, hidden_size], new state or None).

        attention_mask: [B, T] or [B, >= T] (HF style: its last T columns are used), 1 for real
            tokens, 0 for padding, in ANY arrangement (left, right, gaps). Each row's real tokens
            form one sequence, as fla's unpad -> varlen -> pad back: padding never touches the
            state, padded outputs are 0. (Done by moving each row's real tokens to its end, a
            fixed-shape gather: no host sync, traceable by torch.compile.)
        cu_seqlens: [N + 1] offsets packing N sequences along T (B must be 1).
        state: {'recurrent_state': [N, *state_shape()], 'conv_state': ([N, D, W], ...)}, the
            states to continue from (N = B, or the number of packed sequences); None: zeros.
        output_final_state: return the new state dict.
        seq_idx: [B, T] int32 segment ids (mamba-ssm's), Mamba-2 only, without the above.
        cp_context: a `lightning_ops.cp.build_cp_context(cu_seqlens, group)` context: context
            parallelism over its process group. hidden_states is this rank's contiguous slice
            of the sequence dim ([B, T_r, hidden_size] dense, every row one sequence through
            all ranks; or [1, T_r, hidden_size], the rank's tokens of the packed batch whose
            GLOBAL cu_seqlens the context holds); the output is the same slice of the
            single-process output, and backward gives this rank's share of every parameter
            gradient (sum them over the group, as DDP / FSDP do). Every rank of the group must
            make the same calls. Not with attention_mask, cu_seqlens, seq_idx or states.
        """
        mask = self._check_inputs(hidden_states, attention_mask, cu_seqlens, state)
        if cp_context is not None:
            self._check_cp(cp_context, hidden_states, attention_mask, cu_seqlens, state,
                           output_final_state, seq_idx)
        B, T = hidden_states.shape[:2]
        N = B if cu_seqlens is None else cu_seqlens.numel() - 1
        if B * T == 0:
            return self._empty(hidden_states, state, N, output_final_state)
        x, perm = hidden_states, None
        if mask is not None:
            perm, mask = left_align(mask)
            x = gather_tokens(x, perm)
        step = MixerStep(mask, cu_seqlens, state, output_final_state, seq_idx, cp_context)
        out, rec = self._mix(x, step)
        if perm is not None:
            out = gather_tokens(out, torch.argsort(perm, dim=1))
        if not output_final_state:
            return out, None
        return out, {"recurrent_state": rec,
                     "conv_state": tuple(step.conv_out) if self.conv_layers() else None}

    def _empty(self, x: Tensor, state: Optional[State], N: int, want: bool):
        """No tokens (B = 0 or T = 0): an empty output tied to the input and every parameter
        (backward gives zero gradients, as nn.Linear does on empty input); states pass through."""
        tie = sum(p.reshape(-1)[:0].sum() for p in self.parameters())
        out = x * 0 + tie.to(x.dtype)
        if not want:
            return out, None
        sd = compute_dtype(x)
        if state is not None and state.get("recurrent_state") is not None:
            rec = state["recurrent_state"]
        else:
            rec = x.new_zeros(N, *self.state_shape(), dtype=sd)
        convs = None
        if self.conv_layers():
            convs = state.get("conv_state") if state is not None else None
            if convs is None:
                convs = tuple(x.new_zeros(N, *c.state_shape()) for c in self.conv_layers())
        return out, {"recurrent_state": rec, "conv_state": convs}

    # -- checks -----------------------------------------------------------------------------
    def _check_cp(self, cp_context, x, attention_mask, cu_seqlens, state, output_final_state,
                  seq_idx) -> None:
        """What context parallelism takes (raised before any collective)."""
        name = type(self).__name__
        if not self._cp_supported():
            raise NotImplementedError(
                f"{name}: context parallelism (cp_context) is not supported by this layer "
                f"(lightning_ops.cp wraps the chunked GLA, delta-rule, SSD, log-linear and "
                f"causal-conv ops; layers taking cp_context: GatedLinearAttention, "
                f"LightningAttention, DeltaNet, GatedDeltaNet, KimiDeltaAttention, "
                f"HGRN2Attention, HedgehogAttention, Mamba2, LogLinearMamba2, "
                f"LogLinearGatedDeltaNet){self._cp_note()}")
        if not isinstance(cp_context, lo.cp.CPContext):
            raise TypeError(f"{name}: cp_context must come from "
                            f"lightning_ops.cp.build_cp_context, got {type(cp_context).__name__}")
        if attention_mask is not None:
            raise ValueError(f"{name}: attention_mask cannot be combined with cp_context: pack "
                             f"the sequences along T and pass their GLOBAL cu_seqlens to "
                             f"build_cp_context (each rank then passes its slice of the tokens)")
        if cu_seqlens is not None:
            raise ValueError(f"{name}: with cp_context, pass the GLOBAL cu_seqlens to "
                             f"build_cp_context, not cu_seqlens= to the layer (each rank passes "
                             f"its slice [1, T_r, hidden_size] of the packed tokens)")
        if seq_idx is not None:
            raise ValueError(f"{name}: seq_idx cannot be combined with cp_context (pass the "
                             f"sequence offsets to build_cp_context as cu_seqlens)")
        if state is not None or output_final_state:
            raise ValueError(f"{name}: cached states (past_key_values, use_cache, "
                             f"inference_params) are not supported with cp_context: context "
                             f"parallelism runs whole (long) sequences, for training and "
                             f"prefill; decode without it")
        if x.shape[0] * x.shape[1] == 0:
            raise ValueError(f"{name}: with cp_context every rank must hold tokens, got "
                             f"hidden_states of shape {list(x.shape)}")

    def _cp_note(self) -> str:
        return ""

    def _cp_supported(self) -> bool:
        """`supports_cp` as the class whose `_mix` runs declares it (see the class docstring)."""
        for cls in type(self).__mro__:
            if "_mix" in cls.__dict__:
                return bool(cls.__dict__.get("supports_cp", False))
        return False

    def _check_inputs(self, x, attention_mask, cu_seqlens, state) -> Optional[Tensor]:
        name = type(self).__name__
        V.check_float("hidden_states", x)
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"{name}: hidden_states must have shape [B, T, hidden_size] = "
                             f"[*, *, {self.hidden_size}], got {list(x.shape)}")
        B, T = x.shape[:2]
        if cu_seqlens is not None and attention_mask is not None:
            raise ValueError(f"{name}: pass either attention_mask (padded batch) or cu_seqlens "
                             f"(packed sequences), not both")
        N = V.check_cu_seqlens(cu_seqlens, B, T, x)
        if state is not None:
            self._check_state(state, N, x)
        if attention_mask is None:
            return None
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"{name}: attention_mask must be a torch.Tensor, got "
                            f"{type(attention_mask).__name__}")
        if attention_mask.dim() != 2 or attention_mask.shape[0] != B or \
                attention_mask.shape[1] < T:
            raise ValueError(f"{name}: attention_mask must have shape [B, T] = [{B}, {T}] (or "
                             f"[{B}, seen + {T}], HF style, its last {T} columns used) for "
                             f"hidden_states {list(x.shape)}, got {list(attention_mask.shape)} "
                             f"(a 0/1 padding mask, not an attention matrix)")
        if attention_mask.device != x.device:
            raise ValueError(f"{name}: attention_mask is on {attention_mask.device} but "
                             f"hidden_states is on {x.device}")
        return attention_mask[:, attention_mask.shape[1] - T:] != 0

    def _check_state(self, state, N: int, x: Tensor) -> None:
        name = type(self).__name__
        if not isinstance(state, dict):
            raise TypeError(f"{name}: a layer's cached state must be a dict with "
                            f"'recurrent_state' and 'conv_state', got {type(state).__name__}")
        rec = state.get("recurrent_state")
        if rec is None:
            return
        want = (N, *self.state_shape())
        if tuple(rec.shape[1:]) != want[1:]:
            raise ValueError(f"{name}: the cached recurrent_state has shape {list(rec.shape)}, "
                             f"this layer needs {list(want)} (a cache from a differently "
                             f"configured layer, or another layer's slot?)")
        if rec.shape[0] != N:
            raise ValueError(f"{name}: the cache holds {rec.shape[0]} sequences but the input "
                             f"has {N} (batch size, or packed sequences)")
        convs = self.conv_layers()
        got = state.get("conv_state")
        shapes = None if got is None else [list(c.shape) for c in got]
        wants = [[N, *c.state_shape()] for c in convs] if convs else None
        if shapes != wants:
            raise ValueError(f"{name}: the cached conv_state has shapes {shapes}, this layer "
                             f"needs {wants}")
        for t in (rec, *(got or ())):
            if t.device != x.device:
                raise ValueError(f"{name}: the cache is on {t.device} but hidden_states is on "
                                 f"{x.device}")


class HierarchyStateMixin:
    """The cache of the log-linear layers (LogLinearMamba2, LogLinearGatedDeltaNet): the
    recurrent state is the tuple (ht [N, *state_shape()], offsets [N] int64), a Fenwick
    hierarchy of states and each sequence's next position. Put before the mixer base class."""

    def _check_state(self, state, N: int, x: Tensor) -> None:
        rec = state.get("recurrent_state") if isinstance(state, dict) else None
        name = type(self).__name__
        if rec is not None:
            if isinstance(rec, Tensor) or not (isinstance(rec, (tuple, list)) and len(rec) == 2):
                raise TypeError(f"{name}: the cached recurrent_state must be the tuple (ht "
                                f"[N, {', '.join(map(str, self.state_shape()))}], offsets [N]) "
                                f"this layer returns (a log-linear state hierarchy), got "
                                f"{type(rec).__name__}")
            ht, off = rec
            if not isinstance(off, Tensor) or off.shape != (ht.shape[0],) or \
                    off.is_floating_point():
                raise ValueError(f"{name}: the cached offsets must be an integer tensor of "
                                 f"shape [{ht.shape[0]}], got {list(getattr(off, 'shape', []))}")
            if off.device != x.device:
                raise ValueError(f"{name}: the cache is on {off.device} but hidden_states is "
                                 f"on {x.device}")
            state = {"recurrent_state": ht, "conv_state": state.get("conv_state")}
        super()._check_state(state, N, x)

    def _empty(self, x: Tensor, state, N: int, want: bool):
        out, new = super()._empty(x, state, N, want)
        if new is not None and isinstance(new["recurrent_state"], Tensor):
            new["recurrent_state"] = (new["recurrent_state"],
                                      torch.zeros(N, dtype=torch.int64, device=x.device))
        return out, new

    @staticmethod
    def mask_as_packing(mask: Tensor, rec: Optional[Tuple[Tensor, Tensor]]):
        """A left-aligned padding mask [b, l] as packing of the flattened rows: row i is two
        packed sequences, its padding then its real tokens, so the real tokens start at their
        own offset (0, or the cache's) and get their own state (fixed shapes, no host sync).
        -> (cu_seqlens [2b + 1], the initial (ht, offsets) with a zero state before each row's,
        or None); the rows' final states are the odd entries ([1::2]) of the op's."""
        b, l = mask.shape
        real = mask.sum(1)
        ends = torch.arange(1, b + 1, device=mask.device) * l
        cu = torch.cat([torch.stack([ends - l, ends - real], 1).reshape(-1), ends[-1:]])
        if rec is None:
            return cu, None
        ht, off = rec
        return cu, (torch.stack([torch.zeros_like(ht), ht], 1).flatten(0, 1),
                    torch.stack([torch.zeros_like(off), off], 1).flatten(0, 1))

    @staticmethod
    def keep_padded_rows(mask: Optional[Tensor], new: Tuple[Tensor, Tensor],
                         old: Tuple[Tensor, Tensor]) -> Tuple[Tensor, Tensor]:
        """A one-token step: the rows whose token is padding (mask [b, 1]) keep their old
        (ht, offsets)."""
        if mask is None:
            return new
        (new_ht, new_off), (ht, off) = new, old
        keep = mask[:, 0]
        return (torch.where(keep[:, None, None, None, None], new_ht, ht.to(new_ht.dtype)),
                torch.where(keep, new_off, off))


def warn_ignored(name: str, kwargs: Dict[str, Any]) -> None:
    """fla's layers take **kwargs and drop unknown ones silently; we say so."""
    if kwargs:
        warnings.warn(f"{name}: ignoring unknown arguments {sorted(kwargs)}", stacklevel=3)


class FlaMixer(RecurrentMixer):
    """fla's layer contract (GLA, DeltaNet, GatedDeltaNet, Lightning)."""

    layer_idx: Optional[int]

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None,
                past_key_values=None, use_cache: Optional[bool] = False,
                output_attentions: Optional[bool] = False, **kwargs
                ) -> Tuple[Tensor, None, Any]:
        """hidden_states [B, T, hidden_size] -> (o [B, T, hidden_size], None, past_key_values).

        attention_mask: [B, T] 0/1 padding mask, any arrangement (or [B, seen + T]; the last T
            columns are used); padded outputs are 0 and padding never enters the state.
        past_key_values: an fla-style cache (`layers.Cache`, or fla's / HF's FLACache): the
            call continues from `past_key_values[layer_idx]` when that slot exists, and, with
            use_cache=True, stores its new states there (the cache is updated in place and
            returned). Needs `layer_idx`.
        use_cache: store the final states in past_key_values.
        output_attentions: accepted; linear attention has no attention weights (None).
        kwargs: `cu_seqlens` [N + 1] packs N sequences in a [1, T] batch (it takes precedence
            over attention_mask, as in fla); `cp_context` (from
            `lightning_ops.cp.build_cp_context`) runs the layer context-parallel: this rank's
            slice of the tokens in, the same slice of the output out (see `mix`; no mask, cache
            or cu_seqlens with it); other keys are ignored, as in fla.
        """
        cu_seqlens, cp_context = kwargs.get("cu_seqlens"), kwargs.get("cp_context")
        last = None
        if past_key_values is not None:
            if self.layer_idx is None:
                raise ValueError(f"{type(self).__name__} requires `layer_idx` when "
                                 f"`past_key_values` is provided")
            if len(past_key_values) > self.layer_idx:
                last = past_key_values[self.layer_idx]
        mask = attention_mask if cu_seqlens is None else None
        o, new = self.mix(hidden_states, mask, cu_seqlens, last, bool(use_cache),
                          cp_context=cp_context)
        if use_cache and past_key_values is not None:
            past_key_values.update(recurrent_state=new["recurrent_state"],
                                   conv_state=new["conv_state"], layer_idx=self.layer_idx,
                                   offset=hidden_states.shape[1])
        return o, None, past_key_values


def _write(dst: Tensor, src: Tensor) -> None:
    if src is not dst:
        dst.copy_(src)


class MambaMixer(RecurrentMixer):
    """mamba-ssm's contract (Mamba, Mamba2): `inference_params`, `step`,
    `allocate_inference_cache`. Subclasses set `d_inner_conv` (conv channels) and implement
    `_conv_layout(conv_state)` if their cache holds a transposed view."""

    layer_idx: Optional[int]

    def _run(self, u: Tensor, inference_params, attention_mask=None, cu_seqlens=None,
             seq_idx=None, cp_context=None) -> Tensor:
        if inference_params is None:
            return self.mix(u, attention_mask, cu_seqlens, None, False, seq_idx, cp_context)[0]
        if cp_context is not None:  # (the same error as mix's)
            self._check_cp(cp_context, u, attention_mask, cu_seqlens, inference_params, True,
                           seq_idx)
        if seq_idx is not None:
            raise ValueError(f"{type(self).__name__}: seq_idx cannot be combined with "
                             f"inference_params (use cu_seqlens for packed inference)")
        N = u.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
        conv_state, ssm_state = self._get_states_from_cache(inference_params, N)
        # seqlen_offset 0: a prefill from zero states (mamba-ssm overwrites the cache);
        # > 0: continue from the cached states (one token: mamba-ssm's step; more: chunked)
        cont = inference_params.seqlen_offset > 0
        state = {"recurrent_state": ssm_state, "conv_state": (conv_state,)} if cont else None
        out, new = self.mix(u, attention_mask, cu_seqlens, state, True)
        _write(ssm_state, new["recurrent_state"])
        _write(conv_state, new["conv_state"][0])
        return out

    def step(self, hidden_states: Tensor, conv_state: Tensor, ssm_state: Tensor):
        """One decode step (as mamba-ssm; any number of tokens works here): hidden_states
        [B, 1, d_model] -> (out [B, 1, d_model], conv_state, ssm_state), states updated in
        place."""
        out, new = self.mix(hidden_states, None, None,
                            {"recurrent_state": ssm_state, "conv_state": (conv_state,)}, True)
        _write(ssm_state, new["recurrent_state"])
        _write(conv_state, new["conv_state"][0])
        return out, conv_state, ssm_state

    def allocate_inference_cache(self, batch_size: int, max_seqlen: Optional[int] = None,
                                 dtype=None, **kwargs) -> Tuple[Tensor, Tensor]:
        """(conv_state [B, D, d_conv], ssm_state [B, *state_shape()]) of zeros, as mamba-ssm.
        The conv state is in `dtype` (default: the conv weight's); the SSM state is at least
        float32 (mamba-ssm uses the weight dtype; we keep states fp32 for 16-bit models)."""
        conv = self.conv_layers()[0]
        device = conv.weight.device
        conv_dtype = conv.weight.dtype if dtype is None else dtype
        ssm_dtype = torch.promote_types(conv_dtype, torch.float32)
        conv_state = self._conv_layout(torch.zeros(batch_size, *conv.state_shape(),
                                                   device=device, dtype=conv_dtype))
        ssm_state = torch.zeros(batch_size, *self.state_shape(), device=device, dtype=ssm_dtype)
        return conv_state, ssm_state

    def _conv_layout(self, conv_state: Tensor) -> Tensor:
        return conv_state

    def _get_states_from_cache(self, inference_params, batch_size: int,
                               initialize_states: bool = False) -> Tuple[Tensor, Tensor]:
        if self.layer_idx is None:
            raise ValueError(f"{type(self).__name__} requires `layer_idx` when "
                             f"`inference_params` is provided")
        memory = inference_params.key_value_memory_dict
        if self.layer_idx not in memory:
            memory[self.layer_idx] = self.allocate_inference_cache(batch_size, None)
        conv_state, ssm_state = memory[self.layer_idx]
        if initialize_states:
            conv_state.zero_()
            ssm_state.zero_()
        return conv_state, ssm_state

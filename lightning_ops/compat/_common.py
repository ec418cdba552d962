"""Torch glue shared by the compat wrappers: argument checks with the peers' messages, dtype
promotion, time reversal, and gather/scatter of state rows (continuous batching)."""
from __future__ import annotations

import warnings
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch

Tensor = torch.Tensor


class UnsupportedArgumentError(NotImplementedError):
    """An argument value the peer library accepts but lightning_ops cannot honour exactly."""


def unsupported(fn: str, arg: str, why: str) -> UnsupportedArgumentError:
    return UnsupportedArgumentError(f"lightning_ops.compat.{fn}: {arg} is not supported: {why}")


def take_kwargs(fn: str, kwargs: Dict, allowed: Iterable[str]) -> Dict:
    """The peer ops accept **kwargs. Known ones are returned; `head_first` is refused as fla
    refuses it; anything else raises TypeError naming it (fla would silently ignore a
    misspelt option; we never drop one silently)."""
    if "head_first" in kwargs:
        raise DeprecationWarning(
            "head_first has been removed. Inputs must be in `[B, T, H, ...]` format.")
    allowed = set(allowed)
    unknown = sorted(k for k in kwargs if k not in allowed)
    if unknown:
        raise TypeError(f"lightning_ops.compat.{fn} got unexpected keyword argument(s) "
                        f"{', '.join(repr(k) for k in unknown)}")
    return dict(kwargs)


def state_v_first_alias(fn: str, state_v_first: bool, kwargs: Dict) -> bool:
    """fla's deprecated `transpose_state_layout` is the old name of `state_v_first`."""
    if "transpose_state_layout" in kwargs:
        if state_v_first:
            raise ValueError("Cannot pass both `state_v_first` and the deprecated "
                             "`transpose_state_layout`.")
        warnings.warn("`transpose_state_layout` is deprecated and renamed to `state_v_first`.",
                      DeprecationWarning, stacklevel=3)
        return bool(kwargs.pop("transpose_state_layout"))
    return state_v_first


def check_bool(fn: str, name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"lightning_ops.compat.{fn}: {name} must be a bool, got {value!r}")
    return value


def check_chunk_size(fn: str, chunk_size, allowed: Optional[Tuple[int, ...]] = None,
                     suffix: str = "") -> None:
    """chunk_size is a tiling choice: the result does not depend on it, so a valid value is
    accepted and our own tiling is used. Invalid values raise as in fla."""
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive int, got {chunk_size!r}.")
    if allowed is not None and chunk_size not in allowed:
        # fla's wording where it has one (KDA: "must be either 32 or 64 for KDA")
        choices = (f"either {allowed[0]} or {allowed[1]}" if len(allowed) == 2 else
                   ", ".join(str(a) for a in allowed[:-1]) + f", or {allowed[-1]}")
        raise ValueError(f"`chunk_size` must be {choices}{suffix}, got {chunk_size}.")
    if chunk_size & (chunk_size - 1):
        raise ValueError(f"`chunk_size` must be a power of 2, got {chunk_size}.")


def promote(*xs: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
    """Cast q/k/v of mixed float dtypes to their common (wider) dtype: never less accurate
    than computing in the narrower one."""
    dts = [x.dtype for x in xs if x is not None]
    if not dts or all(d == dts[0] for d in dts):
        return xs
    dt = dts[0]
    for d in dts[1:]:
        dt = torch.promote_types(dt, d)
    return tuple(None if x is None else x.to(dt) for x in xs)


def transpose_state(state: Optional[Tensor], v_first: bool) -> Optional[Tensor]:
    """[N, H, V, K] <-> [N, H, K, V] (fla's state_v_first layout)."""
    if state is None or not v_first:
        return state
    return state.transpose(-1, -2)


def reverse_index(T: int, cu_seqlens: Optional[Tensor], device) -> Tensor:
    """Index that reverses time within each sequence (an involution). Built on the device
    from cu_seqlens, no host sync."""
    t = torch.arange(T, device=device)
    if cu_seqlens is None:
        return t.flip(0)
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    seg = torch.searchsorted(cu[1:], t, right=True).clamp_(max=cu.numel() - 2)
    return cu[seg] + cu[seg + 1] - 1 - t


def flip_time(x: Optional[Tensor], idx: Optional[Tensor]) -> Optional[Tensor]:
    if x is None or idx is None:
        return x
    return x.index_select(1, idx)


def _bcast(mask: Tensor, like: Tensor) -> Tensor:
    return mask.view(mask.shape[0], *([1] * (like.dim() - 1)))


def with_state_rows(pool: Tensor, indices: Tensor, step: Callable[[Tensor], Tensor]) -> Tensor:
    """Continuous batching: batch row b uses state row pool[indices[b]]; an index < 0 marks a
    padding row (its output is zero and no state is touched), as mamba-ssm / causal-conv1d.

    `step(rows)` updates the gathered rows in place and returns the output; the rows are then
    written back. Padding rows write back an identical copy of a real row (or of the unchanged
    row 0 when every row is padding), so the scatter is exact and needs no host sync."""
    if indices.dim() != 1:
        raise ValueError(f"state indices must have shape [batch], got {list(indices.shape)}")
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"state indices must be int32 or int64, got {indices.dtype}")
    idx = indices.to(device=pool.device, dtype=torch.long)
    valid = idx >= 0
    safe = idx.clamp(min=0)
    old = pool.index_select(0, safe)
    rows = old.clone()
    out = step(rows)
    n = idx.shape[0]
    if n:
        first = torch.argmax(valid.to(torch.int32))           # first real row, or 0
        src = torch.where(valid, torch.arange(n, device=idx.device), first)
        vals = torch.where(_bcast(valid[src], rows), rows[src], old[src])
        pool.index_copy_(0, safe[src], vals)
    return torch.where(_bcast(valid.to(out.device), out), out, torch.zeros((), dtype=out.dtype,
                                                                             device=out.device))


class NotServed:
    """A name a peer module exports that lightning_ops cannot honour (a GPU kernel object, a
    kernel-internal helper with the peer's private conventions). Importing it works, so a
    peer test file that imports it at the top still runs its other tests; calling it (or
    launching it, kernel[grid](...)) raises UnsupportedArgumentError naming it."""

    def __init__(self, module: str, name: str, why: str):
        self.__module__, self.__name__, self.__qualname__ = module, name, name
        self._why = why

    def _error(self) -> UnsupportedArgumentError:
        return UnsupportedArgumentError(f"{self.__module__}.{self.__name__} is not served by "
                                        f"lightning_ops.compat: {self._why}")

    def __call__(self, *args, **kwargs):
        raise self._error()

    def __getitem__(self, grid):
        raise self._error()

    def __repr__(self) -> str:
        return f"<not served: {self.__module__}.{self.__name__}>"

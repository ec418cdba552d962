"""Input checks shared by every public op: run before any compute, mutate nothing, and say which
tensor is wrong, what was expected and what was given. Only shapes, dtypes and devices are read,
so the checks are free and trace cleanly under torch.compile; value checks on cu_seqlens run
where they cost no device sync (CPU tensors), or everywhere with LIGHTNING_OPS_VALIDATE=1."""
from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple, Union

import torch

Tensor = torch.Tensor
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 256
Dim = Union[int, None]  # None: any size


def _fmt(shape) -> str:
    return "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"


def check_float(name: str, x: Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")


def check_shape(name: str, x: Tensor, expected: Sequence[Dim], layout: str) -> None:
    """expected: sizes, None for free dims; layout: the dim names, e.g. '[B, T, H, K]'."""
    ok = x.dim() == len(expected) and all(e is None or e == s for e, s in zip(expected, x.shape))
    if not ok:
        raise ValueError(f"{name} must have shape {layout} = {_fmt(expected)}, "
                         f"got {list(x.shape)}")


def check_tensor(name: str, x: Optional[Tensor], expected: Sequence[Dim], layout: str,
                 ref: Optional[Tensor] = None, same_dtype: bool = False) -> None:
    """Float tensor of the expected shape, on ref's device (and of ref's dtype if same_dtype)."""
    if x is None:
        return
    check_float(name, x)
    check_shape(name, x, expected, layout)
    if ref is not None:
        if x.device != ref.device:
            raise ValueError(f"{name} is on {x.device} but the inputs are on {ref.device}; "
                             f"all tensors must be on one device")
        if same_dtype and x.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but q has {ref.dtype}; "
                            f"q, k and v must share one dtype")


def check_head_dim(name: str, size: int) -> None:
    if size > MAX_HEAD_DIM:
        raise ValueError(f"{name} head dim is {size}, over the supported maximum of "
                         f"{MAX_HEAD_DIM}")
    if size < 1:
        raise ValueError(f"{name} head dim must be at least 1, got {size}")


def check_cu_seqlens(cu_seqlens: Optional[Tensor], B: int, T: int, ref: Tensor) -> int:
    """Validate packed-sequence offsets; returns the number of sequences N (B if unpacked)."""
    if cu_seqlens is None:
        return B
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must have shape [N + 1] with N >= 1, "
                         f"got {list(cu_seqlens.shape)}")
    if B != 1:
        raise ValueError(f"with cu_seqlens the batch size must be 1 (sequences are packed "
                         f"along T), got B={B}")
    if cu_seqlens.device != ref.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but the inputs are on "
                         f"{ref.device}; all tensors must be on one device")
    if may_read_values(cu_seqlens):
        c = cu_seqlens.tolist()
        if c[0] != 0 or c[-1] != T or any(b < a for a, b in zip(c, c[1:])):
            raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at "
                             f"T={T}, got {c if len(c) <= 16 else c[:8] + ['...'] + c[-4:]}")
    return cu_seqlens.numel() - 1


def may_read_values(x: Tensor) -> bool:
    """Whether reading x's values is free (no device sync) and traceable, or asked for."""
    if torch.compiler.is_compiling():
        return False
    return x.device.type == "cpu" or os.environ.get("LIGHTNING_OPS_VALIDATE") == "1"


def check_state(name: str, state: Optional[Tensor], expected: Sequence[int], layout: str,
                ref: Tensor) -> None:
    if state is None:
        return
    check_tensor(name, state, expected, layout, ref)


def check_flag(name: str, value, kind=bool) -> None:
    if not isinstance(value, kind):
        raise TypeError(f"{name} must be a {kind.__name__}, got {type(value).__name__}")


def check_scale(scale) -> None:
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python float or None, got {type(scale).__name__}")


def check_power_of_two(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1 or value & (value - 1):
        raise ValueError(f"{name} must be a positive power of two, got {value!r}")


def qkv_dims(q: Tensor, k: Tensor, v: Tensor, v_heads_multiple: bool = False
             ) -> Tuple[int, int, int, int, int]:
    """Check q [B,T,H,K], k like q, v [B,T,HV,V] (HV == H, or a multiple of H when allowed).
    Returns B, T, H, K, V."""
    check_float("q", q)
    if q.dim() != 4:
        raise ValueError(f"q must have shape [B, T, H, K] (4 dims), got {list(q.shape)}")
    B, T, H, K = q.shape
    check_tensor("k", k, (B, T, H, K), "[B, T, H, K]", q, same_dtype=True)
    check_float("v", v)
    if v.dim() != 4 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"v must have shape [B, T, H, V] = [{B}, {T}, {H}, *], "
                         f"got {list(v.shape)}")
    HV = v.shape[2]
    if HV != H and not (v_heads_multiple and HV % H == 0):
        need = f"a multiple of q's {H}" if v_heads_multiple else f"q's {H}"
        raise ValueError(f"v must have shape [B, T, H, V] with H = {need}, got {list(v.shape)}")
    check_tensor("v", v, (B, T, HV, None), "[B, T, H, V]", q, same_dtype=True)
    check_head_dim("q/k (K)", K)
    check_head_dim("v (V)", v.shape[3])
    return B, T, H, K, v.shape[3]

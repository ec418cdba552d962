"""Input checks shared by every public op: run before any compute, mutate nothing, and say which
tensor is wrong, what was expected and what was given. Only shapes, dtypes and devices are read,
so the checks are free and trace cleanly under torch.compile; value checks on cu_seqlens run
where they cost no device sync (CPU tensors), or everywhere with LIGHTNING_OPS_VALIDATE=1.
Under torch.compile the wrappers run on fake tensors, so the value checks are repeated inside
the custom-op bodies (`check_cu_seqlens_values`), which run on real tensors in compiled graphs
too: a compiled call rejects what eager rejects, with the same error."""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence, Tuple, Union

import torch

Tensor = torch.Tensor
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The supported head-dim maxima, the one place they are set: key/query (and SSM state) head dim K
# of the delta rule, KDA and the scans (the WY inverse and the scans hold whole-K tiles), value
# head dim V (only a tiling loop in the kernels, as in fla), and gated linear attention's K (a
# tiling loop there too: fla's own tests run chunk_gla at K = 320 and 512).
MAX_KEY_DIM = 256
MAX_VALUE_DIM = 512
MAX_GLA_KEY_DIM = 512
MAX_HEAD_DIM = MAX_KEY_DIM  # older name (key dims)
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
    if x.shape == expected:  # the common call, cheaply (decode steps validate every token)
        return
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


def check_head_dim(name: str, size: int, maximum: int = MAX_KEY_DIM) -> None:
    """maximum: MAX_KEY_DIM for key/query/state dims, MAX_VALUE_DIM for value dims."""
    if size > maximum:
        raise ValueError(f"{name} head dim is {size}, over the supported maximum of "
                         f"{maximum}")
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
    check_cu_seqlens_values(cu_seqlens, T)
    return cu_seqlens.numel() - 1


def check_cu_seqlens_values(cu_seqlens: Optional[Tensor], T: int) -> None:
    """The value checks of cu_seqlens (start 0, non-decreasing, end T), where reading values is
    free or asked for. Called by the wrappers (eager) and again inside the custom-op bodies,
    which run on real tensors under torch.compile too (the wrappers then see fake tensors)."""
    if cu_seqlens is None or not may_read_values(cu_seqlens):
        return
    c = cu_seqlens.tolist()
    if c[0] != 0 or c[-1] != T or any(b < a for a, b in zip(c, c[1:])):
        raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at "
                         f"T={T}, got {c if len(c) <= 16 else c[:8] + ['...'] + c[-4:]}")


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


def is_finite(x) -> bool:
    """math.isfinite for Python numbers that also traces under torch.compile(dynamic=True),
    where a float option may arrive as a symbolic float (math.isfinite/isnan cannot take it)."""
    return -math.inf < x < math.inf


def is_nan(x) -> bool:
    """math.isnan, traceable like is_finite."""
    return x != x


def check_scale(scale) -> None:
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python float or None, got {type(scale).__name__}"
                        + (f" {scale!r}" if isinstance(scale, bool) else ""))
    if not is_finite(scale):
        raise ValueError(f"scale must be a finite float, got {scale!r}")


def check_power_of_two(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1 or value & (value - 1):
        raise ValueError(f"{name} must be a positive power of two, got {value!r}")


def _odd_one_out(sizes: Sequence[int]) -> Optional[int]:
    """Index of the one size that differs from two agreeing others, else None."""
    a, b, c = sizes
    if a != b and b == c:
        return 0
    if b != a and a == c:
        return 1
    if c != a and a == b:
        return 2
    return None


def qkv_dims(q: Tensor, k: Tensor, v: Tensor, v_heads_multiple: bool = False,
             max_key: int = MAX_KEY_DIM) -> Tuple[int, int, int, int, int]:
    """Check q [B,T,H,K], k like q, v [B,T,HV,V] (HV == H, or a multiple of H when allowed),
    K <= max_key, V <= MAX_VALUE_DIM.
    Returns B, T, H, K, V. A mismatch blames the odd one out of q, k and v (q too: its shape is
    not taken as the truth when k and v agree against it), and shows the shapes compared."""
    for name, x, layout in (("q", q, "[B, T, H, K]"), ("k", k, "[B, T, H, K]"),
                            ("v", v, "[B, T, H, V]")):
        check_float(name, x)
        if x.dim() != 4:
            raise ValueError(f"{name} must have shape {layout} (4 dims), got {list(x.shape)}")
    names, xs = ("q", "k", "v"), (q, k, v)
    _check_same(names, xs, "device", lambda n, x, ref, rn: ValueError(
        f"{n} is on {x.device} but the inputs are on {ref.device}; "
        f"all tensors must be on one device"))
    _check_same(names, xs, "dtype", lambda n, x, ref, rn: TypeError(
        f"{n} has dtype {x.dtype} but {rn} has {ref.dtype}; q, k and v must share one dtype"))
    shapes = _Shapes(names, xs)  # read by error messages only
    for i, dim in ((0, "batch size B"), (1, "sequence length T")):
        sizes = [x.shape[i] for x in xs]
        if not sizes[0] == sizes[1] == sizes[2]:  # no set(): sizes may be symbolic
            odd = _odd_one_out(sizes)
            bad = names[odd] if odd is not None else "k" if sizes[1] != sizes[0] else "v"
            good = [n for n in names if n != bad and (odd is not None or n == "q")]
            want = [x for n, x in zip(names, sizes) if n == good[0]][0]
            raise ValueError(
                f"{bad} has {dim} {sizes[names.index(bad)]} but "
                f"{' and '.join(good)} {'have' if len(good) > 1 else 'has'} {want}: "
                f"{bad} must have shape {'[B, T, H, V]' if bad == 'v' else '[B, T, H, K]'}"
                f" with {dim.split()[-1]} = {want}, got {shapes[bad]} "
                f"({', '.join(f'{n} {shapes[n]}' for n in good)})")
    B, T, H, K = q.shape
    HV = v.shape[2]
    if k.shape[2] != H:
        # v arbitrates between q and k when it can: its heads must match (or be a multiple of)
        # the heads of the right one
        def fits(h):
            return HV == h or (v_heads_multiple and h > 0 and HV % h == 0)
        bad = "q" if fits(k.shape[2]) and not fits(H) else "k"
        good = "k" if bad == "q" else "q"
        raise ValueError(f"{bad} has {shapes[bad][2]} heads but {good} has "
                         f"{shapes[good][2]}: {bad} must have shape [B, T, H, K] = "
                         f"{_fmt(shapes[good])}, got {shapes[bad]} (v {shapes['v']})")
    check_shape("k", k, (B, T, H, K), "[B, T, H, K]")
    if HV != H and not (v_heads_multiple and H > 0 and HV % H == 0):
        need = f"a multiple of q's {H}" if v_heads_multiple else f"q's {H}"
        raise ValueError(f"v must have shape [B, T, H, V] with H = {need}, got {list(v.shape)}")
    check_head_dim("q/k (K)", K, max_key)
    check_head_dim("v (V)", v.shape[3], MAX_VALUE_DIM)
    return B, T, H, K, v.shape[3]


class _Shapes:
    """name -> list(shape), formed when an error message asks (not on every call)."""
    def __init__(self, names, xs):
        self._by_name = dict(zip(names, xs))

    def __getitem__(self, name):
        return list(self._by_name[name].shape)


def _check_same(names, xs, attr: str, error) -> None:
    """q, k and v agree on attr; else blame the odd one out (q unless k and v disagree)."""
    vals = [getattr(x, attr) for x in xs]
    if vals[0] == vals[1] == vals[2]:
        return
    odd = _odd_one_out(vals)
    bad = odd if odd is not None else (1 if vals[1] != vals[0] else 2)
    ref = 1 if bad == 0 else 0
    raise error(names[bad], xs[bad], xs[ref], names[ref])


def check_inplace(name: str, t: Tensor) -> None:
    """t is updated in place (a decode state): each element must have its own memory, and the
    memory must be writable here. Raised before anything is written."""
    shared = any(st == 0 and sz > 1 for st, sz in zip(t.stride(), t.shape))
    if not shared and not torch.compiler.is_compiling():
        shared = torch._debug_has_internal_overlap(t) == 1  # overlapping as_strided views
    if shared:
        raise ValueError(
            f"{name} is updated in place, but several of its elements share memory (shape "
            f"{list(t.shape)}, strides {list(t.stride())}: an expanded or stride-0 view?). Pass "
            f"a tensor that owns its memory, e.g. {name} = {name}.contiguous(), and keep using "
            f"that tensor")
    if not torch.compiler.is_compiling() and t.is_inference() and \
            not torch.is_inference_mode_enabled():
        raise ValueError(
            f"{name} is updated in place, but it is an inference tensor (made under "
            f"torch.inference_mode()), which cannot be written outside inference mode: call "
            f"inside torch.inference_mode(), or pass {name}.clone()")


def check_reference_dims(ref_name: str, ref: Tensor, layout: str,
                         dims: Sequence[Tuple[int, str, Sequence[Tuple[str, Optional[Tensor],
                                                                       int, int]]]]) -> None:
    """The first tensor of an op (x, u) sets the sizes the others are checked against; when it
    is the wrong one, blame it rather than the next tensor checked. dims: (index in ref, label,
    [(name, tensor, its rank, the index of that size in it)]). If at least two of those tensors
    (of the right rank) agree on a size that ref does not have, ref is the odd one out."""
    for i, label, others in dims:
        seen = [(n, t) for n, t, rank, _ in others
                if isinstance(t, torch.Tensor) and t.dim() == rank]
        vals = [t.shape[j] for (n, t, rank, j) in others
                if isinstance(t, torch.Tensor) and t.dim() == rank]
        if len(vals) < 2 or not all(v == vals[0] for v in vals) or vals[0] == ref.shape[i]:
            continue
        names = ", ".join(n for n, _ in seen[:-1]) + f" and {seen[-1][0]}"
        raise ValueError(
            f"{ref_name} has {label} {ref.shape[i]} but {names} have {vals[0]}: {ref_name} must "
            f"have shape {layout} with {label.split()[-1]} = {vals[0]}, got {list(ref.shape)} "
            f"({', '.join(f'{n} {list(t.shape)}' for n, t in seen)})")

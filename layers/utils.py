"""Small helpers shared by the layers: masks, packed-sequence (un)packing, heads, parameter
init and the Mamba-style dt / decay gate math."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

Tensor = torch.Tensor


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the layers compute norms, gates and activations in: at least float32 (16-bit
    inputs are upcast), float64 stays float64."""
    return torch.promote_types(x.dtype, torch.float32)


def left_align(mask: Tensor) -> Tuple[Tensor, Tensor]:
    """Any 0/1 padding mask [B, T] (bool) -> (perm [B, T], left-padded mask [B, T]): gathering a
    row's tokens at `perm` moves its padding to the front and keeps its real tokens in order at
    the end. Fixed shapes, no host sync, so it traces under torch.compile; the result equals
    fla's unpad -> varlen -> pad back (each row's real tokens form one sequence)."""
    sorted_mask, perm = torch.sort(mask.to(torch.uint8), dim=1, stable=True)
    return perm, sorted_mask.bool()


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """x [B, T, ...] -> x[b, index[b, t], ...]."""
    idx = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:])
    return x.gather(1, idx)


def apply_mask(x: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Zero x [B, T, ...] where mask [B, T] (bool) is False; x unchanged when mask is None."""
    if mask is None:
        return x
    # where, not a product: a non-finite padded value must not leak (NaN * 0 = NaN)
    return torch.where(mask.view(*mask.shape, *([1] * (x.dim() - 2))), x, x.new_zeros(()))


def segment_ids(cu_seqlens: Tensor, T: int) -> Tensor:
    """[T] int32: the index of the packed sequence each token belongs to (no host sync)."""
    t = torch.arange(T, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), t, right=True).to(torch.int32)


def unpack_left(x: Tensor, cu_seqlens: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Packed x [1, T, ...] -> left-padded rows [N, L, ...] (L = longest sequence, zeros before
    each row's tokens), their mask [N, L] and the index that `repack` needs. Reads the longest
    length on the host (the only host sync in the layers, on packed paths that need rows)."""
    cu = cu_seqlens.to(torch.int64)
    T = x.shape[1]
    lens = cu[1:] - cu[:-1]
    L = max(int(lens.max()), 1)
    j = torch.arange(L, device=x.device)
    src = cu[1:, None] - L + j                      # token index of row n, column j
    mask = src >= cu[:-1, None]
    rows = apply_mask(x[0][src.clamp_min(0)], mask)
    t = torch.arange(T, device=x.device)
    seg = segment_ids(cu, T).to(torch.int64)
    index = seg * L + (L - (cu[1:][seg] - t))       # flat row position of token t
    return rows, mask, index


def repack(rows: Tensor, index: Tensor) -> Tensor:
    """Inverse of unpack_left: rows [N, L, ...] -> packed [1, T, ...]."""
    return rows.reshape(-1, *rows.shape[2:])[index][None]


def left_pad_lengths(mask: Tensor) -> Tensor:
    """Number of real tokens per row of a left-padded mask [B, T] (they are the last ones)."""
    return mask.sum(-1)


def reuse_decode_state(mask: Optional[Tensor]) -> bool:
    """May a decode step write its cached state over the old one? Only when nothing needs the
    old state afterwards: no padding rows to restore from it (keep_padded_rows) and no autograd
    graph through it."""
    return mask is None and not torch.is_grad_enabled()


def split_heads(x: Tensor, n: int) -> Tensor:
    """[..., n * d] -> [..., n, d]."""
    return x.view(*x.shape[:-1], n, x.shape[-1] // n)


def kv_heads(x: Tensor, d: int, groups: int) -> Tensor:
    """[..., kv_heads * d] -> [..., kv_heads * groups, d]: each key/value head repeated for the
    `groups` query heads that share it (grouped-query layout)."""
    x = split_heads(x, x.shape[-1] // d)
    return x.repeat_interleave(groups, dim=-2) if groups > 1 else x


def kv_groups(num_heads: int, num_kv_heads: Optional[int]) -> Tuple[int, int]:
    """(num_kv_heads, query heads per kv head); num_kv_heads defaults to num_heads and must
    divide it."""
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads {num_kv_heads} must divide num_heads {num_heads}")
    return num_kv_heads, num_heads // num_kv_heads


def head_dims(hidden_size: int, num_heads: int, expand_k: float,
              expand_v: float) -> Tuple[int, int]:
    """(key_dim, value_dim) = hidden_size * (expand_k, expand_v), each divisible by num_heads."""
    key_dim, value_dim = int(hidden_size * expand_k), int(hidden_size * expand_v)
    if key_dim % num_heads or value_dim % num_heads:
        raise ValueError(f"key_dim {key_dim} (hidden_size * expand_k) and value_dim {value_dim} "
                         f"(hidden_size * expand_v) must be divisible by num_heads {num_heads}")
    return key_dim, value_dim


def init_linear(module: nn.Module) -> None:
    """fla's init of linear-attention layers: Xavier uniform with gain 2^-2.5, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight, gain=2 ** -2.5)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def no_weight_decay(*params: nn.Parameter) -> None:
    """Mark parameters (A_log, dt_bias, D, ...) for optimizers that skip their weight decay."""
    for p in params:
        p._no_weight_decay = True


NO_DT_LIMIT = (0.0, float("inf"))


def softplus_dt(dt: Tensor, dt_bias: Tensor, dtype: torch.dtype,
                dt_limit: Sequence[float] = NO_DT_LIMIT) -> Tensor:
    """Mamba's step size in `dtype`: softplus(dt + dt_bias), clamped to dt_limit (when it is not
    the default (0, inf), as mamba-ssm)."""
    dt = F.softplus(dt.to(dtype) + dt_bias.to(dtype))
    if tuple(dt_limit) != NO_DT_LIMIT:
        dt = dt.clamp(*dt_limit)
    return dt


def split_xbc(xBC: Tensor, heads: int, head_dim: int, groups: int,
              d_state: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Mamba-2's conv output xBC [b, l, heads * head_dim + 2 * groups * d_state] -> x [b, l,
    heads, head_dim], B and C [b, l, groups, d_state]."""
    b, l = xBC.shape[:2]
    x, B, C = xBC.split([heads * head_dim, groups * d_state, groups * d_state], dim=-1)
    return (x.reshape(b, l, heads, head_dim), B.reshape(b, l, groups, d_state),
            C.reshape(b, l, groups, d_state))


def decay_rate(A_log: Tensor, dtype: torch.dtype) -> Tensor:
    """A = -exp(A_log) in `dtype` (the SSM / gated-delta decay rate, stored as its log)."""
    return -A_log.to(dtype).exp()


def decay_gate(A_log: Tensor, a: Tensor, dt_bias: Tensor, dtype: torch.dtype) -> Tensor:
    """The Mamba-2 style log decay of Gated DeltaNet / KDA / MoM, in `dtype`:
    g = -exp(A_log) * softplus(a + dt_bias) (<= 0), broadcast over A_log's and a's shapes."""
    return decay_rate(A_log, dtype) * softplus_dt(a, dt_bias, dtype)


def inv_softplus(x: Tensor) -> Tensor:
    """softplus^{-1}(x) = x + log(-expm1(-x)), stable for small and large x > 0."""
    return x + torch.log(-torch.expm1(-x))


def init_dt_bias(n: int, dt_min: float = 1e-3, dt_max: float = 1e-1, dt_init_floor: float = 1e-4,
                 device=None) -> Tensor:
    """Mamba's dt bias: dt log-uniform in [dt_min, dt_max] (floored), stored as the inverse
    softplus so that softplus(dt_bias) = dt at init. Float32."""
    if not 0 < dt_min <= dt_max:
        raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
    u = torch.rand(n, device=device, dtype=torch.float32)
    dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    return inv_softplus(dt.clamp(min=dt_init_floor))


def _sqrelu(x: Tensor) -> Tensor:
    return F.relu(x).square()


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


def activation_fn(name: Optional[str]):
    """An activation by fla's ACT2FN name: 'swish'/'silu', 'sigmoid', 'logsigmoid', 'relu',
    'sqrelu', 'gelu' (tanh approximation, as fla's fast gelu), 'elu', 'identity'/None."""
    table = {"swish": F.silu, "silu": F.silu, "sigmoid": torch.sigmoid,
             "logsigmoid": F.logsigmoid, "relu": F.relu, "sqrelu": _sqrelu,
             "gelu": _gelu_tanh, "elu": F.elu, "identity": None, None: None}
    if name not in table:
        raise ValueError(f"unknown activation {name!r}; choose one of "
                         f"{sorted(k for k in table if k)}")
    fn = table[name]
    return (lambda x: x) if fn is None else fn

"""Generic Triton helpers shared by the kernel families: launch-side chunk tables for packed
sequences (built on the device, no host sync), dtype plumbing for tl.dot, and @triton.jit helpers
for sequence and chunk bounds (token offsets in int64).

Interpreter note: every call of a @triton.jit helper re-patches triton.language (~1 ms under
TRITON_INTERPRET=1), so hot loops should inline small helpers such as pointer arithmetic."""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .chunk.constants import K_BLOCK  # noqa: F401  (the K block of rule 1)

Tensor = torch.Tensor


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def next_pow2(n: int, minimum: int = 16) -> int:
    """Block size for a (possibly non-power-of-two) dim; at least 16, the smallest tl.dot side."""
    return max(minimum, triton.next_power_of_2(n))


# ---------------------------------------------------------------------------------------------
# Launch rules for sm_90 (H100 / H200): stated here, applied by every launcher, checked ahead of
# time by tools/sm90_resources.py (compiles every recorded launch config for sm_90, under the
# CI's triton and the GPU machines' 3.6; table in benchmarks/results/sm90_resources.csv).
#  1. Shared memory per block <= SM90_SHARED_LIMIT at every supported head dim (K <= 256,
#     V <= 512) and dtype: tiles over V in blocks of at most 64 columns (BV), K blocks of at most
#     K_BLOCK (64) where the kernel loops over K (the WY inverse and WY backward do, so they
#     never hold a [64, K] tile whole); kernels that hold the full K (the state walks) take
#     smaller V blocks as K grows (see the family launchers' *_bv helpers) and fewer pipeline
#     stages (full_k_stages).
#  2. Grids: axis x may be large (2^31 - 1), axes y and z <= GRID_YZ_MAX. Per-(sequence, head)
#     axes of decode kernels and chunk axes go where they cannot pass it, or the launch is split
#     (grid_splits).
#  3. Partial-sum buffers (per-block partials reduced by torch, deterministic) are bounded:
#     at most PARTIAL_MAX_BYTES, the block count shrinking first (see ssm/triton.py).
#  4. num_warps: 8 once a program holds >= 128 x 64 fp32 of state tile, else 4; num_stages
#     left at Triton's default (3) unless the table shows the default does not fit: a loop
#     whose body loads [64, K] tiles with the full K buffers them once per stage, so such loops
#     take full_k_stages(K) (3 up to K = 64, 2 up to 128, 1 above; fp32 tiles count double
#     where the table showed it needed: the walk backward).
# ---------------------------------------------------------------------------------------------
SM90_SHARED_LIMIT = 232448       # bytes of shared memory one block may use on sm_90 (227 KB)
GRID_YZ_MAX = 65535              # CUDA limit on grid axes y and z
PARTIAL_MAX_BYTES = 256 << 20    # cap on a launcher's scratch of per-block partial sums


def full_k_stages(K: int, itemsize: int = 2) -> int:
    """num_stages of a kernel whose pipelined loop loads [64, K] tiles with the whole K (rule 4):
    each stage buffers them, so at K = 256 the default 3 stages need 245-546 KB of shared
    memory (sm_90 has 227 KB); 2 stages at K = 128 (fp16 walk backward: 250 -> 181 KB),
    1 above. itemsize: bytes per tile element; 4-byte (fp32) tiles count as twice the K (the
    fp32 walk backward under triton 3.6: 295 KB at K = 64 with 3 stages, 279-328 KB at
    K = 128 with 2)."""
    k = next_pow2(K) * max(1, itemsize // 2)
    return 3 if k <= 64 else 2 if k <= 128 else 1

_PRETEND_SMS: list = []          # set by pretend_gpu(): launch rules choose as on that GPU


@contextlib.contextmanager
def pretend_gpu(sms: int = 132):
    """Launchers choose their configurations as on an sm_90 GPU with `sms` multiprocessors
    (an H100 SXM has 132), whatever the tensors' device: for recording launch configurations
    on CPU (tools/sm90_resources.py). Not for running kernels."""
    _PRETEND_SMS.append(sms)
    try:
        yield
    finally:
        _PRETEND_SMS.pop()


def on_gpu(device: torch.device) -> bool:
    """Whether launch rules for a GPU apply (CUDA tensors, or inside pretend_gpu())."""
    return device.type == "cuda" or bool(_PRETEND_SMS)


def check_grid_yz(n: int, what: str) -> None:
    """Refuse, before any launch, a count that would go on grid axis y or z past GRID_YZ_MAX
    (CUDA would fail the launch with an unhelpful error)."""
    if n > GRID_YZ_MAX:
        raise ValueError(f"{what} = {n} is over the {GRID_YZ_MAX} programs a CUDA grid axis y/z "
                         f"can hold in one launch: split the batch (or the packed sequence)")


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 off-GPU, e.g. under the interpreter)."""
    if _PRETEND_SMS:
        return _PRETEND_SMS[-1]
    if device.type != "cuda":
        return 1
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def exact_precision() -> str:
    """input_precision of the products that must be fp32-accurate (fp32 inputs, the WY inverse,
    dg's prefix sums): 3xTF32 on the GPU, each fp32 operand split into two tf32 halves
    (relative error ~2^-22, on tensor cores). Exact 'ieee' products lower to FMA loops at 32
    registers that spilled 13-48 KB per thread at sm_90 (benchmarks/results/sm90_resources.csv:
    e.g. chunk_dqkg fp32 K=256 V=512 37 KB -> 1.2 KB, chunk_out 18.8 KB -> 40 B under triton
    3.6). The interpreter computes exact fp32 ('ieee')."""
    return "ieee" if interpreting() else "tf32x3"


def dot_config(dtype: torch.dtype) -> Tuple[object, object, str]:
    """(DT, DT_S, PREC) for the kernels' tl.dot calls.

    DT: operand dtype of products of inputs (q k^T, A v): the input dtype, fp32 for fp32.
    DT_S: operand dtype of products with the fp32 state: bf16 keeps bf16 (fp32 range), fp16 goes
    through tf32 because a long un-decayed state can pass fp16's 65504.
    PREC: fp32 inputs get fp32-accurate products (exact_precision: 3xTF32), not plain tf32, so
    fp32 results match fp32 math to ~1e-6.
    Under TRITON_INTERPRET=1 everything is fp32/'ieee': interpreted bf16 tl.dot is wrong (bf16
    inputs gave garbage, relative errors ~1e9), and fp32 is the interpreter path's contract."""
    if interpreting():
        return tl.float32, tl.float32, "ieee"
    if dtype == torch.bfloat16:
        return tl.bfloat16, tl.bfloat16, "tf32"
    if dtype == torch.float16:
        return tl.float16, tl.float32, "tf32"
    return tl.float32, tl.float32, exact_precision()


class ChunkMeta:
    """Where the chunks of a (possibly packed) batch live.

    Unpacked (cu_seqlens None): sequence n = batch row n, NT = cdiv(T, C) chunks each, chunk
    (n, c) has global id n * NT + c. Packed: offsets[n] is the global id of the first chunk of
    sequence n and indices[i] = (n, c) for global chunk i. Both are built with torch ops on the
    device; the grid is sized by the upper bound cdiv(T, C) + N, and ids past the real count
    point past the end of the last sequence, so their programs mask every load and store."""

    def __init__(self, cu_seqlens: Optional[Tensor], B: int, T: int, C: int):
        self.C = C
        self.is_varlen = cu_seqlens is not None
        self.cu_or_none = cu_seqlens  # the kernels' cu_seqlens argument
        if cu_seqlens is None:
            self.N = B
            self.NT = triton.cdiv(T, C)
            self.grid_t = self.NT            # chunk axis of chunk-parallel grids (times B)
            self.n_chunks = B * self.NT      # rows of per-chunk buffers
            self.offsets = self.indices = None
        else:
            N = cu_seqlens.numel() - 1
            self.N = N
            self.NT = 0  # unused when packed
            bound = triton.cdiv(T, C) + N  # sum_n cdiv(L_n, C) <= T / C + N
            cu = cu_seqlens.to(torch.int64)
            n_chunks = (cu[1:] - cu[:-1] + C - 1) // C
            offsets = torch.cat([n_chunks.new_zeros(1), n_chunks.cumsum(0)])
            gid = torch.arange(bound, device=cu.device)
            seq = torch.searchsorted(offsets[1:].contiguous(), gid, right=True).clamp_(max=N - 1)
            self.offsets = offsets.to(torch.int32)
            self.indices = torch.stack([seq, gid - offsets[seq]], 1).to(torch.int32).contiguous()
            self.grid_t = bound
            self.n_chunks = bound
        # chunk-parallel kernels put the chunk axis on grid y (<= 65535 chunks per sequence,
        # or per packed batch: 4.19M tokens at C = 64)
        check_grid_yz(self.grid_t, f"chunks per sequence (T / {C})")


@triton.jit
def seq_bounds(i_n, cu_seqlens, T, IS_VARLEN: tl.constexpr):
    """(bos, length) of sequence i_n: bos is int64, the token index of its first row."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T
    return bos, (eos - bos).to(tl.int32)


@triton.jit
def chunk_program(i_t, i_b, cu_seqlens, chunk_indices, T, NT, IS_VARLEN: tl.constexpr):
    """For a chunk-parallel program: (sequence, chunk in sequence, global chunk id, bos, length)."""
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + 2 * i_t).to(tl.int64)
        i_c = tl.load(chunk_indices + 2 * i_t + 1).to(tl.int32)
        gid = i_t.to(tl.int64)
    else:
        i_n = i_b.to(tl.int64)
        i_c = i_t.to(tl.int32)
        gid = i_b.to(tl.int64) * NT + i_t
    bos, T_n = seq_bounds(i_n, cu_seqlens, T, IS_VARLEN)
    return i_n, i_c, gid, bos, T_n


@triton.jit
def state_tile(i_k, i_v, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """The [BK, BV] tile (K block i_k, V block i_v) of a row-major [K, V] state: column offsets,
    their masks, the tile mask and the tile's element offsets (o_k, o_v, m_k, m_v, m_kv, kv)."""
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    return o_k, o_v, m_k, m_v, m_k[:, None] & m_v[None, :], o_k[:, None] * V + o_v[None, :]


@triton.jit
def chunk_slot_base(i_n, chunk_offsets, NT, IS_VARLEN: tl.constexpr):
    """Index of sequence i_n's first chunk in a per-chunk buffer (states h_c, dh_c)."""
    if IS_VARLEN:
        base = tl.load(chunk_offsets + i_n).to(tl.int64)
    else:
        base = i_n.to(tl.int64) * NT
    return base

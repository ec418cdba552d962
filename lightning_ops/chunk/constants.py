"""One vocabulary for the chunk engine, shared by its torch and Triton code: the gate kinds and
the chunk and tile sizes. Plain Python ints (no torch, no triton import), so every module reads
the same numbers; Triton kernels see them as `tl.constexpr` copies (chunk/triton_kernels.py).

Gate kinds (the decay of `S_t = decay_t * S_{t-1} + k_t v_t^T`):
  NO_GATE      decay 1                             linear attention, DeltaNet
  SCALAR_GATE  exp(g_t) per head, g [.., H]        simple GLA, Mamba-2 (SSD), Gated DeltaNet
               (with an optional constant per-head g_gamma added to every token's g)
  GAMMA_GATE   exp(g_gamma) per head, no per-token tensor: Lightning / RetNet. Only the Triton
               chunk kernels use it (they compute the decays from token positions); the torch
               engine and the recurrent kernels fold g_gamma into the per-token gates instead.
  VECTOR_GATE  diag(exp(g_t)) per key channel, g [.., H, K]: GLA, KDA
The same number means the same kind in every kernel and function.
"""
from __future__ import annotations

NO_GATE = 0
SCALAR_GATE = 1
GAMMA_GATE = 2
VECTOR_GATE = 3
GATE_NAMES = {NO_GATE: "none", SCALAR_GATE: "scalar", GAMMA_GATE: "gamma", VECTOR_GATE: "vector"}


def gate_kind(g, g_gamma=None) -> int:
    """The kind of a per-token gate tensor g ([.., H] scalar: 3 dims in both the [B, T, H]
    public layout and the [NC, H, C] chunk stream; one more for vector gates); GAMMA_GATE when
    only g_gamma is given."""
    if g is None:
        return NO_GATE if g_gamma is None else GAMMA_GATE
    return SCALAR_GATE if g.dim() == 3 else VECTOR_GATE


# Chunk sizes. torch engine, picked by measurement on CPU (2 cores, fp32, H=4, K=V=64,
# T=4096/16384 forward+backward): C=32 and 64 tie, 128 is ~3x slower, 64 halves the Python loop
# of the state passing. For vector gates c=4 beat c=8 by ~10% and c=16 by ~20% (the diagonal
# blocks' element-wise work grows with c, the quadrant matmuls shrink with it).
TORCH_CHUNK = 64
TORCH_SUB_CHUNK = 4
# Triton chunk kernels: rows per chunk (every chunk kernel, the delta WY kernels included) and per
# sub-chunk of the vector-gate intra scores.
TRITON_CHUNK = 64
TRITON_SUB_CHUNK = 16
# Kernels that loop over K take it in blocks of K_BLOCK (keeps [C, K] tiles within sm_90
# shared memory at K = 256).
K_BLOCK = 64
# Triton chunk kernels floor per-token log decays at -GATE_FLOOR: e^-104 rounds to exactly 0 in
# fp32, so a floored gate is still an exact reset, and the floor keeps chunk sums finite.
GATE_FLOOR = 104.0
# Delta rule: l2 normalisation of q/k inside the kernels (fla's eps), and the longest input that
# mode "recurrent" of the torch engine runs as one chunk.
L2NORM_EPS = 1e-6
RECURRENT_MAX_T = 16
# torch engines: the bytes of one chunk-stream intermediate per group of chunks (chunk/torch.py,
# "Chunk groups": forward memory independent of T, below glibc's mmap threshold)
GROUP_BYTES = 1 << 20

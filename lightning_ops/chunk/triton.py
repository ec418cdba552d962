"""Triton backend of the chunk engine: the GLA family's (linear attention, simple GLA /
Lightning, GLA) Triton backend as is, the SSD engine of ssm/triton.py, and the launch helpers
the delta rule's launchers share (delta/triton.py).

Contract (lightning_ops/gla/ops.py):
  forward(q, k, v, g, g_gamma, scale, initial_state, output_final_state, cu_seqlens, mode)
      -> (o, final_state or None)
  backward(q, k, v, g, g_gamma, scale, initial_state, cu_seqlens, mode, do, dht)
      -> (dq, dk, dv, dg or None, dh0 or None)

mode "chunk" runs the chunk kernels (chunk/triton_kernels.py), "recurrent" the token walk
(chunk/triton_recurrent.py). States, gate cumsums and accumulators are fp32; o and the gradients come
back in their inputs' dtypes, dh0 in initial_state's. float64 inputs are computed in fp32 (the
kernels' widest arithmetic) and the results cast back to float64: use the torch backend when
float64 accuracy matters.

Chunk forward, two forms chosen by `_single_pass` (env LIGHTNING_OPS_GLA_SINGLE_PASS=0/1
overrides where the fused form fits):
  two-pass     the state kernel writes h_c per chunk (fp32, N_chunks x H x K x V), then a
               chunk-parallel output kernel reads it;
  single-pass  Lightning-Attention-2 style: one program per (sequence, head, V block) walks its
               chunks and writes o from the register state, no per-chunk state in memory.
The backward mirrors the choice: single-pass fuses dv into the reverse state walk, two-pass runs
it chunk-parallel. Both backward forms store h_c and dh_c (fp32) for the chunk-parallel dq/dk/dg
kernel. Launch configs are fixed by shape (no autotuning); T is a runtime argument, never
specialized; varlen chunk tables are built on the device (no host sync).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton

from ..nonfinite import NonFiniteGuard
from ..triton_utils import ChunkMeta, check_grid_yz, dot_config, next_pow2, on_gpu, sm_count
from .constants import GATE_FLOOR, TRITON_CHUNK, TRITON_SUB_CHUNK, VECTOR_GATE, gate_kind
from .triton_kernels import (
    chunk_cumsum_kernel,
    chunk_dqkg_kernel,
    chunk_intra_grad_kernel,
    chunk_out_kernel,
    chunk_scores_kernel,
    chunk_state_kernel,
    seq_revcumsum_kernel,
)
from .triton_recurrent import recurrent_bwd_kernel, recurrent_fwd_kernel

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------
# Launch helpers shared with the delta rule's launchers
# ---------------------------------------------------------------------------------------------
def as_compute(*xs: Optional[Tensor]):
    """Contiguous tensors; float64 -> float32 (the kernels' widest arithmetic)."""
    return [None if x is None else (x.float() if x.dtype == torch.float64 else x).contiguous()
            for x in xs]


def fp32_empty(ref: Tensor, *shape: int) -> Tensor:
    """fp32 scratch/output on ref's device (torch.empty, so tests' NaN-filling reaches it)."""
    return torch.empty(*shape, dtype=torch.float32, device=ref.device)


def check_mode(mode: str) -> None:
    if mode not in ("chunk", "recurrent"):
        raise ValueError(f"mode must be 'chunk' or 'recurrent', got {mode!r}")


def zero_floored(dg: Optional[Tensor], g: Optional[Tensor], g_gamma: Optional[Tensor] = None):
    """The chunk kernels see max(g, -GATE_FLOOR): the gates below the floor get gradient 0,
    the derivative of that max (the kernels' value there is a product of e^-104-sized terms)."""
    if dg is None or g is None:
        return dg
    gg = g if g_gamma is None else g + g_gamma.view(-1, *([1] * (g.dim() - 3)))
    return dg.masked_fill(gg < -GATE_FLOOR, 0)


def empty_forward(q: Tensor, v: Tensor, h0: Optional[Tensor], output_final_state: bool,
                  N: int):
    """(o, final state) of T == 0 inputs: nothing to launch; the state passes through (fp32)."""
    ht = None
    if output_final_state:
        ht = (h0.float().clone() if h0 is not None else
              q.new_zeros(N, v.shape[2], q.shape[3], v.shape[3], dtype=torch.float32))
    return torch.empty_like(v), ht


def empty_backward(h0: Optional[Tensor], dht: Optional[Tensor], *inputs: Optional[Tensor]):
    """Gradients of T == 0 inputs: zeros, and dh0 = dht (fp32) when there is an initial state."""
    grads = [None if x is None else torch.zeros_like(x) for x in inputs]
    dh0 = None
    if h0 is not None:
        dh0 = dht.float().clone() if dht is not None else torch.zeros_like(h0, dtype=torch.float32)
    return grads, dh0


def restore_dtypes(outs, dtypes):
    """Results back in their inputs' dtypes (None stays None)."""
    return tuple(None if x is None else x.to(dt) for x, dt in zip(outs, dtypes))


def _single_pass(N: int, H: int, K: int, V: int, dtype: torch.dtype,
                 device: torch.device) -> bool:
    """Single-pass forward (and fused dv backward) when its full-K tiles fit on chip and the
    (sequence, head, V block) programs alone fill the device: it then moves no per-chunk state
    through memory. Otherwise the two-pass form buys chunk parallelism. Env
    LIGHTNING_OPS_GLA_SINGLE_PASS=1/0 forces it on (where it fits) or off. The occupancy rule is
    a first guess, not tuned on hardware yet."""
    if not _single_pass_fits(K, dtype, device):
        return False
    env = os.environ.get("LIGHTNING_OPS_GLA_SINGLE_PASS", "").strip()
    if env in ("0", "1"):
        return env == "1"
    return N * H * triton.cdiv(V, _single_bv(K, V)) >= sm_count(device)


def _single_pass_fits(K: int, dtype: torch.dtype, device: torch.device) -> bool:
    """The fused kernel holds [C, K] tiles of q and k: K <= 128 in 16-bit; fp32 tiles (exact
    'ieee' products staged through shared memory) need over 227 KB on sm_90 at K = 128, so fp32
    on a GPU takes it up to K = 64 only."""
    if K > 128:
        return False
    return dtype in (torch.float16, torch.bfloat16) or K <= 64 or not on_gpu(device)


def _single_bv(K: int, V: int) -> int:
    return min(next_pow2(V), 64 if next_pow2(K) <= 64 else 32)


def _blocks(K: int, V: int) -> Tuple[int, int]:
    return min(64, next_pow2(K)), min(64, next_pow2(V))


def gate_cumsum(g: Optional[Tensor], g_gamma: Optional[Tensor], meta: ChunkMeta, B: int,
                T: int, H: int) -> Optional[Tensor]:
    """Chunk-local cumulative log decays (fp32) of g [B, T, H(, D)], g_gamma folded in, floored
    at -GATE_FLOOR; None without g."""
    if g is None:
        return None
    D = 1 if g.dim() == 3 else g.shape[-1]
    gc = torch.empty(g.shape, dtype=torch.float32, device=g.device)
    BD = min(64, next_pow2(D))
    chunk_cumsum_kernel[(triton.cdiv(D, BD), meta.grid_t, B * H)](
        g, g_gamma, gc, meta.cu_or_none, meta.indices, T, meta.NT,
        H=H, D=D, C=meta.C, BD=BD, HAS_GAMMA=g_gamma is not None, IS_VARLEN=meta.is_varlen)
    return gc


@dataclass
class _Chunks:
    """What every chunk launch of one call shares: the chunk table, the gate (cumsums gc and/or
    g_gamma, its kind), the scale, the shapes and the input dtype (picks the dot config)."""
    meta: ChunkMeta
    gc: Optional[Tensor]
    g_gamma: Optional[Tensor]
    GATE: int
    scale: float
    B: int
    T: int
    H: int
    K: int
    V: int
    dtype: torch.dtype


def chunk_scores(x: Tensor, y: Tensor, gc: Optional[Tensor], meta: ChunkMeta, scale: float,
                 dtype: torch.dtype) -> Tensor:
    """Intra-chunk scores A [B, T, H, C] fp32, causal part only (s <= t; readers mask the rest):
    scale sum_d x_td y_sd e^{G_td - G_sd} with vector-gate cumsums gc [B, T, H, D], or ungated
    scale x y^T (gc None: do v^T). dtype picks the dot config."""
    B, T, H, D = x.shape
    C = meta.C
    gated = gc is not None
    BC = TRITON_SUB_CHUNK if gated else C
    A = torch.empty(B, T, H, C, dtype=torch.float32, device=x.device)
    DT, _, PREC = dot_config(dtype)
    chunk_scores_kernel[(meta.grid_t, C // BC, B * H)](
        x, y, gc, A, meta.cu_or_none, meta.indices, scale, T, meta.NT,
        H=H, D=D, C=C, BC=BC, BD=min(32 if gated else 64, next_pow2(D)), GATED=gated,
        IS_VARLEN=meta.is_varlen, DT=DT, PREC=PREC)
    return A


def scores_backward(q: Tensor, k: Tensor, gc: Tensor, dA: Tensor, meta: ChunkMeta,
                    dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """(dq, dk) fp32 of vector-gated scores A_ts = sum_d q_td k_sd e^{G_td - G_sd}, s < t, from
    dA (the s == t term excluded: see chunk_intra_grad_kernel)."""
    B, T, H, K = q.shape
    DT, _, PREC = dot_config(dtype)
    dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    BK = min(32, next_pow2(K))  # the diagonal sub-chunk holds [BC, BC, BK] products
    n_sub = meta.C // TRITON_SUB_CHUNK
    chunk_intra_grad_kernel[(triton.cdiv(K, BK) * n_sub, meta.grid_t, B * H)](
        q, k, gc, dA, dq, dk, meta.cu_or_none, meta.indices, T, meta.NT,
        H=H, K=K, C=meta.C, BC=TRITON_SUB_CHUNK, BK=BK, IS_VARLEN=meta.is_varlen,
        DT=DT, PREC=PREC)
    return dq, dk


def _state_walk(c: _Chunks, *, x: Tensor, y: Tensor, rev: bool, s0: Optional[Tensor],
                s_fin: Optional[Tensor] = None, hs: Optional[Tensor] = None,
                fuse_z: Optional[Tensor] = None, A: Optional[Tensor] = None,
                out: Optional[Tensor] = None) -> None:
    """Launch the chunk state walk (see chunk_state_kernel): forward x=k, y=v; rev x=q, y=do.
    fuse_z (with out and, for vector gates, A) fuses the per-chunk output into the walk."""
    fuse = fuse_z is not None
    K, V, meta = c.K, c.V, c.meta
    BK, BV = (next_pow2(K), _single_bv(K, V)) if fuse else _blocks(K, V)
    DT, DT_S, PREC = dot_config(c.dtype)
    chunk_state_kernel[(triton.cdiv(K, BK), triton.cdiv(V, BV), meta.N * c.H)](
        x, y, fuse_z, c.gc, c.g_gamma, A, hs, s0, s_fin, out,
        meta.cu_or_none, meta.offsets, c.scale, c.T, meta.NT,
        H=c.H, K=K, V=V, C=meta.C, BK=BK, BV=BV, GATE=c.GATE, REV=rev,
        USE_H0=s0 is not None, STORE_HT=s_fin is not None, STORE_HS=hs is not None,
        FUSE_OUT=fuse, IS_VARLEN=meta.is_varlen, DT=DT, DT_S=DT_S, PREC=PREC,
        num_warps=8 if fuse and BK * BV >= 128 * 64 else 4)


def _chunk_output(c: _Chunks, *, z: Tensor, x: Tensor, y: Tensor, hs: Tensor,
                  A: Optional[Tensor], out: Tensor, rev: bool) -> None:
    """Launch the chunk-parallel output (see chunk_out_kernel): o from (q, k, v, h_c), or rev
    dv from (k, q, do, dh_c)."""
    BK, BV = _blocks(c.K, c.V)
    DT, DT_S, PREC = dot_config(c.dtype)
    meta = c.meta
    chunk_out_kernel[(triton.cdiv(c.V, BV), meta.grid_t, c.B * c.H)](
        z, x, y, c.gc, c.g_gamma, A, hs, out, meta.cu_or_none, meta.indices, c.scale, c.T,
        meta.NT, H=c.H, K=c.K, V=c.V, C=meta.C, BK=BK, BV=BV, GATE=c.GATE, REV=rev,
        IS_VARLEN=meta.is_varlen, DT=DT, DT_S=DT_S, PREC=PREC)


def _chunks(q, v, g, g_gamma, scale, cu_seqlens) -> _Chunks:
    B, T, H, K = q.shape
    meta = ChunkMeta(cu_seqlens, B, T, TRITON_CHUNK)
    # the chunk kernels put (batch or sequence) x heads on grid z
    check_grid_yz(max(B, meta.N) * H, "batch (or sequences) x heads")
    return _Chunks(meta, gate_cumsum(g, g_gamma, meta, B, T, H), g_gamma, gate_kind(g, g_gamma),
                   scale, B, T, H, K, v.shape[-1], q.dtype)


# ---------------------------------------------------------------------------------------------
# Chunk mode
# ---------------------------------------------------------------------------------------------
def _chunk_forward(q, k, v, g, g_gamma, scale, h0, output_final_state, cu_seqlens):
    c = _chunks(q, v, g, g_gamma, scale, cu_seqlens)
    meta, H, K, V = c.meta, c.H, c.K, c.V
    A = chunk_scores(q, k, c.gc, meta, scale, q.dtype) if c.GATE == VECTOR_GATE else None
    o = torch.empty_like(v)
    ht = fp32_empty(q, meta.N, H, K, V) if output_final_state else None
    if _single_pass(meta.N, H, K, V, q.dtype, q.device):
        _state_walk(c, x=k, y=v, rev=False, s0=h0, s_fin=ht, fuse_z=q, A=A, out=o)
    else:
        hs = fp32_empty(q, meta.n_chunks, H, K, V)
        _state_walk(c, x=k, y=v, rev=False, s0=h0, s_fin=ht, hs=hs)
        _chunk_output(c, z=q, x=k, y=v, hs=hs, A=A, out=o, rev=False)
    return o, ht


def _chunk_backward(q, k, v, g, g_gamma, scale, h0, cu_seqlens, do, dht):
    c = _chunks(q, v, g, g_gamma, scale, cu_seqlens)
    meta, B, T, H, K, V, GATE = c.meta, c.B, c.T, c.H, c.K, c.V, c.GATE
    # recompute the per-chunk states h_c (not kept from the forward: NT*K*V fp32 per head)
    hs = fp32_empty(q, meta.n_chunks, H, K, V)
    _state_walk(c, x=k, y=v, rev=False, s0=h0, hs=hs)
    A = chunk_scores(q, k, c.gc, meta, scale, q.dtype) if GATE == VECTOR_GATE else None
    dhs = fp32_empty(q, meta.n_chunks, H, K, V)
    dh0 = fp32_empty(q, meta.N, H, K, V) if h0 is not None else None
    dv = torch.empty_like(v)
    if _single_pass(meta.N, H, K, V, q.dtype, q.device):
        _state_walk(c, x=q, y=do, rev=True, s0=dht, s_fin=dh0, hs=dhs, fuse_z=k, A=A, out=dv)
    else:
        _state_walk(c, x=q, y=do, rev=True, s0=dht, s_fin=dh0, hs=dhs)
        _chunk_output(c, z=k, x=q, y=do, hs=dhs, A=A, out=dv, rev=True)
    BK, BV = _blocks(K, V)
    NK = triton.cdiv(K, BK)
    DT, DT_S, PREC = dot_config(q.dtype)
    dA = dqi = dki = None
    if GATE == VECTOR_GATE:
        dA = chunk_scores(do, v, None, meta, scale, q.dtype)
        dqi, dki = scores_backward(q, k, c.gc, dA, meta, q.dtype)
    dq, dk = torch.empty_like(q), torch.empty_like(k)
    dg = None
    if g is not None:
        dg = (torch.empty(g.shape, dtype=g.dtype, device=g.device) if GATE == VECTOR_GATE else
              torch.empty(NK, B * T * H, dtype=torch.float32, device=g.device))
    chunk_dqkg_kernel[(NK, meta.grid_t, B * H)](
        q, k, v, do, c.gc, g_gamma, hs, dhs, dA, dqi, dki, dq, dk, dg,
        meta.cu_or_none, meta.indices, scale, T, meta.NT, B * T * H,
        H=H, K=K, V=V, C=TRITON_CHUNK, BK=BK, BV=BV, GATE=GATE, HAS_DG=g is not None,
        IS_VARLEN=meta.is_varlen, DT=DT, DT_S=DT_S, PREC=PREC)
    if dg is not None and GATE != VECTOR_GATE:
        dg = dg.sum(0).view(g.shape).to(g.dtype)
    return dq, dk, dv, dg, dh0


# ---------------------------------------------------------------------------------------------
# Recurrent mode
# ---------------------------------------------------------------------------------------------
def _recurrent_cfg(g, K, V):
    """(BK, BV, GATE): the kernels take the per-token g's kind; g_gamma goes as HAS_GAMMA."""
    BK = next_pow2(K)
    BV = min(next_pow2(V), max(16, 8192 // BK))
    return BK, BV, gate_kind(g)


def _recurrent_forward(q, k, v, g, g_gamma, scale, h0, output_final_state, cu_seqlens):
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    BK, BV, GATE = _recurrent_cfg(g, K, V)
    o = torch.empty_like(v)
    ht = fp32_empty(q, N, H, K, V) if output_final_state else None
    recurrent_fwd_kernel[(N * H, triton.cdiv(V, BV))](
        q, k, v, g, g_gamma, h0, None, None, o, ht, None, cu_seqlens, scale, T, 0,
        H=H, K=K, V=V, BK=BK, BV=BV, GATE=GATE, HAS_GAMMA=g_gamma is not None,
        USE_H0=h0 is not None, STORE_FIN=ht is not None, BWD=False,
        IS_VARLEN=cu_seqlens is not None)
    return o, ht


def _last_tokens(B: int, T: int, cu_seqlens: Optional[Tensor], device) -> Tensor:
    """Flat token index (into B * T) of each sequence's last token (T >= 1). An empty varlen
    sequence maps to the overall last token, itself a last token: no host sync needed."""
    if cu_seqlens is None:
        return torch.arange(1, B + 1, device=device) * T - 1
    ends = cu_seqlens[1:].long()
    return torch.where(ends > cu_seqlens[:-1].long(), ends - 1, ends[-1:] - 1)


def _recurrent_backward(q, k, v, g, g_gamma, scale, h0, cu_seqlens, do, dht):
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    BK, BV, GATE = _recurrent_cfg(g, K, V)
    NV = triton.cdiv(V, BV)
    n_qk = B * T * H * K
    common = dict(H=H, K=K, V=V, BK=BK, BV=BV, GATE=GATE, HAS_GAMMA=g_gamma is not None,
                  IS_VARLEN=cu_seqlens is not None)
    dq_part = torch.empty(NV, n_qk, dtype=torch.float32, device=q.device)
    fin = (torch.empty(NV, N, H, K, dtype=torch.float32, device=q.device)
           if g is not None and dht is not None else None)
    c_part = torch.empty(NV, B * T * H, dtype=torch.float32, device=q.device)
    recurrent_fwd_kernel[(N * H, NV)](
        q, k, v, g, g_gamma, h0, do, dht, dq_part, fin, c_part, cu_seqlens, scale, T, n_qk,
        USE_H0=h0 is not None, STORE_FIN=fin is not None, BWD=True, **common)
    dk_part = torch.empty(NV, n_qk, dtype=torch.float32, device=q.device)
    dv = torch.empty_like(v)
    dh0 = fp32_empty(q, N, H, K, V) if h0 is not None else None
    recurrent_bwd_kernel[(N * H, NV)](
        q, k, v, g, g_gamma, do, dht, dk_part, dv, dh0, cu_seqlens, scale, T, n_qk,
        USE_DHT=dht is not None, STORE_DH0=dh0 is not None, **common)
    dq = dq_part.sum(0).view(q.shape)  # without the c_t k_t term (see triton_recurrent.py)
    dk = dk_part.sum(0).view(k.shape)  # without the c_t q_t term
    c = c_part.sum(0).view(B, T, H, 1)
    dg = None
    if g is not None:
        # dg_t = sum_{t' >= t} (q dq - k dk)_t' + rowsum(S_T * dht), per sequence. With dht, the
        # last token's k_T dk_T = k_T (dht v_T) is left out and fin holds rowsum(e^{g_T} S_{T-1}
        # * dht): the two dropped terms are equal, large with strong gates, and would cancel in
        # fp32 leaving an error that the cumsum spreads to every token.
        kdk = k.float() * dk
        if fin is not None:
            kdk.view(-1, H, K)[_last_tokens(B, T, cu_seqlens, q.device)] = 0
        x = q.float() * dq - kdk
        add = None if fin is None else fin.sum(0)
        if g.dim() == 3:
            x = x.sum(-1, keepdim=True)
            add = None if add is None else add.sum(-1, keepdim=True)
        D = x.shape[-1]
        out = torch.empty_like(x)
        BD = min(64, next_pow2(D))
        seq_revcumsum_kernel[(N * H, triton.cdiv(D, BD))](
            x, add, out, cu_seqlens, T, H=H, D=D, BT=64, BD=BD, HAS_ADD=add is not None,
            IS_VARLEN=cu_seqlens is not None)
        dg = out.view(g.shape).to(g.dtype)
    dq = dq + c * k.float()
    dk = dk + c * q.float()
    return dq.to(q.dtype), dk.to(k.dtype), dv, dg, dh0


# ---------------------------------------------------------------------------------------------
# Backend contract
# ---------------------------------------------------------------------------------------------
def forward(q, k, v, g, g_gamma, scale, initial_state, output_final_state, cu_seqlens, mode):
    check_mode(mode)
    # Chunks mix tokens both ways (0 * inf); the token walk of mode "recurrent" is causal as is.
    guard = NonFiniteGuard.build(k, v, (g,), cu_seqlens=cu_seqlens) if mode == "chunk" else None
    if guard is not None:
        k, v, (g,) = guard.clean(k, v, (g,))
        o, ht = forward(q, k, v, g, g_gamma, scale, initial_state, output_final_state,
                        cu_seqlens, mode)
        return guard.poison(o, ht)
    in_dtype, state_dtype = v.dtype, (torch.float64 if q.dtype == torch.float64 else None)
    q, k, v, g, g_gamma, h0 = as_compute(q, k, v, g, g_gamma, initial_state)
    if q.shape[1] == 0:
        N = q.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
        o, ht = empty_forward(q, v, h0, output_final_state, N)
    else:
        run = _chunk_forward if mode == "chunk" else _recurrent_forward
        o, ht = run(q, k, v, g, g_gamma, float(scale), h0, output_final_state, cu_seqlens)
    if state_dtype is not None and ht is not None:
        ht = ht.to(state_dtype)
    return o.to(in_dtype), ht


def backward(q, k, v, g, g_gamma, scale, initial_state, cu_seqlens, mode, do, dht):
    check_mode(mode)
    guard = NonFiniteGuard.build(k, v, (g,), cu_seqlens=cu_seqlens)
    if guard is not None:
        k, v, (g,) = guard.clean(k, v, (g,))
        do, dht = guard.clean_grads(do, dht)
        return backward(q, k, v, g, g_gamma, scale, initial_state, cu_seqlens, mode, do, dht)
    dtypes = (q.dtype, k.dtype, v.dtype, None if g is None else g.dtype,
              None if initial_state is None else initial_state.dtype)
    q, k, v, g, g_gamma, h0, do, dht = as_compute(q, k, v, g, g_gamma, initial_state, do, dht)
    if q.shape[1] == 0:
        (dq, dk, dv, dg), dh0 = empty_backward(h0, dht, q, k, v, g)
    else:
        run = _chunk_backward if mode == "chunk" else _recurrent_backward
        dq, dk, dv, dg, dh0 = run(q, k, v, g, g_gamma, float(scale), h0, cu_seqlens, do, dht)
        if mode == "chunk":
            dg = zero_floored(dg, g, g_gamma)
    return restore_dtypes((dq, dk, dv, dg, dh0), dtypes)

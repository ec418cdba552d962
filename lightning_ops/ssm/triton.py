"""Triton backend of the state-space family (families "selective_scan", "ssd", "conv").

* SSD (Mamba-2): the Triton chunk engine (lightning_ops.chunk.triton) with q = C, k = B,
  v = x * dt, g = dt * A, wrapped by the same element-wise layer as the torch backend
  (lightning_ops.ssm.torch.ssd_forward / ssd_backward with engine=chunk.triton): one engine.
  16-bit inputs reach the engine as 16-bit q, k, v (_HalfOperands): tensor-core products.
* selective scan (Mamba-1; the CUDA kernel's fallback): one program per (batch, block of
  channels) walks the sequence in chunks of SCAN_CHUNK tokens; inside a chunk the recurrence
  h_t = a_t h_{t-1} + x_t is a tl.associative_scan over [channels, states, tokens] tiles. The
  forward saves the state after every chunk; the backward recomputes a chunk's states from it
  and runs the adjoint g_t = dy_t C_t + a_{t+1} g_{t+1} as a reverse associative scan. dB / dC
  (shared by the channels of a group) are written as per-channel-block partials and summed by
  torch: deterministic, no atomics.
* causal conv1d: a tile kernel over (batch, channels, tokens) summing the W <= 4 taps; the
  backward recomputes the pre-activation (dpre + per-token-block dweight partials), then dx is
  the anti-causal tap sum of dpre.
* decode steps: selective_state_update (one program per batch, head and head-dim block; A / dt
  tied over the head dim -> scalar decay per head) and causal_conv1d_update.

All in-kernel math is fp32 (also under TRITON_INTERPRET=1); float64 inputs are computed in fp32
and cast back. Every offset that can pass 2^31 elements is 64-bit.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._custom_op import own_storage
from ..chunk import triton as chunk_engine  # SSD runs on the chunk engine
from ..triton_utils import next_pow2
from . import torch as _torch_impl

Tensor = torch.Tensor

# selective-scan tiles: tokens per associative-scan tile (and per saved carry), channels per
# program (fewer when the groups are smaller)
SCAN_CHUNK = 32
SCAN_BD = 8


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.dtype == torch.float64 else x.dtype


@triton.jit
def _softplus(x):
    # torch's threshold (20); exp(x) below -15 where log(1 + exp(x)) loses it in fp32
    return tl.where(x > 20.0, x, tl.where(x < -15.0, tl.exp(x), tl.log(1.0 + tl.exp(x))))


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _combine(a1, b1, a2, b2):
    # (a, b) pairs of s -> a s + b, (a1, b1) first in scan order
    return a1 * a2, a2 * b1 + b2


# =============================================================================================
# SSD: the GLA Triton engine
# =============================================================================================
class _HalfOperands:
    """The chunk engine fed 16-bit q, k, v (C, B and x dt rounded to the inputs' dtype): the
    layer above hands the engine fp32 tensors, which would keep every product of the chunk
    kernels off the tensor cores (fp32 'ieee' dots) for bf16 / fp16 models. Gates, states and
    accumulators stay fp32; outputs and gradients come back fp32. The one extra rounding is
    that of x dt (relative 2^-9 in bf16), the size of the inputs' own."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def forward(self, q, k, v, g, g_gamma, scale, h0, output_final_state, cu_seqlens, mode):
        c = self.dtype
        o, ht = chunk_engine.forward(q.to(c), k.to(c), v.to(c), g, g_gamma, scale, h0,
                                     output_final_state, cu_seqlens, mode)
        return o.float(), ht

    def backward(self, q, k, v, g, g_gamma, scale, h0, cu_seqlens, mode, do, dht):
        c = self.dtype
        dq, dk, dv, dg, dh0 = chunk_engine.backward(q.to(c), k.to(c), v.to(c), g, g_gamma,
                                                    scale, h0, cu_seqlens, mode, do, dht)
        return dq.float(), dk.float(), dv.float(), dg, dh0


_HALF_ENGINES = {dt: _HalfOperands(dt) for dt in (torch.bfloat16, torch.float16)}


def _engine_for(x: Tensor):
    return _HALF_ENGINES.get(x.dtype, chunk_engine)


def ssd_forward(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, chunk_size,
                dt_softplus, dt_min, dt_max, return_final_states, need_pre=False):
    return _torch_impl.ssd_forward(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx,
                                   cu_seqlens, chunk_size, dt_softplus, dt_min, dt_max,
                                   return_final_states, need_pre, engine=_engine_for(x))


def ssd_backward(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, chunk_size,
                 dt_softplus, dt_min, dt_max, dy, dfinal, pre=None):
    return _torch_impl.ssd_backward(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx,
                                    cu_seqlens, chunk_size, dt_softplus, dt_min, dt_max, dy,
                                    dfinal, pre, engine=_engine_for(x))


# =============================================================================================
# Mamba-1 selective scan
# =============================================================================================
@triton.jit
def _scan_chunk_inputs(u, delta, row, bias, c, tl_, mask_d, m_dn, L, TC: tl.constexpr,
                       SOFTPLUS: tl.constexpr):
    """Chunk c of a block's channels: token offsets t, masks (tokens; channels x tokens;
    channels x states x tokens), u, the raw delta (+ bias) and the effective delta (0 on
    padding tokens: unit decay, no input)."""
    t = c * TC + tl_
    mt = t < L
    m2 = mask_d[:, None] & mt[None, :]
    m3 = m_dn[:, :, None] & mt[None, None, :]
    uv = tl.load(u + row[:, None] + t[None, :], mask=m2, other=0.0).to(tl.float32)
    raw = tl.load(delta + row[:, None] + t[None, :], mask=m2, other=0.0).to(tl.float32)
    raw += bias[:, None]
    dv = tl.where(m2, _softplus(raw) if SOFTPLUS else raw, 0.0)
    return t, mt, m2, m3, uv, raw, dv


@triton.jit
def _scan_fwd_kernel(u, delta, A, Bm, Cm, Dv, z, dbias, out, last, carries,
                     Dm, L, N, G_PER, NGROUPS, NCHUNKS,
                     BD: tl.constexpr, BN: tl.constexpr, TC: tl.constexpr,
                     HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DB: tl.constexpr,
                     SOFTPLUS: tl.constexpr):
    pid_d, pid_b = tl.program_id(0), tl.program_id(1)
    offs_d = pid_d * BD + tl.arange(0, BD)
    offs_n = tl.arange(0, BN)
    tl_ = tl.arange(0, TC)
    mask_d, mask_n = offs_d < Dm, offs_n < N
    m_dn = mask_d[:, None] & mask_n[None, :]
    row = (pid_b * Dm + offs_d).to(tl.int64) * L                        # [BD]
    grp = (pid_b * NGROUPS + offs_d // G_PER).to(tl.int64) * N          # [BD]
    bc_base = (grp[:, None] + offs_n[None, :]).to(tl.int64) * L         # [BD, BN]
    Av = tl.load(A + offs_d[:, None] * N + offs_n[None, :], mask=m_dn, other=0.0)
    bias = tl.load(dbias + offs_d, mask=mask_d, other=0.0) if HAS_DB else tl.zeros([BD], tl.float32)
    Dd = tl.load(Dv + offs_d, mask=mask_d, other=0.0) if HAS_D else tl.zeros([BD], tl.float32)
    carry_row = ((pid_b * Dm + offs_d).to(tl.int64) * NCHUNKS)[:, None] * N + offs_n[None, :]
    h = tl.zeros([BD, BN], tl.float32)
    for c in range(0, NCHUNKS):
        t, mt, m2, m3, uv, raw, dv = _scan_chunk_inputs(u, delta, row, bias, c, tl_, mask_d,
                                                        m_dn, L, TC, SOFTPLUS)
        Bv = tl.load(Bm + bc_base[:, :, None] + t[None, None, :], mask=m3, other=0.0).to(tl.float32)
        Cv = tl.load(Cm + bc_base[:, :, None] + t[None, None, :], mask=m3, other=0.0).to(tl.float32)
        a = tl.exp(dv[:, None, :] * Av[:, :, None])
        x = (dv * uv)[:, None, :] * Bv
        pa, pb = tl.associative_scan((a, x), 2, _combine)
        hs = pb + pa * h[:, :, None]
        y = tl.sum(hs * Cv, axis=1) + Dd[:, None] * uv
        if HAS_Z:
            zv = tl.load(z + row[:, None] + t[None, :], mask=m2, other=0.0).to(tl.float32)
            y = y * zv * _sigmoid(zv)
        tl.store(out + row[:, None] + t[None, :], y.to(out.dtype.element_ty), mask=m2)
        h = tl.sum(tl.where((tl_ == TC - 1)[None, None, :], hs, 0.0), axis=2)
        tl.store(carries + carry_row + c * N, h, mask=m_dn)
    tl.store(last + (pid_b * Dm + offs_d)[:, None].to(tl.int64) * N + offs_n[None, :], h,
             mask=m_dn)


@triton.jit
def _scan_bwd_kernel(u, delta, A, Bm, Cm, Dv, z, dbias, carries, dout, dlast,
                     du, ddelta, dz, dA_part, dB_part, dC_part, dD_part, ddb_part,
                     Dm, L, N, G_PER, NGROUPS, NCHUNKS, NPART, BPP,
                     BD: tl.constexpr, BN: tl.constexpr, TC: tl.constexpr,
                     HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DB: tl.constexpr,
                     HAS_DLAST: tl.constexpr, SOFTPLUS: tl.constexpr):
    """Reverse walk of the blocks pid_d * BPP .. + BPP - 1 of BD channels (consecutive, all in
    one B/C group), one block after the other; their dB / dC are summed into this program's
    partial slice [N, L] (row pid_p of NPART): BPP > 1 bounds the partial buffers (the
    launcher's PARTIAL_CAP_BYTES), a block after the first adds to what the one before stored."""
    pid_p, pid_b = tl.program_id(0), tl.program_id(1)
    for j in range(0, BPP):
        pid_d = pid_p * BPP + j
        tl.debug_barrier()  # the previous block's partial stores are read back below
        offs_d = pid_d * BD + tl.arange(0, BD)
        offs_n = tl.arange(0, BN)
        tl_ = tl.arange(0, TC)
        mask_d, mask_n = offs_d < Dm, offs_n < N
        m_dn = mask_d[:, None] & mask_n[None, :]
        row = (pid_b * Dm + offs_d).to(tl.int64) * L
        grp = (pid_b * NGROUPS + offs_d // G_PER).to(tl.int64) * N
        bc_base = (grp[:, None] + offs_n[None, :]).to(tl.int64) * L
        # this block's dB / dC partial slice [N, L] (all BD channels lie in one group)
        part = ((pid_b * NPART + pid_p).to(tl.int64) * N + offs_n) * L      # [BN]
        Av = tl.load(A + offs_d[:, None] * N + offs_n[None, :], mask=m_dn, other=0.0)
        bias = (tl.load(dbias + offs_d, mask=mask_d, other=0.0) if HAS_DB
                else tl.zeros([BD], tl.float32))
        Dd = tl.load(Dv + offs_d, mask=mask_d, other=0.0) if HAS_D else tl.zeros([BD], tl.float32)
        carry_row = (((pid_b * Dm + offs_d).to(tl.int64) * NCHUNKS)[:, None] * N
                     + offs_n[None, :])
        state_off = (pid_b * Dm + offs_d)[:, None].to(tl.int64) * N + offs_n[None, :]
        if HAS_DLAST:
            gc = tl.load(dlast + state_off, mask=m_dn, other=0.0)  # g at t = L (a_L = 1)
        else:
            gc = tl.zeros([BD, BN], tl.float32)
        dA_acc = tl.zeros([BD, BN], tl.float32)
        dD_acc = tl.zeros([BD], tl.float32)
        ddb_acc = tl.zeros([BD], tl.float32)
        for cc in range(0, NCHUNKS):
            c = NCHUNKS - 1 - cc
            t, mt, m2, m3, uv, raw, dv = _scan_chunk_inputs(u, delta, row, bias, c, tl_, mask_d,
                                                            m_dn, L, TC, SOFTPLUS)
            dsp = _sigmoid(raw) if SOFTPLUS else tl.full([BD, TC], 1.0, tl.float32)
            if SOFTPLUS:
                dsp = tl.where(raw > 20.0, 1.0, dsp)
            # delta at t + 1 (next chunk's first token for the last column): a_{t+1}
            t1 = t + 1
            m2n = mask_d[:, None] & (t1 < L)[None, :]
            rawn = tl.load(delta + row[:, None] + t1[None, :], mask=m2n, other=0.0).to(tl.float32)
            rawn += bias[:, None]
            dvn = tl.where(m2n, _softplus(rawn) if SOFTPLUS else rawn, 0.0)
            do = tl.load(dout + row[:, None] + t[None, :], mask=m2, other=0.0).to(tl.float32)
            if HAS_Z:
                zv = tl.load(z + row[:, None] + t[None, :], mask=m2, other=0.0).to(tl.float32)
                sz = _sigmoid(zv)
                dy = do * zv * sz
            else:
                dy = do
            pbc = bc_base[:, :, None] + t[None, None, :]
            Bv = tl.load(Bm + pbc, mask=m3, other=0.0).to(tl.float32)
            Cv = tl.load(Cm + pbc, mask=m3, other=0.0).to(tl.float32)
            a = tl.exp(dv[:, None, :] * Av[:, :, None])
            an = tl.exp(dvn[:, None, :] * Av[:, :, None])
            x = (dv * uv)[:, None, :] * Bv
            # states of this chunk from the saved carry
            h0 = tl.load(carries + carry_row + (c - 1) * N,
                         mask=m_dn & (tl.full([BD, BN], c, tl.int32) > 0), other=0.0)
            pa, pb = tl.associative_scan((a, x), 2, _combine)
            hs = pb + pa * h0[:, :, None]
            # adjoint g_t = dy_t C_t + a_{t+1} g_{t+1}, the chunk's successor carried in gc
            ga, gb = tl.associative_scan((an, dy[:, None, :] * Cv), 2, _combine, reverse=True)
            g = gb + ga * gc[:, :, None]
            gc = tl.sum(tl.where((tl_ == 0)[None, None, :], g, 0.0), axis=2)
            da = g * (hs - x)                          # dL/d(delta A) = g_t a_t h_{t-1}
            dA_acc += tl.sum(da * dv[:, None, :], axis=2)
            du_v = tl.sum(g * Bv, axis=1) * dv + dy * Dd[:, None]
            dd_v = (tl.sum(g * Bv, axis=1) * uv + tl.sum(da * Av[:, :, None], axis=1)) * dsp
            dd_v = tl.where(m2, dd_v, 0.0)
            y = tl.sum(hs * Cv, axis=1) + Dd[:, None] * uv
            tl.store(du + row[:, None] + t[None, :], du_v.to(du.dtype.element_ty), mask=m2)
            tl.store(ddelta + row[:, None] + t[None, :], dd_v.to(ddelta.dtype.element_ty), mask=m2)
            if HAS_Z:
                dzv = do * y * sz * (1.0 + zv * (1.0 - sz))
                tl.store(dz + row[:, None] + t[None, :], dzv.to(dz.dtype.element_ty), mask=m2)
            dD_acc += tl.sum(dy * uv, axis=1)
            ddb_acc += tl.sum(dd_v, axis=1)
            dBv = tl.sum(g * (dv * uv)[:, None, :], axis=0)          # [BN, TC], over the channels
            dCv = tl.sum(dy[:, None, :] * hs, axis=0)
            m_nt = mask_n[:, None] & mt[None, :]
            pt = part[:, None] + t[None, :]
            m_add = m_nt & (tl.full([BN, TC], j, tl.int32) > 0)
            dBv += tl.load(dB_part + pt, mask=m_add, other=0.0)
            dCv += tl.load(dC_part + pt, mask=m_add, other=0.0)
            tl.store(dB_part + pt, dBv, mask=m_nt)
            tl.store(dC_part + pt, dCv, mask=m_nt)
        tl.store(dA_part + state_off, dA_acc, mask=m_dn)
        tl.store(dD_part + pid_b * Dm + offs_d, dD_acc, mask=mask_d)
        tl.store(ddb_part + pid_b * Dm + offs_d, ddb_acc, mask=mask_d)


# the selective-scan backward's dB + dC partial buffers stay under this (beyond one row per
# group, which is dB's own size): 2 x 8 x 512 blocks x 16 x 2048 fp32 would be 1 GiB at
# b = 8, D = 4096, N = 16, L = 2048
PARTIAL_CAP_BYTES = 256 * 2 ** 20


def _blocks_per_partial(b: int, NDB: int, G: int, N: int, L: int) -> int:
    """Channel blocks summed into one dB / dC partial row: the fewest (most parallel) that keep
    the two partial buffers under PARTIAL_CAP_BYTES; a divisor of the blocks per group."""
    per_group = NDB // G
    for bpp in range(1, per_group + 1):
        if per_group % bpp == 0 and 2 * b * (NDB // bpp) * N * L * 4 <= PARTIAL_CAP_BYTES:
            return bpp
    return per_group


def _scan_block(G_per: int, N: int) -> int:
    """Channels per program: a power of two dividing the group size (so a program's channels
    share one B/C group and its dB/dC partial), at most SCAN_BD at N <= 16 and fewer for larger
    states, so the [BD, BN, TC] scan tile stays at SCAN_BD * 16 * TC elements: at BD = 8 and
    N = 256 the sm_90 backward spilled 162 KB per thread and its ptxas ran for minutes."""
    cap = max(1, min(SCAN_BD, SCAN_BD * 16 // next_pow2(N, 2)))
    bd = 1
    while bd < cap and G_per % (bd * 2) == 0:
        bd *= 2
    return bd


def scan_aux_shape(u, A):
    b, d, L = u.shape
    return (b, d, triton.cdiv(L, SCAN_CHUNK), A.shape[1])


def _scan_prepare(u, delta, A, B, C, D, z, delta_bias):
    cd = _compute_dtype(u)
    B4 = B if B.dim() == 4 else B[:, None]
    C4 = C if C.dim() == 4 else C[:, None]

    def conv(t, dtype):
        return None if t is None else t.to(dtype).contiguous()
    return (conv(u, cd), conv(delta, cd), conv(A, torch.float32), conv(B4, cd), conv(C4, cd),
            conv(D, torch.float32), conv(z, cd), conv(delta_bias, torch.float32))


def scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    uc, dc, Ac, Bc, Cc, Dc, zc, dbc = _scan_prepare(u, delta, A, B, C, D, z, delta_bias)
    b, Dm, L = uc.shape
    N, G = Ac.shape[1], Bc.shape[1]
    nchunks = triton.cdiv(L, SCAN_CHUNK)
    out = torch.empty_like(uc)
    last = torch.empty(b, Dm, N, dtype=torch.float32, device=u.device)
    carries = torch.empty(b, Dm, nchunks, N, dtype=torch.float32, device=u.device)
    BD = _scan_block(Dm // G, N)
    if b * Dm:
        _scan_fwd_kernel[(triton.cdiv(Dm, BD), b)](
            uc, dc, Ac, Bc, Cc, Dc, zc, dbc, out, last, carries, Dm, L, N, Dm // G, G, nchunks,
            BD=BD, BN=next_pow2(N, 2), TC=SCAN_CHUNK, HAS_D=D is not None, HAS_Z=z is not None,
            HAS_DB=delta_bias is not None, SOFTPLUS=delta_softplus)
    state_dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    return (out.to(u.dtype), last.to(state_dtype) if return_last_state else None,
            carries.to(state_dtype))


def scan_backward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, aux, dy, dlast):
    uc, dc, Ac, Bc, Cc, Dc, zc, dbc = _scan_prepare(u, delta, A, B, C, D, z, delta_bias)
    b, Dm, L = uc.shape
    N, G = Ac.shape[1], Bc.shape[1]
    nchunks = triton.cdiv(L, SCAN_CHUNK)
    BD = _scan_block(Dm // G, N)
    NDB = triton.cdiv(Dm, BD)
    f32 = dict(dtype=torch.float32, device=u.device)
    du, ddelta = torch.empty_like(uc), torch.empty_like(uc)
    dz = torch.empty_like(uc) if z is not None else None
    dA = torch.empty(b, Dm, N, **f32)
    BPP = _blocks_per_partial(b, NDB, G, N, L)
    NPART = NDB // BPP
    dBp, dCp = torch.empty(b, NPART, N, L, **f32), torch.empty(b, NPART, N, L, **f32)
    dD, ddb = torch.empty(b, Dm, **f32), torch.empty(b, Dm, **f32)
    dl = None if dlast is None else dlast.to(torch.float32).contiguous()
    if b * Dm:
        _scan_bwd_kernel[(NPART, b)](
            uc, dc, Ac, Bc, Cc, Dc, zc, dbc, aux.to(torch.float32).contiguous(),
            dy.to(uc.dtype).contiguous(), dl, du, ddelta, dz, dA, dBp, dCp, dD, ddb,
            Dm, L, N, Dm // G, G, nchunks, NPART, BPP,
            BD=BD, BN=next_pow2(N, 2), TC=SCAN_CHUNK, HAS_D=D is not None, HAS_Z=z is not None,
            HAS_DB=delta_bias is not None, HAS_DLAST=dlast is not None,
            SOFTPLUS=delta_softplus)
    else:
        dA.zero_(), dBp.zero_(), dCp.zero_(), dD.zero_(), ddb.zero_()
    # blocks of one group are consecutive: fixed-order sums (deterministic)
    dB = dBp.view(b, G, NPART // G, N, L).sum(2)
    dC = dCp.view(b, G, NPART // G, N, L).sum(2)
    if B.dim() == 3:
        dB, dC = dB[:, 0], dC[:, 0]
    return (du.to(u.dtype), ddelta.to(delta.dtype), dA.sum(0).to(A.dtype), dB.to(B.dtype),
            dC.to(C.dtype), None if D is None else dD.sum(0).to(D.dtype),
            None if z is None else dz.to(z.dtype),
            None if delta_bias is None else ddb.sum(0).to(delta_bias.dtype))


# =============================================================================================
# Decode: selective_state_update
# =============================================================================================
@triton.jit
def _state_update_kernel(state, x, dt, A, Bm, Cm, Dv, z, dtb, out, H, P, N, HPG,
                         s_b, s_h, s_p, s_n, x_b, x_h, x_p, dt_b, dt_h, dt_p, A_h, A_p, A_n,
                         B_b, B_g, B_n, C_b, C_g, C_n, D_h, D_p, z_b, z_h, z_p, db_h, db_p,
                         o_b, o_h, o_p,
                         BP: tl.constexpr, BN: tl.constexpr, HAS_D: tl.constexpr,
                         HAS_Z: tl.constexpr, HAS_DTB: tl.constexpr, SOFTPLUS: tl.constexpr,
                         TIE: tl.constexpr):
    pid_bh, pid_p = tl.program_id(0), tl.program_id(1)  # (batch x head) on x: no 65535 cap
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_p = pid_p * BP + tl.arange(0, BP)
    offs_n = tl.arange(0, BN)
    mp, mn = offs_p < P, offs_n < N
    m2 = mp[:, None] & mn[None, :]
    sp = state + b * s_b + h * s_h + offs_p[:, None] * s_p + offs_n[None, :] * s_n
    st = tl.load(sp, mask=m2, other=0.0).to(tl.float32)
    xv = tl.load(x + b * x_b + h * x_h + offs_p * x_p, mask=mp, other=0.0).to(tl.float32)
    if TIE:  # A / dt / dt_bias constant over p and n: one decay per (batch, head)
        dtv = tl.load(dt + b * dt_b + h * dt_h).to(tl.float32)
        if HAS_DTB:
            dtv += tl.load(dtb + h * db_h).to(tl.float32)
        if SOFTPLUS:
            dtv = _softplus(dtv)
        decay = tl.exp(dtv * tl.load(A + h * A_h).to(tl.float32))
        inp = dtv * xv
    else:
        dtv = tl.load(dt + b * dt_b + h * dt_h + offs_p * dt_p, mask=mp, other=0.0).to(tl.float32)
        if HAS_DTB:
            dtv += tl.load(dtb + h * db_h + offs_p * db_p, mask=mp, other=0.0).to(tl.float32)
        if SOFTPLUS:
            dtv = _softplus(dtv)
        Av = tl.load(A + h * A_h + offs_p[:, None] * A_p + offs_n[None, :] * A_n, mask=m2,
                     other=0.0).to(tl.float32)
        decay = tl.exp(dtv[:, None] * Av)
        inp = dtv * xv
    g = h // HPG
    Bv = tl.load(Bm + b * B_b + g * B_g + offs_n * B_n, mask=mn, other=0.0).to(tl.float32)
    Cv = tl.load(Cm + b * C_b + g * C_g + offs_n * C_n, mask=mn, other=0.0).to(tl.float32)
    new = decay * st + inp[:, None] * Bv[None, :]
    o = tl.sum(new * Cv[None, :], axis=1)
    if HAS_D:
        o += tl.load(Dv + h * D_h + offs_p * D_p, mask=mp, other=0.0).to(tl.float32) * xv
    if HAS_Z:
        zv = tl.load(z + b * z_b + h * z_h + offs_p * z_p, mask=mp, other=0.0).to(tl.float32)
        o = o * zv * _sigmoid(zv)
    tl.store(sp, new.to(state.dtype.element_ty), mask=m2)
    tl.store(out + b * o_b + h * o_h + offs_p * o_p, o.to(out.dtype.element_ty), mask=mp)


def _strides(t: Optional[Tensor], n: int):
    return (0,) * n if t is None else tuple(t.stride())


def state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    b, H, P, N = state.shape
    tie = _torch_impl.tied(A, (1, 2)) and _torch_impl.tied(dt, (2,)) and \
        _torch_impl.tied(dt_bias, (1,))
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if state.dtype == torch.float64 or x.dtype == torch.float64:  # no fp64 kernel math
        return _torch_impl.state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    BP = min(next_pow2(P, 2), max(2, 4096 // next_pow2(N, 2)))
    _state_update_kernel[(b * H, triton.cdiv(P, BP))](
        state, x, dt, A, B, C, D, z, dt_bias, out, H, P, N, H // B.shape[1],
        *state.stride(), *x.stride(), *dt.stride(), *A.stride(), *B.stride(), *C.stride(),
        *_strides(D, 2), *_strides(z, 3), *_strides(dt_bias, 2), *out.stride(),
        BP=BP, BN=next_pow2(N, 2), HAS_D=D is not None, HAS_Z=z is not None,
        HAS_DTB=dt_bias is not None, SOFTPLUS=dt_softplus, TIE=tie)
    return out


# =============================================================================================
# Causal depthwise conv1d
# =============================================================================================
@triton.jit
def _conv_taps(x, h0, seq, w, row, init_row, offs_d, t, L, b, mask_d, mt,
               x_l, h_l, sq_b, sq_l, W: tl.constexpr, HAS_INIT: tl.constexpr,
               HAS_SEQ: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr):
    """pre[d, t] (bias excluded) = sum_i w[d, i] x[d, t - W + 1 + i], the history before t = 0
    from h0; with seq only taps of t's own sequence."""
    acc = tl.zeros([BD, BT], tl.float32)
    if HAS_SEQ:
        s_t = tl.load(seq + b * sq_b + t * sq_l, mask=mt, other=0)
    for i in tl.static_range(W):
        src = t - (W - 1) + i
        m = mask_d[:, None] & (mt & (src >= 0))[None, :]
        xv = tl.load(x + row[:, None] + src[None, :] * x_l, mask=m, other=0.0).to(tl.float32)
        if HAS_INIT:
            mh = mask_d[:, None] & (mt & (src < 0))[None, :]
            hv = tl.load(h0 + init_row[:, None] + (src + W - 1)[None, :] * h_l, mask=mh,
                         other=0.0).to(tl.float32)
            xv += hv
        if HAS_SEQ:  # taps only within the sequence of t (history: token 0's)
            s_src = tl.load(seq + b * sq_b + tl.maximum(src, 0) * sq_l, mask=mt, other=0)
            xv = tl.where((s_src == s_t)[None, :], xv, 0.0)
        wi = tl.load(w + offs_d * W + i, mask=mask_d, other=0.0).to(tl.float32)
        acc += wi[:, None] * xv
    return acc


@triton.jit
def _conv_fwd_kernel(x, w, bias, h0, seq, out, Dm, L, x_b, x_d, x_l, h_b, h_d, h_l, sq_b, sq_l,
                     o_b, o_d, o_l, W: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr,
                     HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr,
                     SILU: tl.constexpr):
    pid_t, pid_d, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BD + tl.arange(0, BD)
    t = pid_t * BT + tl.arange(0, BT)
    mask_d, mt = offs_d < Dm, t < L
    row = b * x_b + offs_d.to(tl.int64) * x_d
    init_row = b * h_b + offs_d.to(tl.int64) * h_d
    acc = _conv_taps(x, h0, seq, w, row, init_row, offs_d, t, L, b, mask_d, mt, x_l, h_l,
                     sq_b, sq_l, W, HAS_INIT, HAS_SEQ, BD, BT)
    if HAS_BIAS:
        acc += tl.load(bias + offs_d, mask=mask_d, other=0.0).to(tl.float32)[:, None]
    if SILU:
        acc = acc * _sigmoid(acc)
    m2 = mask_d[:, None] & mt[None, :]
    tl.store(out + b * o_b + offs_d[:, None].to(tl.int64) * o_d + t[None, :] * o_l,
             acc.to(out.dtype.element_ty), mask=m2)


@triton.jit
def _conv_dpre_kernel(x, w, bias, h0, seq, dout, dpre, dw_part, Dm, L, NTB,
                      x_b, x_d, x_l, h_b, h_d, h_l, sq_b, sq_l, do_b, do_d, do_l,
                      W: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr,
                      HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr,
                      SILU: tl.constexpr):
    """dpre = dout * act'(pre) (fp32, [b, D, L] contiguous) and this token block's dweight
    partial dw_part[b, t-block, D, W]."""
    pid_t, pid_d, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BD + tl.arange(0, BD)
    t = pid_t * BT + tl.arange(0, BT)
    mask_d, mt = offs_d < Dm, t < L
    m2 = mask_d[:, None] & mt[None, :]
    row = b * x_b + offs_d.to(tl.int64) * x_d
    init_row = b * h_b + offs_d.to(tl.int64) * h_d
    g = tl.load(dout + b * do_b + offs_d[:, None].to(tl.int64) * do_d + t[None, :] * do_l,
                mask=m2, other=0.0).to(tl.float32)
    if SILU:
        pre = _conv_taps(x, h0, seq, w, row, init_row, offs_d, t, L, b, mask_d, mt, x_l, h_l,
                         sq_b, sq_l, W, HAS_INIT, HAS_SEQ, BD, BT)
        if HAS_BIAS:
            pre += tl.load(bias + offs_d, mask=mask_d, other=0.0).to(tl.float32)[:, None]
        s = _sigmoid(pre)
        g = g * s * (1.0 + pre * (1.0 - s))
    tl.store(dpre + (b * Dm + offs_d[:, None]).to(tl.int64) * L + t[None, :], g, mask=m2)
    if HAS_SEQ:
        s_t = tl.load(seq + b * sq_b + t * sq_l, mask=mt, other=0)
    part = ((b * NTB + pid_t) * Dm + offs_d).to(tl.int64) * W
    for i in tl.static_range(W):
        src = t - (W - 1) + i
        m = mask_d[:, None] & (mt & (src >= 0))[None, :]
        xv = tl.load(x + row[:, None] + src[None, :] * x_l, mask=m, other=0.0).to(tl.float32)
        if HAS_INIT:
            mh = mask_d[:, None] & (mt & (src < 0))[None, :]
            xv += tl.load(h0 + init_row[:, None] + (src + W - 1)[None, :] * h_l, mask=mh,
                          other=0.0).to(tl.float32)
        if HAS_SEQ:
            s_src = tl.load(seq + b * sq_b + tl.maximum(src, 0) * sq_l, mask=mt, other=0)
            xv = tl.where((s_src == s_t)[None, :], xv, 0.0)
        tl.store(dw_part + part + i, tl.sum(g * xv, axis=1), mask=mask_d)


@triton.jit
def _conv_dx_kernel(dpre, w, seq, dx, Dm, L, sq_b, sq_l, W: tl.constexpr, BD: tl.constexpr,
                    BT: tl.constexpr, HAS_SEQ: tl.constexpr):
    """dx[d, s] = sum_i w[d, i] dpre[d, s + W - 1 - i] (taps of the same sequence only)."""
    pid_t, pid_d, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BD + tl.arange(0, BD)
    s = pid_t * BT + tl.arange(0, BT)
    mask_d, ms = offs_d < Dm, s < L
    row = (b * Dm + offs_d).to(tl.int64) * L
    acc = tl.zeros([BD, BT], tl.float32)
    if HAS_SEQ:
        s_s = tl.load(seq + b * sq_b + s * sq_l, mask=ms, other=0)
    for i in tl.static_range(W):
        t = s + (W - 1) - i
        mt = ms & (t < L)
        gv = tl.load(dpre + row[:, None] + t[None, :], mask=mask_d[:, None] & mt[None, :],
                     other=0.0)
        if HAS_SEQ:
            s_t = tl.load(seq + b * sq_b + t * sq_l, mask=mt, other=0)
            gv = tl.where((s_t == s_s)[None, :], gv, 0.0)
        wi = tl.load(w + offs_d * W + i, mask=mask_d, other=0.0).to(tl.float32)
        acc += wi[:, None] * gv
    tl.store(dx + row[:, None] + s[None, :], acc, mask=mask_d[:, None] & ms[None, :])


_CONV_BD, _CONV_BT = 16, 64


def _conv_args(x, initial_states, seq_idx):
    h = initial_states
    return (*x.stride(), *(_strides(h, 3)), *(_strides(seq_idx, 2)))


def conv_forward(x, weight, bias, initial_states, seq_idx, return_final_states, activation,
                 save_pre=False):
    """save_pre is ignored: conv_backward's fused kernel recomputes SiLU's input."""
    b, Dm, L = x.shape
    W = weight.shape[1]
    out = torch.empty(b, Dm, L, dtype=x.dtype, device=x.device)
    wc = weight.float().contiguous()
    bc = None if bias is None else bias.float().contiguous()
    if b * Dm * L:
        grid = (triton.cdiv(L, _CONV_BT), triton.cdiv(Dm, _CONV_BD), b)
        _conv_fwd_kernel[grid](x, wc, bc, initial_states, seq_idx, out, Dm, L,
                               *_conv_args(x, initial_states, seq_idx), *out.stride(),
                               W=W, BD=_CONV_BD, BT=_CONV_BT, HAS_BIAS=bias is not None,
                               HAS_INIT=initial_states is not None, HAS_SEQ=seq_idx is not None,
                               SILU=activation == "silu")
    final = None
    if return_final_states:  # the last W-1 inputs (history included when L < W-1)
        hist = x.new_zeros(b, Dm, W - 1) if initial_states is None else initial_states.to(x.dtype)
        final = torch.cat([hist, x], -1)[:, :, L:]
    return (*own_storage((out, final)), None)


def conv_backward(x, weight, bias, initial_states, seq_idx, activation, dout, dfinal, pre=None):
    b, Dm, L = x.shape
    W = weight.shape[1]
    wc = weight.float().contiguous()
    bc = None if bias is None else bias.float().contiguous()
    ntb = triton.cdiv(L, _CONV_BT)
    dpre = torch.empty(b, Dm, L, dtype=torch.float32, device=x.device)
    dw_part = torch.empty(b, ntb, Dm, W, dtype=torch.float32, device=x.device)
    dx = torch.empty(b, Dm, L, dtype=torch.float32, device=x.device)
    if b * Dm * L:
        grid = (ntb, triton.cdiv(Dm, _CONV_BD), b)
        _conv_dpre_kernel[grid](x, wc, bc, initial_states, seq_idx, dout, dpre, dw_part, Dm, L,
                                ntb, *_conv_args(x, initial_states, seq_idx), *dout.stride(),
                                W=W, BD=_CONV_BD, BT=_CONV_BT, HAS_BIAS=bias is not None,
                                HAS_INIT=initial_states is not None,
                                HAS_SEQ=seq_idx is not None, SILU=activation == "silu")
        _conv_dx_kernel[grid](dpre, wc, seq_idx, dx, Dm, L, *_strides(seq_idx, 2), W=W,
                              BD=_CONV_BD, BT=_CONV_BT, HAS_SEQ=seq_idx is not None)
    dw = dw_part.sum((0, 1))
    db = None if bias is None else dpre.sum((0, 2))
    # gradient of the padded input xp = [history; x] (length W-1+L): the conv taps, history
    # included (position j feeds output t = j - i through tap i), plus dfinal on its last W-1
    dxp = torch.cat([torch.zeros(b, Dm, W - 1, dtype=torch.float32, device=x.device), dx], -1)
    if initial_states is not None:
        for j in range(W - 1):
            for i in range(j + 1):
                t = j - i
                if t >= L:
                    continue
                term = wc[:, i] * dpre[:, :, t]
                if seq_idx is not None:  # the history belongs to token 0's sequence
                    term = term * (seq_idx[:, t] == seq_idx[:, 0]).to(term.dtype)[:, None]
                dxp[:, :, j] += term
    if dfinal is not None:
        dxp[:, :, L:] += dfinal.float()
    dh0 = None if initial_states is None else dxp[:, :, :W - 1].to(initial_states.dtype)
    return own_storage((dxp[:, :, W - 1:].to(x.dtype), dw.to(weight.dtype),
                             None if db is None else db.to(bias.dtype), dh0))


def conv_update(x, conv_state, weight, bias, activation):
    """Decode: the same tap kernel on [history; x] (a few tokens): history = the last W-1
    entries of conv_state, which then shifts in place."""
    b, Dm, L = x.shape
    W, S = weight.shape[1], conv_state.shape[-1]
    hist = conv_state[:, :, S - (W - 1):]
    out, _, _ = conv_forward(x, weight, bias, hist, None, False, activation)
    conv_state.copy_(torch.cat([conv_state, x.to(conv_state.dtype)], -1)[:, :, L:])
    return out

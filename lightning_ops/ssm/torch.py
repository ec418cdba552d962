"""PyTorch backend of the state-space family: the CPU default and the executable spec of the
Triton / CUDA kernels. Only the selective scan loops over single tokens (one in-place op per token,
inside cache-sized blocks: measured faster on CPU than any whole-tensor scan here).

* Selective scan (Mamba-1): per channel d and state n the recurrence h_t = a_t h_{t-1} + x_t with
  a_t = exp(delta_t A[d, n]) <= 1 and x_t = delta_t B_t[n] u_t is elementwise in (d, n). Time is
  cut into blocks whose time-major [T, b, D, N] buffers stay in cache: a block's decays and inputs
  are built in whole-block passes, the recurrence is one in-place multiply-add per token, and
  y = C . h one batched matmul. Every decay is exp of the token's own delta_t A (never a sum), so
  gates of -20 per token over any length stay finite. The forward saves the state entering each
  block; the backward is hand-written (the adjoint recurrence, block by block in reverse, each
  block's states rebuilt from its saved entry state).
* SSD (Mamba-2) is simple GLA with q = C, k = B, v = x * dt, g = dt * A per head, on the chunk
  engine (lightning_ops.chunk): with the torch engine its pieces run in a grouped form (_SSDCore:
  C B^T once per group of heads, forward and backward by hand); the Triton backend passes its
  engine module and runs through the engine's forward / backward with B / C repeated per head.
  The element-wise part after the core (D, z) is differentiated by hand, the dt transforms (bias /
  softplus / clamp) and the initial-state transposes by autograd. With z the forward returns the
  output before the gate, so no backward re-runs a forward. seq_idx resets become extra segments
  (host read).
* causal conv1d: one depthwise F.conv1d; backward by aten.convolution_backward (the conv is
  re-run only for SiLU's derivative). With seq_idx: a masked sum over the W <= 4 taps (autograd).
* Decode steps: direct vectorised updates, states written in place.
"""
from __future__ import annotations

import contextlib
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .._custom_op import autograd_enabled, grad_by_recompute, own_storage as _own
from ..chunk import torch as chunk_engine  # SSD runs on the chunk engine
from ..precision import accumulation_dtype
from .dt import effective_dt

Tensor = torch.Tensor

SSD_CHUNK_MAX = 64  # _SSDCore's chunk (shorter for shorter sequences); results are chunk-free


def _recompute_grads(forward, inputs, grads):
    return grad_by_recompute(forward, inputs, grads)


def _rows_times(M: Tensor, v: Tensor) -> Tensor:
    """M [.., r, n] times the vectors v [.., 1, n] -> [.., 1, r], written as v M^T: the batched
    matrix-vector form M @ v^T ran 3-7x slower on CPU (measured, torch 2.13 / MKL: r = 256..3072,
    n = 16..128, batch 16..64). A single matrix goes to torch.mv, faster still."""
    if all(s == 1 for s in M.shape[:-2]):
        return torch.mv(M.reshape(M.shape[-2], M.shape[-1]), v.reshape(-1))
    return v @ M.transpose(-1, -2)


# ------------------------------------------------------------------------------------------------
# Mamba-1 selective scan: time blocks with cache-sized [T, b, D, N] working sets
# ------------------------------------------------------------------------------------------------
# The recurrence is elementwise in (b, d, n): h_t = a_t h_{t-1} + x_t, a_t = exp(delta_t A) <= 1,
# x_t = delta_t u_t B_t. Time is cut into blocks of `_scan_block` tokens laid out time-major, so
# each token's [b, D, N] slice is contiguous: per block the decays and inputs are built in a few
# whole-block passes, then the recurrence runs as one in-place multiply-add per token (the block
# stays in cache), and y = C . h as one batched matmul. No exponent is ever positive and nothing is
# cumulated: every token's decay is exp of its own delta_t A, exactly as the reference computes it.
# A non-finite input at token t reaches tokens >= t only (the per-token loop is causal).
# The forward saves the state entering each block (aux, [n_blocks, b, D, N]); the hand-written
# backward walks the blocks in reverse, rebuilding one block's states from its saved entry state
# (a block's recompute, in cache) and running the adjoint recurrence
# g_t = C_t dy_t + a_{t+1} g_{t+1} the same way.
_SCAN_BLOCK_BYTES = 1 << 18  # per [T, b, D, N] buffer (2-3 live: ~L2-sized); not yet swept
_SCAN_BLOCK_MIN, _SCAN_BLOCK_MAX = 8, 64


def _scan_block(b: int, d: int, n: int, itemsize: int) -> int:
    """Tokens per time block: a power of two whose [T, b, D, N] buffer is ~_SCAN_BLOCK_BYTES."""
    per_token = max(1, b * d * n * itemsize)
    T = _SCAN_BLOCK_MIN
    while T < _SCAN_BLOCK_MAX and 2 * T * per_token <= _SCAN_BLOCK_BYTES:
        T *= 2
    return T


def _acc_size(u: Tensor) -> int:
    return 8 if u.dtype == torch.float64 else 4


def scan_aux_shape(u, A):
    b, d, L = u.shape
    n = A.shape[1]
    T = _scan_block(b, d, n, _acc_size(u))
    return (-(-L // T), b, d, n)


class _ScanInputs:
    """The scan's inputs time-major in the compute dtype: dl, u [L, b, D]; B, C [L, b, G, N]."""

    def __init__(self, u, delta, A, B, C, delta_bias, delta_softplus):
        acc = accumulation_dtype(u)
        self.b, self.d, self.L = u.shape
        self.n = A.shape[1]
        self.G = 1 if B.dim() == 3 else B.shape[1]
        self.dg = self.d // self.G
        pre = delta.to(acc)
        if delta_bias is not None:
            pre = pre + delta_bias.to(acc)[:, None]
        self.pre = pre if delta_softplus else None  # softplus' input, for its derivative
        dl = F.softplus(pre) if delta_softplus else pre
        self.dl = dl.permute(2, 0, 1).contiguous()
        self.u = u.to(acc).permute(2, 0, 1).contiguous()
        shape = (self.b, self.G, self.n, self.L)
        self.B = B.to(acc).reshape(shape).permute(3, 0, 1, 2).contiguous()
        self.C = C.to(acc).reshape(shape).permute(3, 0, 1, 2).contiguous()
        self.A = A.to(acc)
        self.T = _scan_block(self.b, self.d, self.n, _acc_size(u))
        self.acc = acc

    def buffer(self) -> Tensor:
        return torch.empty(self.T, self.b, self.d, self.n, dtype=self.acc, device=self.u.device)

    def block_states(self, t0: int, t1: int, h: Tensor, a: Tensor, x: Tensor) -> None:
        """Decays a_t (into a) and states h_t (into x) of tokens t0..t1-1 from h = h_{t0-1}."""
        T, b, G, dg, n = t1 - t0, self.b, self.G, self.dg, self.n
        dl = self.dl[t0:t1]
        torch.mul(dl[..., None], self.A, out=a).exp_()
        torch.mul((dl * self.u[t0:t1]).view(T, b, G, dg, 1), self.B[t0:t1].view(T, b, G, 1, n),
                  out=x.view(T, b, G, dg, n))
        xs, as_ = x.unbind(0), a.unbind(0)
        prev = h
        for t in range(T):
            prev = xs[t].addcmul_(as_[t], prev)

    def contract(self, H: Tensor, t0: int, t1: int) -> Tensor:
        """sum_n H[t, b, d, n] C[t, b, g(d), n] -> [T, b, D] (one batched matmul, C as rows:
        see _rows_times)."""
        TG = (t1 - t0) * self.b * self.G
        out = _rows_times(H.view(TG, self.dg, self.n), self.C[t0:t1].reshape(TG, 1, self.n))
        return out.view(t1 - t0, self.b, self.d)

    def blocks(self):
        return [(t0, min(t0 + self.T, self.L)) for t0 in range(0, self.L, self.T)]


def scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    with torch.no_grad():
        s = _ScanInputs(u, delta, A, B, C, delta_bias, delta_softplus)
        blocks = s.blocks()
        aux = torch.empty(len(blocks), s.b, s.d, s.n, dtype=s.acc, device=u.device)
        y = torch.empty(s.L, s.b, s.d, dtype=s.acc, device=u.device)
        h = u.new_zeros(s.b, s.d, s.n, dtype=s.acc)
        a, x = s.buffer(), s.buffer()
        for i, (t0, t1) in enumerate(blocks):
            aux[i] = h
            T = t1 - t0
            s.block_states(t0, t1, h, a[:T], x[:T])
            y[t0:t1] = s.contract(x[:T], t0, t1)
            h = x[T - 1].clone()  # x is overwritten by the next block
        y = y.permute(1, 2, 0)
        if D is not None:
            y = y + D.to(s.acc)[:, None] * s.u.permute(1, 2, 0)
        if z is not None:
            y = y * F.silu(z.to(s.acc))
        y = y.to(u.dtype).contiguous()
    return y, (h if return_last_state else None), aux


def scan_backward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, aux, dy, dlast):
    with torch.no_grad():
        s = _ScanInputs(u, delta, A, B, C, delta_bias, delta_softplus)
        acc, b, d, n, G, dg, L = s.acc, s.b, s.d, s.n, s.G, s.dg, s.L
        dyf = dy.to(acc)
        zf = None if z is None else z.to(acc)
        dyc = dyf if zf is None else dyf * F.silu(zf)  # gradient w.r.t. y before the z gate
        dyT = dyc.permute(2, 0, 1).contiguous()  # [L, b, d]
        yT = None if zf is None else torch.empty(L, b, d, dtype=acc, device=u.device)
        dlT = torch.empty(L, b, d, dtype=acc, device=u.device)  # d dl
        duT = torch.empty(L, b, d, dtype=acc, device=u.device)
        dBT = torch.empty(L, b, G, n, dtype=acc, device=u.device)
        dCT = torch.empty(L, b, G, n, dtype=acc, device=u.device)
        dA = torch.zeros(d, n, dtype=acc, device=u.device)
        carry = (torch.zeros(b, d, n, dtype=acc, device=u.device) if dlast is None
                 else dlast.to(acc).clone())  # added to g of the block's last token
        a, x, g = s.buffer(), s.buffer(), s.buffer()
        blocks = s.blocks()
        for i in range(len(blocks) - 1, -1, -1):
            t0, t1 = blocks[i]
            T, TG = t1 - t0, (t1 - t0) * b * G
            h0 = aux[i]
            ab, xb, gb = a[:T], x[:T], g[:T]
            s.block_states(t0, t1, h0, ab, xb)  # xb: the states h_t
            if yT is not None:
                yT[t0:t1] = s.contract(xb, t0, t1)
            dyb = dyT[t0:t1]
            torch.mul(dyb.view(T, b, G, dg, 1), s.C[t0:t1].view(T, b, G, 1, n),
                      out=gb.view(T, b, G, dg, n))
            gs, as_ = gb.unbind(0), ab.unbind(0)
            gs[T - 1].add_(carry)
            for t in range(T - 2, -1, -1):
                gs[t].addcmul_(as_[t + 1], gs[t + 1])
            carry = ab[0] * gb[0]
            # q = g_t a_t h_{t-1}: the gradient w.r.t. the log decay delta_t A (into ab)
            q = ab.mul_(gb)
            q[1:].mul_(xb[:T - 1])
            q[0].mul_(h0)
            dlb = s.dl[t0:t1]
            dl_from_a = (q * s.A).sum(-1)  # [T, b, d]
            dA += q.mul_(dlb[..., None]).sum((0, 1))
            gB = _rows_times(gb.view(TG, dg, n), s.B[t0:t1].reshape(TG, 1, n)).view(T, b, d)
            ub = s.u[t0:t1]
            torch.addcmul(dl_from_a, ub, gB, out=dlT[t0:t1])
            torch.mul(dlb, gB, out=duT[t0:t1])
            torch.matmul((dlb * ub).view(TG, 1, dg), gb.view(TG, dg, n),
                         out=dBT[t0:t1].view(TG, 1, n))
            torch.matmul(dyb.reshape(TG, 1, dg), xb.view(TG, dg, n),
                         out=dCT[t0:t1].view(TG, 1, n))
        uf = s.u.permute(1, 2, 0)
        du = duT.permute(1, 2, 0)
        dD = dz = None
        if D is not None:
            du = du + D.to(acc)[:, None] * dyc
            dD = (dyc * uf).sum((0, 2))
        if zf is not None:
            ycore = yT.permute(1, 2, 0)
            if D is not None:
                ycore = ycore + D.to(acc)[:, None] * uf
            sz = torch.sigmoid(zf)
            dz = dyf * ycore * sz * (1 + zf * (1 - sz))
        ddelta = dlT.permute(1, 2, 0)
        if s.pre is not None:
            ddelta = ddelta * torch.sigmoid(s.pre)
        ddb = None if delta_bias is None else ddelta.sum((0, 2))
        dB = dBT.permute(1, 2, 3, 0).reshape(B.shape)
        dC = dCT.permute(1, 2, 3, 0).reshape(C.shape)
        out = (du, ddelta, dA, dB, dC, dD, dz, ddb)
        refs = (u, delta, A, B, C, D, z, delta_bias)
        return _own(tuple(None if g_ is None else g_.to(r.dtype).contiguous()
                          for g_, r in zip(out, refs)))


# ------------------------------------------------------------------------------------------------
# Mamba-2 SSD on the chunk engine
# ------------------------------------------------------------------------------------------------
# SSD is simple GLA with q = C, k = B, v = x dt, g = dt A (one scalar gate per head and token).
# With the torch engine (the default here) the core runs on the engine's own pieces (chunk
# layout, gate factors, state passing, gate-gradient rules) in a grouped form, _SSDCore: B and C
# are shared by the h/g heads of their group, so C B^T and its gradients are [NC, g, C, C]
# matmuls done once per group, and nothing is repeated per head except the decayed
# q_inter / k_inter of the inter-chunk matmuls. Forward and backward are hand-written (no autograd
# over chunk-sized tensors); the backward recomputes only the cheap chunk pieces (decay masks,
# C B^T, chunk states), never the forward's output: with z the forward hands back the pre-gate
# output (core + D x), which the backward takes for dz.
# Any other engine (the Triton one) runs through its forward/backward contract with q / k
# repeated per head (_ssd_engine_inputs); so do inputs with a non-finite entry on the torch engine
# (its NonFiniteGuard keeps causality for them; the finiteness test is the same in both passes).
class _Segments:
    """The packed segments the chunk engine runs: the batch rows (or cu_seqlens' sequences) split
    further wherever seq_idx changes, since a reset to a zero state is a new sequence.
    Without seq_idx nothing is read from the device (cu_seqlens passes through as it is). With
    seq_idx the change points are read on the host: one device sync per call on GPU (both
    backends share this layer; the engines themselves build their chunk tables)."""

    def __init__(self, b: int, l: int, seq_idx: Optional[Tensor], cu_seqlens: Optional[Tensor]):
        self.flat = seq_idx is not None or cu_seqlens is not None
        self.split = False
        if seq_idx is None:  # the engine's own segments: rows, or cu_seqlens as given
            self.N = b if cu_seqlens is None else cu_seqlens.numel() - 1
            self.cu = cu_seqlens
            return
        if cu_seqlens is None:
            starts = [i * l for i in range(b)]
            ends = [(i + 1) * l for i in range(b)]
        else:
            cu = cu_seqlens.tolist()
            starts, ends = cu[:-1], cu[1:]
        self.N = len(starts)
        s = seq_idx.reshape(-1)
        cuts = (torch.nonzero(s[1:] != s[:-1]).flatten() + 1).tolist()  # a run starts here
        sub_starts, self.first = [], []  # sub-segment start; is it its sequence's first?
        self.last: List[int] = []  # index of each sequence's last sub-segment
        ci = 0
        for st, en in zip(starts, ends):
            while ci < len(cuts) and cuts[ci] <= st:
                ci += 1
            sub_starts.append(st)
            self.first.append(True)
            while ci < len(cuts) and cuts[ci] < en:
                sub_starts.append(cuts[ci])
                self.first.append(False)
                ci += 1
            self.last.append(len(sub_starts) - 1)
        self.split = len(sub_starts) != self.N
        bounds = sub_starts + [b * l]
        self.cu = torch.tensor(bounds, dtype=torch.int64)
        # sub-segment i ends where i+1 starts: sequences are contiguous in the packed rows
        self.seq_of_sub = torch.tensor([i for i, _ in enumerate(starts)
                                        for _ in range(self._count(i))], dtype=torch.int64)

    def _count(self, i: int) -> int:
        prev = -1 if i == 0 else self.last[i - 1]
        return self.last[i] - prev

    def initial(self, h0: Optional[Tensor]) -> Optional[Tensor]:
        """Per sub-segment initial states: the sequence's h0 for its first piece, zeros after."""
        if h0 is None or not self.split:
            return h0
        first = torch.tensor(self.first, device=h0.device)
        return h0[self.seq_of_sub.to(h0.device)] * first.to(h0.dtype)[:, None, None, None]

    def final(self, ht: Tensor) -> Tensor:
        return ht if not self.split else ht[torch.tensor(self.last, device=ht.device)]

    def dfinal(self, dht: Optional[Tensor]) -> Optional[Tensor]:
        """Cotangent of the sub-segment final states from the sequences' ones."""
        if dht is None or not self.split:
            return dht
        out = dht.new_zeros(len(self.first), *dht.shape[1:])
        out[torch.tensor(self.last, device=dht.device)] = dht
        return out

    def rows(self, t: Optional[Tensor]) -> Optional[Tensor]:
        """[b, l, ...] -> the engine's rows: [1, b*l, ...] when segments are packed (a view)."""
        if t is None or not self.flat:
            return t
        return t.reshape(1, t.shape[0] * t.shape[1], *t.shape[2:])

    def core_cu(self, ref: Tensor) -> Optional[Tensor]:
        return None if self.cu is None else self.cu.to(ref.device)


def _pair_gate_grad(P: Tensor) -> Tensor:
    """The engine's pair_gate_grad rule in three passes: d g_s = sum over pairs i >= s > j of
    P_ij (only the pairs whose decay contains g_s). With Q = P summed over j <= c (row prefix),
    d g_{c+1} = sum_{i > c} Q_ic, a column sum of Q's strictly lower part. P is overwritten."""
    col = P.cumsum_(-1).tril_(-1).sum(-2)  # [.., C]: index c -> g_{c+1}
    return torch.cat([torch.zeros_like(col[..., :1]), col[..., :-1]], -1)


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """sum over the last dim of a * b."""
    return (a * b).sum(-1)


class _SSDCore:
    """The SSD core on the torch engine's chunk pieces, B / C per group (see above).
    x [B', T', h, p] and dtf [B', T', h] (processed dt) in the compute dtype, A [h], B / C
    [B', T', g, n], h0 [N, h, n, p] (the engine's [K, V] orientation) or None; cu: the engine's
    cu_seqlens. `finite` is False (and nothing else is built) when x dt, B or dt A has a NaN /
    +inf entry: the caller then runs the engine itself, whose guard handles those."""

    def __init__(self, x: Tensor, dtf: Tensor, A: Tensor, B: Tensor, C: Tensor,
                 h0: Optional[Tensor], cu: Optional[Tensor]):
        acc = dtf.dtype
        Bt, T, h, p = x.shape
        G, n = B.shape[2:]
        size = chunk_engine.chunk_size_for(chunk_engine.longest(T, cu), SSD_CHUNK_MAX)
        lay = chunk_engine.ChunkLayout.build(Bt, T, cu, size, x.device)
        self.layout, self.h, self.G, self.R = lay, h, G, h // G
        self.xc = lay.pack(x, acc)  # [NC, h, C, p]
        self.dtc = lay.pack(dtf, acc)  # [NC, h, C]
        self.X = self.xc * self.dtc[..., None]  # v = x dt
        self.g = lay.pack(dtf * A.to(acc), acc)  # [NC, h, C], 0 in padding
        self.Bc, self.Cc = lay.pack(B, acc), lay.pack(C, acc)  # [NC, g, C, n]
        inf = float("inf")
        self.finite = bool(torch.stack([torch.isfinite(self.X.sum()),
                                        torch.isfinite(self.Bc.sum()),
                                        self.g.sum() < inf]).all())
        if not self.finite:
            return
        self.qd, self.kd, self.cd = chunk_engine.gate_factors(self.g)  # [NC,h,C,1] x2, [NC,h,1,1]
        self.q_inter = self._per_head(self.Cc, self.qd)  # C exp(sum_{s<=t} g)
        self.k_inter = self._per_head(self.Bc, self.kd)  # B exp(sum_{s>t} g)
        self.h0 = h0 if h0 is not None else x.new_zeros(lay.N, h, n, p, dtype=acc)
        local = self.k_inter.transpose(-1, -2) @ self.X  # [NC, h, n, p]
        self.states, self.final = chunk_engine.state_passing(lay, self.h0, self.cd, local)

    def _heads(self, t: Tensor) -> Tensor:
        """[NC, h, ...] -> view [NC, g, h/g, ...]."""
        return t.view(t.shape[0], self.G, self.R, *t.shape[2:])

    def _per_head(self, Y: Tensor, decay: Tensor) -> Tensor:
        """Y [NC, g, C, n] (per group) times a per-head decay [NC, h, C, 1] -> [NC, h, C, n]."""
        return (Y[:, :, None] * self._heads(decay)).flatten(1, 2)

    def _group_sum(self, t: Tensor) -> Tensor:
        """[NC, h, ...] -> [NC, g, ...]: summed over the heads of each group."""
        return t if self.R == 1 else self._heads(t).sum(2)

    def _scores(self):
        """(C B^T per group with zeros above the diagonal [NC, g, C, C] (set by selection, so a
        non-finite later key never reaches an earlier row), decay mask [NC, h, C, C])."""
        CB = (self.Cc @ self.Bc.transpose(-1, -2)).tril_()
        return CB, chunk_engine.causal_decays(self.g)

    def forward(self) -> Tensor:
        """The core output o = C H + (C B^T * L) X per chunk, [NC, h, C, p]."""
        CB, L = self._scores()
        S = self._heads(L).mul_(CB[:, :, None]).flatten(1, 2)  # the decayed scores, L in place
        o = S @ self.X  # intra, then + q_inter H in place
        o.flatten(0, 1).baddbmm_(self.q_inter.flatten(0, 1), self.states.flatten(0, 1))
        return o

    def backward(self, do: Tensor, dht: Optional[Tensor]):
        """do [NC, h, C, p] (the core output's gradient, packed), dht [N, h, n, p] or None ->
        (dX [NC, h, C, p] (w.r.t. x dt), dB, dC [NC, g, C, n], dg [NC, h, C], dh0 [N, h, n, p])."""
        lay = self.layout
        dht = torch.zeros_like(self.h0) if dht is None else dht
        dE, dh0 = chunk_engine.state_passing_backward(lay, self.cd,
                                              self.q_inter.transpose(-1, -2) @ do, dht)
        CB, L = self._scores()
        CBh = CB[:, :, None]
        S = (self._heads(L) * CBh).flatten(1, 2)
        dX = S.transpose(-1, -2) @ do  # intra
        dX.flatten(0, 1).baddbmm_(self.k_inter.flatten(0, 1), dE.flatten(0, 1))  # inter
        del S
        # scores: S = (C B^T) * L per head; d(C B^T) per head = dS * L (lower triangle)
        dCBh = (do @ self.X.transpose(-1, -2)).mul_(L).tril_()
        # gradient w.r.t. the log pair decays sum_{j<s<=i} g_s: dS * S = dCBh * C B^T (into
        # L's buffer: fewer fresh pages)
        P = torch.mul(self._heads(dCBh), CBh, out=self._heads(L))
        del L
        dg = _pair_gate_grad(P.flatten(1, 2))
        dCB = self._group_sum(dCBh)
        del dCBh
        dC = dCB @ self.Bc
        dB = dCB.transpose(-1, -2) @ self.Cc
        # inter-chunk: o += q_inter H, H_{n+1} = cd H_n + k_inter^T X
        dqi = do @ self.states.transpose(-1, -2)  # w.r.t. q_inter, [NC, h, C, n]
        dki = self.X @ dE.transpose(-1, -2)  # w.r.t. k_inter
        from_q = _row_dot(self.q_inter, dqi)
        from_k = _row_dot(self.k_inter, dki)
        dC += self._group_sum(dqi.mul_(self.qd))
        dB += self._group_sum(dki.mul_(self.kd))
        from_total = _row_dot(self.states.flatten(2), dE.flatten(2)) * self.cd.flatten(1)
        dg = chunk_engine.gate_grad(from_q, from_k, from_total, dg)
        return dX, dB, dC, dg, dh0


def _ssd_engine_inputs(x, dtf, A, B, C, rep):
    """The engine contract's (q, k, v, g) with B / C repeated per head."""
    return (C.repeat_interleave(rep, dim=2), B.repeat_interleave(rep, dim=2),
            x * dtf[..., None], dtf * A)


def _ssd_post(core, x, D, z):
    """core [b, l, h, p] from the engine -> (y, pre-gate output core + D x) in the compute
    dtype; y = pre * silu(z)."""
    pre = core
    if D is not None:
        Df = D.to(core.dtype)
        pre = pre + (Df[:, None] if Df.dim() == 1 else Df) * x.to(core.dtype)
    y = pre if z is None else pre * F.silu(z.to(pre.dtype))
    return y, pre


def ssd_forward(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, chunk_size,
                dt_softplus, dt_min, dt_max, return_final_states, need_pre=False,
                engine=chunk_engine):
    """-> (y, final states or None, pre-gate output core + D x in the compute dtype when
    need_pre and z is given, else None: what the backward's dz needs, so it never recomputes the
    forward). engine: a chunk-engine backend module (its forward/backward contract): the torch
    engine here (run as _SSDCore), lightning_ops.chunk.triton for the Triton backend."""
    b, l, h, _ = x.shape
    acc = accumulation_dtype(x)
    segs = _Segments(b, l, seq_idx, cu_seqlens)
    cu = segs.core_cu(x)
    with torch.no_grad():
        dtf = effective_dt(dt, dt_bias, dt_softplus, (dt_min, dt_max), acc)
        xr, dtr, Br, Cr = (segs.rows(t) for t in (x.to(acc), dtf, B, C))
        h0 = segs.initial(None if initial_states is None
                          else initial_states.to(acc).transpose(-1, -2))  # [N, h, n, p]
        core = None
        if engine is chunk_engine:
            sc = _SSDCore(xr, dtr, A, Br, Cr, h0, cu)
            if sc.finite:
                lay = sc.layout
                core, ht = lay.unpack(sc.forward()), (sc.final if return_final_states else None)
                del sc
        if core is None:  # the engine's contract (Triton, or non-finite inputs)
            q, k, v, g = _ssd_engine_inputs(xr, dtr, A.to(acc), Br.to(acc), Cr.to(acc),
                                            h // B.shape[2])
            core, ht = engine.forward(q, k, v, g, None, 1.0, h0, return_final_states, cu,
                                      "chunk")
        if core.shape != x.shape:
            core = core.reshape(x.shape)
        y, pre = _ssd_post(core.to(acc), x, D, z)
        y = y.to(x.dtype)
        pre = pre if (need_pre and z is not None) else None
    final = None if ht is None else segs.final(ht).transpose(-1, -2).contiguous()
    return _own((y, final, pre))


def _ssd_post_grads(dy, x, D, z, pre):
    """Gradients of the element-wise part y = (core + D x) * silu(z) around the core:
    (d core, dx share, dD, dz). pre: the pre-gate output core + D x (the forward's), or a
    callable giving it; used only with z (dz is the one gradient that needs it)."""
    acc = accumulation_dtype(x)
    dyf, xf = dy.to(acc), x.to(acc)
    Df = None
    if D is not None:
        Df = D.to(acc)
        Df = Df[:, None] if Df.dim() == 1 else Df  # [h, 1] or [h, p]
    dz = None
    if z is not None:
        zf = z.to(acc)
        sz = torch.sigmoid(zf)
        pre = (pre() if callable(pre) else pre).to(acc).reshape(dyf.shape)
        dz = dyf * pre * sz * (1 + zf * (1 - sz))
        dyf = dyf * zf * sz  # d (core + D x) = dy * silu(z)
    dx = dD = None
    if D is not None:
        dx = Df * dyf
        dD = (dyf * xf).sum((0, 1))
        if D.dim() == 1:
            dD = dD.sum(-1)
    return dyf, dx, dD, dz


def ssd_backward(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, chunk_size,
                 dt_softplus, dt_min, dt_max, dy, dfinal, pre=None, engine=chunk_engine):
    """Hand-written around the core: the element-wise part by hand (_ssd_post_grads, with the
    forward's pre-gate output `pre` for dz), the core by _SSDCore.backward (torch engine) or the
    engine's own backward, the processed dt's and the initial states' transforms by autograd
    (tiny [b, l, h] / state-sized graphs). Without `pre` (a caller of the older contract) and
    with z, the core's forward is re-run once for dz."""
    b, l, h, _ = x.shape
    acc = accumulation_dtype(x)
    segs = _Segments(b, l, seq_idx, cu_seqlens)
    cu = segs.core_cu(x)
    ldt = dt.detach().requires_grad_()
    ldtb = None if dt_bias is None else dt_bias.detach().requires_grad_()
    lh0 = None if initial_states is None else initial_states.detach().requires_grad_()
    with autograd_enabled():  # the cheap transforms keep a graph
        dtf_g = effective_dt(ldt, ldtb, dt_softplus, (dt_min, dt_max), acc)
        h0_g = segs.initial(None if lh0 is None else lh0.to(acc).transpose(-1, -2))
    with torch.no_grad():
        dtf, h0 = dtf_g.detach(), None if h0_g is None else h0_g.detach()
        xf = x.detach().to(acc)
        xr, dtr, Br, Cr = (segs.rows(t) for t in (xf, dtf, B.detach(), C.detach()))
        Af = A.detach().to(acc)
        dht = segs.dfinal(None if dfinal is None else dfinal.to(acc).transpose(-1, -2))
        sc = _SSDCore(xr, dtr, Af, Br, Cr, h0, cu) if engine is chunk_engine else None
        if sc is not None and not sc.finite:
            sc = None
        if pre is None and z is not None:
            def pre():  # the older contract: the core's forward once more
                if sc is not None:
                    return sc.layout.unpack(sc.forward())
                q, k, v, g = _ssd_engine_inputs(xr, dtr, Af, Br.to(acc), Cr.to(acc),
                                                h // B.shape[2])
                core = engine.forward(q, k, v, g, None, 1.0, h0, False, cu, "chunk")[0]
                return _ssd_post(core.to(acc).reshape(x.shape), x, D, None)[1]
        dcore, dx_post, dD, dz = _ssd_post_grads(dy, x, D, z, pre)
        dcore_r = segs.rows(dcore)
        if sc is not None:
            lay = sc.layout
            dXc, dBc, dCc, dgc, dh0 = sc.backward(lay.pack(dcore_r, acc), dht)
            dv, dg = lay.unpack(dXc), lay.unpack(dgc)
            dB, dC = lay.unpack(dBc), lay.unpack(dCc)
            del sc
        else:
            rep = h // B.shape[2]
            q, k, v, g = _ssd_engine_inputs(xr, dtr, Af, Br.to(acc), Cr.to(acc), rep)
            dq, dk, dv, dg, dh0 = engine.backward(q, k, v, g, None, 1.0, h0, cu, "chunk",
                                                  dcore_r.contiguous(), dht)
            G = B.shape[2]
            dB = dk.view(*dk.shape[:2], G, rep, -1).sum(3)
            dC = dq.view(*dq.shape[:2], G, rep, -1).sum(3)
        dv, dg = dv.reshape(x.shape).to(acc), dg.reshape(dt.shape).to(acc)
        dx = dv * dtf[..., None]
        if dx_post is not None:
            dx += dx_post
        ddtf = _row_dot(dv, xf).addcmul_(dg, Af)  # v = x dt, g = dt A
        dA = (dg * dtf).sum((0, 1))
        dB, dC = dB.reshape(B.shape), dC.reshape(C.shape)
    with autograd_enabled():
        outs = [dtf_g] + ([h0_g] if h0_g is not None and dh0 is not None else [])
        cots = [ddtf] + ([dh0.to(acc)] if len(outs) > 1 else [])
        wrt = [t for t in (ldt, ldtb, lh0) if t is not None]
        got = torch.autograd.grad(outs, wrt, cots, allow_unused=True)
    got = iter(got)
    ddt = next(got)
    ddtb = None if ldtb is None else next(got)
    dh0_in = None if lh0 is None else next(got)
    out = [dx, ddt, dA, dB, dC, dD, dz, ddtb, dh0_in]
    refs = (x, dt, A, B, C, D, z, dt_bias, initial_states)
    return _own(tuple(None if r is None else
                      (torch.zeros_like(r) if g_ is None else g_.to(r.dtype).contiguous())
                      for g_, r in zip(out, refs)))


def tied(t: Optional[Tensor], dims: Sequence[int]) -> bool:
    """t is absent or constant along dims (stride 0 or size 1): one value serves them all."""
    return t is None or all(t.stride(d) == 0 or t.shape[d] == 1 for d in dims)


def _per_head(X: Tensor, h: int) -> Tensor:
    """[b, g, n] -> [b, h, 1, n], head i reading group i // (h / g); a view unless 1 < g < h."""
    b, g, n = X.shape
    if g == h:
        return X[:, :, None, :]
    if g == 1:
        return X[:, :, None, :].expand(b, h, 1, n)
    return X.repeat_interleave(h // g, dim=1)[:, :, None, :]


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    """Heads form: state [b,h,p,n], x/dt/z [b,h,p], A [h,p,n], B/C [b,g,n], D/dt_bias [h,p];
    also the Mamba-1 form as it is: state [b,D,n], x/dt/z [b,D], A [D,n], B/C [b,n], D/dt_bias
    [D] (one group of D rows). A / dt / dt_bias tied over p (stride 0, as Mamba-2 expands them)
    take the per-head path: one decay per (batch, head). A contiguous state in the compute dtype
    is updated by two in-place passes (decay, then + dt x B), and the output is one batched
    matmul per group: its heads stacked as rows against its C (B and C never repeated per head).
    A decode step is a few small ops: each op counts, so no-op casts are skipped."""
    acc = accumulation_dtype(x)
    if state.dim() == 4:
        b, h, p, n = state.shape
        g = B.shape[1]
        rows = (b, g, (h // g) * p)
        if tied(A, (1, 2)) and tied(dt, (2,)) and tied(dt_bias, (1,)):
            dt, A = dt.narrow(2, 0, 1), A.narrow(1, 0, 1).narrow(2, 0, 1)  # [b,h,1], [h,1,1]
            dt_bias = None if dt_bias is None else dt_bias.narrow(1, 0, 1)
        Bf, Cf = _as(B, acc).unsqueeze(2), _as(C, acc).unsqueeze(2)  # [b, g, 1, n]
    else:
        b, d, n = state.shape
        rows = (b, d)
        Bf, Cf = _as(B, acc).unsqueeze(1), _as(C, acc).unsqueeze(1)  # [b, 1, n]
    dtf = _as(dt, acc)
    if dt_bias is not None:
        dtf = dtf + _as(dt_bias, acc)
    if dt_softplus:
        dtf = F.softplus(dtf)
    xf = _as(x, acc)
    decay = (dtf.unsqueeze(-1) * _as(A, acc)).exp_()  # [.., p | 1, n | 1]
    dtx = dtf * xf
    if state.dtype == acc and state.is_contiguous():
        state.mul_(decay)
        sv = state.view(*rows, n)
        sv.addcmul_(dtx.reshape(*rows, 1), Bf)
        out = _rows_times(sv, Cf).view(x.shape)
    else:
        if state.dim() == 4:
            h = state.shape[1]
            Bf, Cf = _per_head(_as(B, acc), h), _per_head(_as(C, acc), h)  # [b, h, 1, n]
        new = torch.addcmul(decay * state.to(acc), dtx.unsqueeze(-1), Bf)
        state.copy_(new)
        out = _rows_times(new, Cf).view(x.shape)
    if D is not None:
        out.addcmul_(_as(D, acc), xf)
    if z is not None:
        out.mul_(F.silu(_as(z, acc)))
    return _as(out, x.dtype)


# ------------------------------------------------------------------------------------------------
# Causal depthwise conv1d
# ------------------------------------------------------------------------------------------------
# One depthwise F.conv1d (left padding W-1, or the history prepended when initial_states is
# given), as causal-conv1d's own reference; the backward is aten.convolution_backward (input and
# weight gradients in one call, what autograd of F.conv1d runs), recomputing the conv only when
# SiLU's derivative needs its input. seq_idx (packed sequences) keeps the masked shifted sum.
def _conv_input(x, initial_states, acc):
    """(conv input, left padding): x itself with padding W-1, or [history, x] with none."""
    if initial_states is None:
        return x.to(acc), None
    return torch.cat([initial_states.to(acc), x.to(acc)], dim=-1), 0


def _conv_full(xin, w, bias, pad, W):
    """The conv before the activation as F.conv1d returns it: [b, d, L + W - 1] of which the
    first L are the causal outputs (padding W-1), or [b, d, L] when the history is prepended."""
    d = w.shape[0]
    y = F.conv1d(xin, w[:, None, :], bias, padding=W - 1 if pad is None else 0, groups=d)
    # F.conv1d's result is a squeezed view of its own 4-d output: detached, it owns its whole
    # storage, so returning it from the custom op costs no defensive copy (own_storage); under
    # autograd (conv_autograd) it keeps its graph
    return y if y.requires_grad else y.detach()


def _conv_pre(xin, w, bias, pad, W):
    """The conv before the activation, [b, d, L] (a view of _conv_full's output)."""
    return _conv_full(xin, w, bias, pad, W)[..., :xin.shape[-1] - (0 if pad is None else W - 1)]


def _conv_final(x, initial_states, W, acc):
    """The last W-1 inputs (history included when L < W-1), [b, d, W-1]."""
    b, d, L = x.shape
    if L >= W - 1:
        return x[..., L - (W - 1):].to(acc)
    hist = (x.new_zeros(b, d, W - 1, dtype=acc) if initial_states is None
            else initial_states.to(acc))
    return torch.cat([hist, x.to(acc)], dim=-1)[..., L:]


def _conv_masked(x, weight, bias, initial_states, seq_idx, activation):
    """out[t] = act(bias + sum_i w[:, i] x[t - W + 1 + i]) as W shifted products (W <= 4),
    each tap reading only inputs of the same sequence as t (the history before t = 0 belongs to
    token 0's sequence). Differentiable; used with seq_idx."""
    acc = accumulation_dtype(x)
    b, d, L = x.shape
    W = weight.shape[1]
    hist = (x.new_zeros(b, d, W - 1, dtype=acc) if initial_states is None
            else initial_states.to(acc))
    xp = torch.cat([hist, x.to(acc)], dim=-1)  # [b, d, W-1+L]
    w = weight.to(acc)
    out = torch.zeros(b, d, L, dtype=acc, device=x.device) if bias is None \
        else bias.to(acc)[:, None].expand(b, d, L)
    sp = torch.cat([seq_idx[:, :1].expand(b, W - 1), seq_idx], dim=-1)
    for i in range(W):
        term = w[:, i, None] * xp[:, :, i:i + L]
        term = term * (sp[:, i:i + L] == seq_idx)[:, None, :].to(acc)
        out = out + term
    if activation == "silu":
        out = F.silu(out)
    final = xp[:, :, xp.shape[-1] - (W - 1):]
    return out.to(x.dtype), final.to(x.dtype)


def _conv_math(x, weight, bias, initial_states, seq_idx, activation, save_pre=False):
    """-> (out in x's dtype, final_states [b, d, W-1] in x's dtype, and when save_pre and SiLU
    the conv's full output (_conv_full: SiLU's input is its first L columns; kept whole, not
    copied out of the strided slice), else None)."""
    if seq_idx is not None:
        return (*_conv_masked(x, weight, bias, initial_states, seq_idx, activation), None)
    acc = accumulation_dtype(x)
    L, W = x.shape[-1], weight.shape[1]
    xin, pad = _conv_input(x, initial_states, acc)
    full = _conv_full(xin, weight.to(acc), None if bias is None else bias.to(acc), pad, W)
    out = full[..., :L]
    if activation == "silu":  # reads the strided slice once, writes a dense output
        out = F.silu(out)
    return out.to(x.dtype), _conv_final(x, initial_states, W, acc).to(x.dtype), \
        full if save_pre and activation == "silu" else None


def conv_forward(x, weight, bias, initial_states, seq_idx, return_final_states, activation,
                 save_pre=False):
    """-> (out, final or None, pre or None). save_pre: keep SiLU's input for the backward
    (one [b, d, L] tensor, what autograd of F.conv1d + silu keeps too) instead of recomputing
    the conv there."""
    with torch.no_grad():
        out, final, pre = _conv_math(x, weight, bias, initial_states, seq_idx, activation,
                                     save_pre)
    return _own((out, final.contiguous() if return_final_states else None, pre))


def conv_autograd(x, weight, bias, initial_states, seq_idx, return_final_states, activation):
    """-> (out, final or None), differentiable by autograd through the forward's own ops
    (F.conv1d, SiLU, slices, a concatenation): what the op's plain-eager path runs. A conv and
    an activation are aten ops whose C++ autograd nodes cost less than any Python backward, and
    their gradients are the ones conv_backward forms (aten.convolution_backward, silu_backward).
    final is a copy (never a view of x)."""
    out, final, _ = _conv_math(x, weight, bias, initial_states, seq_idx, activation)
    return out, (final.clone(memory_format=torch.contiguous_format) if return_final_states
                 else None)


def conv_backward(x, weight, bias, initial_states, seq_idx, activation, dout, dfinal, pre=None):
    """pre: the conv's full output as conv_forward(save_pre=True) kept it, or None (then SiLU's
    input is recomputed)."""
    if seq_idx is not None:
        def f(x, w, b, h0):
            return _conv_masked(x, w, b, h0, seq_idx, activation)
        return _recompute_grads(f, [x, weight, bias, initial_states], [dout, dfinal])
    with torch.no_grad():
        acc = accumulation_dtype(x)
        b, d, L = x.shape
        W = weight.shape[1]
        xin, pad = _conv_input(x, initial_states, acc)
        wf = weight.to(acc)
        dpre = dout.to(acc)
        if activation == "silu":
            pre = _conv_pre(xin, wf, None if bias is None else bias.to(acc), pad, W) \
                if pre is None else pre[..., :L]
            dpre = torch.ops.aten.silu_backward(dpre, pre)  # one fused pass
        if pad is None:  # the conv's output is [b, d, L+W-1], of which the first L are kept
            dpre_full = F.pad(dpre, (0, W - 1))
        else:
            dpre_full = dpre
        dxin, dw, db = torch.ops.aten.convolution_backward(
            dpre_full, xin, wf[:, None, :], None if bias is None else [d], [1],
            [W - 1 if pad is None else 0], [1], False, [0], d, [True, True, bias is not None])
        dw = dw[:, 0, :]
        dh0 = None
        if pad is None:
            dx = dxin.detach()  # a view of a fresh 4-d gradient: no copy by own_storage
        else:
            dx, dh0 = dxin[..., W - 1:], dxin[..., :W - 1]
        if dfinal is not None:  # final = the last W-1 of [history, x]
            df = dfinal.to(acc)
            k = min(L, W - 1)
            if k:
                dx[..., L - k:] += df[..., W - 1 - k:]
            if dh0 is not None and k < W - 1:
                dh0[..., k:] += df[..., :W - 1 - k]
    out = (dx, dw, db, dh0)
    refs = (x, weight, bias, initial_states)
    return _own(tuple(None if g is None else g.to(r.dtype).contiguous()
                      for g, r in zip(out, refs)))


def _conv_step(x, conv_state, weight, bias, activation, acc):
    """One token (x [b, D], a contiguous conv_state [b, D, S]): out = act(bias + sum_k w[:, k]
    win_k) over the window win = [the W-1 newest state columns, x], then the state moves left by
    one column with x last. A step is a few small ops and each op's fixed cost dominates at
    B=1 (measured on CPU against Mamba2.step's roll / write / multiply-sum lines): one
    concatenation [state, x] serves both the window and the shifted state (one copy back), the
    taps are one row-wise dot product (linalg.vecdot), bias and SiLU in place."""
    W, S = weight.shape[1], conv_state.shape[-1]
    if x.dtype == acc and conv_state.dtype == acc:
        full = torch.cat([conv_state, x.unsqueeze(-1)], -1)  # [b, D, S+1]
    else:  # x itself (not rounded to the state's dtype) after the history
        full = torch.cat([conv_state.to(acc), x.to(acc).unsqueeze(-1)], -1)
    wa = weight if weight.dtype == acc else weight.to(acc)
    out = torch.linalg.vecdot(full if S + 1 == W else full.narrow(-1, S + 1 - W, W), wa)
    conv_state.copy_(full.narrow(-1, 1, S))
    if bias is not None:
        out.add_(bias if bias.dtype == acc else bias.to(acc))
    if activation == "silu":
        out = F.silu(out, inplace=True)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def conv_update(x, conv_state, weight, bias, activation):
    """x [b, D, L], or [b, D] for one token (out [b, D]); conv_state [b, D, S] (S >= W-1)
    holds the last S inputs and is shifted in place. One token: _conv_step. Several: one
    concatenation [state, x], the W taps as one multiply and sum over each window (a depthwise
    F.conv1d costs several times more on a decode step's few columns), one copy back."""
    acc = accumulation_dtype(x)
    if x.dim() == 2 and conv_state.is_contiguous():
        return _conv_step(x, conv_state, weight, bias, activation, acc)
    W, S = weight.shape[1], conv_state.shape[-1]
    one = x.dim() == 2
    x3 = x.unsqueeze(-1) if one else x
    L = x3.shape[-1]
    if L == 0:
        return x.new_zeros(x.shape)
    full = torch.cat([conv_state, _as(x3, conv_state.dtype)], dim=-1)  # [b, D, S+L]
    if conv_state.dtype == x.dtype:
        win = _as(full[..., S - (W - 1):], acc)  # [b, D, W-1+L]
    else:  # x itself (not rounded to the state's dtype) after the history
        win = torch.cat([conv_state[..., S - (W - 1):].to(acc), x3.to(acc)], dim=-1)
    out = (win.unfold(-1, W, 1) * _as(weight, acc)[:, None, :]).sum(-1)  # [b, D, L]
    conv_state.copy_(full[..., L:])
    if bias is not None:
        out += _as(bias, acc)[:, None]
    if activation == "silu":
        out = F.silu(out, inplace=True)
    out = _as(out, x.dtype)
    return out.squeeze(-1) if one else out

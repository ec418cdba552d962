"""PyTorch backend of the state-space family: the CPU default and the executable spec of the
Triton / CUDA kernels. No Python loop over single tokens anywhere.

* Selective scan (Mamba-1): per channel d and state n the recurrence h_t = a_t h_{t-1} + x_t with
  a_t = exp(delta_t A[d, n]) <= 1 and x_t = delta_t B_t[n] u_t is elementwise in (d, n), so it is
  solved by `linear_scan`: a Hillis-Steele scan inside chunks of SCAN_CHUNK tokens (log2 steps of
  whole-tensor ops), then the same scan, recursively, over the chunk carries. Decays are combined
  as products of factors <= 1 (never exp of a positive sum), so gates of -20 per token over any
  length stay finite. Backward: autograd through that forward (recomputed).
* SSD (Mamba-2) is simple GLA with q = C, k = B, v = x * dt, g = dt * A per head: the core runs on
  the GLA family's chunk engine (lightning_ops.gla.torch.forward / backward, with its hand-written
  backward; the Triton backend passes lightning_ops.gla.triton instead); the cheap element-wise
  parts around it (dt bias / softplus / clamp, groups, D, z, state transposes) are
  differentiated by autograd. seq_idx resets become extra segments (read on the host).
* causal conv1d: a sum over the W <= 4 taps of shifted inputs (autograd backward).
* Decode steps: direct vectorised updates, states written in place.
"""
from __future__ import annotations

import contextlib
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .._custom_op import autograd_enabled, grad_by_recompute, own_storage as _own
from ..gla import torch as _gla

Tensor = torch.Tensor

SCAN_CHUNK = 64  # Hillis-Steele span: log2(64) = 6 whole-tensor steps, then the carries
SSD_CHUNK_MAX = 64  # the GLA engine picks its own chunk (<= 64 on CPU); results are chunk-free


def _recompute_grads(forward, inputs, grads):
    return grad_by_recompute(forward, inputs, grads)


def _acc(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------------------
# Linear recurrence h_t = a_t h_{t-1} + x_t along the last dim
# ------------------------------------------------------------------------------------------------
def _hillis_steele(a: Tensor, x: Tensor) -> Tuple[Tensor, Tensor]:
    """Inclusive scan of h_t = a_t h_{t-1} + x_t (h_{-1} = 0) along the last dim in log2(L)
    steps. a broadcasts against x. Returns (cumulative product of a, h)."""
    L, off = x.shape[-1], 1
    while off < L:
        x = x + a * F.pad(x[..., :-off], (off, 0))
        a = a * F.pad(a[..., :-off], (off, 0), value=1.0)
        off *= 2
    return a, x


def linear_scan(a: Tensor, x: Tensor, chunk: int = SCAN_CHUNK) -> Tensor:
    """h_t = a_t h_{t-1} + x_t along the last dim (h_{-1} = 0), a in [0, 1] broadcasting
    against x. Chunks of `chunk` tokens are scanned in parallel, then their carries (recursively),
    then each chunk adds its decayed carry-in."""
    L = x.shape[-1]
    if L <= chunk:
        return _hillis_steele(a, x)[1]
    nc = -(-L // chunk)
    pad = nc * chunk - L
    a = F.pad(a, (0, pad), value=1.0).unflatten(-1, (nc, chunk))
    x = F.pad(x, (0, pad)).unflatten(-1, (nc, chunk))
    a_cum, h_local = _hillis_steele(a, x)
    ends = linear_scan(a_cum[..., -1], h_local[..., -1], chunk)  # state after each chunk
    carry = F.pad(ends[..., :-1], (1, 0))  # state entering each chunk
    return (h_local + a_cum * carry[..., None]).flatten(-2)[..., :L]


# ------------------------------------------------------------------------------------------------
# Mamba-1 selective scan
# ------------------------------------------------------------------------------------------------
def _process_delta(delta: Tensor, bias: Optional[Tensor], softplus: bool, acc) -> Tensor:
    d = delta.to(acc)
    if bias is not None:
        d = d + bias.to(acc)[:, None]
    return F.softplus(d) if softplus else d


def _scan_math(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """The differentiable chunked forward: (y in u's dtype, last state [b, D, N] in acc)."""
    acc = _acc(u)
    b, d, L = u.shape
    n = A.shape[1]
    G = 1 if B.dim() == 3 else B.shape[1]
    dg = d // G
    dl = _process_delta(delta, delta_bias, delta_softplus, acc).view(b, G, dg, 1, L)
    uf = u.to(acc)
    # groups stay a broadcast dim: channel d = (G, dg) reads B/C of its group without copies
    Bf, Cf = B.to(acc).view(b, G, 1, n, L), C.to(acc).view(b, G, 1, n, L)
    a = torch.exp(dl * A.to(acc).view(G, dg, n, 1))  # [b, G, dg, n, L], every factor <= 1
    x = (dl * uf.view(b, G, dg, 1, L)) * Bf
    h = linear_scan(a, x)
    y = (h * Cf).sum(-2).reshape(b, d, L)
    # L == 0: h.sum(-1) is zeros yet stays on the graph, so the recompute backward can run
    last = h[..., -1].reshape(b, d, n) if L > 0 else h.sum(-1).reshape(b, d, n)
    if D is not None:
        y = y + D.to(acc)[:, None] * uf
    if z is not None:
        y = y * F.silu(z.to(acc))
    return y.to(u.dtype), last


def scan_aux_shape(u, A):
    return (0,)


def scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    with torch.no_grad():
        y, last = _scan_math(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    y, last = _own((y, last if return_last_state else None))
    return y, last, u.new_empty(0, dtype=_acc(u))


def scan_backward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, aux, dy, dlast):
    def f(u, delta, A, B, C, D, z, db):
        return _scan_math(u, delta, A, B, C, D, z, db, delta_softplus)
    return _recompute_grads(f, [u, delta, A, B, C, D, z, delta_bias], [dy, dlast])


# ------------------------------------------------------------------------------------------------
# Mamba-2 SSD on the GLA chunk engine
# ------------------------------------------------------------------------------------------------
def _process_dt(dt, dt_bias, softplus, dt_min, dt_max, acc) -> Tensor:
    d = dt.to(acc)
    if dt_bias is not None:
        d = d + dt_bias.to(acc)
    if softplus:
        d = F.softplus(d)
    if (dt_min, dt_max) != (0.0, float("inf")):
        d = d.clamp(dt_min, dt_max)
    return d


class _Segments:
    """The packed segments the GLA engine runs: the batch rows (or cu_seqlens' sequences) split
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


def _ssd_pre(x, dt, A, B, C, dt_bias, h0, softplus, dt_min, dt_max, segs: _Segments):
    """SSD inputs -> the GLA engine's (q, k, v, g, h0) in the compute dtype (differentiable)."""
    acc = _acc(x)
    b, l, h, p = x.shape
    rep = h // B.shape[2]
    dtf = _process_dt(dt, dt_bias, softplus, dt_min, dt_max, acc)
    q = C.to(acc).repeat_interleave(rep, dim=2)
    k = B.to(acc).repeat_interleave(rep, dim=2)
    v = x.to(acc) * dtf[..., None]
    g = dtf * A.to(acc)
    h0g = None if h0 is None else h0.to(acc).transpose(-1, -2)  # [N, h, n, p] = GLA's [K, V]
    if segs.flat:
        q, k, v, g = (t.reshape(1, b * l, *t.shape[2:]) for t in (q, k, v, g))
    return q, k, v, g, segs.initial(h0g)


def _ssd_post(core, x, D, z, b, l):
    """core [B', T', h, p] from the engine -> y (compute dtype) with D and z applied."""
    y = core.reshape(b, l, *core.shape[2:])
    if D is not None:
        Df = D.to(y.dtype)
        y = y + (Df[:, None] if Df.dim() == 1 else Df) * x.to(y.dtype)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def _ssd_core_args(segs: _Segments, ref: Tensor):
    return None if segs.cu is None else segs.cu.to(ref.device)


def ssd_forward(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, chunk_size,
                dt_softplus, dt_min, dt_max, return_final_states, engine=_gla):
    """engine: a GLA-family backend module (its forward/backward contract): lightning_ops.gla.torch
    here, lightning_ops.gla.triton for the Triton backend."""
    b, l = x.shape[:2]
    segs = _Segments(b, l, seq_idx, cu_seqlens)
    with torch.no_grad():
        q, k, v, g, h0 = _ssd_pre(x, dt, A, B, C, dt_bias, initial_states, dt_softplus, dt_min,
                                  dt_max, segs)
        core, ht = engine.forward(q, k, v, g, None, 1.0, h0, return_final_states,
                                  _ssd_core_args(segs, x), "chunk")
        y = _ssd_post(core, x, D, z, b, l).to(x.dtype)
    final = None if ht is None else segs.final(ht).transpose(-1, -2).contiguous()
    return _own((y, final))


def ssd_backward(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, chunk_size,
                 dt_softplus, dt_min, dt_max, dy, dfinal, engine=_gla):
    b, l = x.shape[:2]
    segs = _Segments(b, l, seq_idx, cu_seqlens)
    cu = _ssd_core_args(segs, x)
    ins = [x, dt, A, B, C, D, z, dt_bias, initial_states]
    leaves = [t.detach().requires_grad_() if t is not None else None for t in ins]
    lx, ldt, lA, lB, lC, lD, lz, ldtb, lh0 = leaves
    with autograd_enabled():
        q, k, v, g, h0 = _ssd_pre(lx, ldt, lA, lB, lC, ldtb, lh0, dt_softplus, dt_min, dt_max,
                                  segs)
        with torch.no_grad():
            core, _ = engine.forward(q, k, v, g, None, 1.0, h0, False, cu, "chunk")
        core = core.detach().requires_grad_()
        y = _ssd_post(core, lx, lD, lz, b, l)
        # the D / z part first: it yields d core for the engine's hand-written backward
        post_wrt = [t for t in (core, lx, lD, lz) if t is not None]
        post_g = torch.autograd.grad(y, post_wrt, dy.to(y.dtype), allow_unused=True)
        dcore = post_g[0]
        dht = segs.dfinal(None if dfinal is None else dfinal.to(core.dtype).transpose(-1, -2))
        dq, dk, dv, dg, dh0 = engine.backward(q.detach(), k.detach(), v.detach(), g.detach(),
                                              None, 1.0, None if h0 is None else h0.detach(), cu,
                                              "chunk", dcore, dht)
        pre_out = [t for t in (q, k, v, g, h0) if t is not None]
        pre_grad = [t for t in (dq, dk, dv, dg, dh0) if t is not None]
        wrt = [t for t in leaves if t is not None]
        got = torch.autograd.grad(pre_out, wrt, pre_grad, allow_unused=True)
    grads = {id(t): gr for t, gr in zip(wrt, got)}
    for t, gr in zip(post_wrt[1:], post_g[1:]):  # x, D, z: add their share from the post part
        if gr is not None:
            grads[id(t)] = gr if grads.get(id(t)) is None else grads[id(t)] + gr
    out = []
    for t in leaves:
        if t is None:
            out.append(None)
        else:
            gr = grads.get(id(t))
            out.append(torch.zeros_like(t) if gr is None else gr.to(t.dtype))
    return _own(out)


def _tied(t: Optional[Tensor], dims: Sequence[int]) -> bool:
    return t is None or all(t.stride(d) == 0 or t.shape[d] == 1 for d in dims)


def state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    """Heads form: state [b,h,p,n], x/dt/z [b,h,p], A [h,p,n], B/C [b,g,n], D/dt_bias [h,p].
    A / dt / dt_bias tied over p (stride 0, as Mamba-2 expands them) take the per-head path."""
    acc = _acc(x)
    h, ng = state.shape[1], B.shape[1]
    tied = _tied(A, (1, 2)) and _tied(dt, (2,)) and _tied(dt_bias, (1,))
    if tied:  # one decay per (batch, head): [b, h, 1, 1]
        dt, A = dt[:, :, :1], A[:, :1, :1]
        dt_bias = None if dt_bias is None else dt_bias[:, :1]
    dtf = dt.to(acc)
    if dt_bias is not None:
        dtf = dtf + dt_bias.to(acc)
    if dt_softplus:
        dtf = F.softplus(dtf)
    Bf = B.to(acc).repeat_interleave(h // ng, dim=1)[:, :, None, :]  # [b, h, 1, n]
    Cf = C.to(acc).repeat_interleave(h // ng, dim=1)[:, :, None, :]
    xf = x.to(acc)
    new = torch.exp(dtf[..., None] * A.to(acc)) * state.to(acc) + (dtf * xf)[..., None] * Bf
    out = (new * Cf).sum(-1)
    if D is not None:
        out = out + D.to(acc) * xf
    if z is not None:
        out = out * F.silu(z.to(acc))
    state.copy_(new)
    return out.to(x.dtype)


# ------------------------------------------------------------------------------------------------
# Causal depthwise conv1d
# ------------------------------------------------------------------------------------------------
def _conv_math(x, weight, bias, initial_states, seq_idx, activation):
    """out[t] = act(bias + sum_i w[:, i] x[t - W + 1 + i]) as W shifted products (W <= 4).
    With seq_idx a tap only reads inputs of the same sequence as t; the history before t = 0
    (initial_states) belongs to the sequence of token 0. Returns (out, final_states)."""
    acc = _acc(x)
    b, d, L = x.shape
    W = weight.shape[1]
    hist = (x.new_zeros(b, d, W - 1, dtype=acc) if initial_states is None
            else initial_states.to(acc))
    xp = torch.cat([hist, x.to(acc)], dim=-1)  # [b, d, W-1+L]
    w = weight.to(acc)
    out = torch.zeros(b, d, L, dtype=acc, device=x.device) if bias is None \
        else bias.to(acc)[:, None].expand(b, d, L)
    if seq_idx is not None:  # sequence id of every padded position; history takes token 0's
        sp = torch.cat([seq_idx[:, :1].expand(b, W - 1), seq_idx], dim=-1)
    for i in range(W):
        term = w[:, i, None] * xp[:, :, i:i + L]
        if seq_idx is not None:
            term = term * (sp[:, i:i + L] == seq_idx)[:, None, :].to(acc)
        out = out + term
    if activation == "silu":
        out = F.silu(out)
    final = xp[:, :, xp.shape[-1] - (W - 1):]
    return out.to(x.dtype), final.to(x.dtype)


def conv_forward(x, weight, bias, initial_states, seq_idx, return_final_states, activation):
    with torch.no_grad():
        out, final = _conv_math(x, weight, bias, initial_states, seq_idx, activation)
    return _own((out, final.contiguous() if return_final_states else None))


def conv_backward(x, weight, bias, initial_states, seq_idx, activation, dout, dfinal):
    def f(x, w, b, h0):
        return _conv_math(x, w, b, h0, seq_idx, activation)
    return _recompute_grads(f, [x, weight, bias, initial_states], [dout, dfinal])


def conv_update(x, conv_state, weight, bias, activation):
    """x [b, D, L]; conv_state [b, D, S] (S >= W-1) holds the last S inputs, shifted in place."""
    W, S, L = weight.shape[1], conv_state.shape[-1], x.shape[-1]
    full = torch.cat([conv_state, x.to(conv_state.dtype)], dim=-1)  # [b, D, S+L]
    out, _ = _conv_math(x, weight, bias, full[:, :, S - (W - 1):S], None, activation)
    conv_state.copy_(full[:, :, L:])
    return out

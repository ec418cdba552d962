"""mamba-ssm 2.3.2 and causal-conv1d 1.7.0 signatures over lightning_ops' public ops.

Same rules as _fla.py: the peers' positional order, defaults and return conventions; the work
is done by lightning_ops' public ops plus torch glue; argument values we cannot honour exactly
raise `UnsupportedArgumentError` naming them.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

import lightning_ops as lo

from ._common import check_bool, unsupported, with_state_rows

Tensor = torch.Tensor

_ACTIVATIONS = (None, "silu", "swish")


def _check_activation(activation):
    if activation not in _ACTIVATIONS:
        raise NotImplementedError("activation must be None, silu, or swish")


# =============================================================================================
# causal-conv1d
# =============================================================================================
def causal_conv1d_fn(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                     seq_idx: Optional[Tensor] = None, initial_states: Optional[Tensor] = None,
                     return_final_states: bool = False,
                     final_states_out: Optional[Tensor] = None, activation=None):
    """causal_conv1d.causal_conv1d_fn (note the order: seq_idx is the fourth argument).
    x [B, D, L], weight [D, W], bias [D], seq_idx [B, L], initial_states [B, D, W-1];
    final_states_out [B, D, W-1] is written (and returned) when return_final_states.
    A token with seq_idx < 0 is padding: its output is 0 (bias and activation included), as
    causal-conv1d's kernel since its padding-token support (Dao-AILab/causal-conv1d#78).
    Unlike causal-conv1d, seq_idx may be combined with initial_states / final states, and x
    need not be channel-last to return final states."""
    _check_activation(activation)
    check_bool("causal_conv1d_fn", "return_final_states", return_final_states)
    res = lo.causal_conv1d_fn(x, weight, bias, initial_states=initial_states,
                              return_final_states=return_final_states, activation=activation,
                              seq_idx=seq_idx)
    out, final = res if return_final_states else (res, None)
    if seq_idx is not None:     # no host sync: a masked fill whether or not there is padding
        out = out.masked_fill((seq_idx < 0).unsqueeze(1), 0)
    if not return_final_states:
        return out
    if final_states_out is not None:
        if final_states_out.shape != final.shape:
            raise ValueError(f"final_states_out must have shape {list(final.shape)} "
                             f"[B, D, W-1], got {list(final_states_out.shape)}")
        final_states_out.copy_(final)
        final = final_states_out
    return out, final


def _conv_update_circular(x, conv_state, weight, bias, activation, cache_seqlens):
    """conv_state is a circular buffer: the history of batch row b ends at cache_seqlens[b]
    (mod S); the new inputs are written from there."""
    b, d, L = x.shape
    S, W = conv_state.shape[-1], weight.shape[-1]
    if cache_seqlens.shape != (b,):
        raise ValueError(f"cache_seqlens must have shape [batch] = [{b}], "
                         f"got {list(cache_seqlens.shape)}")
    if cache_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cache_seqlens must be int32 or int64, got {cache_seqlens.dtype}")
    c = cache_seqlens.to(device=x.device, dtype=torch.long).unsqueeze(1)
    read = torch.remainder(c + torch.arange(-(W - 1), 0, device=x.device), S)
    hist = conv_state.gather(2, read.unsqueeze(1).expand(b, d, W - 1))
    out = lo.causal_conv1d_fn(x, weight, bias, initial_states=hist.to(x.dtype),
                              activation=activation)
    n = min(L, S)  # only the last S inputs survive in the buffer
    write = torch.remainder(c + torch.arange(L - n, L, device=x.device), S)
    conv_state.scatter_(2, write.unsqueeze(1).expand(b, d, n), x[..., L - n:].to(conv_state.dtype))
    return out


def causal_conv1d_update(x: Tensor, conv_state: Tensor, weight: Tensor,
                         bias: Optional[Tensor] = None, activation=None,
                         cache_seqlens: Optional[Tensor] = None,
                         conv_state_indices: Optional[Tensor] = None):
    """causal_conv1d.causal_conv1d_update: x [B, D] or [B, D, L]; conv_state [B, D, S]
    (S >= W-1) updated in place. cache_seqlens [B] makes conv_state a circular buffer;
    conv_state_indices [B] picks each row's state in a larger pool (an index < 0 is a padding
    row: zero output, no state touched)."""
    _check_activation(activation)
    squeeze = x.dim() == 2
    xs = x.unsqueeze(-1) if squeeze else x
    if xs.dim() != 3:
        raise ValueError(f"x must have shape [B, D] or [B, D, L], got {list(x.shape)}")
    if conv_state.dim() != 3:
        raise ValueError(f"conv_state must have shape [B, D, S], got {list(conv_state.shape)}")

    def step(state):
        if cache_seqlens is None:
            return lo.causal_conv1d_update(xs, state, weight, bias, activation)
        if state.shape[:2] != xs.shape[:2]:
            raise ValueError(f"conv_state must have shape [B, D, S] = [{xs.shape[0]}, "
                             f"{xs.shape[1]}, S], got {list(state.shape)}")
        return _conv_update_circular(xs, state, weight, bias, activation, cache_seqlens)

    out = step(conv_state) if conv_state_indices is None else \
        with_state_rows(conv_state, conv_state_indices, step)
    return out.squeeze(-1) if squeeze else out


# =============================================================================================
# mamba-ssm: selective scan (Mamba-1)
# =============================================================================================
def _fixed_bc(name: str, X: Tensor, u: Tensor) -> Tensor:
    """mamba-ssm also takes input-independent B / C of shape [D, N]: the same as a grouped
    B / C [b, D, N, L] with one group per channel (an expand, no copy here)."""
    if X.dim() != 2:
        return X
    b, d, L = u.shape
    if X.shape[0] != d:
        raise ValueError(f"{name} of shape [D, N] must have D = {d} rows, got {list(X.shape)}")
    return X[None, :, :, None].expand(b, d, X.shape[1], L)


def _per_channel(X: Tensor, d: int) -> Tensor:
    """A variable B / C [b, N, L] or [b, G, N, L] as [b, D, N, L] (channel c reads group
    c // (D / G), as mamba-ssm's grouping)."""
    if X.dim() == 3:
        X = X.unsqueeze(1)
    if X.dim() != 4 or d % X.shape[1]:
        raise ValueError(f"B / C must have shape [B, N, L] or [B, G, N, L] with D = {d} "
                         f"divisible by G, got {list(X.shape)}")
    if X.shape[1] == d:
        return X
    if X.shape[1] == 1:
        return X.expand(X.shape[0], d, *X.shape[2:])
    return X.repeat_interleave(d // X.shape[1], dim=1)


def _bc_pair(B: Tensor, C: Tensor, u: Tensor) -> Tuple[Tensor, Tensor]:
    """B and C in one layout for our op, which takes them alike. mamba-ssm lets each be
    input-independent [D, N] or variable [b, N, L] / [b, G, N, L] on its own (test_mamba_inner_fn
    mixes a fixed B with a projected C); when the two differ both become [b, D, N, L]."""
    B, C = _fixed_bc("B", B, u), _fixed_bc("C", C, u)
    if B.shape == C.shape:
        return B, C
    d = u.shape[1]
    return _per_channel(B, d), _per_channel(C, d)


def _complex_bc(name: str, X: Tensor, u: Tensor, n: int) -> Tensor:
    """A complex A's B / C in mamba-ssm's layouts, as complex [b, D, N, L] or [b, G, N, L]:
    input-independent [D, N] (complex, or real: promoted), or variable and real with each
    (real, imag) pair interleaved along the length: [b, N, 2L] / [b, G, N, 2L]."""
    b, d, L = u.shape
    ct = torch.complex128 if u.dtype == torch.float64 else torch.complex64
    if X.dim() == 2:
        if tuple(X.shape) != (d, n):
            raise ValueError(f"{name} must have shape [D, N] = [{d}, {n}] (A's), got "
                             f"{list(X.shape)}")
        return _fixed_bc(name, X.to(ct), u)
    if X.is_complex() or not X.is_floating_point():
        raise TypeError(f"{name} must be a real float tensor when it is variable with a complex "
                        f"A (its (real, imag) pairs interleaved along L), got {X.dtype}")
    want = [b, n, 2 * L] if X.dim() == 3 else [b, None, n, 2 * L]
    if X.dim() not in (3, 4) or any(w is not None and w != s for w, s in zip(want, X.shape)) \
            or (X.dim() == 4 and (X.shape[1] < 1 or d % X.shape[1])):
        raise ValueError(f"{name} must have shape [B, N, 2L] = [{b}, {n}, {2 * L}] or "
                         f"[B, G, N, 2L] with G dividing D = {d} (a complex A's B / C hold "
                         f"(real, imag) pairs along L), got {list(X.shape)}")
    real = X.to(torch.float64 if u.dtype == torch.float64 else torch.float32)
    return torch.view_as_complex(real.reshape(*X.shape[:-1], L, 2).contiguous())


def _complex_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    """Complex A (S4D-style diagonal, as mamba-ssm): the spec's token loop under autograd, on
    any device (our kernels are real-only; this path is for parity, not speed)."""
    from .. import reference as spec
    from .. import validation as V
    if A.dtype not in (torch.complex64, torch.complex128):
        raise TypeError(f"A must be complex64 or complex128 when complex, got {A.dtype}")
    V.check_float("u", u)
    if u.dim() != 3:
        raise ValueError(f"u must have shape [B, D, L] (3 dims), got {list(u.shape)}")
    b, d, L = u.shape
    V.check_tensor("delta", delta, (b, d, L), "[B, D, L]", u)
    V.check_shape("A", A, (d, None), "[D, N]")
    n = A.shape[1]
    V.check_tensor("D", D, (d,), "[D]", u)
    V.check_tensor("z", z, (b, d, L), "[B, D, L]", u)
    V.check_tensor("delta_bias", delta_bias, (d,), "[D]", u)
    Bc, Cc = _complex_bc("B", B, u, n), _complex_bc("C", C, u, n)
    return spec.selective_scan_ref(u, delta, A, Bc, Cc, D, z, delta_bias, bool(delta_softplus),
                                   bool(return_last_state))


def selective_scan_fn(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                      D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                      delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                      return_last_state: bool = False):
    """mamba_ssm.ops.selective_scan_interface.selective_scan_fn. B / C: [B, N, L],
    [B, G, N, L] or input-independent [D, N], each independently of the other. A complex A
    (S4D-style) is served as mamba-ssm defines it (variable B / C real [B, N, 2L] with
    interleaved (real, imag) pairs; y = 2 Re(C . h); last_state complex) by the spec's token
    loop under autograd: exact, not fast."""
    if delta_softplus is None:  # mamba-ssm's own ssd_selective_scan passes None (pybind: False)
        delta_softplus = False
    if A.is_complex():
        return _complex_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                             return_last_state)
    B, C = _bc_pair(B, C, u)
    return lo.selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                return_last_state)


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(acc)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(acc)
    return y.to(x.dtype)


def mamba_inner_fn(xz: Tensor, conv1d_weight: Tensor, conv1d_bias: Optional[Tensor],
                   x_proj_weight: Tensor, delta_proj_weight: Tensor, out_proj_weight: Tensor,
                   out_proj_bias: Optional[Tensor], A: Tensor, B: Optional[Tensor] = None,
                   C: Optional[Tensor] = None, D: Optional[Tensor] = None,
                   delta_bias: Optional[Tensor] = None, B_proj_bias: Optional[Tensor] = None,
                   C_proj_bias: Optional[Tensor] = None, delta_softplus: bool = True,
                   checkpoint_lvl: int = 1, b_rms_weight: Optional[Tensor] = None,
                   c_rms_weight: Optional[Tensor] = None,
                   dt_rms_weight: Optional[Tensor] = None, b_c_dt_rms_eps: float = 1e-6):
    """mamba_ssm.ops.selective_scan_interface.mamba_inner_fn: Mamba-1's fused block (conv1d +
    silu, x_proj, dt_proj, selective scan gated by silu(z), out_proj), as torch glue over our
    causal_conv1d_fn and selective_scan_fn. xz [b, 2*D, L] -> out [b, L, d_model].
    checkpoint_lvl (0 or 1) only trades memory in mamba-ssm; autograd here recomputes nothing."""
    if checkpoint_lvl not in (0, 1):
        raise AssertionError("checkpoint_lvl must be 0 or 1")
    L = xz.shape[-1]
    delta_rank = delta_proj_weight.shape[1]
    pairs = 2 if A.is_complex() else 1  # a complex A's B / C: (real, imag) column pairs
    d_state = A.shape[-1] * pairs
    x, z = xz.chunk(2, dim=1)
    w = conv1d_weight.squeeze(1) if conv1d_weight.dim() == 3 else conv1d_weight
    x = lo.causal_conv1d_fn(x, w, conv1d_bias, activation="silu")
    b, d = x.shape[:2]
    x_dbl = F.linear(x.transpose(1, 2).reshape(b * L, d), x_proj_weight)        # (b l, r+2n)
    delta = (delta_proj_weight @ x_dbl[:, :delta_rank].t()).view(d, b, L).transpose(0, 1)
    if dt_rms_weight is not None:
        delta = _rms_norm(delta.transpose(1, 2), dt_rms_weight, b_c_dt_rms_eps).transpose(1, 2)

    def variable(start, bias, rms):     # (b l, n) -> (b, 1, n, l); complex: (b, 1, n, (l two))
        M = x_dbl[:, start:start + d_state]
        if bias is not None:
            M = M + bias.to(M.dtype)
        if rms is not None:
            M = _rms_norm(M, rms, b_c_dt_rms_eps)
        M = M.view(b, L, 1, d_state // pairs, pairs).permute(0, 2, 3, 1, 4)
        return M.reshape(b, 1, d_state // pairs, L * pairs)

    if B is None:
        B = variable(delta_rank, B_proj_bias, b_rms_weight)
    if C is None:
        C = variable(x_dbl.shape[1] - d_state, C_proj_bias, c_rms_weight)
    y = selective_scan_fn(x, delta.contiguous(), A, B, C, D, z=z, delta_bias=delta_bias,
                          delta_softplus=delta_softplus)
    return F.linear(y.transpose(1, 2), out_proj_weight, out_proj_bias)


# =============================================================================================
# mamba-ssm: Mamba-2 SSD and decode step
# =============================================================================================
_STATE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def mamba_chunk_scan_combined(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                              chunk_size: int, D: Optional[Tensor] = None,
                              z: Optional[Tensor] = None, dt_bias: Optional[Tensor] = None,
                              initial_states: Optional[Tensor] = None,
                              seq_idx: Optional[Tensor] = None,
                              cu_seqlens: Optional[Tensor] = None, dt_softplus: bool = False,
                              dt_limit: Tuple[float, float] = (0.0, float("inf")),
                              return_final_states: bool = False,
                              return_varlen_states: bool = False,
                              state_dtype: Optional[torch.dtype] = None):
    """mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined, with mamba-ssm's semantics:
    sequences are separated by seq_idx only; cu_seqlens is read only for return_varlen_states
    (then batch must be 1 and seq_idx must mark the same sequences). initial_states
    [batch, h, p, n] applies to the tokens of sequence id 0 at the start of each row.
    Final / varlen states come back in C's dtype, as mamba-ssm. state_dtype, the 17th parameter
    as in mamba-ssm's main branch (#972; 2.3.2 has none; there the dtype of its materialized
    inter-chunk states): the dtype of the returned states instead of C's; ours are accumulated
    in float32 whatever state_dtype says."""
    fn = "mamba_chunk_scan_combined"
    if state_dtype is not None and state_dtype not in _STATE_DTYPES:
        raise TypeError(f"state_dtype must be None or a float dtype, got {state_dtype!r}")
    check_bool(fn, "return_final_states", return_final_states)
    check_bool(fn, "return_varlen_states", return_varlen_states)
    out_state_dtype = state_dtype or C.dtype
    h0 = initial_states
    if h0 is not None and seq_idx is not None:
        # mamba-ssm carries the initial state into sequence id 0 only
        h0 = h0 * (seq_idx[:, 0] == 0).to(h0.dtype).view(-1, 1, 1, 1)
    if not return_varlen_states:
        res = lo.mamba_chunk_scan_combined(
            x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, initial_states=h0,
            seq_idx=seq_idx, cu_seqlens=None, dt_softplus=dt_softplus, dt_limit=dt_limit,
            return_final_states=return_final_states)
        if return_final_states:
            return res[0], res[1].to(out_state_dtype)
        return res
    if cu_seqlens is None:
        raise AssertionError("cu_seqlens must be provided if return_varlen_states is True")
    if x.shape[0] != 1:
        raise AssertionError("passing cu_seqlens to get the varlen states is only supported if "
                             "batch dimension is 1")
    if seq_idx is None:
        raise unsupported(fn, "seq_idx=None with return_varlen_states=True",
                          "mamba-ssm then lets states flow across the cu_seqlens boundaries in "
                          "a way that depends on its chunking; pass the seq_idx that marks the "
                          "same sequences")
    if initial_states is not None:
        raise unsupported(fn, "initial_states with return_varlen_states=True",
                          "mamba-ssm's varlen state of the first sequence includes the initial "
                          "state only when that sequence spans more than one chunk; use "
                          "lightning_ops.mamba_chunk_scan_combined (one initial state per "
                          "sequence) instead")
    y, final, varlen = lo.mamba_chunk_scan_combined(
        x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, seq_idx=seq_idx,
        cu_seqlens=cu_seqlens, dt_softplus=dt_softplus, dt_limit=dt_limit,
        return_final_states=True, return_varlen_states=True)
    varlen = varlen.to(out_state_dtype)
    if return_final_states:
        return y, final.to(out_state_dtype), varlen
    return y, varlen


def mamba_chunk_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
                     D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                     dt_bias: Optional[Tensor] = None, dt_softplus: bool = False) -> Tensor:
    """mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan: mamba-ssm's unfused SSD (its chunk
    kernels called one by one); the same math as mamba_chunk_scan_combined, which serves it.
    Returns out [b, l, h, p]."""
    return mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias,
                                     dt_softplus=dt_softplus)


def _split_conv1d_dims(zxbcdt, conv1d_weight, dt_bias, A, D, headdim, ngroups):
    """(nheads, headdim, dstate, d_nonssm) of mamba_split_conv1d_scan_combined's inputs, with
    mamba-ssm's layout rules, each mismatch named."""
    fn = "mamba_split_conv1d_scan_combined"
    if not isinstance(D, Tensor) or D.dim() not in (1, 2):
        raise ValueError(f"{fn}: D must have shape [nheads] or [nheads, headdim], got "
                         f"{None if not isinstance(D, Tensor) else list(D.shape)}")
    if D.dim() == 1:
        if headdim is None:
            raise ValueError(f"{fn}: headdim must be given when D has shape [nheads]")
        nheads = D.shape[0]
    else:
        nheads, headdim = D.shape
    if not isinstance(ngroups, int) or ngroups < 1 or nheads % ngroups:
        raise ValueError(f"{fn}: ngroups must divide nheads = {nheads}, got {ngroups}")
    if zxbcdt.dim() != 3:
        raise ValueError(f"{fn}: zxbcdt must have shape [batch, seqlen, d] (3 dims), got "
                         f"{list(zxbcdt.shape)}")
    dim = nheads * headdim
    if conv1d_weight.dim() != 2 or conv1d_weight.shape[0] <= dim or \
            (conv1d_weight.shape[0] - dim) % (2 * ngroups):
        raise ValueError(f"{fn}: conv1d_weight must have shape [dim + 2 * ngroups * dstate, "
                         f"width] with dim = nheads * headdim = {dim}, ngroups = {ngroups}, "
                         f"got {list(conv1d_weight.shape)}")
    dstate = (conv1d_weight.shape[0] - dim) // ngroups // 2
    rest = zxbcdt.shape[-1] - 2 * dim - 2 * ngroups * dstate - nheads
    if rest < 0 or rest % 2:
        raise ValueError(f"{fn}: zxbcdt must have shape [batch, seqlen, 2 * d_nonssm + 2 * dim "
                         f"+ 2 * ngroups * dstate + nheads] with dim = {dim}, ngroups * dstate "
                         f"= {ngroups * dstate}, nheads = {nheads}, got {list(zxbcdt.shape)}")
    for name, t in (("dt_bias", dt_bias), ("A", A)):
        if not isinstance(t, Tensor) or tuple(t.shape) != (nheads,):
            raise ValueError(f"{fn}: {name} must have shape [nheads] = [{nheads}], got "
                             f"{None if not isinstance(t, Tensor) else list(t.shape)}")
    return nheads, headdim, dstate, rest // 2


def mamba_split_conv1d_scan_combined(zxbcdt: Tensor, conv1d_weight: Tensor,
                                     conv1d_bias: Optional[Tensor], dt_bias: Tensor, A: Tensor,
                                     D: Tensor, chunk_size: int,
                                     initial_states: Optional[Tensor] = None,
                                     seq_idx: Optional[Tensor] = None,
                                     dt_limit: Tuple[float, float] = (0.0, float("inf")),
                                     return_final_states: bool = False, activation="silu",
                                     rmsnorm_weight: Optional[Tensor] = None,
                                     rmsnorm_eps: float = 1e-6,
                                     outproj_weight: Optional[Tensor] = None,
                                     outproj_bias: Optional[Tensor] = None,
                                     headdim: Optional[int] = None, ngroups: int = 1,
                                     norm_before_gate: bool = True,
                                     state_dtype: Optional[torch.dtype] = None):
    """mamba_ssm.ops.triton.ssd_combined.mamba_split_conv1d_scan_combined: Mamba-2's block
    after in_proj (what mamba-ssm's Mamba2 and Hugging Face's Mamba-2 / Bamba / Nemotron-H /
    Zamba2 call in training), over our conv, SSD and gated norm:

        zx0 (2 d_nonssm), z, xBC, dt = zxbcdt.split(...);  x, B, C = act(conv1d(xBC))
        y = ssd(x, dt, A, B, C, D, dt_bias, softplus, dt_limit) (z gate here without the norm)
        y = rmsnorm(y, gate z, groups of dim / ngroups);  y = [silu(zx0_a) * zx0_b, y]
        out = outproj(y)

    zxbcdt [batch, seqlen, 2 d_nonssm + 2 dim + 2 ngroups dstate + nheads]; conv1d_weight
    [dim + 2 ngroups dstate, width]; D [nheads] (then headdim given) or [nheads, headdim];
    seq_idx [batch, seqlen] resets the conv and the state. Returns out, or (out, final_states
    [batch, nheads, headdim, dstate]) with return_final_states: in state_dtype (the last
    parameter, as in mamba-ssm's main branch) or else x's dtype, as mamba_chunk_scan_combined."""
    _check_activation(activation)
    check_bool("mamba_split_conv1d_scan_combined", "return_final_states", return_final_states)
    h, p, n, d_nonssm = _split_conv1d_dims(zxbcdt, conv1d_weight, dt_bias, A, D, headdim,
                                           ngroups)
    b, l, _ = zxbcdt.shape
    dim, gn = h * p, ngroups * n
    if rmsnorm_weight is not None and tuple(rmsnorm_weight.shape) != (dim,):
        raise ValueError(f"mamba_split_conv1d_scan_combined: rmsnorm_weight must have shape "
                         f"[dim] = [{dim}], got {list(rmsnorm_weight.shape)}")
    if outproj_weight is None and outproj_bias is not None:
        raise ValueError("mamba_split_conv1d_scan_combined: outproj_bias without outproj_weight")
    zx0, z, xBC, dt = torch.split(zxbcdt, [2 * d_nonssm, dim, dim + 2 * gn, h], dim=-1)
    xBC = causal_conv1d_fn(xBC.transpose(1, 2), conv1d_weight, conv1d_bias, seq_idx,
                           activation=activation).transpose(1, 2)
    x, B, C = torch.split(xBC, [dim, gn, gn], dim=-1)
    z = z.reshape(b, l, h, p)
    res = mamba_chunk_scan_combined(
        x.reshape(b, l, h, p), dt, A, B.reshape(b, l, ngroups, n), C.reshape(b, l, ngroups, n),
        chunk_size, D=D, z=z if rmsnorm_weight is None else None, dt_bias=dt_bias,
        initial_states=initial_states, seq_idx=seq_idx, dt_softplus=True, dt_limit=dt_limit,
        return_final_states=return_final_states, state_dtype=state_dtype)
    y, final = res if return_final_states else (res, None)
    y = y.reshape(b, l, dim)
    if rmsnorm_weight is not None:
        from ..norm import gated_norm
        y = gated_norm(y, rmsnorm_weight, None, z.reshape(b, l, dim), rmsnorm_eps,
                       dim // ngroups, bool(norm_before_gate))
    if d_nonssm:
        za, zb = zx0.chunk(2, dim=-1)  # swiglu in float32 at least, as mamba-ssm's kernel
        acc = torch.promote_types(za.dtype, torch.float32)
        y = torch.cat([(F.silu(za.to(acc)) * zb.to(acc)).to(y.dtype), y], dim=-1)
    if outproj_weight is not None:
        y = F.linear(y, outproj_weight, outproj_bias)
    return (y, final) if return_final_states else y


def selective_state_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor,
                           C: Tensor, D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                           dt_bias: Optional[Tensor] = None, dt_softplus: bool = False,
                           state_batch_indices: Optional[Tensor] = None) -> Tensor:
    """mamba_ssm.ops.triton.selective_state_update.selective_state_update: one decode step,
    `state` updated in place. state_batch_indices [batch] picks each row's state in a larger
    pool (an index < 0 is a padding row: zero output, no state touched)."""
    def step(s):
        return lo.selective_state_update(s, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias,
                                         dt_softplus=dt_softplus)
    if state_batch_indices is None:
        return step(state)
    return with_state_rows(state, state_batch_indices, step)


__all__ = ["causal_conv1d_fn", "causal_conv1d_update", "selective_scan_fn", "mamba_inner_fn",
           "mamba_chunk_scan_combined", "mamba_chunk_scan", "mamba_split_conv1d_scan_combined",
           "selective_state_update"]

"""Public ops of the state-space family: Mamba-1 selective scan, Mamba-2 SSD, causal depthwise
conv1d and the decode steps. Validation, backend dispatch and the torch.library custom ops.

Signatures are drop-in for mamba-ssm (`selective_scan_fn`, `mamba_chunk_scan_combined`,
`selective_state_update`) and causal-conv1d (`causal_conv1d_fn`, `causal_conv1d_update`).

Backend module contract (lightning_ops.ssm.torch / .triton / .cuda; families "selective_scan",
"ssd" and "conv" in lightning_ops.backend):
  selective_scan:
    scan_aux_shape(u, A) -> shape of the tensor the forward saves for the backward (chunk
        carries for the CUDA kernel; (0,) when the backward recomputes); its dtype is float32
        (float64 for float64 u). Called by the fake impl, so it reads only shapes and dtypes.
    scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
        -> (y, last_state or None, aux)
    scan_backward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, aux, dy, dlast)
        -> (du, ddelta, dA, dB, dC, dD or None, dz or None, ddelta_bias or None)
  ssd:
    ssd_forward(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, chunk_size,
                dt_softplus, dt_min, dt_max, return_final_states, need_pre)
        -> (y, final_states or None, pre or None): pre is the output before the z gate
        (core + D x, x's shape, float32 / float64), returned when need_pre and z is given so
        that the backward's dz never re-runs the forward
    ssd_backward(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, chunk_size,
                 dt_softplus, dt_min, dt_max, dy, dfinal, pre)
        -> (dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinitial_states) (None for absent inputs)
    state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus) -> out   (state in place;
        heads form: state [b,h,p,n]; the Mamba-1 form is mapped onto it with h = 1, except that
        the torch backend, called directly in eager mode, takes it as it is)
  conv:
    conv_forward(x, weight, bias, initial_states, seq_idx, return_final_states, activation,
                 save_pre) -> (out, final_states or None, pre or None): pre is the conv's
        output before SiLU (float32 / float64; [b, D, L + W - 1] as F.conv1d with padding W - 1
        gives it, or [b, D, L] with initial_states), returned when save_pre and the backend
        keeps it
    conv_backward(x, weight, bias, initial_states, seq_idx, activation, dout, dfinal, pre)
        -> (dx, dweight, dbias or None, dinitial_states or None)   (pre None: recomputed)
    conv_update(x, conv_state, weight, bias, activation) -> out   (x [b, D, L]; state in place;
        the torch backend, called directly in eager mode, also takes x [b, D] for one token)
activation is "none" or "silu". States are float32 (float64 for float64 inputs).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import backend as _backend
from ..precision import accumulation_dtype
from .. import validation as V
from .._custom_op import (PLAIN_TENSORS, autocast_device, autocast_off, call_op, contiguous,
                          eager_direct, empty_like_none, forbid_double_backward, grad_if_present,
                          is_empty, none_if_empty, passthrough_grad, passthrough_state,
                          plain_eager, register_autograd, without_autocast, zeros_or_empty)

Tensor = torch.Tensor
_INT_DTYPES = (torch.int32, torch.int64)


def _empty_grad(x: Optional[Tensor], ref: Tensor) -> Tensor:
    return ref.new_empty(0) if x is None else torch.empty_like(x)


def _check_seq_idx(seq_idx: Optional[Tensor], shape, layout: str, x: Tensor) -> None:
    """seq_idx (SSD and conv): an int tensor of the given shape on x's device."""
    if seq_idx is None:
        return
    if not isinstance(seq_idx, torch.Tensor) or seq_idx.dtype not in _INT_DTYPES:
        raise TypeError(f"seq_idx must be an int32 or int64 tensor, got "
                        f"{getattr(seq_idx, 'dtype', type(seq_idx).__name__)}")
    V.check_shape("seq_idx", seq_idx, shape, layout)
    if seq_idx.device != x.device:
        raise ValueError(f"seq_idx is on {seq_idx.device} but the inputs are on "
                         f"{x.device}; all tensors must be on one device")


def _none_for_absent(grads, inputs):
    return tuple(grad_if_present(g, x) for g, x in zip(grads, inputs))


# =============================================================================================
# Mamba-1 selective scan
# =============================================================================================
@torch.library.custom_op("lightning_ops::selective_scan", mutates_args=())
def _scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
              z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool,
              return_last_state: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    impl = _backend.implementation("selective_scan", backend)
    y, last, aux = impl.scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                     return_last_state)
    return y, empty_like_none(last, u, accumulation_dtype(u)), aux


@_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, backend):
    b, d, L = u.shape
    n = A.shape[1]
    impl = _backend.implementation("selective_scan", backend)
    last = u.new_empty((b, d, n) if return_last_state else (0,), dtype=accumulation_dtype(u))
    aux = u.new_empty(impl.scan_aux_shape(u, A), dtype=accumulation_dtype(u))
    return u.new_empty(u.shape), last, aux


@torch.library.custom_op("lightning_ops::selective_scan_backward", mutates_args=())
def _scan_bwd(dy: Tensor, dlast: Optional[Tensor], u: Tensor, delta: Tensor, A: Tensor,
              B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
              delta_bias: Optional[Tensor], aux: Tensor, delta_softplus: bool, backend: str
              ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    impl = _backend.implementation("selective_scan", backend)
    grads = impl.scan_backward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, aux, dy,
                               dlast)
    du, ddelta, dA, dB, dC, dD, dz, ddb = grads
    return contiguous(du, ddelta, dA, dB, dC, empty_like_none(dD, u), empty_like_none(dz, u),
                      empty_like_none(ddb, u))


@_scan_bwd.register_fake
def _(dy, dlast, u, delta, A, B, C, D, z, delta_bias, aux, delta_softplus, backend):
    return (torch.empty_like(u), torch.empty_like(delta), torch.empty_like(A),
            torch.empty_like(B), torch.empty_like(C), _empty_grad(D, u), _empty_grad(z, u),
            _empty_grad(delta_bias, u))


def _scan_setup(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, _, backend = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[2])
    ctx.delta_softplus, ctx.backend = delta_softplus, backend


def _scan_backward(ctx, dy, dlast, _daux):
    u, delta, A, B, C, D, z, delta_bias, aux = ctx.saved_tensors
    dlast = None if dlast is None or dlast.numel() == 0 else dlast
    grads = call_op(_scan_bwd, dy.contiguous(), dlast, u, delta, A, B, C, D, z, delta_bias,
                    aux, ctx.delta_softplus, ctx.backend)
    du, ddelta, dA, dB, dC = grads[:5]
    rest = _none_for_absent(grads[5:], (D, z, delta_bias))
    return (du, ddelta, dA, dB, dC) + rest + (None, None, None)


_scan_call = register_autograd(_scan_fwd, _scan_backward, _scan_setup)
forbid_double_backward(_scan_bwd, lambda inputs: "selective_scan_fn")


def _check_bc(name: str, X: Tensor, b: int, d: int, L: int, ref: Tensor) -> int:
    """B/C: [b, N, L] or [b, G, N, L] with D % G == 0. Returns N."""
    V.check_float(name, X)
    if X.dim() == 3:
        V.check_tensor(name, X, (b, None, L), "[B, N, L]", ref)
        return X.shape[1]
    if X.dim() == 4:
        V.check_tensor(name, X, (b, None, None, L), "[B, G, N, L]", ref)
        if X.shape[1] < 1 or d % X.shape[1]:
            raise ValueError(f"{name} has {X.shape[1]} groups (shape {list(X.shape)}), which "
                             f"must divide the {d} channels of u")
        return X.shape[2]
    raise ValueError(f"{name} must have shape [B, N, L] or [B, G, N, L] = [{b}, *, {L}] or "
                     f"[{b}, *, *, {L}], got {list(X.shape)}")


def selective_scan_fn(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                      D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                      delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                      return_last_state: bool = False):
    """Mamba-1 selective scan (mamba-ssm layout). Per channel d and state n:
    h_t = exp(delta_t A[d,n]) h_{t-1} + delta_t B_t[n] u_t ; y_t = sum_n C_t[n] h_t + D[d] u_t,
    y *= silu(z) if z is given; delta = softplus(delta + delta_bias) when asked.
    u, delta, z: [B, D, L]; A: [D, N]; B, C: [B, N, L] or [B, G, N, L]; D, delta_bias: [D].
    Returns y [B, D, L] (u's dtype), or (y, last_state [B, D, N] float32)."""
    V.check_float("u", u)
    if u.dim() != 3:
        raise ValueError(f"u must have shape [B, D, L] (3 dims), got {list(u.shape)}")
    b, d, L = u.shape
    V.check_reference_dims("u", u, "[B, D, L]", (
        (0, "batch size B", (("delta", delta, 3, 0), ("B", B, 3, 0), ("C", C, 3, 0))),
        (1, "channels D", (("delta", delta, 3, 1), ("A", A, 2, 0))),
        (2, "length L", (("delta", delta, 3, 2), ("B", B, 3, 2), ("C", C, 3, 2)))))
    V.check_tensor("delta", delta, (b, d, L), "[B, D, L]", u)
    V.check_tensor("A", A, (d, None), "[D, N]", u)
    n = A.shape[1]
    V.check_head_dim("A (state size N)", n)
    nb = _check_bc("B", B, b, d, L, u)
    _check_bc("C", C, b, d, L, u)
    if C.shape != B.shape:
        raise ValueError(f"C must have B's shape {list(B.shape)}, got {list(C.shape)}")
    if nb != n:
        raise ValueError(f"B has state size {nb} (shape {list(B.shape)}) but A has "
                         f"{n} (shape {list(A.shape)})")
    V.check_tensor("D", D, (d,), "[D]", u)
    V.check_tensor("z", z, (b, d, L), "[B, D, L]", u)
    V.check_tensor("delta_bias", delta_bias, (d,), "[D]", u)
    V.check_flag("delta_softplus", delta_softplus)
    V.check_flag("return_last_state", return_last_state)
    name = _backend.resolve("selective_scan", u.device, u.dtype)
    u, delta, A, B, C, D, z, delta_bias = contiguous(u, delta, A, B, C, D, z, delta_bias)
    y, last, _ = _scan_call(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                            return_last_state, name)
    return (y, last) if return_last_state else y


# =============================================================================================
# Mamba-2 SSD
# =============================================================================================
@torch.library.custom_op("lightning_ops::ssd", mutates_args=())
def _ssd_fwd(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
             z: Optional[Tensor], dt_bias: Optional[Tensor], initial_states: Optional[Tensor],
             seq_idx: Optional[Tensor], cu_seqlens: Optional[Tensor], chunk_size: int,
             dt_softplus: bool, dt_min: float, dt_max: float, return_final_states: bool,
             need_pre: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    # value checks here too: under torch.compile only this body sees real tensors
    V.check_cu_seqlens_values(cu_seqlens, x.shape[1])
    need_pre = need_pre and z is not None
    pre_shape = x.shape if need_pre else (0,)  # the pre-gate output, saved for dz
    if is_empty(x):  # no tokens (b, l or h = 0): no backend sees the call
        b, l, h, p = x.shape
        N = b if cu_seqlens is None else cu_seqlens.shape[0] - 1
        acc = accumulation_dtype(x)
        return x.new_zeros(x.shape), passthrough_state(
            initial_states, (N, h, p, B.shape[-1]), x, acc, return_final_states), \
            x.new_zeros(pre_shape, dtype=acc)
    impl = _backend.implementation("ssd", backend)
    out = impl.ssd_forward(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens,
                           chunk_size, dt_softplus, dt_min, dt_max, return_final_states,
                           need_pre=need_pre)
    y, final, pre = out
    return (y, empty_like_none(final, x, accumulation_dtype(x)),
            pre if need_pre else x.new_empty(0, dtype=accumulation_dtype(x)))


@_ssd_fwd.register_fake
def _(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, chunk_size,
      dt_softplus, dt_min, dt_max, return_final_states, need_pre, backend):
    b, l, h, p = x.shape
    N = b if cu_seqlens is None else cu_seqlens.shape[0] - 1
    final = x.new_empty((N, h, p, B.shape[-1]) if return_final_states else (0,),
                        dtype=accumulation_dtype(x))
    pre = x.shape if need_pre and z is not None else (0,)
    return x.new_empty(x.shape), final, x.new_empty(pre, dtype=accumulation_dtype(x))


@torch.library.custom_op("lightning_ops::ssd_backward", mutates_args=())
def _ssd_bwd(dy: Tensor, dfinal: Optional[Tensor], x: Tensor, dt: Tensor, A: Tensor, B: Tensor,
             C: Tensor, D: Optional[Tensor], z: Optional[Tensor], dt_bias: Optional[Tensor],
             initial_states: Optional[Tensor], seq_idx: Optional[Tensor],
             cu_seqlens: Optional[Tensor], pre: Optional[Tensor], chunk_size: int,
             dt_softplus: bool, dt_min: float, dt_max: float, backend: str
             ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    if is_empty(x):
        return (torch.zeros_like(x), torch.zeros_like(dt), torch.zeros_like(A),
                torch.zeros_like(B), torch.zeros_like(C), zeros_or_empty(D, x),
                zeros_or_empty(z, x), zeros_or_empty(dt_bias, x),
                passthrough_grad(dfinal, initial_states, x))
    impl = _backend.implementation("ssd", backend)
    dx, ddt, dA, dB, dC, dD, dz, ddtb, dh0 = impl.ssd_backward(
        x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, chunk_size,
        dt_softplus, dt_min, dt_max, dy, dfinal, pre=pre)
    # dense like the fakes promise (a gradient computed through a transpose is not)
    return contiguous(dx, ddt, dA, dB, dC, empty_like_none(dD, x), empty_like_none(dz, x),
                      empty_like_none(ddtb, x), empty_like_none(dh0, x))


@_ssd_bwd.register_fake
def _(dy, dfinal, x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, pre,
      chunk_size, dt_softplus, dt_min, dt_max, backend):
    return (torch.empty_like(x), torch.empty_like(dt), torch.empty_like(A), torch.empty_like(B),
            torch.empty_like(C), _empty_grad(D, x), _empty_grad(z, x), _empty_grad(dt_bias, x),
            _empty_grad(initial_states, x))


def _ssd_setup(ctx, inputs, output):
    (x, dt, A, B, C, D, z, dt_bias, h0, seq_idx, cu, chunk_size, dt_softplus, dt_min, dt_max,
     _, _, backend) = inputs
    # the pre-gate output (z only): dz needs it, and the backward never re-runs the forward
    pre = output[2] if z is not None and output[2].numel() else None
    ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, h0, seq_idx, cu, pre)
    ctx.opts = (chunk_size, dt_softplus, dt_min, dt_max, backend)


def _ssd_backward(ctx, dy, dfinal, _dpre):
    x, dt, A, B, C, D, z, dt_bias, h0, seq_idx, cu, pre = ctx.saved_tensors
    dfinal = None if dfinal is None or dfinal.numel() == 0 else dfinal
    grads = call_op(_ssd_bwd, dy.contiguous(), dfinal, x, dt, A, B, C, D, z, dt_bias, h0,
                    seq_idx, cu, pre, *ctx.opts)
    rest = _none_for_absent(grads[5:], (D, z, dt_bias, h0))
    return tuple(grads[:5]) + rest + (None,) * 9


_ssd_call = register_autograd(_ssd_fwd, _ssd_backward, _ssd_setup)
forbid_double_backward(_ssd_bwd, lambda inputs: "mamba_chunk_scan_combined")


def _check_dt_limit(dt_limit) -> Tuple[float, float]:
    if not isinstance(dt_limit, (tuple, list)) or len(dt_limit) != 2 or \
            not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in dt_limit):
        raise TypeError(f"dt_limit must be a pair of Python floats (min, max), got {dt_limit!r}")
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    # plain comparisons, not math.isnan: under torch.compile(dynamic=True) the floats may be
    # symbolic, and math.isnan of a symbolic float cannot be traced
    if V.is_nan(lo) or V.is_nan(hi) or lo > hi:
        raise ValueError(f"dt_limit must satisfy min <= max, got {dt_limit!r}")
    return lo, hi


def mamba_chunk_scan_combined(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                              chunk_size: int, D: Optional[Tensor] = None,
                              z: Optional[Tensor] = None, dt_bias: Optional[Tensor] = None,
                              initial_states: Optional[Tensor] = None,
                              seq_idx: Optional[Tensor] = None,
                              cu_seqlens: Optional[Tensor] = None, dt_softplus: bool = False,
                              dt_limit: Tuple[float, float] = (0.0, float("inf")),
                              return_final_states: bool = False,
                              return_varlen_states: bool = False):
    """Mamba-2 SSD (mamba-ssm layout). Per head h, state H [p, n]:
    H_t = exp(dt_t A[h]) H_{t-1} + dt_t x_t B_t^T ; y_t = H_t C_t + D x_t ; y *= silu(z).
    dt is processed as clamp(softplus(dt + dt_bias), *dt_limit) (each step when asked).
    x, z: [b, l, h, p]; dt: [b, l, h]; A: [h]; B, C: [b, l, g, n]; D: [h] or [h, p];
    dt_bias: [h]; initial_states / final states: [N, h, p, n] float32 with N = b, or the number
    of sequences when cu_seqlens packs them (b == 1; each gets its own initial/final state).
    seq_idx [b, l] (int): the state resets where it changes.
    Returns y, (y, final_states); with return_varlen_states (needs cu_seqlens), as mamba-ssm:
    (y, varlen_states) or (y, final_states, varlen_states) where varlen_states are the
    per-sequence final states [N, h, p, n] and final_states the row's last one [1, h, p, n]."""
    V.check_float("x", x)
    if x.dim() != 4:
        raise ValueError(f"x must have shape [b, l, h, p] (4 dims), got {list(x.shape)}")
    b, l, h, p = x.shape
    V.check_reference_dims("x", x, "[b, l, h, p]", (
        (0, "batch size b", (("dt", dt, 3, 0), ("B", B, 4, 0), ("C", C, 4, 0))),
        (1, "length l", (("dt", dt, 3, 1), ("B", B, 4, 1), ("C", C, 4, 1))),
        (2, "heads h", (("dt", dt, 3, 2), ("A", A, 1, 0)))))
    V.check_tensor("dt", dt, (b, l, h), "[b, l, h]", x)
    V.check_tensor("A", A, (h,), "[h]", x)
    V.check_float("B", B)
    if B.dim() != 4:
        raise ValueError(f"B must have shape [b, l, g, n] = [{b}, {l}, *, *], "
                         f"got {list(B.shape)}")
    V.check_tensor("B", B, (b, l, None, None), "[b, l, g, n]", x)
    g, n = B.shape[2:]
    if g < 1 or h % g:
        raise ValueError(f"B has {g} groups (shape {list(B.shape)}), which must divide the "
                         f"{h} heads of x")
    V.check_tensor("C", C, (b, l, g, n), "[b, l, g, n]", x)
    V.check_head_dim("x (head dim p)", p)
    V.check_head_dim("B (state size n)", n)
    if D is not None:
        V.check_tensor("D", D, (h,) if D.dim() <= 1 else (h, p),
                       "[h]" if D.dim() <= 1 else "[h, p]", x)
    V.check_tensor("z", z, (b, l, h, p), "[b, l, h, p]", x)
    V.check_tensor("dt_bias", dt_bias, (h,), "[h]", x)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be a Python int, got {type(chunk_size).__name__}")
    V.check_power_of_two("chunk_size", chunk_size)
    V.check_flag("dt_softplus", dt_softplus)
    V.check_flag("return_final_states", return_final_states)
    V.check_flag("return_varlen_states", return_varlen_states)
    dt_min, dt_max = _check_dt_limit(dt_limit)
    _check_seq_idx(seq_idx, (b, l), "[b, l]", x)
    if return_varlen_states and cu_seqlens is None:
        raise ValueError("return_varlen_states=True needs cu_seqlens")
    N = V.check_cu_seqlens(cu_seqlens, b, l, x)
    V.check_state("initial_states", initial_states, (N, h, p, n), "[N, h, p, n]", x)
    name = _backend.resolve("ssd", x.device, x.dtype)
    want_states = return_final_states or return_varlen_states
    x, dt, A, B, C, D, z, dt_bias, initial_states = contiguous(x, dt, A, B, C, D, z, dt_bias,
                                                               initial_states)
    # with z, the output before the gate comes back for the backward's dz when a gradient can
    # be asked for (a Python bool: torch.compile specialises on it)
    need_pre = z is not None and torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, dt, A, B, C, D, z, dt_bias,
                                                    initial_states))
    y, final, _ = _ssd_call(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens,
                            chunk_size, dt_softplus, dt_min, dt_max, want_states, need_pre, name)
    if return_varlen_states:
        return (y, final[-1:], final) if return_final_states else (y, final)
    return (y, final) if return_final_states else y


# =============================================================================================
# Decode step: selective_state_update (state updated in place)
# =============================================================================================
@torch.library.custom_op("lightning_ops::selective_state_update", mutates_args=("state",))
def _state_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                  D: Optional[Tensor], z: Optional[Tensor], dt_bias: Optional[Tensor],
                  dt_softplus: bool, backend: str) -> Tensor:
    impl = _backend.implementation("ssd", backend)
    return impl.state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


@_state_update.register_fake
def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, backend):
    return x.new_empty(x.shape)


# Decode steps run once per token and layer, on tensors of a few KB to a few MB: the checks and
# the dispatch must cost next to nothing. Each wrapper first asks _ssu_fits / _conv_update_fits
# (plain tuple compares) whether the inputs are certainly valid, and runs the full checks, which
# name what is wrong, only when they are not. In plain eager mode (_custom_op.eager_direct) the
# backend function is called without the custom op's dispatch (measured on CPU: more than the
# step itself); torch.compile, fake tensors, modes, tensor subclasses and inputs that need
# autograd still go through the custom op.


def _check_inplace(name: str, t: Tensor) -> None:
    """V.check_inplace, whose stride and overlap checks a contiguous tensor passes by
    definition (no two elements share memory): skipped for those in eager mode."""
    if torch.compiler.is_compiling() or not t.is_contiguous() or t.is_inference():
        V.check_inplace(name, t)


def _fits(t: Optional[Tensor], shape, device, optional: bool = False) -> bool:
    """t is a float tensor of exactly `shape` on `device` (None allowed if optional)."""
    if t is None:
        return optional
    return isinstance(t, torch.Tensor) and t.dtype in V.FLOAT_DTYPES and t.shape == shape and \
        t.device == device


def _ssu_fits(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus) -> bool:
    """The inputs of selective_state_update are certainly valid (what _ssu_check checks)."""
    if not isinstance(state, torch.Tensor) or not isinstance(dt_softplus, bool) or \
            state.dtype not in V.FLOAT_DTYPES or not isinstance(B, torch.Tensor):
        return False
    dev, shape = state.device, state.shape
    if len(shape) == 3:
        b, d, n = shape
        return (_fits(x, (b, d), dev) and _fits(dt, (b, d), dev) and _fits(A, (d, n), dev) and
                _fits(B, (b, n), dev) and _fits(C, (b, n), dev) and
                _fits(D, (d,), dev, True) and _fits(z, (b, d), dev, True) and
                _fits(dt_bias, (d,), dev, True))
    if len(shape) != 4 or B.dim() != 3:
        return False
    b, h, p, n = shape
    g = B.shape[1]
    return (g >= 1 and h % g == 0 and _fits(x, (b, h, p), dev) and
            _fits(dt, (b, h, p), dev) and _fits(A, (h, p, n), dev) and
            _fits(B, (b, g, n), dev) and _fits(C, (b, g, n), dev) and
            _fits(D, (h, p), dev, True) and _fits(z, (b, h, p), dev, True) and
            _fits(dt_bias, (h, p), dev, True))


def _ssu_check(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus) -> None:
    """The full checks of selective_state_update, each error naming the tensor and shapes."""
    V.check_float("state", state)
    if state.dim() == 3:
        b, d, n = state.shape
        V.check_tensor("x", x, (b, d), "[b, D]", state)
        V.check_tensor("dt", dt, (b, d), "[b, D]", state)
        V.check_tensor("A", A, (d, n), "[D, n]", state)
        V.check_tensor("B", B, (b, n), "[b, n]", state)
        V.check_tensor("C", C, (b, n), "[b, n]", state)
        V.check_tensor("D", D, (d,), "[D]", state)
        V.check_tensor("z", z, (b, d), "[b, D]", state)
        V.check_tensor("dt_bias", dt_bias, (d,), "[D]", state)
        V.check_flag("dt_softplus", dt_softplus)
        return
    if state.dim() != 4:
        raise ValueError(f"state must have shape [b, h, p, n] (heads) or [b, D, n] (Mamba-1), "
                         f"got {list(state.shape)}")
    b, h, p, n = state.shape
    V.check_tensor("x", x, (b, h, p), "[b, h, p]", state)
    V.check_tensor("dt", dt, (b, h, p), "[b, h, p]", state)
    V.check_tensor("A", A, (h, p, n), "[h, p, n]", state)
    V.check_float("B", B)
    if B.dim() != 3:
        raise ValueError(f"B must have shape [b, g, n] = [{b}, *, {n}], got {list(B.shape)}")
    V.check_tensor("B", B, (b, None, n), "[b, g, n]", state)
    g = B.shape[1]
    if g < 1 or h % g:
        raise ValueError(f"B has {g} groups (shape {list(B.shape)}), which must divide the "
                         f"{h} heads of state")
    V.check_tensor("C", C, (b, g, n), "[b, g, n]", state)
    V.check_tensor("D", D, (h, p), "[h, p]", state)
    V.check_tensor("z", z, (b, h, p), "[b, h, p]", state)
    V.check_tensor("dt_bias", dt_bias, (h, p), "[h, p]", state)
    V.check_flag("dt_softplus", dt_softplus)


def selective_state_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor,
                           C: Tensor, D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                           dt_bias: Optional[Tensor] = None, dt_softplus: bool = False) -> Tensor:
    """One decode step (mamba-ssm layout); `state` is updated in place:
    state = exp(dt A) state + dt B x ; out = state C + D x ; out *= silu(z) if z.
    Heads form: state [b,h,p,n], x/dt/z [b,h,p], A [h,p,n], B/C [b,g,n], D/dt_bias [h,p].
    Mamba-1 form: state [b,D,n], x/dt/z [b,D], A [D,n], B/C [b,n], D/dt_bias [D].
    A, dt and dt_bias expanded with stride 0 over p (and n), as Mamba-2 passes them, take a
    per-head fast path."""
    if not _ssu_fits(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
        _ssu_check(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    dev = autocast_device((state,))
    if dev is not None:  # the step in its inputs' dtypes, as every op (_custom_op)
        return without_autocast(dev, selective_state_update, state, x, dt, A, B, C, D, z,
                                dt_bias, dt_softplus)
    _check_inplace("state", state)
    name = _backend.resolve("ssd", state.device, state.dtype)
    args = (state, x, dt, A, B, C, D, z, dt_bias)
    direct = eager_direct(args)
    if direct and name == "torch":  # takes the Mamba-1 form as it is
        return _backend.implementation("ssd", name).state_update(*args, dt_softplus)
    mamba1 = state.dim() == 3
    if mamba1:  # the heads form with one head of D channels
        state, x, dt, A, B, C = (state.unsqueeze(1), x.unsqueeze(1), dt.unsqueeze(1),
                                 A.unsqueeze(0), B.unsqueeze(1), C.unsqueeze(1))
        D = None if D is None else D.unsqueeze(0)
        z = None if z is None else z.unsqueeze(1)
        dt_bias = None if dt_bias is None else dt_bias.unsqueeze(0)
    args = (state, x, dt, A, B, C, D, z, dt_bias)
    if direct:
        out = _backend.implementation("ssd", name).state_update(*args, dt_softplus)
    else:
        out = _state_update(*args, dt_softplus, name)
    return out.squeeze(1) if mamba1 else out


# =============================================================================================
# Causal depthwise conv1d
# =============================================================================================
_ACTIVATIONS = {None: "none", "silu": "silu", "swish": "silu"}


def _activation(activation) -> str:
    if not (activation is None or isinstance(activation, str)) or \
            activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    return _ACTIVATIONS[activation]


@torch.library.custom_op("lightning_ops::causal_conv1d", mutates_args=())
def _conv_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor],
              initial_states: Optional[Tensor], seq_idx: Optional[Tensor],
              return_final_states: bool, activation: str, backend: str, save_pre: bool
              ) -> Tuple[Tensor, Tensor, Tensor]:
    # save_pre (torch backend, SiLU, a backward to come): also return SiLU's input, kept for
    # the backward instead of a second conv there; else an empty placeholder
    if is_empty(x):  # no tokens (b, d or L = 0): the history passes through unchanged
        b, d, _ = x.shape
        return x.new_zeros(x.shape), passthrough_state(
            initial_states, (b, d, weight.shape[1] - 1), x, x.dtype, return_final_states), \
            x.new_empty(0, dtype=accumulation_dtype(x))
    impl = _backend.implementation("conv", backend)
    out, final, pre = impl.conv_forward(x, weight, bias, initial_states, seq_idx,
                                        return_final_states, activation, save_pre)
    return out, empty_like_none(final, x), empty_like_none(pre, x, accumulation_dtype(x))


@_conv_fwd.register_fake
def _(x, weight, bias, initial_states, seq_idx, return_final_states, activation, backend,
      save_pre):
    b, d, _ = x.shape
    final = x.new_empty((b, d, weight.shape[1] - 1) if return_final_states else (0,))
    keep = save_pre and activation == "silu" and seq_idx is None and x.numel() > 0
    W1 = weight.shape[1] - 1  # the conv's full output: [b, d, L + W - 1] without a history
    pre = x.new_empty((b, d, x.shape[2] + (W1 if initial_states is None else 0)) if keep
                      else (0,), dtype=accumulation_dtype(x))
    return x.new_empty(x.shape), final, pre


@torch.library.custom_op("lightning_ops::causal_conv1d_backward", mutates_args=())
def _conv_bwd(dout: Tensor, dfinal: Optional[Tensor], x: Tensor, weight: Tensor,
              bias: Optional[Tensor], initial_states: Optional[Tensor],
              seq_idx: Optional[Tensor], pre: Optional[Tensor], activation: str, backend: str
              ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    if is_empty(x):
        return (torch.zeros_like(x), torch.zeros_like(weight), zeros_or_empty(bias, x),
                passthrough_grad(dfinal, initial_states, x))
    impl = _backend.implementation("conv", backend)
    dx, dw, db, dh0 = impl.conv_backward(x, weight, bias, initial_states, seq_idx, activation,
                                         dout, dfinal, pre)
    return contiguous(dx, dw, empty_like_none(db, x), empty_like_none(dh0, x))


@_conv_bwd.register_fake
def _(dout, dfinal, x, weight, bias, initial_states, seq_idx, pre, activation, backend):
    return (torch.empty_like(x), torch.empty_like(weight), _empty_grad(bias, x),
            _empty_grad(initial_states, x))


def _conv_setup(ctx, inputs, output):
    x, weight, bias, h0, seq_idx, _, activation, backend, _ = inputs
    ctx.save_for_backward(x, weight, bias, h0, seq_idx, output[2])
    ctx.activation, ctx.backend = activation, backend
    # the saved pre-activation never gets a gradient: no zero tensor of its size materialised
    # for it (nor for an unused output) on every backward
    ctx.set_materialize_grads(False)


def _conv_backward(ctx, dout, dfinal, dpre):
    x, weight, bias, h0, seq_idx, pre = ctx.saved_tensors
    dfinal = None if dfinal is None or dfinal.numel() == 0 else dfinal
    dout = torch.zeros_like(x) if dout is None else dout
    dx, dw, db, dh0 = call_op(_conv_bwd, dout.contiguous(), dfinal, x, weight, bias, h0,
                              seq_idx, none_if_empty(pre), ctx.activation, ctx.backend)
    db, dh0 = _none_for_absent((db, dh0), (bias, h0))
    return dx, dw, db, dh0, None, None, None, None, None


_conv_call = register_autograd(_conv_fwd, _conv_backward, _conv_setup)
forbid_double_backward(_conv_bwd, lambda inputs: "causal_conv1d_fn")


def _check_conv_weight(weight: Tensor, d: int, ref: Tensor) -> int:
    V.check_tensor("weight", weight, (d, None), "[D, W]", ref)
    W = weight.shape[1]
    if not 2 <= W <= 4:
        raise ValueError(f"weight width W must be 2, 3 or 4, got W={W} "
                         f"(weight shape {list(weight.shape)})")
    return W


def causal_conv1d_fn(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                     initial_states: Optional[Tensor] = None, return_final_states: bool = False,
                     activation: Optional[str] = None, seq_idx: Optional[Tensor] = None):
    """Causal depthwise conv1d (causal-conv1d layout):
    out[t] = act(bias + sum_i weight[:, i] * x[:, t - W + 1 + i]), history before t = 0 from
    initial_states [B, D, W-1] (zeros if absent). x [B, D, L]; weight [D, W], W in 2..4;
    bias [D]; activation None, 'silu' or 'swish'. seq_idx [B, L] (int, keyword only): no tap
    reaches across a change of seq_idx (packed sequences).
    Returns out, or (out, final_states [B, D, W-1]: the last W-1 inputs)."""
    V.check_float("x", x)
    if x.dim() != 3:
        raise ValueError(f"x must have shape [B, D, L] (3 dims), got {list(x.shape)}")
    b, d, L = x.shape
    W = _check_conv_weight(weight, d, x)
    V.check_tensor("bias", bias, (d,), "[D]", x)
    V.check_state("initial_states", initial_states, (b, d, W - 1), "[B, D, W-1]", x)
    V.check_flag("return_final_states", return_final_states)
    act = _activation(activation)
    _check_seq_idx(seq_idx, (b, L), "[B, L]", x)
    name = _backend.resolve("conv", x.device, x.dtype)
    x, weight, bias, initial_states = contiguous(x, weight, bias, initial_states)
    if name == "torch" and not is_empty(x) and \
            plain_eager((x, weight, bias, initial_states, seq_idx)):
        # plain eager mode, torch backend: autograd through the conv's own aten ops (as
        # causal-conv1d's reference), cheaper than the custom op's Python backward
        args = (x, weight, bias, initial_states, seq_idx, return_final_states, act)
        out, final = autocast_off((x,), _backend.implementation("conv", name).conv_autograd,
                                  *args)
        return (out, final) if return_final_states else out
    # the torch backend keeps SiLU's input when a backward will follow (the Triton one
    # recomputes it inside its fused gradient kernel)
    save_pre = name == "torch" and act == "silu" and seq_idx is None and \
        torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                        for t in (x, weight, bias, initial_states))
    out, final, _ = _conv_call(x, weight, bias, initial_states, seq_idx, return_final_states,
                               act, name, save_pre)
    return (out, final) if return_final_states else out


@torch.library.custom_op("lightning_ops::causal_conv1d_update", mutates_args=("conv_state",))
def _conv_update(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Optional[Tensor],
                 activation: str, backend: str) -> Tensor:
    impl = _backend.implementation("conv", backend)
    return impl.conv_update(x, conv_state, weight, bias, activation)


@_conv_update.register_fake
def _(x, conv_state, weight, bias, activation, backend):
    return x.new_empty(x.shape)


def _conv_update_fits(x, conv_state, weight, bias, activation) -> bool:
    """The inputs of causal_conv1d_update are certainly valid (what _conv_update_check checks)."""
    if not isinstance(x, torch.Tensor) or x.dtype not in V.FLOAT_DTYPES or \
            x.dim() not in (2, 3) or not (activation is None or isinstance(activation, str)) or \
            activation not in _ACTIVATIONS or \
            not isinstance(weight, torch.Tensor) or weight.dim() != 2 or \
            not isinstance(conv_state, torch.Tensor) or conv_state.dim() != 3:
        return False
    b, d = x.shape[:2]
    W, dev = weight.shape[1], x.device
    return (2 <= W <= 4 and _fits(weight, (d, W), dev) and
            _fits(conv_state, (b, d, conv_state.shape[2]), dev) and
            conv_state.shape[2] >= W - 1 and _fits(bias, (d,), dev, True))


def _conv_update_check(x, conv_state, weight, bias, activation) -> None:
    V.check_float("x", x)
    if x.dim() not in (2, 3):
        raise ValueError(f"x must have shape [B, D] or [B, D, L], got {list(x.shape)}")
    b, d = x.shape[:2]
    W = _check_conv_weight(weight, d, x)
    V.check_tensor("conv_state", conv_state, (b, d, None), "[B, D, S]", x)
    if conv_state.shape[2] < W - 1:
        raise ValueError(f"conv_state must have shape [B, D, S] with S >= W-1 = {W - 1}, "
                         f"got {list(conv_state.shape)}")
    V.check_tensor("bias", bias, (d,), "[D]", x)
    _activation(activation)


def _conv_update_eager(x, conv_state, weight, bias, activation) -> Optional[Tensor]:
    """causal_conv1d_update's common call, a decode step in plain eager mode, in one pass of
    plain compares: not compiling, no mode or CPU autocast active, plain CPU tensors that need
    no gradient, one token x [b, D], float dtypes and matching shapes (what _conv_update_fits
    checks), a contiguous state that is not an inference tensor (nothing for _check_inplace to
    find), and the torch backend (unforced on the CPU, or forced). Then the torch backend's
    conv_update runs directly and its output is returned; otherwise None, and
    causal_conv1d_update takes the general path, whose checks name what is wrong. At B=1 this
    wrapper is a sizeable part of the step, so it makes no call it can avoid
    (each Python-level call costs ~1 us there)."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() or \
            torch._C._is_torch_function_mode_enabled() or torch.is_autocast_enabled("cpu"):
        return None
    if type(x) not in PLAIN_TENSORS or type(conv_state) not in PLAIN_TENSORS or \
            type(weight) not in PLAIN_TENSORS or (bias is not None and
                                                  type(bias) not in PLAIN_TENSORS):
        return None
    if not (x.is_cpu and conv_state.is_cpu and weight.is_cpu and (bias is None or bias.is_cpu)):
        return None
    act = _ACTIVATIONS.get(activation) if activation is None or type(activation) is str \
        else None
    if act is None:
        return None
    try:  # unpacking checks the number of dims too
        b, d = x.shape
        dw, W = weight.shape
        bs, ds, S = conv_state.shape
        db, = (d,) if bias is None else bias.shape
    except ValueError:
        return None
    if dw != d or bs != b or ds != d or db != d or not 2 <= W <= 4 or S < W - 1:
        return None
    floats = V.FLOAT_DTYPES
    if x.dtype not in floats or weight.dtype not in floats or conv_state.dtype not in floats or \
            (bias is not None and bias.dtype not in floats):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or conv_state.requires_grad or
                                    weight.requires_grad or
                                    (bias is not None and bias.requires_grad)):
        return None
    if not conv_state.is_contiguous() or conv_state.is_inference():
        return None
    forced = _backend.requested()
    if forced is not None and forced != "torch":
        return None
    return _backend.implementation("conv", "torch").conv_update(x, conv_state, weight, bias,
                                                                act)


def causal_conv1d_update(x: Tensor, conv_state: Tensor, weight: Tensor,
                         bias: Optional[Tensor] = None, activation: Optional[str] = None
                         ) -> Tensor:
    """Decode step of causal_conv1d_fn. x [B, D] or [B, D, L]; conv_state [B, D, S] with
    S >= W-1 holds the last S inputs and is shifted in place. Returns out shaped like x."""
    out = _conv_update_eager(x, conv_state, weight, bias, activation)
    if out is not None:
        return out
    if not _conv_update_fits(x, conv_state, weight, bias, activation):
        _conv_update_check(x, conv_state, weight, bias, activation)
    dev = autocast_device((conv_state,))
    if dev is not None:  # the step in its inputs' dtypes, as every op (_custom_op)
        return without_autocast(dev, causal_conv1d_update, x, conv_state, weight, bias,
                                activation)
    act = _ACTIVATIONS[activation]
    _check_inplace("conv_state", conv_state)
    name = _backend.resolve("conv", x.device, x.dtype)
    direct = eager_direct((x, conv_state, weight, bias))
    if direct and name == "torch":  # takes x [B, D] as it is
        return _backend.implementation("conv", name).conv_update(x, conv_state, weight, bias,
                                                                 act)
    xs = x.unsqueeze(-1) if x.dim() == 2 else x
    if direct:
        out = _backend.implementation("conv", name).conv_update(xs, conv_state, weight, bias,
                                                                 act)
    else:
        out = _conv_update(xs, conv_state, weight, bias, act, name)
    return out.squeeze(-1) if x.dim() == 2 else out


__all__ = ["selective_scan_fn", "mamba_chunk_scan_combined", "selective_state_update",
           "causal_conv1d_fn", "causal_conv1d_update"]

"""PLACEHOLDER (being replaced by the chunked engine): runs the reference recurrences."""
import torch

from .. import reference
from .._custom_op import grad_by_recompute


def scan_aux_shape(batch, dim, dstate, seqlen):
    return (0,)


def scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    y, last = reference.selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                           True)
    return y, (last if return_last_state else None), u.new_empty(0, dtype=last.dtype)


def scan_backward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, aux, dy, dlast):
    def f(u, delta, A, B, C, D, z, db):
        return reference.selective_scan_ref(u, delta, A, B, C, D, z, db, delta_softplus, True)
    return grad_by_recompute(f, [u, delta, A, B, C, D, z, delta_bias], [dy, dlast])


def ssd_forward(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, chunk_size,
                dt_softplus, dt_min, dt_max, return_final_states):
    y, final = reference.ssd_ref(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx,
                                 cu_seqlens, dt_softplus, (dt_min, dt_max))
    return y, (final if return_final_states else None)


def ssd_backward(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, chunk_size,
                 dt_softplus, dt_min, dt_max, dy, dfinal):
    def f(x, dt, A, B, C, D, z, dtb, h0):
        return reference.ssd_ref(x, dt, A, B, C, D, z, dtb, h0, seq_idx, cu_seqlens, dt_softplus,
                                 (dt_min, dt_max))
    return grad_by_recompute(f, [x, dt, A, B, C, D, z, dt_bias, initial_states], [dy, dfinal])


def state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    return reference.selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


def conv_forward(x, weight, bias, initial_states, seq_idx, return_final_states, activation):
    if seq_idx is not None:
        raise NotImplementedError("seq_idx")
    act = None if activation == "none" else activation
    out, final = reference.causal_conv1d_ref(x, weight, bias, initial_states, True, act)
    return out, (final if return_final_states else None)


def conv_backward(x, weight, bias, initial_states, seq_idx, activation, dout, dfinal):
    act = None if activation == "none" else activation

    def f(x, w, b, h0):
        return reference.causal_conv1d_ref(x, w, b, h0, True, act)
    return grad_by_recompute(f, [x, weight, bias, initial_states], [dout, dfinal])


def conv_update(x, conv_state, weight, bias, activation):
    act = None if activation == "none" else activation
    return reference.causal_conv1d_update_ref(x, conv_state, weight, bias, act)

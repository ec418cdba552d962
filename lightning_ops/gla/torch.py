"""PLACEHOLDER (to be replaced by the chunked engine): runs the reference recurrence."""
from .. import reference
from .._custom_op import grad_by_recompute


def forward(q, k, v, g, g_gamma, scale, initial_state, output_final_state, cu_seqlens, mode):
    return reference.gated_linear_attn_ref(q, k, v, g, g_gamma, scale, initial_state,
                                           output_final_state, cu_seqlens)


def backward(q, k, v, g, g_gamma, scale, initial_state, cu_seqlens, mode, do, dht):
    def f(q, k, v, g, h0):
        return reference.gated_linear_attn_ref(q, k, v, g, g_gamma, scale, h0, True, cu_seqlens)
    dq, dk, dv, dg, dh0 = grad_by_recompute(f, [q, k, v, g, initial_state], [do, dht])
    return dq, dk, dv, dg, dh0

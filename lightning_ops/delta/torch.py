"""PLACEHOLDER (being replaced by the chunked WY engine): runs the reference recurrence."""
from .. import reference
from .._custom_op import grad_by_recompute


def forward(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
            use_qk_l2norm_in_kernel, mode):
    return reference.gated_delta_rule_ref(q, k, v, g, beta, scale, initial_state,
                                       output_final_state, cu_seqlens,
                                           use_qk_l2norm_in_kernel)


def backward(q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm_in_kernel, mode,
             do, dht):
    def f(q, k, v, g, beta, h0):
        return reference.gated_delta_rule_ref(q, k, v, g, beta, scale, h0, True, cu_seqlens,
                                              use_qk_l2norm_in_kernel)
    return grad_by_recompute(f, [q, k, v, g, beta, initial_state], [do, dht])

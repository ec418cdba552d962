"""Mirror of `fla.ops` (lightning_ops.compat): same names and signatures, our kernels."""
from lightning_ops.compat._fla import (  # noqa: F401
    chunk_linear_attn,
    fused_chunk_linear_attn,
    fused_recurrent_linear_attn,
    chunk_simple_gla,
    fused_chunk_simple_gla,
    fused_recurrent_simple_gla,
    chunk_gla,
    fused_chunk_gla,
    fused_recurrent_gla,
    chunk_delta_rule,
    fused_chunk_delta_rule,
    fused_recurrent_delta_rule,
    chunk_gated_delta_rule,
    chunk_gdn,
    fused_recurrent_gated_delta_rule,
    fused_recurrent_gdn,
    chunk_lightning_attn,
    fused_recurrent_lightning_attn,
    chunk_kda,
    fused_recurrent_kda,
    parallel_simple_gla,
    chunk_log_linear_attn,
)

__all__ = ['chunk_linear_attn', 'fused_chunk_linear_attn', 'fused_recurrent_linear_attn', 'chunk_simple_gla', 'fused_chunk_simple_gla', 'fused_recurrent_simple_gla', 'chunk_gla', 'fused_chunk_gla', 'fused_recurrent_gla', 'chunk_delta_rule', 'fused_chunk_delta_rule', 'fused_recurrent_delta_rule', 'chunk_gated_delta_rule', 'chunk_gdn', 'fused_recurrent_gated_delta_rule', 'fused_recurrent_gdn', 'chunk_lightning_attn', 'fused_recurrent_lightning_attn', 'chunk_kda', 'fused_recurrent_kda', 'parallel_simple_gla', 'chunk_log_linear_attn']

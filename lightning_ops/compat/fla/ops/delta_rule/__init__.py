"""Mirror of `fla.ops.delta_rule` (lightning_ops.compat): same names and signatures, our kernels."""
from lightning_ops.compat._fla import (  # noqa: F401
    chunk_delta_rule,
    fused_chunk_delta_rule,
    fused_recurrent_delta_rule,
)

__all__ = ['chunk_delta_rule', 'fused_chunk_delta_rule', 'fused_recurrent_delta_rule']

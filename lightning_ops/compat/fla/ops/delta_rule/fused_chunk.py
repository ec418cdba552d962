"""Mirror of `fla.ops.delta_rule.fused_chunk` (lightning_ops.compat): same names and signatures, our kernels."""
from lightning_ops.compat._fla import (  # noqa: F401
    fused_chunk_delta_rule,
)

__all__ = ['fused_chunk_delta_rule']

"""Mirror of `fla.ops.gated_delta_rule.chunk` (lightning_ops.compat): same names and signatures, our kernels."""
from lightning_ops.compat._fla import (  # noqa: F401
    chunk_gated_delta_rule,
    chunk_gdn,
)

__all__ = ['chunk_gated_delta_rule', 'chunk_gdn']

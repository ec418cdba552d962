"""Mirror of `fla.ops.simple_gla` (lightning_ops.compat): same names and signatures, our kernels."""
from lightning_ops.compat._fla import (  # noqa: F401
    chunk_simple_gla,
    fused_chunk_simple_gla,
    fused_recurrent_simple_gla,
    parallel_simple_gla,
)

__all__ = ['chunk_simple_gla', 'fused_chunk_simple_gla', 'fused_recurrent_simple_gla', 'parallel_simple_gla']

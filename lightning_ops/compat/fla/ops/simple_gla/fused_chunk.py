"""Mirror of `fla.ops.simple_gla.fused_chunk` (lightning_ops.compat): same names and signatures, our kernels."""
from lightning_ops.compat._fla import (  # noqa: F401
    fused_chunk_simple_gla,
)

__all__ = ['fused_chunk_simple_gla']

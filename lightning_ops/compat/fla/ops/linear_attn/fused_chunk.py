"""Mirror of `fla.ops.linear_attn.fused_chunk` (lightning_ops.compat): same names and signatures, our kernels."""
from lightning_ops.compat._fla import (  # noqa: F401
    fused_chunk_linear_attn,
)

__all__ = ['fused_chunk_linear_attn']

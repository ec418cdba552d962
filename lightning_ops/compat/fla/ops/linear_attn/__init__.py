"""Mirror of `fla.ops.linear_attn` (lightning_ops.compat): same names and signatures, our kernels."""
from lightning_ops.compat._fla import (  # noqa: F401
    chunk_linear_attn,
    fused_chunk_linear_attn,
    fused_recurrent_linear_attn,
)

__all__ = ['chunk_linear_attn', 'fused_chunk_linear_attn', 'fused_recurrent_linear_attn']

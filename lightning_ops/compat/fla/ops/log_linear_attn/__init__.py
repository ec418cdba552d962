"""Mirror of `fla.ops.log_linear_attn` (lightning_ops.compat): same names and signatures, our kernels."""
from lightning_ops.compat._fla import (  # noqa: F401
    chunk_log_linear_attn,
)

__all__ = ['chunk_log_linear_attn']

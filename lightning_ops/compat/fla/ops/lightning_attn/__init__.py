"""Mirror of `fla.ops.lightning_attn` (lightning_ops.compat): same names and signatures, our kernels."""
from lightning_ops.compat._fla import (  # noqa: F401
    chunk_lightning_attn,
    fused_recurrent_lightning_attn,
)

__all__ = ['chunk_lightning_attn', 'fused_recurrent_lightning_attn']

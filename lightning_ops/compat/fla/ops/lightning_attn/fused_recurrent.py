"""Mirror of `fla.ops.lightning_attn.fused_recurrent` (lightning_ops.compat): same names and signatures, our kernels."""
from lightning_ops.compat._fla import (  # noqa: F401
    fused_recurrent_lightning_attn,
)

__all__ = ['fused_recurrent_lightning_attn']

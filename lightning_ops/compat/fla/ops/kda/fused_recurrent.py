"""Mirror of `fla.ops.kda.fused_recurrent` (lightning_ops.compat): same names and signatures, our kernels."""
from lightning_ops.compat._fla import (  # noqa: F401
    fused_recurrent_kda,
    fused_recurrent_kda_fwd,
)

__all__ = ['fused_recurrent_kda', 'fused_recurrent_kda_fwd']

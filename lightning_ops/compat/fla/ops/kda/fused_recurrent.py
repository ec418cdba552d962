"""Mirror of `fla.ops.kda.fused_recurrent` (lightning_ops.compat): same names and signatures,
our kernels."""
from lightning_ops.compat._fla import fused_recurrent_kda  # noqa: F401

__all__ = ['fused_recurrent_kda']

"""Mirror of `fla.ops.kda.gate` (lightning_ops.compat): same names and signatures, our kernels."""
from lightning_ops.compat._fla import fused_kda_gate  # noqa: F401

__all__ = ['fused_kda_gate']

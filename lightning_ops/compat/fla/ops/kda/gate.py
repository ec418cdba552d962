"""Mirror of `fla.ops.kda.gate` (lightning_ops.compat): same names and signatures, our kernels."""
from lightning_ops.compat._fla import fused_kda_gate  # noqa: F401
from lightning_ops.compat._refs import (  # noqa: F401
    naive_kda_gate,
    naive_kda_lowerbound_gate,
)

__all__ = ['fused_kda_gate', 'naive_kda_gate', 'naive_kda_lowerbound_gate']

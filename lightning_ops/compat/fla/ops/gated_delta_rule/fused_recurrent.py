"""Mirror of `fla.ops.gated_delta_rule.fused_recurrent` (lightning_ops.compat): same names and signatures, our kernels."""
from lightning_ops.compat._fla import (  # noqa: F401
    fused_recurrent_gated_delta_rule,
    fused_recurrent_gdn,
)

__all__ = ['fused_recurrent_gated_delta_rule', 'fused_recurrent_gdn']

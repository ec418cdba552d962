"""Mirror of `fla.ops.gated_delta_rule.naive` (lightning_ops.compat): same names and signatures, references computed by our spec (lightning_ops.reference)."""
from lightning_ops.compat._refs import (  # noqa: F401
    naive_recurrent_gated_delta_rule,
)

__all__ = ['naive_recurrent_gated_delta_rule']

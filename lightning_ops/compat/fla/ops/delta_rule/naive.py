"""Mirror of `fla.ops.delta_rule.naive` (lightning_ops.compat): same names and signatures, references computed by our spec (lightning_ops.reference)."""
from lightning_ops.compat._refs import (  # noqa: F401
    delta_rule_recurrence,
)

__all__ = ['delta_rule_recurrence']

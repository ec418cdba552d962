"""Mirror of `fla.ops.gated_delta_rule.gate` (lightning_ops.compat): the Gated DeltaNet gate, ours and the reference."""
from lightning_ops.compat._fla import (  # noqa: F401
    fused_gdn_gate,
)
from lightning_ops.compat._refs import (  # noqa: F401
    naive_gdn_gate,
)

__all__ = ['fused_gdn_gate', 'naive_gdn_gate']

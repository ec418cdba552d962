"""Mirror of `fla.ops.gated_delta_rule` (lightning_ops.compat): same names and signatures, our kernels."""
from lightning_ops.compat._fla import (  # noqa: F401
    chunk_gated_delta_rule,
    chunk_gdn,
    fused_recurrent_gated_delta_rule,
    fused_recurrent_gdn,
)
from lightning_ops.compat._refs import (  # noqa: F401
    naive_recurrent_gated_delta_rule,
)

__all__ = ['chunk_gated_delta_rule', 'chunk_gdn', 'fused_recurrent_gated_delta_rule', 'fused_recurrent_gdn', 'naive_recurrent_gated_delta_rule']

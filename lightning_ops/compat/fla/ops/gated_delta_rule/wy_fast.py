"""Mirror of `fla.ops.gated_delta_rule.wy_fast` (lightning_ops.compat): fla's chunk-internal WY steps are
NOT served; the names import (so a test file importing them still runs its other tests) and
raise UnsupportedArgumentError when called."""
from lightning_ops.compat._fla import (  # noqa: F401
    prepare_wy_repr_bwd,
    recompute_w_u_fwd,
)

__all__ = ['prepare_wy_repr_bwd', 'recompute_w_u_fwd']

"""Mirror of `mamba_ssm.ops.triton.selective_state_update` (lightning_ops.compat): same names and signatures, our kernels."""
from lightning_ops.compat._mamba import (  # noqa: F401
    selective_state_update,
)
from lightning_ops.compat._refs import (  # noqa: F401
    selective_state_update_ref,
)

__all__ = ['selective_state_update', 'selective_state_update_ref']

"""Mirror of `causal_conv1d.causal_conv1d_interface` (lightning_ops.compat): same names and signatures, our kernels."""
from lightning_ops.compat._mamba import (  # noqa: F401
    causal_conv1d_fn,
    causal_conv1d_update,
)
from lightning_ops.compat._refs import (  # noqa: F401
    causal_conv1d_ref,
    causal_conv1d_update_ref,
)

__all__ = ['causal_conv1d_fn', 'causal_conv1d_update', 'causal_conv1d_ref', 'causal_conv1d_update_ref']

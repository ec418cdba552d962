"""Mirror of `mamba_ssm.ops.selective_scan_interface` (lightning_ops.compat): same names and signatures, our kernels."""
from lightning_ops.compat._mamba import (  # noqa: F401
    selective_scan_fn,
    mamba_inner_fn,
)
from lightning_ops.compat._refs import (  # noqa: F401
    selective_scan_ref,
    mamba_inner_ref,
)

__all__ = ['selective_scan_fn', 'mamba_inner_fn', 'selective_scan_ref', 'mamba_inner_ref']

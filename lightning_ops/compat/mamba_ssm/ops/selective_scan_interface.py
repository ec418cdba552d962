"""Mirror of `mamba_ssm.ops.selective_scan_interface` (lightning_ops.compat): same names and signatures, our kernels."""
from lightning_ops.compat._mamba import (  # noqa: F401
    selective_scan_fn,
    mamba_inner_fn,
)

__all__ = ['selective_scan_fn', 'mamba_inner_fn']

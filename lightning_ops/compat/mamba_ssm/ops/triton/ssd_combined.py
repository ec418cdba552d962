"""Mirror of `mamba_ssm.ops.triton.ssd_combined` (lightning_ops.compat): same names and signatures, our kernels."""
from lightning_ops.compat._mamba import (  # noqa: F401
    mamba_chunk_scan_combined,
    mamba_split_conv1d_scan_combined,
)
from lightning_ops.compat._refs import mamba_split_conv1d_scan_ref  # noqa: F401

__all__ = ['mamba_chunk_scan_combined', 'mamba_split_conv1d_scan_combined',
           'mamba_split_conv1d_scan_ref']

"""Mirror of `mamba_ssm.ops.triton.ssd_combined` (lightning_ops.compat): same names and signatures, our kernels."""
from lightning_ops.compat._mamba import (  # noqa: F401
    mamba_chunk_scan,
    mamba_chunk_scan_combined,
    mamba_split_conv1d_scan_combined,
)
from lightning_ops.compat._refs import (  # noqa: F401
    mamba_conv1d_scan_ref,
    mamba_split_conv1d_scan_ref,
    ssd_chunk_scan_combined_ref,
    ssd_selective_scan,
)

__all__ = ['mamba_chunk_scan_combined', 'mamba_chunk_scan', 'mamba_split_conv1d_scan_combined',
           'mamba_split_conv1d_scan_ref', 'ssd_selective_scan', 'ssd_chunk_scan_combined_ref',
           'mamba_conv1d_scan_ref']

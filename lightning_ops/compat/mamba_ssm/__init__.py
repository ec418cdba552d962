"""Mirror of `mamba_ssm` (lightning_ops.compat): ops and (lazily) the Mamba / Mamba2 layers."""
from lightning_ops.compat._layers import lazy_layers
from lightning_ops.compat._mamba import mamba_inner_fn, selective_scan_fn  # noqa: F401

__all__ = ['selective_scan_fn', 'mamba_inner_fn', 'Mamba', 'Mamba2']
__getattr__, __dir__ = lazy_layers(__name__, ['Mamba', 'Mamba2'])

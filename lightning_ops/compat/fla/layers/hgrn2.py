"""Mirror of `fla.layers.hgrn2` (lightning_ops.compat): layer classes of lightning_ops.layers (lazy)."""
from lightning_ops.compat._layers import lazy_layers

__all__ = ['HGRN2Attention']
__getattr__, __dir__ = lazy_layers(__name__, __all__)

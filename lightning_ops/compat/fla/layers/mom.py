"""Mirror of `fla.layers.mom` (lightning_ops.compat): layer classes of lightning_ops.layers (lazy)."""
from lightning_ops.compat._layers import lazy_layers

__all__ = ['MomAttention']
__getattr__, __dir__ = lazy_layers(__name__, __all__)

"""Mirror of `fla` (lightning_ops.compat): layer classes of lightning_ops.layers (lazy)."""
from lightning_ops.compat._layers import lazy_layers

# fla re-exports every fla.layers class at the top level; LightningAttention has no fla
# counterpart (ours only)
__all__ = ['GatedLinearAttention', 'DeltaNet', 'GatedDeltaNet', 'KimiDeltaAttention',
           'HGRN2Attention', 'MomAttention', 'LightningAttention']
__getattr__, __dir__ = lazy_layers(__name__, __all__)

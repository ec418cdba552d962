"""Mirror of `fla.ops.kda` (lightning_ops.compat): same names and signatures, our kernels."""
from lightning_ops.compat._fla import chunk_kda, fused_kda_gate, fused_recurrent_kda  # noqa: F401

__all__ = ['chunk_kda', 'fused_recurrent_kda', 'fused_kda_gate']

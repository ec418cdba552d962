"""Mirror of `fla.ops.kda.chunk` (lightning_ops.compat): same names and signatures, our kernels."""
from lightning_ops.compat._fla import chunk_kda  # noqa: F401

__all__ = ['chunk_kda']

"""Mirror of `fla.ops.simple_gla.chunk` (lightning_ops.compat): same names and signatures, our kernels."""
from lightning_ops.compat._fla import (  # noqa: F401
    chunk_simple_gla,
)

__all__ = ['chunk_simple_gla']

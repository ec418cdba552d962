"""Mirror of `fla.ops.simple_gla.parallel` (lightning_ops.compat): same names and signatures, our kernels."""
from lightning_ops.compat._fla import (  # noqa: F401
    parallel_simple_gla,
)

__all__ = ['parallel_simple_gla']

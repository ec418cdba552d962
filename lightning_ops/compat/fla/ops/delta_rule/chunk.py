"""Mirror of `fla.ops.delta_rule.chunk` (lightning_ops.compat): same names and signatures, our kernels."""
from lightning_ops.compat._fla import (  # noqa: F401
    chunk_delta_rule,
)

__all__ = ['chunk_delta_rule']

"""Mirror of `fla.ops.simple_gla.naive` (lightning_ops.compat): same names and signatures, references computed by our spec (lightning_ops.reference)."""
from lightning_ops.compat._refs import (  # noqa: F401
    naive_recurrent_simple_gla,
    naive_parallel_simple_gla,
)

__all__ = ['naive_recurrent_simple_gla', 'naive_parallel_simple_gla']

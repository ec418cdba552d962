"""Mirror of `fla.ops.log_linear_attn.naive` (lightning_ops.compat): same names and signatures, references computed by our spec (lightning_ops.reference)."""
from lightning_ops.compat._refs import (  # noqa: F401
    naive_log_linear_attn,
)

__all__ = ['naive_log_linear_attn']

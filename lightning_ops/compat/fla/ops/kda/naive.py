"""Mirror of `fla.ops.kda.naive` (lightning_ops.compat): same names and signatures, references computed by our spec (lightning_ops.reference).
naive_chunk_kda is our chunked torch engine (see lightning_ops.compat._refs)."""
from lightning_ops.compat._refs import (  # noqa: F401
    naive_recurrent_kda,
    naive_chunk_kda,
)

__all__ = ['naive_recurrent_kda', 'naive_chunk_kda']

"""Mirror of `fla.ops.log_linear_attn.chunk` (lightning_ops.compat): same names and signatures, our kernels.
chunkwise_bwd_kernel_dkg (a Triton kernel of fla's) imports but raises UnsupportedArgumentError."""
from lightning_ops.compat._fla import (  # noqa: F401
    chunk_log_linear_attn,
    chunkwise_bwd_kernel_dkg,
)

__all__ = ['chunk_log_linear_attn', 'chunkwise_bwd_kernel_dkg']
